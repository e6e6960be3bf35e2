"""Hyperparameter search: which settings to try (a grid or random draws), and running the trials resumably.

A *search space* maps each hyperparameter's name to what it may be:

- a list of values to choose from: ``{"batch_size": [16, 32, 64]}``,
- ``("log-uniform", lo, hi)``: a float whose logarithm is uniform on [log lo, log hi], for scales such
  as a learning rate, where 1e-4 -> 3e-4 matters as much as 1e-3 -> 3e-3,
- ``("uniform", lo, hi)``: a float uniform on [lo, hi].

:func:`grid` tries every combination of lists (the product of their lengths: it grows exponentially
with the number of hyperparameters); :func:`random_search` draws ``n_trials`` settings from a seeded
generator. With the same budget, random search tries ``n_trials`` distinct values of *every*
hyperparameter where a grid tries only a few of each, which wins when only some of them matter
(Bergstra & Bengio, 2012, "Random Search for Hyper-Parameter Optimization").

:func:`run_trials` runs one trial per setting, each in its own folder, and is resumable: a finished
trial (its ``results.json`` holds the same parameters and context) is loaded, not rerun, so an
interrupted search, or a chapter run a second time, only runs what is missing. It writes
``trials.jsonl`` and a Markdown table ``trials.md`` and marks the best trial (:func:`best_trial`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import pathlib
import random
import shutil
import time
from typing import Any, Callable, Literal, Mapping, Sequence

from minillm import MinillmError
from minillm.files import atomic_write_text, read_json, write_json

__all__ = ["grid", "random_search", "trial_folder_name", "run_trials", "best_trial", "results_table"]

DISTRIBUTIONS = ("uniform", "log-uniform")
Space = Mapping[str, Any]


def _distribution(spec) -> tuple[str, float, float] | None:
    """``(kind, lo, hi)`` when ``spec`` is a ("uniform" | "log-uniform", lo, hi) tuple, None for a list of choices."""
    if isinstance(spec, tuple) and len(spec) == 3 and spec[0] in DISTRIBUTIONS:
        kind, lo, hi = spec
        if not lo < hi or (kind == "log-uniform" and lo <= 0):
            raise ValueError(f"a {kind} range needs {'0 < ' if kind == 'log-uniform' else ''}lo < hi, got {spec}")
        return kind, float(lo), float(hi)
    if isinstance(spec, (list, tuple)) and len(spec) > 0:
        return None
    raise ValueError(f"a search-space entry is a non-empty list of values or a ('uniform' | 'log-uniform', lo, hi) "
                     f"tuple, got {spec!r}")


def grid(space: Space) -> list[dict]:
    """Every combination of the lists in ``space`` (a dict of name -> list of values), in a fixed order:
    the last name varies fastest (``itertools.product``). ``len(grid(space))`` is the product of the lists' lengths."""
    for name, spec in space.items():
        if _distribution(spec) is not None:
            raise ValueError(f"grid needs a list of values for {name!r}, not a range {spec}: use random_search for ranges")
    names = list(space)
    return [dict(zip(names, values)) for values in itertools.product(*(space[name] for name in names))]


def random_search(space: Space, n_trials: int, seed: int = 0) -> list[dict]:
    """``n_trials`` settings drawn independently from ``space`` by ``random.Random(seed)``: a list is sampled
    uniformly, ``("uniform", lo, hi)`` as ``rng.uniform(lo, hi)``, ``("log-uniform", lo, hi)`` as
    ``exp(rng.uniform(log lo, log hi))``. The draws go trial by trial, name by name, so the same seed
    gives the same trials, and asking for more trials keeps the first ones."""
    if n_trials < 0:
        raise ValueError(f"n_trials cannot be negative, got {n_trials}")
    specs = {name: (spec, _distribution(spec)) for name, spec in space.items()}
    rng = random.Random(seed)
    trials = []
    for _ in range(n_trials):
        trial = {}
        for name, (spec, distribution) in specs.items():
            if distribution is None:
                trial[name] = rng.choice(list(spec))
            elif distribution[0] == "uniform":
                trial[name] = rng.uniform(distribution[1], distribution[2])
            else:
                trial[name] = math.exp(rng.uniform(math.log(distribution[1]), math.log(distribution[2])))
        trials.append(trial)
    return trials


def _normalized(params: Mapping[str, Any]) -> dict:
    """``params`` as JSON will give them back (tuples become lists), so that what is stored compares equal."""
    try:
        return json.loads(json.dumps(dict(params)))
    except TypeError as error:
        raise ValueError(f"trial parameters and metrics must be JSON values (numbers, strings, lists): {error}") from None


def trial_folder_name(index: int, params: Mapping[str, Any], context: Mapping[str, Any] | None = None) -> str:
    """``trial-<index>-<8 hex digits of the SHA-1 of the JSON of the params and context>``: the same trial,
    the same folder (see :func:`run_trials` for the context)."""
    key = json.dumps({"params": _normalized(params), "context": _normalized(context or {})}, sort_keys=True)
    digest = hashlib.sha1(key.encode("utf-8")).hexdigest()[:8]
    return f"trial-{index}-{digest}"


