"""Replace layers of a built model by :class:`BaseMoE`, keeping their expert weights.

    swapped = swap_layers(model, parse_section({...}))   # -> ["blocks.1.moe", ...]

Targets, in this order (a module is replaced once; children of a replaced module are not visited):
every ``deepspeed.moe.layer.MoE`` (``moe_layers``), modules whose name matches a ``modules`` pattern,
and the plain FFNs named by ``ffn_template`` at ``ffn_positions``.

* A DeepSpeed MoE keeps its ``num_experts``, ``ep_size`` and its local expert modules themselves (same
  objects, same parameter names); its top-k gate is dropped — with ``"centroids": "gate"`` its rows
  become the BASE centroids, so tokens start out going where the gate's logits pointed. A residual MoE
  keeps its ``mlp`` and ``coefficient``. The new layer returns ``(output, l_aux, exp_counts)`` as before.
* A plain FFN becomes ``num_experts`` experts, each a copy of it (``"experts": "keep"``, the FFN's
  weights) or a fresh paper expert (``"paper"``); the new layer returns a tensor like the FFN did.
  Note BASE's output is ``α·f_e(x) + (1 − α)·x`` (the paper's gate mix) rather than ``f(x)``.
"""
from __future__ import annotations

import copy
import fnmatch
import warnings
from typing import List, Optional

import torch
import torch.distributed as tdist
from torch import nn

from deepspeed.moe.layer import MoE

from ..layer import BaseExpert
from .config import BaseLayerConfig, _bad, check_world
from .moe import BaseMoE


def _hidden_size(module: nn.Module, cfg: BaseLayerConfig, name: str) -> int:
    if cfg.hidden_size is not None:
        return cfg.hidden_size
    for m in module.modules():
        if isinstance(m, nn.Linear):
            return m.in_features
    raise ValueError(f"cannot tell the hidden size of {name!r} (no nn.Linear in it): set "
                     '"base_layer.hidden_size"')


def _placement(module: nn.Module):
    p = next(module.parameters(), None)
    return (p.device, p.dtype) if p is not None else (torch.device("cpu"), torch.get_default_dtype())


def _from_moe(m: MoE, cfg: BaseLayerConfig, name: str, use_data_before: bool) -> BaseMoE:
    if cfg.num_experts is not None and cfg.num_experts != m.num_experts:
        raise _bad("num_experts", cfg.num_experts, f"null or {m.num_experts} (the DeepSpeed MoE layer {name!r} has "
                   f"{m.num_experts} experts; its weights are kept)")
    if cfg.ep_size is not None and cfg.ep_size != m.ep_size:
        raise _bad("ep_size", cfg.ep_size, f"null or {m.ep_size} (the DeepSpeed MoE layer {name!r} was built with "
                   f"ep_size={m.ep_size} and holds only its local experts; build it with the new ep_size, or "
                   "reshard a checkpoint)")
    gate = m.deepspeed_moe.gate.wg
    d = gate.in_features
    if cfg.experts == "keep":
        experts = list(m.deepspeed_moe.experts.deepspeed_experts)
    else:
        experts = [BaseExpert(d, cfg.ffn_dim, cfg.sublayers) for _ in range(m.num_local_experts)]
    new = BaseMoE(d, m.mlp if m.use_residual else None, m.num_experts, m.ep_size, use_residual=m.use_residual,
                  enable_expert_tensor_parallelism=m.enable_expert_tensor_parallelism, experts=experts,
                  shuffle=cfg.shuffle, assignment=cfg.assignment, inference=cfg.inference,
                  centroids=gate.weight.detach().float().cpu() if cfg.centroids == "gate" else None,
                  use_data_before_expert_parallel=use_data_before)
    if m.use_residual:
        new.coefficient = m.coefficient
    return new


def _from_ffn(module: nn.Module, cfg: BaseLayerConfig, name: str, use_data_before: bool) -> BaseMoE:
    if cfg.num_experts is None:
        raise _bad("num_experts", None, f"a positive integer: replacing the plain module {name!r} needs the "
                   "number of experts")
    ep_size = cfg.ep_size or 1
    d = _hidden_size(module, cfg, name)
    num_local = cfg.num_experts // ep_size
    if cfg.experts == "keep":
        experts = [copy.deepcopy(module) for _ in range(num_local)]
    else:
        experts = [BaseExpert(d, cfg.ffn_dim, cfg.sublayers) for _ in range(num_local)]
    return BaseMoE(d, None, cfg.num_experts, ep_size, experts=experts, shuffle=cfg.shuffle,
                   assignment=cfg.assignment, inference=cfg.inference, return_aux=False,
                   use_data_before_expert_parallel=use_data_before)


def _targets(model: nn.Module, cfg: BaseLayerConfig) -> List[str]:
    names = dict(model.named_modules())
    chosen: List[str] = []
    if cfg.moe_layers:
        chosen += [n for n, m in names.items() if n and isinstance(m, MoE) and not isinstance(m, BaseMoE)]
    for pattern in cfg.modules:
        hits = [n for n in names if n and fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise _bad("modules", pattern, "patterns that match module names of the model, e.g. "
                       f"{[n for n in names if n][:6]}")
        chosen += hits
    for pos, n in zip(cfg.ffn_positions, cfg.ffn_names()):
        if n not in names:
            raise _bad("ffn_positions", pos, f"positions where {cfg.ffn_template!r} names a module "
                       f"(there is no module {n!r})")
        chosen.append(n)
    out: List[str] = []
    for n in chosen:  # keep order, drop duplicates and anything inside an earlier target
        if n in out or any(n.startswith(o + ".") for o in out) or isinstance(names[n], BaseMoE):
            continue
        out = [o for o in out if not o.startswith(n + ".")] + [n]
    return out


def swap_layers(model: nn.Module, cfg: BaseLayerConfig, *, use_data_before_expert_parallel: bool = False,
                world_size: Optional[int] = None) -> List[str]:
    """Replace the section's targets in ``model`` (in place) and return their names.

    Collective when ep_size > 1 (DeepSpeed's process groups are created): every rank must call it.
    ValueError (naming the section key) for a target that does not exist, a missing ``num_experts``,
    ``ep_size`` not dividing the world size, or a section that contradicts a DeepSpeed MoE layer.
    """
    if not cfg.enabled:
        return []
    if world_size is None:
        world_size = tdist.get_world_size() if tdist.is_available() and tdist.is_initialized() else 1
    check_world(cfg, world_size)
    targets = _targets(model, cfg)
    if not targets:
        warnings.warn('"base_layer" is enabled but found nothing to replace (no deepspeed.moe.layer.MoE, no '
                      'matching "modules" / "ffn_positions")', stacklevel=2)
    for name in targets:
        module = model.get_submodule(name)
        device, dtype = _placement(module)
        if isinstance(module, MoE):
            new = _from_moe(module, cfg, name, use_data_before_expert_parallel)
        else:
            new = _from_ffn(module, cfg, name, use_data_before_expert_parallel)
        new.to(device=device, dtype=dtype if dtype.is_floating_point else None)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    return targets
