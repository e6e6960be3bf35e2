"""Language-model blocks over token ids: a binary id file opened as a numpy memmap (nanoGPT's ``train.bin``),
a 90/10 split, random (x, y) batches from a seedable generator, and every block in order for evaluation."""

from __future__ import annotations

import os
import pathlib
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from minillm import MinillmError
from minillm.files import atomic_replace, read_json, write_json


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
    n_tokens = 0
    with atomic_replace(path) as handle:  # the file appears only when complete
        for chunk in ids:
            chunk = np.asarray(chunk, dtype=np.int64)
            if chunk.size and (chunk.min() < 0 or chunk.max() >= vocab_size):
                bad = chunk[(chunk < 0) | (chunk >= vocab_size)][0]
                raise ValueError(f"token id {bad} is outside the vocabulary (0 .. {vocab_size - 1})")
            handle.write(chunk.astype(dtype).tobytes())
            n_tokens += chunk.size
        if n_tokens == 0:
            raise MinillmError(f"no token ids to write to {path}: the encoded corpus is empty")
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
