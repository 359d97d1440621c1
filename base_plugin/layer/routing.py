"""Routing decisions of a BASE layer: the expert of every token, from its scores against the centroids.

* :func:`route` — one rank's scores ``[n, E]``: exact balanced assignment, greedy argmax or a callable.
* :func:`route_shuffled` — the paper's random shuffle across a process group, done on the scores: this
  rank's score rows are dealt out at random and evenly over the group, every rank routes the rows it
  received, and the chosen experts travel back to the rows' owners. Each rank thus solves the
  assignment of a random mix of the group's tokens, as in the paper, while the hidden states stay where
  they are until they go straight to their expert (E numbers per token travel instead of d, and the
  two hidden-state all-to-alls of a token shuffle and its backward disappear).

* :func:`exact_dispatch_counts` — without a shuffle, exact routing fixes how many rows every rank sends
  to every expert from the row counts alone, so a dispatch needs no count exchange.

Used by :class:`~base_plugin.layer.BaseLayer` and by the Megatron router.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist

from ..assignment import greedy_assignment, solve_balanced_assignment

ROUTERS = ("exact", "greedy")
Router = Union[str, Callable[[torch.Tensor], torch.Tensor]]


def check_router(name: str, choice: Router, owner: str) -> None:
    """ValueError naming ``owner`` and ``name`` unless ``choice`` is one of :data:`ROUTERS` or a callable."""
    if not callable(choice) and choice not in ROUTERS:
        raise ValueError(f"{owner}: {name} must be one of {ROUTERS} or a callable, got {choice!r}")


@dataclass
class Routing:
    """experts: LongTensor[n], the expert of each row of the scores this rank passed in.
    solved: LongTensor[m], the experts this rank chose for the rows it routed itself (the shuffled rows
    it received, or its own rows without a shuffle; exactly balanced for exact routing).
    objective: 0-d, sum of the chosen scores of the ``solved`` rows (score dtype).
    gap: 0-d, the solver's certificate dual bound − objective (≈ 0 when exact), 0 for greedy, NaN for
    a callable.
    incoming: LongTensor[W * E/W] or None — only from ``route_shuffled(..., incoming=True)``: block s
    holds the rows group rank s will send to each of this rank's E/W experts (experts are blocked
    over the group: expert e lives on group rank e // (E/W)), i.e. what a count exchange before the
    dispatch would return."""

    experts: torch.Tensor
    solved: torch.Tensor
    objective: torch.Tensor
    gap: torch.Tensor
    incoming: Optional[torch.Tensor] = None


def route(scores: torch.Tensor, choice: Router) -> Routing:
    """Route the rows of ``scores`` [n, E] (no grad needed) on this rank alone.

    ``choice``: ``"exact"`` (balanced: every expert gets ``n // E`` or ``n // E + 1`` rows),
    ``"greedy"`` (argmax) or a callable ``scores -> LongTensor[n]``.
    """
    if choice == "exact":
        result = solve_balanced_assignment(scores)
        return Routing(result.experts, result.experts, result.objective.to(scores.dtype), result.gap.to(scores.dtype))
    experts = greedy_assignment(scores) if choice == "greedy" else choice(scores).to(torch.long)
    objective = scores.gather(1, experts[:, None]).sum() if scores.shape[0] else scores.new_zeros(())
    gap = scores.new_zeros(()) + (0.0 if choice == "greedy" else float("nan"))
    return Routing(experts, experts, objective, gap)


def _all_to_all(values: torch.Tensor, send_splits, recv_splits, group, comm) -> torch.Tensor:
    out = values.new_empty((sum(recv_splits),) + tuple(values.shape[1:]))
    comm.all_to_all_single(out, values.contiguous(), output_split_sizes=list(recv_splits),
                           input_split_sizes=list(send_splits), group=group)
    return out


def device_longs(values: Sequence[int], device: torch.device) -> torch.Tensor:
    """Host ints as a LongTensor on ``device``, copied without waiting for the device's queue (no sync)."""
    return torch.tensor(values, dtype=torch.long).to(device, non_blocking=True)


def even_shares(n: int, parts: int) -> List[int]:
    """``n`` split as evenly as possible, the first ``n % parts`` parts one larger: the shuffle's deal,
    and the capacities of exact routing (:func:`~base_plugin.assignment.default_capacity`) as host ints."""
    q, r = divmod(n, parts)
    return [q + (i < r) for i in range(parts)]


def exact_dispatch_counts(sizes: Sequence[int], num_experts: int, rank: int
                          ) -> Tuple[List[int], List[int], List[int]]:
    """The dispatch of exact routing without a shuffle, from every rank's row count alone.

    Group rank s routes its ``sizes[s]`` rows itself, and exact routing gives expert e exactly
    ``even_shares(sizes[s], E)[e]`` of them; experts are blocked over the W = ``len(sizes)`` ranks
    (L = E / W each). Returns host ints ``(send_splits[W], recv_splits[W], recv_counts[W * L])`` for
    ``rank``: rows it sends to every rank, rows it receives from every rank, and rows it receives from
    every rank s for each local expert i (at s * L + i) — what a count exchange would have returned.
    """
    world = len(sizes)
    local = num_experts // world

    def block(n: int, owner: int) -> int:  # rows of n that exact routing gives to owner's experts
        q, r = divmod(n, num_experts)
        return local * q + min(max(r - owner * local, 0), local)

    send = [block(sizes[rank], t) for t in range(world)]
    recv = [block(m, rank) for m in sizes]
    counts = [m // num_experts + (rank * local + i < m % num_experts) for m in sizes for i in range(local)]
    return send, recv, counts


def route_shuffled(scores: torch.Tensor, choice: Router, group: Optional[dist.ProcessGroup],
                   sizes: Optional[Sequence[int]] = None, incoming: bool = False, comm=dist) -> Routing:
    """:func:`route` after dealing the rows of ``scores`` [n, E] out at random over ``group``.

    Collective over ``group``: every member must call it, with any n (0 included). Three
    ``all_to_all_single`` (counts, score rows, experts back), or two when ``sizes`` — the number of
    score rows of every group rank, in group rank order — is given (the caller already exchanged it).
    With ``incoming`` (needs E divisible by the group size), the experts-back messages also carry
    per-expert tallies, and :attr:`Routing.incoming` tells this rank what every rank will send to its
    experts, so the caller's dispatch needs no count exchange. The random permutation comes from
    torch's global generator on this rank. ``group`` None or of size 1: plain :func:`route`
    (``incoming`` None). ``comm``: whose ``all_to_all_single`` is called (torch.distributed's signature).
    """
    if group is None or dist.get_world_size(group) == 1:
        return route(scores, choice)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    n, num_experts = scores.shape
    if incoming and num_experts % world:
        raise ValueError(f"incoming=True needs the {num_experts} experts blocked evenly over {world} ranks")
    perm = torch.randperm(n, device=scores.device)
    send_splits = even_shares(n, world)  # the shuffled rows, dealt out evenly
    if sizes is None:
        send_counts = torch.tensor(send_splits, dtype=torch.long, device=scores.device)
        recv_counts = torch.empty_like(send_counts)
        comm.all_to_all_single(recv_counts, send_counts, group=group)
        recv_splits = recv_counts.tolist()  # the shuffle's one host sync
    else:
        if len(sizes) != world or sizes[rank] != n:
            raise ValueError(f"sizes={list(sizes)} does not fit a group of {world} ranks with {n} rows on rank {rank}")
        recv_splits = [m // world + (rank < m % world) for m in sizes]  # rank's share of each deal
    received = _all_to_all(scores[perm], send_splits, recv_splits, group, comm)
    mine = route(received, choice)
    if incoming:
        # message to rank t: tally[s, i] = rows from origin s this rank gave t's local expert i, then
        # the experts of t's own rows; t sums the tallies of all ranks
        local = num_experts // world
        dev = scores.device
        origin = torch.repeat_interleave(torch.arange(world, device=dev), device_longs(recv_splits, dev),
                                         output_size=mine.solved.shape[0])
        tally = torch.bincount(origin * num_experts + mine.solved, minlength=world * num_experts)
        tally = tally.view(world, world, local).transpose(0, 1).reshape(world, world * local)
        pieces = [p for t, chunk in enumerate(mine.solved.split(recv_splits)) for p in (tally[t], chunk)]
        head = world * local
        back = _all_to_all(torch.cat(pieces), [head + m for m in recv_splits], [head + m for m in send_splits],
                           group, comm)
        chunks = back.split([head + m for m in send_splits])
        counts = torch.stack([c[:head] for c in chunks]).sum(0)
        back = torch.cat([c[head:] for c in chunks])
    else:
        back, counts = _all_to_all(mine.solved, recv_splits, send_splits, group, comm), None
    experts = torch.empty_like(back)
    experts[perm] = back
    return Routing(experts, mine.solved, mine.objective, mine.gap, counts)
