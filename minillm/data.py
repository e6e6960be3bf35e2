"""Data: reading text, cleaning, batches of sequences, language-model blocks, and BERT's pretraining data.

- Reading a text file (:func:`read_text_file`), refusing missing, empty and binary files with one
  sentence. The shipped data sets themselves, their readers and splits are :mod:`minillm.datasets`.
- Cleaning (:func:`clean_text`): control characters, whitespace, Unicode normalization, exact
  and near-exact line de-duplication, with a report of what each step changed.
- Batches of sequences (:func:`pad_batch`, :func:`encode_pair`, :func:`encode_pair_batch`):
  truncation, padding, attention masks, BERT's ``[CLS] A [SEP] B [SEP]`` with token types.
- Language-model blocks (:func:`write_token_ids`, :func:`open_token_ids`,
  :func:`split_train_val`, :func:`sample_lm_batch`, :func:`iter_lm_blocks`): token ids in a
  binary file opened as a numpy memmap, random (x, y) batches from a seedable generator, and
  every block in order for evaluation.
- BERT pretraining (:func:`mask_tokens`, :func:`word_starts_from_tokens`, :func:`nsp_pairs`,
  :func:`split_sentences`, :func:`review_documents`, :func:`pack_segments`, :func:`sst2_documents`,
  :func:`text_documents`, :func:`leak_free_split`): masked-LM corruption (80/10/10, optionally
  whole words), next-sentence pairs, corpora cut into documents of sentences and packed into
  nearly full-length segments, and a validation split that does not leak into training.
"""

from __future__ import annotations

import difflib
import os
import pathlib
import random
import re
import tempfile
import unicodedata
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from minillm import MinillmError
from minillm.files import read_json, write_json

HTML_LINE_BREAK = re.compile(r"<br\s*/?>", flags=re.IGNORECASE)
"""The ``<br />`` tags (also ``<br>``, ``<br/>``, any case) that IMDB reviews use as line breaks."""


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


# ---------------------------------------------------------------------------------------------
# Cleaning: line endings and control characters, whitespace, Unicode normalization, dedup
# ---------------------------------------------------------------------------------------------

LINE_BREAKS = re.compile("\r\n|\r|\u2028|\u2029")
"""Windows (CR LF) and old Mac (CR) line endings and Unicode's line/paragraph separators: each becomes LF."""

ZERO_WIDTH = "\u200b\u2060\ufeff"
"""Zero-width space, word joiner, byte-order mark. (Zero-width joiner and non-joiner, U+200D and
U+200C, are kept: they change how emoji sequences and Persian or Indic words render.)"""

CONTROL_CHARACTERS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f" + ZERO_WIDTH + "]")
"""C0 controls except tab and newline, DEL, C1 controls (U+0080-U+009F), zero-width characters: deleted."""

