"""BERT: a bidirectional Transformer encoder, pretrained by masked language modelling and next-sentence prediction.

Devlin, Chang, Lee & Toutanova (2019), "BERT: Pre-training of Deep Bidirectional Transformers for
Language Understanding"::

    [CLS] A [SEP] B [SEP] -> token + position + segment embeddings -> LayerNorm -> dropout
                          -> N × post-norm EncoderBlock (no causal mask: every token sees every token)
                          -> hidden states (B, T, H); pooled = tanh(W h_[CLS] + b) (B, H)

Pretraining heads (:class:`BertForPreTraining`):

- masked LM: for the masked positions, :math:`\\mathrm{softmax}(E\\,\\mathrm{LN}(\\mathrm{GELU}(W h_t + b)) + b_{vocab})`,
  the decoder matrix E tied to the word embeddings;
- next-sentence prediction: a linear layer on the pooled [CLS] vector, IsNext (0) or NotNext (1).

The loss is the sum of the two cross-entropies. :class:`BertForSequenceClassification` (chapter 08)
replaces the heads by dropout and a linear classifier on the pooled vector.
"""

from __future__ import annotations

import os
import pathlib
from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from minillm import MinillmError, hf
from minillm.config import dataclass_from_dict
from minillm.layers import EncoderBlock, LayerNorm, make_activation


