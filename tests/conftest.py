"""Shared test settings.

Hypothesis runs with no per-example deadline (the first call of a torch op can be slow on a
busy 2-core CI machine, which is not a failure) and a fixed number of examples per property;
set HYPOTHESIS_PROFILE=thorough for a longer search locally.
"""

from __future__ import annotations

import os
import pathlib

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


def _share_the_cores_between_workers() -> None:
    """Under pytest-xdist (``-n N``), each of the N workers, and every process it starts (chapter scripts, notebook
    kernels, servers), gets cores // N threads: N workers each running torch on every core would make the OS swap
    spinning OpenMP threads, slower than one worker alone."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[variable] = str(threads)  # inherited by subprocesses; torch reads it when first imported
        import torch

        torch.set_num_threads(threads)


_share_the_cores_between_workers()


def pytest_xdist_auto_num_workers(config) -> int:
    """``-n auto``: one worker per core, at most 8 (each imports torch and may start a chapter script or a notebook
    kernel: more would cost memory and contend for the memory bus without finishing sooner)."""
    return max(1, min(8, os.cpu_count() or 1))


@pytest.fixture
def repo_root() -> pathlib.Path:
    return REPO_ROOT
