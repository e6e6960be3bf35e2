"""The encoder-decoder Transformer of "Attention Is All You Need" (Vaswani et al., 2017), and how to decode it.

::

    source ids (B, S) -> embed · √d_model + positions -> N × EncoderBlock -> memory (B, S, d_model)
    target ids (B, T) -> embed · √d_model + positions -> N × DecoderBlock(memory) -> linear -> logits (B, T, V)

The decoder is trained with *teacher forcing*: it reads the reference target shifted right by one
(``[BOS] y1 y2 ...``) and predicts it unshifted (``y1 y2 ... [EOS]``), every position in parallel,
the causal mask keeping each position from seeing its own answer. At inference time there is no
reference: :meth:`Transformer.greedy_decode` feeds back its own most likely token, one step at a
time, and :meth:`Transformer.beam_search` keeps the ``beam_size`` most likely partial outputs.
Both use KV caches, so each step costs O(T) instead of recomputing the whole prefix.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from minillm.layers import (
    Activation,
    DecoderBlock,
    EncoderBlock,
    LayerNorm,
    LearnedPositionalEmbedding,
    SinusoidalPositionalEncoding,
)


@dataclass
class TransformerConfig:
    """Sizes and choices of a :class:`Transformer`. The defaults are a small model a CPU trains in minutes;
    the paper's base model is d_model=512, n_heads=8, 6+6 layers, d_ff=2048, dropout 0.1."""

    src_vocab_size: int
    tgt_vocab_size: int
    d_model: int = 128
    n_heads: int = 4
    n_encoder_layers: int = 2
    n_decoder_layers: int = 2
    d_ff: int = 512
    dropout: float = 0.1
    max_len: int = 64
    norm_first: bool = True  # pre-norm (stable without tuning); False is the paper's post-norm
    activation: Activation = "relu"
    positions: Literal["sinusoidal", "learned"] = "sinusoidal"
    tie_output_embedding: bool = True  # the paper shares the target embedding and the output layer (section 3.4)
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2

    def __post_init__(self):
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        for name in ("src_vocab_size", "tgt_vocab_size", "d_model", "n_heads", "n_encoder_layers", "n_decoder_layers",
                     "d_ff", "max_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.positions not in ("sinusoidal", "learned"):
            raise ValueError(f"positions must be 'sinusoidal' or 'learned', got {self.positions!r}")


class Transformer(nn.Module):
    """Encoder-decoder Transformer; ``model(src, tgt_in, targets)`` -> ``(logits, loss)``."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = c = config
        self.src_embedding = nn.Embedding(c.src_vocab_size, c.d_model, padding_idx=c.pad_id)
        self.tgt_embedding = nn.Embedding(c.tgt_vocab_size, c.d_model, padding_idx=c.pad_id)
        position_class = SinusoidalPositionalEncoding if c.positions == "sinusoidal" else LearnedPositionalEmbedding
        self.src_positions = position_class(c.d_model, c.max_len)
        self.tgt_positions = position_class(c.d_model, c.max_len)
        self.dropout = nn.Dropout(c.dropout)
        block_args = dict(d_model=c.d_model, n_heads=c.n_heads, d_ff=c.d_ff, dropout=c.dropout,
                          activation=c.activation, norm_first=c.norm_first)
        self.encoder = nn.ModuleList(EncoderBlock(**block_args) for _ in range(c.n_encoder_layers))
        self.decoder = nn.ModuleList(DecoderBlock(**block_args) for _ in range(c.n_decoder_layers))
        # Pre-norm blocks leave the residual stream unnormalized: one last LayerNorm on each side.
        self.encoder_norm = LayerNorm(c.d_model) if c.norm_first else nn.Identity()
        self.decoder_norm = LayerNorm(c.d_model) if c.norm_first else nn.Identity()
        self.output = nn.Linear(c.d_model, c.tgt_vocab_size, bias=False)
        self.apply(self._init_weights)
        if c.tie_output_embedding:
            self.output.weight = self.tgt_embedding.weight

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)  # as the reference implementations of the paper
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=self.config.d_model**-0.5)  # times √d_model: unit-variance inputs
            with torch.no_grad():
                module.weight[self.config.pad_id].zero_()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _embed(self, ids: torch.Tensor, embedding: nn.Embedding, positions: nn.Module, offset: int = 0) -> torch.Tensor:
        x = embedding(ids) * math.sqrt(self.config.d_model)  # (B, T, d_model): section 3.4 scales by √d_model
        return self.dropout(x + positions(ids.shape[1], offset))  # + (T, d_model), broadcast over the batch

    def encode(self, src: torch.Tensor, src_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Source ids (B, S) -> memory (B, S, d_model). Padding (``pad_id``) is masked out of attention."""
        if src_padding_mask is None:
            src_padding_mask = src == self.config.pad_id  # (B, S), True at padding
        x = self._embed(src, self.src_embedding, self.src_positions)
        for block in self.encoder:
            x = block(x, key_padding_mask=src_padding_mask)
        return self.encoder_norm(x)

    def decode(self, tgt_in: torch.Tensor, memory: torch.Tensor, src_padding_mask: torch.Tensor,
               caches: list | None = None, offset: int = 0) -> torch.Tensor:
        """Target ids (B, T) attending to memory (B, S, d_model) -> logits (B, T, tgt_vocab_size).

        With ``caches`` (from :meth:`new_caches`) the T ids are positions ``offset, offset+1, ...``
        after those already cached. Target padding needs no mask: it sits on the right, where the
        causal mask already hides it from every real token, and the loss ignores it.
        """
        x = self._embed(tgt_in, self.tgt_embedding, self.tgt_positions, offset)
        for index, block in enumerate(self.decoder):
            self_cache, cross_cache = caches[index] if caches is not None else (None, None)
            x = block(x, memory, is_causal=True, memory_key_padding_mask=src_padding_mask,
                      kv_cache=self_cache, cross_kv_cache=cross_cache)
        return self.output(self.decoder_norm(x))

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor, targets: torch.Tensor | None = None,
                label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Teacher-forced logits (B, T, V) and, given ``targets`` (B, T), the mean cross-entropy over
        non-padding target tokens (with optional label smoothing, 0.1 in the paper)."""
        src_padding_mask = src == self.config.pad_id
        logits = self.decode(tgt_in, self.encode(src, src_padding_mask), src_padding_mask)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),  # (B*T, V), (B*T,)
                               ignore_index=self.config.pad_id, label_smoothing=label_smoothing)
        return logits, loss

    @torch.no_grad()
    def attention_maps(self, src: torch.Tensor, tgt_in: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        """Every attention's weights in a teacher-forced pass, for plotting: ``"encoder"`` (B, n_heads, S, S),
        ``"decoder"`` (B, n_heads, T, T) and ``"cross"`` (B, n_heads, T, S), one tensor per layer."""
        src_padding_mask = src == self.config.pad_id
        maps: dict[str, list[torch.Tensor]] = {"encoder": [], "decoder": [], "cross": []}
        x = self._embed(src, self.src_embedding, self.src_positions)
        for block in self.encoder:
            x, weights = block(x, key_padding_mask=src_padding_mask, need_weights=True)
            maps["encoder"].append(weights)
        memory = self.encoder_norm(x)
        y = self._embed(tgt_in, self.tgt_embedding, self.tgt_positions)
        for block in self.decoder:
            y, self_weights, cross_weights = block(y, memory, memory_key_padding_mask=src_padding_mask, need_weights=True)
            maps["decoder"].append(self_weights)
            maps["cross"].append(cross_weights)
        return maps

    # -----------------------------------------------------------------------------------------
    # Decoding
    # -----------------------------------------------------------------------------------------

    def new_caches(self, memory: torch.Tensor, max_len: int) -> list:
        """One (self-attention, cross-attention) KV-cache pair per decoder block, for decoding up to
        ``max_len`` target positions against ``memory`` (B, S, d_model)."""
        batch, memory_len, _ = memory.shape
        args = dict(device=memory.device, dtype=memory.dtype)
        return [(block.self_attn.new_cache(batch, max_len, **args),
                 block.multihead_attn.new_cache(batch, memory_len, static=True, **args))
                for block in self.decoder]

    def _next_log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Log-probabilities of the next token; padding and [BOS] can never be generated."""
        logits = logits.float()
        logits[..., self.config.pad_id] = float("-inf")
        logits[..., self.config.bos_id] = float("-inf")
        return torch.log_softmax(logits, dim=-1)

    def _check_length(self, src: torch.Tensor, max_new_tokens: int) -> None:
        if src.shape[1] > self.config.max_len:
            raise ValueError(f"the source has {src.shape[1]} tokens, more than the model's max_len {self.config.max_len}")
        if max_new_tokens + 1 > self.config.max_len:
            raise ValueError(f"max_new_tokens + 1 ([BOS]) must fit max_len {self.config.max_len}, got {max_new_tokens}")

    @torch.no_grad()
    def greedy_decode(self, src: torch.Tensor, max_new_tokens: int, use_kv_cache: bool = True) -> list[list[int]]:
        """The most likely next token, fed back, until [EOS] or ``max_new_tokens``: one id list per
        source row, without [BOS] and [EOS]. ``use_kv_cache=False`` recomputes the whole prefix at
        every step (same tokens, slower; the tests compare them)."""
        self._check_length(src, max_new_tokens)
        c = self.config
        src_padding_mask = src == c.pad_id
        memory = self.encode(src, src_padding_mask)
        batch = src.shape[0]
        generated = torch.full((batch, 1), c.bos_id, dtype=torch.long, device=src.device)  # (B, 1)
        finished = torch.zeros(batch, dtype=torch.bool, device=src.device)
        caches = self.new_caches(memory, max_new_tokens + 1) if use_kv_cache else None
        for step in range(max_new_tokens):
            if use_kv_cache:
                logits = self.decode(generated[:, -1:], memory, src_padding_mask, caches, offset=step)  # (B, 1, V)
            else:
                logits = self.decode(generated, memory, src_padding_mask)  # (B, step+1, V)
            next_token = self._next_log_probs(logits[:, -1]).argmax(dim=-1)  # (B,)
            next_token = next_token.masked_fill(finished, c.pad_id)
            generated = torch.cat([generated, next_token[:, None]], dim=1)
            finished |= next_token == c.eos_id
            if finished.all():
                break
        return [_strip(row, c.eos_id, c.pad_id) for row in generated[:, 1:].tolist()]

    @torch.no_grad()
    def beam_search(self, src: torch.Tensor, max_new_tokens: int, beam_size: int = 4,
                    length_penalty: float = 0.0) -> list[list[int]]:
        """Keep the ``beam_size`` most likely partial outputs at every step (Sutskever et al., 2014).

        A hypothesis y is scored by :math:`\\log p(y \\mid x) / |y|^{\\alpha}` with
        ``alpha = length_penalty`` (0: the plain log-probability, which favours short outputs;
        Wu et al., 2016, use a similar normalization). |y| counts the [EOS]. A source is done
        when its best ended hypothesis scores at least as well as any open beam still could; at
        ``max_new_tokens`` the beams still open are scored as they are. Returns the best hypothesis
        per source row, without [BOS]/[EOS]. With ``beam_size=1`` this is greedy decoding.
        """
        if beam_size < 1:
            raise ValueError(f"beam_size must be at least 1, got {beam_size}")
        if length_penalty < 0:
            raise ValueError(f"length_penalty must be at least 0, got {length_penalty}")
        self._check_length(src, max_new_tokens)
        c = self.config
        batch, device = src.shape[0], src.device
        src_padding_mask = (src == c.pad_id).repeat_interleave(beam_size, dim=0)  # (B*K, S)
        memory = self.encode(src.repeat_interleave(beam_size, dim=0), src_padding_mask)  # (B*K, S, d_model)
        caches = self.new_caches(memory, max_new_tokens + 1)
        tokens = torch.full((batch * beam_size, 1), c.bos_id, dtype=torch.long, device=device)  # (B*K, 1)
        beam_scores = torch.full((batch, beam_size), float("-inf"), device=device)
        beam_scores[:, 0] = 0.0  # all beams start equal: expand only the first, or they would repeat
        finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch)]
        done = [False] * batch

        def normalized(score: float, length: int) -> float:
            return score / (length**length_penalty)

        def best_possible(open_scores: torch.Tensor) -> float:
            """An upper bound on the final score of any open beam: extending a beam only lowers its
            log-probability, and dividing a negative score by at most max_new_tokens^alpha raises it."""
            best = open_scores.max().item()
            return best / (max_new_tokens**length_penalty) if best > float("-inf") else best

        for step in range(max_new_tokens):
            logits = self.decode(tokens[:, -1:], memory, src_padding_mask, caches, offset=step)  # (B*K, 1, V)
            log_probs = self._next_log_probs(logits[:, -1]).view(batch, beam_size, -1)  # (B, K, V)
            vocab = log_probs.shape[-1]
            candidates = (beam_scores[:, :, None] + log_probs).view(batch, -1)  # (B, K*V)
            top_scores, top_indices = candidates.topk(min(2 * beam_size, beam_size * vocab), dim=-1)  # (B, 2K)
            next_scores = torch.full((batch, beam_size), float("-inf"), device=device)
            next_rows = torch.arange(batch * beam_size, device=device).view(batch, beam_size).clone()
            next_tokens = torch.full((batch, beam_size), c.pad_id, dtype=torch.long, device=device)
            for b in range(batch):
                if done[b]:
                    continue
                kept = 0
                for rank, (score, index) in enumerate(zip(top_scores[b].tolist(), top_indices[b].tolist())):
                    if score == float("-inf") or kept == beam_size:
                        break
                    beam, token = divmod(index, vocab)
                    if token == c.eos_id:
                        if rank < beam_size:  # an ending counts only if it ranks among the best K candidates
                            prefix = tokens[b * beam_size + beam, 1:].tolist()
                            finished[b].append((normalized(score, step + 1), prefix))
                        continue
                    next_scores[b, kept], next_tokens[b, kept] = score, token
                    next_rows[b, kept] = b * beam_size + beam
                    kept += 1
                done[b] = bool(finished[b]) and max(h[0] for h in finished[b]) >= best_possible(next_scores[b])
            if all(done):
                break
            rows = next_rows.view(-1)  # (B*K,): which old beam each new beam extends
            for self_cache, _ in caches:
                self_cache.reorder(rows)  # the cross-attention caches are identical within a source
            tokens = torch.cat([tokens[rows], next_tokens.view(-1, 1)], dim=1)  # (B*K, step+2)
            beam_scores = next_scores
        else:  # out of steps: the open beams compete as they are
            for b in range(batch):
                if not done[b]:
                    for beam in range(beam_size):
                        score = beam_scores[b, beam].item()
                        if score > float("-inf"):
                            finished[b].append((normalized(score, max_new_tokens), tokens[b * beam_size + beam, 1:].tolist()))
        return [max(hypotheses, key=lambda h: h[0])[1] if hypotheses else [] for hypotheses in finished]

    def config_dict(self) -> dict:
        return asdict(self.config)


def _strip(ids: list[int], eos_id: int, pad_id: int) -> list[int]:
    """Ids up to (not including) the first [EOS]; trailing padding dropped."""
    out = []
    for token in ids:
        if token in (eos_id, pad_id):
            break
        out.append(token)
    return out
