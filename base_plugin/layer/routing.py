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

Top-k (``k > 1``): every row takes k distinct experts (exact: :func:`~base_plugin.assignment.
balanced_topk_assignment`, every expert exactly its share of the ``n·k`` slots; greedy: the k best), and
the experts of a row are a LongTensor ``[n, k]`` instead of ``[n]``. A row's k choices always travel
together, so everything counted in rows above is counted in slots (rows × k) by the dispatch.

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
    """experts: LongTensor[n] (k = 1) or [n, k], the expert(s) of each row of the scores this rank passed in.
    solved: LongTensor[m] or [m, k], the experts this rank chose for the rows it routed itself (the
    shuffled rows it received, or its own rows without a shuffle; exactly balanced for exact routing).
    objective: 0-d, sum of the chosen scores of the ``solved`` rows (score dtype).
    gap: 0-d, the solver's certificate dual bound − objective (≈ 0 when exact), 0 for greedy, NaN for
    a callable.
    incoming: LongTensor[W * E/W] or None — only from ``route_shuffled(..., incoming=True)``: block s
    holds the rows group rank s will send to each of this rank's E/W experts (experts are blocked
    over the group: expert e lives on group rank e // (E/W)), i.e. what a count exchange before the
    dispatch would return (counted in slots when k > 1).
    prices: Tensor[E] or None — exact routing's dual prices for the rows this rank solved, the warm
    start of its next solve (``route(..., prices=...)``); None for other routers."""

    experts: torch.Tensor
    solved: torch.Tensor
    objective: torch.Tensor
    gap: torch.Tensor
    incoming: Optional[torch.Tensor] = None
    prices: Optional[torch.Tensor] = None


def route(scores: torch.Tensor, choice: Router, k: int = 1, prices: Optional[torch.Tensor] = None) -> Routing:
    """Route the rows of ``scores`` [n, E] (no grad needed) on this rank alone, k experts per row.

    ``choice``: ``"exact"`` (balanced: every expert gets ``n·k // E`` or one more of the ``n·k`` slots,
    k distinct experts per row), ``"greedy"`` (the k best) or a callable ``scores -> LongTensor[n]``
    (k = 1) / ``LongTensor[n, k]``. ``prices``: a warm start for exact routing (e.g. the previous call's
    :attr:`Routing.prices`; any start gives the same optimum). Raises ValueError for a callable's answer
    of another shape.
    """
    if choice == "exact":
        result = solve_balanced_assignment(scores, k=k, prices=prices)
        return Routing(result.experts, result.experts, result.objective.to(scores.dtype), result.gap.to(scores.dtype),
                       prices=result.prices)
    if choice == "greedy":
        experts = greedy_assignment(scores, k=k)
    else:
        experts = choice(scores).to(torch.long)
        want = (scores.shape[0],) if k == 1 else (scores.shape[0], k)
        if tuple(experts.shape) != want:
            raise ValueError(f"a routing callable must return a LongTensor of shape {list(want)} for {scores.shape[0]} "
                             f"rows and k={k}, got {list(experts.shape)}")
    slots = experts.reshape(scores.shape[0], k)
    objective = scores.gather(1, slots).sum() if scores.shape[0] else scores.new_zeros(())
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
                   sizes: Optional[Sequence[int]] = None, incoming: bool = False, comm=dist, k: int = 1,
                   prices: Optional[torch.Tensor] = None) -> Routing:
    """:func:`route` (``k`` experts per row, ``prices`` a warm start) after dealing the rows of
    ``scores`` [n, E] out at random over ``group``.

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
        return route(scores, choice, k, prices)
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
    mine = route(received, choice, k, prices)
    solved = mine.solved.reshape(-1, k)  # [m, k]: a row's experts travel together
    if incoming:
        # message to rank t: tally[s, i] = rows from origin s this rank gave t's local expert i, then
        # the experts of t's own rows; t sums the tallies of all ranks
        local = num_experts // world
        dev = scores.device
        origin = torch.repeat_interleave(torch.arange(world, device=dev), device_longs(recv_splits, dev),
                                         output_size=solved.shape[0])
        tally = torch.bincount((origin[:, None] * num_experts + solved).reshape(-1), minlength=world * num_experts)
        tally = tally.view(world, world, local).transpose(0, 1).reshape(world, world * local)
        pieces = [p for t, chunk in enumerate(solved.split(recv_splits)) for p in (tally[t], chunk.reshape(-1))]
        head = world * local
        back = _all_to_all(torch.cat(pieces), [head + m * k for m in recv_splits],
                           [head + m * k for m in send_splits], group, comm)
        chunks = back.split([head + m * k for m in send_splits])
        counts = torch.stack([c[:head] for c in chunks]).sum(0)
        back = torch.cat([c[head:] for c in chunks])
    else:
        back = _all_to_all(solved.reshape(-1), [m * k for m in recv_splits], [m * k for m in send_splits],
                           group, comm)
        counts = None
    back = back.view(n, k)
    experts = torch.empty_like(back)
    experts[perm] = back
    if k == 1:
        experts = experts.view(n)
    return Routing(experts, mine.solved, mine.objective, mine.gap, counts, mine.prices)
