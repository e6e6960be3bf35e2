"""minillm.datasets: the shipped data sets' readers, their splits, and the pretraining text's leak check."""

from __future__ import annotations

import gzip

import pytest
from hypothesis import given
from hypothesis import strategies as st

from minillm import MinillmError, datasets

# ---------------------------------------------------------------------------------------------
# SST-2
# ---------------------------------------------------------------------------------------------


def test_read_sst2_returns_the_documented_splits():
    sentences, labels = datasets.read_sst2("dev")
    assert len(sentences) == len(labels) == 872
    assert sentences[0] == "it 's a charming and often affecting journey ."
    assert labels[0] == 1 and set(labels) == {0, 1}


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"),
    (b"\x00\x01\x02binary", "binary"),
    (b"text\tlabel\nhello\t1\n", "first line must be"),
    (b"sentence\tlabel\ngood movie\tpositive\n", "line 2"),
    (b"sentence\tlabel\n\xff\xfe\n", "not UTF-8"),
    (b"sentence\tlabel\n\n", "no examples"),
])
def test_read_sst2_rejects_bad_files_with_one_sentence(tmp_path, content, message):
    path = tmp_path / "bad.tsv"
    path.write_bytes(content)
    with pytest.raises(MinillmError, match=message):
        datasets.read_sst2(path=path)


def test_missing_files_and_splits_are_clear_errors(tmp_path):
    with pytest.raises(MinillmError, match="does not exist"):
        datasets.read_text_file(tmp_path / "nope.txt")
    with pytest.raises(MinillmError, match="unknown SST-2 split"):
        datasets.read_sst2("test")
    with pytest.raises(MinillmError, match="unknown IMDB split 'unsup'.*read_imdb_unlabelled"):
        datasets.read_imdb("unsup")


def test_data_dir_can_be_moved_by_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(datasets.DATA_ENV, str(tmp_path))
    with pytest.raises(MinillmError, match="missing"):
        datasets.data_path("sst2", "dev.tsv")


# ---------------------------------------------------------------------------------------------
# IMDB: the shipped files (the checksums are test_data_files.py's) and an aclImdb folder
# ---------------------------------------------------------------------------------------------


def test_shipped_imdb_splits_have_the_documented_sizes_balance_and_order():
    for split in ("train", "test"):
        texts, labels = datasets.read_imdb(split)
        assert len(texts) == len(labels) == datasets.IMDB_SPLIT_SIZE
        assert labels == [0] * 12_500 + [1] * 12_500  # negatives first, then positives
        assert all(text == datasets.clean_review(text) for text in texts[::500])  # already cleaned: no <br />
    assert len(datasets.read_imdb_unlabelled()) == datasets.IMDB_UNLABELLED_SIZE


def test_pretraining_reviews_hold_no_test_review():
    test_texts = datasets.read_imdb("test")[0]
    reviews = datasets.pretraining_reviews(test_texts)
    test_keys = {datasets.review_key(text) for text in test_texts}
    assert not any(datasets.review_key(review) in test_keys for review in reviews)
    # as released, 269 test reviews also occur among the unlabelled ones (one of them twice): 270 go
    assert len(reviews) == datasets.IMDB_UNLABELLED_SIZE - 270


def test_pretraining_reviews_drop_copies_that_differ_only_in_case_spacing_and_punctuation(tmp_path):
    path = tmp_path / "unsup.txt.gz"
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write("A fine film.\nGreat  movie, GREAT cast!\nAwful.\n")
    assert datasets.pretraining_reviews(["great movie great cast"], path=path) == ["A fine film.", "Awful."]
    assert datasets.pretraining_reviews(["great movie great cast"], path=path, limit=1) == ["A fine film."]


def write_tsv_gz(path, text: str) -> None:
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write(text)


