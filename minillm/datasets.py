"""The shipped data sets in one place: where they are, their readers, their splits, and one leak check.

``data/`` (next to this package; ``MINILLM_DATA_DIR`` points elsewhere) holds, with sources,
licences and checksums in data/README.md:

- Tiny Shakespeare (``tinyshakespeare.txt``): chapters 03 and 06 read it as one text, split 90/10
  (:func:`text_splits`, nanoGPT's split, so that numbers compare);
- GLUE SST-2 (``sst2/train.tsv``, ``sst2/dev.tsv``): 67,349 labelled phrases and the 872 dev
  sentences every SST-2 result is reported on (:func:`read_sst2`, :func:`sst2_splits`);
- IMDB, the Large Movie Review Dataset (Maas et al., 2011; ``imdb/*.gz``): 50,000 unlabelled
  reviews (:func:`read_imdb_unlabelled`, what chapter 07 pretrains on) and the labelled
  25,000-review train and test splits (:func:`read_imdb`, :func:`imdb_splits`). An unpacked
  ``aclImdb`` folder as downloaded from the web reads the same (:func:`read_aclimdb_folder`).

:func:`pretraining_reviews` is the unlabelled reviews minus every review that also occurs in the
IMDB test split (269 of them do, as released): nothing a model is scored on is in its pretraining
text. :func:`leak_free_split` is the leak check of the SST-2 splits: no held-out phrase is part of a training
phrase, nor the other way round. Every reading error is a :class:`minillm.MinillmError` with one sentence
naming the file.
"""

from __future__ import annotations

import collections
import gzip
import os
import pathlib
import random
import re
from dataclasses import dataclass, replace
from typing import Sequence

from minillm import MinillmError
from minillm.data import HTML_LINE_BREAK, read_text_file

DATA_ENV = "MINILLM_DATA_DIR"

IMDB_URL = "https://ai.stanford.edu/~amaas/data/sentiment/"
IMDB_LAYOUT = "<root>/<split>/pos/*.txt and <root>/<split>/neg/*.txt, one review per file, as in aclImdb_v1.tar.gz"
IMDB_SPLIT_SIZE = 25_000
IMDB_UNLABELLED_SIZE = 50_000


def data_dir() -> pathlib.Path:
    """The folder with the shipped data sets: ``$MINILLM_DATA_DIR`` or the repository's ``data/``."""
    override = os.environ.get(DATA_ENV)
    return pathlib.Path(override) if override else pathlib.Path(__file__).resolve().parent.parent / "data"


def data_path(*parts: str) -> pathlib.Path:
    """The path of a shipped file, e.g. ``data_path("sst2", "dev.tsv")``; an error if it is missing."""
    path = data_dir().joinpath(*parts)
    if not path.exists():
        raise MinillmError(f"data file {path} is missing: the repository's data/ folder should hold it (see data/README.md)")
    return path


SHIPPED_BERT = ("pretrained", "bert-mini-imdb")
"""Where ``data/`` holds the BERT minillm pretrained for longer on the unlabelled reviews (a run folder:
config.json, tokenizer.json, model.safetensors, log.jsonl; data/README.md says how it was made)."""


def shipped_bert_path() -> pathlib.Path:
    """The run folder of the shipped, longer-pretrained BERT (:data:`SHIPPED_BERT`); an error if it is missing."""
    return data_path(*SHIPPED_BERT)


# ---------------------------------------------------------------------------------------------
# Tiny Shakespeare (or any text file a language model trains on)
# ---------------------------------------------------------------------------------------------

TINY_SHAKESPEARE = "tinyshakespeare.txt"


def tiny_shakespeare_path() -> pathlib.Path:
    """The shipped Tiny Shakespeare (Karpathy's char-rnn corpus, 1,115,394 characters)."""
    return data_path(TINY_SHAKESPEARE)


def text_splits(path: str | os.PathLike, val_fraction: float = 0.1) -> tuple[str, str]:
    """A text file as ``(train_text, val_text)``: the first ``1 - val_fraction`` of its characters train, the
    rest validates. For Tiny Shakespeare and ``val_fraction=0.1`` this is nanoGPT's split, so validation
    losses compare with its published ones. A cut in the text, not a shuffle: the held-out part is later
    scenes, never lines interleaved with the training ones."""
    return split_text(read_text_file(path), val_fraction)


