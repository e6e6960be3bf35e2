"""The shipped data sets and how to read them.

``data/`` (next to this package) holds Tiny Shakespeare and GLUE SST-2; see data/README.md for
sources, licences and checksums. ``MINILLM_DATA_DIR`` points elsewhere if you moved them.
Reading errors are :class:`minillm.MinillmError` with one sentence naming the file.
"""

from __future__ import annotations

import os
import pathlib

from minillm import MinillmError

DATA_ENV = "MINILLM_DATA_DIR"


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


def read_text_file(path: str | os.PathLike) -> str:
    """Read a UTF-8 text corpus, refusing missing, empty and binary files with a clear message."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise MinillmError(f"{path} does not exist or is not a file")
    raw = path.read_bytes()
    if not raw.strip():
        raise MinillmError(f"{path} is empty")
    if b"\x00" in raw[:65536]:
        raise MinillmError(f"{path} looks like a binary file, not text")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise MinillmError(f"{path} is not UTF-8 text (byte {error.start} cannot be decoded)") from None


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
    return sentences, labels
