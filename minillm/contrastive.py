"""Contrastive learning of sentence embeddings: the InfoNCE loss, SimCSE, and probes that score embeddings.

**InfoNCE** (van den Oord, Li & Vinyals, 2018, "Representation Learning with Contrastive Predictive
Coding"), in the form SimCSE uses (Gao, Yao & Chen, 2021). A batch holds N positive pairs (z1_i, z2_i);
every other z2_j of the batch is a negative for z1_i ("in-batch negatives", N − 1 of them). With the
cosine similarity sim(a, b) = aᵀb / (‖a‖‖b‖) and a temperature τ,

.. math::

    \\mathcal{L} = -\\frac{1}{N}\\sum_{i=1}^{N} \\log
        \\frac{\\exp(\\mathrm{sim}(z^1_i, z^2_i)/\\tau)}{\\sum_{j=1}^{N} \\exp(\\mathrm{sim}(z^1_i, z^2_j)/\\tau)},

the cross-entropy of an N-way classification whose logits are the N×N matrix ẑ1 ẑ2ᵀ / τ of the
L2-normalized embeddings and whose right answer for row i is column i (the diagonal): :func:`info_nce`.
It pulls each pair together (*alignment*) and pushes the batch's embeddings apart over the unit sphere
(*uniformity*, Wang & Isola, 2020): :func:`alignment`, :func:`uniformity`. SimCLR's NT-Xent (Chen et al.,
2020) differs: each of the 2N views is an anchor, and its negatives are the 2N − 2 views of the other
examples, from both sides (z1_j and z2_j); here z1_i's negatives come from the z2 side only.

**SimCSE, unsupervised** (Gao et al., 2021, "SimCSE: Simple Contrastive Learning of Sentence
Embeddings"): the two views of a sentence are the same sentence encoded twice with dropout on; two
dropout masks are the only "data augmentation". :class:`SimCSETask` plugs that into the shared
:class:`~minillm.train.Trainer` (the encoder is a :class:`~minillm.bert.Bert`; a sentence embedding is
its [CLS] hidden state, its pooler output, or the mean of its token states: :func:`sentence_embeddings`).

**Probes** say how much a frozen embedding knows about a label, without changing the encoder: a
:func:`nearest_centroid_probe` (each class's mean embedding; the nearest one wins) and a
:func:`logistic_regression_probe` (multinomial logistic regression with an L2 penalty, fitted to the
optimum by full-batch L-BFGS in float64: deterministic). :func:`pca_2d` projects embeddings on their
two directions of largest variance for a picture (:func:`plot_embeddings_2d`).
"""

from __future__ import annotations

import os
import pathlib
from dataclasses import dataclass, field
from typing import Literal, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from minillm import MinillmError, data
from minillm.bert import at_least_fp32  # bf16/fp16 upcast: cosines near 1 need the mantissa
from minillm.train import Task, TrainConfig

Pooling = Literal["cls", "pooler", "mean"]
POOLINGS = ("cls", "pooler", "mean")

__all__ = [
    "info_nce", "alignment", "uniformity", "sentence_embeddings", "embed_sentences", "set_dropout", "SimCSEBatch",
    "SimCSETask", "SimCSEConfig", "simcse_task", "nearest_centroid_probe", "probe_encoder", "fit_logistic_regression", "logistic_regression_probe",
    "pca_2d", "plot_embeddings_2d",
]


# ---------------------------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------------------------


def _check_pair(z1: torch.Tensor, z2: torch.Tensor) -> None:
    if z1.dim() != 2 or z1.shape != z2.shape or z1.shape[0] < 1:
        raise ValueError(f"info_nce needs two (N, d) tensors of the same shape with N >= 1, got {tuple(z1.shape)} "
                         f"and {tuple(z2.shape)}")


