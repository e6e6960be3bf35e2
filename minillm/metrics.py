"""Evaluation metrics, each written from its definition.

- :func:`bleu` / :func:`bleu_details`: corpus BLEU-4 (Papineni et al., 2002) on token lists, equal to
  sacrebleu's ``corpus_bleu(..., tokenize="none")`` (the tests check it).
- :func:`exact_match`: the fraction of predictions equal to their reference.
- :func:`perplexity`: exp of a mean cross-entropy in nats.
- Classification (chapter 08): :func:`accuracy`, :func:`confusion_matrix`,
  :func:`precision_recall_f1` (binary, macro, micro) and :func:`classification_metrics`, equal to
  scikit-learn's ``accuracy_score``, ``confusion_matrix`` and ``precision_recall_fscore_support``
  with ``zero_division=0`` and ``labels=range(C)`` (the tests check it). Class labels are the
  integers 0..C-1.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np

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


# ---------------------------------------------------------------------------------------------
# Classification: accuracy, confusion matrix, precision / recall / F1
# ---------------------------------------------------------------------------------------------

AVERAGES = ("binary", "macro", "micro")


def _as_array(labels, name: str) -> np.ndarray:
    """``labels`` (a sequence, a numpy array or a torch tensor) as a 1-D numpy array."""
    if hasattr(labels, "detach"):  # a torch tensor, possibly on a GPU
        labels = labels.detach().cpu().numpy()
    array = np.asarray(labels)
    if array.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence of labels, got an array of shape {array.shape}")
    return array


def _paired(y_true, y_pred, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Both label arrays, checked: 1-D, the same length, not empty."""
    true, pred = _as_array(y_true, "y_true"), _as_array(y_pred, "y_pred")
    if len(true) != len(pred):
        raise ValueError(f"y_true has {len(true)} labels but y_pred has {len(pred)}: {what} needs one prediction per example")
    if len(true) == 0:
        raise ValueError(f"{what} of no examples is undefined: y_true and y_pred are empty")
    return true, pred


def _class_ids(array: np.ndarray, name: str) -> np.ndarray:
    """The labels as int64 class ids, refusing anything that is not a whole number >= 0."""
    if array.dtype == bool:
        return array.astype(np.int64)
    if not np.issubdtype(array.dtype, np.integer):
        if not np.issubdtype(array.dtype, np.floating) or not np.all(np.mod(array, 1) == 0):
            raise ValueError(f"{name} must hold integer class ids 0..C-1, got values of type {array.dtype}")
    ids = array.astype(np.int64)
    if (ids < 0).any():
        raise ValueError(f"{name} must hold class ids 0..C-1, but it holds {int(ids.min())}")
    return ids


def accuracy(y_true, y_pred) -> float:
    """The fraction of predictions equal to the true label: :math:`\\frac{1}{N}\\sum_i [\\hat y_i = y_i]`.

    Labels may be any comparable values (ints, strings) in a sequence, numpy array or torch tensor.
    """
    true, pred = _paired(y_true, y_pred, "accuracy")
    return float(np.mean(true == pred))


