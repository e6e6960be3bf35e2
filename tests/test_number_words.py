"""The number-words task: words are right (checked by an independent parser), splits are disjoint and seeded."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from minillm.number_words import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    UNK_ID,
    Vocabulary,
    detokenize,
    evaluate,
    label_smoothing_floor,
    make_batch,
    number_dataset,
    number_to_words,
    train_seq2seq,
)
from minillm.transformer import Transformer, TransformerConfig

SMALL = {w: i for i, w in enumerate("zero one two three four five six seven eight nine ten eleven twelve thirteen "
                                     "fourteen fifteen sixteen seventeen eighteen nineteen".split())}
SMALL |= {w: 10 * i for i, w in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split(), start=2)}
SCALE = {"thousand": 10**3, "million": 10**6, "billion": 10**9}


def parse_words(words: list[str]) -> int:
    """An independent reading of English number words: accumulate a group below 1000, multiply it
    by each scale word, add the groups."""
    total = group = 0
    for word in words:
        if word == "-":
            continue
        if word in SMALL:
            group += SMALL[word]
        elif word == "hundred":
            group *= 100
        else:
            total, group = total + group * SCALE[word], 0
    return total + group


@pytest.mark.parametrize("n, text", [
    (0, "zero"), (7, "seven"), (13, "thirteen"), (20, "twenty"), (42, "forty - two"), (100, "one hundred"),
    (105, "one hundred five"), (999, "nine hundred ninety - nine"), (1000, "one thousand"), (1005, "one thousand five"),
    (21_000, "twenty - one thousand"), (100_010, "one hundred thousand ten"), (1_000_000, "one million"),
    (1_234_567, "one million two hundred thirty - four thousand five hundred sixty - seven"),
])
def test_number_to_words_examples(n, text):
    assert " ".join(number_to_words(n)) == text


@given(n=st.integers(0, 10**12 - 1))
def test_number_words_read_back_to_the_number(n):
    words = number_to_words(n)
    assert parse_words(words) == n
    assert "zero" not in words or n == 0


def test_detokenize_joins_digits_and_hyphenated_words():
    assert detokenize(["3", "4", "2"]) == "342"
    assert detokenize(number_to_words(342_005)) == "three hundred forty-two thousand five"


def test_number_to_words_refuses_what_it_cannot_say():
    for n in (-1, 10**12):
        with pytest.raises(ValueError, match="covers"):
            number_to_words(n)


def test_splits_are_disjoint_seeded_and_cover_every_length():
    splits = number_dataset(500, 50, 100, max_digits=5, seed=3)
    train, val, test = (set(splits.numbers[k]) for k in ("train", "val", "test"))
    assert len(train) == 500 and len(val) == 50 and len(test) == 100
    assert not (train & val) and not (train & test) and not (val & test)
    assert {len(str(n)) for n in train} == {1, 2, 3, 4, 5} == {len(str(n)) for n in test}
    assert sum(n < 10 for n in val | test) == 2  # held out: at most 20% of each length
    again = number_dataset(500, 50, 100, max_digits=5, seed=3)
    assert again.train == splits.train and again.test == splits.test
    bigger = number_dataset(900, 50, 100, max_digits=5, seed=3)
    assert bigger.test == splits.test  # held-out numbers do not depend on the training-set size
    assert splits.train[0] == (number_to_words(splits.numbers["train"][0]), list(str(splits.numbers["train"][0])))
    reverse = number_dataset(500, 50, 100, max_digits=5, seed=3, direction="digits2words")
    assert reverse.train[0] == splits.train[0][::-1]
    with pytest.raises(ValueError, match="cannot draw"):
        number_dataset(101, 0, 0, max_digits=2)
    with pytest.raises(ValueError, match="direction"):
        number_dataset(10, 1, 1, direction="sideways")


def test_vocabulary_and_batches_follow_the_teacher_forcing_layout():
    vocab = Vocabulary(["a", "b", "a"])
    assert vocab.tokens == ["[PAD]", "[BOS]", "[EOS]", "[UNK]", "a", "b"]
    assert vocab.encode(["b", "z"]) == [5, UNK_ID] and vocab.decode([4, 5]) == ["a", "b"]
    src, tgt_in, tgt_out = make_batch([(["a"], ["b", "a"]), (["a", "b"], ["b"])], vocab, vocab)
    assert src.tolist() == [[4, PAD_ID], [4, 5]]
    assert tgt_in.tolist() == [[BOS_ID, 5, 4], [BOS_ID, 5, EOS_ID]]
    assert tgt_out.tolist() == [[5, 4, EOS_ID], [5, EOS_ID, PAD_ID]]  # tgt_in shifted left by one


def test_training_lowers_the_loss_and_evaluation_scores_the_decoded_outputs():
    torch.manual_seed(0)
    splits = number_dataset(300, 20, 20, max_digits=3, seed=0)
    src_vocab = Vocabulary.from_sequences(s for s, _ in splits.train)
    tgt_vocab = Vocabulary.from_sequences(t for _, t in splits.train)
    model = Transformer(TransformerConfig(len(src_vocab), len(tgt_vocab), d_model=32, n_heads=2, n_encoder_layers=1,
                                          n_decoder_layers=1, d_ff=64, dropout=0.0, max_len=16))
    history = train_seq2seq(model, splits.train, splits.val, src_vocab, tgt_vocab, steps=80, batch_size=32, lr=3e-3,
                            warmup_steps=10, eval_every=40, progress=False)
    assert history.val_steps == [39, 79] and history.val_loss[-1] < history.val_loss[0]
    assert sum(history.train_loss[-10:]) < 0.5 * sum(history.train_loss[:10])
    result = evaluate(model, splits.test, src_vocab, tgt_vocab, beam_size=2)
    references = [t for _, t in splits.test]
    assert result.exact_match == sum(p == r for p, r in zip(result.predictions, references)) / len(references)
    assert 0.0 <= result.bleu <= 100.0


def test_label_smoothing_floor_is_the_loss_of_predicting_the_smoothed_target_itself():
    vocab, smoothing = 14, 0.1
    target = torch.full((vocab,), smoothing / vocab)
    target[3] += 1 - smoothing
    loss = F.cross_entropy(target.log()[None], torch.tensor([3]), label_smoothing=smoothing)
    assert label_smoothing_floor(smoothing, vocab) == pytest.approx(loss.item(), rel=1e-6)
    assert label_smoothing_floor(0.0, vocab) == 0.0
