"""minillm.hpsearch: grids cover every combination, random search is seeded and draws from the stated
distributions, and run_trials never reruns a finished trial (also after a crash) nor loads a stale one."""

from __future__ import annotations

import itertools
import json
import math
import statistics

import pytest
from hypothesis import given
from hypothesis import strategies as st

from minillm import MinillmError
from minillm.hpsearch import best_trial, grid, random_search, results_table, run_trials, trial_folder_name

names = st.lists(st.sampled_from(["lr", "batch_size", "weight_decay", "lora_r", "dropout"]), min_size=1, max_size=4, unique=True)


@st.composite
def choice_spaces(draw):
    return {name: draw(st.lists(st.integers(-50, 50), min_size=1, max_size=4, unique=True)) for name in draw(names)}


# ---------------------------------------------------------------------------------------------
# grid and random_search
# ---------------------------------------------------------------------------------------------


@given(choice_spaces())
def test_grid_is_the_cartesian_product_in_a_fixed_order(space):
    trials = grid(space)
    assert len(trials) == math.prod(len(values) for values in space.values())
    combos = [tuple(trial[name] for name in space) for trial in trials]
    assert combos == list(itertools.product(*space.values()))  # every combination once, the last name fastest
    assert all(list(trial) == list(space) for trial in trials)
    assert grid(space) == trials


def test_grid_rejects_ranges_and_empty_lists():
    with pytest.raises(ValueError, match="random_search"):
        grid({"lr": ("log-uniform", 1e-4, 1e-2)})
    with pytest.raises(ValueError, match="non-empty list"):
        grid({"lr": []})


@given(choice_spaces(), st.integers(0, 2**32), st.integers(0, 12), st.integers(0, 5))
def test_random_search_is_deterministic_picks_listed_values_and_more_trials_keep_the_first(space, seed, n, extra):
    trials = random_search(space, n, seed)
    assert len(trials) == n and random_search(space, n, seed) == trials
    assert all(trial[name] in space[name] for trial in trials for name in space)
    assert random_search(space, n + extra, seed)[:n] == trials


@given(st.floats(-6, 2), st.floats(0.01, 6), st.floats(-50, 50), st.floats(0.01, 100), st.integers(0, 2**32))
def test_random_search_ranges_stay_within_their_bounds(log_lo, log_width, lo, width, seed):
    space = {"lr": ("log-uniform", 10**log_lo, 10 ** (log_lo + log_width)), "wd": ("uniform", lo, lo + width)}
    for trial in random_search(space, 50, seed):
        assert space["lr"][1] <= trial["lr"] <= space["lr"][2]
        assert lo <= trial["wd"] <= lo + width


def test_seeds_give_different_draws():
    space = {"lr": ("log-uniform", 1e-5, 1e-1)}
    assert random_search(space, 5, seed=0) != random_search(space, 5, seed=1)


@given(st.integers(0, 2**32))
def test_log_uniform_is_uniform_in_the_logarithm(seed):
    """log10(lr) should be uniform on [-5, -1]. For n = 2,000 draws the sample median of a uniform on an
    interval of width 4 has standard deviation about 4 / (2 sqrt(n)) = 0.045, so it lies within 0.25
    (5.6 standard deviations) of -3, i.e. the median within a factor 10^0.25 = 1.8 of the geometric mean
    1e-3, except with probability ~1e-8. Each of the 4 decades holds a quarter of the draws, to within
    5 binomial standard deviations (sqrt(n/4 * 3/4) = 19.4). A plain uniform on [1e-5, 1e-1] fails both:
    its median is ~0.05 and 90% of its draws fall in the top decade."""
    n = 2000
    draws = [trial["lr"] for trial in random_search({"lr": ("log-uniform", 1e-5, 1e-1)}, n, seed)]
    assert abs(math.log10(statistics.median(draws)) - (-3)) < 0.25
    decades = [sum(10**k <= x < 10 ** (k + 1) for x in draws) for k in range(-5, -1)]
    assert all(abs(count - n / 4) < 5 * math.sqrt(n * 0.25 * 0.75) for count in decades), decades


@given(st.integers(0, 2**32))
def test_uniform_has_the_midpoint_as_its_mean(seed):
    """The mean of n = 2,000 uniforms on [0, 1] has standard deviation sqrt(1/12 / n) = 0.0065: within 0.04 (6 sd)."""
    draws = [trial["x"] for trial in random_search({"x": ("uniform", 0.0, 1.0)}, 2000, seed)]
    assert abs(statistics.fmean(draws) - 0.5) < 0.04


@pytest.mark.parametrize("spec", [("uniform", 1.0, 1.0), ("log-uniform", 0.0, 1.0), ("log-uniform", -1.0, 1.0), [], 3])
def test_bad_space_entries_are_rejected(spec):
    with pytest.raises(ValueError):
        random_search({"x": spec}, 1)


# ---------------------------------------------------------------------------------------------
# run_trials
# ---------------------------------------------------------------------------------------------


class Objective:
    """A fake fine-tuning run: accuracy peaks at lr = 1e-3; counts its calls; can crash on a chosen call."""

    def __init__(self, crash_on_call: int | None = None):
        self.calls, self.crash_on_call = [], crash_on_call

    def __call__(self, params, folder):
        self.calls.append(dict(params))
        (folder / "partial.txt").write_text("work in progress")  # what a crashed run leaves behind
        if self.crash_on_call is not None and len(self.calls) == self.crash_on_call:
            raise RuntimeError("the machine fell over")
        return {"accuracy": 1.0 - abs(math.log10(params["lr"]) + 3) / 10, "loss": abs(math.log10(params["lr"]) + 3)}