UNICODE_SPACES = re.compile("[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
"""Every space separator (Unicode category Zs) other than the ASCII space: each becomes a space."""

TRAILING_WHITESPACE = re.compile("[ \t]+$", flags=re.MULTILINE)

NORMALIZATION_FORMS = ("NFC", "NFKC")


def remove_control_characters(text: str) -> str:
    """CR LF, CR, U+2028 and U+2029 -> LF; delete the other control and zero-width characters
    (:data:`CONTROL_CHARACTERS`). Tabs and newlines stay: in a TSV file or a poem they mean something."""
    return CONTROL_CHARACTERS.sub("", LINE_BREAKS.sub("\n", text))


def clean_whitespace(text: str) -> str:
    """Unicode spaces (no-break, thin, ideographic, ...) -> ASCII space; strip spaces and tabs at line ends.
    Runs of spaces inside a line and indentation stay as they are."""
    return TRAILING_WHITESPACE.sub("", UNICODE_SPACES.sub(" ", text))


def normalize_unicode(text: str, form: str = "NFC") -> str:
    """Unicode normalization (UAX #15). NFC composes canonically equivalent sequences ("e" +
    U+0301 -> "é"), so the same visible text has one spelling; NFKC also folds compatibility
    characters ("ﬁ" -> "fi", "²" -> "2", full-width letters -> ASCII), which loses distinctions."""
    if form not in NORMALIZATION_FORMS:
        raise ValueError(f"normalization form must be one of {', '.join(NORMALIZATION_FORMS)}, got {form!r}")
    return text if unicodedata.is_normalized(form, text) else unicodedata.normalize(form, text)


def canonical_line(line: str) -> str:
    """The key near-duplicate lines share: casefolded, punctuation (Unicode categories P*)
    dropped, whitespace runs collapsed to one space, stripped. ``"Hello,  World!"`` -> ``"hello world"``."""
    folded = "".join(char for char in line.casefold() if not unicodedata.category(char).startswith("P"))
    return " ".join(folded.split())


def dedup_lines(lines: Iterable[str], mode: str = "exact", min_chars: int = 0) -> list[str]:
    """Drop repeated lines, keeping each first occurrence, in order.

    ``mode="exact"`` compares lines as they are; ``mode="near"`` compares their
    :func:`canonical_line` (so "To be, or not to be." repeats "to be or not to be").
    Lines whose key is shorter than ``min_chars`` characters are always kept: blank lines,
    speaker names and "Amen." are structure or legitimately repeated, not duplicated documents.
    """
    if mode not in ("exact", "near"):
        raise ValueError(f"dedup mode must be 'exact' or 'near', got {mode!r}")
    seen: set[str] = set()
    kept = []
    for line in lines:
        key = canonical_line(line) if mode == "near" else line
        if len(key) >= min_chars:
            if key in seen:
                continue
            seen.add(key)
        kept.append(line)
    return kept


@dataclass
class CleaningStep:
    """What one cleaning step did: characters of its input removed or replaced, lines removed,
    and the most frequent things it changed (the original text, quoted, -> count)."""

    name: str
    chars_changed: int
    lines_removed: int
    examples: list[tuple[str, int]]


@dataclass
class CleaningReport:
    text: str
    steps: list[CleaningStep]
    chars_before: int
    lines_before: int

    def format(self) -> str:
        """A small table: one row per step, with the most frequent changes."""
        rows = [f"  {'step':<32} {'chars changed':>13} {'lines removed':>13}  most frequent changes"]
        for step in self.steps:
            examples = ", ".join(f"{what} x{count:,}" for what, count in step.examples) or "-"
            rows.append(f"  {step.name:<32} {step.chars_changed:>13,} {step.lines_removed:>13,}  {examples}")
        rows.append(f"  {self.chars_before:,} -> {len(self.text):,} characters, "
                    f"{self.lines_before:,} -> {_count_lines(self.text):,} lines")
        return "\n".join(rows)


def _count_lines(text: str) -> int:
    return len(_split_lines(text)[0])


def _split_lines(text: str) -> tuple[list[str], bool]:
    """Lines split on LF, and whether the text ended with a final newline (not a line of its own)."""
    ends_with_newline = text.endswith("\n")
    body = text[:-1] if ends_with_newline else text
    return (body.split("\n") if body else []), ends_with_newline


def _normalization_changes(before: str, after: str) -> Counter[str]:
    """What normalization replaced, line by line (it never crosses a newline)."""
    changes: Counter[str] = Counter()
    if before == after:
        return changes
    for old, new in zip(before.split("\n"), after.split("\n")):
        if old != new:
            matcher = difflib.SequenceMatcher(None, old, new, autojunk=False)
            changes.update(old[i1:i2] for tag, i1, i2, _, _ in matcher.get_opcodes() if tag != "equal")
    return changes


def clean_text(text: str, normalization: str = "NFC", dedup: str | None = "exact", dedup_min_chars: int = 0,
               n_examples: int = 3) -> CleaningReport:
    """Run the cleaning steps in order and report what each changed.

    1. line endings and 2. control characters (:func:`remove_control_characters`), 3. Unicode
    spaces and 4. trailing whitespace (:func:`clean_whitespace`), 5. Unicode normalization
    (:func:`normalize_unicode`), 6. line de-duplication (:func:`dedup_lines`, ``dedup`` =
    ``"exact"``, ``"near"`` or ``None``). Each step's ``examples`` show what it changed: the
    original characters (as ``ascii()``, so invisible ones show) or the removed lines.
    Normalization comes after the deletions because deleting a zero-width character can bring a
    letter next to its combining accent, which NFC then composes; in this order the pipeline
    is idempotent: cleaning clean text changes nothing.
    """
    if dedup not in ("exact", "near", None):
        raise ValueError(f"dedup must be 'exact', 'near' or None, got {dedup!r}")
    chars_before, lines_before = len(text), _count_lines(text)
    steps = []
    for name, pattern, replacement in (("line endings", LINE_BREAKS, "\n"), ("control characters", CONTROL_CHARACTERS, ""),
                                       ("Unicode spaces", UNICODE_SPACES, " "), ("trailing whitespace", TRAILING_WHITESPACE, "")):
        changes = Counter(pattern.findall(text))
        text = pattern.sub(replacement, text)
        chars = sum(changes.values()) if pattern is LINE_BREAKS else None  # CR LF -> LF changes one character
        steps.append(_step(name, changes, 0, n_examples, chars=chars))

    normalized = normalize_unicode(text, normalization)
    steps.append(_step(f"Unicode {normalization}", _normalization_changes(text, normalized), 0, n_examples))
    text = normalized

    if dedup is not None:
        lines, ends_with_newline = _split_lines(text)
        kept = dedup_lines(lines, mode=dedup, min_chars=dedup_min_chars)
        removed = Counter(lines) - Counter(kept)
        text = "\n".join(kept) + ("\n" if ends_with_newline else "")
        label = f"{dedup} line dedup" + (f" (>= {dedup_min_chars} chars)" if dedup_min_chars else "")
        steps.append(_step(label, removed, len(lines) - len(kept), n_examples, show=repr,
                           chars=sum((len(line) + 1) * count for line, count in removed.items())))
    return CleaningReport(text, steps, chars_before, lines_before)


def _step(name: str, changes: Counter[str], lines_removed: int, n_examples: int, chars: int | None = None,
          show=ascii) -> CleaningStep:
    chars = sum(len(what) * count for what, count in changes.items()) if chars is None else chars
    return CleaningStep(name, chars, lines_removed, [(show(what), count) for what, count in changes.most_common(n_examples)])


# ---------------------------------------------------------------------------------------------
# Batches of sequences: truncation, padding, attention masks, BERT's sentence pairs
# ---------------------------------------------------------------------------------------------


def truncate_pair(ids_a: Sequence[int], ids_b: Sequence[int], max_tokens: int) -> tuple[list[int], list[int]]:
    """Trim the longer of two sequences by one token from its end until they fit in ``max_tokens``
    together; on a tie ``ids_b`` loses the token (BERT's ``_truncate_seq_pair``, Devlin et al., 2019)."""
    a, b = list(ids_a), list(ids_b)
    while len(a) + len(b) > max_tokens:
        (a if len(a) > len(b) else b).pop()
    return a, b


def encode_pair(ids_a: Sequence[int], ids_b: Sequence[int] | None = None, *, cls_id: int, sep_id: int,
                max_length: int) -> tuple[list[int], list[int]]:
    """BERT's input: ``[CLS] A [SEP] B [SEP]`` (or ``[CLS] A [SEP]``) and its token-type ids.

    Token types are 0 for ``[CLS]``, A and the first ``[SEP]``; 1 for B and the last ``[SEP]``.
    At most ``max_length`` ids: a single sequence is cut at its end, a pair by :func:`truncate_pair`.
    """
    n_special = 2 if ids_b is None else 3
    if max_length < n_special:
        raise ValueError(f"max_length must be at least {n_special} to hold [CLS] and [SEP], got {max_length}")
    if ids_b is None:
        a = list(ids_a[: max_length - 2])
        return [cls_id, *a, sep_id], [0] * (len(a) + 2)
    a, b = truncate_pair(ids_a, ids_b, max_length - 3)
    return [cls_id, *a, sep_id, *b, sep_id], [0] * (len(a) + 2) + [1] * (len(b) + 1)


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int = 0, max_length: int | None = None,
              pad_to_max_length: bool = False, side: str = "right",
              token_type_ids: Sequence[Sequence[int]] | None = None) -> dict[str, torch.Tensor]:
    """Truncate to ``max_length`` (keeping the first tokens), pad, and build attention masks.

    Returns int64 tensors of shape (B, L): ``input_ids``, ``attention_mask`` (1 = real token,
    0 = padding) and, when given, ``token_type_ids`` (padded with 0). L is the longest
    sequence after truncation, or ``max_length`` with ``pad_to_max_length=True`` (fixed shapes).
    ``side="left"`` puts the padding first, which generation with a decoder wants.
    """
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    if not sequences:
        raise ValueError("pad_batch needs at least one sequence")
    if max_length is not None and max_length < 1:
        raise ValueError(f"max_length must be at least 1, got {max_length}")
    if pad_to_max_length and max_length is None:
        raise ValueError("pad_to_max_length=True needs a max_length")
    if token_type_ids is not None and [len(t) for t in token_type_ids] != [len(s) for s in sequences]:
        raise ValueError("token_type_ids must have one list of the same length per sequence")
    lengths = [len(s) if max_length is None else min(len(s), max_length) for s in sequences]
    length = max_length if pad_to_max_length else max(lengths)

    def pad(row: Sequence[int], n: int, fill: int) -> list[int]:
        row, padding = list(row[:n]), [fill] * (length - n)
        return row + padding if side == "right" else padding + row

    batch = {"input_ids": torch.tensor([pad(s, n, pad_id) for s, n in zip(sequences, lengths)], dtype=torch.long)}  # (B, L)
    if token_type_ids is not None:
        batch["token_type_ids"] = torch.tensor([pad(t, n, 0) for t, n in zip(token_type_ids, lengths)], dtype=torch.long)
    batch["attention_mask"] = torch.tensor([pad([1] * n, n, 0) for n in lengths], dtype=torch.long)  # (B, L)
    return batch


