"""``BaseMoE``: a BASE layer that DeepSpeed's engine treats as one of its own MoE layers.

    moe = BaseMoE(hidden_size, expert, num_experts=8, ep_size=2)
    out, l_aux, exp_counts = moe(x)          # l_aux is a zero tensor: BASE needs no balancing loss

Why it subclasses ``deepspeed.moe.layer.MoE``: the engine recognises MoE layers with ``isinstance``
and then (a) reduces expert gradients over the expert-data-parallel group only, (b) puts expert
parameters in their own ZeRO-1/2 partitions, (c) writes one checkpoint file per *global* expert and
reads them back for any ``ep_size``. ``BaseMoE`` does not run ``MoE.__init__`` (no top-k gate is built);
it sets the attributes the engine reads (``num_experts``, ``num_local_experts``, ``ep_size``,
``expert_group_name``) and lays its parameters out under the same names as DeepSpeed's MoE:

    deepspeed_moe                                    the BaseLayer (routing, all-to-all, gate mix)
    deepspeed_moe.experts.deepspeed_experts.<i>.*    local expert i's own weights (unchanged names)
    deepspeed_moe.experts.deepspeed_experts.<i>.base_centroid   its BASE centroid c_e, [hidden_size]

so every expert parameter, centroid included, is saved and reloaded per global expert by DeepSpeed's
own checkpoint code. Groups come from ``deepspeed.utils.groups`` (the same ``ep_size_<n>`` groups
DeepSpeed's MoE uses); they are created in the constructor, so torch.distributed must be initialised
first when ``ep_size > 1`` (``deepspeed.init_distributed()``; :func:`base_plugin.deepspeed.initialize`
does it for you).
"""
from __future__ import annotations

import copy
import warnings
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as tdist
from torch import nn
from torch.nn import functional as F

from deepspeed.moe.layer import MoE
from deepspeed.utils import groups

from ..layer import BaseLayer, mark_expert_parameters
from ..layer.experts import GroupedExperts, run_each

CENTROID = "base_centroid"  # name of the centroid parameter registered on each local expert module

# MoE constructor arguments that have no meaning for BASE routing (value DeepSpeed uses by default).
_TOPK_ARGUMENTS = {
    "k": 1, "capacity_factor": 1.0, "eval_capacity_factor": 1.0, "min_capacity": 4, "noisy_gate_policy": None,
    "drop_tokens": True, "use_rts": True, "use_tutel": False, "top2_2nd_expert_sampling": True,
}
_WHY_IGNORED = ("BASE routing sends every token to exactly one expert and gives every expert exactly its share "
                "of the tokens, so there is no top-k, no capacity, no dropped tokens and no gate noise")


class DeepSpeedExperts(GroupedExperts):
    """The local experts of one rank in DeepSpeed's layout (``deepspeed_experts`` ModuleList).

    Each expert maps [n, d] -> [n, d] (a tuple output keeps its first element, as DeepSpeed does).
    """

    def __init__(self, experts: Sequence[nn.Module], d_model: int):
        super().__init__()
        self.deepspeed_experts = nn.ModuleList(list(experts))
        self.num_experts = len(self.deepspeed_experts)
        self.d_model = d_model

    def pieces(self, x: torch.Tensor, counts: List[int]) -> List[torch.Tensor]:
        return run_each(self.deepspeed_experts, x, counts)

    def forward(self, x: torch.Tensor, counts: List[int]) -> torch.Tensor:
        return torch.cat(self.pieces(x, counts))