@pytest.mark.parametrize("content, message", [
    ("sentence\tlabel\nok\t1\n", "first line must be 'text<TAB>label<TAB>rating<TAB>id'"),
    ("text\tlabel\trating\tid\nGreat.\tpositive\t9\t0\n", "line 2: expected"),
    ("text\tlabel\trating\tid\n", "no reviews"),
])
def test_read_imdb_rejects_bad_files_with_one_sentence(tmp_path, content, message):
    path = tmp_path / "bad.tsv.gz"
    write_tsv_gz(path, content)
    with pytest.raises(MinillmError, match=message):
        datasets.read_imdb(path=path)
    (tmp_path / "plain.tsv.gz").write_text("not gzip")
    with pytest.raises(MinillmError, match="not a readable gzip file"):
        datasets.read_imdb(path=tmp_path / "plain.tsv.gz")


def write_aclimdb(root, reviews):
    """A tiny aclImdb folder: ``reviews`` maps 'train/pos' etc. to {file name: text}."""
    for folder, files in reviews.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (root / folder / name).write_text(text, encoding="utf-8")
    return root


def test_read_aclimdb_folder_reads_negatives_then_positives_in_id_order_cleaned_as_shipped(tmp_path):
    root = write_aclimdb(tmp_path / "aclImdb", {
        "train/pos": {"10_9.txt": "Loved it.<br /><br />Would watch again.", "2_10.txt": "Un film épatant ✓"},
        "train/neg": {"3_1.txt": "Dull.<br/>Too long.<BR>", "12_2.txt": "Bad   plot."},
        "train/unsup": {"0_0.txt": "not read"},
        "test/pos": {"0_8.txt": "Fine."},
        "test/neg": {"0_3.txt": "Meh."},
    })
    texts, labels = datasets.read_aclimdb_folder(root, "train")
    assert texts == ["Dull. Too long.", "Bad plot.", "Un film épatant ✓", "Loved it. Would watch again."]  # ids 3, 12; 2, 10
    assert labels == [0, 0, 1, 1]
    assert datasets.read_aclimdb_folder(root, "test") == (["Meh.", "Fine."], [0, 1])
    assert datasets.read_aclimdb_folder(str(root)) == (texts, labels)  # a string path, the default split is train
    splits = datasets.imdb_splits(0.5, seed=0, folder=root)
    assert sorted(splits.train + splits.val) == sorted(zip(texts, labels)) and splits.test == [("Meh.", 0), ("Fine.", 1)]


@pytest.mark.parametrize("layout, split, message", [
    ({}, "train", "does not exist: download and unpack aclImdb from https://ai.stanford.edu/~amaas/data/sentiment/"),
    ({"train/neg": {"0_1.txt": "bad"}}, "train", "pos is missing: .* is not an unpacked aclImdb folder"),
    ({"train/pos": {"0_9.txt": "good"}, "train/neg": {}}, "train", "neg holds no .txt reviews"),
    ({"train/pos": {"0_9.txt": "good"}, "train/neg": {"0_1.txt": "bad"}}, "test", "test.neg is missing"),
    ({"train/pos": {"0_9.txt": "good"}, "train/neg": {"0_1.txt": "bad"}}, "unsup", "unknown IMDB split 'unsup'"),
])
def test_read_aclimdb_folder_explains_the_expected_layout_when_it_is_not_there(tmp_path, layout, split, message):
    root = tmp_path / "aclImdb"
    write_aclimdb(root, layout)  # an empty layout leaves no folder at all
    with pytest.raises(MinillmError, match=message):
        datasets.read_aclimdb_folder(root, split)


# ---------------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------------


@given(labels=st.lists(st.integers(0, 2), min_size=1, max_size=60), fraction=st.floats(0.0, 1.0), seed=st.integers(0, 99))
def test_stratified_subset_keeps_each_labels_share_and_the_order(labels, fraction, seed):
    examples = [(f"text {i}", label) for i, label in enumerate(labels)]
    n = round(fraction * len(examples))
    subset = datasets.stratified_subset(examples, n, seed)
    assert len(subset) == min(n, len(examples))
    assert subset == sorted(subset, key=examples.index)  # a subsequence, in order
    assert len(set(subset)) == len(subset)
    for label in set(labels):
        share = labels.count(label) / len(labels)
        assert abs(sum(1 for _, y in subset if y == label) - share * len(subset)) <= 1 + 0.5 * len(set(labels))
    assert datasets.stratified_subset(examples, n, seed) == subset  # the seed fixes it


