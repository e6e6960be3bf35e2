"""Turning text into integer ids: words, characters, byte-level BPE, and the ``tokenizers`` library.

- :class:`WordTokenizer` (chapter 02): split on whitespace, keep the most frequent words.
- :class:`CharTokenizer`: one id per distinct character of a corpus (nanoGPT's Shakespeare).
- :class:`BPETokenizer`: byte-level byte-pair encoding written from scratch (Sennrich et al.,
  2016, "Neural Machine Translation of Rare Words with Subword Units"; the byte-level variant of
  GPT-2, Radford et al., 2019). Any Unicode string round-trips exactly.
- :func:`train_library_bpe` and :func:`train_wordpiece`: the Rust ``tokenizers`` library's
  byte-level BPE and BERT's WordPiece, with the special tokens ``[PAD] [UNK] [CLS] [SEP] [MASK]``
  at ids 0-4 (:data:`SPECIAL_TOKENS`, :func:`special_token_ids`).

Every tokenizer saves to and loads from JSON; nothing here unpickles.
"""

from __future__ import annotations

import functools
import heapq
import json
import os
import pathlib
import re
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Iterable, Literal, NamedTuple, Sequence

from tqdm import tqdm

from minillm import MinillmError
from minillm.files import read_json, write_json

UNK = "[UNK]"


class WordTokenizer:
    """Whitespace word tokenizer over a fixed vocabulary; id 0 is ``[UNK]``.

    >>> tok = WordTokenizer.train(["a good movie", "a bad movie"], max_words=10)
    >>> tok.encode("a good film")
    [1, 3, 0]
    """

    def __init__(self, words: Iterable[str], lowercase: bool = True):
        self.lowercase = lowercase
        self.id_to_word = [UNK] + [w for w in words if w != UNK]
        self.word_to_id = {word: index for index, word in enumerate(self.id_to_word)}

    @classmethod
    def train(cls, texts: Iterable[str], max_words: int = 20_000, min_count: int = 1, lowercase: bool = True) -> "WordTokenizer":
        """Keep the ``max_words`` most frequent words seen at least ``min_count`` times (ties: first seen)."""
        counts: Counter[str] = Counter()
        for text in texts:
            counts.update((text.lower() if lowercase else text).split())
        words = [word for word, count in counts.most_common(max_words) if count >= min_count]
        return cls(words, lowercase=lowercase)

    def __len__(self) -> int:
        return len(self.id_to_word)

    def tokenize(self, text: str) -> list[str]:
        return (text.lower() if self.lowercase else text).split()

    def encode(self, text: str) -> list[int]:
        return [self.word_to_id.get(word, 0) for word in self.tokenize(text)]

    def decode(self, ids: Iterable[int]) -> str:
        return " ".join(self.id_to_word[i] for i in ids)


def _check_type(path: str | os.PathLike, obj: dict, expected: str) -> None:
    if not isinstance(obj, dict) or obj.get("type") != expected:
        raise MinillmError(f"{path} is not a saved {expected} (its 'type' is {obj.get('type') if isinstance(obj, dict) else None!r})")


def _read_json_file(path: str | os.PathLike) -> dict:
    if not pathlib.Path(path).is_file():
        raise MinillmError(f"tokenizer file {path} does not exist")
    try:
        return read_json(path)
    except ValueError as error:
        raise MinillmError(f"{path} is not valid JSON ({error})") from None


# ---------------------------------------------------------------------------------------------
# Characters
# ---------------------------------------------------------------------------------------------


class UnknownCharacterError(MinillmError, ValueError):
    """A character the :class:`CharTokenizer` never saw, with its position in the text."""


