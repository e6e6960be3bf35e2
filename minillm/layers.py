"""Neural-network layers, from the simplest up.

Chapter 01 needs only :class:`MLP`; chapter 05 adds LayerNorm, GELU, the Transformer's
feed-forward block, positional encodings and encoder/decoder blocks here.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class MLP(nn.Module):
    """A multi-layer perceptron: :math:`h_{k+1} = \\sigma(W_k h_k + b_k)`, no activation after the last layer.

    ``sizes`` lists every width, input first: ``MLP([1, 64, 64, 1])`` maps (…, 1) to (…, 1)
    through two hidden layers of 64 units.
    """

    def __init__(self, sizes: Sequence[int], activation: type[nn.Module] = nn.Tanh):
        super().__init__()
        if len(sizes) < 2 or any(size < 1 for size in sizes):
            raise ValueError(f"sizes must list at least an input and an output width, all positive, got {list(sizes)}")
        layers: list[nn.Module] = []
        for index, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(fan_in, fan_out))
            if index < len(sizes) - 2:
                layers.append(activation())
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (..., sizes[0]) -> (..., sizes[-1])
