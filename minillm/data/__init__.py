"""Data: reading and cleaning text, batches of sequences, language-model blocks, and BERT's pretraining data.

One idea per module; every public name is also importable from ``minillm.data`` itself::

    from minillm import data
    data.clean_text(text)             # minillm.data.cleaning
    data.pad_batch(sequences)         # minillm.data.padding

- :mod:`minillm.data.cleaning`: reading a text file (missing, empty and binary files refused with one
  sentence); control characters, whitespace, Unicode normalization, exact and near-exact line
  de-duplication (:func:`clean_text`), with a report of what each step changed.
- :mod:`minillm.data.padding`: truncation, padding and attention masks (:func:`pad_batch`), BERT's
  ``[CLS] A [SEP] B [SEP]`` with token types (:func:`encode_pair`, :func:`encode_pair_batch`).
- :mod:`minillm.data.lm_blocks`: token ids in a binary file opened as a numpy memmap
  (:func:`write_token_ids`, :func:`open_token_ids`), the 90/10 split (:func:`split_train_val`), random (x, y)
  batches from a seedable generator (:func:`sample_lm_batch`) and every block in order (:func:`iter_lm_blocks`).
- :mod:`minillm.data.masking`: masked-LM corruption, 80/10/10, optionally of whole words (:func:`mask_tokens`).
- :mod:`minillm.data.nsp`: corpora cut into documents of sentences (:func:`split_sentences`,
  :func:`review_documents`, :func:`text_documents`, :func:`sst2_documents`), packed into nearly full-length
  segments (:func:`pack_segments`), and next-sentence pairs (:func:`nsp_pairs`).

The shipped data sets, their readers, splits and the leak check are :mod:`minillm.datasets`.
"""

from minillm.data.cleaning import (
    CONTROL_CHARACTERS,
    HTML_LINE_BREAK,
    LINE_BREAKS,
    NORMALIZATION_FORMS,
    TRAILING_WHITESPACE,
    UNICODE_SPACES,
    ZERO_WIDTH,
    CleaningReport,
    CleaningStep,
    canonical_line,
    clean_text,
    clean_whitespace,
    dedup_lines,
    normalize_unicode,
    read_text_file,
    remove_control_characters,
)
from minillm.data.lm_blocks import (
    iter_lm_blocks,
    open_token_ids,
    sample_lm_batch,
    split_train_val,
    token_dtype,
    write_token_ids,
)
from minillm.data.masking import (
    IGNORE_INDEX,
    MLM_MASK_FRACTION,
    MLM_RANDOM_FRACTION,
    mask_tokens,
    word_starts_from_tokens,
)
from minillm.data.nsp import (
    ABBREVIATIONS,
    NSP_IS_NEXT,
    NSP_NOT_NEXT,
    SENTENCE_BOUNDARY,
    nsp_pairs,
    pack_segments,
    review_documents,
    split_sentences,
    sst2_documents,
    text_documents,
)
from minillm.data.padding import encode_pair, encode_pair_batch, pad_batch, truncate_pair

__all__ = [
    "ABBREVIATIONS", "CONTROL_CHARACTERS", "HTML_LINE_BREAK", "IGNORE_INDEX", "LINE_BREAKS", "MLM_MASK_FRACTION",
    "MLM_RANDOM_FRACTION", "NORMALIZATION_FORMS", "NSP_IS_NEXT", "NSP_NOT_NEXT", "SENTENCE_BOUNDARY",
    "TRAILING_WHITESPACE", "UNICODE_SPACES", "ZERO_WIDTH", "CleaningReport", "CleaningStep", "canonical_line",
    "clean_text", "clean_whitespace", "dedup_lines", "encode_pair", "encode_pair_batch", "iter_lm_blocks",
    "mask_tokens", "normalize_unicode", "nsp_pairs", "open_token_ids", "pack_segments", "pad_batch",
    "read_text_file", "remove_control_characters", "review_documents", "sample_lm_batch", "split_sentences",
    "split_train_val", "sst2_documents", "text_documents", "token_dtype", "truncate_pair", "word_starts_from_tokens",
    "write_token_ids",
]
