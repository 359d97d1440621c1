"""BASE routing for Megatron-core's ``MoELayer``: :class:`BaseRouter`.

What ``MoELayer`` asks of a router: ``forward(hidden[s, b, d], padding_mask=None) -> (probs[T, E],
routing_map[T, E] bool)`` for its T = s * b local tokens. The token dispatcher (allgather / alltoall /
flex) sends token t to every expert e with ``routing_map[t, e]``, and the layer returns
``sum_e probs[t, e] * expert_e(x_t)``. The transformer layer then adds its residual stream.

:class:`BaseRouter` fills that contract the BASE way (Lewis et al. 2021):

* scores ``s = x · Cᵀ`` with the centroids C = the router weight ``[E, d]`` (computed without grad);
* training: exact balanced assignment of this rank's tokens (every expert gets ``T // E`` or
  ``T // E + 1`` of them; :func:`base_plugin.assignment.balanced_assignment`); not training: greedy
  argmax (switchable: ``inference="exact"``);
* top-1, ``probs[t, e(t)] = α = σ(x_t · c_e)``, the BASE sigmoid gate: the centroids (and the input)
  get gradients through the gate only, never through the assignment. No auxiliary loss, no capacity
  factor, no dropped tokens;
* optional shuffle (training only): the scores of this rank's tokens are dealt out at random over a
  process group, each rank solves the balanced assignment of the scores it received, and the chosen
  experts travel back. This is the paper's random token shuffle, done on the ``[T, E]`` scores instead
  of the ``[T, d]`` hidden states: the routing problem each rank solves is the same random mix of the
  group's tokens, and the dispatcher then sends every hidden state straight to its expert, which saves
  the paper's two extra hidden-state all-to-alls.

How the paper's mix maps onto Megatron (see also :mod:`base_plugin.megatron.moe_layer`): Megatron's
transformer layer computes ``h + MoE(LN(h))`` and with this router
``MoE(u) = α(u) · g_e(u)`` (g_e = the expert MLP), so the layer output is

    h + α · g_e(LN(h))  =  α · f_e(h) + (1 − α) · h     with f_e(h) = h + g_e(LN(h)),

the paper's ``y = α·f_e(x) + (1 − α)·x`` with the paper's residual, pre-LayerNorm expert f_e. The one
difference left is that the score and the gate see ``LN(h)`` instead of ``h``;
:class:`~base_plugin.megatron.moe_layer.BasePaperMoELayer` routes on ``h`` itself for the exact form.
"""
from __future__ import annotations

from . import _require_megatron

_require_megatron()

from typing import Dict, Optional, Union

import torch
import torch.distributed as dist

from megatron.core.transformer.transformer_config import TransformerConfig

from ..layer.routing import Router as RouterChoice
from ..layer.routing import check_router, route_shuffled
from .compat import TopKRouter, config_value, default_pg_collection, router_kwargs

LOAD_BALANCING_TYPE = "base"
_SHUFFLE_GROUPS = ("tp_dp_cp", "ep")


def _aux_coeffs(config: TransformerConfig):
    coeff = config.moe_aux_loss_coeff
    return list(coeff) if isinstance(coeff, (list, tuple)) else [coeff]


