"""GPT: a decoder-only Transformer language model (Radford et al., 2018, 2019), and how to sample from it.

::

    ids (B, T) -> token embedding + position embedding -> N × [pre-norm causal self-attention + MLP]
               -> LayerNorm -> linear (tied to the token embedding) -> logits (B, T, vocab)

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
from dataclasses import asdict, dataclass, fields
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from minillm import MinillmError
from minillm.layers import DecoderBlock, LayerNorm, LearnedPositionalEmbedding, RotaryEmbedding


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
    def from_dict(cls, values: dict) -> "GPTConfig":
        """A config from a dict (e.g. a checkpoint's JSON), ignoring keys it does not know."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


class GPT(nn.Module):
    """The decoder-only language model; ``model(idx, targets)`` -> ``(logits, loss)``."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = c = config
        self.wte = nn.Embedding(c.vocab_size, c.n_embd)
        self.wpe = LearnedPositionalEmbedding(c.n_embd, c.block_size) if c.positions == "learned" else None
        self.rotary = RotaryEmbedding(c.n_embd // c.n_head, c.block_size) if c.positions == "rotary" else None
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(
            DecoderBlock(c.n_embd, c.n_head, 4 * c.n_embd, dropout=c.dropout, activation=c.activation, norm_first=True,
                         bias=c.bias, layer_norm_eps=c.layer_norm_eps, cross_attention=False)
            for _ in range(c.n_layer))
        self.ln_f = LayerNorm(c.n_embd, eps=c.layer_norm_eps, bias=c.bias)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        if c.tie_weights:
            self.lm_head.weight = self.wte.weight  # one matrix reads tokens in and writes them out (Press & Wolf, 2017)
        self.apply(self._init_weights)
        # GPT-2's init: each residual branch's last layer scaled by 1/sqrt(2·n_layer), so that the sum of
        # 2·n_layer branches added to the residual stream keeps its variance at init (Radford et al., 2019).
        for block in self.blocks:
            for projection in (block.self_attn.out_proj, block.feed_forward.linear2):
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
            x = block(x, is_causal=True, kv_cache=kv_caches[index] if kv_caches is not None else None, rotary=self.rotary)
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

    def new_caches(self, batch_size: int, device=None, dtype=None) -> list:
        """One empty KV cache per block, each holding up to ``block_size`` positions."""
        return [block.self_attn.new_cache(batch_size, self.config.block_size, device=device, dtype=dtype)
                for block in self.blocks]

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
        for _ in range(max_new_tokens):
            window = idx[:, -block_size:]  # (B, <= block_size): slide once the context is full
            if not use_kv_cache:
                logits, _ = self(window, last_only=True)
            elif caches is not None and cached == window.shape[1] - 1 and idx.shape[1] <= block_size:
                logits, _ = self(window[:, -1:], kv_caches=caches, offset=cached, last_only=True)  # one new token
                cached += 1
            else:  # first step, or the window slid: (re)fill the caches from the window
                caches = self.new_caches(idx.shape[0], device=idx.device, dtype=self.wte.weight.dtype)
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

    @classmethod
    def from_run(cls, path: str | os.PathLike) -> "GPT":
        """A ``python -m minillm pretrain gpt`` run folder's GPT (or a ``.safetensors`` file in one): the best
        weights (``model.safetensors``), or the latest checkpoint's when there is no best yet."""
        from minillm.checkpoint import load_model_state, read_json, read_safetensors

        path = pathlib.Path(path)
        folder = path.parent if path.suffix == ".safetensors" else path
        if not folder.is_dir():
            raise MinillmError(f"{folder} is not a run folder (expected config.json, tokenizer.json and model.safetensors)")
        if not (folder / "config.json").is_file():
            raise MinillmError(f"{folder} has no config.json: is it a minillm run folder?")
        model_info = dict(read_json(folder / "config.json").get("model", {}))
        kind = model_info.pop("type", None)
        if kind != "gpt":
            raise MinillmError(f"{folder} holds a {kind!r} model, not a GPT")
        weights = path if path.suffix == ".safetensors" else next(
            (folder / name for name in ("model.safetensors", "checkpoint.safetensors") if (folder / name).exists()),
            folder / "model.safetensors")
        tensors, _ = read_safetensors(weights)
        if weights.name == "checkpoint.safetensors" or any(k.startswith("model/") for k in tensors):
            tensors = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
        model = cls(GPTConfig.from_dict(model_info))
        load_model_state(model, tensors, str(weights))
        return model

    # -----------------------------------------------------------------------------------------
    # Hugging Face GPT-2 checkpoints
    # -----------------------------------------------------------------------------------------

    @classmethod
    def from_hf(cls, directory: str | os.PathLike, dropout: float = 0.0) -> "GPT":
        """Load a Hugging Face GPT-2 directory (``config.json`` + ``model.safetensors``, as
        ``save_pretrained`` writes it); see :mod:`minillm.hf` for the name and layout mapping."""
        from minillm import hf

        return hf.load_gpt2(directory, dropout=dropout)

    def save_hf(self, directory: str | os.PathLike) -> pathlib.Path:
        """Write a directory that ``transformers.GPT2LMHeadModel.from_pretrained`` loads with identical logits."""
        from minillm import hf

        return hf.save_gpt2(self, directory)

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
