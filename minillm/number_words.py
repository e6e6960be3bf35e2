"""A real sequence-to-sequence task for chapter 05: English number words to digits, and back.

``"three hundred forty - two thousand five"`` -> ``"3 4 2 0 0 5"``. The data come from a seeded
generator, so train and test sets are as large as you like and never overlap; the task is small
enough for a CPU to learn in minutes, yet needs what translation needs: a source read as a whole
(the zeros of "thousand five" depend on words far apart), an output of another length, and
alignment (which word says which digit), which cross-attention learns.

- :func:`number_to_words`: American English, without "and", hyphens as their own token.
- :func:`number_dataset`: disjoint train / validation / test numbers, as token lists.
- :class:`Vocabulary`: tokens <-> ids with ``[PAD] [BOS] [EOS] [UNK]`` at ids 0-3.
- :func:`train_seq2seq` and :func:`evaluate`: the chapter's training loop and its exact-match and BLEU.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
from tqdm import tqdm

from minillm import data, metrics
from minillm.optim import AdamW, warmup_cosine_lr

ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
        "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
SCALES = [(10**9, "billion"), (10**6, "million"), (10**3, "thousand")]
SPECIAL_TOKENS = ["[PAD]", "[BOS]", "[EOS]", "[UNK]"]
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3


def _below_thousand(n: int) -> list[str]:
    words = []
    if n >= 100:
        words += [ONES[n // 100], "hundred"]
        n %= 100
    if n >= 20:
        words.append(TENS[n // 10])
        if n % 10:
            words += ["-", ONES[n % 10]]
    elif n > 0:
        words.append(ONES[n])
    return words


def number_to_words(n: int) -> list[str]:
    """The English words for 0 <= n < 10^12, as tokens: 1005 -> ['one', 'thousand', 'five'],
    42 -> ['forty', '-', 'two'] (American usage: no "and" after "hundred")."""
    if not 0 <= n < 10**12:
        raise ValueError(f"number_to_words covers 0 to 10^12 - 1, got {n}")
    if n == 0:
        return ["zero"]
    words = []
    for value, name in SCALES:
        if n >= value:
            words += _below_thousand(n // value) + [name]
            n %= value
    return words + _below_thousand(n)


def number_to_digits(n: int) -> list[str]:
    return list(str(n))


def detokenize(tokens: Sequence[str]) -> str:
    """Tokens back to text for display: digits side by side, words with spaces, hyphens joined:
    ['4', '2'] -> '42', ['forty', '-', 'two'] -> 'forty-two'."""
    if all(len(token) == 1 and token.isdigit() for token in tokens):
        return "".join(tokens)
    return " ".join(tokens).replace(" - ", "-")


def numbers_per_length(max_digits: int) -> dict[int, int]:
    """How many numbers have d digits, for d = 1..max_digits (ten one-digit numbers, counting 0)."""
    return {d: 10 if d == 1 else 9 * 10 ** (d - 1) for d in range(1, max_digits + 1)}


def dataset_capacity(max_digits: int) -> tuple[int, int]:
    """The most (held-out, train) pairs :func:`number_dataset` can draw: held-out numbers take at
    most 20% of each length, and training numbers the rest."""
    held_out = sum(int(0.2 * n) for n in numbers_per_length(max_digits).values())
    return held_out, 10**max_digits - held_out


def sample_numbers(count: int, max_digits: int, rng: random.Random, exclude: set[int] = frozenset(),
                   max_fraction: float = 1.0) -> list[int]:
    """``count`` distinct numbers, not in ``exclude``, whose digit count is uniform over 1..max_digits
    (uniform numbers would be almost all max_digits long and leave "seven" or "twelve" unseen).

    At most ``max_fraction`` of the numbers of each length are drawn, so that a held-out set cannot
    take all of the ten one-digit numbers and leave none for training.
    """
    quota = {d: int(max_fraction * n) for d, n in numbers_per_length(max_digits).items()}
    if count > sum(quota.values()) - len(exclude):
        raise ValueError(f"cannot draw {count} distinct numbers of at most {max_digits} digits")
    numbers: set[int] = set()
    drawn = dict.fromkeys(quota, 0)
    while len(numbers) < count:
        digits = rng.randint(1, max_digits)
        n = rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)
        if n not in exclude and n not in numbers and drawn[digits] < quota[digits]:
            numbers.add(n)
            drawn[digits] += 1
    return sorted(numbers, key=lambda _: rng.random())  # a seeded shuffle of a set


@dataclass
class NumberSplits:
    """Disjoint splits of (source tokens, target tokens) pairs, and the numbers they came from."""

    train: list[tuple[list[str], list[str]]]
    val: list[tuple[list[str], list[str]]]
    test: list[tuple[list[str], list[str]]]
    numbers: dict[str, list[int]] = field(default_factory=dict)


def number_dataset(n_train: int, n_val: int, n_test: int, max_digits: int = 6, seed: int = 0,
                   direction: str = "words2digits") -> NumberSplits:
    """Train, validation and test pairs over disjoint numbers, from a seeded generator.

    ``direction`` is ``"words2digits"`` (read the words, write the digits) or ``"digits2words"``.
    Validation and test numbers are drawn first (at most 20% of the numbers of each length), so they
    do not depend on the size of the training set.
    """
    if direction not in ("words2digits", "digits2words"):
        raise ValueError(f"direction must be 'words2digits' or 'digits2words', got {direction!r}")
    rng = random.Random(seed)
    held_out = sample_numbers(n_val + n_test, max_digits, rng, max_fraction=0.2)
    train = sample_numbers(n_train, max_digits, rng, exclude=set(held_out))
    splits = {"train": train, "val": held_out[:n_val], "test": held_out[n_val:]}

    def pairs(numbers: list[int]) -> list[tuple[list[str], list[str]]]:
        out = [(number_to_words(n), number_to_digits(n)) for n in numbers]
        return out if direction == "words2digits" else [(b, a) for a, b in out]

    return NumberSplits(**{name: pairs(numbers) for name, numbers in splits.items()}, numbers=splits)


class Vocabulary:
    """Tokens <-> ids, with ``[PAD] [BOS] [EOS] [UNK]`` at ids 0-3 and the tokens in first-seen order."""

    def __init__(self, tokens: Iterable[str]):
        self.tokens = list(SPECIAL_TOKENS)
        for token in tokens:
            if token not in self.tokens:
                self.tokens.append(token)
        self.ids = {token: index for index, token in enumerate(self.tokens)}

    @classmethod
    def from_sequences(cls, sequences: Iterable[Sequence[str]]) -> "Vocabulary":
        return cls(token for sequence in sequences for token in sequence)

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, tokens: Sequence[str]) -> list[int]:
        return [self.ids.get(token, UNK_ID) for token in tokens]

    def decode(self, ids: Iterable[int]) -> list[str]:
        return [self.tokens[i] for i in ids]


def make_batch(pairs: Sequence[tuple[list[str], list[str]]], src_vocab: Vocabulary, tgt_vocab: Vocabulary,
               device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(src, tgt_in, tgt_out)``, right-padded int64 tensors: src (B, S); the decoder reads
    ``[BOS] y`` (B, T) and is trained to write ``y [EOS]`` (B, T), its input shifted by one."""
    src = data.pad_batch([src_vocab.encode(s) for s, _ in pairs], pad_id=PAD_ID)["input_ids"]  # (B, S)
    tgt = data.pad_batch([[BOS_ID, *tgt_vocab.encode(t), EOS_ID] for _, t in pairs], pad_id=PAD_ID)["input_ids"]  # (B, T+1)
    return src.to(device), tgt[:, :-1].to(device), tgt[:, 1:].to(device)


