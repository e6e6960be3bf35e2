"""Masked language modelling (BERT, Devlin et al., 2019): the 80/10/10 corruption, optionally of whole words."""

from __future__ import annotations

from typing import Sequence

import torch

IGNORE_INDEX = -100
"""The label of a position the loss skips: the default ``ignore_index`` of ``torch.nn.functional.cross_entropy``."""

MLM_MASK_FRACTION = 0.8
"""Of the positions selected for prediction, this fraction becomes ``[MASK]`` (Devlin et al., 2019)."""

MLM_RANDOM_FRACTION = 0.1
"""Of the selected positions, this fraction becomes a random token; the remaining 0.1 keep their token."""


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
