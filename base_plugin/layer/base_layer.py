"""The BASE layer (Lewis et al. 2021): balanced assignment of tokens to experts, expert-parallel."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch import nn

from .all_to_all import all_to_all, exchange_counts
from .experts import ExpertList, GroupedExperts
from .groups import expert_group_name, mark_expert_parameters, resolve_group
from .permute import Permutation
from .routing import Router, check_router, device_longs, exact_dispatch_counts, route_shuffled
from .stats import RoutingStats

_CENTROID_GAIN = 0.1  # small centroids: the gate starts near 1/2 and tokens are spread by direction only


class BaseLayer(nn.Module):
    """Expert-parallel BASE layer: every token goes to exactly one expert, the load balanced exactly.

    ``forward(x)``: x is a float Tensor[..., d_model] (any leading shape, possibly 0 tokens, a different
    number of tokens on every rank); returns Tensor of the same shape and dtype. Per call:

    1. tokens are flattened; scores ``x · cᵀ`` against the centroids of all ``num_experts`` experts
       (no gradient);
    2. when training with ``shuffle=True``, the score rows are dealt out at random and evenly over the
       expert-parallel group, as the paper shuffles tokens so that a rank's routing problem is not one
       domain (:func:`~base_plugin.layer.routing.route_shuffled`: the hidden states themselves wait
       and later go straight to their expert);
    3. routing: training → ``assignment`` (default exact balanced assignment *per rank*: every expert
       gets ``n // E`` or ``n // E + 1`` of the n rows this rank routes); not training → ``inference``
       (default greedy argmax);
    4. tokens go to their expert's rank with ``all_to_all_single``. Every rank must know what it will
       receive: with exact routing this follows from the row counts alone (without a shuffle) or is
       tallied on the shuffle's experts-back messages; other routers (greedy inference, a callable
       without a shuffle) exchange counts first;
    5. ``y = α·f_e(x) + (1 − α)·x`` with ``α = σ(x · c_e)`` — the centroids learn through the gate only;
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
        assignment: routing while training, ``"exact"`` | ``"greedy"`` | callable(scores[n, E]) -> LongTensor[n].
        inference: routing while not training, same choices.
        group_name: the ``group_name`` mark of expert parameters (default DeepSpeed's ``"ep_size_<W>"``).
        group_size: build the layer for an expert-parallel group of this size that is attached later with
            :meth:`set_group` (for frameworks that create their groups after the model, as DeepSpeed's
            engine does); ``group`` must then be None. Until attached, ``forward`` raises ValueError and
            the centroids wait: the rows this rank keeps are chosen when it learns its rank. 1 is a
            single process at once.
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

    Raises ValueError for: a bad hidden size of ``x``; ``num_experts`` not divisible by W; a number of
    local experts other than ``num_experts / W``; experts whose declared ``d_model`` differs; a group
    this process is not in; an unknown router; ranks of the group disagreeing on d_model or num_experts
    (checked once, at the first call) or on the mode — training, shuffling, exact routing or not
    (checked every call) — raised on every rank of the group alike, so none is left waiting.

    After each call ``last_stats`` holds a :class:`RoutingStats` (device tensors, no host sync).
    """

    def __init__(self, d_model: int, experts: Union[Sequence[nn.Module], GroupedExperts], num_experts: int,
                 group: Optional[dist.ProcessGroup] = None, *, shuffle: bool = True, assignment: Router = "exact",
                 inference: Router = "greedy", group_name: Optional[str] = None, group_size: Optional[int] = None,
                 comm=None):
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
        return (f"d_model={self.d_model}, num_experts={self.num_experts}, ep_size={self.world}, "
                f"shuffle={self.shuffle}, assignment={self.assignment!r}, inference={self.inference!r}")

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
        mine = torch.tensor([self.d_model, self.num_experts, self.num_local], dtype=torch.long, device=device)
        rows = [torch.empty_like(mine) for _ in range(self.world)]  # on the device too: NCCL needs it
        self.comm.all_gather(rows, mine, group=self.group)
        sizes = torch.stack(rows).cpu()
        if not bool((sizes == mine.cpu()).all()):
            raise ValueError("ranks of the expert-parallel group disagree on (d_model, num_experts, local experts): "
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.attached:
            raise ValueError(f"BaseLayer was built with group_size={self.world} and has no process group yet: call "
                             "set_group() first")
        if x.dim() < 1 or x.shape[-1] != self.d_model:
            raise ValueError(f"expected input of shape [..., {self.d_model}], got {tuple(x.shape)}")
        shape, dev = x.shape, x.device
        h = x.reshape(-1, self.d_model)
        shuffling = self.shuffle and self.training and self.group is not None
        choice = self.assignment if self.training else self.inference
        exact = isinstance(choice, str) and choice == "exact"
        centroids = self.local_centroids()
        everyone, sizes = self._gather_centroids(centroids, shuffling, exact, h.shape[0])

        with torch.no_grad():
            scores = h.detach() @ everyone.to(h.dtype).t()
            routing = route_shuffled(scores, choice, self.group if shuffling else None, sizes, incoming=shuffling,
                                     comm=self.comm)
        by_expert = Permutation.sorting(routing.experts)
        per_expert = torch.bincount(routing.experts, minlength=self.num_experts)
        # What every rank sends to this rank's experts: known without a count exchange when the
        # shuffle's experts-back messages carried it, or when exact routing fixed it by the row counts.
        if routing.incoming is None and exact:
            send_splits, recv_splits, host_counts = exact_dispatch_counts(
                [h.shape[0]] if sizes is None else sizes, self.num_experts, self.rank)
            recv_counts = device_longs(host_counts, dev)
            counts = [sum(host_counts[i::self.num_local]) for i in range(self.num_local)]
        else:
            recv_counts = (routing.incoming if routing.incoming is not None
                           else exchange_counts(per_expert, self.group, self.comm))
            # the one host synchronisation of the dispatch: split sizes per rank, tokens per local expert
            host = torch.cat([per_expert.view(self.world, -1).sum(1), recv_counts.view(self.world, -1).sum(1),
                              recv_counts.view(self.world, self.num_local).sum(0)]).tolist()
            send_splits, recv_splits = host[:self.world], host[self.world:2 * self.world]
            counts = host[2 * self.world:]
        routed = all_to_all(by_expert.apply(h), send_splits, recv_splits, self.group, self.comm)

        # Received rows are ordered (source rank, local expert); the experts want them by local expert.
        by_local = None
        if self.world > 1 and self.num_local > 1:
            local_id = torch.arange(self.num_local, device=dev).repeat(self.world)
            by_local = Permutation.sorting(
                torch.repeat_interleave(local_id, recv_counts, output_size=routed.shape[0]))
            routed = by_local.apply(routed)
        out, gates = self.mix_experts(routed, counts, centroids)
        if by_local is not None:
            out = by_local.undo(out)
        out = by_expert.undo(all_to_all(out, recv_splits, send_splits, self.group, self.comm))

        sent = per_expert.view(self.world, self.num_local).sum(1)
        self.last_stats = RoutingStats(
            tokens_per_expert=torch.bincount(routing.solved, minlength=self.num_experts).detach(),
            tokens_received=device_longs(counts, dev), objective=routing.objective.detach(),
            gap=routing.gap.detach(),
            mean_gate=gates.detach().sum() / max(sum(counts), 1),
            tokens_moved=sent.sum() - sent[self.rank])
        return out.reshape(shape)