class CharTokenizer:
    """One id per character: the sorted distinct characters of a corpus (Karpathy's char-rnn, nanoGPT).

    ``unknown`` says what encoding a character outside the vocabulary does:

    - ``"error"`` (default): raise :class:`UnknownCharacterError` naming the character and its
      position; ids are ``0 .. n_chars-1`` in sorted character order.
    - ``"unk"``: map it to the reserved id 0, which decodes to U+FFFD (the Unicode replacement
      character); the characters then take ids ``1 .. n_chars``.

    >>> tok = CharTokenizer.train("hello")
    >>> tok.encode("hell"), tok.decode([3, 2, 1, 0])
    ([1, 0, 2, 2], 'olle')
    """

    UNK_CHAR = "\ufffd"

    def __init__(self, chars: Iterable[str], unknown: Literal["error", "unk"] = "error"):
        if unknown not in ("error", "unk"):
            raise ValueError(f"unknown must be 'error' or 'unk', got {unknown!r}")
        chars = sorted(set(chars))
        if any(len(c) != 1 for c in chars):
            raise ValueError("every vocabulary entry of a CharTokenizer must be a single character")
        self.unknown = unknown
        self.chars = chars
        self.id_to_char = ([self.UNK_CHAR] if unknown == "unk" else []) + chars
        self.char_to_id = {char: index for index, char in enumerate(self.id_to_char) if not (unknown == "unk" and index == 0)}

    @classmethod
    def train(cls, text: str, unknown: Literal["error", "unk"] = "error") -> "CharTokenizer":
        """The vocabulary is the sorted set of characters in ``text``."""
        return cls(set(text), unknown=unknown)

    @property
    def vocab_size(self) -> int:
        return len(self.id_to_char)

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str) -> list[int]:
        if self.unknown == "unk":
            return [self.char_to_id.get(char, 0) for char in text]
        try:
            return [self.char_to_id[char] for char in text]
        except KeyError as error:
            char = error.args[0]
            position = text.index(char)
            raise UnknownCharacterError(
                f"character {char!r} (U+{ord(char):04X}) at position {position} is not in the vocabulary of "
                f"{self.vocab_size} characters; build the tokenizer with unknown='unk' to map it to id 0") from None

    def decode(self, ids: Iterable[int]) -> str:
        chars, n = self.id_to_char, len(self.id_to_char)
        out = []
        for i in ids:
            if not 0 <= i < n:
                raise ValueError(f"id {i!r} is outside the vocabulary (0 .. {n - 1})")
            out.append(chars[i])
        return "".join(out)

    def token_strings(self, ids: Iterable[int]) -> list[str]:
        """Each token on its own, for display."""
        return list(self.decode(ids))

    def save(self, path: str | os.PathLike) -> pathlib.Path:
        return write_json(path, {"type": "CharTokenizer", "unknown": self.unknown, "chars": self.chars})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CharTokenizer":
        obj = _read_json_file(path)
        _check_type(path, obj, "CharTokenizer")
        try:
            return cls(obj["chars"], unknown=obj["unknown"])
        except (KeyError, TypeError, ValueError) as error:
            raise MinillmError(f"{path} is a damaged CharTokenizer file ({error!r})") from None


# ---------------------------------------------------------------------------------------------
# Byte-level BPE, from scratch
# ---------------------------------------------------------------------------------------------


@functools.cache
def _numeric_non_decimal() -> str:
    """A regex class body of the characters in Unicode categories Nl and No (², ½, Ⅻ, ...).

    Python's ``re`` has no ``\\p{N}``: its ``\\d`` is only Nd. Adding Nl and No makes our number
    class equal to GPT-2's ``\\p{N}``; they all lie below U+20000.
    """
    codes = [c for c in range(0x20000) if unicodedata.category(chr(c)) in ("Nl", "No")]
    ranges, start = [], codes[0]
    for previous, code in zip(codes, codes[1:] + [-1]):
        if code != previous + 1:
            ranges.append(re.escape(chr(start)) + ("" if start == previous else "-" + re.escape(chr(previous))))
            start = code
    return "".join(ranges)


@functools.cache
def gpt2_split_pattern() -> re.Pattern:
    r"""GPT-2's pre-tokenization regex, written for the standard library ``re`` module.

    GPT-2 (and ``tokenizers``' ByteLevel) split text with
    ``'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+``:
    English contractions, a run of letters, of numbers, or of other symbols (each optionally
    with one leading space), and whitespace (a run of spaces leaves its last space to the next
    word: ``\s+(?!\S)``). In ``re``, ``\w`` is exactly letters, numbers and ``_``, so letters are
    ``[^\W\d_]`` minus Nl/No, numbers ``\d`` plus Nl/No, other symbols ``[^\s\w]`` or ``_``.
    Combining marks are neither letters nor numbers, as in GPT-2. Every character is matched by
    one alternative, so the chunks concatenate back to the text; BPE merges never cross them.
    """
    numeric = _numeric_non_decimal()
    letter, number, other = rf"[^\W\d_{numeric}]", rf"[\d{numeric}]", r"(?:[^\s\w]|_)"
    return re.compile(rf"""'s|'t|'re|'ve|'m|'ll|'d| ?{letter}+| ?{number}+| ?{other}+|\s+(?!\S)|\s+""")


