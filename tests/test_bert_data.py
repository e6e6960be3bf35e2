"""minillm.data's BERT pretraining data: masked-LM corruption, next-sentence pairs, documents, leak-free splits.

References: exact invariants (which positions may change, what labels hold, how a pair is laid
out and truncated) are checked on every example; the 80/10/10 recipe's rates are checked against
binomial bounds. Statistical bounds: a count X ~ Binomial(n, q) is accepted when
|X/n - q| <= 5·sqrt(q(1-q)/n). By the normal approximation (n·q >= 1,000 in every check here) a
correct implementation fails one such check with probability P(|Z| > 5) = 5.7e-7, so a test with
k checks fails falsely with probability at most k · 5.7e-7 (union bound) for a fresh seed; the seeds
are fixed, so the tests are deterministic.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from minillm import data, datasets

K_SD = 5  # binomial bounds: |rate - q| <= K_SD standard deviations (two-sided tail 5.7e-7)

PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
SPECIAL = (PAD, UNK, CLS, SEP, MASK)


def assert_binomial_rate(count: int, n: int, q: float, what: str) -> None:
    """``count`` successes in ``n`` trials of probability ``q``: within K_SD binomial standard deviations."""
    sd = math.sqrt(q * (1 - q) / n)
    assert abs(count / n - q) <= K_SD * sd, f"{what}: {count}/{n} = {count / n:.5f}, expected {q:.5f} ± {K_SD * sd:.5f}"


def random_batch(seed: int, shape: tuple[int, ...], vocab_size: int, special=SPECIAL, special_rate: float = 0.2) -> torch.Tensor:
    """Token ids: non-special ids uniformly, with about ``special_rate`` of the positions a special id."""
    g = torch.Generator().manual_seed(seed)
    nonspecial = torch.tensor([i for i in range(vocab_size) if i not in special])
    ids = nonspecial[torch.randint(len(nonspecial), shape, generator=g)]
    specials = torch.tensor(sorted(special))[torch.randint(len(special), shape, generator=g)]
    return torch.where(torch.rand(shape, generator=g) < special_rate, specials, ids)


# ---------------------------------------------------------------------------------------------
# mask_tokens: invariants
# ---------------------------------------------------------------------------------------------

shapes = st.lists(st.integers(0, 6), max_size=3).map(tuple)
probabilities = st.one_of(st.just(0.0), st.just(1.0), st.floats(0.0, 1.0))


@given(shape=shapes, p=probabilities, seed=st.integers(0, 2**32), vocab_size=st.integers(6, 40),
       extra_special=st.sets(st.integers(5, 40), max_size=3))
def test_mask_tokens_changes_only_selected_positions_and_labels_hold_originals(shape, p, seed, vocab_size, extra_special):
    """For any shape and probability: labels are the original id where selected and -100 elsewhere;
    unselected and special positions keep their id; a selected position holds [MASK], its own id,
    or a non-special id below vocab_size; the input is not modified; p=0 selects nothing and p=1
    selects every non-special position."""
    special = set(SPECIAL) | {i for i in extra_special if i < vocab_size - 1}
    ids = random_batch(seed, shape, vocab_size, special, special_rate=0.5)
    before = ids.clone()
    masked, labels = data.mask_tokens(ids, MASK, vocab_size, sorted(special), mlm_probability=p,
                                      generator=torch.Generator().manual_seed(seed))
    assert torch.equal(ids, before)
    assert masked.shape == labels.shape == ids.shape and masked.dtype == labels.dtype == ids.dtype
    is_special = torch.isin(ids, torch.tensor(sorted(special)))
    selected = labels != data.IGNORE_INDEX
    assert not (selected & is_special).any()
    assert torch.equal(labels[selected], ids[selected])
    assert torch.equal(masked[~selected], ids[~selected])
    changed = masked[selected]
    assert ((changed == MASK) | ((changed >= 0) & (changed < vocab_size) & ~torch.isin(changed, torch.tensor(sorted(special))))).all()
    if p == 0.0:
        assert not selected.any()
    if p == 1.0:
        assert torch.equal(selected, ~is_special)


def test_mask_tokens_is_deterministic_under_a_seeded_generator():
    """Same seed, same output (and the generator advances by the same amount); another seed, another
    output (20,000 positions: two seeds agree with probability far below 1e-100); with no generator,
    torch's global generator is used, so torch.manual_seed makes the result reproducible."""
    ids = random_batch(0, (40, 500), 1000)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    out1, out2 = data.mask_tokens(ids, MASK, 1000, SPECIAL, generator=g1), data.mask_tokens(ids, MASK, 1000, SPECIAL, generator=g2)
    assert all(torch.equal(a, b) for a, b in zip(out1, out2))
    assert torch.equal(g1.get_state(), g2.get_state())
    other = data.mask_tokens(ids, MASK, 1000, SPECIAL, generator=torch.Generator().manual_seed(8))
    assert not torch.equal(out1[1], other[1])
    with torch.random.fork_rng():
        torch.manual_seed(3)
        global1 = data.mask_tokens(ids, MASK, 1000, SPECIAL)
        torch.manual_seed(3)
        global2 = data.mask_tokens(ids, MASK, 1000, SPECIAL)
    assert all(torch.equal(a, b) for a, b in zip(global1, global2))


