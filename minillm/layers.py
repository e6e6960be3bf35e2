"""Neural-network layers, from the simplest up to the Transformer's encoder and decoder blocks.

- :class:`MLP`: the multi-layer perceptron of chapter 01.
- :func:`layer_norm` / :class:`LayerNorm` (Ba et al., 2016) and :func:`gelu` / :class:`GELU`
  (Hendrycks & Gimpel, 2016), written from their formulas, with PyTorch's fused kernel as the fast path.
- :class:`FeedForward`: the position-wise feed-forward network, FFN(x) = W_2 act(W_1 x + b_1) + b_2.
- Positions: :class:`SinusoidalPositionalEncoding` (Vaswani et al., 2017),
  :class:`LearnedPositionalEmbedding` (BERT, GPT-2) and :class:`RotaryEmbedding` (Su et al., 2021).
- :class:`EncoderBlock` and :class:`DecoderBlock`, post-norm (the original Transformer, BERT) or
  pre-norm (GPT-2 and most models since), with the structure and parameter names of
  ``torch.nn.TransformerEncoderLayer`` / ``TransformerDecoderLayer`` (the tests copy weights
  across and compare outputs). A ``DecoderBlock`` without cross-attention is a GPT block.

Shapes are batch-first throughout: (B, T, d_model).
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from minillm.attention import KVCache, MultiHeadAttention

Activation = Literal["relu", "gelu", "gelu_tanh"]


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


# ---------------------------------------------------------------------------------------------
# Normalization and activation
# ---------------------------------------------------------------------------------------------


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float = 1e-5) -> torch.Tensor:
    """Layer normalization over the last dimension (Ba, Kiros & Hinton, 2016):

    .. math::  y = \\frac{x - \\mu}{\\sqrt{\\sigma^2 + \\epsilon}} \\odot \\gamma + \\beta,
               \\quad \\mu = \\frac{1}{d}\\sum_i x_i, \\quad \\sigma^2 = \\frac{1}{d}\\sum_i (x_i - \\mu)^2

    Each token's features are centred and scaled by their own statistics (the *biased* variance,
    as PyTorch computes it), so the layer does the same thing at any batch size.
    """
    mean = x.mean(dim=-1, keepdim=True)  # (..., 1)
    variance = ((x - mean) ** 2).mean(dim=-1, keepdim=True)  # (..., 1), biased: divides by d
    normalized = (x - mean) / torch.sqrt(variance + eps)
    if weight is not None:
        normalized = normalized * weight
    if bias is not None:
        normalized = normalized + bias
    return normalized


class LayerNorm(nn.Module):
    """:func:`layer_norm` with a learned gain ``weight`` (γ, init 1) and shift ``bias`` (β, init 0).

    Parameter names match ``torch.nn.LayerNorm``. ``fast_path=True`` (the default) runs PyTorch's
    fused kernel, which computes the same formula in one pass; ``fast_path=False`` runs the
    hand-written formula (the tests check the two agree).
    """

    def __init__(self, d_model: int, eps: float = 1e-5, bias: bool = True, fast_path: bool = True):
        super().__init__()
        self.d_model, self.eps, self.fast_path = d_model, eps, fast_path
        self.weight = nn.Parameter(torch.ones(d_model))
        self.bias = nn.Parameter(torch.zeros(d_model)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fast_path:
            return F.layer_norm(x, (self.d_model,), self.weight, self.bias, self.eps)
        return layer_norm(x, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.d_model}, eps={self.eps}, bias={self.bias is not None}"


def gelu(x: torch.Tensor, approximate: Literal["none", "tanh"] = "none") -> torch.Tensor:
    """The Gaussian error linear unit (Hendrycks & Gimpel, 2016): x times the standard normal CDF of x.

    .. math::  \\mathrm{GELU}(x) = x\\,\\Phi(x) = \\tfrac{x}{2}\\Big(1 + \\mathrm{erf}\\big(x/\\sqrt{2}\\big)\\Big)

    ``approximate="tanh"`` is the paper's approximation, used by GPT-2 ("gelu_new"):

    .. math::  \\tfrac{x}{2}\\Big(1 + \\tanh\\big(\\sqrt{2/\\pi}\\,(x + 0.044715\\,x^3)\\big)\\Big)
    """
    if approximate == "none":
        return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))
    if approximate == "tanh":
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")


class GELU(nn.Module):
    """:func:`gelu` as a module; ``fast_path`` (default) uses ``F.gelu``, the same formula fused."""

    def __init__(self, approximate: Literal["none", "tanh"] = "none", fast_path: bool = True):
        super().__init__()
        if approximate not in ("none", "tanh"):
            raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
        self.approximate, self.fast_path = approximate, fast_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate=self.approximate) if self.fast_path else gelu(x, self.approximate)

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}"


def make_activation(name: Activation) -> nn.Module:
    """``"relu"`` (the original Transformer), ``"gelu"`` (BERT) or ``"gelu_tanh"`` (GPT-2)."""
    if name == "relu":
        return nn.ReLU()
    if name == "gelu":
        return GELU("none")
    if name == "gelu_tanh":
        return GELU("tanh")
    raise ValueError(f"unknown activation {name!r}: use relu, gelu or gelu_tanh")


class FeedForward(nn.Module):
    """The position-wise feed-forward network, applied to every token alone (Vaswani et al., eq. 2):

    .. math::  \\mathrm{FFN}(x) = W_2\\, \\mathrm{dropout}(\\mathrm{act}(W_1 x + b_1)) + b_2

    ``d_ff`` is the hidden width, usually 4 d_model. Layer names ``linear1``, ``linear2`` as in
    ``torch.nn.TransformerEncoderLayer``.
    """

    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.0, activation: Activation = "gelu", bias: bool = True):
        super().__init__()
        self.linear1 = nn.Linear(d_model, d_ff, bias=bias)
        self.activation = make_activation(activation)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.dropout(self.activation(self.linear1(x)))  # (B, T, d_ff)
        return self.linear2(hidden)  # (B, T, d_model)


# ---------------------------------------------------------------------------------------------
# Positions
# ---------------------------------------------------------------------------------------------


def _check_positions(seq_len: int, offset: int, max_len: int) -> None:
    if offset < 0 or offset + seq_len > max_len:
        raise ValueError(f"positions {offset}..{offset + seq_len - 1} do not fit the maximum length {max_len}: "
                         "the sequence is longer than the model's context")


def sinusoidal_table(max_len: int, d_model: int) -> torch.Tensor:
    """The (max_len, d_model) table of Vaswani et al. (2017), section 3.5:

    .. math::  PE_{(pos, 2i)} = \\sin(pos / 10000^{2i/d}), \\quad PE_{(pos, 2i+1)} = \\cos(pos / 10000^{2i/d})

    Each pair of features is a clock at its own frequency, from one turn per 2π positions down to
    one per 10000·2π; for any offset k, PE(pos + k) is a fixed rotation of PE(pos).
    """
    if d_model % 2:
        raise ValueError(f"sinusoidal encodings need an even d_model, got {d_model}")
    positions = torch.arange(max_len, dtype=torch.float64).unsqueeze(1)  # (max_len, 1)
    frequencies = 10000.0 ** (-torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)  # (d_model/2,)
    angles = positions * frequencies  # (max_len, d_model/2)
    table = torch.empty(max_len, d_model, dtype=torch.float64)
    table[:, 0::2] = torch.sin(angles)
    table[:, 1::2] = torch.cos(angles)
    return table.float()


class SinusoidalPositionalEncoding(nn.Module):
    """Fixed sinusoidal positions (no parameters): ``pe(T, offset)`` -> (T, d_model) rows to add."""

    def __init__(self, d_model: int, max_len: int):
        super().__init__()
        self.max_len = max_len
        self.register_buffer("table", sinusoidal_table(max_len, d_model), persistent=False)

    def forward(self, seq_len: int, offset: int = 0) -> torch.Tensor:
        _check_positions(seq_len, offset, self.max_len)
        return self.table[offset:offset + seq_len]  # (T, d_model)


class LearnedPositionalEmbedding(nn.Module):
    """One learned vector per position (BERT, GPT-2): ``pe(T, offset)`` -> (T, d_model) rows to add."""

    def __init__(self, d_model: int, max_len: int):
        super().__init__()
        self.max_len = max_len
        self.weight = nn.Parameter(torch.randn(max_len, d_model) * 0.02)

    def forward(self, seq_len: int, offset: int = 0) -> torch.Tensor:
        _check_positions(seq_len, offset, self.max_len)
        return self.weight[offset:offset + seq_len]  # (T, d_model)


class RotaryEmbedding(nn.Module):
    """Rotary position embeddings (Su et al., 2021, "RoFormer"), applied to queries and keys.

    Feature pairs of a head are rotated by an angle proportional to the position m:

    .. math::  (x_i, x_{i+d/2}) \\mapsto (x_i \\cos m\\theta_i - x_{i+d/2} \\sin m\\theta_i,\\;
                                          x_i \\sin m\\theta_i + x_{i+d/2} \\cos m\\theta_i),
               \\quad \\theta_i = \\mathrm{base}^{-2i/d}

    so that :math:`\\langle R_m q, R_n k\\rangle` depends on the positions only through m − n:
    attention sees relative positions. The pairs are (i, i + d/2) (GPT-NeoX and Llama's layout);
    the paper pairs neighbours (2i, 2i+1), which is the same rotation up to a fixed permutation of
    the head's features. Call it as ``rotary(q, k, offset)`` on (B, n_heads, T, head_dim) tensors:
    the hook :class:`~minillm.attention.MultiHeadAttention` takes.
    """

    def __init__(self, head_dim: int, max_len: int, base: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
        self.max_len = max_len
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # (head_dim/2,)
        angles = torch.arange(max_len, dtype=torch.float64).unsqueeze(1) * inv_freq  # (max_len, head_dim/2)
        angles = torch.cat([angles, angles], dim=-1)  # (max_len, head_dim): feature i and i + d/2 share an angle
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    @staticmethod
    def rotate_half(x: torch.Tensor) -> torch.Tensor:
        """(x1, x2) -> (-x2, x1) on the two halves of the last dimension."""
        first, second = x.chunk(2, dim=-1)
        return torch.cat([-second, first], dim=-1)

    def rotate(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """Rotate (..., T, head_dim) features at positions offset, offset+1, ..."""
        seq_len = x.shape[-2]
        _check_positions(seq_len, offset, self.max_len)
        cos = self.cos[offset:offset + seq_len].to(x.dtype)  # (T, head_dim)
        sin = self.sin[offset:offset + seq_len].to(x.dtype)
        return x * cos + self.rotate_half(x) * sin

    def forward(self, q: torch.Tensor, k: torch.Tensor, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rotate(q, offset), self.rotate(k, offset)


# ---------------------------------------------------------------------------------------------
# Transformer blocks
# ---------------------------------------------------------------------------------------------


class EncoderBlock(nn.Module):
    """Self-attention then feed-forward, each wrapped in a residual connection and a LayerNorm.

    Post-norm (Vaswani et al., 2017; BERT), ``norm_first=False``::

        x = norm1(x + dropout(SelfAttention(x)))
        x = norm2(x + dropout(FFN(x)))

    Pre-norm (Xiong et al., 2020; GPT-2), ``norm_first=True``: the residual path stays an
    identity, which is what lets deep stacks train without warmup tricks::

        x = x + dropout(SelfAttention(norm1(x)))
        x = x + dropout(FFN(norm2(x)))

    ``dropout`` applies to the attention weights, inside the FFN and on each residual branch,
    as in ``torch.nn.TransformerEncoderLayer``, whose structure and names this block shares.
    """

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float = 0.0, activation: Activation = "gelu",
                 norm_first: bool = False, bias: bool = True, layer_norm_eps: float = 1e-5):
        super().__init__()
        self.norm_first = norm_first
        self.self_attn = MultiHeadAttention(d_model, n_heads, dropout=dropout, bias=bias)
        self.feed_forward = FeedForward(d_model, d_ff, dropout, activation, bias)
        self.norm1 = LayerNorm(d_model, eps=layer_norm_eps, bias=bias)
        self.norm2 = LayerNorm(d_model, eps=layer_norm_eps, bias=bias)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def _self_attention(self, x, attn_mask, key_padding_mask, is_causal, need_weights, kv_cache, rotary):
        out, weights = self.self_attn(x, attn_mask=attn_mask, key_padding_mask=key_padding_mask, is_causal=is_causal,
                                      need_weights=need_weights, kv_cache=kv_cache, rotary=rotary)
        return self.dropout1(out), weights

    def forward(self, x: torch.Tensor, *, attn_mask: torch.Tensor | None = None,
                key_padding_mask: torch.Tensor | None = None, is_causal: bool = False, need_weights: bool = False,
                kv_cache: KVCache | None = None, rotary=None):
        """(B, T, d_model) -> (B, T, d_model); masks as in :class:`MultiHeadAttention`
        (``key_padding_mask``: True at padding). Returns ``(x, attn_weights)`` if ``need_weights``."""
        if self.norm_first:
            attended, weights = self._self_attention(self.norm1(x), attn_mask, key_padding_mask, is_causal,
                                                     need_weights, kv_cache, rotary)
            x = x + attended
            x = x + self.dropout2(self.feed_forward(self.norm2(x)))
        else:
            attended, weights = self._self_attention(x, attn_mask, key_padding_mask, is_causal, need_weights,
                                                     kv_cache, rotary)
            x = self.norm1(x + attended)
            x = self.norm2(x + self.dropout2(self.feed_forward(x)))
        return (x, weights) if need_weights else x


class DecoderBlock(nn.Module):
    """Masked self-attention, cross-attention to the encoder's output, feed-forward (Vaswani et al., fig. 1).

    Post-norm (``norm_first=False``)::

        x = norm1(x + dropout(CausalSelfAttention(x)))
        x = norm2(x + dropout(CrossAttention(x, memory)))
        x = norm3(x + dropout(FFN(x)))

    Pre-norm (``norm_first=True``) moves each norm onto the branch input: ``x = x + dropout(f(norm(x)))``.
    With ``cross_attention=False`` there is no middle sub-layer and no memory: that is a GPT block
    (causal self-attention + FFN). Structure and names follow ``torch.nn.TransformerDecoderLayer``
    (``self_attn``, ``multihead_attn``, ``norm1..3``, ``dropout1..3``).
    """

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float = 0.0, activation: Activation = "gelu",
                 norm_first: bool = False, bias: bool = True, layer_norm_eps: float = 1e-5, cross_attention: bool = True):
        super().__init__()
        self.norm_first = norm_first
        self.self_attn = MultiHeadAttention(d_model, n_heads, dropout=dropout, bias=bias)
        self.multihead_attn = MultiHeadAttention(d_model, n_heads, dropout=dropout, bias=bias) if cross_attention else None
        self.feed_forward = FeedForward(d_model, d_ff, dropout, activation, bias)
        self.norm1 = LayerNorm(d_model, eps=layer_norm_eps, bias=bias)
        self.norm2 = LayerNorm(d_model, eps=layer_norm_eps, bias=bias) if cross_attention else None
        self.norm3 = LayerNorm(d_model, eps=layer_norm_eps, bias=bias)
        self.dropout1, self.dropout2, self.dropout3 = nn.Dropout(dropout), nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None, *, is_causal: bool = True,
                attn_mask: torch.Tensor | None = None, key_padding_mask: torch.Tensor | None = None,
                memory_key_padding_mask: torch.Tensor | None = None, need_weights: bool = False,
                kv_cache: KVCache | None = None, cross_kv_cache: KVCache | None = None, rotary=None):
        """(B, T, d_model), memory (B, S, d_model) -> (B, T, d_model).

        ``is_causal`` (default True) and ``attn_mask`` restrict the self-attention,
        ``key_padding_mask`` (B, T) marks target padding, ``memory_key_padding_mask`` (B, S) source
        padding. ``kv_cache`` / ``cross_kv_cache`` make incremental decoding O(T) per token.
        With ``need_weights`` returns ``(x, self_weights, cross_weights)``.
        """
        if (memory is None) != (self.multihead_attn is None):
            raise ValueError("memory must be given exactly when the block has cross-attention")
        cross_weights = None

        def self_attention(h):
            out, weights = self.self_attn(h, attn_mask=attn_mask, key_padding_mask=key_padding_mask, is_causal=is_causal,
                                          need_weights=need_weights, kv_cache=kv_cache, rotary=rotary)
            return self.dropout1(out), weights

        def cross_attention(h):
            out, weights = self.multihead_attn(h, memory, key_padding_mask=memory_key_padding_mask,
                                               need_weights=need_weights, kv_cache=cross_kv_cache)
            return self.dropout2(out), weights

        if self.norm_first:
            attended, self_weights = self_attention(self.norm1(x))
            x = x + attended
            if memory is not None:
                attended, cross_weights = cross_attention(self.norm2(x))
                x = x + attended
            x = x + self.dropout3(self.feed_forward(self.norm3(x)))
        else:
            attended, self_weights = self_attention(x)
            x = self.norm1(x + attended)
            if memory is not None:
                attended, cross_weights = cross_attention(x)
                x = self.norm2(x + attended)
            x = self.norm3(x + self.dropout3(self.feed_forward(x)))
        return (x, self_weights, cross_weights) if need_weights else x


def load_torch_layer_weights(block: EncoderBlock | DecoderBlock, torch_layer: nn.Module) -> None:
    """Copy the weights of a ``torch.nn.TransformerEncoderLayer`` (into an :class:`EncoderBlock`) or a
    ``TransformerDecoderLayer`` (into a :class:`DecoderBlock`) of the same sizes.

    PyTorch packs the query, key and value projections into one ``in_proj_weight`` (3·d_model rows,
    q then k then v); ours are three separate layers. Everything else maps by name.
    """
    torch_state, state = torch_layer.state_dict(), {}
    d_model = block.norm1.d_model
    for attention in ("self_attn", "multihead_attn"):
        if f"{attention}.in_proj_weight" not in torch_state:
            continue
        for index, name in enumerate(("q_proj", "k_proj", "v_proj")):
            rows = slice(index * d_model, (index + 1) * d_model)
            for kind in ("weight", "bias"):
                if f"{attention}.in_proj_{kind}" in torch_state:
                    state[f"{attention}.{name}.{kind}"] = torch_state[f"{attention}.in_proj_{kind}"][rows]
    for key, value in torch_state.items():
        if key.startswith(("linear1", "linear2")):
            state[f"feed_forward.{key}"] = value
        elif key.startswith("norm") or ".out_proj." in key:
            state[key] = value
    block.load_state_dict(state)  # strict: a missing or extra weight is an error

