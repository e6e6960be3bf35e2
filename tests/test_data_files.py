"""The shipped data sets are the ones data/README.md describes, byte for byte."""

import hashlib
import re

import pytest
from conftest import REPO_ROOT

DATA = REPO_ROOT / "data"
EXPECTED_FILES = {"tinyshakespeare.txt", "sst2/train.tsv", "sst2/dev.tsv", "imdb/unsup.txt.gz", "imdb/train.tsv.gz",
                  "imdb/test.tsv.gz", "pretrained/bert-mini-imdb/model.safetensors",
                  "pretrained/bert-mini-imdb/tokenizer.json", "pretrained/bert-mini-imdb/config.json"}


def readme_checksums() -> dict[str, str]:
    """The ``file: sha256`` lines of data/README.md."""
    text = (DATA / "README.md").read_text(encoding="utf-8")
    return dict(re.findall(r"^- `?([\w./-]+)`?: ([0-9a-f]{64})$", text, flags=re.MULTILINE))


def test_readme_lists_a_checksum_for_every_shipped_data_set():
    assert set(readme_checksums()) == EXPECTED_FILES


@pytest.mark.parametrize("name", sorted(EXPECTED_FILES))
def test_data_file_matches_its_readme_sha256(name):
    digest = hashlib.sha256((DATA / name).read_bytes()).hexdigest()
    assert digest == readme_checksums()[name]


def test_sst2_splits_have_the_documented_sizes_and_header():
    for split, rows in (("train", 67_349), ("dev", 872)):
        lines = (DATA / "sst2" / f"{split}.tsv").read_text(encoding="utf-8").splitlines()
        assert lines[0] == "sentence\tlabel"
        assert len(lines) - 1 == rows
        assert {line.rsplit("\t", 1)[1] for line in lines[1:]} == {"0", "1"}


def test_shipped_bert_fills_in_movie_review_words():
    """The shipped BERT is a model that learned the reviews, not just its file's bytes: for blanks whose answer
    any reader of reviews knows, the right word is among its five most probable."""
    from minillm import datasets
    from minillm.bert_pretraining import fill_in
    from minillm.runs import load_run

    model, tokenizer, _ = load_run(datasets.shipped_bert_path())
    model.eval()
    for sentence, word in (("the worst film i have ever [MASK] .", "seen"), ("i [MASK] this movie .", "love"),
                           ("this movie was [MASK] good .", "very")):
        assert word in [token for token, _ in fill_in(model, tokenizer, sentence)], sentence
