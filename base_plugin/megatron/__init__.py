"""BASE layers for Megatron-core: a router for ``MoELayer``, spec helpers and a config-flag registration.

    from base_plugin.megatron import BaseRouter, with_base_router, get_gpt_layer_with_base_spec, build_gpt_model

* spec route: ``with_base_router(any_gpt_spec)`` or ``get_gpt_layer_with_base_spec(num_experts=...)``;
* config route: ``TransformerConfig(..., **base_config_kwargs())`` (``moe_router_load_balancing_type="base"``)
  and ``build_gpt_model(config, spec, ...)`` / ``get_gpt_decoder_block_spec(config, ...)`` /
  ``spec_for_config(spec, config)``; ``check_base_routers(model)`` asserts a built model is BASE;
* the paper's exact mix: ``paper_form=True`` (:class:`BasePaperMoELayer`).

Needs megatron-core >= 0.16.1, < 0.20 (``pip install base-plugin[megatron]``; what differs between those
releases is in :mod:`base_plugin.megatron.compat`); names are imported on first use, so
``import base_plugin.megatron`` itself works without it, and the first use of a name raises ImportError
naming the installed and the supported releases when they do not match.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "BaseRouter": "router", "check_base_config": "router", "LOAD_BALANCING_TYPE": "router",
    "BasePaperMoELayer": "moe_layer", "BasePaperMoESubmodules": "moe_layer",
    "with_base_router": "spec", "get_gpt_layer_with_base_spec": "spec",
    "convert_spec": "spec",
    "wants_base": "config_route", "spec_for_config": "config_route", "get_gpt_decoder_block_spec": "config_route",
    "check_base_routers": "config_route", "build_gpt_model": "config_route", "base_config_kwargs": "config_route",
}
__all__ = sorted(_EXPORTS)


def _require_megatron() -> None:
    """ImportError unless a supported megatron-core is installed (the message names the installed
    release and the supported ones, :mod:`base_plugin.megatron.compat`)."""
    try:
        import megatron.core  # noqa: F401
    except ImportError as exc:
        raise ImportError("base_plugin.megatron needs megatron-core: pip install 'base-plugin[megatron]' "
                          f"(supported: megatron-core >= 0.16.1, < 0.20); import failed with: {exc}") from exc
    importlib.import_module(".compat", __name__)  # checks the release


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'base_plugin.megatron' has no attribute {name!r}")
    _require_megatron()
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