TRIALS = grid({"lr": [1e-4, 1e-3, 1e-2], "batch_size": [16, 32]})


def test_a_finished_trial_is_loaded_not_rerun(tmp_path):
    objective = Objective()
    first = run_trials(TRIALS, objective, tmp_path, log=lambda message: None)
    assert len(objective.calls) == len(TRIALS)
    again = Objective()
    second = run_trials(TRIALS, again, tmp_path, log=lambda message: None)
    assert again.calls == [] and second == first
    assert [row["trial"] for row in first] == list(range(len(TRIALS)))
    assert all(row["lr"] == trial["lr"] and row["batch_size"] == trial["batch_size"] and "accuracy" in row
               for row, trial in zip(first, TRIALS))


def test_after_a_crash_only_the_unfinished_trials_run(tmp_path):
    crashing = Objective(crash_on_call=3)
    with pytest.raises(RuntimeError, match="fell over"):
        run_trials(TRIALS, crashing, tmp_path, log=lambda message: None)
    crashed_folder = tmp_path / trial_folder_name(2, TRIALS[2])
    assert (crashed_folder / "partial.txt").exists() and not (crashed_folder / "results.json").exists()
    assert len((tmp_path / "trials.jsonl").read_text().splitlines()) == 2  # the two finished trials
    rerun = Objective()
    rows = run_trials(TRIALS, rerun, tmp_path, log=lambda message: None)
    assert rerun.calls == TRIALS[2:]  # the crashed trial and those after it, each once
    assert len(rows) == len(TRIALS)


def test_an_unfinished_trial_restarts_in_an_empty_folder(tmp_path):
    folder = tmp_path / trial_folder_name(0, TRIALS[0])
    folder.mkdir(parents=True)
    (folder / "stale.txt").write_text("from an interrupted attempt")
    seen = []
    run_trials(TRIALS[:1], lambda params, where: seen.append(sorted(p.name for p in where.iterdir())) or {"accuracy": 0.5},
               tmp_path, log=lambda message: None)
    assert seen == [[]]


def test_results_of_other_parameters_in_a_trial_folder_are_a_clear_error(tmp_path):
    """Decision: a results.json whose params differ from the trial's (an edited file, a hash collision) is
    never overwritten nor silently reused: MinillmError names the folder, and deleting it reruns the trial."""
    run_trials(TRIALS[:1], Objective(), tmp_path, log=lambda message: None)
    results = tmp_path / trial_folder_name(0, TRIALS[0]) / "results.json"
    saved = json.loads(results.read_text())
    saved["params"]["lr"] = 0.5
    results.write_text(json.dumps(saved))
    objective = Objective()
    with pytest.raises(MinillmError, match="differ in lr.*delete that folder"):
        run_trials(TRIALS[:1], objective, tmp_path, log=lambda message: None)
    assert objective.calls == [] and json.loads(results.read_text())["params"]["lr"] == 0.5
    results.parent.joinpath("results.json").unlink()
    run_trials(TRIALS[:1], objective, tmp_path, log=lambda message: None)
    assert objective.calls == TRIALS[:1]


def test_a_new_context_reruns_the_trials_in_new_folders(tmp_path):
    first, second = Objective(), Objective()
    run_trials(TRIALS[:2], first, tmp_path, context={"budget": 100}, log=lambda message: None)
    run_trials(TRIALS[:2], second, tmp_path, context={"budget": 200}, log=lambda message: None)
    assert second.calls == TRIALS[:2]
    assert trial_folder_name(0, TRIALS[0], {"budget": 100}) != trial_folder_name(0, TRIALS[0], {"budget": 200})
    assert trial_folder_name(0, {"a": 1, "b": 2}) == trial_folder_name(0, {"b": 2, "a": 1})  # order does not matter


def test_tables_and_the_best_trial(tmp_path):
    rows = run_trials(TRIALS, Objective(), tmp_path, log=lambda message: None)
    assert best_trial(rows, "accuracy", "max")["lr"] == 1e-3
    assert best_trial(rows, "loss", "min")["lr"] == 1e-3
    lines = [json.loads(line) for line in (tmp_path / "trials.jsonl").read_text().splitlines()]
    assert lines == rows
    table = (tmp_path / "trials.md").read_text()
    assert table.startswith("| trial | lr | batch_size | accuracy | loss |")
    assert "| 2 (best) |" in table and table.count("(best)") == 1
    assert not list(tmp_path.rglob("*.tmp"))  # atomic writes leave no temporary files


def test_best_trial_skips_missing_and_nan_and_prefers_the_first_of_a_tie():
    rows = [{"trial": 0, "acc": float("nan")}, {"trial": 1, "acc": 0.7}, {"trial": 2}, {"trial": 3, "acc": 0.7}]
    assert best_trial(rows, "acc")["trial"] == 1
    assert best_trial([{"trial": 0}], "acc") is None
    with pytest.raises(ValueError, match="mode"):
        best_trial(rows, "acc", "biggest")
    assert "(best)" not in results_table([{"trial": 0, "acc": float("nan")}], "acc")


def test_run_trial_must_return_the_metric_and_not_shadow_a_parameter(tmp_path):
    with pytest.raises(ValueError, match="must return the metric 'accuracy'"):
        run_trials(TRIALS[:1], lambda params, folder: {"acc": 1.0}, tmp_path / "a", log=lambda message: None)
    with pytest.raises(ValueError, match="named like parameters"):
        run_trials(TRIALS[:1], lambda params, folder: {"accuracy": 1.0, "lr": 2.0}, tmp_path / "b", log=lambda message: None)