def split_text(text: str, val_fraction: float = 0.1) -> tuple[str, str]:
    """``(text[:n], text[n:])`` with ``n = int(len(text) * (1 - val_fraction))``: :func:`text_splits` of a text."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    n_train = int(len(text) * (1.0 - val_fraction))
    return text[:n_train], text[n_train:]


# ---------------------------------------------------------------------------------------------
# SST-2
# ---------------------------------------------------------------------------------------------


def read_sst2(split: str = "train", path: str | os.PathLike | None = None) -> tuple[list[str], list[int]]:
    """Read a GLUE SST-2 split: ``(sentences, labels)`` with label 1 = positive, 0 = negative.

    ``split`` is ``"train"`` (67,349 phrases) or ``"dev"`` (872 sentences); ``path`` reads
    another file in the same format (a ``sentence<TAB>label`` header, one example per line).
    """
    if path is None:
        if split not in ("train", "dev"):
            raise MinillmError(f"unknown SST-2 split {split!r}: use 'train' or 'dev'")
        path = data_path("sst2", f"{split}.tsv")
    lines = read_text_file(path).splitlines()
    if not lines or lines[0].strip().split("\t") != ["sentence", "label"]:
        raise MinillmError(f"{path} is not an SST-2 file: its first line must be 'sentence<TAB>label'")
    sentences, labels = [], []
    for line_number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        sentence, _, label = line.rpartition("\t")
        if label.strip() not in ("0", "1") or not sentence:
            raise MinillmError(f"{path}, line {line_number}: expected 'sentence<TAB>0 or 1', got {line[:60]!r}")
        sentences.append(sentence.strip())
        labels.append(int(label))
    if not sentences:
        raise MinillmError(f"{path} has a header but no examples")
    return sentences, labels


# ---------------------------------------------------------------------------------------------
# IMDB (Maas et al., 2011)
# ---------------------------------------------------------------------------------------------


def clean_review(text: str) -> str:
    """A review as the shipped files hold it: each HTML line break (``<br />``, ``<br/>``, ``<br>``) a
    space, whitespace runs collapsed to one space, stripped."""
    return " ".join(HTML_LINE_BREAK.sub(" ", text).split())


def _read_gzip_text(path: pathlib.Path) -> str:
    try:
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            return handle.read()
    except (OSError, EOFError, UnicodeDecodeError) as error:
        raise MinillmError(f"{path} is not a readable gzip file of UTF-8 text ({error})") from None


def read_imdb(split: str = "train", path: str | os.PathLike | None = None) -> tuple[list[str], list[int]]:
    """A labelled IMDB split as shipped: ``(texts, labels)``, label 1 = positive (rating 7-10), 0 = negative (1-4).

    ``split`` is ``"train"`` or ``"test"`` (25,000 reviews each, 12,500 per class, negatives first,
    each class in the data set's id order); ``path`` reads another file in the same format (gzip,
    header ``text<TAB>label<TAB>rating<TAB>id``; see data/README.md).
    """
    if path is None:
        if split not in ("train", "test"):
            raise MinillmError(f"unknown IMDB split {split!r}: use 'train' or 'test' (the unlabelled reviews: "
                               "read_imdb_unlabelled)")
        path = data_path("imdb", f"{split}.tsv.gz")
    path = pathlib.Path(path)
    lines = _read_gzip_text(path).split("\n")
    if lines[0].split("\t") != ["text", "label", "rating", "id"]:
        raise MinillmError(f"{path} is not an IMDB split: its first line must be 'text<TAB>label<TAB>rating<TAB>id'")
    texts, labels = [], []
    for line_number, line in enumerate(lines[1:], start=2):
        if not line:
            continue
        fields = line.split("\t")
        if len(fields) != 4 or fields[1] not in ("0", "1") or not fields[0]:
            raise MinillmError(f"{path}, line {line_number}: expected 'text<TAB>0 or 1<TAB>rating<TAB>id', got {line[:60]!r}")
        texts.append(fields[0])
        labels.append(int(fields[1]))
    if not texts:
        raise MinillmError(f"{path} has a header but no reviews")
    return texts, labels


def read_imdb_unlabelled(path: str | os.PathLike | None = None) -> list[str]:
    """The 50,000 unlabelled IMDB reviews (``imdb/unsup.txt.gz``: one review per line, in the data set's
    id order), 11.6 million words of movie-review English with no labels: pretraining text."""
    path = pathlib.Path(path) if path is not None else data_path("imdb", "unsup.txt.gz")
    reviews = [line for line in _read_gzip_text(path).split("\n") if line.strip()]
    if not reviews:
        raise MinillmError(f"{path} holds no reviews")
    return reviews


def read_aclimdb_folder(root: str | os.PathLike, split: str = "train") -> tuple[list[str], list[int]]:
    """A split of an unpacked ``aclImdb`` folder as downloaded from the web: ``(texts, labels)``, 1 = positive.

    ``root`` is the folder from ``aclImdb_v1.tar.gz`` (https://ai.stanford.edu/~amaas/data/sentiment/;
    minillm ships the same reviews in ``data/imdb``, so this is only for a copy of your own). Reviews
    are read from ``root/<split>/neg/<id>_<rating>.txt`` (label 0), then ``pos`` (label 1), each
    folder in id order, and cleaned by :func:`clean_review`: the same texts and order as
    :func:`read_imdb`. ``split`` is ``"train"`` or ``"test"``.
    """
    if split not in ("train", "test"):
        raise MinillmError(f"unknown IMDB split {split!r}: use 'train' or 'test'")
    root = pathlib.Path(root)
    if not root.is_dir():
        raise MinillmError(f"IMDB folder {root} does not exist: download and unpack aclImdb from {IMDB_URL} "
                           f"(expected layout: {IMDB_LAYOUT})")
    texts, labels = [], []
    for folder_name, label in (("neg", 0), ("pos", 1)):
        folder = root / split / folder_name
        if not folder.is_dir():
            raise MinillmError(f"{folder} is missing: {root} is not an unpacked aclImdb folder (expected layout: {IMDB_LAYOUT})")
        files = sorted(folder.glob("*.txt"), key=_review_id)
        if not files:
            raise MinillmError(f"{folder} holds no .txt reviews (expected layout: {IMDB_LAYOUT})")
        for file in files:
            texts.append(clean_review(read_text_file(file)))
            labels.append(label)
    return texts, labels


def _review_id(path: pathlib.Path) -> tuple[int, str]:
    """aclImdb names a review ``<id>_<rating>.txt``: sort by the number, then by name for other files."""
    match = re.match(r"(\d+)_", path.name)
    return (int(match.group(1)) if match else -1, path.name)


def review_key(text: str) -> str:
    """The key under which two reviews count as the same text: lowercase letters and digits only,
    words joined by single spaces (so punctuation and spacing differences do not hide a copy)."""
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def pretraining_reviews(test_texts: Sequence[str] | None = None, path: str | os.PathLike | None = None,
                        limit: int = 0) -> list[str]:
    """The unlabelled reviews to pretrain on: :func:`read_imdb_unlabelled` without the reviews whose
    :func:`review_key` is that of a test review (``test_texts``, default the IMDB test split), so that
    no text a fine-tuned model is scored on was seen in pretraining. As released, 269 of the 25,000
    test reviews also occur among the 50,000 unlabelled ones. ``limit`` looks at the first N unlabelled
    reviews only (0: all), for quick runs."""
    test_keys = {review_key(text) for text in (read_imdb("test")[0] if test_texts is None else test_texts)}
    reviews = read_imdb_unlabelled(path)[: limit or None]
    return [review for review in reviews if review_key(review) not in test_keys]


# ---------------------------------------------------------------------------------------------
# The leak check: no held-out text inside a training text, nor the other way round
# ---------------------------------------------------------------------------------------------


def text_key(text: str) -> str:
    """The form in which two texts are compared for leaks: lowercased, whitespace runs collapsed to one space."""
    return " ".join(text.lower().split())


def leak_free_split(texts: Sequence[str], val_fraction: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """A seeded random train/validation split in which no validation text occurs inside a training text.

    SST-2's training phrases are nested pieces of the same parse trees ("a caricature" is part of
    "become a caricature", which is part of a whole sentence), so a held-out phrase that is part of
    a training phrase would let masked-LM accuracy on it measure memory rather than language.
    First ``round(len(texts) * val_fraction)`` texts (at least 1, at most all but one) are picked
    for validation with ``random.Random(seed).sample(range(len(texts)), n)``; then every picked
    text that occurs as a substring of some unpicked text, both lowercased with whitespace runs
    collapsed to one space, is moved to training. One pass suffices: a moved text lies inside a
    training text, so whatever lies inside it does too.

    The other direction leaks too: a held-out sentence *contains* its own phrases, and SST-2 has
    them as separate training texts. So, finally, every training text that occurs inside a validation
    text is dropped (on all of SST-2 with ``val_fraction=0.02`` that is a few thousand short phrases
    of 67,349): neither split then holds a piece of the other.

    Returns ``(train, val)``, each in the order of ``texts``.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    if len(texts) < 2:
        raise ValueError(f"cannot split {len(texts)} text(s) into training and validation sets")
    n_val = min(max(round(len(texts) * val_fraction), 1), len(texts) - 1)
    picked = set(random.Random(seed).sample(range(len(texts)), n_val))
    keys = [text_key(text) for text in texts]  # no key contains "\n" ...
    training_text = "\n".join(key for i, key in enumerate(keys) if i not in picked)  # ... so no match spans two texts
    in_val = [i in picked and keys[i] not in training_text for i in range(len(texts))]
    validation_text = "\n".join(key for key, v in zip(keys, in_val) if v)
    train = [text for text, key, v in zip(texts, keys, in_val) if not v and key not in validation_text]
    return train, [text for text, v in zip(texts, in_val) if v]


