"""Tensor parallelism: one GPT block's matrices split over N processes (Shoeybi et al., 2019, "Megatron-LM").

Data parallelism copies the whole model to every process; tensor parallelism gives each process a *slice* of
every weight matrix, so a block too big for one device fits on N. For a linear layer ``Y = X A`` there are two
ways to cut ``A``:

- **column-parallel**: rank i holds the columns ``A_i`` (a slice of the output features) and computes
  ``Y_i = X A_i``, its slice of the output. Every rank needs all of ``X``.
- **row-parallel**: rank i holds the rows ``B_i`` (a slice of the input features) and computes the partial
  product ``X_i B_i``; the output is the sum ``Y = sum_i X_i B_i``, one all-reduce.

Megatron puts a column-parallel layer first and a row-parallel one second, so the slice ``Y_i`` that the first
produces is exactly the input slice ``X_i`` that the second needs, and nothing moves between them:

- MLP: ``c_fc`` column-parallel, GELU on each rank's slice alone (it acts on each feature alone), ``c_proj``
  row-parallel;
- attention: q, k and v column-parallel *by heads* (rank i computes heads ``i·h/N .. (i+1)·h/N - 1`` whole,
  since attention mixes features only within a head), the output projection row-parallel.

Two communications per block in the forward (one after attention, one after the MLP) and two in the backward,
done by two autograd functions that are each other's mirror image:

- ``f`` (:class:`CopyToParallelRegion`): identity forward, all-reduce of the gradient backward, because every
  rank's slice used the whole input ``X``, so ``dL/dX = sum_i dL/dX^{(i)}``;
- ``g`` (:class:`ReduceFromParallelRegion`): all-reduce forward (the sum ``sum_i X_i B_i``), identity backward.

Each all-reduce moves the block's activations, B·T·d_model numbers (4 bytes each in fp32).

This module writes it by hand (:func:`shard_block` turns a :class:`~minillm.gpt.Block` into rank i's
:class:`TensorParallelBlock`), then does the same with PyTorch's engine, DTensor's ``parallelize_module``
(:func:`parallelize_block`, :func:`parallelize_gpt`); :func:`demonstrate` shows what a learner should see.
Dropout is left out (Megatron keeps a separate random state per rank for it): the blocks must have dropout 0.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from minillm import MinillmError
from minillm.attention import fused_attention
from minillm.gpt import GPT, Block, CausalSelfAttention

# ---------------------------------------------------------------------------------------------
# The two communications, f and g, and a record of them
# ---------------------------------------------------------------------------------------------


@dataclass
class AllReduceRecord:
    """One all-reduce issued by f or g: in which pass, by which function, of what."""

    pass_name: str  # "forward" or "backward"
    function: str  # "f" or "g"
    shape: tuple[int, ...]
    bytes: int  # what each rank contributes: numel · element size


_records: list[AllReduceRecord] | None = None  # where f and g note their all-reduces, inside record_all_reduces()


@contextlib.contextmanager
def record_all_reduces():
    """``with record_all_reduces() as records:`` lists every all-reduce that f and g issue inside the block
    (forward and backward) as :class:`AllReduceRecord` s."""
    global _records
    outer, _records = _records, []
    try:
        yield _records
    finally:
        _records = outer


def _all_reduce(tensor: torch.Tensor, pass_name: str, function: str) -> torch.Tensor:
    """``sum_i tensor^{(i)}`` over the ranks, on every rank, in a new tensor."""
    total = tensor.contiguous().clone()  # the caller's tensor stays as it was
    dist.all_reduce(total)  # SUM by default
    if _records is not None:
        _records.append(AllReduceRecord(pass_name, function, tuple(total.shape), total.numel() * total.element_size()))
    return total


class CopyToParallelRegion(torch.autograd.Function):
    """Megatron's *f*: ``forward(X) = X``; ``backward(dX^{(i)}) = sum_i dX^{(i)}``.

    It stands where the replicated input enters the ranks' slices: each rank's slice used all of X, so X's
    gradient is the sum of what every rank sends back."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)  # nothing moves

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _all_reduce(grad, "backward", "f")


class ReduceFromParallelRegion(torch.autograd.Function):
    """Megatron's *g*: ``forward(Y^{(i)}) = sum_i Y^{(i)}``; ``backward(dY) = dY``.

    It stands where the ranks' partial sums leave the parallel region: the sum is replicated, so every rank
    already holds the whole gradient of it, and each partial sum's gradient is that same gradient."""

    @staticmethod
    def forward(ctx, partial: torch.Tensor) -> torch.Tensor:
        return _all_reduce(partial, "forward", "g")

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad  # nothing moves