def encode_pair_batch(pairs: Sequence[tuple[Sequence[int], Sequence[int] | None]], *, cls_id: int, sep_id: int,
                      pad_id: int, max_length: int, pad_to_max_length: bool = False) -> dict[str, torch.Tensor]:
    """:func:`encode_pair` for each ``(ids_a, ids_b or None)``, then :func:`pad_batch`: a BERT batch of
    ``input_ids``, ``token_type_ids`` and ``attention_mask``, int64 (B, L)."""
    encoded = [encode_pair(a, b, cls_id=cls_id, sep_id=sep_id, max_length=max_length) for a, b in pairs]
    return pad_batch([ids for ids, _ in encoded], pad_id=pad_id, max_length=max_length, pad_to_max_length=pad_to_max_length,
                     token_type_ids=[types for _, types in encoded])


# ---------------------------------------------------------------------------------------------
# Language-model blocks over a token-id file (numpy memmap)
# ---------------------------------------------------------------------------------------------


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (ids 0 .. vocab_size-1, vocab_size <= 65,536), else uint32."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be at least 1, got {vocab_size}")
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def write_token_ids(path: str | os.PathLike, ids: np.ndarray | Sequence[int] | Iterable[np.ndarray | Sequence[int]],
                    vocab_size: int) -> pathlib.Path:
    """Write token ids as a flat binary file (nanoGPT's ``train.bin``) plus ``<path>.json`` (dtype, count).

    ``ids`` is one array, tensor or list of ids, or an iterable of chunks (say, one per document), so a
    corpus larger than memory can be streamed to disk. Each id is checked to lie in
    ``0 .. vocab_size-1`` (a uint16 file would silently wrap a larger one). The file appears
    only when complete (written to a temporary name, then renamed).
    """
    path = pathlib.Path(path)
    dtype = token_dtype(vocab_size)
    if isinstance(ids, torch.Tensor):
        ids = ids.cpu().numpy()
    if isinstance(ids, np.ndarray) or (isinstance(ids, Sequence) and (not ids or isinstance(ids[0], (int, np.integer)))):
        ids = [ids]
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    n_tokens = 0
    try:
        with os.fdopen(fd, "wb") as handle:
            for chunk in ids:
                chunk = np.asarray(chunk, dtype=np.int64)
                if chunk.size and (chunk.min() < 0 or chunk.max() >= vocab_size):
                    bad = chunk[(chunk < 0) | (chunk >= vocab_size)][0]
                    raise ValueError(f"token id {bad} is outside the vocabulary (0 .. {vocab_size - 1})")
                handle.write(chunk.astype(dtype).tobytes())
                n_tokens += chunk.size
        if n_tokens == 0:
            raise MinillmError(f"no token ids to write to {path}: the encoded corpus is empty")
        os.replace(tmp_name, path)
    except BaseException:
        pathlib.Path(tmp_name).unlink(missing_ok=True)
        raise
    write_json(_meta_path(path), {"dtype": dtype.name, "n_tokens": n_tokens, "vocab_size": vocab_size})
    return path


