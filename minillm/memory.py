"""Where a GPT's training memory goes: parameters, gradients, optimizer states, activations, and how sharding splits them.

Training with AdamW keeps, for each of the model's Φ parameters,

- the weight itself, its gradient, and AdamW's two moments m and v (Kingma & Ba, 2015): in fp32 that is
  4 + 4 + 4 + 4 = **16 bytes per parameter**;
- with PyTorch's automatic mixed precision (``torch.autocast`` to bf16 or fp16, what minillm's Trainer does) the
  same fp32 weights, gradients and moments, plus a 16-bit copy of every matrix a matmul reads, made in the
  forward pass and kept for the backward: 16 + 2 bytes per matmul parameter;
- in the accounting of the ZeRO paper (Rajbhandari et al., 2020, "ZeRO: Memory Optimizations Toward Training
  Trillion Parameter Models"), 16-bit weights and gradients plus fp32 master weights and moments:
  2 + 2 + (4 + 4 + 4) = 16 bytes, "16Φ".

Data parallelism (DDP) repeats all of it on every one of N ranks. ZeRO shards it: stage 1 splits the optimizer
states (w + g + o/N bytes per parameter), stage 2 the gradients too (w + (g + o)/N), stage 3 the weights as well
((w + g + o)/N: 16Φ/N), which is what FSDP does (``--parallel fsdp``).

Activations are what the forward pass saves for the backward pass. They grow with the tokens in a batch and do
not shrink with data-parallel ranks (each rank has its own batch). For minillm's GPT (learned positions, dropout 0,
PyTorch's fused attention, which keeps no T x T matrix) they are, per token,

- per block, in fp32: 16·C + n_head + 4 numbers of 4 bytes: the block's input and the attention's output (the
  residual stream, 2C), the two LayerNorms' inputs and outputs (4C) and statistics (mean and 1/σ, 4), q, k and v
  (3C) and the attention's output (C) and log-sum-exp (n_head), the MLP's input (C) and its two 4C-wide hidden
  tensors (8C) (one LayerNorm's output is the attention's input, etc.: each saved tensor counted once);
- under 16-bit autocast: the LayerNorms' inputs and statistics stay fp32 (2C·4 + 4·4 bytes), the log-sum-exp fp32
  (n_head·4), and the 14·C numbers that matmuls and attention read are 16-bit (14C·2): 36·C + 4·n_head + 16 bytes;
- outside the blocks: the token ids and targets (int64, 8 + 8), ``ln_f``'s input and statistics (4C + 8), the
  output layer's input (C numbers), and the log-softmax over the vocabulary (V fp32 numbers).

Activation checkpointing (Chen et al., 2016) keeps only each block's input (C numbers per token per block) and
recomputes the rest, one block at a time, during the backward pass: the per-block term becomes C numbers, plus
one block's worth during its recomputation. :func:`saved_activation_bytes` counts what autograd really saves,
which is how the tests check these formulas.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import torch

from minillm.gpt import GPTConfig

Precision = Literal["fp32", "amp", "zero-mixed"]
Sharding = Literal["ddp", "zero1", "zero2", "zero3"]

PRECISIONS: dict[str, str] = {
    "fp32": "fp32 weights, gradients and AdamW moments",
    "amp": "autocast to bf16/fp16: fp32 states + 16-bit copies of the matrices",
    "zero-mixed": "16-bit weights and gradients, fp32 master weights and moments (ZeRO's 16Φ)",
}
SHARDINGS: dict[str, str] = {
    "ddp": "DDP: everything on every rank",
    "zero1": "ZeRO-1: optimizer states sharded",
    "zero2": "ZeRO-2: + gradients sharded",
    "zero3": "ZeRO-3 / FSDP: + weights sharded",
}
GiB = 1024**3


def parameter_count(config: GPTConfig) -> int:
    """Φ, the GPT's parameter count (tied output layer counted once), from its sizes alone:

    .. math::  Φ = VC + T_{max}C + L(12C^2 + 2·2C) + 2C + [\\text{bias}]\\; L(9C + 2C) + [\\text{untied}]\\; VC

    per block the four matrices (3C² + C² + 4C² + 4C²) and two LayerNorm gains; with biases, the linear layers'
    (3C + C + 4C + C) and the LayerNorms' (2C); ``ln_f``'s gain (and bias)."""
    C, L = config.n_embd, config.n_layer
    norms = 2 if config.bias else 1  # a LayerNorm has a gain, and a bias with bias=True
    count = config.vocab_size * C + L * (12 * C * C + 2 * norms * C) + norms * C
    if config.positions == "learned":
        count += config.block_size * C
    if config.bias:
        count += L * (3 * C + C + 4 * C + C)
    if not config.tie_weights:
        count += config.vocab_size * C
    return count


def matmul_parameter_count(config: GPTConfig) -> int:
    """The parameters a matmul reads, which autocast copies to 16 bits: the blocks' four matrices and the output
    layer (the token embedding, when tied): :math:`12LC^2 + VC`."""
    return 12 * config.n_layer * config.n_embd**2 + config.vocab_size * config.n_embd


def state_bytes_per_parameter(precision: Precision) -> dict[str, float]:
    """Bytes per parameter of the weights, gradients and AdamW states (see the module docstring); under ``amp``
    the 16-bit copies are counted separately (:func:`matmul_parameter_count` x 2 bytes)."""
    if precision == "zero-mixed":
        return {"weights": 2, "gradients": 2, "optimizer": 12}
    if precision in ("fp32", "amp"):
        return {"weights": 4, "gradients": 4, "optimizer": 8}
    raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


def _check_formula_applies(config: GPTConfig) -> None:
    if config.positions != "learned" or config.dropout != 0:
        raise ValueError("the activation formula is for learned positions and dropout 0 (rotary positions and dropout "
                         f"masks save more), got positions={config.positions!r}, dropout={config.dropout}")


def activation_bytes_per_token(config: GPTConfig, precision: Precision = "fp32",
                               activation_checkpointing: bool = False) -> dict[str, float]:
    """Bytes saved for the backward pass per token: ``per_block``, ``outside`` the blocks (embeddings, ``ln_f``, the
    output layer and the loss), and ``recompute`` (one block's worth, alive only while activation checkpointing
    recomputes a block). The formulas are in the module docstring."""
    _check_formula_applies(config)
    C, n_head, V = config.n_embd, config.n_head, config.vocab_size
    sixteen_bit = precision in ("amp", "zero-mixed")
    block = (36 * C + 4 * n_head + 16) if sixteen_bit else 4 * (16 * C + n_head + 4)
    head_input = (2 if sixteen_bit else 4) * C  # the output layer reads ln_f's output, cast to 16 bits under autocast
    outside = 8 + 8 + (4 * C + 8) + head_input + 4 * V
    if activation_checkpointing:
        return {"per_block": 4 * C, "outside": outside, "recompute": block}
    return {"per_block": block, "outside": outside, "recompute": 0}


@dataclass
class MemoryEstimate:
    """Bytes per rank of one training step's peak, by kind."""

    weights: float
    gradients: float
    optimizer: float
    weight_copies: float  # autocast's 16-bit copies of the matrices (amp only)
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.weight_copies + self.activations

    def as_gib(self) -> dict[str, float]:
        return {name: value / GiB for name, value in {**self.__dict__, "total": self.total}.items()}


