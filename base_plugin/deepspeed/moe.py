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
own checkpoint code.

Process groups: exactly those DeepSpeed's ``MoE`` uses, made at the same moment by the same functions
of ``deepspeed.utils.groups`` (:func:`ensure_expert_groups`): when the engine calls
``set_deepspeed_parallelism`` — after it stored the ``mpu`` given to ``deepspeed.initialize`` — so
with a tensor-parallel mpu and ``enable_expert_tensor_parallelism=True`` the expert-parallel,
expert-data-parallel and expert-model-parallel groups are DeepSpeed's tensor-parallel-aware ones, and
otherwise its plain expert + data layout (the flag is honoured whether or not an mpu exists). Used
outside an engine, the layer makes them at its first call (``ep_size > 1`` needs torch.distributed
then). Until then the layer knows its size but not its rank: the initial centroids wait for it (see
:meth:`base_plugin.layer.BaseLayer.set_group`).

Collectives go through ``deepspeed.comm`` (DeepSpeed's comms logger and wall-clock breakdown see
them); tokens replicated over tensor-parallel ranks are split and gathered as DeepSpeed's MoE does
(:mod:`.tensor_parallel`).
"""
from __future__ import annotations

import copy
import warnings
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as tdist
from torch import nn
from torch.nn import functional as F

from deepspeed import comm as ds_comm
from deepspeed.moe.layer import MoE
from deepspeed.utils import groups

from ..layer import BaseLayer, mark_expert_parameters
from ..layer.experts import GroupedExperts, run_each
from .tensor_parallel import experts_are_tensor_parallel, mix_over_tensor_parallel, routed_over_tensor_parallel

CENTROID = "base_centroid"  # name of the centroid parameter registered on each local expert module
GATE = "deepspeed_moe.gate.wg.weight"  # DeepSpeed top-k MoE's gate weight [num_experts, d], under the layer
EXPERTS = "deepspeed_moe.experts.deepspeed_experts"  # local expert modules, under the layer (both kinds)

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

    def _centroid_state_keys(self, prefix: str) -> List[str]:
        return [f"{prefix}experts.deepspeed_experts.{i}.{CENTROID}" for i in range(self.num_local)]

    def mix_experts(self, x, counts, centroids):
        mix = super().mix_experts
        if experts_are_tensor_parallel():  # every TP shard of an expert computes on all their tokens
            return mix_over_tensor_parallel(lambda t, c: mix(t, c, centroids), x, counts)
        return mix(x, counts, centroids)


def _check_positive(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_world(ep_size: int) -> None:
    """ValueError unless ep_size divides the world size (when torch.distributed is initialised)."""
    if tdist.is_available() and tdist.is_initialized():
        world = tdist.get_world_size()
        if ep_size > world or world % ep_size:
            raise ValueError(f"ep_size={ep_size} must divide the world size {world} (allowed: "
                             f"{[d for d in range(1, world + 1) if world % d == 0]})")


def ensure_expert_groups(ep_size: int, use_data_before_expert_parallel: bool = False,
                         enable_expert_tensor_parallelism: bool = False):
    """DeepSpeed's ``ep_size_<n>`` expert-parallel and expert-data-parallel groups, created if missing
    exactly as ``deepspeed.moe.layer.MoE`` creates them: with the mpu DeepSpeed stored
    (``groups.mpu``) *and* ``enable_expert_tensor_parallelism``, the tensor-parallel-aware layout (which
    also records the expert-model-parallel size); otherwise the plain expert + data layout. Existing
    groups of that name are reused as they are, as DeepSpeed does.

    Returns ``(ep_group, edp_group)``, or ``(None, None)`` without torch.distributed and ``ep_size == 1``.
    ValueError if ``ep_size`` does not divide the world size or distributed is needed but absent.
    """
    if not (tdist.is_available() and tdist.is_initialized()):
        if ep_size > 1:
            raise ValueError(f"ep_size={ep_size} needs torch.distributed: call deepspeed.init_distributed() before "
                             "the first call of BaseMoE (or train it with a DeepSpeed engine)")
        return None, None
    import deepspeed
    deepspeed.init_distributed(dist_backend=tdist.get_backend())  # wraps the existing group for deepspeed.comm
    _check_world(ep_size)
    name = f"ep_size_{ep_size}"
    if name not in groups._get_expert_parallel_group_dict():
        if groups.mpu is None or not enable_expert_tensor_parallelism:
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
        enable_expert_tensor_parallelism: the experts are tensor-parallel modules (each rank of a TP group
            holds a shard of the same experts): groups from DeepSpeed's mpu, tokens shared between the
            shards (see the module docstring and :mod:`.tensor_parallel`).
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
        use_data_before_expert_parallel: the group layout when the layer makes its groups itself
            (outside an engine); an engine passes its config's ``use_data_before_expert_parallelism``.

    ``forward(hidden_states[..., d], used_token=None)`` -> ``(output, l_aux, exp_counts)``: ``l_aux`` a
    zero scalar, ``exp_counts`` LongTensor[num_experts] of the tokens this rank routed per global expert
    (DeepSpeed's MoE: this rank's tokens per expert of the gate's top-k choices, before capacity; here
    the balanced assignment itself; with tensor parallelism, of this TP rank's share of the tokens).
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
        self.ep_group = self.edp_group = None  # DeepSpeed's, once made (set_deepspeed_parallelism or first call)
        _check_world(ep_size)

        if experts is None:
            if expert is None:
                raise ValueError("BaseMoE needs an expert module (or experts=[...])")
            experts = [copy.deepcopy(expert) for _ in range(self.num_local_experts)]
        experts = list(experts)
        if len(experts) != self.num_local_experts:
            raise ValueError(f"got {len(experts)} local experts; num_experts={num_experts} with ep_size={ep_size} "
                             f"needs {self.num_local_experts} per rank")
        self.deepspeed_moe = _ExpertCentroidLayer(
            hidden_size, DeepSpeedExperts(experts, hidden_size), num_experts, group_size=ep_size, shuffle=shuffle,
            assignment=assignment, inference=inference, group_name=self.expert_group_name, comm=ds_comm)
        if centroids is not None:
            self.load_centroids(centroids)
        if use_residual:
            if expert is None:
                raise ValueError("use_residual=True needs the expert module (it becomes the dense residual MLP)")
            self.mlp = expert
            self.coefficient = nn.Linear(hidden_size, 2)
        self._gate_rows = None  # a top-k gate loaded before the groups exist (see _load_from_state_dict)
        self.register_load_state_dict_post_hook(BaseMoE._centroids_from_loaded_gate)

    # -- DeepSpeed engine hooks -------------------------------------------------------------------------
    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Called by the engine after it stored the mpu: make (or reuse) DeepSpeed's groups and attach them."""
        self._create_process_groups(use_data_before_expert_parallel_=use_data_before_expert_parallel_)

    def _create_process_groups(self, use_data_before_expert_parallel_: bool = False) -> None:
        if self.ep_group is not None and bool(use_data_before_expert_parallel_) != self._use_data_before_expert_parallel:
            raise ValueError("the DeepSpeed config has use_data_before_expert_parallel_="
                             f"{use_data_before_expert_parallel_} but this BaseMoE already made its groups with "
                             f"{self._use_data_before_expert_parallel} (it was called before the engine was built); "
                             "pass the same value to BaseMoE, or build the engine first")
        self._use_data_before_expert_parallel = bool(use_data_before_expert_parallel_)
        self.ep_group, self.edp_group = ensure_expert_groups(
            self.ep_size, self._use_data_before_expert_parallel, self.enable_expert_tensor_parallelism)
        self.deepspeed_moe.set_group(self.ep_group)

    # -- helpers ------------------------------------------------------------------------------------------
    @property
    def local_experts(self) -> nn.ModuleList:
        return self.deepspeed_moe.experts.deepspeed_experts

    @property
    def ep_rank(self) -> int:
        """This rank's position in its expert-parallel group (local expert i is global ``ep_rank * L + i``);
        ValueError before the groups exist."""
        if not self.deepspeed_moe.attached:
            raise ValueError("BaseMoE has no expert-parallel group yet: it is made when the DeepSpeed engine is "
                             "built (or at the layer's first call)")
        return self.deepspeed_moe.rank

    @property
    def last_stats(self):
        return self.deepspeed_moe.last_stats

    def load_centroids(self, centroids: torch.Tensor) -> None:
        """Set the centroids from Tensor[num_experts, hidden_size] (all experts; this rank keeps its rows,
        once it knows its rank)."""
        self.deepspeed_moe.set_centroids(centroids)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """Also accept a state dict of DeepSpeed's top-k ``MoE`` (e.g. its checkpoint, to switch a run to BASE):
        its gate weight ``deepspeed_moe.gate.wg.weight`` [num_experts, d] is consumed, and its rows become
        the centroids that the state dict lacks (the same rule as :func:`~base_plugin.deepspeed.swap_layers`
        with ``"centroids": "gate"``)."""
        gate = state_dict.pop(prefix + GATE, None)
        keys = self.deepspeed_moe._centroid_state_keys(prefix + "deepspeed_moe.")
        if gate is not None and not any(k in state_dict for k in keys):
            if tuple(gate.shape) != (self.num_experts, self.hidden_size):
                error_msgs.append(f"{prefix}{GATE}: a top-k gate of shape {tuple(gate.shape)} cannot give the "
                                  f"centroids of {self.num_experts} experts of size {self.hidden_size}")
            else:
                layer = self.deepspeed_moe
                first = layer.rank * self.num_local_experts
                for i, k in enumerate(keys):  # this rank's rows (before the groups exist: replaced after the load)
                    state_dict[k] = gate[first + i]
                if not layer.attached:
                    self._gate_rows = gate.detach().clone()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    @staticmethod
    def _centroids_from_loaded_gate(module: "BaseMoE", incompatible_keys) -> None:
        if module._gate_rows is not None:
            rows, module._gate_rows = module._gate_rows, None
            module.deepspeed_moe.set_centroids(rows)

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, num_experts={self.num_experts}, ep_size={self.ep_size}, "
                f"use_residual={self.use_residual}, return_aux={self.return_aux}")

    def forward(self, hidden_states: torch.Tensor, used_token: Optional[torch.Tensor] = None):
        if used_token is not None:
            raise ValueError("BaseMoE does not support used_token: the balanced assignment routes every token "
                             "(mask padding out of the loss instead)")
        if not self.deepspeed_moe.attached:  # outside an engine: make the groups now, as the engine would
            self._create_process_groups(self._use_data_before_expert_parallel)
        output = routed_over_tensor_parallel(self.deepspeed_moe, hidden_states)
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
