"""Turning text into integer ids.

Chapter 02 needs only the simplest tokenizer, a word vocabulary: split on whitespace, keep the
most frequent words, map the rest to ``[UNK]``. Chapter 03 adds characters, byte-level BPE
written from scratch, and the ``tokenizers`` library's BPE and WordPiece.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable

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
