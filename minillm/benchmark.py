"""Timing code honestly: warm up first, synchronize the GPU, take the median of several runs."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def synchronize(device: torch.device | str) -> None:
    """Wait for queued GPU work; GPU calls return before the work is done."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def time_callable(fn: Callable[[], object], device: torch.device | str = "cpu", warmup: int = 3, repeats: int = 10) -> float:
    """Median wall time of ``fn()`` in seconds, after ``warmup`` untimed calls.

    Warmup absorbs one-off costs (``torch.compile`` compiling, cuDNN autotuning, allocator growth);
    the median ignores the odd slow run caused by something else on the machine.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)