@dataclass
class BertConfig:
    """Sizes of a :class:`Bert`. BERT-base is ``vocab_size=30522, max_len=512, n_layer=12, n_head=12,
    n_embd=768, d_ff=3072``; the defaults are a small model a CPU pretrains in minutes."""

    vocab_size: int = 8000
    max_len: int = 128  # position embeddings: the longest input
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    d_ff: int = 0  # the feed-forward width; 0 means 4 * n_embd
    dropout: float = 0.1  # on embeddings, attention weights and every residual branch
    type_vocab_size: int = 2  # segment A and segment B
    layer_norm_eps: float = 1e-12
    pad_id: int = 0
    activation: Literal["gelu", "gelu_tanh", "relu"] = "gelu"

    def __post_init__(self):
        for name in ("vocab_size", "max_len", "n_layer", "n_head", "n_embd", "type_vocab_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.d_ff < 0 or not 0 <= self.pad_id < self.vocab_size:
            raise ValueError("d_ff cannot be negative and pad_id must be a vocabulary id")

    @property
    def ff_width(self) -> int:
        return self.d_ff or 4 * self.n_embd

    @classmethod
    def from_dict(cls, values: dict, source: str = "the model configuration") -> "BertConfig":
        """A config from a dict (e.g. a run's config.json), ignoring keys it does not know; a value of the wrong
        type or out of range is a ``ValueError`` naming ``source``."""
        return dataclass_from_dict(cls, values, source)


class BertEmbeddings(nn.Module):
    """Word + position + token-type (segment) embeddings, summed, then LayerNorm and dropout."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.n_embd, padding_idx=config.pad_id)
        self.position_embeddings = nn.Embedding(config.max_len, config.n_embd)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.n_embd)
        self.norm = LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)
        self.max_len = config.max_len

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor,
                prompt_embeddings: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) ids -> (B, T, H). ``prompt_embeddings`` (P, H) or (B, P, H), the soft prompt of
        prompt tuning (:mod:`minillm.finetune`), are inserted right after position 0 ([CLS]) once
        word + position + segment embeddings are summed, before the LayerNorm: the real tokens
        keep their positions 0..T-1, the P prompt vectors get no position or segment embedding
        (they are free, trained vectors), and the output is (B, 1 + P + T-1, H). P + T must still
        fit ``max_len``, the longest sequence the model was built for."""
        length = input_ids.shape[1]
        n_prompt = 0 if prompt_embeddings is None else prompt_embeddings.shape[-2]
        if length + n_prompt > self.max_len:
            prompt = f" and {n_prompt} prompt vectors" if n_prompt else ""
            raise MinillmError(f"the input has {length} tokens{prompt}, more than the model's {self.max_len} positions")
        positions = torch.arange(length, device=input_ids.device)  # (T,)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions) + self.token_type_embeddings(token_type_ids)
        if prompt_embeddings is not None:
            batch = input_ids.shape[0]
            prompt = prompt_embeddings.expand(batch, -1, -1) if prompt_embeddings.dim() == 2 else prompt_embeddings
            x = torch.cat([x[:, :1], prompt.to(x.dtype), x[:, 1:]], dim=1)  # (B, 1 + P + T-1, H): [CLS], prompt, rest
        return self.dropout(self.norm(x))  # (B, T, H), or (B, P + T, H) with a prompt


class Bert(nn.Module):
    """The encoder: ``bert(input_ids, token_type_ids, attention_mask)`` -> (hidden (B, T, H), pooled (B, H))."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.layers = nn.ModuleList(
            EncoderBlock(config.n_embd, config.n_head, config.ff_width, dropout=config.dropout,
                         activation=config.activation, norm_first=False, layer_norm_eps=config.layer_norm_eps)
            for _ in range(config.n_layer))
        self.pooler = nn.Linear(config.n_embd, config.n_embd)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, *,
                prompt_embeddings: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``attention_mask`` (B, T): 1 for real tokens, 0 for padding (default: padding = ``pad_id``);
        ``token_type_ids`` (B, T): 0 for segment A, 1 for B (default: all 0). ``prompt_embeddings``
        (P, H) or (B, P, H): a soft prompt inserted after [CLS] (see :class:`BertEmbeddings`), never
        padding; the hidden states are then (B, P + T, H) and the pooler still reads [CLS]."""
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        if attention_mask is None:
            attention_mask = (input_ids != self.config.pad_id).long()
        padding = attention_mask == 0  # (B, T), True at padding: no query attends to it
        if prompt_embeddings is not None:
            prompt_padding = padding.new_zeros(padding.shape[0], prompt_embeddings.shape[-2])  # (B, P): all real
            padding = torch.cat([padding[:, :1], prompt_padding, padding[:, 1:]], dim=1)  # (B, P + T)
        x = self.embeddings(input_ids, token_type_ids, prompt_embeddings)
        for layer in self.layers:
            x = layer(x, key_padding_mask=padding)
        pooled = torch.tanh(self.pooler(x[:, 0]))  # (B, H): the [CLS] position
        return x, pooled


def at_least_fp32(logits: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 logits (autocast) upcast for the softmax's sum; fp32 and fp64 left as they are."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def masked_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The masked-LM loss: the mean cross-entropy over the positions that have a label (not -100),

    .. math::  L = -\\frac{1}{\\max(1, |M|)} \\sum_{t \\in M} \\log \\mathrm{softmax}(z_t)_{y_t}

    and 0 (with a zero gradient) when nothing was masked: a short batch can draw no masked token
    at 15%, and ``F.cross_entropy``'s mean over no positions is 0/0 = NaN, which would end a run."""
    logits, labels = at_least_fp32(logits.reshape(-1, logits.shape[-1])), labels.reshape(-1)
    total = F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
    return total / (labels != -100).sum().clamp(min=1)


def init_bert_weights(module: nn.Module) -> None:
    """BERT's initialization: N(0, 0.02) for every matrix and embedding, zero biases, LayerNorm (1, 0)."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()


@dataclass
class BertPretrainingOutput:
    mlm_logits: torch.Tensor  # (B, T, vocab), or (n_masked, vocab) with mlm_positions="masked"
    nsp_logits: torch.Tensor  # (B, 2)
    loss: torch.Tensor | None = None  # mlm_loss + nsp_loss, when labels are given
    mlm_loss: torch.Tensor | None = None
    nsp_loss: torch.Tensor | None = None


class BertForPreTraining(nn.Module):
    """:class:`Bert` with the masked-LM head (tied decoder + bias) and the next-sentence head."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.bert = Bert(config)
        self.mlm_dense = nn.Linear(config.n_embd, config.n_embd)
        self.mlm_activation = make_activation(config.activation)
        self.mlm_norm = LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.mlm_bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.nsp_head = nn.Linear(config.n_embd, 2)
        self.apply(init_bert_weights)

    @property
    def mlm_decoder_weight(self) -> torch.Tensor:
        return self.bert.embeddings.word_embeddings.weight  # tied: (vocab, H)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, mlm_labels: torch.Tensor | None = None,
                next_sentence_label: torch.Tensor | None = None,
                mlm_positions: Literal["all", "masked"] = "all") -> BertPretrainingOutput:
        """Logits of both heads and, given ``mlm_labels`` (B, T; -100 where nothing is predicted) and
        ``next_sentence_label`` (B,), the summed loss. ``mlm_positions="masked"`` computes the
        vocabulary logits only where ``mlm_labels`` != -100 (about 15% of tokens): the same loss
        for a sixth of the largest matmul, what pretraining uses."""
        hidden, pooled = self.bert(input_ids, token_type_ids, attention_mask)
        if mlm_positions == "masked":
            if mlm_labels is None:
                raise ValueError("mlm_positions='masked' needs mlm_labels")
            selected = mlm_labels != -100  # (B, T)
            hidden, targets = hidden[selected], mlm_labels[selected]  # (n_masked, H), (n_masked,)
        else:
            targets = mlm_labels
        transformed = self.mlm_norm(self.mlm_activation(self.mlm_dense(hidden)))
        mlm_logits = F.linear(transformed, self.mlm_decoder_weight, self.mlm_bias)  # (..., vocab)
        nsp_logits = self.nsp_head(pooled)  # (B, 2)
        output = BertPretrainingOutput(mlm_logits, nsp_logits)
        losses = []
        if targets is not None:
            output.mlm_loss = masked_lm_loss(mlm_logits, targets)
            losses.append(output.mlm_loss)
        if next_sentence_label is not None:
            output.nsp_loss = F.cross_entropy(at_least_fp32(nsp_logits), next_sentence_label)
            losses.append(output.nsp_loss)
        if losses:
            output.loss = sum(losses)
        return output

    @classmethod
    def from_hf(cls, directory: str | os.PathLike, dropout: float = 0.0) -> "BertForPreTraining":
        """Load a ``transformers`` BertForPreTraining folder (config.json + model.safetensors): :func:`load_bert`."""
        return load_bert(directory, dropout=dropout)

    def save_hf(self, directory: str | os.PathLike) -> pathlib.Path:
        """Write a folder that ``transformers.BertForPreTraining.from_pretrained`` loads with the same logits:
        :func:`save_bert`."""
        return save_bert(self, directory)


@dataclass
class ClassificationOutput:
    logits: torch.Tensor  # (B, num_labels)
    loss: torch.Tensor | None = None


class BertForSequenceClassification(nn.Module):
    """:class:`Bert`, dropout, and a linear classifier on a summary of the sentence (Devlin et al., section 4.1).

    ``pooling="cls"`` is BERT's: the pooled [CLS] vector, tanh(W h_[CLS] + b), whose dense layer next-sentence
    prediction trained. ``pooling="mean"`` is the mean of the last layer's hidden states over the real tokens,
    :math:`\\frac{1}{|T|}\\sum_{t \\in T} h_t` (Reimers & Gurevych, 2019), with no pooler: every token's state
    reaches the classifier directly, which a small encoder fine-tuned on few labels learns from more easily.
    """

    def __init__(self, config: BertConfig, num_labels: int = 2, pooling: Literal["cls", "mean"] = "cls"):
        super().__init__()
        if num_labels < 2:
            raise ValueError(f"num_labels must be at least 2, got {num_labels}")
        if pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean', got {pooling!r}")
        self.config, self.num_labels, self.pooling = config, num_labels, pooling
        self.bert = Bert(config)
        self.dropout = nn.Dropout(config.dropout)
        self.classifier = nn.Linear(config.n_embd, num_labels)
        self.apply(init_bert_weights)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None, *,
                prompt_embeddings: torch.Tensor | None = None) -> ClassificationOutput:
        """Logits (B, num_labels) and, with ``labels`` (B,), the cross-entropy. ``prompt_embeddings``
        is the soft prompt of prompt tuning (:func:`minillm.finetune.apply_prompt_tuning`)."""
        hidden, pooled = self.bert(input_ids, token_type_ids, attention_mask, prompt_embeddings=prompt_embeddings)
        if self.pooling == "mean":
            real = (input_ids != self.config.pad_id) if attention_mask is None else attention_mask != 0  # (B, T)
            if prompt_embeddings is not None:  # the prompt vectors sit after [CLS] and are all real
                prompt = real.new_ones(real.shape[0], prompt_embeddings.shape[-2])
                real = torch.cat([real[:, :1], prompt, real[:, 1:]], dim=1)  # (B, P + T)
            weights = real.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
            pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)  # (B, H)
        logits = self.classifier(self.dropout(pooled))  # (B, num_labels)
        loss = F.cross_entropy(at_least_fp32(logits), labels) if labels is not None else None
        return ClassificationOutput(logits, loss)

    @classmethod
    def from_pretraining(cls, pretrained: BertForPreTraining, num_labels: int = 2,
                         pooling: Literal["cls", "mean"] = "cls") -> "BertForSequenceClassification":
        """The encoder (and pooler) of a pretrained model under a new, freshly initialized classifier."""
        model = cls(pretrained.config, num_labels, pooling)
        model.bert.load_state_dict(pretrained.bert.state_dict())
        return model


def config_dict(model: nn.Module) -> dict:
    return asdict(model.config)


def load_bert(directory: str | os.PathLike, dropout: float = 0.0) -> BertForPreTraining:
    """A :class:`BertForPreTraining` with the weights of a Hugging Face BERT folder (:func:`minillm.hf.read_bert_folder`
    says what it reads and refuses). The model comes back in training mode; call ``.eval()`` before inference
    when ``dropout`` > 0."""
    config, state = hf.read_bert_folder(directory, BertConfig, dropout=dropout)
    model = BertForPreTraining(config)
    model.load_state_dict(state)  # strict: every parameter is set (the shapes were checked)
    return model


def save_bert(model: BertForPreTraining, directory: str | os.PathLike) -> pathlib.Path:
    """Write ``model`` as a Hugging Face BERT folder (:func:`minillm.hf.write_bert_folder`); returns the folder.
    :func:`load_bert` gives back the same model, ``transformers.BertForPreTraining.from_pretrained`` the same logits."""
    if not isinstance(model, BertForPreTraining):
        raise MinillmError(f"save_bert writes a minillm BertForPreTraining, got {type(model).__name__}")
    return hf.write_bert_folder(directory, model.state_dict(), model.config)
