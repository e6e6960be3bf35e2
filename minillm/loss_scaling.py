"""fp16 mixed precision needs a loss scale; bf16 does not. A dynamic loss scaler written by hand, and the numbers why.

Micikevicius et al. (2018), "Mixed Precision Training": run the matmuls in half precision, keep fp32 master
weights, and multiply the loss by a scale S before the backward pass. fp16 has 5 exponent bits: its numbers run
from 2^-24 (the smallest subnormal) to 65504, and gradients smaller than 2^-25 round to 0. Many of a network's
gradients are that small, so they would vanish; multiplied by S (e.g. 2^16) they move up into fp16's range. The
weight gradients then come back divided by S, in fp32, before clipping and the optimizer step. bf16 has fp32's 8
exponent bits (down to 2^-133), so nothing underflows and no scale is needed (:func:`count_underflow` counts it).

S too large makes gradients overflow to inf instead. The *dynamic* scaler finds the largest S that works:

- if any gradient is inf or NaN, skip this optimizer step and multiply S by ``backoff_factor`` (0.5);
- after ``growth_interval`` (2000) steps in a row without overflow, multiply S by ``growth_factor`` (2).

:class:`DynamicLossScaler` is that rule in a few lines, with the methods and defaults of ``torch.amp.GradScaler``
(the tests check the two step for step); the Trainer uses PyTorch's (``--precision fp16``, :func:`make_grad_scaler`).
"""

from __future__ import annotations

import math
import os
import pathlib
from dataclasses import dataclass

import numpy as np
import torch

from minillm.device import autocast_dtype


def as_fp32(value: float) -> float:
    """``value`` rounded to the nearest float32 (inf past its largest): GradScaler keeps its scale in a float32 tensor."""
    return float(torch.tensor(value, dtype=torch.float32))


class DynamicLossScaler:
    """Dynamic loss scaling, by hand: ``scale(loss)``, ``unscale_(optimizer)``, ``step(optimizer)``, ``update()``.

    A training step with it (the same calls as with ``torch.amp.GradScaler``)::

        scaler.scale(loss).backward()        # gradients of S * loss: small ones no longer round to 0 in fp16
        scaler.unscale_(optimizer)           # g <- g / S, and note whether any g is inf or NaN
        clip_grad_norm_(parameters, 1.0)     # clipping sees the true gradients
        scaler.step(optimizer)               # optimizer.step(), unless a gradient overflowed: then skip it
        scaler.update()                      # overflow: S <- S * backoff;  growth_interval good steps: S <- S * growth
    """

    def __init__(self, init_scale: float = 2.0**16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000):
        if not (init_scale > 0 and growth_factor > 1 and 0 < backoff_factor < 1 and growth_interval >= 1):
            raise ValueError("need init_scale > 0, growth_factor > 1, 0 < backoff_factor < 1 and growth_interval >= 1")
        self.loss_scale = as_fp32(init_scale)
        self.growth_factor, self.backoff_factor, self.growth_interval = growth_factor, backoff_factor, growth_interval
        self.good_steps = 0  # steps in a row without overflow since the scale last changed
        self.found_inf = False  # did this step's gradients hold inf or NaN (set by unscale_)
        self.unscaled = False  # has unscale_ run since the last update

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """S * loss: its backward pass gives S times every gradient."""
        return loss * self.loss_scale

    @torch.no_grad()
    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide the gradients of ``optimizer``'s parameters by S, in place, and note whether any is inf or NaN.
        (Multiplying by 1/S in float32, as GradScaler does: for a power of two it is exact.)"""
        if self.unscaled:
            raise RuntimeError("unscale_() has already been called on this optimizer since the last update()")
        gradients = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        self.found_inf = any(not bool(torch.isfinite(g).all()) for g in gradients)
        inverse = as_fp32(1.0 / self.loss_scale)
        for g in gradients:
            g.mul_(inverse)
        self.unscaled = True

    def step(self, optimizer: torch.optim.Optimizer):
        """``optimizer.step()`` on the unscaled gradients, or nothing when they overflowed (the step is skipped)."""
        if not self.unscaled:
            self.unscale_(optimizer)
        if self.found_inf:
            return None
        return optimizer.step()

    def update(self) -> None:
        """Back off after an overflow; grow after ``growth_interval`` good steps in a row (never to inf in fp32)."""
        if not self.unscaled:
            raise RuntimeError("update() needs step() (or unscale_()) first: it reads whether the gradients overflowed")
        if self.found_inf:
            self.loss_scale = as_fp32(self.loss_scale * self.backoff_factor)
            self.good_steps = 0
        else:
            self.good_steps += 1
            if self.good_steps == self.growth_interval:
                grown = as_fp32(self.loss_scale * self.growth_factor)
                if math.isfinite(grown):
                    self.loss_scale = grown
                self.good_steps = 0
        self.found_inf, self.unscaled = False, False

    def get_scale(self) -> float:
        return self.loss_scale

    def state_dict(self) -> dict:
        """The same keys as ``torch.amp.GradScaler.state_dict()``, so either scaler loads the other's state."""
        return {"scale": self.loss_scale, "growth_factor": self.growth_factor, "backoff_factor": self.backoff_factor,
                "growth_interval": self.growth_interval, "_growth_tracker": self.good_steps}

    def load_state_dict(self, state: dict) -> None:
        self.loss_scale = as_fp32(state["scale"])
        self.growth_factor, self.backoff_factor = state["growth_factor"], state["backoff_factor"]
        self.growth_interval, self.good_steps = state["growth_interval"], state["_growth_tracker"]