def label_smoothing_floor(smoothing: float, vocab_size: int) -> float:
    """The lowest possible label-smoothed cross-entropy: the entropy of the smoothed target itself,
    which puts 1 - ε + ε/V on the answer and ε/V on each of the other V - 1 tokens (Szegedy et al., 2016)."""
    answer, other = 1 - smoothing + smoothing / vocab_size, smoothing / vocab_size
    return -(answer * math.log(answer) + (vocab_size - 1) * other * math.log(other)) if smoothing > 0 else 0.0


@dataclass
class TrainHistory:
    steps: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    val_steps: list[int] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    seconds: float = 0.0


@torch.no_grad()
def validation_loss(model, pairs, src_vocab: Vocabulary, tgt_vocab: Vocabulary, batch_size: int = 256, device="cpu") -> float:
    """Mean teacher-forced cross-entropy per target token over ``pairs``."""
    model.eval()
    total, tokens = 0.0, 0
    for start in range(0, len(pairs), batch_size):
        src, tgt_in, tgt_out = make_batch(pairs[start:start + batch_size], src_vocab, tgt_vocab, device)
        _, loss = model(src, tgt_in, tgt_out)
        n = int((tgt_out != PAD_ID).sum())
        total, tokens = total + loss.item() * n, tokens + n
    model.train()
    return total / tokens


