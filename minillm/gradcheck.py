"""Checking a gradient numerically: the test every hand-derived derivative has to pass.

The central difference

.. math::  \\frac{\\partial f}{\\partial x_i} \\approx \\frac{f(x + h e_i) - f(x - h e_i)}{2h}

has truncation error :math:`O(h^2)` (the :math:`f''` terms cancel) and rounding error
:math:`O(\\epsilon_{mach} |f| / h)`; in float64, :math:`h = 10^{-6}` balances the two at about
:math:`10^{-10}` relative.
"""

from __future__ import annotations

from typing import Callable

import torch


@torch.no_grad()
def numerical_gradient(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, h: float = 1e-6) -> torch.Tensor:
    """Central-difference estimate of the gradient of the scalar function ``f`` at ``x`` (same shape as ``x``)."""
    x = x.detach().clone()
    grad = torch.zeros_like(x)
    flat_x, flat_grad = x.view(-1), grad.view(-1)
    for i in range(flat_x.numel()):
        original = flat_x[i].item()
        flat_x[i] = original + h
        f_plus = f(x).item()
        flat_x[i] = original - h
        f_minus = f(x).item()
        flat_x[i] = original
        flat_grad[i] = (f_plus - f_minus) / (2 * h)
    return grad


def autograd_gradient(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The gradient of the scalar function ``f`` at ``x`` by autograd."""
    x = x.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(f(x), x)
    return grad


def max_relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """:math:`\\max_i |a_i - b_i| / \\max(|a_i|, |b_i|, 10^{-12})`."""
    scale = torch.maximum(a.abs(), b.abs()).clamp_min(1e-12)
    return ((a - b).abs() / scale).max().item()
