"""minillm.pipeline_parallel: a GPT cut into stages computes the unsplit model, GPipe by hand and through
torch.distributed.pipelining (GPipe and 1F1B) give the unsplit model's loss and gradients, and the simulated
timelines have exactly the bubble (p - 1) / (m + p - 1) and the activation memory the schedules promise."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from minillm.distributed import spawn
from minillm.gpt import GPT, GPTConfig
from minillm.pipeline_parallel import (
    DEMO_CONFIG,
    Interval,
    bubble_results,
    compare_stage_with_unsplit,
    gpipe_bubble_fraction,
    merge_ranks,
    pipeline_matches_unsplit,
    pipeline_order,
    plot_bubble_fraction,
    plot_pipeline_timelines,
    simulate_pipeline,
    split_gpt,
    stage_layers,
    time_gpipe_stage,
)

# ---------------------------------------------------------------------------------------------
# Splitting (one process)
# ---------------------------------------------------------------------------------------------


@given(n_layer=st.integers(1, 4), stages=st.data(), positions=st.sampled_from(["learned", "rotary"]),
       tie_weights=st.booleans(), seed=st.integers(0, 2**16))
def test_stages_run_one_after_another_compute_the_unsplit_logits_and_hold_copies_of_its_parameters(
        n_layer, stages, positions, tie_weights, seed):
    n_stages = stages.draw(st.integers(1, n_layer))
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=13, block_size=8, n_layer=n_layer, n_head=2, n_embd=8, dropout=0.0,
                          positions=positions, tie_weights=tie_weights))
    pieces = split_gpt(model, n_stages)
    ids = torch.randint(13, (2, 8))
    x = ids
    for stage in pieces:
        x = stage(x)
    # The same operations on the same numbers in the same order: equal to the last bit.
    assert torch.equal(x, model(ids)[0])

    names = [name for stage in pieces for name, _ in stage.named_parameters()]
    expected = [name for name, _ in model.named_parameters()]  # the tied matrix once, as "wte.weight"
    if tie_weights and n_stages > 1:
        expected.append("lm_head.weight")  # the last stage's copy of it
    assert sorted(names) == sorted(expected)  # every parameter in exactly one stage (the tied one in two)
    for stage in pieces:
        for name, parameter in stage.named_parameters():
            assert torch.equal(parameter, model.get_parameter(name))
            assert parameter.data_ptr() != model.get_parameter(name).data_ptr()  # a copy, not the model's own
    tied = [stage.tied_weight() is not None for stage in pieces]
    assert tied == [tie_weights and n_stages > 1 and index in (0, n_stages - 1) for index in range(n_stages)]


def test_blocks_are_shared_out_as_evenly_as_possible_the_first_stages_taking_the_extra_ones():
    assert stage_layers(5, 2) == [range(0, 3), range(3, 5)]
    assert stage_layers(6, 4) == [range(0, 2), range(2, 4), range(4, 5), range(5, 6)]
    assert stage_layers(3, 1) == [range(0, 3)]
    for n_stages in (0, 4):
        with pytest.raises(ValueError, match="n_stages must be between 1 and the model's 3 blocks"):
            stage_layers(3, n_stages)


# ---------------------------------------------------------------------------------------------
# The simulator
# ---------------------------------------------------------------------------------------------


def test_a_small_gpipe_timeline_worked_out_by_hand():
    timeline = simulate_pipeline(2, 2, "gpipe", forward_cost=1, backward_cost=2)
    assert timeline.stages == [
        [Interval("F", 0, 0, 1), Interval("F", 1, 1, 2), Interval("B", 1, 5, 7), Interval("B", 0, 7, 9)],
        [Interval("F", 0, 1, 2), Interval("F", 1, 2, 3), Interval("B", 1, 3, 5), Interval("B", 0, 5, 7)],
    ]
    assert timeline.makespan == 9
    assert timeline.idle_intervals(0) == [(2, 5)]
    assert timeline.idle_intervals(1) == [(0, 1), (7, 9)]
    assert timeline.bubble_fraction(0) == timeline.bubble_fraction(1) == Fraction(1, 3) == gpipe_bubble_fraction(2, 2)


def test_1f1b_fills_the_pipeline_then_alternates_one_forward_and_one_backward():
    assert pipeline_order("1f1b", 4, 6, 0) == [("F", 0), ("F", 1), ("F", 2), ("F", 3), ("B", 0), ("F", 4), ("B", 1),
                                               ("F", 5), ("B", 2), ("B", 3), ("B", 4), ("B", 5)]
    assert pipeline_order("1f1b", 4, 6, 3) == [item for i in range(6) for item in (("F", i), ("B", i))]
    assert pipeline_order("gpipe", 4, 3, 2) == [("F", 0), ("F", 1), ("F", 2), ("B", 2), ("B", 1), ("B", 0)]
    with pytest.raises(ValueError, match="schedule must be 'gpipe' or '1f1b'"):
        pipeline_order("zero-bubble", 4, 6, 0)


@given(n_stages=st.integers(1, 8), n_microbatches=st.integers(1, 16), forward_cost=st.integers(1, 5),
       backward_cost=st.integers(1, 5), schedule=st.sampled_from(["gpipe", "1f1b"]))
def test_every_stage_idles_exactly_the_bubble_formula_and_1f1b_holds_fewer_micro_batches(
        n_stages, n_microbatches, forward_cost, backward_cost, schedule):
    timeline = simulate_pipeline(n_stages, n_microbatches, schedule, forward_cost, backward_cost)
    assert timeline.makespan == (n_microbatches + n_stages - 1) * (forward_cost + backward_cost)
    for stage in range(n_stages):
        assert timeline.busy(stage) == n_microbatches * (forward_cost + backward_cost)
        assert timeline.bubble_fraction(stage) == gpipe_bubble_fraction(n_stages, n_microbatches)  # exact fractions
        held = n_microbatches if schedule == "gpipe" else min(n_microbatches, n_stages - stage)
        assert timeline.peak_in_flight(stage) == held


@given(n_stages=st.integers(2, 6), n_microbatches=st.integers(1, 8), send_cost=st.integers(1, 3))
def test_messages_that_take_time_make_the_bubble_larger_than_the_formula(n_stages, n_microbatches, send_cost):
    timeline = simulate_pipeline(n_stages, n_microbatches, "gpipe", 1, 2, send_cost=send_cost)
    assert all(timeline.bubble_fraction(stage) > gpipe_bubble_fraction(n_stages, n_microbatches)
               for stage in range(n_stages))


def test_the_pictures_are_saved(tmp_path):
    timelines = {schedule: simulate_pipeline(4, 6, schedule) for schedule in ("gpipe", "1f1b")}
    assert plot_pipeline_timelines(timelines, tmp_path / "timeline.png").stat().st_size > 0
    assert plot_bubble_fraction({1: 0.52, 4: 0.21}, tmp_path / "bubble.png").stat().st_size > 0


# ---------------------------------------------------------------------------------------------
# The real pipelines (one spawn of three processes: start-up costs seconds)
# ---------------------------------------------------------------------------------------------

MICRO_BATCHES = (1, 3, 6)


def _pipeline_checks(rank: int, world_size: int):
    equality = compare_stage_with_unsplit(rank, world_size, DEMO_CONFIG, MICRO_BATCHES, batch_size=6, seed=0)
    timed = time_gpipe_stage(rank, world_size, (2, 3), forward_seconds=0.001, backward_seconds=0.002, repeats=1)
    return equality, timed


def test_gpipe_by_hand_and_torch_gpipe_and_1f1b_give_the_unsplit_models_loss_and_every_gradient():
    # Three stages: a first, a middle and a last one, and the tied embedding summed over the group {0, 2} only.
    per_rank = spawn(_pipeline_checks, 3)
    comparisons = merge_ranks([equality for equality, _ in per_rank])
    expected = {("hand-written GPipe", m) for m in MICRO_BATCHES} | {("torch gpipe", m) for m in MICRO_BATCHES} \
        | {("torch 1f1b", m) for m in MICRO_BATCHES if m >= 3}
    assert {key for key in comparisons if isinstance(key, tuple)} == expected
    # float64: rounding leaves ~1e-16 of the largest value, summed over a few hundred terms at most; a schedule's
    # mistake (a micro-batch lost or counted twice, the 1/m missing, the tied copies not summed) moves a gradient
    # by at least 1/6 of its size. 1e-12 of the largest gradient (and an absolute 1e-12 on a loss of ~3.6) lies between.
    scale = comparisons["largest gradient"]
    for key in expected:
        assert comparisons[key]["loss difference"] <= 1e-12, key
        assert comparisons[key]["gradient difference"] <= 1e-12 * scale, key
        if key[0].startswith("torch"):
            assert comparisons[key]["gradient difference to hand-written"] <= 1e-12 * scale, key

    # The hand-written GPipe runs the order the simulator assumes, one piece of work at a time per stage.
    for m, result in bubble_results([timed for _, timed in per_rank], (2, 3)).items():
        for stage, intervals in enumerate(result["timeline"].stages):
            assert [(i.kind, i.micro_batch) for i in intervals] == pipeline_order("gpipe", 3, m, stage)
            assert all(earlier.end <= later.start for earlier, later in zip(intervals, intervals[1:]))
        assert result["formula"] == float(Fraction(2, m + 2))


def test_micro_batches_must_cut_the_batch_evenly():
    with pytest.raises(ValueError, match="every micro-batch count must divide the batch size 8"):
        pipeline_matches_unsplit(micro_batch_counts=(3,), batch_size=8)