def info_nce(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.05, symmetric: bool = False) -> torch.Tensor:
    """The InfoNCE loss of N positive pairs (row i of ``z1`` with row i of ``z2``) with in-batch negatives.

    .. math::  L = -\\frac{1}{N}\\sum_i \\log \\frac{\\exp(\\mathrm{sim}(z1_i, z2_i)/\\tau)}
                                              {\\sum_j \\exp(\\mathrm{sim}(z1_i, z2_j)/\\tau)}

    with sim the cosine similarity, i.e. ``cross_entropy(ẑ1 @ ẑ2.T / τ, arange(N))`` on the L2-normalized
    rows ẑ (van den Oord et al., 2018; SimCSE's form, Gao et al., 2021, who use τ = 0.05): only the
    other rows of ``z2`` are negatives, not the other rows of ``z1`` as in SimCLR's NT-Xent. It is the
    mean cross-entropy of picking each row's partner out of the N candidates, so it lies between 0
    (every partner far more similar than any other row) and log N when all embeddings are the same.
    ``symmetric=True`` averages both directions, z1 -> z2 (rows) and z2 -> z1 (columns), as CLIP does.

    ``z1``, ``z2``: (N, d), any scale (only directions count). Returns a scalar.
    """
    _check_pair(z1, z2)
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    z1, z2 = F.normalize(at_least_fp32(z1), dim=-1), F.normalize(at_least_fp32(z2), dim=-1)
    logits = z1 @ z2.T / temperature  # (N, N): logits[i, j] = sim(z1_i, z2_j) / τ
    targets = torch.arange(len(z1), device=z1.device)  # the diagonal: row i's partner is column i
    loss = F.cross_entropy(logits, targets)
    if symmetric:
        loss = (loss + F.cross_entropy(logits.T, targets)) / 2
    return loss


def alignment(z1: torch.Tensor, z2: torch.Tensor, alpha: float = 2.0) -> torch.Tensor:
    """Wang & Isola (2020): E ‖ẑ1_i - ẑ2_i‖^α over the positive pairs of normalized embeddings; 0 is perfect."""
    _check_pair(z1, z2)
    z1, z2 = F.normalize(at_least_fp32(z1), dim=-1), F.normalize(at_least_fp32(z2), dim=-1)
    return (z1 - z2).norm(dim=-1).pow(alpha).mean()


def uniformity(z: torch.Tensor, t: float = 2.0) -> torch.Tensor:
    """Wang & Isola (2020): log E_{i≠j} exp(-t ‖ẑ_i - ẑ_j‖²) over distinct rows of normalized embeddings.
    0 when all rows coincide (collapse); lower is more uniform over the sphere (about -t·2 at best in high d)."""
    if z.dim() != 2 or z.shape[0] < 2:
        raise ValueError(f"uniformity needs an (N, d) tensor with N >= 2, got {tuple(z.shape)}")
    z = F.normalize(at_least_fp32(z), dim=-1)
    squared = torch.pdist(z).pow(2)  # the N(N-1)/2 distinct pairs
    return torch.logsumexp(-t * squared, dim=0) - torch.log(torch.tensor(float(len(squared)), dtype=z.dtype, device=z.device))


# ---------------------------------------------------------------------------------------------
# Sentence embeddings from a BERT encoder
# ---------------------------------------------------------------------------------------------