def pretokenize(text: str) -> list[str]:
    """Split ``text`` into GPT-2-style chunks; ``"".join(pretokenize(text)) == text``."""
    return gpt2_split_pattern().findall(text)


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for every byte: printable Latin-1 bytes are themselves, the rest
    (controls, space, ...) are shifted to U+0100 and up, so the space byte is ``Ġ`` and newline ``Ċ``.
    Used to write byte tokens as readable, reversible JSON strings (as GPT-2's vocab.json does)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    mapping, shift = {}, 0
    for byte in range(256):
        if byte in printable:
            mapping[byte] = chr(byte)
        else:
            mapping[byte] = chr(256 + shift)
            shift += 1
    return mapping


def merge_pair(ids: Sequence[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace every non-overlapping occurrence of ``pair``, scanning left to right, by ``new_id``."""
    out, i, n = [], 0, len(ids)
    while i < n:
        if i + 1 < n and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def _split_special(text: str, special_pattern: re.Pattern | None) -> list[str]:
    """Alternating [text, special, text, special, ..., text] pieces (specials at odd positions)."""
    return special_pattern.split(text) if special_pattern is not None else [text]


def _texts_iterator(texts: str | Iterable[str]) -> Iterable[str]:
    return [texts] if isinstance(texts, str) else texts


def count_chunks(texts: str | Iterable[str], special_tokens: Sequence[str] = ()) -> Counter[str]:
    """How often each pre-tokenized chunk occurs in ``texts``; special tokens are cut out first."""
    pattern = gpt2_split_pattern()
    special_pattern = _special_pattern(special_tokens)
    counts: Counter[str] = Counter()
    for text in _texts_iterator(texts):
        for piece in _split_special(text, special_pattern)[::2]:
            counts.update(pattern.findall(piece))
    return counts


def _special_pattern(special_tokens: Sequence[str]) -> re.Pattern | None:
    if not special_tokens:
        return None
    longest_first = sorted(special_tokens, key=len, reverse=True)  # "<|a|>b" before "<|a|>"
    return re.compile("(" + "|".join(re.escape(token) for token in longest_first) + ")")


class BPETokenizer:
    """Byte-level byte-pair encoding (Sennrich et al., 2016; GPT-2's byte-level form, Radford et al., 2019).

    Ids 0-255 are the bytes; id ``256 + r`` is the token made by merge ``r`` (``merges[r]`` is
    the pair of ids it joins); special tokens come last. Text is UTF-8 encoded, split into
    GPT-2-style chunks (:func:`gpt2_split_pattern`), and inside each chunk the merges are
    applied in the order they were learned. Since every byte is a token, nothing is ever
    unknown and ``decode(encode(s)) == s`` for every string ``s``.

    >>> tok = BPETokenizer.train("low lower lowest", vocab_size=260)
    >>> tok.decode(tok.encode("slowly")) == "slowly"
    True
    """

    def __init__(self, merges: Sequence[tuple[int, int]], special_tokens: Sequence[str] = ()):
        self.merges: dict[tuple[int, int], int] = {}  # pair -> the id of the token it makes (rank order)
        self.vocab: dict[int, bytes] = {byte: bytes([byte]) for byte in range(256)}
        for rank, (left, right) in enumerate(merges):
            new_id = 256 + rank
            if not (0 <= left < new_id and 0 <= right < new_id):
                raise ValueError(f"merge {rank} joins ids ({left}, {right}), but only ids below {new_id} exist at that point")
            self.merges[(left, right)] = new_id
            self.vocab[new_id] = self.vocab[left] + self.vocab[right]
        if len(self.merges) != len(merges):
            raise ValueError("the merge list contains the same pair twice")
        if len(set(special_tokens)) != len(special_tokens) or "" in special_tokens:
            raise ValueError(f"special tokens must be distinct non-empty strings, got {list(special_tokens)}")
        self.special_tokens = {token: 256 + len(merges) + index for index, token in enumerate(special_tokens)}
        for token, index in self.special_tokens.items():
            self.vocab[index] = token.encode("utf-8")
        self._special_pattern = _special_pattern(list(special_tokens))
        self._cache: dict[str, list[int]] = {}

    # -- training ------------------------------------------------------------------------------

    @classmethod
    def train(cls, texts: str | Iterable[str], vocab_size: int, special_tokens: Sequence[str] = (),
              min_frequency: int = 2, progress: bool = False) -> "BPETokenizer":
        """Learn ``vocab_size - 256 - len(special_tokens)`` merges from ``texts`` (a string or an iterable of them).

        The algorithm (Sennrich et al., 2016, Algorithm 1): start from bytes; repeatedly find the
        most frequent adjacent pair of tokens and merge it into a new token. Pairs are counted
        inside pre-tokenized chunks only, over the distinct chunks weighted by their frequency:
        :math:`\\mathrm{count}(a, b) = \\sum_w f_w \\cdot \\#\\{i : w_i = a, w_{i+1} = b\\}`.

        Ties: among pairs with equal counts the smallest ``(left id, right id)`` wins. Training
        stops early (a smaller vocabulary) when no pair occurs ``min_frequency`` times.

        Speed: a merge changes only the chunks that contain its pair. An index pair -> chunks
        finds them; their old pairs are subtracted from the counts and their new pairs added; a
        max-heap of (count, pair) with lazy deletion (entries whose count is out of date are
        skipped) gives the next best pair. No full recount per merge.
        """
        n_merges = vocab_size - 256 - len(special_tokens)
        if n_merges < 0:
            raise ValueError(f"vocab_size must be at least 256 + {len(special_tokens)} special tokens, got {vocab_size}")
        if min_frequency < 1:
            raise ValueError(f"min_frequency must be at least 1, got {min_frequency}")
        chunk_counts = count_chunks(texts, special_tokens)
        words = [list(chunk.encode("utf-8")) for chunk in chunk_counts]
        freqs = list(chunk_counts.values())

        pair_counts: dict[tuple[int, int], int] = defaultdict(int)
        words_with: dict[tuple[int, int], set[int]] = defaultdict(set)  # pair -> indices of words that (may) contain it
        for index, word in enumerate(words):
            for pair in zip(word, word[1:]):
                pair_counts[pair] += freqs[index]
                words_with[pair].add(index)
        heap = [(-count, pair) for pair, count in pair_counts.items()]
        heapq.heapify(heap)

        merges: list[tuple[int, int]] = []
        bar = tqdm(total=n_merges, desc="BPE merges", disable=None if progress else True)
        while len(merges) < n_merges and heap:
            negative_count, pair = heapq.heappop(heap)
            if pair_counts.get(pair, 0) != -negative_count:
                continue  # a stale entry: this pair's count changed after it was pushed
            if -negative_count < min_frequency:
                break
            new_id = 256 + len(merges)
            merges.append(pair)
            bar.update()
            changed: set[tuple[int, int]] = set()
            for index in words_with.pop(pair):
                word = words[index]
                new_word = merge_pair(word, pair, new_id)
                if len(new_word) == len(word):
                    continue  # the index was stale: the pair left this word in an earlier merge
                freq = freqs[index]
                for old_pair in zip(word, word[1:]):
                    pair_counts[old_pair] -= freq
                    changed.add(old_pair)
                for new_pair in zip(new_word, new_word[1:]):
                    pair_counts[new_pair] += freq
                    changed.add(new_pair)
                    words_with[new_pair].add(index)
                words[index] = new_word
            for changed_pair in changed:
                count = pair_counts[changed_pair]
                if count > 0:
                    heapq.heappush(heap, (-count, changed_pair))
                else:
                    del pair_counts[changed_pair]
        bar.close()
        return cls(merges, special_tokens)

    # -- encoding and decoding -----------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def __len__(self) -> int:
        return self.vocab_size

    def _encode_chunk(self, chunk: str) -> list[int]:
        """Apply the merges to one chunk, lowest rank first: find the adjacent pair with the
        smallest rank, merge all its occurrences, repeat until no adjacent pair is a merge.
        (The same result as applying every merge in rank order, which is how training made them.)"""
        cached = self._cache.get(chunk)
        if cached is not None:
            return cached
        try:
            ids = list(chunk.encode("utf-8"))
        except UnicodeEncodeError as error:
            raise ValueError(f"the text contains a lone surrogate {chunk[error.start]!r}, which UTF-8 cannot encode") from None
        merges = self.merges
        while len(ids) >= 2:
            pair = min(zip(ids, ids[1:]), key=lambda p: merges.get(p, 1 << 62))
            if pair not in merges:
                break
            ids = merge_pair(ids, pair, merges[pair])
        if len(self._cache) >= 200_000:  # bound the memory a long stream of new chunks can take
            self._cache.clear()
        self._cache[chunk] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``. Special tokens appearing in the text become their single ids."""
        pattern = gpt2_split_pattern()
        ids: list[int] = []
        for position, piece in enumerate(_split_special(text, self._special_pattern)):
            if position % 2:
                ids.append(self.special_tokens[piece])
            else:
                for chunk in pattern.findall(piece):
                    ids.extend(self._encode_chunk(chunk))
        return ids

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The exact bytes the ids stand for."""
        vocab = self.vocab
        try:
            return b"".join([vocab[i] for i in ids])
        except KeyError as error:
            raise ValueError(f"id {error.args[0]!r} is outside the vocabulary (0 .. {self.vocab_size - 1})") from None

    def decode(self, ids: Iterable[int]) -> str:
        """The text the ids stand for. A sequence that cuts a multi-byte UTF-8 character (as a
        slice of ids, or a model's sample, may) does not raise: each invalid byte sequence
        becomes U+FFFD, Python's ``errors="replace"``. Whole encodings always decode exactly."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_strings(self, ids: Iterable[int]) -> list[str]:
        """Each token on its own, for display (a token that is part of a character shows as U+FFFD)."""
        return [self.vocab[i].decode("utf-8", errors="replace") for i in ids]

    # -- files ---------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> pathlib.Path:
        """JSON: the merges in order as id pairs, the vocabulary as GPT-2-style strings -> id, the special tokens."""
        return write_json(path, {"type": "BPETokenizer", "pretokenizer": "gpt2", "special_tokens": self.special_tokens,
                                 "merges": [list(pair) for pair in self.merges], "vocab": _gpt2_vocab(self)})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "BPETokenizer":
        """Rebuild from the merges; the stored vocabulary must agree with them (a check on the file)."""
        obj = _read_json_file(path)
        _check_type(path, obj, "BPETokenizer")
        if obj.get("pretokenizer") != "gpt2":
            raise MinillmError(f"{path} uses pre-tokenizer {obj.get('pretokenizer')!r}; this version knows only 'gpt2'")
        try:
            specials = sorted(obj["special_tokens"], key=obj["special_tokens"].get)
            tokenizer = cls([tuple(pair) for pair in obj["merges"]], specials)
        except (KeyError, TypeError, ValueError) as error:
            raise MinillmError(f"{path} is a damaged BPETokenizer file ({error!r})") from None
        if obj.get("vocab") != _gpt2_vocab(tokenizer) or obj["special_tokens"] != tokenizer.special_tokens:
            raise MinillmError(f"{path} is inconsistent: its vocabulary does not follow from its merges")
        return tokenizer


def load_tokenizer(path: str | os.PathLike) -> "CharTokenizer | BPETokenizer":
    """A :class:`CharTokenizer` or :class:`BPETokenizer` file, whichever ``path`` holds (its ``type``)."""
    kind = _read_json_file(path).get("type")
    classes = {"CharTokenizer": CharTokenizer, "BPETokenizer": BPETokenizer}
    if kind not in classes:
        raise MinillmError(f"{path} is not a saved CharTokenizer or BPETokenizer (its 'type' is {kind!r})")
    return classes[kind].load(path)


def _gpt2_vocab(tokenizer: BPETokenizer) -> dict[str, int]:
    """Byte and merged tokens as GPT-2-style strings (``Ġthe``), the form ``tokenizers`` uses too."""
    byte_char = bytes_to_unicode()
    return {"".join(byte_char[b] for b in tokenizer.vocab[i]): i for i in range(256 + len(tokenizer.merges))}


# ---------------------------------------------------------------------------------------------
# The `tokenizers` library: byte-level BPE and WordPiece with BERT's special tokens
# ---------------------------------------------------------------------------------------------

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


class SpecialTokenIds(NamedTuple):
    """The ids of ``[PAD] [UNK] [CLS] [SEP] [MASK]`` in a library tokenizer (0-4 when trained here)."""

    pad: int
    unk: int
    cls: int
    sep: int
    mask: int


def train_library_bpe(texts: str | Iterable[str], vocab_size: int, min_frequency: int = 2,
                      special_tokens: Sequence[str] = SPECIAL_TOKENS):
    """The ``tokenizers`` library's byte-level BPE (GPT-2's: ByteLevel pre-tokenizer and decoder,
    all 256 bytes in the alphabet), trained on ``texts``; special tokens take the first ids.

    Deterministic: the same texts and settings give the same tokenizer file in every process.
    The trainer numbers the special tokens, then its alphabet sorted by code point, then each
    merged token as it is made, and among equally frequent pairs merges the smallest (left id,
    right id). Here every character of a pre-tokenized word is one of the 256 byte characters of
    the initial alphabet, so all starting ids come from that sorted alphabet, never from the
    (per-process randomised) order of the trainer's word hash map. Contrast :func:`train_wordpiece`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=UNK if UNK in special_tokens else None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(_texts_iterator(texts), trainer=trainer)
    return tokenizer


def _trained_wordpiece(texts: list[str], vocab_size: int, min_frequency: int, special_tokens: list[str]):
    """One run of the library's WordPiece trainer on ``texts``, with BERT's normalizer and pre-tokenizer."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.WordPiece(unk_token=UNK, continuing_subword_prefix="##"))
    tokenizer.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=special_tokens,
                                        continuing_subword_prefix="##", show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def train_wordpiece(texts: str | Iterable[str], vocab_size: int, min_frequency: int = 2,
                    special_tokens: Sequence[str] = SPECIAL_TOKENS):
    """BERT's WordPiece from the ``tokenizers`` library (Devlin et al., 2019; Wu et al., 2016).

    BERT-style normalizer (lowercase, strip accents, clean control characters, spaces around CJK
    characters), split on whitespace and punctuation, ``##`` marks a piece that continues a
    word, ``[UNK]`` for a word it cannot spell. Lowercasing and dropping whitespace make it
    lossy: ``decode(encode(s))`` is a normalized ``s``. Special tokens take ids 0, 1, ...
    (``[PAD] [UNK] [CLS] [SEP] [MASK]`` = 0-4 by default). Encodings carry no [CLS]/[SEP]:
    :func:`minillm.data.encode_pair` builds BERT's inputs from the ids.

    Deterministic: the same texts and settings give a byte-identical tokenizer file in every
    process. The ids are: the special tokens, the characters (sorted by code point), the
    ``##`` characters (sorted likewise), then the learned pieces in the order they were merged;
    among equally frequent pairs the smallest (left id, right id) is merged first.

    Why it takes two runs of the library's trainer: the trainer (a BPE trainer underneath) sorts
    the characters, but numbers each ``##c`` continuation token when it first meets it while
    walking its word-count hash map, whose order Rust randomises per process and per map (even
    with one thread). Those ids decide which of two equally frequent pairs is merged first, and
    an early tie changes later counts, so not only the ids but the vocabulary itself varied
    between runs (e.g. 6 of 5,000 tokens trained on 3,000 SST-2 phrases). The first run, with
    vocabulary size 0, learns no merges: its vocabulary is exactly the alphabet and its ``##``
    form. The second run gets them, sorted, after the real special tokens in the trainer's
    ``special_tokens``, which the trainer numbers first and in the order given, so no id depends
    on hash order. That changes nothing but the numbering: the trainer's special tokens only
    reserve ids (it reads the text through the normalizer and pre-tokenizer alone) and the
    trainer would have made these very tokens anyway, each counting once towards
    ``vocab_size``. Afterwards they are dropped from the tokenizer's added (special) tokens, so
    they stay ordinary vocabulary entries. ``texts`` is read twice (an iterator is first made
    into a list), which doubles the training time.
    """
    from tokenizers import Tokenizer

    texts = list(_texts_iterator(texts))
    specials = list(dict.fromkeys(special_tokens))
    found = [token for token in _trained_wordpiece(texts, 0, min_frequency, specials).get_vocab() if token not in specials]
    alphabet = sorted(token for token in found if len(token) == 1)
    continuations = sorted(token for token in found if len(token) == 3 and token.startswith("##"))
    unexpected = set(found) - set(alphabet) - set(continuations)  # a run with vocabulary size 0 merges nothing
    if unexpected:
        raise RuntimeError(f"the tokenizers library's WordPiece alphabet holds unexpected tokens {sorted(unexpected)[:5]}")
    tokenizer = _trained_wordpiece(texts, vocab_size, min_frequency, specials + alphabet + continuations)
    saved = json.loads(tokenizer.to_str())
    saved["added_tokens"] = [token for token in saved["added_tokens"] if token["content"] in specials]
    return Tokenizer.from_str(json.dumps(saved))


def save_library_tokenizer(tokenizer, path: str | os.PathLike) -> pathlib.Path:
    """Save a ``tokenizers.Tokenizer`` as its single JSON file (atomically)."""
    from minillm.files import atomic_write_text

    return atomic_write_text(path, tokenizer.to_str(pretty=True))


def load_library_tokenizer(path: str | os.PathLike):
    """Load a ``tokenizers.Tokenizer`` JSON file; a clear error if it is missing or not one."""
    from tokenizers import Tokenizer

    if not pathlib.Path(path).is_file():
        raise MinillmError(f"tokenizer file {path} does not exist")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as error:  # the Rust side raises a bare Exception
        raise MinillmError(f"{path} is not a tokenizers JSON file ({error})") from None


def encode_ids(tokenizer, text: str) -> list[int]:
    """``text`` as token ids, for minillm's tokenizers (``encode`` gives ids) and the library's (an ``Encoding``)."""
    encoded = tokenizer.encode(text)
    return list(encoded.ids) if hasattr(encoded, "ids") else list(encoded)


def tokenizer_size(tokenizer) -> int:
    """How many ids a tokenizer of either kind can produce (the library's ``get_vocab_size``, or ``len``)."""
    return tokenizer.get_vocab_size() if hasattr(tokenizer, "get_vocab_size") else len(tokenizer)


def special_token_ids(tokenizer) -> SpecialTokenIds:
    """The ids of ``[PAD] [UNK] [CLS] [SEP] [MASK]`` in a library tokenizer; an error names any that is missing."""
    if not hasattr(tokenizer, "token_to_id"):
        raise MinillmError(f"a {type(tokenizer).__name__} has no [CLS], [SEP] or [MASK] tokens: BERT needs a "
                           "WordPiece tokenizer (a 'pretrain bert' run's tokenizer.json)")
    ids = [tokenizer.token_to_id(token) for token in SPECIAL_TOKENS]
    missing = [token for token, index in zip(SPECIAL_TOKENS, ids) if index is None]
    if missing:
        raise MinillmError(f"the tokenizer has no {', '.join(missing)} token")
    return SpecialTokenIds(*ids)


# ---------------------------------------------------------------------------------------------
# Comparing tokenizers
# ---------------------------------------------------------------------------------------------


@dataclass
class Compression:
    """How many tokens a tokenizer needs for a text: fewer tokens = longer context for the same cost."""

    n_chars: int
    n_bytes: int  # UTF-8
    n_tokens: int

    @property
    def tokens_per_char(self) -> float:
        return self.n_tokens / self.n_chars

    @property
    def chars_per_token(self) -> float:
        return self.n_chars / self.n_tokens

    @property
    def bytes_per_token(self) -> float:
        return self.n_bytes / self.n_tokens


def compression(text: str, ids: Sequence[int]) -> Compression:
    """Compression of ``text`` encoded as ``ids`` (either may not be empty)."""
    if not text or not ids:
        raise ValueError("compression needs a non-empty text and its non-empty encoding")
    return Compression(len(text), len(text.encode("utf-8")), len(ids))


def bpe_vocab_overlap(ours: BPETokenizer, library) -> dict[str, int]:
    """How many merged (multi-byte) tokens our BPE and a library byte-level BPE share.

    Both spell tokens with GPT-2's byte-to-character map, so the vocabularies compare as strings.
    """
    our_tokens = {token for token, i in _gpt2_vocab(ours).items() if i >= 256}
    alphabet = set(bytes_to_unicode().values())
    library_tokens = {token for token in library.get_vocab() if token not in SPECIAL_TOKENS and token not in alphabet}
    return {"ours": len(our_tokens), "library": len(library_tokens), "shared": len(our_tokens & library_tokens)}