def check_base_config(config: TransformerConfig) -> None:
    """Raise ValueError naming the first option of ``config`` that BASE routing cannot honour, with the
    values it allows. BASE routing is top-1 with an exact balance: no capacity factor (nothing is
    dropped), no auxiliary or z-loss, no expert bias, no group-limited routing, no input jitter."""
    def bad(option: str, value, allowed: str):
        raise ValueError(f"BASE routing: {option}={value!r} is not supported; allowed: {allowed} "
                         "(BASE routes every token to exactly one expert by an exact balanced assignment)")

    if config.num_moe_experts is None or config.num_moe_experts < 1:
        bad("num_moe_experts", config.num_moe_experts, "an integer >= 1")
    if config.moe_router_topk != 1:
        bad("moe_router_topk", config.moe_router_topk, "1")
    if config.moe_expert_capacity_factor is not None:
        bad("moe_expert_capacity_factor", config.moe_expert_capacity_factor,
            "None (the assignment is balanced exactly; no token is dropped)")
    if config.moe_pad_expert_input_to_capacity:
        bad("moe_pad_expert_input_to_capacity", True, "False")
    if any(float(c) != 0.0 for c in _aux_coeffs(config)):
        bad("moe_aux_loss_coeff", config.moe_aux_loss_coeff, "0 (BASE needs no auxiliary load-balancing loss)")
    types = config.moe_router_load_balancing_type
    types = list(types) if isinstance(types, (list, tuple)) else [types]
    for t in types:
        if t not in (LOAD_BALANCING_TYPE, "none", "aux_loss", "seq_aux_loss", "global_aux_loss"):
            bad("moe_router_load_balancing_type", config.moe_router_load_balancing_type,
                f"'{LOAD_BALANCING_TYPE}' (or 'none' / an aux-loss type with moe_aux_loss_coeff=0)")
    if config.moe_z_loss_coeff not in (None, 0, 0.0):
        bad("moe_z_loss_coeff", config.moe_z_loss_coeff, "None or 0")
    if config.moe_router_enable_expert_bias:
        bad("moe_router_enable_expert_bias", True, "False")
    if config.moe_router_num_groups not in (None, 1) or config.moe_router_group_topk not in (None, 1):
        bad("moe_router_num_groups/moe_router_group_topk",
            (config.moe_router_num_groups, config.moe_router_group_topk), "None")
    if config.moe_input_jitter_eps is not None:
        bad("moe_input_jitter_eps", config.moe_input_jitter_eps, "None")
    if config.moe_router_topk_scaling_factor not in (None, 1, 1.0):
        bad("moe_router_topk_scaling_factor", config.moe_router_topk_scaling_factor, "None or 1")
    if config.moe_router_force_load_balancing:
        bad("moe_router_force_load_balancing", True, "False")
    if config_value(config, "moe_enable_routing_replay", False):
        bad("moe_enable_routing_replay", True, "False")
    if config_value(config, "moe_router_force_biased") is not None:  # 0.19+
        bad("moe_router_force_biased", config.moe_router_force_biased, "None")


