"""Optimizer state of a DeepSpeed MoE checkpoint, per parameter: read from any layout, written into any other.

DeepSpeed stores optimizer state by its layout — without ZeRO one torch optimizer state dict per
expert-parallel rank (``expp_rank_<e>_mp_rank_00_optim_states.pt``, parameters by position), with
ZeRO 1/2 one flat fp32 partition per data-parallel rank and param group
(``zero_pp_rank_<d>_mp_rank_00_optim_states.pt``) — and refuses to load it into another
``ep_size`` or data-parallel size. Here it becomes layout-free, a :class:`SavedOptimizer` keyed by
*global* parameter name (expert ``i`` of EP rank ``e`` is expert ``e * L + i``, as in DeepSpeed's
per-expert model files):

    saved = read_optimizer_state(engine, ckpt_dir, tag)     # any saved EP size / world size / ZeRO 0-2
    apply_optimizer_state(engine, saved)                    # this engine's layout, ZeRO 0-2

so every expert's moments travel with the expert. ``engine`` is the *new* engine (built for the new
layout); it tells which names to expect. :func:`base_plugin.deepspeed.load_checkpoint` uses both.

What is read: every per-element optimizer tensor (Adam's ``exp_avg``, ``exp_avg_sq``; any optimizer's
tensors of the parameter's size), the scalar per-parameter entries (Adam's ``step``), the fp32 master
weights (ZeRO) and each param group's hyperparameters. How:

* ZeRO 1/2: the checkpoint's ``param_slice_mappings`` give each parameter's fragment of every
  partition; fragments are joined in partition order (the data-parallel rank for dense groups, the
  rank in the expert-data-parallel group for expert groups, whose layout comes from DeepSpeed's own
  ``groups._get_expert_parallel_ranks`` for the saved world size, ``ep_size`` and
  ``use_data_before_expert_parallelism``).
* ZeRO 0: torch's state dict lists parameters by position; the names are the new engine's param
  groups, in the same order (DeepSpeed builds them the same way for the same model), with each expert
  group re-expanded to the saved number of local experts. A saved group whose size or shapes do not
  match raises ValueError.

Written: ZeRO 0 through the torch optimizer's ``load_state_dict``; ZeRO 1/2 by filling this rank's
partitions from each parameter's fragment (``param._hp_mapping``, DeepSpeed's link between a
parameter and its fp32 partition) and ``load_state_dict`` of the partitions' optimizer. Supported:
fp32 or bf16 ZeRO 1/2, fp32 without ZeRO, no tensor or pipeline parallelism in the checkpoint; anything
else raises NotImplementedError. Tested with DeepSpeed 0.19.8. Call it on a fresh engine (before its
first step), after its weights were loaded.
"""
from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch

from deepspeed.moe.layer import MoE
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
from deepspeed.utils import groups

from .moe import CENTROID, EXPERTS, GATE

_MARK = f".{EXPERTS}."
_GROUP_NAME = re.compile(r"ep_size_(\d+)$")
_SKIP_HYPER = ("params", "name", "moe")  # kept from the new engine: its groups' identity


@dataclass
class SavedOptimizer:
    """Optimizer state by global parameter name. ``elements``: name -> {key: flat Tensor[numel]} (per
    element, e.g. Adam's moments); ``scalars``: name -> {key: value} (e.g. ``step``); ``master``: name
    -> flat fp32 master weights (ZeRO only); ``hyper``: per param group, its hyperparameters (None where
    the checkpoint has none)."""

    elements: Dict[str, Dict[str, torch.Tensor]] = field(default_factory=dict)
    scalars: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    master: Dict[str, torch.Tensor] = field(default_factory=dict)
    hyper: List[Optional[dict]] = field(default_factory=list)


# -- names -------------------------------------------------------------------------------------------------

def moe_layers(module: torch.nn.Module) -> Dict[str, MoE]:
    """``{name: layer}`` of every DeepSpeed MoE layer in ``module`` (BaseMoE included)."""
    return {name: m for name, m in module.named_modules() if isinstance(m, MoE)}


def _split(name: str) -> Optional[Tuple[str, int, str]]:
    """``(MoE layer name, expert index, rest)`` of an expert parameter's name, else None."""
    head, mark, tail = ("." + name).partition(_MARK)
    if not mark:
        return None
    index, _, rest = tail.partition(".")
    return head[1:], int(index), rest


def _join(head: str, index: int, rest: str) -> str:
    return f"{head + '.' if head else ''}{EXPERTS}.{index}.{rest}"


def _global(name: str, ep_rank: int, local: int) -> str:
    parts = _split(name)
    if parts is None:
        return name
    head, i, rest = parts
    return _join(head, ep_rank * local + i, rest)