def copy_to_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """*f*: see :class:`CopyToParallelRegion`."""
    return CopyToParallelRegion.apply(x)


def reduce_from_parallel_region(partial: torch.Tensor) -> torch.Tensor:
    """*g*: see :class:`ReduceFromParallelRegion`."""
    return ReduceFromParallelRegion.apply(partial)


# ---------------------------------------------------------------------------------------------
# Column- and row-parallel linear layers
# ---------------------------------------------------------------------------------------------
# nn.Linear stores A transposed: weight is (out_features, in_features) and y = x weightᵀ + b. So A's columns
# (output features) are the weight's rows, and A's rows (input features) are the weight's columns.


class ColumnParallelLinear(nn.Module):
    """``Y_i = f(X) A_i + b_i``: this rank's slice of the output features (Megatron, eq. 3).

    ``weight`` (out/N, in) and ``bias`` (out/N,) are this rank's rows of the full layer's weight and bias."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(copy_to_parallel_region(x), self.weight, self.bias)  # (B, T, in) -> (B, T, out/N)


class RowParallelLinear(nn.Module):
    """``Y = g(sum_i X_i B_i) + b``: this rank holds a slice of the input features (Megatron, eq. 4).

    ``weight`` (out, in/N) is this rank's columns of the full weight; ``bias`` (out,) is whole, on every rank,
    and added once, after the sum (adding it on each rank before the sum would add it N times)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    def forward(self, x_slice: torch.Tensor) -> torch.Tensor:
        y = reduce_from_parallel_region(F.linear(x_slice, self.weight))  # (B, T, in/N) -> (B, T, out), summed
        return y if self.bias is None else y + self.bias


# ---------------------------------------------------------------------------------------------
# A tensor-parallel GPT block, sharded from a minillm Block
# ---------------------------------------------------------------------------------------------


class TensorParallelMLP(nn.Module):
    """``c_proj(gelu(c_fc(x)))`` with ``c_fc`` column-parallel and ``c_proj`` row-parallel: each rank computes
    ``gelu(X A_i) B_i`` on its 4·d_model/N hidden features, and g sums the N results."""

    def __init__(self, c_fc: ColumnParallelLinear, gelu: nn.Module, c_proj: RowParallelLinear):
        super().__init__()
        self.c_fc, self.gelu, self.c_proj = c_fc, gelu, c_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))  # (B, T, C) -> (B, T, 4C/N) -> (B, T, C)


class TensorParallelAttention(nn.Module):
    """Causal self-attention over this rank's ``n_head`` heads (the model's n_head / N), whole.

    ``c_attn`` is column-parallel and yields this rank's q | k | v, each (B, T, n_head · head_dim); ``c_proj``
    is row-parallel over the same heads' features, and g sums the N ranks' contributions."""

    def __init__(self, c_attn: ColumnParallelLinear, c_proj: RowParallelLinear, n_head: int, head_dim: int):
        super().__init__()
        self.c_attn, self.c_proj = c_attn, c_proj
        self.n_head, self.head_dim = n_head, head_dim  # this rank's heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        local_width = self.n_head * self.head_dim  # d_model / N
        q, k, v = self.c_attn(x).split(local_width, dim=2)  # (B, T, C/N) each
        q, k, v = (t.view(batch, length, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))  # (B, nh/N, T, hs)
        y = fused_attention(q, k, v, is_causal=True)  # (B, nh/N, T, hs)
        y = y.transpose(1, 2).reshape(batch, length, local_width)  # (B, T, C/N): this rank's heads side by side
        return self.c_proj(y)  # (B, T, C), summed over the ranks


class TensorParallelBlock(nn.Module):
    """A GPT block on one rank: ``x = x + attn(ln_1(x)); x = x + mlp(ln_2(x))``, LayerNorms whole on every rank.

    Input and output (B, T, d_model) are the same on every rank (replicated); what is split lives inside."""

    def __init__(self, ln_1: nn.Module, attn: TensorParallelAttention, ln_2: nn.Module, mlp: TensorParallelMLP):
        super().__init__()
        self.ln_1, self.attn, self.ln_2, self.mlp = ln_1, attn, ln_2, mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))  # one all-reduce forward (g), one backward (f)
        x = x + self.mlp(self.ln_2(x))  # and again
        return x


def _check_shardable(block: Block, world_size: int) -> None:
    n_head = block.attn.n_head
    if world_size < 1 or n_head % world_size:
        raise MinillmError(f"tensor parallelism splits the {n_head} heads evenly: {world_size} processes do not divide them")
    if block.attn.dropout > 0 or block.mlp.dropout.p > 0:
        raise MinillmError("tensor-parallel blocks here have no dropout: build the model with dropout=0")


