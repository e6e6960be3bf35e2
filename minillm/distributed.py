"""Several processes training one model: joining a process group, and starting a group on one machine.

Every way of spreading a model over devices (data, fully sharded, tensor and pipeline parallelism,
chapter 11) runs one process per device; the processes talk through collective operations
(``all_reduce``, ``all_gather``, ``send``/``recv``) over a *backend*: NCCL between GPUs, gloo between
CPU processes. Two ways to start them:

- ``torchrun --nproc_per_node N -m minillm ...`` starts N copies of a command and tells each its
  ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` in the environment; :func:`setup_distributed` reads
  them and joins the group (the training commands do this);
- :func:`spawn` runs a Python function in N fresh processes on this machine and returns what each
  returned (the chapter 11 demonstrations and the tests do this: no ports, no command line).
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import pickle
import tempfile
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

from minillm import MinillmError
from minillm.device import pick_device


@dataclass
class Distributed:
    """Where this process stands in its group: ``rank`` of ``world_size``, ``local_rank`` on its machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_request: str) -> tuple[Distributed, torch.device]:
    """Join the process group that ``torchrun`` describes (RANK, WORLD_SIZE, LOCAL_RANK in the
    environment): NCCL between GPUs, gloo between CPU processes. A group joined already (by :func:`spawn`)
    is used as it is. Without either, one process."""
    if dist.is_initialized():
        rank = dist.get_rank()
        info = Distributed(rank, dist.get_world_size(), int(os.environ.get("LOCAL_RANK", rank)))
    elif "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return Distributed(), pick_device(device_request)
    else:
        info = Distributed(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0")))
    device = pick_device(device_request)
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return info, device


def accumulating(train_model: torch.nn.Module) -> contextlib.AbstractContextManager:
    """The context for a step's micro-batches before its last one (gradient accumulation). DDP skips its
    all-reduce there (the gradients add up in each process and are averaged once, on the last micro-batch);
    a sharded model (FSDP) still reduce-scatters every micro-batch, so that each process only ever holds its
    slice of the gradients; one process has nothing to synchronize."""
    from torch.nn.parallel import DistributedDataParallel

    return train_model.no_sync() if isinstance(train_model, DistributedDataParallel) else contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------
# spawn: a function in N gloo processes on this machine
# ---------------------------------------------------------------------------------------------


def _failure(error: BaseException) -> tuple[str, float, str]:
    """A failed process's outcome: when it failed (the parent blames the first), the error and its traceback."""
    return ("error", time.time(), f"{type(error).__name__}: {error}\n{traceback.format_exc()}")


def _worker(rank: int, world_size: int, folder: str, function: Callable, args: tuple, threads: int,
            timeout: float) -> None:
    """One process of :func:`spawn`: join the group through a file (no network port), run, save the result."""
    torch.set_num_threads(threads)
    result_path = pathlib.Path(folder) / f"rank{rank}.pkl"
    try:
        dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout))
    except BaseException as error:
        outcome = _failure(error)
    else:
        try:
            # Every process waits here until all have joined: a process that fails at once would otherwise close
            # its connections while a slower one is still connecting to it, and that one would fail too.
            dist.barrier()
            outcome = ("ok", function(rank, world_size, *args))
        except BaseException as error:
            outcome = _failure(error)  # timed before this process leaves the group and its peers fail on that
        dist.destroy_process_group()
    with open(result_path, "wb") as handle:
        pickle.dump(outcome, handle)


def spawn(function: Callable[..., Any], world_size: int = 2, *args: Any, threads: int = 1, timeout: float = 300) -> list[Any]:
    """Run ``function(rank, world_size, *args)`` in ``world_size`` new processes joined in a gloo group and return
    their results, rank 0 first.

    ``function`` must be importable (defined at the top level of a module, not in a notebook cell), and its
    arguments and result picklable. The processes find each other through a file in a temporary folder, so
    nothing listens on a network port and two groups can run at once. Each process uses ``threads`` CPU
    threads (one by default: N processes on N cores). A process that raises makes this raise
    ``MinillmError`` with the rank and its traceback (the first to fail, when several do: the others failed
    because it left); one left waiting for it in a collective gives up after ``timeout`` seconds.
    """
    import torch.multiprocessing as mp

    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    with tempfile.TemporaryDirectory(prefix="minillm-spawn-") as folder:
        mp.start_processes(_worker, args=(world_size, folder, function, args, threads, timeout), nprocs=world_size,
                           join=True, start_method="spawn")
        outcomes = []
        for rank in range(world_size):
            path = pathlib.Path(folder) / f"rank{rank}.pkl"
            if not path.exists():
                raise MinillmError(f"process {rank} of {world_size} ended without a result")
            with open(path, "rb") as handle:
                outcomes.append(pickle.load(handle))
    failures = [(outcome[1], rank, outcome[2]) for rank, outcome in enumerate(outcomes) if outcome[0] == "error"]
    if failures:
        # The first to fail is the cause: the others failed after it, when it left their collectives.
        _, rank, message = min(failures)
        others = f" ({len(failures) - 1} more failed after it)" if len(failures) > 1 else ""
        raise MinillmError(f"process {rank} of {world_size} failed{others}: {message}")
    return [outcome[1] for outcome in outcomes]
