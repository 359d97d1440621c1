"""The config route: ``moe_router_load_balancing_type="base"`` in a ``TransformerConfig`` builds BASE routers.

Megatron-core itself does not know ``"base"``: its ``TopKRouter`` treats an unknown load-balancing type
as plain top-k. So the flag acts where the spec is made, through Megatron's own extension point
(``MoESubmodules.router`` in the layer specs), never by patching Megatron classes:

    config = TransformerConfig(..., num_moe_experts=8, **base_config_kwargs())   # type "base"
    model = build_gpt_model(config, get_gpt_layer_local_spec(num_experts=8), vocab_size=..., ...)
    # or: spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False)  (Megatron's, BASE in it)
    # or: spec = spec_for_config(any_spec, config)

Each of them, for a config that asks for BASE, puts :class:`~base_plugin.megatron.router.BaseRouter`
into every MoE layer of the spec; :func:`build_gpt_model` then checks the built model with
:func:`check_base_routers` (every router of every MoE layer a ``BaseRouter``, else ValueError naming the
module and the megatron-core release). A config that does not ask for BASE gets Megatron's spec and
model unchanged.
"""
from __future__ import annotations

from . import _require_megatron

_require_megatron()

from typing import Any, Dict, List

import torch

from . import compat
from .router import LOAD_BALANCING_TYPE, BaseRouter, check_base_config
from .spec import ROUTER_OPTIONS, convert_spec


def wants_base(config) -> bool:
    """Whether ``config.moe_router_load_balancing_type`` is (or lists) ``"base"``."""
    kind = getattr(config, "moe_router_load_balancing_type", None)
    if isinstance(kind, (list, tuple)):
        return LOAD_BALANCING_TYPE in kind
    return kind == LOAD_BALANCING_TYPE


def spec_for_config(spec, config, *, paper_form: bool = False, **router_options):
    """``spec`` for a model built from ``config``: with BASE routers in its MoE layers when ``config``
    asks for BASE (after :func:`check_base_config`, which raises naming a bad option), else ``spec``
    itself. A spec part without MoE layers (a dense MTP block, a pipeline stage without MoE layers)
    comes back unchanged; :func:`check_base_routers` on the built model catches anything that still
    is not BASE."""
    if not wants_base(config):
        return spec
    check_base_config(config)
    return convert_spec(spec, paper_form=paper_form, **router_options)[0]


def get_gpt_decoder_block_spec(config, use_transformer_engine: bool, *args, paper_form: bool = False,
                               router_options: Dict[str, Any] = None, **kwargs):
    """Megatron's ``get_gpt_decoder_block_spec(config, use_transformer_engine, ...)`` (same arguments),
    with BASE routers when ``config`` asks for BASE; ``router_options``: :class:`BaseRouter` options."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec as megatron_block_spec

    spec = megatron_block_spec(config, use_transformer_engine, *args, **kwargs)
    return spec_for_config(spec, config, paper_form=paper_form, **(router_options or {}))


def check_base_routers(model: torch.nn.Module) -> List[BaseRouter]:
    """The :class:`BaseRouter` of every MoE layer of ``model``, in module order; ValueError naming the
    first MoE layer (or router) that is not BASE, its class and the megatron-core release."""
    routers = []
    for name, module in model.named_modules():
        is_router = isinstance(module, compat.Router)
        is_moe = isinstance(module, compat.MoELayer)
        if is_moe:
            module = getattr(module, "router", None)
            name = f"{name}.router"
        if (is_router or is_moe) and not isinstance(module, BaseRouter):
            raise ValueError(f"BASE was asked for but {name or 'the model'} is a {type(module).__name__}, not a "
                             f"BaseRouter (megatron-core {compat.VERSION_TEXT}): build the model with "
                             "base_plugin.megatron.build_gpt_model or a spec from with_base_router / spec_for_config")
        if is_moe:
            routers.append(module)
    return routers


def build_gpt_model(config, transformer_layer_spec, *, mtp_block_spec=None, paper_form: bool = False,
                    router_options: Dict[str, Any] = None, **gpt_model_kwargs):
    """Megatron's ``GPTModel(config, transformer_layer_spec, ..., mtp_block_spec=...)`` (its other
    arguments as keywords), the BASE way when ``config`` asks for it: the specs go through
    :func:`spec_for_config` and the model through :func:`check_base_routers`, so it is BASE in every
    MoE layer or this raises. Other configs build exactly Megatron's ``GPTModel``."""
    from megatron.core.models.gpt import GPTModel

    base = wants_base(config)
    options = dict(paper_form=paper_form, **(router_options or {}))
    if base:
        transformer_layer_spec = spec_for_config(transformer_layer_spec, config, **options)
        if mtp_block_spec is not None:
            mtp_block_spec = spec_for_config(mtp_block_spec, config, **options)
    model = GPTModel(config=config, transformer_layer_spec=transformer_layer_spec, mtp_block_spec=mtp_block_spec,
                     **gpt_model_kwargs)
    if base:
        check_base_routers(model)
    return model


def base_config_kwargs(**overrides) -> Dict[str, Any]:
    """The ``TransformerConfig`` settings of a BASE MoE: top-1, ``"base"`` balancing, no aux loss, no
    capacity factor, sigmoid score function (the BASE gate is a sigmoid; Megatron also rejects
    top-1 softmax routing without pre-softmax). Merge into your own kwargs: ``TransformerConfig(**mine,
    **base_config_kwargs())``."""
    kwargs = dict(moe_router_topk=1, moe_router_load_balancing_type=LOAD_BALANCING_TYPE, moe_aux_loss_coeff=0.0,
                  moe_expert_capacity_factor=None, moe_router_score_function="sigmoid")
    kwargs.update(overrides)
    return kwargs


__all__ = ["wants_base", "spec_for_config", "get_gpt_decoder_block_spec", "check_base_routers", "build_gpt_model",
           "base_config_kwargs", "ROUTER_OPTIONS"]
