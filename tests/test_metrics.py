"""minillm.metrics against hand-computed cases and reference implementations (sacrebleu, scikit-learn; test-only).

Tolerance for BLEU: sacrebleu computes the same sums in the same order up to float rounding;
scores agree to 1e-9 on the 0-100 scale (observed: exactly equal). Precision, recall and F1 are
ratios of the same small integer counts in both, so they agree to 1e-12.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import sacrebleu
import torch
from hypothesis import given
from hypothesis import strategies as st
from sklearn import metrics as sk

from minillm.metrics import (
    accuracy,
    bleu,
    bleu_details,
    classification_metrics,
    confusion_matrix,
    exact_match,
    ngram_counts,
    perplexity,
    precision_recall_f1,
)

# A small alphabet makes n-gram matches (and clipping) common; no token contains whitespace, so
# sacrebleu's tokenize="none", which splits on spaces, sees exactly our tokens.
token = st.sampled_from(["a", "b", "c", "d", "the", "cat"])
sentence = st.lists(token, min_size=0, max_size=12)


def sacre(hypotheses, reference_streams, smooth="exp"):
    return sacrebleu.corpus_bleu([" ".join(h) for h in hypotheses], [[" ".join(r) for r in stream] for stream in reference_streams],
                                 tokenize="none", smooth_method=smooth, force=True)


@given(pairs=st.lists(st.tuples(sentence, sentence), min_size=1, max_size=8), smooth=st.sampled_from(["exp", "none"]))
def test_bleu_equals_sacrebleu_corpus_bleu_with_one_reference(pairs, smooth):
    hypotheses, references = [h for h, _ in pairs], [r for _, r in pairs]
    ours = bleu_details(hypotheses, references, smooth=smooth)
    theirs = sacre(hypotheses, [references], smooth)
    assert ours.score == pytest.approx(theirs.score, abs=1e-9)
    assert ours.brevity_penalty == pytest.approx(theirs.bp, abs=1e-12)
    assert (ours.hypothesis_length, ours.reference_length) == (theirs.sys_len, theirs.ref_len)
    assert ours.matches == theirs.counts and ours.totals == theirs.totals


@given(cases=st.lists(st.tuples(sentence, sentence, sentence), min_size=1, max_size=8))
def test_bleu_equals_sacrebleu_with_two_references_per_hypothesis(cases):
    hypotheses = [h for h, _, _ in cases]
    references = [[r1, r2] for _, r1, r2 in cases]
    theirs = sacre(hypotheses, [[r1 for _, r1, _ in cases], [r2 for _, _, r2 in cases]])
    assert bleu(hypotheses, references) == pytest.approx(theirs.score, abs=1e-9)


def test_modified_precision_clips_counts_as_in_the_paper():
    """Papineni et al.'s example: 'the' x 7 against two references gets unigram precision 2/7, not 7/7."""
    candidate = "the the the the the the the".split()
    references = ["the cat is on the mat".split(), "there is a cat on the mat".split()]
    details = bleu_details([candidate], [references], smooth="none")
    assert details.matches[0] == 2 and details.totals[0] == 7
    assert details.precisions[0] == pytest.approx(100 * 2 / 7)
    assert details.score == 0.0  # no bigram matches: the unsmoothed geometric mean is 0


def test_hand_computed_bleu_with_brevity_penalty():
    """Hypothesis of 5 tokens, reference of 6: p1 = 5/5, p2 = 3/4, p3 = 1/3, p4 = 0/2 -> smoothed to 1/(2·2)."""
    hypothesis, reference = "a b c d a".split(), "a b c a d a".split()
    details = bleu_details([hypothesis], [reference])
    assert details.matches == [5, 3, 1, 0] and details.totals == [5, 4, 3, 2]
    expected_precisions = [1.0, 3 / 4, 1 / 3, 1 / 4]
    brevity_penalty = math.exp(1 - 6 / 5)
    expected = 100 * brevity_penalty * math.exp(sum(math.log(p) for p in expected_precisions) / 4)
    assert details.brevity_penalty == pytest.approx(brevity_penalty)
    assert details.score == pytest.approx(expected)


def test_identical_corpus_scores_100_and_disjoint_scores_0():
    corpus = ["one two three four five".split(), "six seven eight nine".split()]
    assert bleu(corpus, corpus) == pytest.approx(100.0)
    assert bleu(corpus, [["x"] * 5, ["y"] * 4]) == 0.0
    assert bleu([[]], [["a", "b"]]) == 0.0  # an empty hypothesis: brevity penalty 0