# ---------------------------------------------------------------------------------------------
# Splits for fine-tuning: train / held-out (early stopping) / the split results are reported on
# ---------------------------------------------------------------------------------------------


@dataclass
class LabelledSplits:
    """A classification data set as lists of (text, label): what fine-tuning trains on, a held-out
    slice of it for early stopping and model selection, and the split results are reported on."""

    name: str
    train: list[tuple[str, int]]
    val: list[tuple[str, int]]
    test: list[tuple[str, int]]


def sst2_splits(val_fraction: float = 0.1, seed: int = 0, limit: int = 0) -> LabelledSplits:
    """SST-2 train (phrases) split leak-free into train / val (:func:`leak_free_split`: no
    training phrase is part of a validation phrase or the other way round), and SST-2 dev (872
    sentences) to report on. A validation phrase survives the leak check only if it is a whole
    sentence, so ``val_fraction=0.1`` holds out ~740 sentences.

    ``limit`` keeps the first N training phrases (0: all 67,349), for quick runs.
    """
    phrases, labels = read_sst2("train")
    if limit:
        phrases, labels = phrases[:limit], labels[:limit]
    label_of = dict(zip(phrases, labels))
    train_texts, val_texts = leak_free_split(phrases, val_fraction, seed=seed)
    dev_texts, dev_labels = read_sst2("dev")
    return LabelledSplits("SST-2 dev", [(t, label_of[t]) for t in train_texts], [(t, label_of[t]) for t in val_texts],
                          list(zip(dev_texts, dev_labels)))


