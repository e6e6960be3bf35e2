"""Evaluation metrics, each written from its definition.

- :func:`bleu` / :func:`bleu_details`: corpus BLEU-4 (Papineni et al., 2002) on token lists, equal to
  sacrebleu's ``corpus_bleu(..., tokenize="none")`` (the tests check it).
- :func:`exact_match`: the fraction of predictions equal to their reference.
- :func:`perplexity`: exp of a mean cross-entropy in nats.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Literal, Sequence

Tokens = Sequence[str]


def ngram_counts(tokens: Tokens, n: int) -> Counter[tuple[str, ...]]:
    """How often each n-gram (a tuple of n consecutive tokens) occurs in ``tokens``."""
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


@dataclass
class BleuScore:
    """Corpus BLEU and the statistics it is made of (precisions and the score on a 0-100 scale)."""

    score: float
    precisions: list[float]  # modified n-gram precisions, n = 1..max_n, in percent
    matches: list[int]  # clipped n-gram matches, summed over the corpus
    totals: list[int]  # n-grams in the hypotheses, summed over the corpus
    brevity_penalty: float
    hypothesis_length: int
    reference_length: int

    def __str__(self) -> str:
        precisions = "/".join(f"{p:.1f}" for p in self.precisions)
        return (f"BLEU = {self.score:.2f} {precisions} (BP = {self.brevity_penalty:.3f}, "
                f"ratio = {self.hypothesis_length / max(self.reference_length, 1):.3f}, "
                f"hyp_len = {self.hypothesis_length}, ref_len = {self.reference_length})")


def _closest_reference_length(hypothesis_length: int, reference_lengths: list[int]) -> int:
    """The reference length nearest the hypothesis's; a tie goes to the shorter reference."""
    return min(reference_lengths, key=lambda length: (abs(length - hypothesis_length), length))


def bleu_details(hypotheses: Sequence[Tokens], references: Sequence[Tokens] | Sequence[Sequence[Tokens]],
                 max_n: int = 4, smooth: Literal["exp", "none"] = "exp") -> BleuScore:
    """Corpus BLEU (Papineni, Roukos, Ward & Zhu, 2002, "BLEU: a method for automatic evaluation of MT").

    .. math::  \\mathrm{BLEU} = \\mathrm{BP} \\cdot \\exp\\Big(\\frac{1}{N}\\sum_{n=1}^{N} \\log p_n\\Big),
               \\quad \\mathrm{BP} = \\min\\big(1,\\; e^{\\,1 - r/c}\\big)

    :math:`p_n` is the *modified* n-gram precision over the whole corpus: each hypothesis n-gram
    counts as a match at most as often as it occurs in the reference (the most in any one
    reference, when there are several), summed over sentences, divided by the number of
    hypothesis n-grams. :math:`c` is the total hypothesis length and :math:`r` the sum over
    sentences of the reference length closest to each hypothesis's (ties: the shorter).
    The score is reported on sacrebleu's 0-100 scale.

    ``references`` holds one token list per hypothesis, or a list of token lists (several
    references) per hypothesis. ``smooth="exp"`` (sacrebleu's default, mteval's "smoothing 3")
    replaces a zero precision p_n by 1 / (2^k · total_n) for the k-th such order, so a short
    corpus is not scored 0; ``smooth="none"`` is the paper's formula, 0 whenever some p_n is 0.
    """
    if len(hypotheses) != len(references):
        raise ValueError(f"got {len(hypotheses)} hypotheses but {len(references)} references")
    if smooth not in ("exp", "none"):
        raise ValueError(f"smooth must be 'exp' or 'none', got {smooth!r}")
    matches, totals = [0] * max_n, [0] * max_n
    hypothesis_length = reference_length = 0
    for hypothesis, refs in zip(hypotheses, references):
        refs = [refs] if not refs or isinstance(refs[0], str) else refs  # one reference or several
        hypothesis_length += len(hypothesis)
        reference_length += _closest_reference_length(len(hypothesis), [len(r) for r in refs])
        for n in range(1, max_n + 1):
            hyp_ngrams = ngram_counts(hypothesis, n)
            max_ref_counts: Counter[tuple[str, ...]] = Counter()
            for ref in refs:
                max_ref_counts |= ngram_counts(ref, n)  # | keeps the larger count of each n-gram
            matches[n - 1] += sum(min(count, max_ref_counts[ngram]) for ngram, count in hyp_ngrams.items())
            totals[n - 1] += max(len(hypothesis) - n + 1, 0)

    if hypothesis_length < reference_length:
        brevity_penalty = math.exp(1 - reference_length / hypothesis_length) if hypothesis_length else 0.0
    else:
        brevity_penalty = 1.0
    precisions = [0.0] * max_n
    if any(matches):
        zero_orders = 0
        for n in range(max_n):
            if totals[n] == 0:
                break  # no hypothesis is this long: p_n (and every higher order) stays 0
            if matches[n] > 0:
                precisions[n] = 100.0 * matches[n] / totals[n]
            elif smooth == "exp":
                zero_orders += 1
                precisions[n] = 100.0 / (2**zero_orders * totals[n])
    if all(p > 0 for p in precisions):
        score = brevity_penalty * math.exp(sum(math.log(p) for p in precisions) / max_n)
    else:
        score = 0.0
    return BleuScore(score, precisions, matches, totals, brevity_penalty, hypothesis_length, reference_length)


def bleu(hypotheses: Sequence[Tokens], references: Sequence[Tokens] | Sequence[Sequence[Tokens]],
         max_n: int = 4, smooth: Literal["exp", "none"] = "exp") -> float:
    """Corpus BLEU-4 on a 0-100 scale; see :func:`bleu_details` for the formula and the options."""
    return bleu_details(hypotheses, references, max_n=max_n, smooth=smooth).score


def exact_match(predictions: Sequence[object], references: Sequence[object]) -> float:
    """The fraction of predictions equal to their reference (sequences compare whole)."""
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("exact match of an empty set is undefined")
    return sum(list(p) == list(r) if not isinstance(p, str) else p == r for p, r in zip(predictions, references)) / len(predictions)


def perplexity(mean_cross_entropy: float) -> float:
    """:math:`\\mathrm{PPL} = e^{H}` for a mean cross-entropy :math:`H` in nats per token: the number of
    equally likely choices that would leave a model as uncertain as it is."""
    return math.exp(mean_cross_entropy)
