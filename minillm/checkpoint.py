"""Checkpoints: model weights and whole training states as safetensors, written atomically.

Nothing here unpickles: safetensors for tensors (model weights, and whole training states:
:func:`save_training_state`), JSON for structure (through :mod:`minillm.files`, whose atomic
writes every file here goes through).

A model sharded over processes (FSDP, :mod:`minillm.fully_sharded`) writes the same files: its weights and
optimizer state are gathered to rank 0 (every process calls the save functions; rank 0 writes), and loading
gives each process its slice, so a checkpoint moves freely between one process, DDP and FSDP.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
from typing import Any

import torch

from minillm.files import atomic_write_bytes
from minillm.fully_sharded import (
    gather_model_state,
    gather_optimizer_state,
    is_sharded,
    load_full_model_state,
    load_full_optimizer_state,
)

# ---------------------------------------------------------------------------------------------
# Training checkpoints: one safetensors file holding weights, optimizer state and RNG states
# ---------------------------------------------------------------------------------------------
#
# Everything a run needs to continue exactly lives in ONE file, written atomically, so that no kill
# can leave a model from step 400 beside an optimizer from step 500:
#
#   tensors   "model/<name>"           the weights (a tied weight is stored once)
#             "optimizer/<i>/<key>"    the optimizer's per-parameter tensors (exp_avg, exp_avg_sq, ...)
#             "rng/torch", "rng/cuda/<d>", "rng/<name>"   random generator states (uint8 tensors)
#   metadata  {"minillm": JSON}        step, configs, optimizer hyperparameters and scalars, history
#
# safetensors stores only tensors and a str -> str metadata dict, and loading it runs no code:
# a checkpoint from an untrusted path cannot execute anything (unlike torch.load of a pickle).

FORMAT_VERSION = 1


def tied_names(state: dict) -> set[str]:
    """Names in a state dict that alias an earlier entry (the same memory, e.g. GPT's ``lm_head.weight``
    tied to ``wte.weight``)."""
    seen, aliases = set(), set()
    for name, tensor in state.items():
        tensor = tensor.to_local() if hasattr(tensor, "to_local") else tensor  # a sharded model's DTensor: this slice
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if tensor.numel() and key in seen:
            aliases.add(name)
        seen.add(key)
    return aliases


def unique_state_dict(model) -> dict:
    """The model's state dict, on the CPU, with each tied weight stored once (under its first name).

    A model sharded over processes (FSDP, :mod:`minillm.fully_sharded`) is gathered: every process must call
    this; rank 0 receives the whole state dict and the others an empty one."""
    if is_sharded(model):
        return gather_model_state(model)
    state = model.state_dict()
    aliases = tied_names(state)
    return {name: tensor.detach().contiguous().cpu() for name, tensor in state.items() if name not in aliases}


def load_model_state(model, tensors: dict, source: str = "checkpoint") -> None:
    """Load ``tensors`` into ``model`` (strictly, up to tied weights), with one clear error on a mismatch.
    A sharded model keeps each process's slice of every tensor (every process calls this, with the same tensors)."""
    from minillm import MinillmError

    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors) - tied_names(expected))
    unknown = sorted(set(tensors) - set(expected))
    if missing or unknown:
        raise MinillmError(f"the weights in {source} do not fit this model (missing: {missing[:3]}, unexpected: "
                           f"{unknown[:3]}): was it made with another model configuration?")
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise MinillmError(f"{source}: {name} has shape {tuple(tensor.shape)}, but the model expects "
                               f"{tuple(expected[name].shape)}: was it made with another model configuration?")
    check_finite(tensors, source)
    if is_sharded(model):
        load_full_model_state(model, tensors)
    else:
        model.load_state_dict(tensors, strict=False)


def check_finite(tensors: dict, source: str = "checkpoint") -> None:
    """Refuse weights that hold NaN or infinity: a model loaded from them would only ever output NaN (a run
    that diverged, or a damaged file), and the error would surface far away, as a "diverged" run or NaN text."""
    from minillm import MinillmError

    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise MinillmError(f"{source} is damaged: its weight {name} holds NaN or infinite values; start from "
                               "another run or checkpoint")


def tensor_sizes(path: str | os.PathLike, prefix: str = "") -> dict[str, int]:
    """``{name: number of elements}`` of the tensors in a safetensors file whose names start with ``prefix``,
    read from the file's header only (nothing is loaded): to compare with a model before it is built."""
    from safetensors import SafetensorError, safe_open

    from minillm import MinillmError

    try:
        with safe_open(str(path), framework="pt") as handle:
            return {name: math.prod(handle.get_slice(name).get_shape()) for name in handle.keys()
                    if name.startswith(prefix)}
    except (SafetensorError, OSError, ValueError) as error:
        raise MinillmError(f"{path} is not a readable safetensors file ({error})") from None