class _ExpertCentroidLayer(BaseLayer):
    """BaseLayer whose centroids live on the expert modules, one ``base_centroid`` [d] per expert."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        rows = self._parameters.pop("centroids").detach()
        for expert, row in zip(self.experts.deepspeed_experts, rows):
            p = nn.Parameter(row.clone())
            mark_expert_parameters([p], self.group_name)
            expert.register_parameter(CENTROID, p)

    def local_centroids(self) -> List[torch.Tensor]:
        return [getattr(e, CENTROID) for e in self.experts.deepspeed_experts]


def _check_positive(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def ensure_expert_groups(ep_size: int, use_data_before_expert_parallel: bool = False):
    """DeepSpeed's ``ep_size_<n>`` expert-parallel and expert-data-parallel groups (created if missing).

    Returns ``(ep_group, edp_group)``, or ``(None, None)`` without torch.distributed and ``ep_size == 1``.
    ValueError if ``ep_size`` does not divide the world size or distributed is needed but absent.
    """
    if not (tdist.is_available() and tdist.is_initialized()):
        if ep_size > 1:
            raise ValueError(f"ep_size={ep_size} needs torch.distributed: call deepspeed.init_distributed() before "
                             "building BaseMoE (base_plugin.deepspeed.initialize does this itself)")
        return None, None
    import deepspeed
    deepspeed.init_distributed(dist_backend=tdist.get_backend())  # wraps the existing group for deepspeed.comm
    world = tdist.get_world_size()
    if ep_size > world or world % ep_size:
        raise ValueError(f"ep_size={ep_size} must divide the world size {world} (allowed: "
                         f"{[d for d in range(1, world + 1) if world % d == 0]})")
    name = f"ep_size_{ep_size}"
    if name not in groups._get_expert_parallel_group_dict():
        if groups.mpu is None:
            groups._create_expert_and_data_parallel(
                ep_size, use_data_before_expert_parallel_=use_data_before_expert_parallel)
        else:
            groups._create_expert_data_and_model_parallel(
                ep_size, mpu=groups.mpu, use_data_before_expert_parallel_=use_data_before_expert_parallel)
    return groups._get_expert_parallel_group(name), groups._get_expert_data_parallel_group(name)


class BaseMoE(MoE):
    """Drop-in for ``deepspeed.moe.layer.MoE`` with BASE routing (Lewis et al., 2021).

    Args (DeepSpeed's names):
        hidden_size: d, input and output size.
        expert: the expert module ([n, d] -> [n, d]); deep-copied ``num_experts / ep_size`` times, like
            DeepSpeed does. Or pass ``experts=[...]`` (this rank's modules, used as they are).
        num_experts: total experts over the expert-parallel group.
        ep_size: expert-parallel size (must divide the world size).
        use_residual: Residual MoE as in DeepSpeed: ``out·p₀ + mlp(x)·p₁`` with ``p = softmax(coefficient(x))``.
        enable_expert_tensor_parallelism: build groups with DeepSpeed's mpu (tensor-parallel experts).
        k, capacity_factor, eval_capacity_factor, min_capacity, noisy_gate_policy, drop_tokens, use_rts,
        use_tutel, top2_2nd_expert_sampling: accepted for drop-in compatibility and ignored with a
            warning when not DeepSpeed's default (BASE has no top-k, capacity or dropped tokens).
    BASE options:
        shuffle, assignment ("exact"|"greedy"|callable), inference ("greedy"|"exact"|callable): see
            :class:`base_plugin.layer.BaseLayer`.
        centroids: optional Tensor[num_experts, hidden_size], the initial centroids of all experts
            (e.g. the rows of a top-k gate's weight); default: BaseLayer's initialisation.
        return_aux: ``True`` (default) returns ``(output, l_aux, exp_counts)`` like DeepSpeed's MoE;
            ``False`` returns only the output, for positions where a plain FFN was.

    ``forward(hidden_states[..., d], used_token=None)`` -> ``(output, l_aux, exp_counts)``: ``l_aux`` a
    zero scalar, ``exp_counts`` LongTensor[num_experts] of this rank's tokens per global expert.
    ``used_token`` (a token mask for top-k gating) is not supported: ValueError if given.
    ``last_stats`` has the :class:`~base_plugin.layer.RoutingStats` of the last call.
    """

    def __init__(self, hidden_size: int, expert: Optional[nn.Module] = None, num_experts: int = 1, ep_size: int = 1,
                 k: int = 1, capacity_factor: float = 1.0, eval_capacity_factor: float = 1.0, min_capacity: int = 4,
                 use_residual: bool = False, noisy_gate_policy: Optional[str] = None, drop_tokens: bool = True,
                 use_rts: bool = True, use_tutel: bool = False, enable_expert_tensor_parallelism: bool = False,
                 top2_2nd_expert_sampling: bool = True, *, experts: Optional[Sequence[nn.Module]] = None,
                 shuffle: bool = True, assignment="exact", inference="greedy",
                 centroids: Optional[torch.Tensor] = None, return_aux: bool = True,
                 use_data_before_expert_parallel: bool = False) -> None:
        nn.Module.__init__(self)  # not MoE.__init__: no top-k gate
        for name, value in (("hidden_size", hidden_size), ("num_experts", num_experts), ("ep_size", ep_size)):
            _check_positive(name, value)
        if num_experts % ep_size:
            raise ValueError(f"num_experts={num_experts} is not divisible by ep_size={ep_size}")
        given = dict(k=k, capacity_factor=capacity_factor, eval_capacity_factor=eval_capacity_factor,
                     min_capacity=min_capacity, noisy_gate_policy=noisy_gate_policy, drop_tokens=drop_tokens,
                     use_rts=use_rts, use_tutel=use_tutel, top2_2nd_expert_sampling=top2_2nd_expert_sampling)
        ignored = {n: v for n, v in given.items() if v != _TOPK_ARGUMENTS[n]}
        if ignored:
            warnings.warn(f"BaseMoE ignores {ignored}: {_WHY_IGNORED}.", stacklevel=2)
        self.hidden_size = hidden_size
        self.num_experts, self.ep_size = num_experts, ep_size
        self.num_local_experts = num_experts // ep_size
        self.expert_group_name = f"ep_size_{ep_size}"
        self.use_residual = use_residual
        self.enable_expert_tensor_parallelism = enable_expert_tensor_parallelism
        self.return_aux = return_aux
        self._use_data_before_expert_parallel = use_data_before_expert_parallel
        self.ep_group, self.edp_group = ensure_expert_groups(ep_size, use_data_before_expert_parallel)

        if experts is None:
            if expert is None:
                raise ValueError("BaseMoE needs an expert module (or experts=[...])")
            experts = [copy.deepcopy(expert) for _ in range(self.num_local_experts)]
        experts = list(experts)
        if len(experts) != self.num_local_experts:
            raise ValueError(f"got {len(experts)} local experts; num_experts={num_experts} with ep_size={ep_size} "
                             f"needs {self.num_local_experts} per rank")
        self.deepspeed_moe = _ExpertCentroidLayer(
            hidden_size, DeepSpeedExperts(experts, hidden_size), num_experts, self.ep_group, shuffle=shuffle,
            assignment=assignment, inference=inference, group_name=self.expert_group_name)
        if centroids is not None:
            self.load_centroids(centroids)
        if use_residual:
            if expert is None:
                raise ValueError("use_residual=True needs the expert module (it becomes the dense residual MLP)")
            self.mlp = expert
            self.coefficient = nn.Linear(hidden_size, 2)

    # -- DeepSpeed engine hooks -------------------------------------------------------------------------
    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Called by the engine; the groups were made in the constructor, so only check they agree."""
        if bool(use_data_before_expert_parallel_) != bool(self._use_data_before_expert_parallel):
            raise ValueError("the DeepSpeed config has use_data_before_expert_parallel_="
                             f"{use_data_before_expert_parallel_} but this BaseMoE was built with "
                             f"{self._use_data_before_expert_parallel}; pass the same value to BaseMoE (or use "
                             "base_plugin.deepspeed.initialize, which reads it from the config)")

    def _create_process_groups(self, use_data_before_expert_parallel_: bool = False) -> None:
        self.set_deepspeed_parallelism(use_data_before_expert_parallel_)

    # -- helpers ------------------------------------------------------------------------------------------
    @property
    def local_experts(self) -> nn.ModuleList:
        return self.deepspeed_moe.experts.deepspeed_experts

    @property
    def ep_rank(self) -> int:
        return self.deepspeed_moe.rank

    @property
    def last_stats(self):
        return self.deepspeed_moe.last_stats

    @torch.no_grad()
    def load_centroids(self, centroids: torch.Tensor) -> None:
        """Set the centroids from Tensor[num_experts, hidden_size] (all experts; this rank keeps its rows)."""
        if tuple(centroids.shape) != (self.num_experts, self.hidden_size):
            raise ValueError(f"centroids must have shape {(self.num_experts, self.hidden_size)}, "
                             f"got {tuple(centroids.shape)}")
        first = self.ep_rank * self.num_local_experts
        for i, e in enumerate(self.local_experts):
            getattr(e, CENTROID).copy_(centroids[first + i])

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """Also accept a state dict of DeepSpeed's top-k ``MoE`` (e.g. its checkpoint, to switch a run to BASE):
        its gate weight ``deepspeed_moe.gate.wg.weight`` [num_experts, d] is consumed, and gives the
        centroids that the state dict lacks (this rank's rows)."""
        gate = state_dict.pop(prefix + "deepspeed_moe.gate.wg.weight", None)
        if gate is not None:
            first = self.ep_rank * self.num_local_experts
            for i in range(self.num_local_experts):
                key = f"{prefix}deepspeed_moe.experts.deepspeed_experts.{i}.{CENTROID}"
                if key not in state_dict and tuple(gate.shape) == (self.num_experts, self.hidden_size):
                    state_dict[key] = gate[first + i]
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, num_experts={self.num_experts}, ep_size={self.ep_size}, "
                f"use_residual={self.use_residual}, return_aux={self.return_aux}")

    def forward(self, hidden_states: torch.Tensor, used_token: Optional[torch.Tensor] = None):
        if used_token is not None:
            raise ValueError("BaseMoE does not support used_token: the balanced assignment routes every token "
                             "(mask padding out of the loss instead)")
        output = self.deepspeed_moe(hidden_states)
        if self.use_residual:
            out_mlp = self.mlp(hidden_states)
            if isinstance(out_mlp, tuple):
                out_mlp = out_mlp[0]
            coef = F.softmax(self.coefficient(hidden_states), dim=-1)
            output = output * coef[..., 0:1] + out_mlp * coef[..., 1:]
        if not self.return_aux:
            return output
        l_aux = hidden_states.new_zeros(())
        return output, l_aux, self.deepspeed_moe.last_stats.tokens_per_expert


def base_moe_layers(model: nn.Module) -> List[Tuple[str, BaseMoE]]:
    """``[(name, module)]`` of every BaseMoE in ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, BaseMoE)]