def _meta_path(path: pathlib.Path) -> pathlib.Path:
    return path.with_name(path.name + ".json")


def open_token_ids(path: str | os.PathLike) -> np.memmap:
    """Open a file written by :func:`write_token_ids` as a read-only numpy memmap: nothing is read
    into memory until it is indexed, so the corpus may be larger than RAM."""
    path = pathlib.Path(path)
    meta_path = _meta_path(path)
    if not path.is_file() or not meta_path.is_file():
        raise MinillmError(f"token file {path} (or its {meta_path.name}) does not exist: write it with write_token_ids")
    meta = read_json(meta_path)
    dtype = np.dtype(meta["dtype"])
    if path.stat().st_size != meta["n_tokens"] * dtype.itemsize:
        raise MinillmError(f"{path} holds {path.stat().st_size} bytes, but {meta_path.name} promises "
                           f"{meta['n_tokens']} {dtype.name} ids: the file is damaged or was changed")
    return np.memmap(path, dtype=dtype, mode="r", shape=(meta["n_tokens"],))


def split_train_val(ids: np.ndarray, val_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """The first ``1 - val_fraction`` of the ids for training, the rest for validation (nanoGPT's
    90/10 split of Tiny Shakespeare). Slices of a memmap stay memmaps: nothing is copied."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    if len(ids) < 2:
        raise MinillmError(f"cannot split {len(ids)} token(s) into training and validation data")
    n_train = min(max(int(len(ids) * (1.0 - val_fraction)), 1), len(ids) - 1)
    return ids[:n_train], ids[n_train:]


def _check_blocks(ids: np.ndarray, block_size: int, batch_size: int) -> None:
    if block_size < 1 or batch_size < 1:
        raise ValueError(f"block_size and batch_size must be at least 1, got {block_size} and {batch_size}")
    if len(ids) == 0:
        raise MinillmError("the token data is empty")
    if len(ids) < block_size + 1:
        raise MinillmError(f"block_size {block_size} needs at least {block_size + 1} tokens (inputs and the next-token "
                           f"targets), but the data has {len(ids)}: use a smaller block size or more text")


def _blocks_at(ids: np.ndarray, starts: np.ndarray, block_size: int, device: str | torch.device | None):
    windows = np.asarray(ids[starts[:, None] + np.arange(block_size + 1)], dtype=np.int64)  # (B, T + 1)
    x = torch.from_numpy(windows[:, :-1].copy())  # (B, T)
    y = torch.from_numpy(windows[:, 1:].copy())  # (B, T): y[:, t] is the token after x[:, t]
    if device is not None and torch.device(device).type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return (x.to(device), y.to(device)) if device is not None else (x, y)


def sample_lm_batch(ids: np.ndarray, batch_size: int, block_size: int, generator: torch.Generator,
                    device: str | torch.device | None = None, rank: int = 0,
                    world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """A random batch for next-token prediction: ``x = ids[s : s+T]``, ``y = ids[s+1 : s+T+1]``.

    The B offsets ``s`` are drawn uniformly from ``0 .. len(ids) - T - 1`` with ``generator``
    (a CPU ``torch.Generator``: seed it, and save and restore ``generator.get_state()`` to resume a
    run on exactly the same batches). Returns int64 tensors (B, T), on ``device`` if given.

    Data parallelism: with ``world_size`` processes drawing from identically seeded generators,
    each draws the offsets of the whole global batch (B · world_size) and keeps rows
    ``rank·B .. rank·B + B - 1``, so the processes see disjoint shares of exactly the batch one
    process would see with ``batch_size = B · world_size``.
    """
    _check_blocks(ids, block_size, batch_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in 0 .. world_size - 1, got rank {rank} of {world_size}")
    starts = torch.randint(len(ids) - block_size, (batch_size * world_size,), generator=generator).numpy()  # (B·W,)
    starts = starts[rank * batch_size:(rank + 1) * batch_size]  # (B,): this process's share
    return _blocks_at(ids, starts, block_size, device)


def iter_lm_blocks(ids: np.ndarray, block_size: int, batch_size: int,
                   device: str | torch.device | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Every non-overlapping block in order, in batches, for evaluating on a whole split.

    Block k is ``x = ids[kT : kT+T]``, ``y = ids[kT+1 : kT+T+1]``, for k = 0 .. (len(ids)-1)//T - 1;
    the few tokens after the last full block are not predicted. The last batch may be smaller.
    """
    _check_blocks(ids, block_size, batch_size)
    n_blocks = (len(ids) - 1) // block_size
    for first in range(0, n_blocks, batch_size):
        starts = np.arange(first, min(first + batch_size, n_blocks)) * block_size  # (B,)
        yield _blocks_at(ids, starts, block_size, device)


# ---------------------------------------------------------------------------------------------
# Masked language modelling and next-sentence prediction (BERT)
# ---------------------------------------------------------------------------------------------

IGNORE_INDEX = -100
"""The label of a position the loss skips: the default ``ignore_index`` of ``torch.nn.functional.cross_entropy``."""

MLM_MASK_FRACTION = 0.8
"""Of the positions selected for prediction, this fraction becomes ``[MASK]`` (Devlin et al., 2019)."""

MLM_RANDOM_FRACTION = 0.1
"""Of the selected positions, this fraction becomes a random token; the remaining 0.1 keep their token."""

NSP_IS_NEXT = 0
"""Next-sentence label: B is the segment that follows A (Hugging Face's ``next_sentence_label`` 0)."""

NSP_NOT_NEXT = 1
"""Next-sentence label: B is a random segment from another document."""


def mask_tokens(input_ids: torch.Tensor, mask_token_id: int, vocab_size: int, special_token_ids: Sequence[int],
                mlm_probability: float = 0.15, generator: torch.Generator | None = None,
                word_starts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masked-language-model corruption: ``(masked_ids, labels)``, both shaped like ``input_ids``.

    The recipe (Devlin et al., 2019, section 3.1 and appendix A.1): every position whose id is
    not in ``special_token_ids`` is *selected* independently with probability ``mlm_probability``
    (BERT: 0.15). A selected position becomes ``mask_token_id`` with probability 0.8, a random
    token with probability 0.1, and keeps its token with probability 0.1, so that the model
    cannot tell which positions it will be asked about and must represent every token well.
    ``labels`` holds the original id at the selected positions and -100 (:data:`IGNORE_INDEX`)
    elsewhere: ``cross_entropy(logits.view(-1, V), labels.view(-1))`` averages over the selected
    positions only, the unchanged ones included.

    ``special_token_ids`` are never selected and never changed: pass padding, ``[CLS]``,
    ``[SEP]``, ``[MASK]`` and (usually) ``[UNK]``; ``mask_token_id`` must be among them. A random
    replacement is drawn uniformly from the ids ``0 .. vocab_size-1`` that are *not* special, so
    noise is never a ``[PAD]`` or ``[CLS]`` (Hugging Face's ``DataCollatorForLanguageModeling``
    draws from the whole vocabulary, specials included).

    Whole-word masking (the May 2019 update of Google's BERT; Cui et al., 2019): with
    ``word_starts`` (bool, the shape of ``input_ids``, True where a token begins a word, i.e. is
    not a WordPiece ``##`` continuation; see :func:`word_starts_from_tokens`), the unit is the
    *word*: a non-special start token and the non-start, non-special tokens after it along the
    last dimension. A word is selected with probability ``mlm_probability`` and the 80/10/10
    choice is made once for it: all its pieces become ``[MASK]``, or all become random tokens
    (each piece its own draw), or all keep their tokens. A continuation piece at the start of a
    row or right after a special token begins a word of its own.

    Randomness: three CPU draws of ``input_ids.numel()`` values each, in row-major order, always
    all of them, so the result is a fixed function of the state of ``generator`` (torch's global
    generator if None) and every call advances it by the same amount:

    1. ``u = torch.rand(shape)``: position i is selected iff ``u[i] < mlm_probability``;
    2. ``v = torch.rand(shape)``: ``[MASK]`` if ``v[i] < 0.8``, random if ``0.8 <= v[i] < 0.9``, else kept;
    3. ``r = torch.randint(n_nonspecial, shape)``: the random token is the ``r[i]``-th non-special id.

    With ``word_starts``, every piece of a word reads ``u`` and ``v`` at the word's first piece.
    The inputs are not modified; the outputs have ``input_ids``' dtype and device.
    """
    if not 0.0 <= mlm_probability <= 1.0:
        raise ValueError(f"mlm_probability must be between 0 and 1, got {mlm_probability}")
    if input_ids.dtype not in (torch.int8, torch.int16, torch.int32, torch.int64):
        raise ValueError(f"input_ids must be a tensor of signed integer token ids, got dtype {input_ids.dtype}")
    special = torch.tensor(sorted({int(i) for i in special_token_ids}), dtype=torch.long)
    if mask_token_id not in special.tolist():
        raise ValueError(f"mask_token_id {mask_token_id} must be one of special_token_ids, so that [MASK] is never selected itself")
    vocab = torch.arange(vocab_size)
    replacements = vocab[~torch.isin(vocab, special)]  # (n_nonspecial,): the ids a random replacement is drawn from
    if len(replacements) == 0:
        raise ValueError(f"vocab_size {vocab_size} leaves no non-special id to draw random replacements from")
    if word_starts is not None and word_starts.shape != input_ids.shape:
        raise ValueError(f"word_starts must have the shape of input_ids, {tuple(input_ids.shape)}, got {tuple(word_starts.shape)}")

    ids = input_ids.detach().cpu()
    shape = ids.shape
    u = torch.rand(shape, generator=generator)  # selection
    v = torch.rand(shape, generator=generator)  # [MASK] / random / kept
    r = torch.randint(len(replacements), shape, generator=generator)  # which random token
    maskable = ~torch.isin(ids, special)

    if word_starts is not None and ids.numel() > 0:
        length = shape[-1] if ids.dim() else 1
        rows = (ids.numel() // length, length)  # (N, T): every row is one sequence
        maskable_rows = maskable.reshape(rows)
        after_maskable = torch.cat([torch.zeros(rows[0], 1, dtype=torch.bool), maskable_rows[:, :-1]], dim=1)
        begins = maskable_rows & (word_starts.detach().cpu().to(torch.bool).reshape(rows) | ~after_maskable)
        positions = torch.arange(length).expand(rows)
        first_piece = torch.where(begins, positions, 0).cummax(dim=1).values  # (N, T): where each position's word begins
        u = u.reshape(rows).gather(1, first_piece).reshape(shape)
        v = v.reshape(rows).gather(1, first_piece).reshape(shape)

    selected = maskable & (u < mlm_probability)
    to_mask = selected & (v < MLM_MASK_FRACTION)
    to_random = selected & (v >= MLM_MASK_FRACTION) & (v < MLM_MASK_FRACTION + MLM_RANDOM_FRACTION)
    masked = ids.clone()
    masked[to_mask] = mask_token_id
    masked[to_random] = replacements[r[to_random]].to(ids.dtype)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[selected] = ids[selected]
    return masked.to(input_ids.device), labels.to(input_ids.device)


def word_starts_from_tokens(token_strings: Sequence[str] | Sequence[Sequence[str]]) -> torch.Tensor:
    """For :func:`mask_tokens`' whole-word masking: True where a WordPiece token begins a word.

    Every token that does not start with ``##`` begins a word; special tokens and padding are
    marked True too (``mask_tokens`` excludes them through their ids anyway). One list of token
    strings (say, ``tokenizer.encode(text).tokens``) gives a (T,) bool tensor; a list of equally
    long lists gives (B, T).
    """
    if len(token_strings) and not isinstance(token_strings[0], str):
        lengths = {len(row) for row in token_strings}
        if len(lengths) > 1:
            raise ValueError(f"the rows of token_strings must have one length (pad them), got lengths {sorted(lengths)}")
        return torch.tensor([[not token.startswith("##") for token in row] for row in token_strings], dtype=torch.bool)
    return torch.tensor([not token.startswith("##") for token in token_strings], dtype=torch.bool)


def _python_rng(generator: torch.Generator | random.Random | int | None) -> random.Random:
    """A ``random.Random``: the one given, one seeded with the int given, or one seeded with a 63-bit
    draw from the ``torch.Generator`` given (torch's global generator if None)."""
    if isinstance(generator, random.Random):
        return generator
    if isinstance(generator, int) and not isinstance(generator, bool):
        return random.Random(generator)
    if generator is None or isinstance(generator, torch.Generator):
        return random.Random(int(torch.randint(2**63 - 1, (), generator=generator)))
    raise TypeError(f"generator must be a random.Random, an int seed, a torch.Generator or None, got {type(generator).__name__}")


def nsp_pairs(documents: Sequence[Sequence[Sequence[int]]], max_length: int, *, cls_id: int, sep_id: int,
              generator: torch.Generator | random.Random | int | None = None,
              short_seq_prob: float = 0.0) -> list[tuple[list[int], list[int], int]]:
    """BERT's next-sentence-prediction examples: a list of ``(input_ids, token_type_ids, label)``.

    ``documents[d][s]`` is segment s (a sentence, a line, half a phrase; a list of token ids) of
    document d; :func:`text_documents` and :func:`sst2_documents` cut corpora into segments. For
    every segment A that has a next segment in its document, in order (Devlin et al., 2019,
    section 3.1): with probability 1/2, B is that next segment and the label is 0
    (:data:`NSP_IS_NEXT`); otherwise B is a random segment of another document (the document
    uniformly among the other non-empty ones, then the segment uniformly within it) and the
    label is 1 (:data:`NSP_NOT_NEXT`). Labels follow Hugging Face's ``next_sentence_label``.

    Each example is :func:`encode_pair`'s ``[CLS] A [SEP] B [SEP]``, token types 0 for
    ``[CLS] A [SEP]`` and 1 for ``B [SEP]``, at most ``max_length`` ids: the longer side loses
    tokens from its end (:func:`truncate_pair`). With ``short_seq_prob`` > 0 (BERT's
    ``create_pretraining_data.py`` uses 0.1) that fraction of the examples gets a shorter limit,
    ``3 + randint(2, max_length - 3)`` ids, so that the model also sees short inputs. Unlike
    BERT's script, which fills each side with several sentences up to the target length, a side
    here is one segment: the corpora of this course have short documents.

    Randomness: a ``random.Random`` (Python's Mersenne Twister): ``generator`` itself (advanced
    in place), one seeded with ``generator`` if it is an int, or one seeded with one 63-bit draw
    from a ``torch.Generator`` (torch's global generator if None). For each A, in order:
    ``rng.random() < 0.5`` means IsNext; otherwise ``rng.randrange`` picks the other document,
    then the segment; then, if ``short_seq_prob`` > 0, ``rng.random() < short_seq_prob`` draws
    the shorter limit with ``rng.randint``. The same seed gives the same examples.
    """
    if max_length < 3:
        raise ValueError(f"max_length must be at least 3 to hold [CLS] and two [SEP], got {max_length}")
    if not 0.0 <= short_seq_prob <= 1.0:
        raise ValueError(f"short_seq_prob must be between 0 and 1, got {short_seq_prob}")
    non_empty = [d for d, document in enumerate(documents) if len(document) > 0]
    if len(non_empty) < 2:
        raise ValueError(f"next-sentence prediction needs at least two non-empty documents to draw NotNext segments from, "
                         f"got {len(non_empty)}")
    rank = {d: k for k, d in enumerate(non_empty)}  # a document's place among the non-empty ones
    rng = _python_rng(generator)
    budget = max_length - 3  # ids left for A and B
    examples = []
    for d, document in enumerate(documents):
        for s in range(len(document) - 1):
            if rng.random() < 0.5:
                b, label = document[s + 1], NSP_IS_NEXT
            else:
                other = rng.randrange(len(non_empty) - 1)
                other = non_empty[other + (other >= rank[d])]  # uniform over the non-empty documents but d
                b, label = documents[other][rng.randrange(len(documents[other]))], NSP_NOT_NEXT
            limit = max_length
            if short_seq_prob > 0.0 and rng.random() < short_seq_prob:
                limit = 3 + rng.randint(min(2, budget), budget)
            input_ids, token_type_ids = encode_pair(document[s], b, cls_id=cls_id, sep_id=sep_id, max_length=limit)
            examples.append((input_ids, token_type_ids, label))
    return examples


def sst2_documents(phrases: Sequence[str], seed: int = 0, min_words: int = 2) -> list[list[str]]:
    """SST-2 phrases as two-segment documents for next-sentence prediction.

    SST-2's training set is 67,349 shuffled phrases with no document structure, so each phrase
    of at least ``min_words`` whitespace-separated words becomes a document of two segments,
    cut at a word boundary drawn uniformly with ``random.Random(seed).randint(1, n_words - 1)``
    (one draw per kept phrase, in order): "B follows A" means B is the rest of A's phrase.
    Shorter phrases are dropped; words are re-joined with single spaces.

    Documents hold strings, not ids: tokenizing is the caller's job (WordPiece, BPE or
    characters), and cutting at a word boundary in the text gives WordPiece the same pieces it
    would give the whole phrase. (A byte-level BPE tokenizes B's first word without the leading
    space it had inside the phrase.)
    """
    if min_words < 2:
        raise ValueError(f"min_words must be at least 2 to cut a phrase into two segments, got {min_words}")
    rng = random.Random(seed)
    documents = []
    for phrase in phrases:
        words = phrase.split()
        if len(words) >= min_words:
            cut = rng.randint(1, len(words) - 1)
            documents.append([" ".join(words[:cut]), " ".join(words[cut:])])
    return documents


def text_documents(text: str) -> list[list[str]]:
    """A text cut into documents at blank lines, each document a list of its lines (the segments).

    For Tiny Shakespeare a document is one speech: the speaker's name ("First Citizen:") and the
    lines spoken. Lines are stripped of surrounding whitespace; a line holding only whitespace
    counts as blank; line endings are normalized first (:data:`LINE_BREAKS`). Strings, not
    ids, as in :func:`sst2_documents`: the caller tokenizes each segment.
    """
    documents, current = [], []
    for line in LINE_BREAKS.sub("\n", text).split("\n"):
        if line.strip():
            current.append(line.strip())
        elif current:
            documents.append(current)
            current = []
    if current:
        documents.append(current)
    return documents


SENTENCE_BOUNDARY = re.compile(r"""([.!?]+["')\]]*)\s+(?=["'(\[]*[A-Z0-9])""")
"""A candidate sentence end: one or more of ``. ! ?``, closing quotes or brackets, whitespace, and
then (looked ahead, not consumed) a capital letter or a digit, perhaps after opening quotes or brackets."""

ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof st jr sr vs etc e.g i.e mt ft gen col lt sgt capt rev inc ltd co no vol approx".split())
"""Lowercased words that end in a period without ending a sentence ("Mr. Smith", "vs. Predator")."""


def split_sentences(text: str) -> list[str]:
    """Cut a text into sentences with a rule, as BERT's data preparation needs for next-sentence pairs.

    A sentence ends at :data:`SENTENCE_BOUNDARY` (``. ! ?``, then whitespace, then a capital or a
    digit), except after an abbreviation in :data:`ABBREVIATIONS` or a single capital letter (an
    initial: "J. R. R. Tolkien"). Nothing is lost: cuts fall only on whitespace, so the sentences
    joined by single spaces give back the text with its whitespace runs collapsed. A rule this small
    errs on purpose toward longer sentences: a missed boundary merges two sentences, which costs
    next-sentence prediction little; a wrong one would cut a sentence apart.
    """
    sentences, start = [], 0
    for match in SENTENCE_BOUNDARY.finditer(text):
        end = match.end(1)  # the sentence keeps its punctuation and closing quotes
        if match.group(1)[0] == ".":
            word = text[:match.start(1)].rsplit(None, 1)[-1] if text[:match.start(1)].strip() else ""
            if word.lower().lstrip("\"'(") in ABBREVIATIONS or (len(word) == 1 and word.isupper()):
                continue
        sentence = " ".join(text[start:end].split())
        if sentence:
            sentences.append(sentence)
        start = match.end()
    rest = " ".join(text[start:].split())
    if rest:
        sentences.append(rest)
    return sentences


def review_documents(reviews: Sequence[str]) -> list[list[str]]:
    """Reviews as documents for next-sentence prediction: each review a list of its sentences
    (:func:`split_sentences`), so "B follows A" means B is A's next sentence in the same review.
    Empty reviews are dropped. Strings, not ids, as in :func:`text_documents`."""
    return [sentences for sentences in map(split_sentences, reviews) if sentences]


def pack_segments(segments: Sequence[Sequence[int]], max_tokens: int) -> list[list[int]]:
    """Consecutive segments (sentences, as token ids) joined greedily into chunks of at most ``max_tokens``.

    BERT's ``create_pretraining_data.py`` fills each side of a pair with as many whole sentences as fit,
    so that its examples are nearly full length: every position embedding trains, and a batch holds
    little padding. Here each chunk takes sentences in order while the total stays within
    ``max_tokens``; a sentence longer than that becomes a chunk of its own (pairs truncate it later,
    :func:`truncate_pair`). The chunks, concatenated, are the segments concatenated: nothing is dropped
    or reordered. Feed the chunks of each document to :func:`nsp_pairs`.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
    chunks: list[list[int]] = []
    current: list[int] = []
    for segment in segments:
        if current and len(current) + len(segment) > max_tokens:
            chunks.append(current)
            current = []
        current = current + list(segment)
    if current:
        chunks.append(current)
    return chunks


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