def save_weights(path: str | os.PathLike, model, metadata: dict[str, Any] | None = None) -> pathlib.Path:
    """Write the model's weights (tied weights once) as safetensors, atomically, with JSON metadata.
    A sharded model is gathered first: every process calls this, and rank 0 writes the file."""
    from safetensors.torch import save

    tensors = unique_state_dict(model)
    if is_sharded(model) and not _is_rank_zero():
        return pathlib.Path(path)
    header = {"minillm": json.dumps(metadata or {})}
    return atomic_write_bytes(path, save(tensors, metadata=header))


def _is_rank_zero() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def read_safetensors(path: str | os.PathLike) -> tuple[dict, dict]:
    """``(tensors, metadata)`` of a safetensors file; the metadata is the JSON stored by this module.
    A missing or damaged file is a :class:`minillm.MinillmError` with one sentence."""
    from safetensors import SafetensorError, safe_open

    from minillm import MinillmError

    path = pathlib.Path(path)
    if not path.is_file():
        raise MinillmError(f"{path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise MinillmError(f"{path} is not a readable safetensors file ({error})") from None
    try:
        metadata = json.loads(header.get("minillm", "{}"))
    except json.JSONDecodeError:
        raise MinillmError(f"{path} has damaged metadata") from None
    return tensors, metadata


def _rng_tensors(generators: dict) -> dict:
    tensors = {"rng/torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{index}"] = state
    for name, generator in generators.items():
        tensors[f"rng/{name}"] = generator.get_state()
    return tensors


def save_training_state(path: str | os.PathLike, model, optimizer, *, step: int, generators: dict | None = None,
                        metadata: dict | None = None) -> pathlib.Path:
    """Write model weights, optimizer state, RNG states (global torch, CUDA and ``generators``, e.g.
    the data sampler's) and ``metadata`` (JSON-able: step, configs, history) to one safetensors file, atomically.
    A sharded model and its optimizer are gathered first: every process calls this, and rank 0 writes the file,
    the same file a one-process run writes."""
    import random

    import numpy as np
    from safetensors.torch import save

    tensors = {f"model/{name}": tensor for name, tensor in unique_state_dict(model).items()}
    optimizer_state = gather_optimizer_state(model, optimizer) if is_sharded(model) else optimizer.state_dict()
    if is_sharded(model) and not _is_rank_zero():
        return pathlib.Path(path)
    scalars: dict[str, dict[str, Any]] = {}
    for index, state in optimizer_state["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer/{index}/{key}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(index), {})[key] = value
    tensors |= _rng_tensors(generators or {})
    numpy_state = np.random.get_state()
    tensors["rng/numpy"] = torch.from_numpy(numpy_state[1].astype(np.int64))
    python_state = random.getstate()
    header = {"format": FORMAT_VERSION, "step": step, "optimizer": {"param_groups": optimizer_state["param_groups"],
                                                                     "scalars": scalars},
              "rng": {"numpy": [numpy_state[0], *numpy_state[2:]], "python": [python_state[0], list(python_state[1]),
                                                                             python_state[2]]},
              **(metadata or {})}
    return atomic_write_bytes(path, save(tensors, metadata={"minillm": json.dumps(header)}))


def load_training_state(path: str | os.PathLike, model, optimizer, generators: dict | None = None) -> dict:
    """Restore what :func:`save_training_state` wrote into ``model``, ``optimizer`` and the RNGs;
    return the metadata (with ``step``). A sharded model and its optimizer keep each process's slice."""
    import random

    import numpy as np

    from minillm import MinillmError

    tensors, header = read_safetensors(path)
    if header.get("format") != FORMAT_VERSION:
        raise MinillmError(f"{path} is not a minillm training checkpoint (format {header.get('format')!r})")
    load_model_state(model, {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}, str(path))
    saved = header["optimizer"]
    state: dict[int, dict[str, Any]] = {}
    for name, tensor in tensors.items():
        if name.startswith("optimizer/"):
            _, index, key = name.split("/", 2)
            state.setdefault(int(index), {})[key] = tensor
    for index, values in saved["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    if len(saved["param_groups"]) != len(optimizer.param_groups):
        raise MinillmError(f"{path} holds an optimizer with {len(saved['param_groups'])} parameter groups, "
                           f"this run has {len(optimizer.param_groups)}: was it made with other settings?")
    if is_sharded(model):  # each process keeps its slice of every moment
        load_full_optimizer_state(model, optimizer, {"state": state, "param_groups": saved["param_groups"]})
    else:
        optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})
    torch.set_rng_state(tensors["rng/torch"])
    cuda_states = [tensors[f"rng/cuda/{i}"] for i in range(torch.cuda.device_count()) if f"rng/cuda/{i}" in tensors]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    for name, generator in (generators or {}).items():
        if f"rng/{name}" not in tensors:
            raise MinillmError(f"{path} has no state for the random generator {name!r}")
        generator.set_state(tensors[f"rng/{name}"])
    numpy_name, *numpy_rest = header["rng"]["numpy"]
    np.random.set_state((numpy_name, tensors["rng/numpy"].numpy().astype(np.uint32), *numpy_rest))
    version, internal, gauss = header["rng"]["python"]
    random.setstate((version, tuple(internal), gauss))
    return header
