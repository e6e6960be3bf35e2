"""Activation checkpointing: keep each Transformer block's input, recompute the rest during the backward pass.

Chen, Xu, Zhang & Guestrin (2016), "Training Deep Nets with Sublinear Memory Cost". To differentiate, a training
step keeps every tensor its operations need for the backward pass: in a GPT block of width C over B x T tokens,
the LayerNorm inputs, q, k, v, the attention output, the 4C-wide MLP hidden layer before and after GELU, dropout
masks, ... about 15 B T C numbers per block, times n_layer blocks. With checkpointing a block keeps only its input
(B T C numbers) and, when the backward pass reaches it, runs its forward again to rebuild the rest:

    activation memory   ~ n_layer * 15 B T C   ->   n_layer * B T C  (+ one block's worth, while it is recomputed)
    compute per step    forward + backward (about 1 + 2)   ->   forward + forward + backward (about 4/3 as much)

Chen et al. checkpoint every sqrt(n) layers for O(sqrt n) memory; language-model trainers checkpoint every block.
:func:`enable_activation_checkpointing` runs each block under ``torch.utils.checkpoint.checkpoint`` (the
non-reentrant kind, which also restores the random state so that dropout draws the same masks when it recomputes);
:func:`measure_training_step` counts what a step keeps and times it, with and without.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from minillm import MinillmError
from minillm.gpt import Block
from minillm.layers import DecoderBlock, EncoderBlock
from minillm.memory import saved_tensors

BLOCK_TYPES = (Block, EncoderBlock, DecoderBlock)  # GPT's block; BERT's and the Transformer's encoder and decoder blocks


class RecomputedForward:
    """A block's own ``forward``, run under ``checkpoint`` while gradients are recorded. At inference (no gradients)
    it runs plainly: nothing is kept for a backward pass anyway, and a KV cache must not be filled twice."""

    def __init__(self, forward: Callable):
        self.forward = forward  # the block's forward, bound to the block

    def __call__(self, *args, **kwargs):
        if not torch.is_grad_enabled():
            return self.forward(*args, **kwargs)
        return checkpoint(self.forward, *args, use_reentrant=False, **kwargs)


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The Transformer blocks in ``model`` (:data:`BLOCK_TYPES`), bottom to top."""
    return [module for module in model.modules() if isinstance(module, BLOCK_TYPES)]


def is_checkpointed(block: nn.Module) -> bool:
    return isinstance(block.__dict__.get("forward"), RecomputedForward)


def enable_activation_checkpointing(model: nn.Module) -> int:
    """Make every Transformer block of ``model`` recompute its activations in the backward pass; returns the
    number of blocks. Nothing is added to the module tree: the blocks' ``forward`` is replaced on the instances,
    so the state dict's names, checkpoints and Hugging Face exports stay as they are. Calling it again changes
    nothing; :func:`disable_activation_checkpointing` undoes it."""
    blocks = transformer_blocks(model)
    if not blocks:
        names = ", ".join(block_type.__module__ + "." + block_type.__name__ for block_type in BLOCK_TYPES)
        raise MinillmError(f"activation checkpointing works block by block, and {type(model).__name__} holds no "
                           f"Transformer block ({names})")
    for block in blocks:
        if not is_checkpointed(block):
            block.forward = RecomputedForward(block.forward)
    return len(blocks)


def disable_activation_checkpointing(model: nn.Module) -> int:
    """Give every checkpointed block of ``model`` its plain forward back; returns how many there were."""
    blocks = [block for block in transformer_blocks(model) if is_checkpointed(block)]
    for block in blocks:
        del block.forward  # the class's forward shows through again
    return len(blocks)


# ---------------------------------------------------------------------------------------------
# Measuring: what a training step keeps for its backward pass, and how long it takes
# ---------------------------------------------------------------------------------------------


@dataclass
class StepCost:
    """What one forward + backward pass keeps and takes."""

    saved_bytes: int  # activations kept for the backward pass (every storage counted once, parameters not counted)
    saved_tensors: int  # how many distinct storages those are
    seconds: float  # forward + backward, the median of the timed repeats
    peak_bytes: int | None = None  # CUDA only: the most memory allocated during the step, above what was there before


def saved_activations(model: nn.Module, loss_of: Callable[[nn.Module], torch.Tensor]) -> tuple[int, int]:
    """``(bytes, storages)`` that one forward pass of ``loss_of(model)`` keeps for its backward pass, then runs the
    backward pass. Counted exactly, on any device, by :func:`minillm.memory.saved_tensors`: every tensor autograd
    saves, and every block's input (a checkpointed block keeps its input to recompute from, outside autograd's
    saved tensors); each storage once; parameters are not counted."""
    loss, kept = saved_tensors(model, lambda: loss_of(model), transformer_blocks(model))
    total, count = sum(tensor.untyped_storage().nbytes() for tensor in kept.values()), len(kept)
    kept.clear()
    loss.backward()
    return total, count


def measure_training_step(model: nn.Module, loss_of: Callable[[nn.Module], torch.Tensor], repeats: int = 3) -> StepCost:
    """Count what a forward + backward pass of ``loss_of(model)`` keeps (:func:`saved_activations`; that pass also
    warms up), then time ``repeats`` more passes, and on CUDA read ``torch.cuda.max_memory_allocated`` over them.
    Gradients are set to None around every pass. Time varies from run to run; the counts do not."""
    model.zero_grad(set_to_none=True)
    saved_bytes, saved_tensors = saved_activations(model, loss_of)
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    times = []
    for _ in range(repeats):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        loss_of(model).backward()
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) - before if cuda else None
    model.zero_grad(set_to_none=True)
    return StepCost(saved_bytes, saved_tensors, statistics.median(times), peak)


def compare_activation_checkpointing(model: nn.Module, loss_of: Callable[[nn.Module], torch.Tensor],
                                     repeats: int = 3) -> dict[str, StepCost]:
    """:func:`measure_training_step` of ``model`` as it is ("stored") and with every block checkpointed
    ("recomputed"); the model is left as it was found."""
    was_checkpointed = [is_checkpointed(block) for block in transformer_blocks(model)]
    disable_activation_checkpointing(model)
    results = {"stored": measure_training_step(model, loss_of, repeats)}
    enable_activation_checkpointing(model)
    results["recomputed"] = measure_training_step(model, loss_of, repeats)
    for block, checkpointed in zip(transformer_blocks(model), was_checkpointed):
        if not checkpointed:
            del block.forward
    return results
