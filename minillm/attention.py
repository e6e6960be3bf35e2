"""Attention, written out: scaled dot-product attention, multi-head attention and a KV cache.

Scaled dot-product attention (Vaswani et al., 2017, "Attention Is All You Need", eq. 1):

.. math::  \\mathrm{Attention}(Q, K, V) = \\mathrm{softmax}\\Big(\\frac{Q K^\\top}{\\sqrt{d_k}} + M\\Big) V

Every query position takes a weighted average of the value vectors; the weights say how well the
query matches each key. The mask :math:`M` is 0 where a query may look and :math:`-\\infty` where it
may not (the future, in a language model; padding, in a batch of sentences of different lengths).

Multi-head attention (same paper, section 3.2.2) runs :math:`h` attentions side by side on
learned projections of width :math:`d_k = d_{model}/h` and mixes their outputs:

.. math::  \\mathrm{MultiHead}(X_q, X_{kv}) = \\mathrm{Concat}(\\mathrm{head}_1, \\dots, \\mathrm{head}_h) W^O,
           \\quad \\mathrm{head}_i = \\mathrm{Attention}(X_q W_i^Q, X_{kv} W_i^K, X_{kv} W_i^V)

:func:`scaled_dot_product_attention` is the formula by hand, with exactly the semantics of
``torch.nn.functional.scaled_dot_product_attention``; :class:`MultiHeadAttention` uses PyTorch's
fused kernel by default (the fast path) and the hand-written function when asked to, or when the
attention weights are wanted. The tests check that both paths, and torch.nn.MultiheadAttention,
agree.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def causal_mask(query_len: int, key_len: int, device: torch.device | str | None = None, offset: int = 0) -> torch.Tensor:
    """Boolean (query_len, key_len) mask, True where query i may attend to key j, i.e. j <= i + offset.

    ``offset=0`` is the top-left aligned mask that ``is_causal=True`` means in PyTorch's SDPA.
    With a KV cache holding ``offset`` earlier positions, the new queries sit at positions
    ``offset, offset+1, ...`` and ``offset`` aligns the mask to them.
    """
    query_pos = torch.arange(query_len, device=device).unsqueeze(1) + offset  # (L, 1)
    key_pos = torch.arange(key_len, device=device).unsqueeze(0)  # (1, S)
    return key_pos <= query_pos  # (L, S)


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    return_weights: bool = False,
):
    """softmax(Q Kᵀ · scale + mask) · V by hand, with the semantics of ``F.scaled_dot_product_attention``.

    Shapes: ``query`` (..., L, E), ``key`` (..., S, E), ``value`` (..., S, Ev) -> (..., L, Ev).

    - ``attn_mask``: broadcastable to (..., L, S). Boolean: True where the query may attend.
      Float: added to the scores (use -inf to forbid).
    - ``is_causal``: query i attends to keys j <= i (top-left aligned, as in PyTorch). As PyTorch
      documents, it may not be combined with ``attn_mask``: fold the causal mask in yourself
      (:func:`causal_mask`), as :class:`MultiHeadAttention` does.
    - ``scale``: defaults to 1/sqrt(E).
    - ``dropout_p``: dropout on the attention weights, applied whenever it is > 0 (as in PyTorch's
      functional form: pass 0.0 at evaluation time).
    - ``enable_gqa``: grouped-query attention; key/value have fewer heads (dim -3) than the
      query, each shared by ``n_q_heads / n_kv_heads`` query heads (Ainslie et al., 2023).

    A query row that may attend to nothing (all its keys masked) gets all-zero weights and a zero
    output, as PyTorch's kernels give, instead of the NaN that softmax over only -inf would give.
    A NaN in the inputs still propagates. With ``return_weights=True`` it returns
    ``(output, attn_weights)``, the weights of shape (..., L, S) after dropout.
    """
    query_len, key_len, head_dim = query.shape[-2], key.shape[-2], query.shape[-1]
    if key.shape[-1] != head_dim:
        raise ValueError(f"query and key must have the same last dimension, got {head_dim} and {key.shape[-1]}")
    if value.shape[-2] != key_len:
        raise ValueError(f"key and value must have the same length, got {key_len} and {value.shape[-2]}")
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        repeats = query.shape[-3] // key.shape[-3]
        key = key.repeat_interleave(repeats, dim=-3)  # (..., n_q_heads, S, E)
        value = value.repeat_interleave(repeats, dim=-3)  # (..., n_q_heads, S, Ev)
    if is_causal and attn_mask is not None:
        raise ValueError("attn_mask and is_causal=True cannot both be given: combine them into one mask")
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale

    scores = (query @ key.transpose(-2, -1)) * scale  # (..., L, S)
    rows_may_be_empty = attn_mask is not None or key_len == 0  # a causal row always has its first key
    if is_causal:
        attn_mask = causal_mask(query_len, key_len, device=query.device)  # (L, S)
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attn_mask, float("-inf"))  # True = may attend
    elif attn_mask is not None:
        scores = scores + attn_mask  # float masks are added

    attn_weights = torch.softmax(scores, dim=-1)  # (..., L, S), rows sum to 1
    if rows_may_be_empty:
        # A row whose scores are all -inf has nothing to attend to: softmax gives 0/0 = NaN there.
        # Define its weights as 0, so its output is 0, as PyTorch's fused kernels do.
        nothing_allowed = torch.isneginf(scores).all(dim=-1, keepdim=True)  # (..., L, 1)
        attn_weights = attn_weights.masked_fill(nothing_allowed, 0.0)
    if dropout_p > 0.0:
        attn_weights = F.dropout(attn_weights, p=dropout_p, training=True)
    output = attn_weights @ value  # (..., L, Ev)
    return (output, attn_weights) if return_weights else output


def fused_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
                    dropout_p: float = 0.0, is_causal: bool = False) -> torch.Tensor:
    """PyTorch's fused ``F.scaled_dot_product_attention`` (the fast path), in fp32 for bf16 on the CPU.

    PyTorch's CPU flash-attention kernel is slow in bf16 where it matters, the backward pass: for
    a layer of nanoGPT's CPU recipe (B=12, 4 heads, T=64, head size 32) forward + backward takes
    4.6 ms in bf16 and 1.25 ms in fp32 with the casts, on the project's 2-core CPU. So under bf16
    autocast on a CPU, q, k and v are cast up, attention runs in fp32 (outside autocast, which
    would cast them back) and the output is cast down again; the matmuls around it stay bf16.
    On GPUs the bf16 kernels are the fast ones and nothing is cast.
    """
    cpu_bf16 = query.device.type == "cpu" and (query.dtype == torch.bfloat16 or (
        torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16))
    if cpu_bf16:
        if attn_mask is not None and attn_mask.is_floating_point():
            attn_mask = attn_mask.float()
        with torch.autocast("cpu", enabled=False):
            out = F.scaled_dot_product_attention(query.float(), key.float(), value.float(), attn_mask=attn_mask,
                                                 dropout_p=dropout_p, is_causal=is_causal)
        return out.to(query.dtype)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal)


class KVCache:
    """Keys and values of earlier positions, kept so that decoding one more token costs O(T), not O(T^2).

    Memory is allocated once, for ``max_len`` positions, and filled left to right. For
    self-attention the cache grows by the new tokens at each call; a ``static`` cache (for
    cross-attention, whose keys and values come from a fixed encoder output) is filled on the first
    call and reused unchanged afterwards.
    """

    def __init__(self, batch_size: int, n_heads: int, max_len: int, head_dim: int,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32, static: bool = False):
        shape = (batch_size, n_heads, max_len, head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)  # (B, n_heads, max_len, head_dim)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0
        self.static = static

    @property
    def max_len(self) -> int:
        return self.keys.shape[2]

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (B, n_heads, T_new, head_dim) keys and values; return everything cached so far."""
        start, end = self.length, self.length + keys.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache is full: {start} cached + {keys.shape[2]} new > max_len {self.max_len}")
        self.keys[:, :, start:end] = keys
        self.values[:, :, start:end] = values
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]  # (B, n_heads, end, head_dim)

    def cached(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[:, :, : self.length], self.values[:, :, : self.length]

    def reorder(self, batch_indices: torch.Tensor) -> None:
        """Keep the rows ``batch_indices`` (in that order), e.g. the surviving hypotheses of a beam search."""
        self.keys = self.keys.index_select(0, batch_indices)
        self.values = self.values.index_select(0, batch_indices)


class MultiHeadAttention(nn.Module):
    """Multi-head attention with separate ``q_proj``, ``k_proj``, ``v_proj`` and ``out_proj`` layers.

    Inputs are batch-first, (B, T, d_model). Call ``mha(x)`` for self-attention and
    ``mha(x, memory)`` for cross-attention (keys and values from ``memory``).

    Masks:

    - ``attn_mask``: as in :func:`scaled_dot_product_attention`, True (or 0.0) where the query may
      attend; shape (L, S), (B, L, S) or (B, n_heads, L, S).
    - ``key_padding_mask``: (B, S) boolean, **True at padding positions**, which no query attends
      to (the convention of ``torch.nn.MultiheadAttention``, whose name it shares).
    - ``is_causal``: query i attends to keys j <= i (offset by what a KV cache already holds).

    ``use_fast_path`` (default: ``self.fast_path``, True) runs PyTorch's fused SDPA kernel;
    ``need_weights=True`` always takes the hand-written path, because the fused kernels never
    materialize the weights. Returns ``(output, attn_weights)`` with the weights (B, n_heads, L, S)
    or None.
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, bias: bool = True, fast_path: bool = True):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, d_model // n_heads
        self.dropout = dropout
        self.fast_path = fast_path
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(d_model, d_model, bias=bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)

    def projections_are_plain_linear(self) -> bool:
        """Whether q_proj, k_proj and v_proj are plain ``nn.Linear`` layers, whose weights the fast
        path may concatenate. A wrapped projection (a LoRA layer, :mod:`minillm.finetune`) computes
        more than ``x Wᵀ + b``, so it must be called as a module: fusing its base weight would
        silently drop the wrapper's contribution. A weight that is not a plain tensor (torchao's int8 weight,
        :func:`minillm.quantization.library_quantize`) cannot be concatenated either."""
        return all(type(layer) is nn.Linear and type(layer.weight) is nn.Parameter
                   for layer in (self.q_proj, self.k_proj, self.v_proj))

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.n_heads, self.head_dim).transpose(1, 2)  # (B, n_heads, T, head_dim)

    def new_cache(self, batch_size: int, max_len: int, static: bool = False, device=None, dtype=None) -> KVCache:
        """An empty :class:`KVCache` sized for this layer."""
        weight = next(self.parameters())  # not q_proj.weight: q_proj may be wrapped (LoRA, minillm.finetune)
        return KVCache(batch_size, self.n_heads, max_len, self.head_dim, device=device or weight.device,
                       dtype=dtype or weight.dtype, static=static)

    def forward(
        self,
        query: torch.Tensor,
        key_value: torch.Tensor | None = None,
        *,
        attn_mask: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        need_weights: bool = False,
        kv_cache: KVCache | None = None,
        use_fast_path: bool | None = None,
        rotary=None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """See the class docstring. ``rotary``, for self-attention, is a callable
        ``rotary(q, k, offset) -> (q, k)`` that rotates queries and keys by their positions
        ``offset, offset+1, ...`` (rotary position embeddings, applied before keys are cached)."""
        source = query if key_value is None else key_value  # self- or cross-attention
        fast = self.fast_path if use_fast_path is None else use_fast_path
        reuse_cached = kv_cache is not None and kv_cache.static and kv_cache.length > 0  # cross-attention, later steps
        past = kv_cache.length if kv_cache is not None and not kv_cache.static else 0
        if fast and key_value is None and self.projections_are_plain_linear():
            # Self-attention on the fast path: one matmul against [W_q; W_k; W_v] instead of three
            # small ones (the same dot products, one pass over x; it pays on CPUs and small GPUs).
            weight = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])  # (3 d_model, d_model)
            bias = None if self.q_proj.bias is None else torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias])
            q, k, v = (self.split_heads(t) for t in F.linear(query, weight, bias).split(self.d_model, dim=-1))
        else:
            q = self.split_heads(self.q_proj(query))  # (B, n_heads, L, head_dim)
            if reuse_cached:
                k, v = kv_cache.cached()  # the memory's keys and values, computed at the first step
            else:
                k = self.split_heads(self.k_proj(source))  # (B, n_heads, S_new, head_dim)
                v = self.split_heads(self.v_proj(source))
        if not reuse_cached:
            if rotary is not None:
                q, k = rotary(q, k, past)
            if kv_cache is not None:
                k, v = kv_cache.append(k, v)  # (B, n_heads, past + S_new, head_dim)
        query_len, key_len = q.shape[2], k.shape[2]

        # One boolean mask "may attend" (or a float mask), from whatever the caller gave.
        mask = attn_mask
        if key_padding_mask is not None:
            if key_padding_mask.shape != (q.shape[0], key_len):
                raise ValueError(f"key_padding_mask must have shape (B, S) = {(q.shape[0], key_len)}, got {tuple(key_padding_mask.shape)}")
            keep = ~key_padding_mask[:, None, None, :]  # (B, 1, 1, S)
            if mask is None:
                mask = keep
            elif mask.dtype == torch.bool:
                mask = mask & keep
            else:
                mask = mask.masked_fill(~keep, float("-inf"))
        causal_in_kernel = is_causal and past == 0 and mask is None
        if is_causal and past > 0 and query_len == 1:
            is_causal = False  # the one newest query may see every cached key: no mask needed
        if is_causal and not causal_in_kernel:
            causal = causal_mask(query_len, key_len, device=q.device, offset=past)  # (L, S)
            mask = causal if mask is None else (mask & causal if mask.dtype == torch.bool else mask.masked_fill(~causal, float("-inf")))
        if mask is not None and mask.dim() == 3:
            mask = mask.unsqueeze(1)  # (B, 1, L, S): the same mask for every head

        dropout_p = self.dropout if self.training else 0.0
        attn_weights = None
        if fast and not need_weights:
            out = fused_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal_in_kernel)
        else:
            out, attn_weights = scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                                             is_causal=causal_in_kernel, return_weights=True)
        batch = out.shape[0]
        out = out.transpose(1, 2).reshape(batch, query_len, self.d_model)  # (B, L, d_model)
        return self.out_proj(out), attn_weights
