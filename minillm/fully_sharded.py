"""Fully sharded data parallelism (ZeRO-3) through PyTorch's FSDP2: sharding a model, and its full state dicts.

Data parallelism (DDP) keeps a whole copy of the weights, gradients and optimizer state in every process:
with Adam in fp32 that is 16 bytes per parameter, per process, however many processes there are. ZeRO-3
(Rajbhandari et al., 2020), which PyTorch calls FSDP, splits all three across the N processes, so each
holds ~16/N bytes per parameter, and gathers the weights only for the moment they are needed:

- forward: for each Transformer block, all-gather its weights, run it, free the gathered copy;
- backward: all-gather the block's weights again, compute its gradients, *reduce-scatter* them (sum over
  the processes, each keeping the mean gradient of its own shard), free the gathered copy;
- the optimizer updates each process's shard of the weights from its shard of the gradients and of the
  Adam moments, with no communication at all.

Each process trains on its rows of the global batch, as under DDP, and the arithmetic is the same: a
one-process run with the global batch takes the same steps (up to float rounding).

:func:`shard_model` applies ``torch.distributed.fsdp.fully_shard`` to every Transformer block and then to
the whole model (which takes what is left: embeddings, the final LayerNorm, a head; a weight tied between
two of those stays one tensor). The parameters become ``DTensor``\\ s: each process holds one slice (dim 0)
and the tensor knows the global shape. Checkpoints stay the files a one-process run writes: the full state
dicts are gathered to rank 0 (:func:`gather_model_state`, :func:`gather_optimizer_state`) and loaded back by
cutting each process's slice out of the full tensors (:func:`load_full_model_state`,
:func:`load_full_optimizer_state`); :mod:`minillm.checkpoint` calls these for a sharded model.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn


def is_sharded(model: nn.Module) -> bool:
    """Has :func:`shard_model` (``fully_shard``) been applied to ``model``?"""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard_model(model: nn.Module, device: torch.device | str, blocks: Sequence[nn.Module]) -> nn.Module:
    """Shard ``model`` (already on ``device``) over the processes of the default group, in place, and return it.

    Each of ``blocks`` (the model's Transformer blocks:
    :func:`minillm.activation_checkpointing.transformer_blocks`) becomes one unit of all-gather and
    reduce-scatter, then the model itself takes the remaining parameters. NCCL between GPUs, gloo between CPU processes: the device mesh is the
    process group laid out on one axis.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(torch.device(device).type, (dist.get_world_size(),))
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _aliases(model: nn.Module) -> dict[str, str]:
    """``{alias: name}`` for the state-dict entries that are the same tensor as an earlier entry (GPT's
    ``lm_head.weight`` is ``wte.weight``): saved once, under the first name, as a one-process run saves them."""
    first_name, aliases = {}, {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if isinstance(tensor, torch.Tensor) and id(tensor) in first_name:
            aliases[name] = first_name[id(tensor)]
        first_name.setdefault(id(tensor), name)
    return aliases


def _full_options(**options):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **options)


def gather_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The sharded model's whole state dict, on rank 0's CPU (each tied weight once); the other ranks get ``{}``.

    A collective: every process must call it (each sends its slices to rank 0, tensor by tensor, so no
    process ever holds more than one full tensor on its device)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=_full_options(cpu_offload=True))
    aliases = _aliases(model)
    return {name: tensor for name, tensor in state.items() if name not in aliases}


def load_full_model_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Load a whole state dict (as :func:`gather_model_state` or a one-process run saves it) into the sharded
    ``model``: each process keeps its slice of every tensor. Every process calls it with the same tensors."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    tensors = dict(tensors)
    for alias, name in _aliases(model).items():  # a tied weight is saved once: both names get it
        if name in tensors:
            tensors.setdefault(alias, tensors[name])
    set_model_state_dict(model, tensors, options=_full_options(strict=False))


def _parameter_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of each parameter the optimizer holds, in the order of its groups: a torch state dict's
    integer keys (0, 1, 2, ...) count the parameters in that order."""
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    return [names[id(parameter)] for group in optimizer.param_groups for parameter in group["params"]]


def gather_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's whole state dict on rank 0's CPU, in torch's own layout (``optimizer.state_dict()`` of a
    one-process run: ``{"state": {index: {...}}, "param_groups": [...]}``); the other ranks get ``{}``.
    A collective: every process must call it."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    by_name = get_optimizer_state_dict(model, optimizer, options=_full_options(cpu_offload=True))
    if dist.get_rank() != 0:
        return {}
    index = {name: i for i, name in enumerate(_parameter_names(model, optimizer))}
    return {"state": {index[name]: values for name, values in by_name["state"].items()},
            "param_groups": [{**group, "params": [index[name] for name in group["params"]]}
                             for group in by_name["param_groups"]]}


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state_dict: dict) -> None:
    """Load a whole optimizer state dict in torch's layout (as :func:`gather_optimizer_state` or a one-process
    run saves it) into the optimizer of the sharded ``model``: each process keeps its slice of every moment.
    Every process calls it with the same state dict."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    names = _parameter_names(model, optimizer)
    by_name = {"state": {names[index]: values for index, values in state_dict["state"].items()},
               "param_groups": [{**group, "params": [names[index] for index in group["params"]]}
                                for group in state_dict["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, by_name, options=_full_options())