def test_mask_tokens_refuses_bad_arguments():
    ids = random_batch(0, (2, 8), 50)
    with pytest.raises(ValueError, match="between 0 and 1"):
        data.mask_tokens(ids, MASK, 50, SPECIAL, mlm_probability=1.5)
    with pytest.raises(ValueError, match="between 0 and 1"):
        data.mask_tokens(ids, MASK, 50, SPECIAL, mlm_probability=-0.1)
    with pytest.raises(ValueError, match="must be one of special_token_ids"):
        data.mask_tokens(ids, MASK, 50, (PAD, CLS, SEP))
    with pytest.raises(ValueError, match="no non-special id"):
        data.mask_tokens(torch.full((2, 3), CLS), MASK, 5, SPECIAL)
    with pytest.raises(ValueError, match="shape of input_ids"):
        data.mask_tokens(ids, MASK, 50, SPECIAL, word_starts=torch.ones(2, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match="integer token ids"):
        data.mask_tokens(ids.float(), MASK, 50, SPECIAL)


# ---------------------------------------------------------------------------------------------
# mask_tokens: the 80/10/10 recipe's rates
# ---------------------------------------------------------------------------------------------


def test_mask_tokens_selects_15_percent_and_splits_them_80_10_10():
    """About 200,000 maskable positions (the rest special, which is never selected).

    The selected count S ~ Binomial(n_maskable, 0.15). Among the S selected: [MASK] ~ Bin(S, 0.8)
    exactly, since neither an original (non-special) nor a random replacement (non-special) is
    [MASK]. A random draw equals the original with probability 1/N (N = non-special ids, of which
    the original is one), so "changed to another token" ~ Bin(S, 0.1·(1 - 1/N)) and "unchanged"
    ~ Bin(S, 0.1 + 0.1/N). Four checks: false-failure probability <= 4 · 5.7e-7 = 2.3e-6.
    """
    vocab_size = 50
    n_nonspecial = vocab_size - len(SPECIAL)
    ids = random_batch(1, (500, 500), vocab_size, special_rate=0.2)
    masked, labels = data.mask_tokens(ids, MASK, vocab_size, SPECIAL, generator=torch.Generator().manual_seed(1))
    maskable = ~torch.isin(ids, torch.tensor(SPECIAL))
    selected = labels != data.IGNORE_INDEX
    n, s = int(maskable.sum()), int(selected.sum())
    assert n > 190_000
    assert not selected[~maskable].any() and torch.equal(masked[~maskable], ids[~maskable])  # 50,000 special positions
    assert_binomial_rate(s, n, 0.15, "selected")
    kept = masked[selected] == ids[selected]
    to_mask = masked[selected] == MASK
    assert_binomial_rate(int(to_mask.sum()), s, 0.8, "[MASK]")
    assert_binomial_rate(int((~to_mask & ~kept).sum()), s, 0.1 * (1 - 1 / n_nonspecial), "random, differing from the original")
    assert_binomial_rate(int(kept.sum()), s, 0.1 + 0.1 / n_nonspecial, "unchanged")


def test_random_replacements_are_uniform_over_the_non_special_ids():
    """Every position is the non-special id 1 and p = 1, with specials {0, 2, 4, 6} among ids 0..9:
    a random replacement that differs from 1 is uniform over {3, 5, 7, 8, 9}, each with
    probability 1/5 of the C changed-by-random positions (Bin(C, 1/5) each; C ~ 0.1·(5/6)·200,000
    ≈ 16,700). Five checks: false-failure probability <= 2.9e-6. No other id ever appears."""
    special = (0, 2, 4, 6)
    ids = torch.ones(400, 500, dtype=torch.long)
    masked, _ = data.mask_tokens(ids, 4, 10, special, mlm_probability=1.0, generator=torch.Generator().manual_seed(2))
    randoms = masked[(masked != 4) & (masked != 1)]
    assert set(randoms.unique().tolist()) == {3, 5, 7, 8, 9}
    for value in (3, 5, 7, 8, 9):
        assert_binomial_rate(int((randoms == value).sum()), len(randoms), 0.2, f"random id {value}")


# ---------------------------------------------------------------------------------------------
# mask_tokens: whole-word masking
# ---------------------------------------------------------------------------------------------


def reference_words(ids: torch.Tensor, word_starts: torch.Tensor, special) -> list[list[tuple[int, int]]]:
    """The documented words, one row at a time: a non-special token that starts a word, or follows a
    special token or the row's start, begins a word; following non-special non-start tokens join it.
    Returns, for each row, the words as lists of positions (row, column)."""
    rows = []
    for r in range(ids.shape[0]):
        words, previous_special = [], True
        for c in range(ids.shape[1]):
            if int(ids[r, c]) in special:
                previous_special = True
                continue
            if word_starts[r, c] or previous_special:
                words.append([])
            words[-1].append((r, c))
            previous_special = False
        rows.append(words)
    return rows


@given(seed=st.integers(0, 2**32), batch=st.integers(1, 4), length=st.integers(1, 12), p=probabilities)
def test_whole_word_masking_treats_every_piece_of_a_word_alike(seed, batch, length, p):
    """Each word (reference_words) is selected as a whole or not at all, and a selected word's pieces
    are all [MASK] or none is. (Whether a non-[MASK] word was replaced or kept cannot be read off
    exactly, since a random draw may equal the original; the rate test below covers that split.)"""
    ids = random_batch(seed, (batch, length), 30, special_rate=0.25)
    starts = torch.rand(batch, length, generator=torch.Generator().manual_seed(seed + 1)) < 0.5
    masked, labels = data.mask_tokens(ids, MASK, 30, SPECIAL, mlm_probability=p,
                                      generator=torch.Generator().manual_seed(seed), word_starts=starts)
    for words in reference_words(ids, starts, SPECIAL):
        for word in words:
            selected = {bool(labels[pos] != data.IGNORE_INDEX) for pos in word}
            assert len(selected) == 1
            if selected == {True}:
                assert len({bool(masked[pos] == MASK) for pos in word}) == 1
    unselected = labels == data.IGNORE_INDEX
    assert torch.equal(masked[unselected], ids[unselected])


def test_whole_word_selection_and_treatment_rates():
    """Words of 1-4 pieces over 200 rows of 1,000 tokens (about 60,000 words). Selected words
    W ~ Bin(n_words, 0.15); of them, all-[MASK] words ~ Bin(W, 0.8) (a random piece is never
    [MASK]). The pieces of random words are independent draws: with N = 995 non-special ids, the
    expected number of random words with a piece equal to its original is below 0.1 · W · 4 / N
    ≈ 3.6, so among selected words the fraction with every piece unchanged is checked against
    Bin(W, 0.1) with an allowance of that size: three checks, false failures <= 1.7e-6."""
    vocab_size = 1000
    g = torch.Generator().manual_seed(5)
    ids = random_batch(5, (200, 1000), vocab_size, special_rate=0.0)
    starts = torch.rand(200, 1000, generator=g) < 0.4  # words of 2.5 pieces on average
    masked, labels = data.mask_tokens(ids, MASK, vocab_size, SPECIAL, generator=torch.Generator().manual_seed(6), word_starts=starts)
    first_pieces = starts.clone()
    first_pieces[:, 0] = True  # a row's first token begins a word (no specials in this batch)
    n_words = int(first_pieces.sum())
    selected_words = first_pieces & (labels != data.IGNORE_INDEX)
    w = int(selected_words.sum())
    assert_binomial_rate(w, n_words, 0.15, "selected words")
    assert_binomial_rate(int((selected_words & (masked == MASK)).sum()), w, 0.8, "[MASK] words")
    word_index = first_pieces.long().cumsum(1) + 1000 * torch.arange(200)[:, None]  # (B, T): a word id per position
    differs = torch.zeros(int(word_index.max()) + 1, dtype=torch.bool)
    differs[word_index[masked != ids]] = True
    unchanged_words = int((selected_words & ~differs[word_index]).sum())
    allowance = 0.1 * w * 4 / (vocab_size - len(SPECIAL))
    sd = math.sqrt(0.1 * 0.9 / w)
    assert abs(unchanged_words / w - 0.1) <= K_SD * sd + allowance / w


def test_whole_words_end_at_special_tokens_and_row_ends():
    """Rows ``##y a ##b [SEP] ##z`` (starts F T F F F): a continuation at a row's start or after a
    special token begins its own word, so the words {0}, {1, 2}, {4} of a row, and the last word of a
    row and the first of the next, are selected independently: each pair is selected together with
    probability 0.15² = 0.0225 (Bin(50,000, 0.0225), n·q = 1,125; three checks, false failures
    <= 1.7e-6), where a word running over [SEP] or over the row's end would give 0.15."""
    ids = torch.tensor([[7, 5, 6, SEP, 8]]).repeat(50_000, 1)
    starts = torch.tensor([[False, True, False, False, False]]).repeat(50_000, 1)
    _, labels = data.mask_tokens(ids, MASK, 30, SPECIAL, generator=torch.Generator().manual_seed(9), word_starts=starts)
    selected = labels != data.IGNORE_INDEX
    for (row_a, col_a), (row_b, col_b) in (((0, 0), (0, 1)), ((0, 1), (0, 4)), ((0, 4), (1, 0))):
        together = selected[row_a:len(ids) - 1 + row_a, col_a] & selected[row_b:len(ids) - 1 + row_b, col_b]
        assert_binomial_rate(int(together.sum()), len(together), 0.15**2, f"positions {col_a} and {col_b} both selected")


def test_word_starts_from_tokens_marks_everything_but_continuations():
    assert data.word_starts_from_tokens(["[CLS]", "un", "##aff", "##able", "!", "[SEP]"]).tolist() == [True, True, False, False, True, True]
    batch = data.word_starts_from_tokens([["[CLS]", "play", "##ful"], ["[CLS]", "hi", "[PAD]"]])
    assert batch.dtype == torch.bool and batch.tolist() == [[True, True, False], [True, True, True]]
    with pytest.raises(ValueError, match="one length"):
        data.word_starts_from_tokens([["a"], ["b", "##c"]])


# ---------------------------------------------------------------------------------------------
# nsp_pairs
# ---------------------------------------------------------------------------------------------


def numbered_documents(rng: random.Random, n_docs: int, max_segments: int, max_tokens: int) -> list[list[list[int]]]:
    """Documents whose segment k (counting across all documents) is ``[100k, 100k + 1, ...]``:
    every token says which segment it came from (token // 100) and where in it (token % 100)."""
    documents, k = [], 1
    for _ in range(n_docs):
        document = []
        for _ in range(rng.randint(0, max_segments)):
            document.append([100 * k + i for i in range(rng.randint(1, max_tokens))])
            k += 1
        documents.append(document)
    return documents


def parse_pair(input_ids: list[int], token_type_ids: list[int]) -> tuple[list[int], list[int]]:
    """Check the layout [CLS] A [SEP] B [SEP] with types 0...0 1...1 and return (A, B)."""
    assert input_ids[0] == CLS and input_ids[-1] == SEP and input_ids.count(SEP) == 2 and CLS not in input_ids[1:]
    first_sep = input_ids.index(SEP)
    assert token_type_ids == [0] * (first_sep + 1) + [1] * (len(input_ids) - first_sep - 1)
    return input_ids[1:first_sep], input_ids[first_sep + 1:-1]


@given(seed=st.integers(0, 2**32), n_docs=st.integers(2, 6), max_length=st.integers(5, 16))
def test_nsp_pairs_lay_out_truncate_and_label_pairs_as_documented(seed, n_docs, max_length):
    """One example per segment that has a successor, in order; [CLS] A [SEP] B [SEP] with token
    types 0 then 1; A and B are prefixes of whole segments, of total length min(len A + len B,
    max_length - 3), cut from the longer side (if A lost tokens it is not shorter than what is
    left of B; if B lost tokens it is at least as long as what is left of A, minus one, since B
    loses ties); label 0 iff B is the segment after A; a NotNext B (label 1) comes from another document."""
    rng = random.Random(seed)
    documents = numbered_documents(rng, n_docs, 4, 8)
    if sum(1 for document in documents if document) < 2:
        documents[0].append([99_900])
        documents[1].append([99_800])
    examples = data.nsp_pairs(documents, max_length, cls_id=CLS, sep_id=SEP, generator=seed)
    where = {segment[0] // 100: (d, s) for d, document in enumerate(documents) for s, segment in enumerate(document)}
    expected_a = [(d, s) for d, document in enumerate(documents) for s in range(len(document) - 1)]
    assert len(examples) == len(expected_a)
    for (d, s), (input_ids, token_type_ids, label) in zip(expected_a, examples):
        assert len(input_ids) <= max_length
        a, b = parse_pair(input_ids, token_type_ids)
        full_a = documents[d][s]
        assert a and b  # both sides keep a token: each had one, and the budget is at least 2
        d_b, s_b = where[b[0] // 100]
        full_b = documents[d_b][s_b]
        assert a == full_a[:len(a)] and b == full_b[:len(b)]
        assert len(a) + len(b) == min(len(full_a) + len(full_b), max_length - 3)
        if len(a) < len(full_a):
            assert len(a) >= len(b)
        if len(b) < len(full_b):
            assert len(b) >= len(a) - 1
        assert label in (0, 1)  # Hugging Face's next_sentence_label: 0 = IsNext, 1 = NotNext
        assert (label == 0) == ((d_b, s_b) == (d, s + 1))
        if label == 1:
            assert d_b != d


def test_nsp_labels_are_balanced_and_deterministic():
    """3,000 pairs: the IsNext count ~ Bin(3000, 1/2) (one check, false failures 5.7e-7). The same int
    seed, a random.Random with that seed, and two equally seeded torch.Generators each repeat the
    examples; another seed changes them (3,000 fair coin flips agree with probability 2^-3000)."""
    documents = [[[10 * d + s + 100] * 3 for s in range(7)] for d in range(500)]
    examples = data.nsp_pairs(documents, 8, cls_id=CLS, sep_id=SEP, generator=0)
    assert len(examples) == 3000
    assert (data.NSP_IS_NEXT, data.NSP_NOT_NEXT) == (0, 1)
    assert_binomial_rate(sum(label == 0 for _, _, label in examples), 3000, 0.5, "IsNext")
    assert data.nsp_pairs(documents, 8, cls_id=CLS, sep_id=SEP, generator=0) == examples
    assert data.nsp_pairs(documents, 8, cls_id=CLS, sep_id=SEP, generator=random.Random(0)) == examples
    from_torch = [data.nsp_pairs(documents, 8, cls_id=CLS, sep_id=SEP, generator=torch.Generator().manual_seed(4)) for _ in range(2)]
    assert from_torch[0] == from_torch[1]
    assert data.nsp_pairs(documents, 8, cls_id=CLS, sep_id=SEP, generator=1) != examples


def test_nsp_short_seq_prob_shortens_some_examples_within_bounds():
    """Segments of 40 tokens, max_length 20: without short sequences every example has 20 ids; with
    short_seq_prob = 1 every example has 3 + randint(2, 17) ids, so lengths lie in 5..20 and vary."""
    documents = [[[100 + 10 * d + s] * 40 for s in range(5)] for d in range(40)]
    plain = data.nsp_pairs(documents, 20, cls_id=CLS, sep_id=SEP, generator=0)
    assert {len(ids) for ids, _, _ in plain} == {20}
    short = data.nsp_pairs(documents, 20, cls_id=CLS, sep_id=SEP, generator=0, short_seq_prob=1.0)
    lengths = {len(ids) for ids, _, _ in short}
    assert min(lengths) >= 5 and max(lengths) <= 20 and len(lengths) > 5


def test_nsp_pairs_refuses_a_single_document_and_bad_arguments():
    with pytest.raises(ValueError, match="at least two non-empty documents"):
        data.nsp_pairs([[[5, 6], [7]]], 10, cls_id=CLS, sep_id=SEP)
    with pytest.raises(ValueError, match="at least two non-empty documents"):
        data.nsp_pairs([[[5, 6], [7]], []], 10, cls_id=CLS, sep_id=SEP)
    with pytest.raises(ValueError, match="max_length"):
        data.nsp_pairs([[[5], [6]], [[7]]], 2, cls_id=CLS, sep_id=SEP)
    with pytest.raises(ValueError, match="short_seq_prob"):
        data.nsp_pairs([[[5], [6]], [[7]]], 10, cls_id=CLS, sep_id=SEP, short_seq_prob=1.5)


# ---------------------------------------------------------------------------------------------
# Documents: SST-2 phrases and blank-line-separated text
# ---------------------------------------------------------------------------------------------

words = st.sampled_from(["a", "film", "good", "--", ",", "n't", "Bears"])
phrases = st.lists(st.lists(words, max_size=6), max_size=20).map(lambda rows: ["  ".join(row) + " " for row in rows])


@given(phrases=phrases, seed=st.integers(0, 1000), min_words=st.integers(2, 4))
def test_sst2_documents_cut_each_long_enough_phrase_into_two_halves(phrases, seed, min_words):
    """One document per phrase of at least min_words words, in order; two non-empty segments that
    re-join (single spaces) into the phrase; the same seed gives the same cuts."""
    documents = data.sst2_documents(phrases, seed=seed, min_words=min_words)
    kept = [phrase for phrase in phrases if len(phrase.split()) >= min_words]
    assert len(documents) == len(kept)
    for document, phrase in zip(documents, kept):
        assert len(document) == 2 and all(document)
        assert " ".join(document) == " ".join(phrase.split())
    assert data.sst2_documents(phrases, seed=seed, min_words=min_words) == documents


def test_sst2_cut_points_are_uniform_over_word_boundaries():
    """A 4-word phrase 6,000 times: each of the 3 cut points ~ Bin(6000, 1/3) (three checks, false
    failures <= 1.7e-6). min_words below 2 cannot make two segments and is refused."""
    documents = data.sst2_documents(["w x y z"] * 6000, seed=3)
    cuts = [len(first.split()) for first, _ in documents]
    for cut in (1, 2, 3):
        assert_binomial_rate(cuts.count(cut), 6000, 1 / 3, f"cut after word {cut}")
    with pytest.raises(ValueError, match="min_words"):
        data.sst2_documents(["a b"], min_words=1)


lines = st.text(alphabet="ab :,.", min_size=1, max_size=8).filter(str.strip)
blocks = st.lists(st.lists(lines, min_size=1, max_size=4), max_size=6)


@given(blocks=blocks, gap=st.sampled_from(["\n\n", "\n \n", "\n\n\n", "\r\n\r\n"]))
def test_text_documents_are_blocks_between_blank_lines(blocks, gap):
    newline = "\r\n" if "\r" in gap else "\n"
    text = gap.join(newline.join(block) for block in blocks)
    assert data.text_documents(text) == [[line.strip() for line in block] for block in blocks]


def test_tiny_shakespeare_documents_are_speeches():
    documents = data.text_documents(data.read_text_file(datasets.data_path("tinyshakespeare.txt")))
    assert documents[:2] == [["First Citizen:", "Before we proceed any further, hear me speak."], ["All:", "Speak, speak."]]
    assert all(document and all(segment == segment.strip() and segment for segment in document) for document in documents)


# ---------------------------------------------------------------------------------------------
# Reviews: sentences, documents, and segments packed to length
# ---------------------------------------------------------------------------------------------

sentence_pieces = st.lists(st.sampled_from(["The", "film", "was", "good.", "Mr.", "Smith", "J.", "R.", "vs.", "!", "?!",
                                            "(No.)", '"Yes."', "10", "stars.", "...", "a", "e.g.", "A.", "it's", "  ", "\t"]),
                           max_size=25)


@given(pieces=sentence_pieces, spaces=st.sampled_from([" ", "  ", "\n", " \t "]))
def test_split_sentences_cuts_only_at_whitespace_and_loses_nothing(pieces, spaces):
    text = spaces.join(pieces)
    sentences = data.split_sentences(text)
    assert " ".join(sentences) == " ".join(text.split())  # joined again: the text, whitespace runs collapsed
    assert all(sentence and sentence == " ".join(sentence.split()) for sentence in sentences)
    for left, right in zip(sentences, sentences[1:]):
        assert left[-1] in ".!?\"')]"  # every cut follows a sentence end ...
        assert right.lstrip("\"'([")[:1].isupper() or right.lstrip("\"'([")[:1].isdigit()  # ... before a capital or digit


@pytest.mark.parametrize("text, expected", [
    ("I loved it. The cast was great! Was it long? No.", ["I loved it.", "The cast was great!", "Was it long?", "No."]),
    ('He said "Go." Then he left.', ['He said "Go."', "Then he left."]),
    ("Mr. Smith met Dr. Jones vs. J. R. R. Tolkien. Fine.", ["Mr. Smith met Dr. Jones vs. J. R. R. Tolkien.", "Fine."]),
    ("Rated 8/10. 10 stars. and then lowercase. Wait...  What?", ["Rated 8/10.", "10 stars. and then lowercase.", "Wait...",
                                                                  "What?"]),
    ("  ", []),
])
def test_split_sentences_examples(text, expected):
    assert data.split_sentences(text) == expected


def test_review_documents_are_the_reviews_sentences_and_drop_empty_reviews():
    assert data.review_documents(["Good. Very good.", "   ", "Bad!"]) == [["Good.", "Very good."], ["Bad!"]]


@given(segments=st.lists(st.lists(st.integers(5, 30), max_size=9), max_size=12), max_tokens=st.integers(1, 12))
def test_pack_segments_fills_chunks_greedily_without_losing_or_reordering_tokens(segments, max_tokens):
    chunks = data.pack_segments(segments, max_tokens)
    assert [t for chunk in chunks for t in chunk] == [t for segment in segments for t in segment]
    length_at: dict[int, int] = {}  # where each non-empty segment starts -> its length
    position = 0
    for segment in segments:
        if segment:
            length_at[position] = len(segment)
        position += len(segment)
    position = 0
    for left, right in zip(chunks, chunks[1:] + [None]):
        assert position in length_at  # a chunk starts where a segment starts ...
        assert len(left) <= max_tokens or len(left) == length_at[position]  # ... and is short, or one long segment
        position += len(left)
        if right is not None:
            assert len(left) + length_at[position] > max_tokens  # greedy: the next segment did not fit
    with pytest.raises(ValueError, match="max_tokens"):
        data.pack_segments([[1]], 0)


def test_pack_segments_examples():
    assert data.pack_segments([[1, 2], [3], [4, 5, 6], [7]], 3) == [[1, 2, 3], [4, 5, 6], [7]]
    assert data.pack_segments([[1, 2, 3, 4, 5], [6], [7, 8]], 3) == [[1, 2, 3, 4, 5], [6, 7, 8]]  # too long: alone
    assert data.pack_segments([], 4) == [] and data.pack_segments([[], [1]], 4) == [[1]]


# ---------------------------------------------------------------------------------------------
# leak_free_split
# ---------------------------------------------------------------------------------------------

texts_strategy = st.lists(st.lists(st.sampled_from(["a", "A", "good", "goodness", "film", "bad"]), min_size=1, max_size=4)
                          .flatmap(lambda row: st.sampled_from([" ", "  ", "\t"]).map(lambda sep: sep.join(row))),
                          min_size=2, max_size=30)


def key(text: str) -> str:
    return " ".join(text.lower().split())


@given(texts=texts_strategy, val_fraction=st.floats(0.01, 0.99), seed=st.integers(0, 1000))
def test_leak_free_split_leaves_no_text_of_one_split_inside_a_text_of_the_other(texts, val_fraction, seed):
    """Against a brute-force reference of the documented procedure: pick round(n·f) (clipped to
    1..n-1) texts with random.Random(seed).sample, move every pick whose key occurs in an
    unpicked key to training, drop every training text that lies inside a validation text. Then
    no key of one split is a substring of a key of the other, both keep input order, and the same
    seed gives the same split."""
    train, val = datasets.leak_free_split(texts, val_fraction, seed=seed)
    n_val = min(max(round(len(texts) * val_fraction), 1), len(texts) - 1)
    picked = set(random.Random(seed).sample(range(len(texts)), n_val))
    unpicked_keys = [key(t) for i, t in enumerate(texts) if i not in picked]
    in_val = [i in picked and not any(key(t) in other for other in unpicked_keys) for i, t in enumerate(texts)]
    val_keys = [key(t) for t, v in zip(texts, in_val) if v]
    assert val == [t for t, v in zip(texts, in_val) if v]
    # training keeps the rest, except the pieces of validation texts
    assert train == [t for t, v in zip(texts, in_val) if not v and not any(key(t) in other for other in val_keys)]
    assert not any(key(v) in key(t) or key(t) in key(v) for v in val for t in train)  # no piece either way
    assert datasets.leak_free_split(texts, val_fraction, seed=seed) == (train, val)


def test_leak_free_split_moves_nested_phrases_and_refuses_bad_arguments():
    """One text of four is picked (0.25 · 4): a pick lying inside another text (all but "bad" and
    the longest, whatever the case and spacing) always ends up in training."""
    texts = ["A  good film", "good", "bad", "a GOOD film indeed"]
    vals = set()
    for seed in range(20):
        train, val = datasets.leak_free_split(texts, 0.25, seed=seed)
        assert len(val) <= 1 and set(train + val) <= set(texts)
        vals.update(val)
    assert vals == {"bad", "a GOOD film indeed"}  # 20 seeds pick each of the four with probability 1 - (3/4)^20 > 0.99
    with pytest.raises(ValueError, match="val_fraction"):
        datasets.leak_free_split(texts, 1.0)
    with pytest.raises(ValueError, match="cannot split"):
        datasets.leak_free_split(["only one"], 0.5)
