"""Batched generation: many prompts of different lengths decoded together by one GPT, with one KV cache.

One decoding step of a language model reads every weight once, whatever the batch size. Where reading
the weights, not the arithmetic, limits a step (a CPU, or a GPU at a small batch), B sequences decoded
together cost little more than one: this is what a server's batching buys (:mod:`minillm.serving`).

Prompts have different lengths. They are **left-padded** to a common width, so that every row's newest
token sits in the same, last column, and each decoding step appends one column to all rows::

    column       0      1      2      3      4
    row 0      [pad]  [pad]    T      o      _       pad = 2, positions  -  -  0  1  2
    row 1        H      e      l      l      o       pad = 0, positions  0  1  2  3  4

Each row keeps **its own positions** (column − pad), so every token gets the position embedding (or the
rotary angle) it would get alone, and a **key-padding mask** stops every real query from attending to a
pad column. A pad column's own query sees only itself (its output is never used; a row of all-masked
scores would be 0/0 in the softmax).

**Continuous batching** (Yu et al., 2022, "Orca: A Distributed Serving System for Transformer-Based
Generative Models": scheduling per iteration, not per request): the batch is not fixed. New prompts are
prefilled together (their prompts run through the model at once, filling their caches) and join the
running batch, right-aligned with it; a row that is done (``max_tokens`` reached, a stop token, or a client
that went away: :meth:`BatchedDecoder.remove`) leaves at once and its slot is free for the next request.
Columns that are padding in every row are then dropped, so the cache is never wider than the longest row.

**Exactness.** A row decoded alone (no padding) runs exactly the operations of
:meth:`minillm.gpt.GPT.generate` with the KV cache (same kernels, same shapes), so greedy decoding gives the
same tokens, bit for bit. In a batch with padding, the masked attention and the taller matrix products
may add their terms in another order: logits then agree to about 1e-6 (float32), and a greedy token can
differ only where the two most likely tokens' logits are that close.

Usage::

    decoder = BatchedDecoder(model)
    rows = [Row(prompt_ids, SamplingParams(max_tokens=50, temperature=0)) for prompt_ids in prompts]
    decoder.add(rows)             # prefill; each row samples its first token
    while decoder.rows:
        decoder.step()            # one token more for every row still running
    [row.tokens for row in rows]

or :func:`generate_batch` for all of that in one call.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from minillm.attention import fused_attention, scaled_dot_product_attention
from minillm.gpt import GPT, sample_next_token


@dataclass
class SamplingParams:
    """How one sequence is decoded: the token budget, the sampler, and its seed."""

    max_tokens: int = 16  # tokens to generate at most
    temperature: float = 1.0  # softmax(logits / T); 0 is greedy decoding
    top_p: float | None = None  # nucleus sampling (Holtzman et al., 2020); None or 1.0: no cut
    top_k: int | None = None  # only the k most likely tokens; None: all
    seed: int | None = None  # the row's own random generator; None: a fresh random seed
    stop_token_ids: tuple[int, ...] = ()  # sampling one of these ends the row (the token is kept)

    def __post_init__(self):
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {self.top_k}")


class Row:
    """One sequence being decoded: its prompt, the tokens generated so far, its sampler, and why it ended.

    ``owner`` is the caller's (a server keeps its request there); the decoder never reads it.
    ``keep_logits=True`` keeps the logits (vocab,) each token was sampled from, in ``logits``.
    """

    def __init__(self, prompt: Sequence[int], params: SamplingParams | None = None, owner: Any = None,
                 keep_logits: bool = False):
        self.prompt = [int(token) for token in prompt]
        self.params = params or SamplingParams()
        self.owner = owner
        self.tokens: list[int] = []  # generated so far
        self.logits: list[torch.Tensor] | None = [] if keep_logits else None
        self.finish_reason: str | None = None  # "length" (max_tokens), "stop" (a stop token, or the caller's)
        self.seed = self.params.seed if self.params.seed is not None else random.SystemRandom().randrange(2**63)
        self.generator: torch.Generator | None = None  # made on the model's device when the row joins a batch

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def __repr__(self) -> str:
        return f"Row(prompt={len(self.prompt)} tokens, generated={len(self.tokens)}, finish_reason={self.finish_reason})"


class BatchedDecoder:
    """A running batch of :class:`Row` s over one GPT: :meth:`add` prefills new rows, :meth:`step` decodes one
    token for every row, :meth:`remove` takes rows out. Rows that finish leave the batch by themselves.

    The KV cache: per layer, keys and values (B, n_head, block_size, head_dim), filled from column 0 to
    ``width``; row b's first ``pad[b]`` columns are padding. A row's prompt plus its ``max_tokens`` must fit the
    model's context (``block_size``); the window never slides, as it may in :meth:`GPT.generate`.
    """

    def __init__(self, model: GPT):
        self.model = model.eval()  # no dropout: serving decodes, it never trains
        config = model.config
        self.block_size = config.block_size
        self.cache_shape = (config.n_head, config.block_size, config.n_embd // config.n_head)  # per row
        self.device, self.dtype = model.wte.weight.device, model.wte.weight.dtype
        self.rows: list[Row] = []
        self.pad = torch.zeros(0, dtype=torch.long, device=self.device)  # (B,) padding columns of each row
        self.width = 0  # columns of the cache in use, the same for every row
        self.keys, self.values = self._new_cache(0), self._new_cache(0)

    def __len__(self) -> int:
        return len(self.rows)

    def _new_cache(self, batch_size: int) -> list[torch.Tensor]:
        # torch.empty: columns past ``width`` are written before they are read, padding columns are filled
        return [torch.empty(batch_size, *self.cache_shape, device=self.device, dtype=self.dtype)
                for _ in self.model.blocks]  # per layer (B, n_head, block_size, head_dim)

    # -----------------------------------------------------------------------------------------
    # The forward pass over a left-padded batch
    # -----------------------------------------------------------------------------------------

    def _forward(self, idx: torch.Tensor, positions: torch.Tensor, keys: list, values: list, start: int,
                 mask: torch.Tensor | None) -> torch.Tensor:
        """Tokens ``idx`` (B, T) written to cache columns ``start .. start+T-1`` -> the last column's logits
        (B, vocab). ``positions`` (B, T): each token's position in its own row. ``mask`` (B, 1, T, start+T):
        True where a query may attend; None when no row has padding (then: causal, as the GPT itself runs)."""
        model = self.model
        x = model.wte(idx)  # (B, T, C)
        if model.wpe is not None:
            x = x + model.wpe.weight[positions]  # (B, T, C): every row its own positions
        x = model.drop(x)
        for block, block_keys, block_values in zip(model.blocks, keys, values):
            # the GPT's block, x = x + attn(ln_1(x)); x = x + mlp(ln_2(x)), with the batch's attention
            x = x + self._attention(block.attn, block.ln_1(x), positions, block_keys, block_values, start, mask)
            x = x + block.mlp(block.ln_2(x))
        x = model.ln_f(x)
        return model.lm_head(x[:, -1:])[:, -1]  # (B, vocab)

    def _attention(self, attn: nn.Module, x: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor,
                   values: torch.Tensor, start: int, mask: torch.Tensor | None) -> torch.Tensor:
        """:class:`minillm.gpt.CausalSelfAttention` over the batch's cache, with per-row positions and a mask."""
        batch, length, width = x.shape
        q, k, v = attn.c_attn(x).split(width, dim=2)  # (B, T, C) each
        q, k, v = (t.view(batch, length, attn.n_head, attn.head_dim).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if self.model.rotary is not None:
            q, k = rotate(self.model.rotary, q, positions), rotate(self.model.rotary, k, positions)
        end = start + length
        keys[:, :, start:end], values[:, :, start:end] = k, v
        k, v = keys[:, :, :end], values[:, :, :end]  # (B, nh, end, hs)
        attend = fused_attention if attn.fused else scaled_dot_product_attention
        y = attend(q, k, v, attn_mask=mask, is_causal=mask is None and start == 0)
        y = y.transpose(1, 2).reshape(batch, length, width)  # (B, T, C): the heads side by side
        return attn.resid_dropout(attn.c_proj(y))

    # -----------------------------------------------------------------------------------------
    # Rows in, tokens out, rows out
    # -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def add(self, rows: Sequence[Row]) -> None:
        """Prefill ``rows`` together (left-padded to their longest prompt), sample each one's first token, and
        put them in the running batch, right-aligned with it."""
        if not rows:
            return
        for row in rows:
            if not row.prompt:
                raise ValueError("a row needs a prompt of at least one token")
            if len(row.prompt) + row.params.max_tokens > self.block_size:
                raise ValueError(f"a prompt of {len(row.prompt)} tokens plus max_tokens {row.params.max_tokens} "
                                 f"does not fit the model's context of {self.block_size}")
        width = max(len(row.prompt) for row in rows)
        pad = torch.tensor([width - len(row.prompt) for row in rows], device=self.device)  # (n,)
        idx = torch.tensor([[0] * (width - len(row.prompt)) + row.prompt for row in rows], device=self.device)  # (n, W)
        columns = torch.arange(width, device=self.device)
        positions = (columns - pad[:, None]).clamp(min=0)  # (n, W); a pad column's position is never used
        mask = None
        if pad.any():
            causal = columns[None, :] <= columns[:, None]  # (W, W): key column <= query column
            real_key = columns[None, :] >= pad[:, None]  # (n, W): not padding
            itself = torch.eye(width, dtype=torch.bool, device=self.device)  # a pad query sees itself, never empty
            mask = ((causal & real_key[:, None, :]) | itself)[:, None]  # (n, 1, W, W)
        for row in rows:
            row.generator = torch.Generator(device=self.device).manual_seed(row.seed)
        keys, values = self._new_cache(len(rows)), self._new_cache(len(rows))
        logits = self._forward(idx, positions, keys, values, 0, mask)
        self._join(list(rows), pad, width, keys, values)
        self._take(list(rows), logits)

    @torch.no_grad()
    def step(self) -> list[Row]:
        """One more token for every running row (each row's newest token goes in as one new column);
        returns the rows that got one (those that finished have left the batch)."""
        if not self.rows:
            return []
        rows = list(self.rows)
        idx = torch.tensor([[row.tokens[-1]] for row in rows], device=self.device)  # (B, 1)
        positions = (self.width - self.pad)[:, None]  # (B, 1): the new column's position in each row
        mask = None
        if self.pad.any():
            columns = torch.arange(self.width + 1, device=self.device)
            mask = (columns[None, :] >= self.pad[:, None])[:, None, None, :]  # (B, 1, 1, W + 1): real keys only
        logits = self._forward(idx, positions, self.keys, self.values, self.width, mask)
        self.width += 1
        self._take(rows, logits)
        return rows

    def remove(self, rows: Sequence[Row], finish_reason: str = "stop") -> None:
        """Take ``rows`` out of the batch (a row not in it is ignored); a row not yet done is marked
        ``finish_reason``. The cache keeps the other rows and drops the columns that are padding in all."""
        leaving = {id(row) for row in rows}
        for row in rows:
            if row.finish_reason is None:
                row.finish_reason = finish_reason
        keep = [index for index, row in enumerate(self.rows) if id(row) not in leaving]
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[index] for index in keep]
        if not keep:
            self.pad, self.width = self.pad[:0], 0
            self.keys, self.values = self._new_cache(0), self._new_cache(0)
            return
        keep_index = torch.tensor(keep, device=self.device)
        pad = self.pad[keep_index]
        shift = int(pad.min())  # the leftmost columns that are padding in every row left
        width = self.width - shift
        for cache in (self.keys, self.values):
            for layer, old in enumerate(cache):
                new = torch.empty(len(keep), *self.cache_shape, device=self.device, dtype=self.dtype)
                new[:, :, :width] = old[keep_index, :, shift:self.width]  # (B', nh, width, hs)
                cache[layer] = new
        self.pad, self.width = pad - shift, width

    def _join(self, rows: list[Row], pad: torch.Tensor, width: int, keys: list, values: list) -> None:
        """Append prefilled rows (their cache ``width`` columns wide) to the batch, right edges aligned."""
        if not self.rows:  # nothing running: the new rows are the batch
            self.rows, self.pad, self.width, self.keys, self.values = rows, pad, width, keys, values
            return
        joined = max(self.width, width)
        shift_old, shift_new = joined - self.width, joined - width  # columns each side moves right
        old_batch = len(self.rows)
        for cache, new_part in ((self.keys, keys), (self.values, values)):
            for layer, (old, part) in enumerate(zip(cache, new_part)):
                both = torch.empty(old_batch + len(rows), *self.cache_shape, device=self.device, dtype=self.dtype)
                both[:old_batch, :, :shift_old] = 0  # new padding columns: masked, but must be finite
                both[:old_batch, :, shift_old:joined] = old[:, :, :self.width]
                both[old_batch:, :, :shift_new] = 0
                both[old_batch:, :, shift_new:joined] = part[:, :, :width]
                cache[layer] = both  # (B + n, nh, block_size, hs)
        self.rows = self.rows + rows
        self.pad = torch.cat([self.pad + shift_old, pad + shift_new])
        self.width = joined

    def _take(self, rows: list[Row], logits: torch.Tensor) -> None:
        """Sample one token per row from ``logits`` (B, vocab), each with its own sampler; rows that are
        done leave the batch."""
        logits = logits.float()
        greedy = logits.argmax(dim=-1).tolist()  # (B,): what sample_next_token does at temperature 0
        for index, row in enumerate(rows):
            params = row.params
            if params.temperature == 0:
                token = greedy[index]
            else:
                token = int(sample_next_token(logits[index:index + 1], params.temperature, params.top_k, params.top_p,
                                              row.generator))
            row.tokens.append(token)
            if row.logits is not None:
                row.logits.append(logits[index].clone())
            if token in params.stop_token_ids:
                row.finish_reason = "stop"
            elif len(row.tokens) >= params.max_tokens:
                row.finish_reason = "length"
        self.remove([row for row in rows if row.done])


def rotate(rotary: nn.Module, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """:class:`minillm.layers.RotaryEmbedding` at per-row positions: x (B, nh, T, hs), positions (B, T)."""
    cos = rotary.cos[positions].unsqueeze(1).to(x.dtype)  # (B, 1, T, hs)
    sin = rotary.sin[positions].unsqueeze(1).to(x.dtype)
    return x * cos + rotary.rotate_half(x) * sin


def generate_batch(model: GPT, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams],
                   max_batch: int | None = None) -> list[list[int]]:
    """Continue every prompt (token ids) as ``params`` says (one for all, or one per prompt); returns the
    generated tokens of each. Prompts run ``max_batch`` at a time (all at once by default); as a row finishes,
    the next waiting prompt takes its slot (continuous batching)."""
    params = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
    if len(params) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
    rows = [Row(prompt, p) for prompt, p in zip(prompts, params)]
    waiting = list(rows)
    max_batch = max_batch or len(rows)
    decoder = BatchedDecoder(model)
    while waiting or decoder.rows:
        free = max_batch - len(decoder)
        if waiting and free > 0:
            decoder.add(waiting[:free])
            del waiting[:free]
        decoder.step()
    return [row.tokens for row in rows]