def _word_key(text: str) -> str:
    return f" {text_key(text)} "  # padded: containment then means whole words


def sst2_sentences(limit: int = 0) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """SST-2 as (text, label) lists: the training split's *full sentences*, and the dev sentences.

    GLUE's training split is 67,349 phrases: every sentence of the treebank's training part and many of
    its sub-phrases. The sentences are the phrases that lie inside no other phrase (compared as
    lowercased word sequences): 6,885 of them, 19.4 words on average, like the dev sentences (19.5).
    A training sentence that contains a dev sentence or lies inside one (two do) is dropped, so no
    training text holds a piece of the test text. ``limit`` reads only the first N phrases (quick runs).
    """
    phrases, labels = read_sst2("train")
    if limit:
        phrases, labels = phrases[:limit], labels[:limit]
    keys = [_word_key(p) for p in phrases]
    index = collections.defaultdict(list)  # word -> the phrases that hold it
    for i, key in enumerate(keys):
        for word in set(key.split()):
            index[word].append(i)
    sentences = []
    for i, key in enumerate(keys):
        words = set(key.split())
        if not words:
            continue
        rarest = min(words, key=lambda w: len(index[w]))  # any phrase holding this one holds its rarest word
        if not any(len(keys[j]) > len(key) and key in keys[j] for j in index[rarest]):
            sentences.append(i)
    dev_texts, dev_labels = read_sst2("dev")
    dev_keys = [_word_key(t) for t in dev_texts]
    dev_joined = "\n".join(dev_keys)
    seen, train = set(), []
    for i in sentences:
        if keys[i] in seen or keys[i] in dev_joined or any(d in keys[i] for d in dev_keys):
            continue
        seen.add(keys[i])
        train.append((phrases[i], labels[i]))
    return train, list(zip(dev_texts, dev_labels))


