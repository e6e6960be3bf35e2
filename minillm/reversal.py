"""A toy task whose attention pattern can be read off, and the small attention-only model that learns it.

Sequence reversal with variable lengths: the input is ``n`` random digits (``min_len <= n <=
max_len``) padded to ``max_len`` with a padding token, and the target is the same digits backwards,
:math:`y_i = x_{n-1-i}` for :math:`i < n`. Output position :math:`i` must copy the token at input
position :math:`n-1-i`, so a model that solves it with attention should put (almost) all of query
:math:`i`'s weight on key :math:`n-1-i`: the anti-diagonal of the attention map, restricted to the
real tokens. Because :math:`n` changes from sequence to sequence, a query cannot find its source
from its own position alone: the model must first find out where the sequence ends, which one
attention layer cannot do and two can.

:class:`AttentionOnlyModel` has nothing but attention to move information between positions (no
feed-forward, no recurrence), so whatever it learns is visible in its attention weights.
Chapter 04 and its notebook train it with :func:`train_reversal` in seconds on a CPU.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from minillm.attention import MultiHeadAttention
from minillm.optim import AdamW, warmup_cosine_schedule

IGNORE_INDEX = -100  # target at padding positions: F.cross_entropy skips it


@dataclass
class ReversalBatch:
    """A batch of the reversal task. Token ids ``0 .. vocab_size-1`` are digits; ``vocab_size`` is padding."""

    inputs: torch.Tensor  # (B, max_len) int64, padded with pad_id
    targets: torch.Tensor  # (B, max_len) int64, IGNORE_INDEX at padding
    padding_mask: torch.Tensor  # (B, max_len) bool, True at padding (key_padding_mask's convention)
    source_positions: torch.Tensor  # (B, max_len) int64: the input position output i copies, n-1-i (0 at padding)
    lengths: torch.Tensor  # (B,) int64: n, the number of real tokens


def reversal_batch(batch_size: int, max_len: int, vocab_size: int = 10, min_len: int | None = None,
                   generator: torch.Generator | None = None, device: torch.device | str | None = None) -> ReversalBatch:
    """Random digit sequences of lengths drawn uniformly from ``[min_len, max_len]`` (default: all
    ``max_len``), and their reversals. The padding token's id is ``vocab_size``."""
    min_len = max_len if min_len is None else min_len
    if batch_size < 1 or vocab_size < 2 or not 1 <= min_len <= max_len:
        raise ValueError(f"need batch_size >= 1, vocab_size >= 2 and 1 <= min_len <= max_len; "
                         f"got {batch_size}, {vocab_size}, {min_len}, {max_len}")
    digits = torch.randint(vocab_size, (batch_size, max_len), generator=generator)  # (B, L)
    lengths = torch.randint(min_len, max_len + 1, (batch_size,), generator=generator)  # (B,)
    positions = torch.arange(max_len)  # (L,)
    padding_mask = positions.unsqueeze(0) >= lengths.unsqueeze(1)  # (B, L): True past the end
    source_positions = (lengths.unsqueeze(1) - 1 - positions.unsqueeze(0)).clamp(min=0)  # (B, L): n - 1 - i
    targets = digits.gather(1, source_positions).masked_fill(padding_mask, IGNORE_INDEX)  # (B, L)
    inputs = digits.masked_fill(padding_mask, vocab_size)  # (B, L)
    return ReversalBatch(*(t.to(device) for t in (inputs, targets, padding_mask, source_positions, lengths)))


