"""A bag-of-words sentiment classifier: chapter 02's small real problem for racing optimizers.

The model is fastText's (Joulin et al., 2017, "Bag of Tricks for Efficient Text Classification"):
average the embeddings of a sentence's words, then a linear layer,

.. math::  p(y \\mid x) = \\mathrm{softmax}\\Big(W \\frac{1}{|x|} \\sum_{w \\in x} E_w + b\\Big),

trained with cross-entropy. On SST-2 it reaches about 80% dev accuracy, the bag-of-words
number users know, in seconds on a CPU; it has enough parameters (one vector per word) for
optimizers to behave differently, and it trains on real text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn
from tqdm import tqdm

from minillm.tokenization import WordTokenizer


class BagOfWordsClassifier(nn.Module):
    """Mean of word embeddings -> linear layer -> class logits."""

    def __init__(self, vocab_size: int, embed_dim: int = 64, n_classes: int = 2):
        super().__init__()
        self.embedding = nn.EmbeddingBag(vocab_size, embed_dim, mode="mean")
        self.classifier = nn.Linear(embed_dim, n_classes)
        nn.init.normal_(self.embedding.weight, std=0.1)

    def forward(self, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """``ids``: all sentences' word ids concatenated, (N,); ``offsets``: where each sentence starts, (B,)."""
        sentence_vectors = self.embedding(ids, offsets)  # (B, embed_dim)
        return self.classifier(sentence_vectors)  # (B, n_classes)


@dataclass
class Bags:
    """Sentences as EmbeddingBag input: concatenated ids, start offsets, labels."""

    ids: torch.Tensor  # (N,)
    offsets: torch.Tensor  # (B,)
    labels: torch.Tensor  # (B,)

    def __len__(self) -> int:
        return len(self.labels)


def encode_bags(tokenizer: WordTokenizer, sentences: Sequence[str], labels: Sequence[int]) -> Bags:
    """Encode sentences for :class:`BagOfWordsClassifier` (an empty sentence becomes one ``[UNK]``)."""
    encoded = [tokenizer.encode(sentence) or [0] for sentence in sentences]
    lengths = torch.tensor([len(ids) for ids in encoded])
    offsets = torch.cumsum(lengths, 0) - lengths  # start of each sentence
    ids = torch.tensor([i for sentence_ids in encoded for i in sentence_ids])
    return Bags(ids, offsets, torch.tensor(list(labels)))


def batch_of(bags: Bags, indices: torch.Tensor) -> Bags:
    """The sentences at ``indices`` as a new :class:`Bags`."""
    ends = torch.cat([bags.offsets[1:], torch.tensor([len(bags.ids)])])
    pieces = [bags.ids[bags.offsets[i]: ends[i]] for i in indices.tolist()]
    lengths = torch.tensor([len(piece) for piece in pieces])
    return Bags(torch.cat(pieces), torch.cumsum(lengths, 0) - lengths, bags.labels[indices])


@torch.no_grad()
def evaluate(model: BagOfWordsClassifier, bags: Bags) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) over all of ``bags``."""
    model.eval()
    logits = model(bags.ids, bags.offsets)
    loss = nn.functional.cross_entropy(logits, bags.labels).item()
    accuracy = (logits.argmax(-1) == bags.labels).float().mean().item()
    model.train()
    return loss, accuracy


@dataclass
class TrainHistory:
    train_loss: list[float] = field(default_factory=list)  # every step
    eval_steps: list[int] = field(default_factory=list)
    dev_loss: list[float] = field(default_factory=list)
    dev_accuracy: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)


def fit(
    model: BagOfWordsClassifier,
    optimizer: torch.optim.Optimizer,
    train_bags: Bags,
    dev_bags: Bags,
    steps: int,
    batch_size: int = 128,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    eval_every: int = 50,
    seed: int = 0,
    description: str = "train",
) -> TrainHistory:
    """Minibatch training: shuffle, forward, cross-entropy, backward, step; evaluate on dev every ``eval_every`` steps.

    The batch order depends only on ``seed``, so runs with different optimizers see the same data.
    """
    generator = torch.Generator().manual_seed(seed)
    history = TrainHistory()
    order = torch.randperm(len(train_bags), generator=generator)
    cursor = 0
    for step in tqdm(range(steps), desc=description, leave=False, disable=None):
        if cursor + batch_size > len(order):
            order, cursor = torch.randperm(len(train_bags), generator=generator), 0
        batch = batch_of(train_bags, order[cursor: cursor + batch_size])
        cursor += batch_size
        logits = model(batch.ids, batch.offsets)  # (B, n_classes)
        loss = nn.functional.cross_entropy(logits, batch.labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history.lr.append(optimizer.param_groups[0]["lr"])
        if scheduler is not None:
            scheduler.step()
        history.train_loss.append(loss.item())
        if not math.isfinite(history.train_loss[-1]):
            break
        if (step + 1) % eval_every == 0 or step == steps - 1:
            dev_loss, dev_accuracy = evaluate(model, dev_bags)
            history.eval_steps.append(step + 1)
            history.dev_loss.append(dev_loss)
            history.dev_accuracy.append(dev_accuracy)
    return history