def imdb_splits(val_fraction: float = 0.1, seed: int = 0, test_limit: int = 0, folder: str | os.PathLike | None = None,
                limit: int = 0) -> LabelledSplits:
    """IMDB's labelled train split, a seeded random ``val_fraction`` of it held out, and the test split.

    The held-out slice keeps no copy of a training review (:func:`review_key`; the training split holds
    a few reviews twice, as released): such a copy moves to training.

    ``test_limit`` scores on a fixed, seeded, stratified subset of the 25,000 test reviews
    (:func:`stratified_subset`; 0: all of them), for CPUs where the whole split is slow to score.
    ``folder`` reads an unpacked aclImdb folder instead of the shipped files; ``limit`` keeps a
    stratified N of the training reviews (0: all), for quick runs.
    """
    if folder:
        train, test = read_aclimdb_folder(folder, "train"), read_aclimdb_folder(folder, "test")
    else:
        train, test = read_imdb("train"), read_imdb("test")
    examples = list(zip(*train))
    if limit:
        examples = stratified_subset(examples, limit, seed)
    random.Random(seed).shuffle(examples)
    n_val = min(max(1, round(len(examples) * val_fraction)), len(examples) - 1)
    # A review the data set holds twice stays on one side: held-out copies of training reviews go to training.
    train_keys = {review_key(text) for text, _ in examples[n_val:]}
    held_out = [example for example in examples[:n_val] if review_key(example[0]) not in train_keys]
    train_examples = [example for example in examples[:n_val] if review_key(example[0]) in train_keys] + examples[n_val:]
    test_examples = list(zip(*test))
    name = "IMDB test"
    if test_limit and test_limit < len(test_examples):
        test_examples = stratified_subset(test_examples, test_limit, seed=0)  # the same subset whatever the run's seed
        name = f"IMDB test ({test_limit:,} of {len(list(zip(*test))):,}, stratified)"
    return LabelledSplits(name, train_examples, held_out, test_examples)


def stratified_subset(examples: Sequence[tuple[str, int]], n: int, seed: int = 0) -> list[tuple[str, int]]:
    """A seeded random ``n`` of ``examples`` with each label's share kept (to within one example),
    in their original order."""
    if n >= len(examples):
        return list(examples)
    by_label: dict[int, list[int]] = {}
    for index, (_, label) in enumerate(examples):
        by_label.setdefault(label, []).append(index)
    rng = random.Random(seed)
    chosen, remaining = [], n
    labels = sorted(by_label)
    for position, label in enumerate(labels):
        indices = by_label[label]
        take = remaining if position == len(labels) - 1 else round(n * len(indices) / len(examples))
        chosen += rng.sample(indices, min(take, len(indices)))
        remaining -= min(take, len(indices))
    return [examples[i] for i in sorted(chosen)]


def with_labelled(splits: LabelledSplits, labelled: int, seed: int = 0) -> LabelledSplits:
    """``splits`` with only a seeded, stratified random ``labelled`` of its training examples (0, or more
    than there are: all; :func:`stratified_subset`), the held-out and report splits whole: the
    low-resource setting, few labels to learn from."""
    if not labelled or labelled >= len(splits.train):
        return splits
    return replace(splits, train=stratified_subset(splits.train, labelled, seed))
