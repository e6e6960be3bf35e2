"""GPT: a decoder-only Transformer language model (Radford et al., 2018, 2019), and how to sample from it.

::

    ids (B, T) -> token embedding + position embedding -> N × Block -> LayerNorm
               -> linear (tied to the token embedding) -> logits (B, T, vocab)

    Block:  x = x + attn(ln_1(x));  x = x + mlp(ln_2(x))

The names are GPT-2's (``ln_1``, ``attn.c_attn``, ``attn.c_proj``, ``ln_2``, ``mlp.c_fc``, ``mlp.c_proj``), so
that a Hugging Face GPT-2 checkpoint maps onto it name for name (:mod:`minillm.hf`).

Trained to predict every next token at once (the causal mask hides the future), with the loss

.. math::  \\mathcal{L} = -\\frac{1}{BT} \\sum_{b,t} \\log p_\\theta(x_{b,t+1} \\mid x_{b,\\le t})

the autoregressive language-modelling objective. :meth:`GPT.generate` samples one token at a
time (temperature, top-k, nucleus / top-p), with a KV cache so each new token costs O(T).
:meth:`GPT.from_hf` and :meth:`GPT.save_hf` read and write Hugging Face GPT-2 checkpoints.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from minillm import MinillmError, hf
from minillm.attention import KVCache, causal_mask, fused_attention, scaled_dot_product_attention
from minillm.config import dataclass_from_dict
from minillm.layers import LayerNorm, LearnedPositionalEmbedding, RotaryEmbedding, make_activation


@dataclass
class GPTConfig:
    """Sizes and choices of a :class:`GPT`; the defaults are nanoGPT's "baby GPT" for Tiny Shakespeare.

    GPT-2 small is ``vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768``.
    """

    vocab_size: int = 65
    block_size: int = 256  # the context: the most tokens the model sees at once
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.2
    bias: bool = True  # biases in the linear layers and LayerNorms (GPT-2 has them)
    positions: Literal["learned", "rotary"] = "learned"
    tie_weights: bool = True  # the output layer shares the token embedding (GPT-2 does)
    layer_norm_eps: float = 1e-5
    # The MLP's GELU: exact (nanoGPT; 3x faster than the tanh form on an AVX2 CPU) or GPT-2's tanh
    # approximation ("gelu_new"), which OpenAI's weights were trained with.
    activation: Literal["gelu", "gelu_tanh"] = "gelu"

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.positions not in ("learned", "rotary"):
            raise ValueError(f"positions must be 'learned' or 'rotary', got {self.positions!r}")
        if self.activation not in ("gelu", "gelu_tanh"):
            raise ValueError(f"activation must be 'gelu' or 'gelu_tanh', got {self.activation!r}")
        if self.positions == "rotary" and (self.n_embd // self.n_head) % 2:
            raise ValueError(f"rotary positions need an even head size, got {self.n_embd // self.n_head}")

    @classmethod
    def from_dict(cls, values: dict, source: str = "the model configuration") -> "GPTConfig":
        """A config from a dict (e.g. a run's config.json), ignoring keys it does not know; a value of the wrong
        type or out of range is a ``ValueError`` naming ``source``."""
        return dataclass_from_dict(cls, values, source)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention (Vaswani et al., 2017), GPT-2's layout: one ``c_attn`` makes q, k and v.

    .. math::  \\mathrm{head}_i = \\mathrm{softmax}\\Big(\\frac{Q_i K_i^\\top}{\\sqrt{d}} + M\\Big) V_i,
               \\qquad \\mathrm{out} = [\\mathrm{head}_1; \\dots; \\mathrm{head}_h]\\, W_O

    with M = -inf above the diagonal (a token sees only itself and the past). ``kv_cache`` (a
    :class:`~minillm.attention.KVCache`) keeps earlier positions' keys and values for generation, ``rotary``
    rotates q and k by their positions (RoPE); ``fused = False`` swaps PyTorch's fused kernel for the
    hand-written :func:`~minillm.attention.scaled_dot_product_attention` (the same numbers, slower: for teaching
    and tests). :class:`~minillm.attention.MultiHeadAttention` is the general layer (cross-attention, padding).
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.n_embd // config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q | k | v, one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.fused = True

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None, rotary: RotaryEmbedding | None = None):
        batch, length, width = x.shape
        q, k, v = self.c_attn(x).split(width, dim=2)  # (B, T, C) each
        q, k, v = (t.view(batch, length, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        past = kv_cache.length if kv_cache is not None else 0  # positions already cached
        if rotary is not None:
            q, k = rotary(q, k, past)
        if kv_cache is not None:
            k, v = kv_cache.append(k, v)  # (B, nh, past + T, hs)
        # Causal: the kernel's own mask when nothing is cached; one new token may see everything cached.
        mask = causal_mask(length, past + length, x.device, offset=past) if past and length > 1 else None
        attend = fused_attention if self.fused else scaled_dot_product_attention
        y = attend(q, k, v, attn_mask=mask, is_causal=past == 0, dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(batch, length, width)  # (B, T, C): the heads side by side
        return self.resid_dropout(self.c_proj(y))

    def new_cache(self, batch_size: int, max_len: int, device=None, dtype=None) -> KVCache:
        weight = next(self.parameters())  # not c_attn.weight: c_attn may be wrapped (LoRA, minillm.peft)
        return KVCache(batch_size, self.n_head, max_len, self.head_dim, device=device or weight.device,
                       dtype=dtype or weight.dtype)


class MLP(nn.Module):
    """The position-wise feed-forward network: ``c_proj(gelu(c_fc(x)))``, 4·n_embd wide, then dropout."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = make_activation(config.activation)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))  # (B, T, C) -> (B, T, 4C) -> (B, T, C)


class Block(nn.Module):
    """One GPT block: pre-norm attention, then a pre-norm MLP, each added to the residual stream (GPT-2)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None, rotary: RotaryEmbedding | None = None):
        x = x + self.attn(self.ln_1(x), kv_cache, rotary)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    """The decoder-only language model; ``model(idx, targets)`` -> ``(logits, loss)``."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = c = config
        self.wte = nn.Embedding(c.vocab_size, c.n_embd)
        self.wpe = LearnedPositionalEmbedding(c.n_embd, c.block_size) if c.positions == "learned" else None
        self.rotary = RotaryEmbedding(c.n_embd // c.n_head, c.block_size) if c.positions == "rotary" else None
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layer))
        self.ln_f = LayerNorm(c.n_embd, eps=c.layer_norm_eps, bias=c.bias)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        if c.tie_weights:
            self.lm_head.weight = self.wte.weight  # one matrix reads tokens in and writes them out (Press & Wolf, 2017)
        self.apply(self._init_weights)
        # GPT-2's init: each residual branch's last layer scaled by 1/sqrt(2·n_layer), so that the sum of
        # 2·n_layer branches added to the residual stream keeps its variance at init (Radford et al., 2019).
        for block in self.blocks:
            for projection in (block.attn.c_proj, block.mlp.c_proj):
                nn.init.normal_(projection.weight, mean=0.0, std=0.02 / math.sqrt(2 * c.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, LearnedPositionalEmbedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Parameters counted once (the tied output layer is the token embedding); optionally without
        the position embedding, as the scaling-law papers count "non-embedding" parameters."""
        total = sum(p.numel() for p in self.parameters())
        if exclude_embeddings and self.wpe is not None:
            total -= self.wpe.weight.numel()
        return total

    def hidden_states(self, idx: torch.Tensor, prefix_embeddings: torch.Tensor | None = None, *,
                      kv_caches: list | None = None, offset: int = 0) -> torch.Tensor:
        """Token ids (B, T) -> the final hidden states (B, T, n_embd), after ``ln_f``: what the
        language-model head reads, and what a classifier (:mod:`minillm.finetune`) reads instead.

        ``prefix_embeddings`` (P, n_embd) or (B, P, n_embd), e.g. the soft prompt of prompt
        tuning, are vectors placed *before* the token embeddings, as if they were the embeddings
        of P extra tokens: they take positions ``0..P-1`` (position embeddings are added to them,
        or rotary angles applied, like to any token; the tokens move to ``P..P+T-1``) and the output
        is (B, P + T, n_embd). This is what ``inputs_embeds`` means in Hugging Face's GPT-2.
        """
        batch, length = idx.shape
        x = self.wte(idx)  # (B, T, n_embd)
        if prefix_embeddings is not None:
            prefix = prefix_embeddings.expand(batch, -1, -1) if prefix_embeddings.dim() == 2 else prefix_embeddings
            x = torch.cat([prefix.to(x.dtype), x], dim=1)  # (B, P + T, n_embd)
            length = x.shape[1]
        if offset + length > self.config.block_size:
            what = f"{offset + length} tokens" if prefix_embeddings is None else \
                f"{offset + length} positions ({length - idx.shape[1]} prefix vectors + {idx.shape[1]} tokens)"
            raise MinillmError(f"{what} do not fit the model's context of {self.config.block_size}")
        if self.wpe is not None:
            x = x + self.wpe(length, offset)  # + (T, n_embd), broadcast over the batch
        x = self.drop(x)
        for index, block in enumerate(self.blocks):
            x = block(x, kv_caches[index] if kv_caches is not None else None, self.rotary)
        return self.ln_f(x)  # (B, T, n_embd)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *, kv_caches: list | None = None,
                offset: int = 0, last_only: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token ids (B, T) -> logits (B, T, vocab_size) and, with ``targets`` (B, T), the mean
        cross-entropy (targets of -100 are ignored). With ``kv_caches`` the T tokens are positions
        ``offset..offset+T-1`` after the cached ones; ``last_only`` returns only the last position's
        logits (B, 1, vocab), all that sampling needs."""
        x = self.hidden_states(idx, kv_caches=kv_caches, offset=offset)  # (B, T, n_embd)
        if targets is None:
            return self.lm_head(x[:, -1:] if last_only else x), None
        logits = self.lm_head(x)  # (B, T, vocab)
        flat_logits = logits.view(-1, logits.shape[-1])  # (B*T, vocab)
        if flat_logits.dtype in (torch.float16, torch.bfloat16):
            flat_logits = flat_logits.float()  # the softmax's sum over the vocabulary in fp32, not bf16
        loss = F.cross_entropy(flat_logits, targets.reshape(-1), ignore_index=-100)
        return logits, loss

    # -----------------------------------------------------------------------------------------
    # Sampling
    # -----------------------------------------------------------------------------------------

    def new_caches(self, batch_size: int, device=None, dtype=None, max_len: int | None = None) -> list:
        """One empty KV cache per block, each holding up to ``max_len`` positions (at most, and by default,
        ``block_size``). Each holds 2·B·n_embd·max_len numbers: for GPT-2 small at B = 8 and the full 1,024
        positions that is 600 MB in float32, so :meth:`generate` asks for what it will use."""
        max_len = self.config.block_size if max_len is None else min(max_len, self.config.block_size)
        return [block.attn.new_cache(batch_size, max_len, device=device, dtype=dtype) for block in self.blocks]

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, use_kv_cache: bool = True, generator: torch.Generator | None = None,
                 stop_token: int | None = None) -> torch.Tensor:
        """Continue each row of ``idx`` (B, T) by ``max_new_tokens`` sampled tokens; returns (B, T + new).

        Each step turns the last position's logits into probabilities, softmax(logits / temperature),
        keeps only the ``top_k`` most likely tokens and/or the smallest set whose probability reaches
        ``top_p`` (nucleus sampling, Holtzman et al., 2020), and draws from what is left.
        ``temperature=0`` is greedy decoding (the most likely token, deterministic).

        **Context**: when the sequence outgrows ``block_size``, the window slides: the model sees
        the last ``block_size`` tokens, as in training. With the KV cache, positions are cached until
        the window is full; after that each step re-reads the shifted window (learned positions
        move with it), so the tokens are exactly those of recomputation, which the tests check
        under greedy decoding. ``stop_token`` ends a row once sampled (the row is then padded with it).
        """
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if idx.shape[1] < 1:
            raise ValueError("generation needs a prompt of at least one token")
        was_training = self.training
        self.eval()
        block_size = self.config.block_size
        caches, cached = None, 0  # how many positions of the current window the caches hold
        finished = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
        final_length = idx.shape[1] + max_new_tokens  # all a cache will ever hold (new_caches caps it at block_size)
        for _ in range(max_new_tokens):
            window = idx[:, -block_size:]  # (B, <= block_size): slide once the context is full
            if not use_kv_cache:
                logits, _ = self(window, last_only=True)
            elif caches is not None and cached == window.shape[1] - 1 and idx.shape[1] <= block_size:
                logits, _ = self(window[:, -1:], kv_caches=caches, offset=cached, last_only=True)  # one new token
                cached += 1
            else:  # first step, or the window slid: (re)fill the caches from the window
                caches = self.new_caches(idx.shape[0], device=idx.device, dtype=self.wte.weight.dtype,
                                         max_len=final_length)
                logits, _ = self(window, kv_caches=caches, last_only=True)
                cached = window.shape[1]
            next_token = sample_next_token(logits[:, -1], temperature, top_k, top_p, generator)  # (B,)
            if stop_token is not None:
                next_token = next_token.masked_fill(finished, stop_token)
                finished |= next_token == stop_token
            idx = torch.cat([idx, next_token[:, None]], dim=1)
            if stop_token is not None and finished.all():
                break
        self.train(was_training)
        return idx

    # -----------------------------------------------------------------------------------------
    # Hugging Face GPT-2 checkpoints (minillm.hf converts the names and layouts)
    # -----------------------------------------------------------------------------------------

    @classmethod
    def from_hf(cls, directory: str | os.PathLike, dropout: float = 0.0) -> "GPT":
        """Load a Hugging Face GPT-2 directory (``config.json`` + ``model.safetensors``, as
        ``save_pretrained`` writes it): :func:`load_gpt2`."""
        return load_gpt2(directory, dropout=dropout)

    def save_hf(self, directory: str | os.PathLike) -> pathlib.Path:
        """Write a directory that ``transformers.GPT2LMHeadModel.from_pretrained`` loads with identical logits:
        :func:`save_gpt2`."""
        return save_gpt2(self, directory)

    def config_json(self) -> str:
        return json.dumps(asdict(self.config), indent=2)


def sample_next_token(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                      top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row from logits (B, vocab): greedy at temperature 0, else softmax(logits / T)
    restricted to the top-k tokens and/or the top-p nucleus, renormalized, sampled."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)  # (B,)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth_largest = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, vocab)
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens before it already reach top_p: the most likely token always stays.
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)  # (B,)


def load_gpt2(directory: str | os.PathLike, dropout: float = 0.0) -> GPT:
    """A :class:`GPT` with the weights of a Hugging Face GPT-2 folder (:func:`minillm.hf.read_gpt2_folder` says
    what it reads and refuses). The model comes back in training mode, like any new ``nn.Module``; call
    ``.eval()`` before inference when ``dropout`` > 0."""
    config, state = hf.read_gpt2_folder(directory, GPTConfig, dropout=dropout)
    model = GPT(config)
    model.load_state_dict(state)  # strict: every parameter is set (the shapes were checked)
    return model


def save_gpt2(model: GPT, directory: str | os.PathLike) -> pathlib.Path:
    """Write ``model`` as a Hugging Face GPT-2 folder (:func:`minillm.hf.write_gpt2_folder`); returns the folder.
    :func:`load_gpt2` gives back the same model, ``transformers.GPT2LMHeadModel.from_pretrained`` the same logits."""
    if not isinstance(model, GPT):
        raise MinillmError(f"save_gpt2 writes a minillm GPT, got {type(model).__name__}")
    return hf.write_gpt2_folder(directory, model.state_dict(), model.config)
