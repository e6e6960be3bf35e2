"""Reading and cleaning text: a text file read with one clear error, control characters, whitespace,
Unicode normalization, exact and near-exact line de-duplication, and a report of what each step changed."""

from __future__ import annotations

import difflib
import os
import pathlib
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from typing import Iterable

from minillm import MinillmError

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
