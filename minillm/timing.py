"""Timing code honestly (warm up first, synchronize the GPU, take the median of several runs), and the FLOP
count that turns a measured speed into model FLOPs utilization.

Model FLOPs utilization (Chowdhery et al., 2022, "PaLM", appendix B) compares the FLOPs a step
must do with what the device could do at its peak:

.. math::  \\mathrm{MFU} = \\frac{(6N + 12\\,L\\,H\\,Q\\,T) \\cdot \\text{tokens/s}}{\\text{peak FLOP/s}}

with N the parameters (6N: a multiply-add each for the forward pass and twice that backward),
L layers, H heads of size Q, and context T (the attention scores and their weighted sums). The
peak is the device's dense bf16 tensor-core rate (:func:`peak_flops`).
"""

from __future__ import annotations

import statistics
import time
from typing import TYPE_CHECKING, Callable

import torch

if TYPE_CHECKING:
    from minillm.gpt import GPTConfig


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


# Dense bf16 tensor-core peaks, FLOP/s, by a substring of torch.cuda.get_device_name().
PEAK_BF16 = [("H200", 989.4e12), ("H100 PCIe", 756.0e12), ("H100", 989.4e12), ("A100", 312.0e12), ("L40S", 362.1e12),
             ("L4", 121.0e12), ("A10G", 70.0e12), ("RTX 4090", 165.2e12), ("RTX 3090", 71.0e12), ("V100", 125.0e12)]



def peak_flops(device: torch.device) -> float | None:
    """The dense bf16 peak of a known CUDA GPU, else None."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16 if key in name), None)



def flops_per_token(config: GPTConfig, n_params: int) -> float:
    """6N + 12·L·H·Q·T: the training FLOPs per token of a GPT (PaLM's appendix B, as nanoGPT counts)."""
    head_size = config.n_embd // config.n_head
    return 6 * n_params + 12 * config.n_layer * config.n_head * head_size * config.block_size
