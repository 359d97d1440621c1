import pytest
import torch
import torch.distributed as dist

from multirank import run_ranks


def _sum_ranks(rank, world_size):
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return t


def _fail_on_one(rank, world_size):
    if rank == 1:
        raise ValueError("boom on rank 1")
    return rank


def _hang(rank, world_size):
    if rank == 0:
        dist.barrier()  # rank 1 never joins
    return rank


def test_all_reduce_on_two_ranks():
    out = run_ranks(_sum_ranks, 2, timeout=60)
    assert [float(t) for t in out] == [3.0, 3.0]


def test_rank_error_is_reported():
    with pytest.raises(RuntimeError, match="boom on rank 1"):
        run_ranks(_fail_on_one, 2, timeout=60)


def test_hang_times_out():
    with pytest.raises((TimeoutError, RuntimeError)):
        run_ranks(_hang, 2, timeout=10)
