"""minillm.distributed.spawn: a function in several gloo processes on this machine."""

import pytest
import torch
import torch.distributed as dist

from minillm import MinillmError
from minillm.distributed import spawn


def _sum_of_ranks(rank: int, world_size: int, scale: float) -> tuple[int, float]:
    value = torch.tensor([float(rank + 1)])
    dist.all_reduce(value)  # every process ends with 1 + 2 + ... + world_size
    return rank, value.item() * scale


def _fails_on_rank_one(rank: int, world_size: int) -> int:
    if rank == 1:
        raise ValueError("rank one does not like this")
    return rank


def test_spawn_runs_one_process_per_rank_joined_in_one_group_and_returns_results_in_rank_order():
    results = spawn(_sum_of_ranks, 3, 2.0)
    assert results == [(0, 12.0), (1, 12.0), (2, 12.0)]  # 2 * (1 + 2 + 3), from each rank in turn


def test_spawn_names_the_rank_that_failed_and_its_error():
    with pytest.raises(MinillmError, match=r"process 1 of 2 failed: ValueError: rank one does not like this"):
        spawn(_fails_on_rank_one, 2)


def _fails_on_rank_one_while_rank_zero_waits_for_it(rank: int, world_size: int) -> int:
    if rank == 1:
        raise ValueError("rank one leaves before the all-reduce")
    dist.all_reduce(torch.ones(1))  # rank 0 fails here too, when rank 1's connection closes
    return rank


def test_spawn_blames_the_first_rank_to_fail_not_the_one_that_failed_because_it_left():
    with pytest.raises(MinillmError, match=r"process 1 of 2 failed \(1 more failed after it\): ValueError: rank one leaves"):
        spawn(_fails_on_rank_one_while_rank_zero_waits_for_it, 2, timeout=60)