def _rows(tensor: torch.Tensor | None, rank: int, world_size: int) -> torch.Tensor | None:
    """Rank's share of dim 0, in N equal contiguous pieces."""
    return None if tensor is None else tensor.chunk(world_size, dim=0)[rank]


def _qkv_rows(tensor: torch.Tensor | None, rank: int, world_size: int) -> torch.Tensor | None:
    """Rank's heads of a fused q | k | v weight (3C, C) or bias (3C,): its rows of q, of k and of v, stacked.

    A plain split of the 3C rows in N pieces would give rank 0 all of q and part of k (for N = 2): wrong."""
    if tensor is None:
        return None
    q, k, v = tensor.chunk(3, dim=0)  # (C, ...) each
    return torch.cat([_rows(part, rank, world_size) for part in (q, k, v)])  # (3C/N, ...)


def shard_block(block: Block, rank: int, world_size: int) -> TensorParallelBlock:
    """Rank ``rank`` of ``world_size``'s share of a minillm GPT :class:`~minillm.gpt.Block` (copies; the block is
    left as it was): its heads of ``c_attn`` (q, k and v rows) and the matching columns of ``attn.c_proj``, its
    rows of ``mlp.c_fc`` and columns of ``mlp.c_proj``; LayerNorms and the row-parallel biases whole."""
    _check_shardable(block, world_size)
    attn, mlp = block.attn, block.mlp

    def columns(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.chunk(world_size, dim=1)[rank]  # (out, in/N)

    tp_attn = TensorParallelAttention(
        ColumnParallelLinear(_qkv_rows(attn.c_attn.weight, rank, world_size), _qkv_rows(attn.c_attn.bias, rank, world_size)),
        RowParallelLinear(columns(attn.c_proj.weight), attn.c_proj.bias),
        attn.n_head // world_size, attn.head_dim)
    tp_mlp = TensorParallelMLP(
        ColumnParallelLinear(_rows(mlp.c_fc.weight, rank, world_size), _rows(mlp.c_fc.bias, rank, world_size)),
        copy.deepcopy(mlp.gelu),
        RowParallelLinear(columns(mlp.c_proj.weight), mlp.c_proj.bias))
    return TensorParallelBlock(copy.deepcopy(block.ln_1), tp_attn, copy.deepcopy(block.ln_2), tp_mlp)


# ---------------------------------------------------------------------------------------------
# The same with PyTorch's engine: DTensor's parallelize_module
# ---------------------------------------------------------------------------------------------


class SplitQKVAttention(nn.Module):
    """GPT's causal self-attention with q, k and v as three linear layers, ``q_proj``, ``k_proj``, ``v_proj``.

    The same function as :class:`~minillm.gpt.CausalSelfAttention`, laid out so that ``ColwiseParallel`` can
    shard each projection by heads (a contiguous shard of the fused ``c_attn`` would cut q | k | v wrongly).
    ``n_head`` is the number of heads *this process* computes: :func:`parallelize_block` divides it by N
    (as torchtitan does), and the forward reads the width from it, not from the input."""

    def __init__(self, attention: CausalSelfAttention):
        super().__init__()
        self.n_head, self.head_dim = attention.n_head, attention.head_dim
        width = attention.n_head * attention.head_dim
        fused = attention.c_attn.weight  # (3C, C): W_q | W_k | W_v
        has_bias = attention.c_attn.bias is not None
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(width, width, bias=has_bias, device=fused.device,
                                                           dtype=fused.dtype) for _ in range(3))
        with torch.no_grad():
            weights = fused.chunk(3, dim=0)  # W_q, W_k, W_v, (C, C) each
            biases = attention.c_attn.bias.chunk(3) if has_bias else (None, None, None)
            for projection, weight, bias in zip((self.q_proj, self.k_proj, self.v_proj), weights, biases):
                projection.weight.copy_(weight)
                if bias is not None:
                    projection.bias.copy_(bias)
        self.c_proj = copy.deepcopy(attention.c_proj)

    def forward(self, x: torch.Tensor, kv_cache=None, rotary=None) -> torch.Tensor:
        if kv_cache is not None or rotary is not None:
            raise MinillmError("the tensor-parallel attention here has no KV cache and no rotary positions")
        batch, length, _ = x.shape
        local_width = self.n_head * self.head_dim
        q, k, v = (projection(x).view(batch, length, self.n_head, self.head_dim).transpose(1, 2)
                   for projection in (self.q_proj, self.k_proj, self.v_proj))  # (B, nh, T, hs), this process's heads
        y = fused_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(batch, length, local_width)  # (B, T, nh·hs)
        return self.c_proj(y)  # (B, T, C)


def tensor_parallel_plan() -> dict:
    """The plan ``parallelize_module`` applies to one block whose ``attn`` is a :class:`SplitQKVAttention`.

    - ``attn``: its input becomes one replicated DTensor, so that q, k and v share it and the backward sums
      their three gradients *before* one all-reduce (f's backward), not three;
    - ``attn.q_proj``, ``k_proj``, ``v_proj``, ``mlp.c_fc``: ``ColwiseParallel``, weight and bias sharded on
      the output features (``Shard(0)`` of the weight); input replicated; output a plain tensor holding this
      rank's features (``Shard(-1)``, ``use_local_output=True``), which the heads' view and GELU read directly;
    - ``attn.c_proj``, ``mlp.c_proj``: ``RowwiseParallel``, weight sharded on the input features (``Shard(1)``),
      bias replicated; input the sharded features (``Shard(-1)``); output ``Replicate()``, turned from the partial
      sums by one all-reduce (g), and handed on as a plain tensor.
    """
    # DTensor is imported here, not at the top: it takes seconds to import, and the hand-written half needs none of it.
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, PrepareModuleInput, RowwiseParallel

    return {
        "attn": PrepareModuleInput(input_layouts=(Replicate(), None, None), desired_input_layouts=(Replicate(), None, None)),
        "attn.q_proj": ColwiseParallel(),
        "attn.k_proj": ColwiseParallel(),
        "attn.v_proj": ColwiseParallel(),
        "attn.c_proj": RowwiseParallel(),
        "mlp.c_fc": ColwiseParallel(),
        "mlp.c_proj": RowwiseParallel(),
    }


def _parallelize_block_in_place(block: Block, mesh) -> None:
    from torch.distributed.tensor.parallel import parallelize_module

    _check_shardable(block, mesh.size())
    block.attn = SplitQKVAttention(block.attn)
    parallelize_module(block, mesh, tensor_parallel_plan())
    block.attn.n_head //= mesh.size()  # the heads this process computes


def parallelize_block(block: Block, mesh) -> Block:
    """A copy of ``block`` tensor-parallel over the 1-D device ``mesh`` (``init_device_mesh("cpu", (N,))``):
    attention's fused ``c_attn`` split into q, k, v projections, then :func:`tensor_parallel_plan` applied by
    ``parallelize_module``. Its sharded parameters are DTensors (``.to_local()`` is this rank's slice,
    ``.full_tensor()`` gathers the whole); input and output stay plain tensors, the same on every rank."""
    block = copy.deepcopy(block)
    _parallelize_block_in_place(block, mesh)
    return block


def parallelize_gpt(model: GPT, mesh) -> GPT:
    """A copy of ``model`` with every block tensor-parallel (:func:`parallelize_block`); embeddings, the final
    LayerNorm and the output layer stay whole on every rank. For training's forward and backward: learned
    positions only, no KV cache (so no ``generate``)."""
    if model.rotary is not None:
        raise MinillmError("the tensor-parallel attention here has no rotary positions: use positions='learned'")
    model = copy.deepcopy(model)
    for block in model.blocks:
        _parallelize_block_in_place(block, mesh)
    return model


# ---------------------------------------------------------------------------------------------
# What a learner should see
# ---------------------------------------------------------------------------------------------


def parameter_bytes(module: nn.Module) -> int:
    """Bytes of the parameters this process holds (a DTensor counts its local slice)."""
    total = 0
    for parameter in module.parameters():
        local = parameter.to_local() if hasattr(parameter, "to_local") else parameter
        total += local.numel() * local.element_size()
    return total


def demonstrate(rank: int, world_size: int, batch: int = 4, length: int = 16, n_embd: int = 64, n_head: int = 4,
                seed: int = 0) -> dict:
    """One GPT block in fp32, run whole on this process and tensor-parallel over the group, by hand and with
    DTensor; for :func:`minillm.distributed.spawn`: ``spawn(demonstrate, 2)`` returns one dict per rank:

    - ``weight_shapes``: name -> shape of what this rank holds (``full_weight_shapes``: the whole block's);
    - ``all_reduces_forward``, ``all_reduces_backward``: how many f and g issued (2 and 2), and
      ``bytes_per_all_reduce``, each B·T·d_model·4; ``engine_all_reduces_forward`` / ``_backward``: DTensor's
      counts (``CommDebugMode``);
    - ``output_difference``, ``input_gradient_difference``, ``weight_gradient_difference`` and the engine's
      ``engine_output_difference``, ``engine_weight_gradient_difference``: the largest difference to the whole
      block's numbers, divided by the largest of those numbers (weight gradients: this rank's slices of the
      whole block's; the engine's gathered with ``full_tensor()``);
    - ``parameter_bytes`` on this rank (by hand and with the engine) vs ``full_parameter_bytes`` on one process.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.debug import CommDebugMode

    from minillm.gpt import GPTConfig

    torch.manual_seed(seed)  # every rank builds the same block, input and upstream gradient
    block = Block(GPTConfig(n_embd=n_embd, n_head=n_head, dropout=0.0))
    x = torch.randn(batch, length, n_embd)
    upstream = torch.randn(batch, length, n_embd)  # dL/d(output) of some loss L
    full_x = x.clone().requires_grad_()
    full_out = block(full_x)
    full_out.backward(upstream)

    def difference(values: list[torch.Tensor], references: list[torch.Tensor]) -> float:
        # Relative to the largest reference number of the lot, not of each tensor: some gradients are zero in
        # exact arithmetic (k's bias: adding b to every key adds q·b to every score of a query, which softmax
        # ignores), so their float noise divided by itself would be meaningless.
        largest = max(reference.abs().max() for reference in references)
        return (max((value - reference).abs().max() for value, reference in zip(values, references)) / largest).item()

    tp_block = shard_block(block, rank, world_size)
    tp_x = x.clone().requires_grad_()
    with record_all_reduces() as forward_records:
        tp_out = tp_block(tp_x)
    with record_all_reduces() as backward_records:
        tp_out.backward(upstream)
    expected = _expected_local_gradients(block, rank, world_size)

    mesh = init_device_mesh("cpu", (world_size,))
    engine_block = parallelize_block(block, mesh)
    engine_x = x.clone().requires_grad_()
    with CommDebugMode() as forward_comms:
        engine_out = engine_block(engine_x)
    with CommDebugMode() as backward_comms:
        engine_out.backward(upstream)
    engine_expected = _expected_engine_gradients(block)

    return {
        "rank": rank,
        "weight_shapes": {name: tuple(p.shape) for name, p in tp_block.named_parameters()},
        "full_weight_shapes": {name: tuple(p.shape) for name, p in block.named_parameters()},
        "all_reduces_forward": len(forward_records),
        "all_reduces_backward": len(backward_records),
        "bytes_per_all_reduce": [record.bytes for record in forward_records + backward_records],
        "engine_all_reduces_forward": _count_all_reduces(forward_comms),
        "engine_all_reduces_backward": _count_all_reduces(backward_comms),
        "output_difference": difference([tp_out], [full_out]),
        "input_gradient_difference": difference([tp_x.grad], [full_x.grad]),
        "weight_gradient_difference": difference([p.grad for _, p in tp_block.named_parameters()],
                                                 [expected[name] for name, _ in tp_block.named_parameters()]),
        "engine_output_difference": difference([engine_out], [full_out]),
        "engine_weight_gradient_difference": difference([full_gradient(p) for _, p in engine_block.named_parameters()],
                                                        [engine_expected[name] for name, _ in engine_block.named_parameters()]),
        "parameter_bytes": parameter_bytes(tp_block),
        "engine_parameter_bytes": parameter_bytes(engine_block),
        "full_parameter_bytes": parameter_bytes(block),
    }


def full_gradient(parameter: nn.Parameter) -> torch.Tensor:
    """A parameter's whole gradient: gathered from the ranks (``full_tensor()``) when it is a DTensor."""
    return parameter.grad.full_tensor() if hasattr(parameter.grad, "full_tensor") else parameter.grad


def gradients_as_block(block: Block) -> Block:
    """A copy of ``block`` whose parameters are its gradients: shard it (:func:`shard_block`) to get the slices
    of the gradients that each rank's parameters should have."""
    gradients = copy.deepcopy(block)
    with torch.no_grad():
        for parameter, original in zip(gradients.parameters(), block.parameters()):
            parameter.copy_(original.grad)
    return gradients


def _expected_local_gradients(block: Block, rank: int, world_size: int) -> dict[str, torch.Tensor]:
    return dict(shard_block(gradients_as_block(block), rank, world_size).named_parameters())


def _expected_engine_gradients(block: Block) -> dict[str, torch.Tensor]:
    gradients = gradients_as_block(block)
    gradients.attn = SplitQKVAttention(gradients.attn)  # c_attn's gradient cut into q, k, v's
    return dict(gradients.named_parameters())


def _count_all_reduces(comm_mode) -> int:
    return sum(count for op, count in comm_mode.get_comm_counts().items() if "all_reduce" in str(op))