def best_trial(rows: Sequence[Mapping[str, Any]], metric: str = "accuracy",
               mode: Literal["max", "min"] = "max") -> Mapping[str, Any] | None:
    """The row with the largest (``mode="max"``) or smallest ``metric``; rows where it is missing or NaN
    are skipped; the first trial wins a tie. None when no row has the metric."""
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
    scored = [row for row in rows if isinstance(row.get(metric), (int, float)) and not math.isnan(row[metric])]
    if not scored:
        return None
    sign = 1 if mode == "max" else -1
    return max(scored, key=lambda row: sign * row[metric])  # max returns the first of equal keys


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def results_table(rows: Sequence[Mapping[str, Any]], metric: str = "accuracy", mode: Literal["max", "min"] = "max") -> str:
    """A Markdown table: one row per trial, its parameters then its scalar metrics (lists such as a
    confusion matrix are left out), the best trial marked ``(best)``."""
    columns: list[str] = []
    for row in rows:
        columns += [key for key, value in row.items()
                    if key not in columns and not isinstance(value, (list, dict))]
    best = best_trial(rows, metric, mode)
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for row in rows:
        cells = [_cell(row.get(column, "")) for column in columns]
        if row is best and columns and columns[0] == "trial":
            cells[0] += " (best)"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_trials(trials: Sequence[Mapping[str, Any]], run_trial: Callable[[dict, pathlib.Path], Mapping[str, Any]],
               out: str | pathlib.Path, metric: str = "accuracy", mode: Literal["max", "min"] = "max",
               context: Mapping[str, Any] | None = None, log: Callable[[str], None] = print) -> list[dict]:
    """Run ``run_trial(params, folder)`` for each trial not finished yet; return one row per trial.

    Trial k runs in ``out/trial-<k>-<hash of its params and the context>`` (:func:`trial_folder_name`)
    and must return a dict of JSON-able metrics that includes ``metric``. Then ``results.json`` (its
    params, the context, metrics and wall time) is written there atomically, so it exists only for a
    finished trial. ``context`` holds what every trial shares and its result depends on (the data,
    the budget, the starting model): change it and the trials get new folders and run again, instead
    of stale results being loaded. On a later call:

    - a folder with ``results.json`` and the same params and context: loaded, ``run_trial`` is not called;
    - a folder without ``results.json`` (the trial crashed or was interrupted): emptied, and the
      trial runs again from the start, in an empty folder;
    - a ``results.json`` with *other* params or context (an edited file or a hash collision): a
      :class:`~minillm.MinillmError` naming the folder. Results are never silently overwritten;
      delete the folder to rerun it.

    ``results.json`` in a trial's folder is ``run_trials``' own: a ``run_trial`` that starts a
    :class:`~minillm.train.Trainer` run (which writes a ``results.json`` too) gives it a subfolder.
    An exception from ``run_trial`` propagates (the trials finished before it keep their results).
    After each trial, ``out/trials.jsonl`` (one row per line) and ``out/trials.md``
    (:func:`results_table`) are rewritten with the rows so far. A row is
    ``{"trial": k, **params, **metrics}``; :func:`best_trial` picks the best.
    """
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    best_trial([], metric, mode)  # checks mode before any trial runs
    context = _normalized(context or {})
    rows: list[dict] = []
    for index, raw in enumerate(trials):
        params = _normalized(raw)
        if "trial" in params:
            raise ValueError("'trial' is the row's index: choose another hyperparameter name")
        folder = out / trial_folder_name(index, params, context)
        described = ", ".join(f"{key}={_cell(value)}" for key, value in params.items())
        results_path = folder / "results.json"
        if results_path.is_file():
            try:
                saved = read_json(results_path)
                saved_params, saved_context, metrics = saved["params"], saved.get("context", {}), saved["metrics"]
            except (ValueError, KeyError, TypeError) as error:
                raise MinillmError(f"{results_path} is not a trial's results ({error}): delete {folder} to rerun the trial") from None
            if (saved_params, saved_context) != (params, context):
                differ = sorted(key for key in {*saved_params, *params, *saved_context, *context}
                                if {**saved_context, **saved_params}.get(key) != {**context, **params}.get(key))
                raise MinillmError(f"{folder} holds the results of other settings (they differ in {', '.join(differ)}): "
                                   "delete that folder to rerun the trial, or use another output folder")
            log(f"trial {index + 1}/{len(trials)} ({described}): finished earlier, loaded {out.name}/{folder.name}/results.json")
        else:
            if folder.exists():
                shutil.rmtree(folder)  # what an unfinished attempt left
            folder.mkdir(parents=True)
            log(f"trial {index + 1}/{len(trials)} ({described}): running in {out.name}/{folder.name}")  # not this machine's path
            start = time.perf_counter()
            metrics = _normalized(run_trial(dict(params), folder))  # as a reload would give them back
            seconds = time.perf_counter() - start
            if metric not in metrics:
                raise ValueError(f"run_trial must return the metric {metric!r}; it returned {sorted(metrics)}")
            clash = ({"trial"} | set(params)) & set(metrics)
            if clash:
                raise ValueError(f"run_trial returned metrics named like parameters: {sorted(clash)}")
            write_json(results_path, {"params": params, "context": context, "metrics": metrics, "seconds": seconds})
        rows.append({"trial": index, **params, **metrics})
        atomic_write_text(out / "trials.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
        atomic_write_text(out / "trials.md", results_table(rows, metric, mode))
    return rows

