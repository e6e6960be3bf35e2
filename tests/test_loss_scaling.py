"""minillm.loss_scaling and ``--precision fp16``: the hand-written dynamic loss scaler equals torch.amp.GradScaler
step for step, the underflow counts equal counting the casts, and an fp16 Trainer run resumes exactly.

Equality is exact (torch.equal, ==) wherever the two sides do the same float32 arithmetic: the scale is a float32
number in both, the scaled loss and the unscaled gradients are the same products (g * fp32(1/S)), and the same
optimizer steps on the same gradients.
"""

from __future__ import annotations

import json
import math

import pytest
import test_train  # its tiny GPT, task, config and train()
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minillm.checkpoint import read_safetensors
from minillm.gpt import GPT, GPTConfig
from minillm.loss_scaling import (
    DynamicLossScaler,
    activation_gradients,
    count_underflow,
    gradient_values,
    log2_histogram,
    make_grad_scaler,
    overflow_threshold,
    plot_gradient_range,
    smallest_subnormal,
)
from minillm.runs import CHECKPOINT, RESULTS, read_log

# ---------------------------------------------------------------------------------------------
# The hand-written scaler against torch.amp.GradScaler
# ---------------------------------------------------------------------------------------------


def run_scaled_steps(scaler, overflows, autocast_fp16=False, seed=0):
    """A tiny two-layer model trained with ``scaler`` for ``len(overflows)`` steps; on step i, when ``overflows[i]``
    is "inf" or "nan", that value is written into one gradient after the backward pass (as an fp16 overflow would
    leave it). Returns, per step, (scale after update, whether the parameters moved, the parameters)."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    trajectory = []
    for injected in overflows:
        before = [p.detach().clone() for p in model.parameters()]
        with torch.autocast("cpu", dtype=torch.float16, enabled=autocast_fp16):
            loss = torch.nn.functional.mse_loss(model(x).float(), y)
        scaler.scale(loss).backward()
        if injected:
            model[0].weight.grad[1, 2] = float(injected)
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        moved = any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
        trajectory.append((scaler.get_scale(), moved, [p.detach().clone() for p in model.parameters()]))
    return trajectory


def assert_same_trajectory(ours, theirs):
    for step, ((scale, moved, params), (torch_scale, torch_moved, torch_params)) in enumerate(zip(ours, theirs)):
        assert scale == torch_scale, f"step {step}: scale {scale} vs GradScaler's {torch_scale}"
        assert moved == torch_moved, f"step {step}: skipped differently"
        assert all(torch.equal(a, b) for a, b in zip(params, torch_params)), f"step {step}: parameters differ"


@settings(max_examples=25, deadline=None)
@given(growth_interval=st.integers(1, 4),
       factors=st.sampled_from([(2.0, 0.5), (4.0, 0.25), (1.5, 0.7)]),
       init_exponent=st.integers(0, 20),
       overflows=st.lists(st.sampled_from([None, None, "inf", "nan"]), min_size=1, max_size=10))
def test_hand_written_scaler_matches_torch_gradscaler_step_for_step(growth_interval, factors, init_exponent, overflows):
    """Same scale after every update, the same steps skipped, the same parameters, for any growth interval, any
    pattern of overflowing steps (inf or NaN in a gradient), and growth/backoff factors that are not powers of two
    (their products are rounded to float32 in both)."""
    growth, backoff = factors
    options = dict(init_scale=2.0**init_exponent, growth_factor=growth, backoff_factor=backoff,
                   growth_interval=growth_interval)
    ours = run_scaled_steps(DynamicLossScaler(**options), overflows)
    theirs = run_scaled_steps(torch.amp.GradScaler("cpu", **options), overflows)
    assert_same_trajectory(ours, theirs)
    skipped = [not moved for _, moved, _ in ours]
    assert skipped == [bool(injected) for injected in overflows]  # exactly the poisoned steps were skipped


def test_hand_written_scaler_matches_gradscaler_when_fp16_gradients_really_overflow():
    """No injected inf: under fp16 autocast a start scale of 2^24 makes the backward pass overflow fp16 by itself
    (measured: 7 halvings to 2^17); both scalers back off alike, then grow (every 3 good steps) and overflow again,
    in step."""
    overflows = [None] * 16
    options = dict(init_scale=2.0**24, growth_interval=3)
    ours = run_scaled_steps(DynamicLossScaler(**options), overflows, autocast_fp16=True)
    theirs = run_scaled_steps(torch.amp.GradScaler("cpu", **options), overflows, autocast_fp16=True)
    assert_same_trajectory(ours, theirs)
    scales = [scale for scale, _, _ in ours]
    assert not ours[0][1] and scales[0] == 2.0**23  # the first step overflowed and was skipped
    assert any(b > a for a, b in zip(scales, scales[1:]))  # the scale grew again later ...
    assert sum(not moved for _, moved, _ in ours) >= 3  # ... and it overflowed more than once


def test_the_two_scalers_load_each_others_state():
    ours = DynamicLossScaler(init_scale=2.0**10, growth_interval=5)
    run_scaled_steps(ours, [None, "inf", None, None])
    theirs = torch.amp.GradScaler("cpu")
    theirs.load_state_dict(ours.state_dict())
    assert theirs.state_dict() == ours.state_dict() == {"scale": 2.0**9, "growth_factor": 2.0, "backoff_factor": 0.5,
                                                        "growth_interval": 5, "_growth_tracker": 2}
    again = DynamicLossScaler()
    again.load_state_dict(theirs.state_dict())
    assert again.state_dict() == ours.state_dict()


def test_the_scaler_refuses_calls_out_of_order_and_impossible_settings():
    scaler = DynamicLossScaler()
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(RuntimeError, match="update"):
        scaler.update()
    scaler.unscale_(optimizer)
    with pytest.raises(RuntimeError, match="unscale_"):
        scaler.unscale_(optimizer)
    with pytest.raises(ValueError, match="growth_factor"):
        DynamicLossScaler(growth_factor=1.0)


def test_the_trainer_gets_a_grad_scaler_for_fp16_only():
    assert isinstance(make_grad_scaler("cpu", "fp16"), torch.amp.GradScaler)
    assert make_grad_scaler("cpu", "bf16") is None and make_grad_scaler("cpu", "fp32") is None
    assert make_grad_scaler("mps", "fp16") is None  # fp16 autocast is not offered on MPS: fp32, nothing to scale


# ---------------------------------------------------------------------------------------------
# Why: underflow counted from the formats' constants, against the casts themselves
# ---------------------------------------------------------------------------------------------


def test_the_formats_constants():
    assert smallest_subnormal(torch.float16) == 2.0**-24 and smallest_subnormal(torch.bfloat16) == 2.0**-133
    assert smallest_subnormal(torch.float32) == 2.0**-149
    assert overflow_threshold(torch.float16) == 65520.0
    assert torch.tensor(65519.996).half().isfinite() and torch.tensor(65520.0).half().isinf()


def edge_values():
    """The magnitudes where a cast changes its answer, and their float32 neighbours."""
    edges = [2.0**-25, 2.0**-14 - 2.0**-25, 2.0**-14, 65520.0, 2.0**-134 * 1.0, 2.0**-126]
    values = []
    for edge in edges:
        edge = torch.tensor(edge, dtype=torch.float32)
        values += [edge, torch.nextafter(edge, torch.tensor(0.0)), torch.nextafter(edge, torch.tensor(math.inf))]
    return torch.stack(values)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), size=st.integers(1, 300), scale_exponent=st.integers(0, 24),
       zeros=st.integers(0, 5))
def test_underflow_counts_equal_counting_the_casts(seed, size, scale_exponent, zeros):
    """``count_underflow`` reasons from magnitudes; here each count is taken by casting: 0 and subnormal after
    ``.half()`` of g, 0, subnormal and inf after ``.half()`` of S g, and 0 after ``.bfloat16()``. Values are
    random normal float32 numbers of either sign, m 2^e with m in [1, 2) and e in [-126, 20] (a network's gradients
    are not float32 subnormals, which some CPUs' conversion instructions read as 0), the formats' edges and their
    float32 neighbours, and some exact zeros (never counted)."""
    generator = torch.Generator().manual_seed(seed)
    exponents = torch.randint(-126, 21, (size,), generator=generator).double()
    signs = torch.randint(0, 2, (size,), generator=generator).double() * 2 - 1
    values = (signs * (1 + torch.rand(size, generator=generator, dtype=torch.float64)) * 2.0**exponents).float()
    values = torch.cat([values, edge_values(), -edge_values(), torch.zeros(zeros)])
    scale = 2.0**scale_exponent
    counts = count_underflow(values, scale)

    def outcomes(cast):
        nonzero = values != 0
        return (int(((cast == 0) & nonzero).sum()),
                int(((cast != 0) & (cast.abs() < torch.finfo(cast.dtype).tiny) & nonzero).sum()),
                int((cast.isinf() & nonzero).sum()))

    assert counts.nonzero == int((values != 0).sum())
    assert (counts.fp16_zero, counts.fp16_subnormal) == outcomes(values.half())[:2]
    assert (counts.scaled_fp16_zero, counts.scaled_fp16_subnormal, counts.scaled_fp16_inf) == outcomes((values * scale).half())
    assert counts.bf16_zero == outcomes(values.bfloat16())[0]


@settings(max_examples=30, deadline=None)
@given(values=st.lists(st.floats(allow_nan=False, allow_infinity=False, width=32), min_size=1, max_size=100))
def test_log2_histogram_counts_each_binary_exponent(values):
    """Bin e holds the nonzero g with 2^e <= |g| < 2^(e+1): checked against floor(log2 |g|) in float64."""
    values = torch.tensor(values, dtype=torch.float32)
    exponents, counts = log2_histogram(values)
    nonzero = values[values != 0].double().abs()
    expected = torch.floor(torch.log2(nonzero)).long()
    assert counts.sum() == nonzero.numel()
    for exponent, count in zip(exponents, counts):
        assert count == int((expected == int(exponent)).sum())


def test_a_tiny_gpts_gradients_lose_nothing_in_bf16_and_less_in_fp16_once_scaled(tmp_path):
    """Real gradients, the chapter's picture: after a few steps of a tiny GPT on 12 x 64 tokens, some gradients that
    reach its linear layers round to 0 in fp16 and most are fp16 subnormals (their loss is a mean over 768 tokens);
    scaled by 2^16 far fewer are lost; none rounds to 0 in bf16 (measured: 1.4% zero and 76% subnormal in fp16,
    0.09% and 0.05% after scaling)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=65, block_size=64, n_layer=2, n_head=2, n_embd=32, dropout=0.0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randint(0, 65, (12, 64)), torch.randint(0, 65, (12, 64))
    for _ in range(5):
        optimizer.zero_grad()
        model(x, y)[1].backward()
        optimizer.step()
    optimizer.zero_grad()
    activations = count_underflow(activation_gradients(model, lambda m: m(x, y)[1]))
    weights = count_underflow(gradient_values(model))
    for counts in (activations, weights):
        assert counts.bf16_zero == 0 and counts.scaled_fp16_inf == 0
        assert counts.scaled_fp16_zero < counts.fp16_zero
        assert counts.scaled_fp16_subnormal < counts.fp16_subnormal / 10
    assert activations.fp16_zero > 0 and activations.fp16_subnormal > activations.nonzero / 2
    path = plot_gradient_range(activation_gradients(model, lambda m: m(x, y)[1]), tmp_path / "gradients.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------
# --precision fp16 in the Trainer
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def eager_scaler(monkeypatch):
    """The Trainer's GradScaler started at 2^24 and growing every 3 good steps: the tiny GPT's fp16 backward pass
    overflows at first, so the run skips steps, backs off, grows and overflows again within 12 steps."""
    import minillm.train

    monkeypatch.setattr(minillm.train, "make_grad_scaler", lambda device, precision: torch.amp.GradScaler(
        "cpu", init_scale=2.0**24, growth_interval=3) if precision == "fp16" else None)


def test_an_fp16_run_stopped_and_resumed_equals_the_uninterrupted_run_bit_for_bit(tmp_path, eager_scaler):
    """The scaler's state (scale and good-step count) is in the checkpoint: a run stopped at step 9, mid-interval,
    with a scale and a growth count that differ from a fresh scaler's, resumes into the same log and weights."""
    full, full_model = test_train.train(tmp_path / "full", precision="fp16")
    test_train.train(tmp_path / "resumed", stop_after=9, precision="fp16")
    saved = read_safetensors(tmp_path / "resumed" / CHECKPOINT)[1]
    assert saved["step"] == 9 and saved["skipped_steps"] > 0
    assert saved["grad_scaler"]["scale"] < 2.0**24 and saved["grad_scaler"]["_growth_tracker"] > 0  # both matter
    resumed, resumed_model = test_train.train(tmp_path / "resumed", resume=True, precision="fp16")
    strip = lambda log: [{k: v for k, v in e.items() if k != "tokens_per_s"} for e in log]  # noqa: E731
    assert strip(read_log(tmp_path / "resumed")) == strip(read_log(tmp_path / "full"))
    assert resumed.val_loss == full.val_loss
    test_train.assert_same_weights(test_train.weights(resumed_model), test_train.weights(full_model))
    log = read_log(tmp_path / "full")
    assert all("loss_scale" in entry and "skipped_steps" in entry for entry in log)
    assert json.loads((tmp_path / "full" / RESULTS).read_text())["skipped_steps"] == log[-1]["skipped_steps"] > 0


def test_skipped_fp16_steps_are_reported(tmp_path, eager_scaler):
    messages = []
    trainer = test_train.Trainer(test_train.new_model(), test_train.make_task(),
                                 test_train.config(tmp_path / "run", precision="fp16"), {"model": test_train.MODEL},
                                 log=messages.append)
    trainer.fit()
    assert "fp16 autocast, loss scaling" in messages[0]
    skipped = trainer.state.skipped_steps
    assert skipped > 0 and messages[-1].endswith("steps skipped)") and f"{skipped} steps skipped" in messages[-1]


def test_fp16_training_on_the_cpu_follows_the_fp32_run(tmp_path):
    """With PyTorch's default scaler (2^16, no overflow here) fp16 changes the rounding, not the training: the
    validation loss ends within 1% of the fp32 run's (fp16 keeps 11 significant bits, a relative error of at most
    2^-12 per product; measured: 0.003%)."""
    runs = {precision: test_train.train(tmp_path / precision, max_iters=100, eval_interval=50, lr=1e-2, min_lr=1e-3,
                                        precision=precision)[0] for precision in ("fp32", "fp16")}
    assert runs["fp32"].val_loss < 0.7 * math.log(7)
    assert runs["fp16"].val_loss == pytest.approx(runs["fp32"].val_loss, rel=1e-2)
    assert runs["fp16"].val_loss != runs["fp32"].val_loss  # fp16 did run: the roundings differ