def model_state_bytes(phi: float, precision: Precision = "zero-mixed", ranks: int = 1,
                      sharding: Sharding = "ddp") -> dict[str, float]:
    """Bytes per rank of the weights, gradients and optimizer states of Φ parameters on ``ranks`` ranks:

    .. math::  Φ(w + g + o)\\ \\text{(DDP)},\\quad Φ(w + g + \\tfrac{o}{N}),\\quad Φ(w + \\tfrac{g + o}{N}),
               \\quad \\tfrac{Φ(w + g + o)}{N}\\ \\text{(ZeRO-1, 2, 3)}

    with w, g, o the bytes per parameter of :func:`state_bytes_per_parameter` (ZeRO's 2, 2 and 12: 16Φ)."""
    if ranks < 1:
        raise ValueError(f"ranks must be at least 1, got {ranks}")
    if sharding not in SHARDINGS:
        raise ValueError(f"sharding must be one of {', '.join(SHARDINGS)}, got {sharding!r}")
    divided = {"ddp": (), "zero1": ("optimizer",), "zero2": ("optimizer", "gradients"),
               "zero3": ("optimizer", "gradients", "weights")}[sharding]
    return {kind: phi * size / (ranks if kind in divided else 1)
            for kind, size in state_bytes_per_parameter(precision).items()}


