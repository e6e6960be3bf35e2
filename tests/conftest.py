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


@pytest.fixture
def repo_root() -> pathlib.Path:
    return REPO_ROOT