def make_grad_scaler(device: torch.device | str, precision: str = "auto") -> torch.amp.GradScaler | None:
    """PyTorch's ``GradScaler`` where ``precision`` means fp16 autocast on ``device`` (:func:`minillm.device.autocast_dtype`),
    None otherwise: bf16 and fp32 need no scale."""
    device = torch.device(device)
    if autocast_dtype(device, precision) != torch.float16:
        return None
    return torch.amp.GradScaler(device.type)


# ---------------------------------------------------------------------------------------------
# Why: which gradients fp16 loses, with and without the scale, and which bf16 loses
# ---------------------------------------------------------------------------------------------


def smallest_subnormal(dtype: torch.dtype) -> float:
    """The smallest positive number of a floating-point format: the smallest normal number times the spacing of
    numbers just above 1, 2^(e_min) * 2^(-mantissa bits): 2^-24 for fp16, 2^-133 for bf16, 2^-149 for fp32."""
    info = torch.finfo(dtype)
    return info.tiny * info.eps


def overflow_threshold(dtype: torch.dtype) -> float:
    """The smallest magnitude that rounds to inf: the largest number plus half the spacing of numbers around it
    (65504 + 16 = 65520 for fp16). Round-to-nearest-even sends that halfway point up, to inf."""
    info = torch.finfo(dtype)
    spacing_at_max = 2.0 ** math.floor(math.log2(info.max)) * info.eps
    return info.max + spacing_at_max / 2


def gradient_values(model: torch.nn.Module) -> torch.Tensor:
    """Every gradient element of ``model``'s parameters (after a backward pass), as one flat float32 tensor."""
    gradients = [p.grad.detach().reshape(-1).float() for p in model.parameters() if p.grad is not None]
    if not gradients:
        raise ValueError("the model has no gradients: run a backward pass first")
    return torch.cat(gradients)


def activation_gradients(model: torch.nn.Module, loss_of) -> torch.Tensor:
    """The gradients that reach every ``nn.Linear`` layer's output in the backward pass of ``loss_of(model)``, as one
    flat float32 tensor (the backward pass runs; parameter gradients accumulate as usual). Under fp16 autocast these
    are what the backward matmuls multiply in fp16, and with a loss averaged over many tokens they are small: the
    ones Micikevicius et al. saw vanish."""
    captured = []

    def watch_output(module, inputs, output):
        if output.requires_grad:
            output.register_hook(lambda gradient: captured.append(gradient.detach().reshape(-1).float()))

    handles = [module.register_forward_hook(watch_output) for module in model.modules()
               if isinstance(module, torch.nn.Linear)]
    try:
        loss_of(model).backward()
    finally:
        for handle in handles:
            handle.remove()
    if not captured:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer whose output needed a gradient")
    return torch.cat(captured)


@dataclass
class UnderflowCounts:
    """What a cast does to the nonzero fp32 gradient elements: how many become 0 (underflow), a subnormal (fewer
    significant bits than the format's normal numbers) or inf (overflow)."""

    nonzero: int  # the elements that are not 0 in fp32
    fp16_zero: int  # g cast to fp16 is 0
    fp16_subnormal: int  # g cast to fp16 is a subnormal, 0 < |g| < 2^-14
    scaled_fp16_zero: int  # S g cast to fp16 is 0 (S: the loss scale)
    scaled_fp16_subnormal: int  # S g cast to fp16 is a subnormal
    scaled_fp16_inf: int  # S g cast to fp16 is inf
    bf16_zero: int  # g cast to bf16 is 0
    scale: float

    def shares(self) -> dict[str, float]:
        """Each count as a share of the nonzero elements, named for a table."""
        scaled = f"fp16 after x2^{math.log2(self.scale):g}"
        counts = {"fp16: 0": self.fp16_zero, "fp16: subnormal": self.fp16_subnormal, f"{scaled}: 0": self.scaled_fp16_zero,
                  f"{scaled}: subnormal": self.scaled_fp16_subnormal, f"{scaled}: inf": self.scaled_fp16_inf,
                  "bf16: 0": self.bf16_zero}
        return {name: count / max(self.nonzero, 1) for name, count in counts.items()}


