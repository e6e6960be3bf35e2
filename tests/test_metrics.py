"""minillm.metrics against hand-computed cases and reference implementations (sacrebleu, test-only).

Tolerance for BLEU: sacrebleu computes the same sums in the same order up to float rounding;
scores agree to 1e-9 on the 0-100 scale (observed: exactly equal).
"""

from __future__ import annotations

import math

import pytest
import sacrebleu
from hypothesis import given, strategies as st

from minillm.metrics import bleu, bleu_details, exact_match, ngram_counts, perplexity

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
