"""The spec route: put the BASE router into any Megatron-core layer spec.

    spec = with_base_router(get_gpt_layer_local_spec(num_experts=8))            # swap one entry
    spec = with_base_router(te_spec, shuffle=False)                              # options via partial
    spec = with_base_router(spec, paper_form=True)                               # exact paper mix
    spec = get_gpt_layer_with_base_spec(num_experts=8, use_te=False)             # ready-made

Every ``MoESubmodules`` found in the spec tree (a layer spec, a decoder-block spec with its
``layer_specs`` list, nested ``ModuleSpec``s) gets ``router = BaseRouter``; the input spec is not changed.
"""
from __future__ import annotations

from . import _require_megatron

_require_megatron()

import copy
import dataclasses
import functools
from typing import Any, Callable, Optional

from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.spec_utils import ModuleSpec

from .moe_layer import BasePaperMoELayer, BasePaperMoESubmodules
from .router import BaseRouter


def _router_builder(router_options) -> Callable:
    return functools.partial(BaseRouter, **router_options) if router_options else BaseRouter


def _paper_form(layer_submodules) -> bool:
    """Move ``pre_mlp_layernorm`` into a BasePaperMoELayer (in place on a copied spec)."""
    mlp = getattr(layer_submodules, "mlp", None)
    if not (isinstance(mlp, ModuleSpec) and isinstance(mlp.submodules, MoESubmodules)):
        return False
    if not (isinstance(mlp.module, type) and issubclass(mlp.module, MoELayer)):
        raise ValueError(f"paper_form=True needs an MoELayer mlp, got {mlp.module!r}")
    fields = {f.name: getattr(mlp.submodules, f.name) for f in dataclasses.fields(MoESubmodules)}
    mlp.submodules = BasePaperMoESubmodules(**fields, expert_norm=layer_submodules.pre_mlp_layernorm)
    mlp.module = BasePaperMoELayer
    layer_submodules.pre_mlp_layernorm = IdentityOp
    keys_map = getattr(layer_submodules, "sharded_state_dict_keys_map", None)
    if keys_map:  # the local spec maps pre_mlp_layernorm onto TE's fused fc1 names; it is gone now
        layer_submodules.sharded_state_dict_keys_map = {
            k: v for k, v in keys_map.items() if not k.startswith("pre_mlp_layernorm")}
    return True


def _walk(node: Any, router, paper_form: bool, found: list) -> None:
    if isinstance(node, ModuleSpec):
        _walk(node.submodules, router, paper_form, found)
    elif isinstance(node, (list, tuple)):
        for item in node:
            _walk(item, router, paper_form, found)
    elif dataclasses.is_dataclass(node) and not isinstance(node, type):
        if paper_form and hasattr(node, "pre_mlp_layernorm"):
            _paper_form(node)
        if isinstance(node, MoESubmodules):
            node.router = router
            found.append(node)
            return
        for f in dataclasses.fields(node):
            _walk(getattr(node, f.name), router, paper_form, found)


def with_base_router(spec, *, paper_form: bool = False, **router_options):
    """A copy of ``spec`` whose MoE layers use :class:`~base_plugin.megatron.router.BaseRouter`.

    ``spec``: a ``ModuleSpec`` (transformer layer, MoE layer) or a ``TransformerBlockSubmodules``
    (e.g. from ``get_gpt_decoder_block_spec``), local or Transformer-Engine flavoured.
    ``router_options``: :class:`BaseRouter` keyword options (``shuffle``, ``shuffle_group``,
    ``assignment``, ``inference``). ``paper_form=True`` also swaps each MoE ``MoELayer`` for
    :class:`~base_plugin.megatron.moe_layer.BasePaperMoELayer` and moves its layer's
    ``pre_mlp_layernorm`` into it (the paper's exact ``α·f_e(x) + (1 − α)·x``).
    ValueError if the spec holds no MoE layer (e.g. ``num_experts`` was not given).
    """
    out = copy.deepcopy(spec)
    found: list = []
    _walk(out, _router_builder(router_options), paper_form, found)
    if not found:
        raise ValueError("with_base_router: the spec contains no MoE layer (MoESubmodules); build it with "
                         "num_experts set, e.g. get_gpt_layer_local_spec(num_experts=8)")
    return out


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
