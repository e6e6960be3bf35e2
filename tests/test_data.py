"""minillm.data, minillm.tokenization and minillm.bow: reading, encoding and batching text."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, strategies as st

from minillm import MinillmError, bow, data
from minillm.tokenization import WordTokenizer


def test_read_sst2_returns_the_documented_splits():
    sentences, labels = data.read_sst2("dev")
    assert len(sentences) == len(labels) == 872
    assert sentences[0] == "it 's a charming and often affecting journey ."
    assert labels[0] == 1 and set(labels) == {0, 1}


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"),
    (b"\x00\x01\x02binary", "binary"),
    (b"text\tlabel\nhello\t1\n", "first line must be"),
    (b"sentence\tlabel\ngood movie\tpositive\n", "line 2"),
    (b"sentence\tlabel\n\xff\xfe\n", "not UTF-8"),
])
def test_read_sst2_rejects_bad_files_with_one_sentence(tmp_path, content, message):
    path = tmp_path / "bad.tsv"
    path.write_bytes(content)
    with pytest.raises(MinillmError, match=message):
        data.read_sst2(path=path)


def test_missing_files_and_splits_are_clear_errors(tmp_path):
    with pytest.raises(MinillmError, match="does not exist"):
        data.read_text_file(tmp_path / "nope.txt")
    with pytest.raises(MinillmError, match="unknown SST-2 split"):
        data.read_sst2("test")


def test_data_dir_can_be_moved_by_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(data.DATA_ENV, str(tmp_path))
    with pytest.raises(MinillmError, match="missing"):
        data.data_path("sst2", "dev.tsv")


def test_word_tokenizer_keeps_the_most_frequent_words_and_maps_the_rest_to_unk():
    tokenizer = WordTokenizer.train(["a good movie", "a bad movie", "A GOOD plot"], max_words=3)
    assert tokenizer.id_to_word == ["[UNK]", "a", "good", "movie"]
    assert tokenizer.encode("A good film") == [1, 2, 0]
    assert tokenizer.decode(tokenizer.encode("a good movie")) == "a good movie"


sentences_strategy = st.lists(st.lists(st.sampled_from(["good", "bad", "movie", "plot", "rare"]), min_size=0, max_size=6)
                              .map(" ".join), min_size=1, max_size=8)


@given(sentences=sentences_strategy, seed=st.integers(0, 1000))
def test_bag_of_words_logits_equal_the_mean_embedding_formula(sentences, seed):
    """fastText's formula written out in float64 against the EmbeddingBag model."""
    tokenizer = WordTokenizer.train(["good bad movie plot"])
    bags = bow.encode_bags(tokenizer, sentences, [0] * len(sentences))
    torch.manual_seed(seed)
    model = bow.BagOfWordsClassifier(len(tokenizer), embed_dim=4).double()
    logits = model(bags.ids, bags.offsets)
    for row, sentence in enumerate(sentences):
        ids = tokenizer.encode(sentence) or [0]
        mean_vector = model.embedding.weight[ids].mean(dim=0)
        expected = model.classifier.weight @ mean_vector + model.classifier.bias
        torch.testing.assert_close(logits[row], expected, rtol=1e-12, atol=1e-12)


@given(sentences=sentences_strategy, data_=st.data())
def test_batch_of_selects_exactly_the_chosen_sentences(sentences, data_):
    tokenizer = WordTokenizer.train(["good bad movie plot"])
    labels = list(range(len(sentences)))
    bags = bow.encode_bags(tokenizer, sentences, labels)
    indices = data_.draw(st.lists(st.integers(0, len(sentences) - 1), min_size=1, max_size=len(sentences)))
    batch = bow.batch_of(bags, torch.tensor(indices))
    expected = bow.encode_bags(tokenizer, [sentences[i] for i in indices], [labels[i] for i in indices])
    assert torch.equal(batch.ids, expected.ids) and torch.equal(batch.offsets, expected.offsets)
    assert torch.equal(batch.labels, expected.labels)


def test_bag_of_words_training_learns_a_separable_toy_problem():
    sentences = ["good great fine", "great good", "bad awful", "awful bad poor", "fine good", "poor bad"] * 20
    labels = [1, 1, 0, 0, 1, 0] * 20
    tokenizer = WordTokenizer.train(sentences)
    bags = bow.encode_bags(tokenizer, sentences, labels)
    torch.manual_seed(0)
    model = bow.BagOfWordsClassifier(len(tokenizer), embed_dim=8)
    history = bow.train(model, torch.optim.Adam(model.parameters(), lr=0.05), bags, bags, steps=60, batch_size=16, eval_every=20)
    assert history.dev_accuracy[-1] == 1.0 and history.train_loss[-1] < history.train_loss[0]


def write_imdb(root, reviews):
    """A tiny aclImdb folder: ``reviews`` maps 'train/pos' etc. to {file name: text}."""
    for folder, files in reviews.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (root / folder / name).write_text(text, encoding="utf-8")
    return root


def test_read_imdb_reads_positives_then_negatives_sorted_by_file_name(tmp_path):
    root = write_imdb(tmp_path / "aclImdb", {
        "train/pos": {"1_9.txt": "Loved it.<br /><br />Would watch again.", "0_10.txt": "Un film épatant ✓"},
        "train/neg": {"3_1.txt": "Dull.<br/>Too long.<BR>", "2_2.txt": "Bad plot."},
        "train/unsup": {"0_0.txt": "not read"},
        "test/pos": {"0_8.txt": "Fine."},
        "test/neg": {"0_3.txt": "Meh."},
    })
    texts, labels = data.read_imdb(root, "train")
    assert texts == ["Un film épatant ✓", "Loved it.  Would watch again.", "Bad plot.", "Dull. Too long."]
    assert labels == [1, 1, 0, 0]
    assert data.read_imdb(root, "test") == (["Fine.", "Meh."], [1, 0])
    assert data.read_imdb(str(root)) == (texts, labels)  # a string path, the default split is train


@pytest.mark.parametrize("layout, split, message", [
    ({}, "train", "does not exist: download and unpack aclImdb from https://ai.stanford.edu/~amaas/data/sentiment/"),
    ({"train/neg": {"0_1.txt": "bad"}}, "train", "pos is missing: .* is not an unpacked aclImdb folder"),
    ({"train/pos": {"0_9.txt": "good"}, "train/neg": {}}, "train", "neg holds no .txt reviews"),
    ({"train/pos": {"0_9.txt": "good"}, "train/neg": {"0_1.txt": "bad"}}, "test", "test.pos is missing"),
    ({"train/pos": {"0_9.txt": "good"}, "train/neg": {"0_1.txt": "bad"}}, "unsup", "unknown IMDB split 'unsup'"),
])
def test_read_imdb_explains_the_expected_layout_when_it_is_not_there(tmp_path, layout, split, message):
    root = tmp_path / "aclImdb"
    write_imdb(root, layout)  # an empty layout leaves no folder at all
    with pytest.raises(MinillmError, match=message):
        data.read_imdb(root, split)