def test_ties_in_reference_length_go_to_the_shorter_reference():
    details = bleu_details([["a", "b", "c"]], [[["a", "b"], ["a", "b", "c", "d"]]])
    assert details.reference_length == 2


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        bleu([["a"], ["b"]], [["a"]])
    with pytest.raises(ValueError, match="smooth"):
        bleu([["a"]], [["a"]], smooth="floor")


def test_ngram_counts_exact_match_and_perplexity():
    assert ngram_counts("a b a b".split(), 2) == {("a", "b"): 2, ("b", "a"): 1}
    assert exact_match([[1, 2], [3]], [[1, 2], [4]]) == 0.5
    assert exact_match(["12", "7"], ["12", "8"]) == 0.5
    with pytest.raises(ValueError):
        exact_match([], [])
    assert perplexity(math.log(65)) == pytest.approx(65)  # uniform over 65 characters


# ---------------------------------------------------------------------------------------------
# Classification metrics against their definitions and scikit-learn (test-only reference)
# ---------------------------------------------------------------------------------------------

@st.composite
def label_pairs(draw, max_classes=5):
    """(y_true, y_pred, C): equal-length lists of class ids 0..C-1, often one class only or no positives."""
    num_classes = draw(st.integers(1, max_classes))
    n = draw(st.integers(1, 30))
    labels = st.integers(0, num_classes - 1)
    y_true = draw(st.one_of(st.lists(labels, min_size=n, max_size=n), st.just([draw(labels)] * n)))
    y_pred = draw(st.one_of(st.lists(labels, min_size=n, max_size=n), st.just([draw(labels)] * n)))
    return y_true, y_pred, num_classes


def sklearn_scores(y_true, y_pred, average, positive_label=1, num_classes=2):
    if average == "binary":  # scikit-learn's "binary" refuses more than two classes; one class vs the rest is this
        precision, recall, f1, _ = sk.precision_recall_fscore_support(y_true, y_pred, labels=[positive_label], average=None,
                                                                      zero_division=0)
        return precision[0], recall[0], f1[0]
    precision, recall, f1, _ = sk.precision_recall_fscore_support(y_true, y_pred, labels=list(range(num_classes)),
                                                                  average=average, zero_division=0)
    return precision, recall, f1


@given(pair=label_pairs(), average=st.sampled_from(["binary", "macro", "micro"]))
def test_precision_recall_f1_matches_sklearn(pair, average):
    y_true, y_pred, num_classes = pair
    num_classes = max(num_classes, 2)  # binary scores class 1, so there are at least two classes
    ours = precision_recall_f1(y_true, y_pred, average=average, num_classes=num_classes)
    assert ours == pytest.approx(sklearn_scores(y_true, y_pred, average, num_classes=num_classes), abs=1e-12)


@given(y=st.lists(st.integers(0, 1), min_size=1, max_size=30), data=st.data())
def test_binary_scores_match_sklearn_average_binary_with_inferred_classes(y, data):
    """Two-class labels with num_classes left out, including all-negative truth or predictions."""
    y_pred = data.draw(st.lists(st.integers(0, 1), min_size=len(y), max_size=len(y)))
    expected = sk.precision_recall_fscore_support(y, y_pred, average="binary", pos_label=1, zero_division=0)[:3]
    assert precision_recall_f1(y, y_pred) == pytest.approx(expected, abs=1e-12)
    scores = classification_metrics(y, y_pred)
    assert scores["accuracy"] == pytest.approx(sk.accuracy_score(y, y_pred))
    assert scores["macro_f1"] == pytest.approx(sk.f1_score(y, y_pred, labels=[0, 1], average="macro", zero_division=0))


@pytest.mark.filterwarnings("ignore:A single label was found")  # scikit-learn's note when C = 1
@given(pair=label_pairs())
def test_confusion_matrix_matches_sklearn_rows_true_columns_predicted(pair):
    y_true, y_pred, num_classes = pair
    ours = confusion_matrix(y_true, y_pred, num_classes=num_classes)
    assert ours.dtype == np.int64 and ours.shape == (num_classes, num_classes)
    np.testing.assert_array_equal(ours, sk.confusion_matrix(y_true, y_pred, labels=list(range(num_classes))))
    assert ours.sum() == len(y_true) and np.trace(ours) == sum(t == p for t, p in zip(y_true, y_pred))