def confusion_matrix(y_true, y_pred, num_classes: int | None = None) -> np.ndarray:
    """The (C, C) count matrix :math:`M_{ij} = \\#\\{n : y_n = i,\\ \\hat y_n = j\\}`.

    Rows are the true class, columns the predicted class (scikit-learn's convention), so the
    diagonal holds the correct predictions, row sums the true class sizes and column sums how
    often each class was predicted. Labels are integer class ids 0..C-1; ``C`` is
    ``num_classes`` or, when that is None, one more than the largest label seen.
    Returns a numpy int64 array.
    """
    true, pred = _paired(y_true, y_pred, "a confusion matrix")
    true, pred = _class_ids(true, "y_true"), _class_ids(pred, "y_pred")
    largest = int(max(true.max(), pred.max()))
    if num_classes is None:
        num_classes = largest + 1
    elif num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    elif largest >= num_classes:
        raise ValueError(f"label {largest} is not a class id for num_classes={num_classes} (ids are 0..{num_classes - 1})")
    counts = np.bincount(true * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).astype(np.int64)


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, elementwise, with 0 wherever the denominator is 0 (zero_division=0)."""
    numerator, denominator = np.asarray(numerator, dtype=float), np.asarray(denominator, dtype=float)
    out = np.zeros(np.broadcast(numerator, denominator).shape)
    np.divide(numerator, denominator, out=out, where=denominator != 0)
    return out


def _precision_recall_f1_from_counts(tp, fp, fn) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    precision = _safe_divide(tp, tp + fp)
    recall = _safe_divide(tp, tp + fn)
    f1 = _safe_divide(2 * precision * recall, precision + recall)
    return precision, recall, f1


def precision_recall_f1(y_true, y_pred, average: Literal["binary", "macro", "micro"] = "binary",
                        positive_label: int = 1, num_classes: int | None = None) -> tuple[float, float, float]:
    """Precision, recall and F1 of class predictions: ``(P, R, F1)`` as floats in [0, 1].

    For one class c, with TP (predicted c and was c), FP (predicted c, was not) and FN (was c,
    predicted something else), read off :func:`confusion_matrix` M as the diagonal, the column
    sum minus the diagonal and the row sum minus the diagonal:

    .. math::  P = \\frac{TP}{TP + FP}, \\quad R = \\frac{TP}{TP + FN}, \\quad F_1 = \\frac{2PR}{P + R}

    A fraction whose denominator is 0 counts as 0 (scikit-learn's ``zero_division=0``): no
    predicted positives gives P = 0, no true positives R = 0, and P + R = 0 gives F1 = 0.

    ``average`` picks what is scored:

    - ``"binary"``: the class ``positive_label`` against all others (SST-2: 1 = positive).
    - ``"macro"``: the unweighted mean of the per-class P, R and F1 over classes 0..C-1; macro-F1
      is the mean of the per-class F1 scores (as scikit-learn computes it), not the F1 of the
      macro P and R. A class in neither y_true nor y_pred scores 0 and still counts.
    - ``"micro"``: P, R and F1 from TP, FP and FN summed over the classes. With one label per
      example every error is one FP (for the predicted class) and one FN (for the true one), so
      micro P = micro R = micro F1 = accuracy.

    ``C`` is ``num_classes`` or, when that is None, one more than the largest label seen (and at
    least ``positive_label + 1`` for ``"binary"``).
    """
    if average not in AVERAGES:
        raise ValueError(f"unknown average {average!r}: use one of {', '.join(repr(a) for a in AVERAGES)}")
    true, pred = _paired(y_true, y_pred, "precision and recall")
    if average == "binary" and num_classes is None:
        largest = int(max(_class_ids(true, "y_true").max(), _class_ids(pred, "y_pred").max()))
        num_classes = max(largest, positive_label) + 1
    matrix = confusion_matrix(true, pred, num_classes)
    tp = np.diag(matrix)
    fp = matrix.sum(axis=0) - tp
    fn = matrix.sum(axis=1) - tp
    if average == "binary":
        if not 0 <= positive_label < len(matrix):
            raise ValueError(f"positive_label {positive_label} is not a class id for num_classes={len(matrix)}")
        precision, recall, f1 = _precision_recall_f1_from_counts(tp[positive_label], fp[positive_label], fn[positive_label])
    elif average == "micro":
        precision, recall, f1 = _precision_recall_f1_from_counts(tp.sum(), fp.sum(), fn.sum())
    else:  # macro
        precision, recall, f1 = (scores.mean() for scores in _precision_recall_f1_from_counts(tp, fp, fn))
    return float(precision), float(recall), float(f1)


def classification_metrics(y_true, y_pred, positive_label: int = 1, num_classes: int | None = None) -> dict[str, float]:
    """The scores a chapter's table reports, as plain floats (JSON-ready): ``accuracy``, ``precision``,
    ``recall`` and ``f1`` of class ``positive_label`` (``average="binary"``), and ``macro_f1``.

    ``num_classes`` defaults to one more than the largest of the labels seen and ``positive_label``,
    so a binary task scores both classes even when predictions are all one class. See
    :func:`accuracy` and :func:`precision_recall_f1` for the formulas.
    """
    true, pred = _paired(y_true, y_pred, "classification scores")
    if num_classes is None:
        largest = int(max(_class_ids(true, "y_true").max(), _class_ids(pred, "y_pred").max()))
        num_classes = max(largest, positive_label) + 1
    precision, recall, f1 = precision_recall_f1(true, pred, "binary", positive_label, num_classes)
    _, _, macro_f1 = precision_recall_f1(true, pred, "macro", num_classes=num_classes)
    return {"accuracy": accuracy(true, pred), "precision": precision, "recall": recall, "f1": f1, "macro_f1": macro_f1}