def training_memory(config: GPTConfig, tokens_per_rank: int, precision: Precision = "fp32", ranks: int = 1,
                    sharding: Sharding = "ddp", activation_checkpointing: bool = False) -> MemoryEstimate:
    """The memory each of ``ranks`` processes needs to train ``config`` with AdamW on ``tokens_per_rank`` tokens at a
    time (micro-batch size x context), under ZeRO stage ``sharding``: :func:`model_state_bytes`, autocast's 16-bit
    copies of the matrices (``amp``: made from the whole, gathered matrices, and kept for the backward pass, so
    sharding does not divide them either), and the activations (:func:`activation_bytes_per_token`), which sharding
    does not divide."""
    if tokens_per_rank < 1:
        raise ValueError(f"tokens_per_rank must be at least 1, got {tokens_per_rank}")
    states = model_state_bytes(parameter_count(config), precision, ranks, sharding)
    copies = 2 * matmul_parameter_count(config) if precision == "amp" else 0
    acts = activation_bytes_per_token(config, precision, activation_checkpointing)
    activations = tokens_per_rank * (config.n_layer * acts["per_block"] + acts["outside"] + acts["recompute"])
    return MemoryEstimate(states["weights"], states["gradients"], states["optimizer"], copies, activations)


def memory_table(config: GPTConfig, tokens_per_rank: int, ranks: int, precision: Precision = "zero-mixed") -> str:
    """A Markdown table of :func:`training_memory` per rank, in GiB, for one rank and for DDP and ZeRO-1/2/3 on
    ``ranks`` ranks."""
    rows = ["| setup | weights | gradients | optimizer | 16-bit copies | activations | total |",
            "|---|--:|--:|--:|--:|--:|--:|"]
    setups = [("one process", 1, "ddp")] + [(f"{SHARDINGS[s].split(':')[0]}, {ranks} ranks", ranks, s) for s in SHARDINGS]
    for name, n, sharding in setups:
        gib = training_memory(config, tokens_per_rank, precision, n, sharding).as_gib()
        rows.append(f"| {name} | " + " | ".join(f"{gib[k]:.2f}" for k in
                                                ("weights", "gradients", "optimizer", "weight_copies", "activations",
                                                 "total")) + " |")
    return "\n".join(rows)


