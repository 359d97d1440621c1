"""BASE layers for Megatron-core: a router for ``MoELayer``, spec helpers and a config-flag registration.

    from base_plugin.megatron import BaseRouter, with_base_router, get_gpt_layer_with_base_spec, register

* spec route: ``with_base_router(any_gpt_spec)`` or ``get_gpt_layer_with_base_spec(num_experts=...)``;
* config route: ``register()`` once, then ``TransformerConfig(..., moe_router_load_balancing_type="base")``
  (``base_config_kwargs()`` gives the full set of BASE settings);
* the paper's exact mix: ``paper_form=True`` (:class:`BasePaperMoELayer`).

Needs megatron-core (``pip install base-plugin[megatron]``); names are imported on first use, so
``import base_plugin.megatron`` itself works without it.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "BaseRouter": "router", "check_base_config": "router", "LOAD_BALANCING_TYPE": "router",
    "BasePaperMoELayer": "moe_layer", "BasePaperMoESubmodules": "moe_layer",
    "with_base_router": "spec", "get_gpt_layer_with_base_spec": "spec",
    "register": "registration", "unregister": "registration", "is_registered": "registration",
    "base_config_kwargs": "registration",
}
__all__ = sorted(_EXPORTS)


def _require_megatron() -> None:
    try:
        import megatron.core  # noqa: F401
    except ImportError as exc:
        raise ImportError("base_plugin.megatron needs megatron-core: pip install 'base-plugin[megatron]' "
                          f"(tested with megatron-core 0.16.1); import failed with: {exc}") from exc


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'base_plugin.megatron' has no attribute {name!r}")
    _require_megatron()
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