def sentence_embeddings(bert: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                        pooling: Pooling = "cls") -> torch.Tensor:
    """(B, T) token ids -> (B, H) sentence embeddings from a :class:`~minillm.bert.Bert` (or a model that
    holds one as ``.bert``: :class:`~minillm.bert.BertForPreTraining`, ``BertForSequenceClassification``).

    ``pooling``: ``"cls"`` the last layer's hidden state at [CLS] (position 0; what SimCSE evaluates);
    ``"pooler"`` BERT's pooler on it, tanh(W h_[CLS] + b) (SimCSE trains through such an MLP);
    ``"mean"`` the mean of the hidden states of the real tokens (``attention_mask`` 1), padding excluded.
    Dropout acts as the module's mode says: in train mode two calls give two different views.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    encoder = getattr(bert, "bert", bert)  # a DistributedDataParallel wrapper has no .bert: it is called as is
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    hidden, pooled = encoder(input_ids, attention_mask=attention_mask)  # (B, T, H), (B, H)
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "pooler":
        return pooled
    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)


@torch.no_grad()
def embed_sentences(bert: nn.Module, sentences: Sequence[Sequence[int]], pad_id: int, pooling: Pooling = "cls",
                    device: str | torch.device = "cpu", batch_size: int = 256) -> torch.Tensor:
    """Embeddings (N, H), float32 on the CPU, of token-id lists, in eval mode (no dropout), in the input's order.
    Sentences are batched by length (less padding) and put back in order."""
    was_training = bert.training
    bert.eval()
    order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
    out = [None] * len(sentences)
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            padded = data.pad_batch([sentences[i] for i in chunk], pad_id=pad_id)
            z = sentence_embeddings(bert, padded["input_ids"].to(device), padded["attention_mask"].to(device), pooling)
            for i, row in zip(chunk, z.float().cpu()):
                out[i] = row
    finally:
        bert.train(was_training)
    if not out:
        raise ValueError("embed_sentences needs at least one sentence")
    return torch.stack(out)


def set_dropout(model: nn.Module, p: float) -> nn.Module:
    """Set every dropout probability in ``model`` to ``p`` (``nn.Dropout`` modules and attention-weight
    dropout), and ``model.config.dropout`` where there is one. SimCSE's views differ only through
    dropout: p = 0 makes them identical and the loss has nothing to align. Returns the model."""
    from minillm.attention import MultiHeadAttention

    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {p}")
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p
        elif isinstance(module, MultiHeadAttention):
            module.dropout = p
        if hasattr(getattr(module, "config", None), "dropout"):
            module.config.dropout = p
    return model


# ---------------------------------------------------------------------------------------------
# SimCSE with the shared training loop
# ---------------------------------------------------------------------------------------------


@dataclass
class SimCSEBatch:
    input_ids: torch.Tensor  # (B, T), padded on the right
    attention_mask: torch.Tensor  # (B, T), 1 = real token

    def to(self, device) -> "SimCSEBatch":
        return SimCSEBatch(self.input_ids.to(device), self.attention_mask.to(device))

    def __len__(self) -> int:
        return self.input_ids.shape[0]


class SimCSETask(Task):
    """Unsupervised SimCSE for :class:`~minillm.train.Trainer`: ``sentences`` are token-id lists ([CLS] ... [SEP]).

    Training: a batch is B *distinct* sentences (drawn without replacement: a repeated sentence would be
    its own negative). The batch is encoded twice in one forward pass (the rows stacked, (2B, T)), so
    every row gets its own dropout masks; the two embeddings of sentence i are a positive pair, the other
    B - 1 sentences its negatives, and the loss is :func:`info_nce` with ``temperature``. The model must be
    in train mode (the Trainer's doing) with dropout > 0, or the two views are identical.

    ``length_grouping`` g > 1 draws g·B sentences, sorts them by length and keeps one of the g
    consecutive runs of B, chosen uniformly: every sentence is still drawn with the same probability,
    but a batch holds sentences of similar length, which saves the padding (about half of a uniform
    batch of SST-2 sentences) and takes length away as a cue for telling a sentence from its negatives
    (SimCSE's positives always share their length; Wu et al., 2022, "ESimCSE"). g = 1: uniform batches.

    Validation is the same objective on held-out sentences: the Trainer calls :meth:`loss` in eval mode,
    where the task switches dropout back on under a fixed seed, so each estimate sees the same dropout
    masks and changes only because the weights did, and the validation curve is comparable to the
    training curve. (With dropout off the two views coincide and the loss only measures how far apart
    the sentences are, which falls towards 0 for any spread-out embedding.) Because the loss depends on
    the number of negatives (log N at collapse), validation always uses full batches of
    ``eval_batch_size`` sentences, whatever batch size the Trainer asks for; a remainder is dropped.
    With ``length_grouping`` > 1 the validation sentences are batched in order of length, as hard as
    training batches (mixed lengths make the task easier: a loss lower than in training).
    Under torchrun each process contrasts its own share of the batch only (no all-gather of negatives).
    """

    loss_unit = "nats/sentence pair"

    def __init__(self, train: Sequence[Sequence[int]], val: Sequence[Sequence[int]], pad_id: int,
                 temperature: float = 0.05, pooling: Pooling = "mean", symmetric: bool = False,
                 length_grouping: int = 8, eval_batch_size: int = 64, eval_seed: int = 0):
        if len(train) < 2 or len(val) < 2:
            raise MinillmError(f"SimCSE needs at least 2 training and 2 validation sentences, got {len(train)} and {len(val)}")
        if any(len(s) == 0 for s in list(train) + list(val)):
            raise MinillmError("every sentence needs at least one token ([CLS])")
        if pooling not in POOLINGS or not temperature > 0 or length_grouping < 1 or eval_batch_size < 2:
            raise ValueError("need pooling in ('cls', 'pooler', 'mean'), temperature > 0, length_grouping >= 1, "
                             "eval_batch_size >= 2")
        self.train, self.val, self.pad_id = [list(s) for s in train], [list(s) for s in val], pad_id
        self.temperature, self.pooling, self.symmetric = temperature, pooling, symmetric
        self.length_grouping, self.eval_batch_size, self.eval_seed = length_grouping, eval_batch_size, eval_seed
        self.train_lengths = torch.tensor([len(s) for s in self.train])
        self._val_batches: list[SimCSEBatch] | None = None

    def batch(self, sentences: Sequence[Sequence[int]]) -> SimCSEBatch:
        padded = data.pad_batch(sentences, pad_id=self.pad_id)
        return SimCSEBatch(padded["input_ids"], padded["attention_mask"])

    def sample_batch(self, batch_size: int, generator: torch.Generator, device, rank: int = 0, world_size: int = 1):
        total = batch_size * world_size  # the global batch: every process draws it, and keeps its rows
        n = len(self.train)
        if total > n:
            raise MinillmError(f"a batch of {total} distinct sentences needs at least that many; there are {n}")
        runs = max(1, min(self.length_grouping, n // total))
        drawn = torch.randperm(n, generator=generator)[: runs * total]  # distinct, uniformly chosen
        drawn = drawn[torch.sort(self.train_lengths[drawn], stable=True).indices]  # by length, ties in random order
        run = int(torch.randint(runs, (1,), generator=generator))
        chosen = drawn[run * total:(run + 1) * total][rank * batch_size:(rank + 1) * batch_size]
        return self.batch([self.train[i] for i in chosen.tolist()]).to(device)

    def _two_view_loss(self, model, batch: SimCSEBatch) -> torch.Tensor:
        ids = torch.cat([batch.input_ids, batch.input_ids])  # (2B, T): each sentence twice, own dropout masks
        mask = torch.cat([batch.attention_mask, batch.attention_mask])
        z1, z2 = sentence_embeddings(model, ids, mask, self.pooling).chunk(2)  # (B, H) each
        return info_nce(z1, z2, self.temperature, self.symmetric)

    def loss(self, model, batch: SimCSEBatch) -> torch.Tensor:
        if model.training:
            return self._two_view_loss(model, batch)
        device = batch.input_ids.device  # validation: dropout on, with the same masks at every estimate
        devices = [device] if device.type != "cpu" else []
        with torch.random.fork_rng(devices=devices, device_type=device.type if device.type != "cpu" else "cuda"):
            torch.manual_seed(self.eval_seed)
            model.train()
            try:
                return self._two_view_loss(model, batch)
            finally:
                model.eval()

    def eval_batches(self, batch_size: int, device, max_batches: int | None = None):
        if self._val_batches is None:
            size = min(self.eval_batch_size, len(self.val))
            val = sorted(self.val, key=len) if self.length_grouping > 1 else self.val  # batches like the training ones
            self._val_batches = [self.batch(val[start:start + size]) for start in range(0, len(val) - size + 1, size)]
        for batch in self._val_batches[:max_batches]:
            yield batch.to(device)

    @staticmethod
    def batch_tokens(batch: SimCSEBatch) -> int:
        return int(batch.attention_mask.sum())  # the sentences' tokens (each is encoded twice)

    @staticmethod
    def eval_weight(batch: SimCSEBatch) -> int:
        return len(batch)


@dataclass
class SimCSEConfig(TrainConfig):
    """Unsupervised SimCSE on a BERT encoder with the shared loop, and the probes that score it."""

    out: str = field(default="runs/simcse", metadata={"help": "run folder: checkpoints, log.jsonl, loss.png, results.json"})
    pooling: Pooling = field(default="mean", metadata={"help": "sentence embedding: [CLS] state, pooler (tanh) on it, "
                                                                "or the mean of the token states"})
    temperature: float = field(default=0.05, metadata={"help": "InfoNCE temperature tau (SimCSE's 0.05)"})
    symmetric: bool = field(default=False, metadata={"help": "average the loss over both directions (view 1 -> 2, 2 -> 1)"})
    dropout: float = field(default=0.1, metadata={"help": "dropout during SimCSE: the only difference between two views"})
    max_length: int = field(default=64, metadata={"help": "tokens per sentence; longer ones are truncated"})
    val_sentences: int = field(default=320, metadata={"help": "training sentences held out for the validation loss"})
    length_grouping: int = field(default=8, metadata={"help": "batches of similar-length sentences (1: uniform batches)"})
    probe_l2: float = field(default=1e-3, metadata={"help": "L2 penalty of the logistic-regression probe"})
    sst2_limit: int = field(default=0, metadata={"help": "read only the first N SST-2 training phrases (0: all)"})
    max_iters: int = field(default=200, metadata={"help": "SimCSE steps"})
    batch_size: int = field(default=64, metadata={"help": "sentences per batch: each has batch_size - 1 negatives"})
    lr: float = field(default=3e-5, metadata={"help": "peak learning rate (SimCSE's for BERT-base)"})
    min_lr: float = field(default=3e-6, metadata={"help": "learning rate at the end of the cosine decay"})
    warmup_iters: int = field(default=20, metadata={"help": "steps of linear warmup"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW decoupled weight decay"})
    beta2: float = field(default=0.999, metadata={"help": "AdamW beta2 (BERT's)"})
    eval_interval: int = field(default=50, metadata={"help": "estimate the validation loss every N steps (and checkpoint)"})
    eval_iters: int = field(default=5, metadata={"help": "validation batches per estimate"})
    QUICK = {"max_iters": 10, "eval_interval": 5, "eval_iters": 2, "batch_size": 16, "warmup_iters": 2, "sst2_limit": 3000,
             "val_sentences": 32, "max_length": 32, "lr": 1e-3, "min_lr": 1e-4, "progress": False}

    def validate(self):
        super().validate()
        if self.val_sentences < 2 or self.max_length < 3 or self.length_grouping < 1:
            raise ValueError("need --val-sentences >= 2, --max-length >= 3 and --length-grouping >= 1")
        if not self.temperature > 0 or not 0.0 <= self.dropout < 1.0 or self.probe_l2 < 0:
            raise ValueError("need --temperature > 0, 0 <= --dropout < 1 and --probe-l2 >= 0")


def simcse_task(config: SimCSEConfig, sentences: Sequence[Sequence[int]], pad_id: int) -> SimCSETask:
    """A :class:`SimCSETask` on token-id lists: ``config.val_sentences`` of them (at most a fifth), drawn with
    ``config.seed``, held out for the validation loss, the rest to train on."""
    order = torch.randperm(len(sentences), generator=torch.Generator().manual_seed(config.seed)).tolist()
    n_val = min(config.val_sentences, len(sentences) // 5)
    return SimCSETask([sentences[i] for i in order[n_val:]], [sentences[i] for i in order[:n_val]], pad_id,
                      temperature=config.temperature, pooling=config.pooling, symmetric=config.symmetric,
                      length_grouping=config.length_grouping, eval_batch_size=min(config.batch_size, n_val),
                      eval_seed=config.seed)


# ---------------------------------------------------------------------------------------------
# SST-2's full training sentences
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# Probes
# ---------------------------------------------------------------------------------------------


def _check_probe(train_emb, train_labels, test_emb, test_labels):
    train_emb, test_emb = torch.as_tensor(train_emb), torch.as_tensor(test_emb)
    train_labels, test_labels = torch.as_tensor(train_labels).long(), torch.as_tensor(test_labels).long()
    if train_emb.dim() != 2 or test_emb.dim() != 2 or train_emb.shape[1] != test_emb.shape[1]:
        raise ValueError(f"embeddings must be (N, d) with the same d, got {tuple(train_emb.shape)} and {tuple(test_emb.shape)}")
    if len(train_labels) != len(train_emb) or len(test_labels) != len(test_emb) or len(test_emb) == 0:
        raise ValueError("need one label per embedding and at least one test example")
    if len(torch.unique(train_labels)) < 2 or train_labels.min() < 0:
        raise ValueError("the training labels must be 0, 1, ... with at least two classes present")
    return train_emb.double(), train_labels, test_emb.double(), test_labels


def nearest_centroid_probe(train_emb, train_labels, test_emb, test_labels) -> float:
    """Accuracy on the test set of the nearest-centroid classifier: each class is the mean of its
    training embeddings, and an embedding gets the class whose mean is nearest (Euclidean; on
    L2-normalized embeddings, the largest cosine). No parameters to fit; it rewards embeddings whose
    classes form separate clouds."""
    train_emb, train_labels, test_emb, test_labels = _check_probe(train_emb, train_labels, test_emb, test_labels)
    classes = torch.unique(train_labels)
    centroids = torch.stack([train_emb[train_labels == c].mean(0) for c in classes])  # (C, d)
    predicted = classes[torch.cdist(test_emb, centroids).argmin(1)]
    return (predicted == test_labels).double().mean().item()


def fit_logistic_regression(x: torch.Tensor, y: torch.Tensor, l2: float = 1e-3, max_iter: int = 500
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression: the (C, d) weights W and (C,) biases b minimizing

    .. math::  \\frac{1}{n}\\sum_i -\\log \\mathrm{softmax}(W x_i + b)_{y_i} + \\frac{\\lambda}{2}\\lVert W\\rVert^2

    (the bias is not penalized), by full-batch L-BFGS with a strong-Wolfe line search in float64 from
    zeros: convex, so it reaches the one optimum, and deterministic. ``y`` holds 0 .. C-1. (This is
    scikit-learn's ``LogisticRegression(C=1/(λn))`` for three or more classes; for two, whose
    single-vector form halves the penalty, ``C=2/(λn)``.)"""
    x, y = torch.as_tensor(x).double(), torch.as_tensor(y).long()
    if not l2 >= 0:
        raise ValueError(f"l2 must be non-negative, got {l2}")
    num_classes = int(y.max()) + 1
    weight = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=1e-10,
                                  tolerance_change=1e-14, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight.T + bias, y) + l2 / 2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach(), bias.detach()


def logistic_regression_probe(train_emb, train_labels, test_emb, test_labels, l2: float = 1e-3) -> float:
    """Accuracy on the test set of a logistic-regression classifier fitted on the training embeddings
    (:func:`fit_logistic_regression`), after standardizing every dimension with the training set's
    mean and standard deviation (so ``l2`` means the same whatever the embeddings' scale): a linear probe."""
    train_emb, train_labels, test_emb, test_labels = _check_probe(train_emb, train_labels, test_emb, test_labels)
    mean, std = train_emb.mean(0), train_emb.std(0).clamp_min(1e-12)
    weight, bias = fit_logistic_regression((train_emb - mean) / std, train_labels, l2)
    predicted = (((test_emb - mean) / std) @ weight.T + bias).argmax(1)
    return (predicted == test_labels).double().mean().item()


def probe_encoder(encoder: nn.Module, train: Sequence[tuple[Sequence[int], int]], test: Sequence[tuple[Sequence[int], int]],
                  pad_id: int, pooling: Pooling = "mean", device: str | torch.device = "cpu", l2: float = 1e-3) -> dict:
    """Score a frozen encoder's embeddings of labelled token-id lists: embed ``train`` and ``test`` (eval mode,
    L2-normalized, the space InfoNCE shapes), fit both probes on ``train``, report their accuracy on ``test``,
    and how spread out the test embeddings are: their mean pairwise cosine (the diagonal included; near 1 when
    all embeddings crowd into a narrow cone) and :func:`uniformity`. ``test_embeddings`` are returned too."""
    train_z, test_z = (F.normalize(embed_sentences(encoder, [ids for ids, _ in split], pad_id, pooling, device), dim=-1)
                       for split in (train, test))
    y_train, y_test = torch.tensor([y for _, y in train]), torch.tensor([y for _, y in test])
    return {"nearest_centroid": nearest_centroid_probe(train_z, y_train, test_z, y_test),
            "logistic_regression": logistic_regression_probe(train_z, y_train, test_z, y_test, l2=l2),
            "mean_cosine": (test_z @ test_z.T).mean().item(), "uniformity": uniformity(test_z).item(),
            "test_embeddings": test_z}


# ---------------------------------------------------------------------------------------------
# A 2-D picture
# ---------------------------------------------------------------------------------------------


def pca_2d(embeddings: torch.Tensor, return_variance: bool = False):
    """(N, d) -> (N, 2): the centred embeddings projected on their first two principal directions, the
    top right-singular vectors of the centred matrix X - mean = U S Vᵀ, i.e. (X - mean) V[:, :2] = U[:, :2] S[:2].
    Each direction's sign is fixed so that its largest-magnitude coordinate is positive (a deterministic
    picture). ``return_variance=True`` also returns the fraction of the variance each direction explains."""
    x = torch.as_tensor(embeddings)
    if x.dim() != 2 or x.shape[0] < 2 or x.shape[1] < 2:
        raise ValueError(f"pca_2d needs an (N, d) tensor with N, d >= 2, got {tuple(x.shape)}")
    x = x.double() if not x.is_floating_point() else x
    centred = x - x.mean(0)
    _, singular, vh = torch.linalg.svd(centred, full_matrices=False)
    directions = vh[:2]  # (2, d)
    signs = torch.sign(directions.gather(1, directions.abs().argmax(1, keepdim=True)))  # (2, 1)
    directions = directions * torch.where(signs == 0, torch.ones_like(signs), signs)
    coords = centred @ directions.T  # (N, 2)
    if not return_variance:
        return coords
    variance = singular.pow(2)
    return coords, variance[:2] / variance.sum().clamp_min(torch.finfo(variance.dtype).tiny)


def plot_embeddings_2d(panels: Mapping[str, tuple[torch.Tensor, Sequence[int]]], path: str | os.PathLike,
                       title: str = "", class_names: Sequence[str] = ("negative", "positive"),
                       share_axes: bool = True) -> pathlib.Path:
    """One scatter plot per panel, side by side: ``panels`` maps a panel title to (points (N, 2), labels (N,)),
    each point coloured by its label (e.g. the PCA of dev-sentence embeddings before and after training).
    ``share_axes``: the same scale in every panel, so that a spread (or a collapse) shows."""
    from matplotlib.figure import Figure

    from minillm.plots import save_figure

    fig = Figure(figsize=(4.6 * len(panels), 4.4), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False, sharex=share_axes, sharey=share_axes)[0]
    for ax, (name, (points, labels)) in zip(axes, panels.items()):
        points, labels = torch.as_tensor(points).cpu(), torch.as_tensor(labels).cpu()
        for value in torch.unique(labels).tolist():
            chosen = labels == value
            label = class_names[value] if value < len(class_names) else str(value)
            ax.scatter(points[chosen, 0], points[chosen, 1], s=7, alpha=0.6, color=f"C{value}", label=label, linewidths=0)
        ax.set(title=name, xlabel="PC 1", ylabel="PC 2")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", markerscale=2)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)
