"""Next-sentence prediction (BERT, Devlin et al., 2019): corpora cut into documents of sentences, packed into
nearly full-length segments, and the (A, B, IsNext / NotNext) pairs built from them."""

from __future__ import annotations

import random
import re
from typing import Sequence

import torch

from minillm.data.cleaning import LINE_BREAKS
from minillm.data.padding import encode_pair

NSP_IS_NEXT = 0
"""Next-sentence label: B is the segment that follows A (Hugging Face's ``next_sentence_label`` 0)."""

NSP_NOT_NEXT = 1
"""Next-sentence label: B is a random segment from another document."""


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
    ``3 + randint(2, max_length - 3)`` ids, so that the model also sees short inputs. A side is
    one segment. BERT's script fills each side with several sentences up to the target length;
    to do the same, pack each document's sentences into segments first (:func:`pack_segments`),
    as :func:`minillm.bert_pretraining.bert_task` does for every corpus but SST-2.

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
    counts as blank; line endings are normalized first (:data:`~minillm.data.cleaning.LINE_BREAKS`). Strings, not
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