def global_names(engine) -> Dict[int, str]:
    """``{id(param): global name}`` for every parameter of the engine's model on this rank."""
    ranks = {n: (groups._get_expert_parallel_rank(m.expert_group_name), m.num_local_experts)
             for n, m in moe_layers(engine.module).items()}
    out = {}
    for name, p in engine.module.named_parameters():
        parts = _split(name)
        out[id(p)] = _global(name, *ranks[parts[0]]) if parts is not None else name
    return out


def _named_groups(engine) -> List[List[Tuple[str, torch.nn.Parameter]]]:
    local = {id(p): n for n, p in engine.module.named_parameters()}
    groups_ = engine.optimizer.bit16_groups if isinstance(engine.optimizer, DeepSpeedZeroOptimizer) else [
        g["params"] for g in engine.optimizer.param_groups]
    return [[(local[id(p)], p) for p in group] for group in groups_]


def _saved_group_names(new_names: List[str], saved_ep: int, ep_rank: int, layers: Dict[str, MoE],
                       without: Tuple[str, ...]) -> List[str]:
    """The global names, in order, of an expert param group as EP rank ``ep_rank`` of ``saved_ep`` held
    it, from the same group of the new engine (local names): per MoE layer, its local experts in order,
    each expert's parameters in order; ``without`` names parameters the saved model lacked."""
    order: Dict[str, List[str]] = {}
    for name in new_names:
        parts = _split(name)
        if parts is None:
            raise ValueError(f"parameter {name!r} is in an expert param group but is not an expert parameter")
        head, i, rest = parts
        if i == 0:
            order.setdefault(head, []).append(rest)
    rebuilt = [_join(h, i, r) for h in order for i in range(layers[h].num_local_experts) for r in order[h]]
    if rebuilt != new_names:
        raise NotImplementedError("an expert param group that is not ordered layer by layer, expert by expert "
                                  "cannot be matched to a checkpoint without ZeRO; save with ZeRO 1 or 2")
    return [_join(h, ep_rank * (layers[h].num_experts // saved_ep) + i, r) for h in order
            for i in range(layers[h].num_experts // saved_ep) for r in order[h] if r.split(".")[-1] not in without]


# -- reading ------------------------------------------------------------------------------------------------

def _load(path: str):
    # memory-mapped: a rank copies out only the slices of the parameters it holds
    return torch.load(path, map_location="cpu", weights_only=False, mmap=True)


def _ep_of_group(hyper: dict) -> Optional[int]:
    """The ``ep_size`` of a saved torch param group (DeepSpeed names expert groups ``ep_size_<n>``)."""
    if not hyper.get("moe"):
        return None
    m = _GROUP_NAME.search(str(hyper.get("name", "")))
    if m is None:
        raise ValueError(f"expert param group named {hyper.get('name')!r}: expected DeepSpeed's 'ep_size_<n>'")
    return int(m.group(1))


def _split_state(state: dict, numel: int) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    elements = {k: v for k, v in state.items() if torch.is_tensor(v) and v.dim() > 0 and v.numel() >= numel}
    return elements, {k: v for k, v in state.items() if k not in elements}


def _zero_group_ep_sizes(shapes: List[dict], layers: Dict[str, MoE]) -> List[Optional[int]]:
    """Per saved ZeRO param group: the saved ``ep_size`` of its experts (from how many local experts its
    names count), None for a dense group."""
    sizes = []
    for names in shapes:
        local: Dict[str, set] = {}
        for name in names:
            parts = _split(name)
            if parts is not None:
                local.setdefault(parts[0], set()).add(parts[1])
        eps = {layers[h].num_experts // len(ids) for h, ids in local.items()}
        if len(eps) > 1:
            raise NotImplementedError(f"a ZeRO param group mixes MoE layers of expert-parallel sizes {sorted(eps)}")
        sizes.append(eps.pop() if eps else None)
    return sizes


def _read_zero(ckpt_dir: str, tag: str, main: dict, saved: SavedOptimizer, layers: Dict[str, MoE],
               wanted: set) -> None:
    world = main["dp_world_size"]
    data_before = bool((main.get("ds_config") or {}).get("use_data_before_expert_parallelism", False))
    group_eps = _zero_group_ep_sizes(main["param_shapes"], layers)
    layout = {ep: groups._get_expert_parallel_ranks(world, 1, ep, 1, data_before) for ep in set(group_eps) if ep}
    pieces: Dict[str, List[Tuple[int, Dict[str, torch.Tensor], torch.Tensor]]] = {}
    for d in range(world):
        paths = glob.glob(os.path.join(ckpt_dir, tag, f"*zero_pp_rank_{d}_mp_rank_00_optim_states.pt"))
        if len(paths) != 1:
            raise ValueError(f"{ckpt_dir}/{tag}: expected one ZeRO optimizer file of data-parallel rank {d}, found "
                             f"{[os.path.basename(p) for p in paths]}")
        sd = _load(paths[0])["optimizer_state_dict"]
        if int(sd.get("zero_stage", 0)) > 2:
            raise NotImplementedError(f"{ckpt_dir}/{tag} is a ZeRO-3 checkpoint: not supported (ZeRO 0-2 are)")
        base = sd["base_optimizer_state"]
        if isinstance(base, dict):
            hypers = [{k: v for k, v in g.items() if k != "params"} for g in base["param_groups"]]
            states = [base["state"].get(g["params"][0], {}) for g in base["param_groups"]]
        else:  # an elastic checkpoint: lean per-group states and one step, no hyperparameters
            states = [{**s, "step": sd["base_optimizer_state_step"]} for s in base]
            hypers = [None] * len(states)
        if d == 0:
            saved.hyper = hypers
        for g, (mapping, fp32, state) in enumerate(zip(sd["param_slice_mappings"], sd["single_partition_of_fp32_groups"],
                                                      states)):
            ep = group_eps[g]
            if ep is None:  # partitioned over the data-parallel group: every rank, in rank order
                position, ep_rank = d, 0
            else:  # partitioned over the expert-data-parallel group of this rank's EP rank
                ep_groups, edp_groups = layout[ep]
                ep_rank = next(r.index(d) for r in ep_groups if d in r)
                position = next(r.index(d) for r in edp_groups if d in r)
            elements, scalars = _split_state(state, fp32.numel())
            for name, addr in mapping.items():
                parts = _split(name)
                gname = name if parts is None else _global(name, ep_rank, layers[parts[0]].num_experts // ep)
                if gname not in wanted:
                    continue
                window = slice(addr.start, addr.start + addr.numel)
                pieces.setdefault(gname, []).append((position, {k: v[window] for k, v in elements.items()},
                                                     fp32[window]))
                saved.scalars[gname] = scalars
    for name, parts in pieces.items():
        parts.sort(key=lambda t: t[0])
        saved.elements[name] = {k: torch.cat([p[1][k] for p in parts]).clone() for k in parts[0][1]}
        saved.master[name] = torch.cat([p[2] for p in parts]).float()


def _read_plain(ckpt_dir: str, tag: str, main: dict, saved: SavedOptimizer, engine, layers: Dict[str, MoE],
                from_topk: bool, wanted: set) -> None:
    paths = sorted(glob.glob(os.path.join(ckpt_dir, tag, "expp_rank_*_mp_rank_00_optim_states.pt")),
                   key=lambda p: int(re.search(r"expp_rank_(\d+)_", p).group(1)))
    files = [_load(p)["optimizer"] for p in paths] if paths else [main["optimizer"]]
    new_groups = [[n for n, _ in g] for g in _named_groups(engine)]
    if len(files[0]["param_groups"]) != len(new_groups):
        raise ValueError(f"{ckpt_dir}/{tag}: the saved optimizer has {len(files[0]['param_groups'])} param groups, this "
                         f"engine {len(new_groups)}; build the optimizer with the same param groups")
    saved.hyper = [{k: v for k, v in g.items() if k != "params"} for g in files[0]["param_groups"]]
    module_order = [k for k in main["module"] if k not in set(main.get("buffer_names") or ())]
    for e, sd in enumerate(files):
        for g, (hyper, names) in enumerate(zip(sd["param_groups"], new_groups)):
            ep = _ep_of_group(hyper)
            if ep is None:
                if e:
                    continue  # dense groups are the same on every EP rank
                if from_topk and len(hyper["params"]) != len(names):
                    # the top-k gate was a dense parameter: take the saved model's order of its dense weights
                    dense = set(names) | {k for k in module_order if k.endswith("." + GATE) or k == GATE}
                    names = [k for k in module_order if k in dense]
            else:
                names = _saved_group_names(names, ep, e, layers, (CENTROID,) if from_topk else ())
            if len(names) != len(hyper["params"]):
                raise ValueError(f"{ckpt_dir}/{tag}: saved param group {g} ({hyper.get('name')!r}) of EP rank {e} has "
                                 f"{len(hyper['params'])} parameters, expected {len(names)}: not the same model")
            for name, index in zip(names, hyper["params"]):
                state = sd["state"].get(index)
                if state is None or name not in wanted:
                    continue
                numel = next((v.numel() for v in state.values() if torch.is_tensor(v) and v.dim() > 0), 0)
                elements, scalars = _split_state(state, numel)
                saved.elements[name] = {k: v.reshape(-1).clone() for k, v in elements.items()}
                saved.scalars[name] = scalars


def read_optimizer_state(engine, ckpt_dir: str, tag: str, from_topk: bool = False) -> SavedOptimizer:
    """The optimizer state of checkpoint ``ckpt_dir/tag`` for the parameters this rank of ``engine``
    holds, by global parameter name (see the module docstring). Every saved optimizer file is opened
    (memory-mapped); only this rank's parameters' slices are copied. ``from_topk``: the checkpoint is of DeepSpeed's top-k MoE and ``engine``'s model has
    BaseMoE layers in their place (no centroids saved; the gate is a dense parameter)."""
    main = _load(os.path.join(ckpt_dir, tag, "mp_rank_00_model_states.pt"))
    if main.get("mp_world_size", 1) != 1 or (main.get("checkpoint_parallel_dimensions") or {}).get("pp_degree", 1) != 1:
        raise NotImplementedError(f"{ckpt_dir}/{tag} was written with tensor or pipeline parallelism: carrying its "
                                  "optimizer state to another layout is not supported")
    layers = moe_layers(engine.module)
    wanted = set(global_names(engine).values())  # this rank's parameters
    saved = SavedOptimizer()
    if glob.glob(os.path.join(ckpt_dir, tag, "*zero_pp_rank_*_optim_states.pt")):
        _read_zero(ckpt_dir, tag, main, saved, layers, wanted)
    else:
        _read_plain(ckpt_dir, tag, main, saved, engine, layers, from_topk, wanted)
    return saved


# -- writing ------------------------------------------------------------------------------------------------

def _hyper(current: dict, saved: Optional[dict]) -> dict:
    if saved is None:
        return current
    return {**current, **{k: v for k, v in saved.items() if k not in _SKIP_HYPER}}


def apply_optimizer_state(engine, saved: SavedOptimizer) -> List[str]:
    """Write ``saved`` into ``engine``'s optimizer for the parameters this rank holds; returns the names of
    this rank's parameters that had no saved state (they start afresh: no moments; without ZeRO their
    own step 0, with ZeRO the step of their group). ValueError for a saved parameter of another size."""
    opt = engine.optimizer
    names = global_names(engine)
    fresh: List[str] = []
    if isinstance(opt, DeepSpeedZeroOptimizer):
        base = opt.optimizer
        sd = base.state_dict()
        for g, group in enumerate(opt.bit16_groups):
            flat = opt.single_partition_of_fp32_groups[g]
            known = [names[id(p)] for p in group if names[id(p)] in saved.elements]
            fresh += [names[id(p)] for p in group if names[id(p)] not in saved.elements]
            if not known:
                continue
            scalars = saved.scalars[known[0]]
            buffers = {k: torch.zeros_like(flat) for k in saved.elements[known[0]]}
            for p in group:
                name, link = names[id(p)], p._hp_mapping
                if link is None or name not in saved.elements:
                    continue
                _check_size(name, p, saved.elements[name])
                lp, hp = link.lp_fragment_address, link.hp_fragment_address
                for key, full in saved.elements[name].items():
                    buffers[key].narrow(0, hp.start, hp.numel).copy_(full.narrow(0, lp.start, lp.numel))
                if name in saved.master:
                    link.hp_fragment.data.copy_(saved.master[name].narrow(0, lp.start, lp.numel))
            index = sd["param_groups"][g]["params"][0]
            sd["state"][index] = {**scalars, **buffers}
            sd["param_groups"][g] = _hyper(sd["param_groups"][g], saved.hyper[g] if g < len(saved.hyper) else None)
        base.load_state_dict(sd)
        return fresh
    if not isinstance(opt, torch.optim.Optimizer):
        raise NotImplementedError(f"carrying optimizer state into {type(opt).__name__} is not supported (fp32 without "
                                  "ZeRO, or ZeRO 1/2, are)")
    sd = opt.state_dict()
    sd["state"] = {}
    for g, group in enumerate(opt.param_groups):
        for index, p in zip(sd["param_groups"][g]["params"], group["params"]):
            name = names[id(p)]
            if name not in saved.elements:
                fresh.append(name)
                continue
            _check_size(name, p, saved.elements[name])
            sd["state"][index] = {**saved.scalars[name], **{k: v.view(p.shape) for k, v in saved.elements[name].items()}}
        sd["param_groups"][g] = _hyper(sd["param_groups"][g], saved.hyper[g] if g < len(saved.hyper) else None)
    opt.load_state_dict(sd)
    return fresh


def _check_size(name: str, p: torch.nn.Parameter, elements: Dict[str, torch.Tensor]) -> None:
    for key, value in elements.items():
        if value.numel() != p.numel():
            raise ValueError(f"saved optimizer state {key!r} of {name!r} has {value.numel()} elements, the parameter "
                             f"{p.numel()} ({tuple(p.shape)})")