def cast_outcomes(magnitude: torch.Tensor, dtype: torch.dtype) -> dict[str, int]:
    """How many of the positive numbers ``magnitude`` (float64) round to 0, to a nonzero subnormal, or to inf when
    cast to ``dtype``, from the format's constants alone. With s the smallest subnormal and n the smallest normal
    number, round-to-nearest-even gives:

    - 0 when |x| <= s / 2 (the halfway point rounds to the even neighbour, 0);
    - a subnormal when s / 2 < |x| < n - s / 2 (n - s / 2 is halfway between the largest subnormal and n: to n);
    - inf when |x| >= :func:`overflow_threshold` (65520 for fp16).
    """
    s, n = smallest_subnormal(dtype), torch.finfo(dtype).tiny
    return {"zero": int((magnitude <= s / 2).sum()),
            "subnormal": int(((magnitude > s / 2) & (magnitude < n - s / 2)).sum()),
            "inf": int((magnitude >= overflow_threshold(dtype)).sum())}


def count_underflow(values: torch.Tensor, scale: float = 2.0**16) -> UnderflowCounts:
    """What casting does to the nonzero elements g of ``values`` (fp32): g to fp16, S g to fp16 (``scale`` S, a power
    of two as loss scales are, so that S g is exact), and g to bf16, counted by :func:`cast_outcomes` from magnitudes
    alone. The tests check the counts against casting itself, e.g. ``((g.half() == 0) & (g != 0)).sum()``."""
    magnitude = values.detach().reshape(-1).double().abs()
    magnitude = magnitude[magnitude > 0]
    fp16, scaled, bf16 = (cast_outcomes(magnitude, torch.float16), cast_outcomes(magnitude * scale, torch.float16),
                          cast_outcomes(magnitude, torch.bfloat16))
    return UnderflowCounts(nonzero=magnitude.numel(), fp16_zero=fp16["zero"], fp16_subnormal=fp16["subnormal"],
                           scaled_fp16_zero=scaled["zero"], scaled_fp16_subnormal=scaled["subnormal"],
                           scaled_fp16_inf=scaled["inf"], bf16_zero=bf16["zero"], scale=scale)


def log2_histogram(values: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """``(exponents, counts)``: how many nonzero elements g have floor(log2 |g|) = e, for each e from the smallest to
    the largest present; e is the binary exponent of g, read off exactly by ``torch.frexp`` (|g| = m 2^k, m in [0.5, 1),
    so e = k - 1)."""
    values = values.detach().reshape(-1).float()
    values = values[values != 0]
    if values.numel() == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    exponents = torch.frexp(values).exponent.long() - 1
    low = int(exponents.min())
    counts = torch.bincount(exponents - low)
    return np.arange(low, low + len(counts)), counts.numpy()


def plot_gradient_range(values: torch.Tensor, path: str | os.PathLike, scale: float = 2.0**16,
                        title: str = "Gradients against the range of fp16 and bf16") -> pathlib.Path:
    """A histogram of log2 |g| for the gradient elements ``values``, and the same gradients times ``scale``, with
    fp16's range marked (2^-24 smallest subnormal, 2^-14 smallest normal, 65504 largest; underflow to the left in
    red) and bf16's (down to 2^-133, up to 3.4e38: off both edges of the picture). Saved as a PNG at ``path``."""
    from matplotlib.figure import Figure

    from minillm.plots import save_figure

    exponents, counts = log2_histogram(values)
    shift = math.log2(scale)
    fig = Figure(figsize=(8, 4.2))
    ax = fig.add_subplot()
    ax.bar(exponents + 0.5, counts, width=1.0, color="C0", alpha=0.7, label="gradients g")
    if len(exponents):
        ax.stairs(counts, np.append(exponents, exponents[-1] + 1) + shift, color="C1", linewidth=1.6,
                  label=f"S·g, S = 2^{shift:g}")
    fp16_low, fp16_normal, fp16_high = (math.log2(smallest_subnormal(torch.float16)),
                                        math.log2(torch.finfo(torch.float16).tiny), math.log2(torch.finfo(torch.float16).max))
    left = min(float(exponents.min()) if len(exponents) else fp16_low, fp16_low) - 4
    right = max(float(exponents.max()) + shift if len(exponents) else fp16_high, fp16_high) + 4
    ax.axvspan(left, fp16_low, color="red", alpha=0.12, label="fp16: rounds to 0")
    ax.axvspan(fp16_low, fp16_normal, color="orange", alpha=0.12, label="fp16: subnormal (fewer bits)")
    ax.axvspan(fp16_high, right, color="purple", alpha=0.12, label="fp16: overflows to inf")
    bf16_low = math.log2(smallest_subnormal(torch.bfloat16))
    ax.set(xlim=(left, right), xlabel=f"log2 |g|   (bf16 holds 2^{bf16_low:.0f} to 2^128: all of it)",
           ylabel="gradient elements", title=title)
    ax.set_yscale("log")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(alpha=0.3)
    return save_figure(fig, path)

