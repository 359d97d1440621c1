"""Autograd-aware ``all_to_all_single`` with uneven splits, and the count exchange that can precede it.

An exchange of tokens needs every rank to know what it will receive before it starts. The general way
is one more collective first, :func:`exchange_counts` (a fixed-size integer tensor, so no rank has to
guess); a caller that can derive the counts from what it already exchanged skips it (BaseLayer with
exact routing: :func:`~base_plugin.layer.routing.exact_dispatch_counts` and
``route_shuffled(..., incoming=True)``). A rank that sends or receives nothing still takes part in
every collective, so none waits forever.

``comm`` (every function here): the object whose ``all_to_all_single`` is called, with
torch.distributed's signature — ``torch.distributed`` by default, ``deepspeed.comm`` from the DeepSpeed
adapter (so DeepSpeed's comms logger records the calls).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.distributed as dist


def exchange_counts(send_counts: torch.Tensor, group: Optional[dist.ProcessGroup], comm=dist) -> torch.Tensor:
    """Transpose a count table across the group.

    send_counts: LongTensor[W * k] on this rank; block j (k entries) is what this rank sends to group rank j.
    Returns LongTensor[W * k]; block j is what group rank j sends to this rank. With ``group is None``
    (single process) the input is returned. Collective over ``group``: every member must call it.
    """
    if group is None:
        return send_counts
    recv = torch.empty_like(send_counts)
    comm.all_to_all_single(recv, send_counts.contiguous(), group=group)
    return recv


def _exchange(x: torch.Tensor, send_splits: List[int], recv_splits: List[int], group, comm) -> torch.Tensor:
    out = x.new_empty((sum(recv_splits),) + tuple(x.shape[1:]))
    comm.all_to_all_single(out, x.contiguous(), output_split_sizes=recv_splits,
                           input_split_sizes=send_splits, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, send_splits, recv_splits, group, comm):
        ctx.send_splits, ctx.recv_splits, ctx.group, ctx.comm = send_splits, recv_splits, group, comm
        return _exchange(x, send_splits, recv_splits, group, comm)

    @staticmethod
    def backward(ctx, grad):
        # The gradient travels the same routes in reverse; grads are materialised (zeros if unused),
        # so every rank calls the collective in backward too.
        return _exchange(grad, ctx.recv_splits, ctx.send_splits, ctx.group, ctx.comm), None, None, None, None


def all_to_all(x: torch.Tensor, send_splits: List[int], recv_splits: List[int],
               group: Optional[dist.ProcessGroup], comm=dist) -> torch.Tensor:
    """Differentiable ``all_to_all_single`` along dim 0.

    x: Tensor[sum(send_splits), ...]; rows ``send_splits[j]`` go to group rank j in order.
    Returns Tensor[sum(recv_splits), ...], the rows from rank 0 first. ``recv_splits`` must be what the
    others send (obtain it with :func:`exchange_counts`). The backward pass runs the inverse exchange,
    a collective as well. ``group is None`` means a single process: ``x`` is returned.
    """
    if group is None:
        return x
    return _AllToAll.apply(x, list(send_splits), list(recv_splits), group, comm)


def exchange(x: torch.Tensor, send_counts: torch.Tensor, group: Optional[dist.ProcessGroup], comm=dist
             ) -> Tuple[torch.Tensor, torch.Tensor, List[int], List[int]]:
    """Send rows of ``x`` by a count table: counts first, then the rows.

    x: Tensor[n, ...] ordered by destination (and by bucket within a destination).
    send_counts: LongTensor[W * k], rows this rank sends per (destination rank, bucket); sums to n.
    Returns ``(received, recv_counts, send_splits, recv_splits)``: received rows ordered by
    (source rank, bucket), LongTensor[W * k] of received counts, and the per-rank split lists
    (the only host synchronisation, needed by ``all_to_all_single`` itself).
    """
    recv_counts = exchange_counts(send_counts, group, comm)
    w = 1 if group is None else dist.get_world_size(group)
    splits = torch.stack([send_counts.view(w, -1).sum(1), recv_counts.view(w, -1).sum(1)]).tolist()
    return all_to_all(x, splits[0], splits[1], group, comm), recv_counts, splits[0], splits[1]
