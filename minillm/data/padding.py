"""Batches of sequences: truncation, padding, attention masks, and BERT's ``[CLS] A [SEP] B [SEP]`` pairs
with their token types."""

from __future__ import annotations

from typing import Sequence

import torch


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