def test_with_labelled_takes_a_seeded_stratified_sample_and_keeps_the_other_splits():
    whole = datasets.sst2_splits(0.1, seed=3, limit=3000)
    few = datasets.with_labelled(whole, 200, seed=3)
    assert len(few.train) == 200 and set(few.train) <= set(whole.train)
    assert few.val == whole.val and few.test == whole.test
    share = sum(label for _, label in whole.train) / len(whole.train)
    assert abs(sum(label for _, label in few.train) - 200 * share) <= 1  # stratified: the positive share kept
    assert datasets.with_labelled(whole, 200, seed=3).train == few.train  # the seed fixes the sample
    assert datasets.with_labelled(whole, 200, seed=4).train != few.train
    assert datasets.with_labelled(whole, 10**6, seed=3).train == whole.train  # more than there are: all
    assert datasets.with_labelled(whole, 0, seed=3).train == whole.train  # 0: all


def test_imdb_splits_hold_out_a_slice_of_train_and_score_on_a_fixed_stratified_test_subset():
    splits = datasets.imdb_splits(0.1, seed=1, test_limit=1000)
    assert 2_450 <= len(splits.val) <= 2_500 and len(splits.train) + len(splits.val) == 25_000
    assert not {datasets.review_key(t) for t, _ in splits.val} & {datasets.review_key(t) for t, _ in splits.train}
    assert len(splits.test) == 1000 and sum(label for _, label in splits.test) == 500
    assert splits.name == "IMDB test (1,000 of 25,000, stratified)"
    assert datasets.imdb_splits(0.1, seed=2, test_limit=1000).test == splits.test  # the same subset for every run seed


def test_sst2_sentences_are_whole_training_sentences_that_share_no_text_with_dev():
    """The SimCSE corpus (chapter 10): phrases inside no other phrase, none inside or around a dev sentence."""
    train, dev = datasets.sst2_sentences(limit=3000)
    phrases = [" ".join(p.lower().split()) for p in datasets.read_sst2("train")[0][:3000]]
    keys = [" ".join(text.lower().split()) for text, _ in train]
    assert len(dev) == 872 and 0 < len(train) < 3000 and len(set(keys)) == len(keys)
    padded = [f" {p} " for p in phrases]
    assert not any(f" {key} " in other and f" {key} " != other for key in keys[:200] for other in padded)
    dev_keys = [f" {' '.join(text.lower().split())} " for text, _ in dev]
    assert not any(f" {key} " in d or d in f" {key} " for key in keys for d in dev_keys)


def test_text_splits_cut_tiny_shakespeare_where_nanogpt_does():
    """nanoGPT's prepare.py: ``n = len(data); train = data[:int(n*0.9)]; val = data[int(n*0.9):]``."""
    text = datasets.tiny_shakespeare_path().read_text(encoding="utf-8")
    train_text, val_text = datasets.text_splits(datasets.tiny_shakespeare_path())
    assert len(text) == 1_115_394
    assert train_text == text[: int(len(text) * 0.9)] and val_text == text[int(len(text) * 0.9):]
    assert len(train_text) == 1_003_854


@pytest.mark.parametrize("val_fraction", [0.0, 1.0, -0.1])
def test_text_splits_refuse_a_fraction_outside_zero_to_one(tmp_path, val_fraction):
    (tmp_path / "t.txt").write_text("some text\n")
    with pytest.raises(ValueError, match="between 0 and 1"):
        datasets.text_splits(tmp_path / "t.txt", val_fraction)
