"""The BASE layer (Lewis et al. 2021): balanced assignment of tokens to experts, expert-parallel."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch import nn

from .all_to_all import all_to_all, exchange_counts
from .experts import ExpertList, GroupedExperts
from .groups import expert_group_name, mark_expert_parameters, resolve_group
from .permute import Permutation
from .routing import Router, Routing, check_router, device_longs, exact_dispatch_counts, route_shuffled
from .stats import RoutingStats

COMBINES = ("mean", "sum")


@dataclass
class _Dispatch:
    """One call's token exchange: host ints ``send`` / ``recv`` [W] (slots to / from every group rank),
    ``counts`` [E/W] (slots per local expert) and ``recv_counts`` LongTensor[W * E/W] on the device
    (slots from group rank s for local expert i at s * E/W + i)."""

    send: List[int]
    recv: List[int]
    counts: List[int]
    recv_counts: torch.Tensor

_CENTROID_GAIN = 0.1  # small centroids: the gate starts near 1/2 and tokens are spread by direction only


class BaseLayer(nn.Module):
    """Expert-parallel BASE layer: every token goes to exactly one expert (or k distinct experts with
    ``top_k=k``), the load balanced exactly.

    ``forward(x)``: x is a float Tensor[..., d_model] (any leading shape, possibly 0 tokens, a different
    number of tokens on every rank); returns Tensor of the same shape and dtype. Per call:

    1. tokens are flattened; scores ``x · cᵀ`` against the centroids of all ``num_experts`` experts
       (no gradient);
    2. when training with ``shuffle=True``, the score rows are dealt out at random and evenly over the
       expert-parallel group, as the paper shuffles tokens so that a rank's routing problem is not one
       domain (:func:`~base_plugin.layer.routing.route_shuffled`: the hidden states themselves wait
       and later go straight to their expert);
    3. routing: training → ``assignment`` (default exact balanced assignment *per rank*: every expert
       gets ``n // E`` or ``n // E + 1`` of the n rows this rank routes; with ``top_k=k`` every row
       takes k distinct experts and every expert gets ``n·k // E`` or one more of the ``n·k`` slots);
       not training → ``inference`` (default greedy: the best expert, or the k best);
    4. tokens go to their expert's rank with ``all_to_all_single``. Every rank must know what it will
       receive: with exact routing this follows from the row counts alone (without a shuffle) or is
       tallied on the shuffle's experts-back messages; other routers (greedy inference, a callable
       without a shuffle) exchange counts first;
    5. ``y = α·f_e(x) + (1 − α)·x`` with ``α = σ(x · c_e)`` — the centroids learn through the gate only;
       with k > 1 each of a token's k experts gives such a mix and :meth:`combine` joins them
       (``top_k_combine``: ``"mean"`` of the k mixes, or their ``"sum"`` of gated updates on x);
    6. results go back and the original order and shape are restored.

    "Training" is ``self.training`` (``model.train()`` / ``model.eval()``), not ``torch.is_grad_enabled()``
    as in the reference code: the routing of a module then does not change when it is recomputed with
    grad enabled under activation checkpointing (whose first pass runs under ``no_grad``), evaluation
    with gradients (attribution, probing) still routes like inference, and it is the convention that
    dropout and every framework's eval loop already follow. Every rank of the group must be in the same
    mode; a mismatch is detected and raises ValueError on all ranks instead of hanging.

    Args:
        d_model: hidden size d.
        experts: this rank's ``num_experts / W`` experts — a sequence of ``nn.Module`` mapping [n, d] to
            [n, d] (wrapped in :class:`ExpertList`), or a :class:`GroupedExperts` (e.g.
            :class:`BatchedBaseExperts`). Local expert i is global expert ``rank * (num_experts / W) + i``.
        num_experts: total experts E over the expert-parallel group.
        group: expert-parallel process group of size W (``None``: the world if torch.distributed is
            initialised, else a single process). It may be a subgroup, e.g. one of two EP groups inside
            a 4-rank world whose other dimension is data parallel.
        shuffle: randomly redistribute tokens over the group before routing (training only).
        assignment: routing while training, ``"exact"`` | ``"greedy"`` | callable(scores[n, E]) -> LongTensor[n]
            (LongTensor[n, k] with ``top_k=k``).
        inference: routing while not training, same choices.
        group_name: the ``group_name`` mark of expert parameters (default DeepSpeed's ``"ep_size_<W>"``).
        group_size: build the layer for an expert-parallel group of this size that is attached later with
            :meth:`set_group` (for frameworks that create their groups after the model, as DeepSpeed's
            engine does); ``group`` must then be None. Until attached, ``forward`` raises ValueError and
            the centroids wait: the rows this rank keeps are chosen when it learns its rank. 1 is a
            single process at once.
        top_k: experts per token, 1 (the paper) to ``num_experts``; a token's k experts are distinct.
        top_k_combine: how a token's k expert mixes make its output, ``"mean"`` (default) or ``"sum"``
            (see :meth:`combine`); unused for k = 1.
        comm: what the layer calls its collectives on — an object with torch.distributed's
            ``all_gather`` and ``all_to_all_single`` (same signatures); default ``torch.distributed``.
            A framework adapter passes its own (``deepspeed.comm``, whose comms logger then sees them).

    Parameters: ``centroids`` [num_experts / W, d] (this rank's experts' centroids) and the experts' own;
    all carry ``allreduce = False`` and ``group_name`` (see :mod:`base_plugin.layer.groups`), i.e. they
    are reduced only over the ranks that hold the same experts (the expert-data-parallel group).

    Collectives per call on ``group``: one all_gather (centroids, token counts and the mode check; the
    first call adds one all_gather of sizes), with the shuffle two all_to_alls (score rows out, chosen
    experts and per-expert tallies back), a count all_to_all only without a shuffle and with a router
    other than exact, then the two token all_to_alls (to the experts and back). So training is 3
    collectives (exact, no shuffle) or 5 (with the shuffle), greedy inference 4. Backward runs the two
    token all_to_alls in reverse. Every rank of the group must call forward (and backward)
    the same number of times, whatever its number of tokens.

    Raises ValueError for: a bad hidden size of ``x``; a ``top_k`` outside 1 … num_experts or an unknown
    ``top_k_combine``; ``num_experts`` not divisible by W; a number of
    local experts other than ``num_experts / W``; experts whose declared ``d_model`` differs; a group
    this process is not in; an unknown router; ranks of the group disagreeing on d_model or num_experts
    or top_k (checked once, at the first call) or on the mode — training, shuffling, exact routing or not
    (checked every call) — raised on every rank of the group alike, so none is left waiting.

    After each call ``last_stats`` holds a :class:`RoutingStats` (device tensors, no host sync).
    """

    def __init__(self, d_model: int, experts: Union[Sequence[nn.Module], GroupedExperts], num_experts: int,
                 group: Optional[dist.ProcessGroup] = None, *, shuffle: bool = True, assignment: Router = "exact",
                 inference: Router = "greedy", group_name: Optional[str] = None, group_size: Optional[int] = None,
                 comm=None, top_k: int = 1, top_k_combine: str = "mean"):
        super().__init__()
        if group_size is None:
            self.group, self.world, self.rank = resolve_group(group)
        elif group is not None or isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"BaseLayer: group_size must be a positive int given without a group, got "
                             f"group_size={group_size!r}, group={group!r}")
        else:
            self.group, self.world, self.rank = None, group_size, 0
        self.attached = group_size in (None, 1)  # a group of one is this process alone: nothing to wait for
        self.comm = dist if comm is None else comm
        if d_model < 1 or num_experts < 1:
            raise ValueError(f"d_model and num_experts must be >= 1, got {d_model} and {num_experts}")
        if num_experts % self.world:
            raise ValueError(f"num_experts={num_experts} is not divisible by the expert-parallel group size "
                             f"{self.world}")
        self.d_model, self.num_experts = d_model, num_experts
        self.num_local = num_experts // self.world
        if not isinstance(experts, GroupedExperts):
            experts = ExpertList(experts if isinstance(experts, (list, tuple, nn.ModuleList)) else [experts])
        if experts.num_experts != self.num_local:
            raise ValueError(f"got {experts.num_experts} local experts, but num_experts={num_experts} over an "
                             f"expert-parallel group of {self.world} ranks needs {self.num_local} per rank")
        if experts.d_model is not None and experts.d_model != d_model:
            raise ValueError(f"experts have d_model={experts.d_model}, the layer has d_model={d_model}")
        self.experts = experts
        for name, router in (("assignment", assignment), ("inference", inference)):
            check_router(name, router, "BaseLayer")
        self.shuffle, self.assignment, self.inference = shuffle, assignment, inference
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
            raise ValueError(f"BaseLayer: top_k must be an int from 1 to num_experts={num_experts} (k distinct experts "
                             f"per token), got {top_k!r}")
        if top_k_combine not in COMBINES:
            raise ValueError(f"BaseLayer: top_k_combine must be one of {COMBINES}, got {top_k_combine!r}")
        self.top_k, self.top_k_combine = top_k, top_k_combine

        # Every rank draws the full [E, d] matrix and keeps its rows, so with a common seed the
        # global centroids do not depend on the expert-parallel size.
        full = nn.init.orthogonal_(torch.empty(num_experts, d_model), gain=_CENTROID_GAIN)
        self.centroids = nn.Parameter(full[self.rank * self.num_local:(self.rank + 1) * self.num_local].clone())
        self._pending_centroids = None if self.attached else full  # [E, d] until set_group picks this rank's rows
        self.group_name = group_name or expert_group_name(self.world)
        mark_expert_parameters(self.experts.parameters(), self.group_name)
        mark_expert_parameters([self.centroids], self.group_name)
        self.last_stats: Optional[RoutingStats] = None
        self._sizes_checked = False

    def extra_repr(self) -> str:
        top_k = "" if self.top_k == 1 else f", top_k={self.top_k}, top_k_combine={self.top_k_combine!r}"
        return (f"d_model={self.d_model}, num_experts={self.num_experts}, ep_size={self.world}, "
                f"shuffle={self.shuffle}, assignment={self.assignment!r}, inference={self.inference!r}{top_k}")

    def set_group(self, group: Optional[dist.ProcessGroup]) -> None:
        """Attach the expert-parallel process group (a layer built with ``group_size``, or one moving to
        another group of the same size); ``None`` as in the constructor. Centroids given before (by the
        constructor or :meth:`set_centroids`) and not replaced by a loaded state dict are now cut to
        this rank's rows. ValueError if the group's size differs from the layer's."""
        group, world, rank = resolve_group(group)
        if world != self.world:
            raise ValueError(f"BaseLayer was built for an expert-parallel group of {self.world} ranks, got a group "
                             f"of {world}" + ("" if dist.is_available() and dist.is_initialized()
                                              else " (torch.distributed is not initialised)"))
        self.group, self.rank, self.attached, self._sizes_checked = group, rank, True, False
        if self._pending_centroids is not None:
            full, self._pending_centroids = self._pending_centroids, None
            self.set_centroids(full)

    @torch.no_grad()
    def set_centroids(self, centroids: torch.Tensor) -> None:
        """Set the centroids of all experts from Tensor[num_experts, d_model]; this rank keeps its rows
        (before :meth:`set_group` they wait for it). ValueError for another shape."""
        if tuple(centroids.shape) != (self.num_experts, self.d_model):
            raise ValueError(f"centroids must have shape {(self.num_experts, self.d_model)}, "
                             f"got {tuple(centroids.shape)}")
        if not self.attached:
            self._pending_centroids = centroids.detach().clone()
            return
        rows = centroids[self.rank * self.num_local:(self.rank + 1) * self.num_local]
        for c, row in zip(self.local_centroids(), rows):
            c.copy_(row)

    def _centroid_state_keys(self, prefix: str) -> List[str]:
        """The state-dict keys of this rank's centroids (a subclass that keeps them elsewhere overrides it)."""
        return [prefix + "centroids"]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Loaded centroids are this rank's own rows (like its experts): they replace waiting ones.
        if self._pending_centroids is not None and any(k in state_dict for k in self._centroid_state_keys(prefix)):
            self._pending_centroids = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def local_centroids(self) -> List[torch.Tensor]:
        """This rank's experts' centroids as ``num_local`` differentiable Tensors[d], local expert order.

        The one place the layer reads its centroids; a subclass that keeps them elsewhere (e.g. one
        parameter per expert module) overrides this.
        """
        return list(self.centroids.unbind(0))

    def _check_sizes(self, device: torch.device) -> None:
        """Once: all ranks of the group hold the same sizes (else the collectives below could not match)."""
        mine = torch.tensor([self.d_model, self.num_experts, self.num_local, self.top_k], dtype=torch.long,
                            device=device)
        rows = [torch.empty_like(mine) for _ in range(self.world)]  # on the device too: NCCL needs it
        self.comm.all_gather(rows, mine, group=self.group)
        sizes = torch.stack(rows).cpu()
        if not bool((sizes == mine.cpu()).all()):
            raise ValueError("ranks of the expert-parallel group disagree on (d_model, num_experts, local experts, top_k): "
                             f"{sizes.tolist()}")
        self._sizes_checked = True

    def _gather_centroids(self, local: List[torch.Tensor], shuffling: bool, exact: bool, n: int
                          ) -> Tuple[torch.Tensor, Optional[List[int]]]:
        """All centroids [E, d] (detached, float64) and every group rank's token count (None without a
        group), checking that the group agrees on the mode: training, shuffling and exact routing (which
        decides whether counts are exchanged before the dispatch)."""
        local = torch.stack([c.detach() for c in local]).to(torch.float64)
        if self.group is None:
            return local, None
        if not self._sizes_checked:
            self._check_sizes(local.device)
        # One extra row carries what must match on every rank, so a mismatch raises everywhere instead
        # of leaving some ranks waiting in a collective the others never enter, and the token count
        # the dispatch needs: training + 2·shuffling + 4·exact + 8·n, exact in float64 up to n = 2**49.
        header = local.new_zeros(1, self.d_model)
        header[0, 0] = float(self.training) + 2.0 * float(shuffling) + 4.0 * float(exact) + 8.0 * n
        mine = torch.cat([header, local])
        rows = [torch.empty_like(mine) for _ in range(self.world)]
        self.comm.all_gather(rows, mine, group=self.group)
        packed = torch.stack([r[0, 0] for r in rows]).to(torch.long).tolist()
        modes, sizes = [v % 8 for v in packed], [v // 8 for v in packed]
        if any(m != modes[self.rank] for m in modes):
            raise ValueError("ranks of the expert-parallel group disagree on the mode "
                             f"(per rank: training + 2 * shuffling + 4 * exact routing = {modes})")
        return torch.cat([r[1:] for r in rows]), sizes

    def mix_experts(self, x: torch.Tensor, counts: List[int], centroids: List[torch.Tensor]
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """The local experts and the gate on the tokens this rank received: x Tensor[T, d] sorted by local
        expert, ``counts`` their number per local expert, ``centroids`` :meth:`local_centroids`. Returns
        ``(y, α)``: y Tensor[T, d] with ``y = α·f_e(x) + (1 − α)·x``, α Tensor[T] the gates. A subclass
        may wrap it (e.g. to share the tokens of tensor-parallel expert shards)."""
        # Expert by expert, while its block is in cache: α = σ(x · c_e), one matrix-vector product (the
        # centroids learn through it), and y = α·f_e(x) + (1 − α)·x in one fused lerp.
        blocks = self.experts.pieces(x, counts)
        if len(blocks) != self.num_local:
            raise ValueError(f"{type(self.experts).__name__}.pieces returned {len(blocks)} blocks for "
                             f"{self.num_local} local experts")
        gates, mixed = [], []
        for chunk, f, c in zip(x.split(counts), blocks, centroids):
            gates.append(torch.sigmoid(chunk @ c.to(chunk.dtype)))
            mixed.append(torch.lerp(chunk, f, gates[-1].unsqueeze(-1)))
        return torch.cat(mixed), torch.cat(gates)

    def _check_input(self, x: torch.Tensor) -> None:
        if not self.attached:
            raise ValueError(f"BaseLayer was built with group_size={self.world} and has no process group yet: call "
                             "set_group() first")
        if x.dim() < 1 or x.shape[-1] != self.d_model:
            raise ValueError(f"expected input of shape [..., {self.d_model}], got {tuple(x.shape)}")

    def _dispatch(self, routing: Routing, slots: torch.Tensor, sizes: Optional[List[int]], rows: int,
                  exact: bool) -> _Dispatch:
        """How many slots go to and come from every rank, and how many each local expert gets.

        With exact routing and no shuffle these follow from every rank's row count alone; with the
        shuffle they rode on its experts-back messages; otherwise counts are exchanged first. The host
        ints are the dispatch's one host synchronisation (none for exact routing without a shuffle)."""
        dev, k = slots.device, self.top_k
        if routing.incoming is None and exact:
            send, recv, host_counts = exact_dispatch_counts([rows * k] if sizes is None else [m * k for m in sizes],
                                                            self.num_experts, self.rank)
            counts = [sum(host_counts[i::self.num_local]) for i in range(self.num_local)]
            return _Dispatch(send, recv, counts, device_longs(host_counts, dev))
        per_expert = torch.bincount(slots, minlength=self.num_experts)
        recv_counts = (routing.incoming if routing.incoming is not None
                       else exchange_counts(per_expert, self.group, self.comm))
        host = torch.cat([per_expert.view(self.world, -1).sum(1), recv_counts.view(self.world, -1).sum(1),
                          recv_counts.view(self.world, self.num_local).sum(0)]).tolist()
        w = self.world
        return _Dispatch(host[:w], host[w:2 * w], host[2 * w:], recv_counts)

    def _by_local_expert(self, dispatch: _Dispatch, received: int, device: torch.device) -> Optional[Permutation]:
        """Received rows come ordered (source rank, local expert); the permutation that orders them by
        local expert (None when they already are: one rank, or one expert per rank)."""
        if self.world == 1 or self.num_local == 1:
            return None
        local_id = torch.arange(self.num_local, device=device).repeat(self.world)
        return Permutation.sorting(torch.repeat_interleave(local_id, dispatch.recv_counts, output_size=received))

    def combine(self, mixed: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """A token's output from its k mixes ``mixed`` [n, k, d] (``α_j·f_j(x) + (1 − α_j)·x``, one per
        chosen expert) and its input x [n, d]: ``"mean"`` → their mean ``x + (1/k)·Σ_j α_j (f_j(x) − x)``;
        ``"sum"`` → ``x + Σ_j α_j (f_j(x) − x)``. k = 1 is the paper's form under either."""
        if self.top_k == 1:
            return mixed[:, 0]
        if self.top_k_combine == "mean":
            return mixed.mean(1)
        return mixed.sum(1) - (self.top_k - 1) * x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        h = x.reshape(-1, self.d_model)
        n, k = h.shape[0], self.top_k
        shuffling = self.shuffle and self.training and self.group is not None
        choice = self.assignment if self.training else self.inference
        exact = isinstance(choice, str) and choice == "exact"
        centroids = self.local_centroids()
        everyone, sizes = self._gather_centroids(centroids, shuffling, exact, n)

        with torch.no_grad():  # the routing takes no gradient: the centroids learn through the gate
            scores = h.detach() @ everyone.to(h.dtype).t()
            routing = route_shuffled(scores, choice, self.group if shuffling else None, sizes, incoming=shuffling,
                                     comm=self.comm, k=k)
        slots = routing.experts.reshape(-1)  # token t's k experts are slots t·k … t·k + k − 1
        by_expert = Permutation.sorting(slots)
        dispatch = self._dispatch(routing, slots, sizes, n, exact)
        routed = all_to_all(by_expert.apply(h, repeat=k), dispatch.send, dispatch.recv, self.group, self.comm)
        by_local = self._by_local_expert(dispatch, routed.shape[0], x.device)
        if by_local is not None:
            routed = by_local.apply(routed)
        out, gates = self.mix_experts(routed, dispatch.counts, centroids)
        if by_local is not None:
            out = by_local.undo(out)
        out = by_expert.undo(all_to_all(out, dispatch.recv, dispatch.send, self.group, self.comm))
        out = self.combine(out.view(n, k, self.d_model), h)

        self.last_stats = self._stats(routing, dispatch, gates, slots)
        return out.reshape(x.shape)

    def _stats(self, routing: Routing, dispatch: _Dispatch, gates: torch.Tensor, slots: torch.Tensor) -> RoutingStats:
        dev = slots.device
        sent = torch.bincount(slots, minlength=self.num_experts).view(self.world, self.num_local).sum(1)
        return RoutingStats(
            tokens_per_expert=torch.bincount(routing.solved.reshape(-1), minlength=self.num_experts).detach(),
            tokens_received=device_longs(dispatch.counts, dev), objective=routing.objective.detach(),
            gap=routing.gap.detach(),
            mean_gate=gates.detach().sum() / max(sum(dispatch.counts), 1),
            tokens_moved=sent.sum() - sent[self.rank])
