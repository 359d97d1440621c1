"""The spec route: put the BASE router into any Megatron-core layer spec.

    spec = with_base_router(get_gpt_layer_local_spec(num_experts=8))            # swap one entry
    spec = with_base_router(te_spec, shuffle=False)                              # options via partial
    spec = with_base_router(spec, paper_form=True)                               # exact paper mix
    spec = get_gpt_layer_with_base_spec(num_experts=8, use_te=False)             # ready-made

Every ``MoESubmodules`` found in the spec tree (a layer spec, a decoder-block spec with its
``layer_specs`` list, nested ``ModuleSpec``s and, from megatron-core 0.18, ``functools.partial``
builders) gets ``router = BaseRouter``; the input spec is not changed. The two spec forms are read
through :mod:`base_plugin.megatron.compat`.
"""
from __future__ import annotations

from . import _require_megatron

_require_megatron()

import copy
import dataclasses
import functools
from typing import Any, Callable, Optional

from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec

from . import compat
from .compat import MoELayer, MoESubmodules
from .moe_layer import BasePaperMoELayer, BasePaperMoESubmodules
from .router import BaseRouter


ROUTER_OPTIONS = ("shuffle", "shuffle_group", "assignment", "inference")


def _router_builder(router_options) -> Callable:
    bad = sorted(set(router_options) - set(ROUTER_OPTIONS))
    if bad:
        raise ValueError(f"unknown BaseRouter option(s) {bad}; allowed: {', '.join(ROUTER_OPTIONS)}")
    return functools.partial(BaseRouter, **router_options) if router_options else BaseRouter


def _paper_form(layer_submodules) -> None:
    """Move ``pre_mlp_layernorm`` into a BasePaperMoELayer (in place on a copied spec); dense layers
    (whose ``mlp`` is no MoE layer) are left alone."""
    parts = compat.moe_spec_parts(getattr(layer_submodules, "mlp", None))
    if parts is None:
        return
    module, submodules = parts
    if isinstance(module, type) and issubclass(module, BasePaperMoELayer):
        return  # already in paper form
    if not (isinstance(module, type) and issubclass(module, MoELayer)):
        raise ValueError(f"paper_form=True needs an MoELayer mlp, got {module!r}")
    fields = {f.name: getattr(submodules, f.name) for f in dataclasses.fields(MoESubmodules)}
    paper = BasePaperMoESubmodules(**fields, expert_norm=layer_submodules.pre_mlp_layernorm)
    layer_submodules.mlp = compat.with_moe_module(layer_submodules.mlp, BasePaperMoELayer, paper)
    layer_submodules.pre_mlp_layernorm = IdentityOp
    keys_map = getattr(layer_submodules, "sharded_state_dict_keys_map", None)
    if keys_map:  # the local spec maps pre_mlp_layernorm onto TE's fused fc1 names; it is gone now
        layer_submodules.sharded_state_dict_keys_map = {
            k: v for k, v in keys_map.items() if not k.startswith("pre_mlp_layernorm")}


def _convert(node: Any, router, paper_form: bool, memo: dict, found: list) -> Any:
    """``node`` with ``router`` in every ``MoESubmodules`` below it (the same object, changed in place,
    or a rebuilt one where it is immutable: partials, tuples). ``memo`` makes a spec object that
    appears several times (0.19's decoder-block spec repeats one layer spec) convert once."""
    if id(node) in memo:
        return memo[id(node)]
    memo[id(node)] = node
    if isinstance(node, MoESubmodules):
        node.router = router
        found.append(node)
        return node
    if isinstance(node, tuple) and not hasattr(node, "_fields"):
        new = tuple(_convert(item, router, paper_form, memo, found) for item in node)
        memo[id(node)] = new
        return new
    if paper_form and dataclasses.is_dataclass(node) and hasattr(node, "pre_mlp_layernorm"):
        _paper_form(node)
    for get, put in compat.children(node):
        child = get()
        new = _convert(child, router, paper_form, memo, found)
        if new is not child:
            put(new)
    return node


def with_base_router(spec, *, paper_form: bool = False, **router_options):
    """A copy of ``spec`` whose MoE layers use :class:`~base_plugin.megatron.router.BaseRouter`.

    ``spec``: a transformer-layer or MoE-layer spec (``ModuleSpec``, or the ``functools.partial`` of
    megatron-core 0.18+), a ``TransformerBlockSubmodules`` (e.g. from ``get_gpt_decoder_block_spec``),
    an MTP block spec, or a list of layer specs; local or Transformer-Engine flavoured.
    ``router_options``: :class:`BaseRouter` keyword options (``shuffle``, ``shuffle_group``,
    ``assignment``, ``inference``). ``paper_form=True`` also swaps each MoE ``MoELayer`` for
    :class:`~base_plugin.megatron.moe_layer.BasePaperMoELayer` and moves its layer's
    ``pre_mlp_layernorm`` into it (the paper's exact ``α·f_e(x) + (1 − α)·x``).
    ValueError if the spec holds no MoE layer (e.g. ``num_experts`` was not given); the input spec is
    not changed.
    """
    out, found = convert_spec(spec, paper_form=paper_form, **router_options)
    if not found:
        raise ValueError(
            "with_base_router: the spec contains no MoE layer (no MoESubmodules inside a ModuleSpec, "
            f"functools.partial, list or submodules dataclass) under megatron-core {compat.VERSION_TEXT}; "
            "build it with num_experts set, e.g. get_gpt_layer_local_spec(num_experts=8)")
    return out


def convert_spec(spec, *, paper_form: bool = False, **router_options):
    """``(copy of spec with BASE routers, number of MoE layers converted)``; like
    :func:`with_base_router` but a spec without MoE layers comes back (copied, unchanged) with 0."""
    found: list = []
    out = _convert(copy.deepcopy(spec), _router_builder(router_options), paper_form, {}, found)
    return out, len(found)


def get_gpt_layer_with_base_spec(num_experts: int, *, use_te: Optional[bool] = None, moe_grouped_gemm: bool = False,
                                 paper_form: bool = False, qk_layernorm: bool = False,
                                 normalization: Optional[str] = None, **router_options) -> ModuleSpec:
    """A GPT transformer-layer spec with an MoE MLP routed by BASE.

    ``use_te``: the Transformer-Engine spec (``get_gpt_layer_with_transformer_engine_spec``) or the
    Megatron-core-only one (``get_gpt_layer_local_spec``); default: TE when it is installed.
    Other arguments: as in those functions, plus ``paper_form`` and the router options of
    :func:`with_base_router`.
    """
    from megatron.core.models.gpt import gpt_layer_specs as specs

    if use_te is None:
        use_te = bool(getattr(specs, "HAVE_TE", False))
    if use_te:
        base = specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=num_experts, moe_grouped_gemm=moe_grouped_gemm, qk_layernorm=qk_layernorm)
    else:
        base = specs.get_gpt_layer_local_spec(num_experts=num_experts, moe_grouped_gemm=moe_grouped_gemm,
                                              qk_layernorm=qk_layernorm, normalization=normalization)
    return with_base_router(base, paper_form=paper_form, **router_options)