@given(pair=label_pairs())
def test_accuracy_matches_sklearn_and_equals_micro_f1(pair):
    y_true, y_pred, num_classes = pair
    assert accuracy(y_true, y_pred) == pytest.approx(sk.accuracy_score(y_true, y_pred))
    micro = precision_recall_f1(y_true, y_pred, average="micro", num_classes=num_classes)
    assert micro == pytest.approx((accuracy(y_true, y_pred),) * 3)


def test_precision_recall_f1_from_hand_counted_tp_fp_fn():
    """Class 1: TP = 3, FP = 1 (index 5), FN = 2 (indices 3, 4) -> P = 3/4, R = 3/5, F1 = 2PR/(P+R) = 2/3."""
    y_true = [1, 1, 1, 1, 1, 0, 0, 0]
    y_pred = [1, 1, 1, 0, 0, 1, 0, 0]
    precision, recall, f1 = precision_recall_f1(y_true, y_pred)
    assert (precision, recall) == pytest.approx((3 / 4, 3 / 5))
    assert f1 == pytest.approx(2 * (3 / 4) * (3 / 5) / (3 / 4 + 3 / 5)) and f1 == pytest.approx(2 / 3)
    np.testing.assert_array_equal(confusion_matrix(y_true, y_pred), [[2, 1], [2, 3]])  # rows: true 0, true 1
    # Class 0: TP = 2, FP = 2, FN = 1 -> P = 1/2, R = 2/3, F1 = 4/7; macro = mean of the two classes.
    macro = precision_recall_f1(y_true, y_pred, average="macro")
    assert macro == pytest.approx(((1 / 2 + 3 / 4) / 2, (2 / 3 + 3 / 5) / 2, (4 / 7 + 2 / 3) / 2))
    assert precision_recall_f1(y_true, y_pred, average="micro") == pytest.approx((5 / 8,) * 3)
    assert accuracy(y_true, y_pred) == 5 / 8
    assert precision_recall_f1(y_pred, y_true, positive_label=0) == pytest.approx((2 / 3, 1 / 2, 4 / 7))  # roles swap


def test_zero_division_counts_as_zero():
    assert precision_recall_f1([1, 0, 1], [0, 0, 0]) == (0.0, 0.0, 0.0)  # no predicted positives
    assert precision_recall_f1([0, 0, 0], [1, 0, 0]) == (0.0, 0.0, 0.0)  # no true positives
    assert precision_recall_f1([0, 0], [0, 0]) == (0.0, 0.0, 0.0)  # class 1 never appears
    assert precision_recall_f1([1, 1], [1, 1]) == (1.0, 1.0, 1.0)
    scores = classification_metrics([0, 0, 0, 1], [0, 0, 0, 0])  # the majority-class baseline
    assert scores == {"accuracy": 0.75, "precision": 0.0, "recall": 0.0, "f1": 0.0, "macro_f1": pytest.approx((6 / 7) / 2)}


def test_metrics_accept_lists_numpy_arrays_and_tensors_alike():
    y_true, y_pred = [0, 1, 2, 2, 1], [0, 2, 2, 2, 1]
    expected = precision_recall_f1(y_true, y_pred, average="macro")
    for convert in (np.array, torch.tensor, tuple):
        assert accuracy(convert(y_true), convert(y_pred)) == 0.8
        assert precision_recall_f1(convert(y_true), convert(y_pred), average="macro") == expected
        np.testing.assert_array_equal(confusion_matrix(convert(y_true), convert(y_pred)), confusion_matrix(y_true, y_pred))
    assert accuracy(["pos", "neg"], ["pos", "pos"]) == 0.5  # accuracy needs only equality
    assert all(type(value) is float for value in classification_metrics(torch.tensor(y_true), torch.tensor(y_pred)).values())


@pytest.mark.parametrize("call, message", [
    (lambda: accuracy([], []), "no examples"),
    (lambda: accuracy([0, 1], [0]), "y_true has 2 labels but y_pred has 1"),
    (lambda: accuracy([[0, 1]], [[0, 1]]), "1-D"),
    (lambda: precision_recall_f1([0, 1], [0, 1], average="weighted"), "'binary', 'macro', 'micro'"),
    (lambda: confusion_matrix([0, 3], [0, 1], num_classes=2), "label 3 is not a class id"),
    (lambda: confusion_matrix([0, -1], [0, 1]), "class ids 0..C-1"),
    (lambda: confusion_matrix([0.5, 1.0], [0, 1]), "integer class ids"),
    (lambda: precision_recall_f1([0, 1], [0, 1], positive_label=2, num_classes=2), "positive_label 2"),
])
def test_bad_classification_inputs_are_refused_with_one_sentence(call, message):
    with pytest.raises(ValueError, match=message):
        call()