class BaseRouter(TopKRouter):
    """Megatron-core router for BASE layers (top-1, exact balanced assignment per rank, sigmoid gate).

    Build it through a layer spec (``MoESubmodules(router=BaseRouter)``, or
    :func:`base_plugin.megatron.with_base_router` on any GPT spec), or by the config flag
    ``moe_router_load_balancing_type="base"`` through :func:`base_plugin.megatron.build_gpt_model` /
    :func:`base_plugin.megatron.spec_for_config`. Keyword options (set them with ``functools.partial``
    in a spec, or as keywords of those functions):

    Args:
        config: the ``TransformerConfig``; :func:`check_base_config` must accept it.
        pg_collection: Megatron's process groups (default: ``parallel_state``'s).
        shuffle: deal the scores out at random over ``shuffle_group`` before the assignment (training only).
        shuffle_group: ``"tp_dp_cp"`` (default: every rank holding distinct tokens of this pipeline stage,
            the paper's "all workers"), ``"ep"`` (the expert-parallel group) or a ``ProcessGroup``.
        assignment: routing while training: ``"exact"`` (default) | ``"greedy"`` | callable(scores[n, E]) -> LongTensor[n].
        inference: routing while not training (``self.training`` is False): ``"greedy"`` (default) | ``"exact"`` | callable.
        megatron_kwargs: what ``MoELayer`` passes to its router besides ``config`` and ``pg_collection``
            in the installed release (0.17+: ``is_mtp_layer``), handed to ``TopKRouter`` unchanged; any
            other keyword raises ValueError naming it (:func:`base_plugin.megatron.compat.router_kwargs`).

    The router weight ``[E, d]`` holds the expert centroids (Megatron's ``mlp.router.weight``,
    replicated like ``TopKRouter``'s, so checkpoints, distributed checkpoints and resharding across
    expert-parallel sizes treat it exactly like theirs). Padding tokens (``padding_mask`` True) take part
    in no assignment and are routed nowhere (all-False row, output 0).

    After each call ``last_stats`` holds device tensors (no host sync): ``tokens_per_expert`` [E] of the
    tokens this rank routed (its own, or the shuffled ones it solved), ``objective`` and ``gap``
    (solver certificate: dual bound − objective, ≈ 0 for the exact assignment; NaN for a callable) and
    ``mean_gate``.
    """

    def __init__(self, config: TransformerConfig, pg_collection=None, *, shuffle: bool = True,
                 shuffle_group: Union[str, dist.ProcessGroup] = "tp_dp_cp", assignment: RouterChoice = "exact",
                 inference: RouterChoice = "greedy", **megatron_kwargs) -> None:
        megatron_kwargs = router_kwargs("BaseRouter", megatron_kwargs)
        check_base_config(config)
        for name, choice in (("assignment", assignment), ("inference", inference)):
            check_router(name, choice, "BaseRouter")
        if isinstance(shuffle_group, str) and shuffle_group not in _SHUFFLE_GROUPS:
            raise ValueError(f"BaseRouter: shuffle_group must be one of {_SHUFFLE_GROUPS} or a ProcessGroup, "
                             f"got {shuffle_group!r}")
        if pg_collection is None:
            pg_collection = default_pg_collection()
        super().__init__(config=config, pg_collection=pg_collection, **megatron_kwargs)
        self.topk = 1
        self.shuffle, self.assignment, self.inference = bool(shuffle), assignment, inference
        if isinstance(shuffle_group, str):
            shuffle_group = pg_collection.ep if shuffle_group == "ep" else pg_collection.tp_dp_cp
        self.shuffle_group = shuffle_group
        self.last_stats: Optional[Dict[str, torch.Tensor]] = None

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, shuffle={self.shuffle}, assignment={self.assignment!r}, "
                f"inference={self.inference!r}")

    # -- gate -------------------------------------------------------------------------------------
    def gating(self, input: torch.Tensor) -> torch.Tensor:
        """Logits ``x · Cᵀ (+ bias)`` [..., E], differentiable, on the input's device (CPU or GPU: the
        weight follows the input instead of being sent to CUDA as ``TopKRouter.gating`` does)."""
        for p in (self.weight, self.bias):
            if p is not None and p.device != input.device:
                p.data = p.data.to(input.device)
        dtype = {"fp32": torch.float32, "fp64": torch.float64}.get(self.config.moe_router_dtype, torch.float32)
        dtype = torch.promote_types(dtype, torch.float32)  # never solve in half precision
        logits = torch.matmul(input.to(dtype), self.weight.to(dtype).t())
        if self.bias is not None:
            logits = logits + self.bias.to(dtype)
        return logits

    # -- assignment -------------------------------------------------------------------------------
    def _shuffling(self) -> bool:
        g = self.shuffle_group
        return (self.shuffle and self.training and g is not None and dist.is_initialized()
                and dist.get_world_size(g) > 1)

    def _assign(self, scores: torch.Tensor):
        """:class:`~base_plugin.layer.routing.Routing` of the rows of ``scores`` [n, E]: solved here or,
        when shuffling, on random ranks of ``shuffle_group``."""
        choice = self.assignment if self.training else self.inference
        return route_shuffled(scores, choice, self.shuffle_group if self._shuffling() else None)

    def routing(self, logits: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        """``(probs [T, E], routing_map [T, E] bool)`` from logits [..., E]; see the class docstring."""
        num_experts = self.config.num_moe_experts
        logits = logits.reshape(-1, num_experts)
        valid = None if padding_mask is None else ~padding_mask.reshape(-1).to(torch.bool)
        with torch.no_grad():
            scores = logits.detach() if valid is None else logits.detach()[valid]
            routing = self._assign(scores)
        experts = routing.experts
        if valid is not None:
            full = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
            full[valid] = experts
            experts = full
        routing_map = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, experts[:, None], True)
        if valid is not None:
            routing_map &= valid[:, None]
        gate = torch.sigmoid(logits.gather(1, experts[:, None]))  # α = σ(x · c_e), grad to x and c_e
        probs = torch.zeros_like(logits).scatter(1, experts[:, None], gate)
        if valid is not None:
            probs = probs * valid[:, None].to(probs.dtype)
        n_valid = routing_map.sum()
        self.last_stats = {
            "tokens_per_expert": torch.bincount(routing.solved, minlength=num_experts).detach(),
            "objective": routing.objective.detach(),
            "gap": routing.gap.detach(),
            "mean_gate": (probs.detach().sum() / n_valid.clamp(min=1)),
        }
        return probs, routing_map

    def forward(self, input: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        """``(probs [T, E], routing_map [T, E])`` for ``input`` [s, b, d] (T = s·b)."""
        return self.routing(self.gating(input), padding_mask=padding_mask)