class AttentionOnlyModel(nn.Module):
    """Token embedding + learned position embedding, ``n_layers`` residual attention layers, a linear readout.

    .. math::  h_0 = E_{tok}[x_t] + E_{pos}[t], \\qquad h_l = h_{l-1} + \\mathrm{MultiHead}_l(h_{l-1}),
               \\qquad \\mathrm{logits} = h_N W_{out} + b_{out}

    Attention is bidirectional (no causal mask): every position sees the whole input except
    padding. Inputs use ``vocab_size + 1`` ids (the digits and the padding token); outputs are
    logits over the ``vocab_size`` digits.
    """

    def __init__(self, vocab_size: int, max_len: int, d_model: int = 64, n_heads: int = 2, n_layers: int = 2):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be at least 1, got {n_layers}")
        self.vocab_size, self.max_len = vocab_size, max_len
        self.token_embedding = nn.Embedding(vocab_size + 1, d_model)  # + the padding token
        self.position_embedding = nn.Embedding(max_len, d_model)
        self.layers = nn.ModuleList(MultiHeadAttention(d_model, n_heads) for _ in range(n_layers))
        self.readout = nn.Linear(d_model, vocab_size)

    def forward(self, tokens: torch.Tensor, padding_mask: torch.Tensor | None = None,
                need_weights: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(B, L) token ids and (B, L) padding mask (True = padding) -> logits (B, L, vocab_size) and,
        if ``need_weights``, one (B, n_heads, L, L) tensor of attention weights per layer (the
        hand-written path; otherwise PyTorch's fused kernel runs and the list is empty)."""
        length = tokens.shape[1]
        if length > self.max_len:
            raise ValueError(f"sequence of {length} tokens is longer than max_len {self.max_len}")
        positions = torch.arange(length, device=tokens.device)  # (L,)
        hidden = self.token_embedding(tokens) + self.position_embedding(positions)  # (B, L, d_model)
        all_weights = []
        for attention in self.layers:
            update, weights = attention(hidden, key_padding_mask=padding_mask, need_weights=need_weights)
            hidden = hidden + update  # (B, L, d_model)
            if need_weights:
                all_weights.append(weights)  # (B, n_heads, L, L)
        return self.readout(hidden), all_weights  # (B, L, vocab_size)


@dataclass
class TrainingRun:
    """What :func:`train_reversal` did: the loss of every step and the wall time in seconds."""

    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def train_reversal(model: AttentionOnlyModel, steps: int, batch_size: int, min_len: int | None = None,
                   lr: float = 3e-3, weight_decay: float = 0.01, warmup_steps: int = 50,
                   generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> TrainingRun:
    """Train on fresh random reversal batches (lengths up to ``model.max_len``): cross-entropy over the
    real tokens, minillm's hand-written AdamW, linear warmup then cosine decay.

    Every batch is new data, so there is nothing to overfit; held-out accuracy is measured on
    sequences drawn from another generator.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    optimizer = AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = warmup_cosine_schedule(optimizer, warmup_steps=min(warmup_steps, steps - 1), total_steps=steps)
    run, start = TrainingRun(), time.perf_counter()
    model.train()
    for _ in range(steps):
        batch = reversal_batch(batch_size, model.max_len, model.vocab_size, min_len, generator=generator, device=device)
        logits, _ = model(batch.inputs, batch.padding_mask)  # (B, L, vocab_size)
        loss = F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE_INDEX)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        run.losses.append(loss.item())
    model.eval()
    run.seconds = time.perf_counter() - start
    return run


@torch.no_grad()
def sequence_accuracy(model: AttentionOnlyModel, batch: ReversalBatch) -> tuple[float, float]:
    """(per-token accuracy over the real tokens, whole-sequence accuracy) of the argmax predictions."""
    logits, _ = model(batch.inputs, batch.padding_mask)
    real = ~batch.padding_mask  # (B, L)
    correct = (logits.argmax(dim=-1) == batch.targets) & real  # (B, L)
    token_accuracy = correct.sum().item() / real.sum().item()
    sequence_accuracy = (correct | batch.padding_mask).all(dim=1).float().mean().item()
    return token_accuracy, sequence_accuracy


def attention_mass_on(weights: torch.Tensor, source_positions: torch.Tensor,
                      padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean weight that query i puts on key ``source_positions[b, i]``, per head, over the real queries.

    ``weights`` (B, n_heads, L, S), ``source_positions`` (B, L) or (L,), ``padding_mask`` (B, L)
    True at queries to leave out -> (n_heads,), each in [0, 1]:
    :math:`\\frac{1}{|Q|} \\sum_{(b, i) \\in Q} w_{b,h,i,\\,\\mathrm{src}(b, i)}`.
    1.0 means every query attends only to its source position.
    """
    batch, n_heads, query_len, _ = weights.shape if weights.dim() == 4 else (None,) * 4
    if batch is None or source_positions.shape[-1] != query_len:
        raise ValueError(f"need weights (B, n_heads, L, S) and source_positions (B, L) or (L,), got "
                         f"{tuple(weights.shape)} and {tuple(source_positions.shape)}")
    source = source_positions.to(weights.device).expand(batch, query_len)  # (B, L)
    index = source[:, None, :, None].expand(batch, n_heads, query_len, 1)  # (B, n_heads, L, 1)
    on_source = weights.gather(-1, index).squeeze(-1)  # (B, n_heads, L)
    real = torch.ones(batch, query_len, device=weights.device) if padding_mask is None else (~padding_mask).float()
    return (on_source * real[:, None, :]).sum(dim=(0, 2)) / real.sum()  # (n_heads,)