def plot_memory_per_rank(config: GPTConfig, tokens_per_rank: int, path: str | os.PathLike,
                         ranks: Sequence[int] = (1, 2, 4, 8, 16, 32, 64), precision: Precision = "zero-mixed",
                         title: str = "Training memory per rank") -> pathlib.Path:
    """Total GiB per rank against the number of ranks (log scale), one line per sharding stage, and the
    activations, which no stage divides, as a dashed floor."""
    from matplotlib.figure import Figure

    from minillm.plots import save_figure

    fig = Figure(figsize=(7, 4.2))
    ax = fig.add_subplot()
    for sharding, label in SHARDINGS.items():
        totals = [training_memory(config, tokens_per_rank, precision, n, sharding).total / GiB for n in ranks]
        ax.plot(list(ranks), totals, marker="o", label=label)
    activations = training_memory(config, tokens_per_rank, precision).activations / GiB
    ax.axhline(activations, color="grey", linestyle="--", label="activations alone")
    ax.set_xscale("log", base=2)
    ax.set_ylim(bottom=0)
    ax.set(xlabel="ranks N", ylabel="GiB per rank", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


# ---------------------------------------------------------------------------------------------
# Measuring: what autograd saves, what the optimizer holds
# ---------------------------------------------------------------------------------------------


def saved_tensors(model: torch.nn.Module, compute_loss: Callable[[], torch.Tensor],
                  blocks: Sequence[torch.nn.Module] = ()) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Run ``compute_loss()`` and return its loss and what its backward pass will read: ``{storage address: a
    tensor on it}`` for every tensor autograd saves (each storage once, so q, k and v, views of one tensor, count
    once), leaving out ``model``'s parameters, and the inputs of ``blocks`` (a checkpointed block keeps its input
    to recompute from, outside autograd's saved tensors; a plain block's first layer saves it anyway). Counted
    with :func:`torch.autograd.graph.saved_tensors_hooks`; the tensors are held, so no address is reused."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, torch.Tensor] = {}

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().data_ptr() not in parameters:
            kept.setdefault(tensor.untyped_storage().data_ptr(), tensor)
        return tensor

    def keep_block_input(block, args, kwargs):
        for value in (*args, *kwargs.values()):
            if isinstance(value, torch.Tensor) and value.requires_grad:
                keep(value)

    handles = [block.register_forward_pre_hook(keep_block_input, with_kwargs=True) for block in blocks]
    try:
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
            loss = compute_loss()
    finally:
        for handle in handles:
            handle.remove()
    return loss, kept


def saved_activation_bytes(model: torch.nn.Module, compute_loss: Callable[[], torch.Tensor]) -> int:
    """Bytes of the tensors autograd saves for the backward pass while ``compute_loss()`` runs a forward pass
    (:func:`saved_tensors`; the graph is then dropped without a backward pass).

    These are a training step's activations: what the backward pass will read (a linear layer's input, to form its
    weight's gradient; a softmax's output; ...). Autograd saves only what some gradient needs, so the memory depends
    on what trains: with every weight frozen but the head, the body's activations are not saved at all (chapter 09).
    Under autocast the 16-bit copies of the weights are new tensors and count: :func:`split_saved_bytes` tells them
    apart.
    """
    _, kept = saved_tensors(model, compute_loss)
    return sum(tensor.untyped_storage().nbytes() for tensor in kept.values())


def split_saved_bytes(model: torch.nn.Module, compute_loss: Callable[[], torch.Tensor]) -> dict[str, int]:
    """What autograd saves while ``compute_loss()`` runs, split into ``activations`` and ``weight_copies`` (16-bit saved
    tensors shaped like the weight of one of ``model``'s linear layers, or its transpose: autocast's copies);
    parameters left out. Shapes decide, so no activation may be shaped like a weight (e.g. B·T = n_embd)."""
    matrix_shapes = {tuple(m.weight.shape) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    matrix_shapes |= {shape[::-1] for shape in matrix_shapes}
    split = {"activations": 0, "weight_copies": 0}
    _, kept = saved_tensors(model, compute_loss)
    for tensor in kept.values():
        is_copy = tuple(tensor.shape) in matrix_shapes and tensor.dtype in (torch.float16, torch.bfloat16)
        split["weight_copies" if is_copy else "activations"] += tensor.untyped_storage().nbytes()
    return split


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer's per-parameter tensors (AdamW: m and v) held by this process, step counters left out
    (under FSDP the states are DTensors: only the local shard counts)."""
    local = [value.to_local() if hasattr(value, "to_local") else value
             for state in optimizer.state.values() for value in state.values() if torch.is_tensor(value)]
    return sum(value.numel() * value.element_size() for value in local if value.dim() > 0)


@contextlib.contextmanager
def cuda_peak_memory(device: torch.device):
    """Measure ``torch.cuda.max_memory_allocated`` over a block: yields a dict whose ``"peak"`` is set on exit."""
    result: dict[str, int] = {}
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device)
    yield result
    torch.cuda.synchronize(device)
    result["peak"] = torch.cuda.max_memory_allocated(device)
    result["start"] = start