def train_seq2seq(model, train_pairs, val_pairs, src_vocab: Vocabulary, tgt_vocab: Vocabulary, *, steps: int,
                  batch_size: int = 64, lr: float = 1e-3, warmup_steps: int = 100, weight_decay: float = 0.01,
                  label_smoothing: float = 0.1, eval_every: int = 100, seed: int = 0, device="cpu",
                  progress: bool = True, log: Callable[[str], None] | None = None) -> TrainHistory:
    """Teacher-forced training: AdamW (``minillm.optim``), linear warmup then cosine decay,
    gradient clipping at norm 1, random batches from a seeded generator. Returns the loss curves."""
    rng = random.Random(seed)
    optimizer = AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=weight_decay)
    history, start = TrainHistory(), time.perf_counter()
    model.train()
    bar = tqdm(range(steps), desc="training", disable=not progress, mininterval=1.0)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = warmup_cosine_lr(step, max_lr=lr, warmup_steps=warmup_steps, total_steps=steps, min_lr=lr / 10)
        src, tgt_in, tgt_out = make_batch(rng.sample(train_pairs, batch_size), src_vocab, tgt_vocab, device)
        _, loss = model(src, tgt_in, tgt_out, label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        history.steps.append(step)
        history.train_loss.append(loss.item())
        if (step + 1) % eval_every == 0 or step == steps - 1:
            history.val_steps.append(step)
            history.val_loss.append(validation_loss(model, val_pairs, src_vocab, tgt_vocab, device=device))
            bar.set_postfix(loss=f"{loss.item():.3f}", val=f"{history.val_loss[-1]:.3f}")
            if log is not None and not progress:
                log(f"step {step + 1}: train loss {loss.item():.3f}, val loss {history.val_loss[-1]:.3f}")
    history.seconds = time.perf_counter() - start
    model.eval()
    return history


@dataclass
class Evaluation:
    exact_match: float
    bleu: float
    predictions: list[list[str]]
    seconds: float


@torch.no_grad()
def evaluate(model, pairs, src_vocab: Vocabulary, tgt_vocab: Vocabulary, beam_size: int = 1, batch_size: int = 256,
             max_new_tokens: int | None = None, device="cpu") -> Evaluation:
    """Decode every source (greedy when ``beam_size=1``, else beam search) and score the outputs
    against the references: exact-match accuracy and corpus BLEU-4 (:func:`minillm.metrics.bleu`)."""
    model.eval()
    max_new_tokens = max_new_tokens or max(len(t) for _, t in pairs) + 4
    predictions, start = [], time.perf_counter()
    for first in range(0, len(pairs), batch_size):
        chunk = pairs[first:first + batch_size]
        src, _, _ = make_batch(chunk, src_vocab, tgt_vocab, device)
        if beam_size == 1:
            outputs = model.greedy_decode(src, max_new_tokens)
        else:
            outputs = model.beam_search(src, max_new_tokens, beam_size=beam_size, length_penalty=1.0)
        predictions += [tgt_vocab.decode(ids) for ids in outputs]
    references = [t for _, t in pairs]
    return Evaluation(metrics.exact_match(predictions, references), metrics.bleu(predictions, references),
                      predictions, time.perf_counter() - start)
