"""The config route: ``TransformerConfig(..., moe_router_load_balancing_type="base")`` builds BASE routers.

Megatron-core's layer specs name ``TopKRouter`` as the router class of every ``MoELayer``. After
:func:`register`, constructing a ``TopKRouter`` with a config whose ``moe_router_load_balancing_type``
is ``"base"`` gives a :class:`~base_plugin.megatron.router.BaseRouter` instead (a subclass, so
everything that expects a ``TopKRouter`` still gets one). Nothing else in Megatron-core is changed,
every spec (local, Transformer-Engine, decoder-block specs, MTP) keeps working, and configs with any
other load-balancing type build exactly what they built before. :func:`unregister` switches it off.
"""
from __future__ import annotations

from . import _require_megatron

_require_megatron()

from typing import Any, Dict

from megatron.core.transformer.moe.router import TopKRouter

from .router import LOAD_BALANCING_TYPE, BaseRouter

_state: Dict[str, Any] = {"options": None, "patched": False}


def _wants_base(config) -> bool:
    kind = getattr(config, "moe_router_load_balancing_type", None)
    if isinstance(kind, (list, tuple)):
        return LOAD_BALANCING_TYPE in kind
    return kind == LOAD_BALANCING_TYPE


def _topk_router_new(cls, *args, **kwargs):
    config = kwargs.get("config", args[0] if args else None)
    if cls is TopKRouter and _state["options"] is not None and _wants_base(config):
        # Python then calls BaseRouter.__init__ with the same arguments (BaseRouter is a TopKRouter).
        return object.__new__(_ConfiguredBaseRouter)
    return object.__new__(cls)


class _ConfiguredBaseRouter(BaseRouter):
    """BaseRouter with the options given to :func:`register` (what the config route builds)."""

    def __init__(self, config, pg_collection=None, **kwargs):
        options = dict(_state["options"] or {})
        options.update(kwargs)
        super().__init__(config, pg_collection, **options)


def register(**router_options) -> None:
    """Make ``moe_router_load_balancing_type="base"`` build :class:`BaseRouter` (idempotent).

    ``router_options`` are :class:`BaseRouter`'s keyword options (``shuffle``, ``shuffle_group``,
    ``assignment``, ``inference``) for the routers the config route builds; a later call replaces them.
    A config with ``"base"`` must also pass :func:`~base_plugin.megatron.router.check_base_config`
    (top-1, no capacity factor, no aux loss, ...), else building the layer raises ValueError naming the option.
    """
    # Validate the options now rather than at model construction.
    bad = set(router_options) - {"shuffle", "shuffle_group", "assignment", "inference"}
    if bad:
        raise ValueError(f"register(): unknown BaseRouter option(s) {sorted(bad)}; allowed: "
                         "shuffle, shuffle_group, assignment, inference")
    _state["options"] = dict(router_options)
    if not _state["patched"]:
        if "__new__" in TopKRouter.__dict__:
            raise RuntimeError("TopKRouter already defines __new__; this megatron-core version is not supported "
                               "by register(); use the spec route (with_base_router)")
        TopKRouter.__new__ = _topk_router_new
        _state["patched"] = True


def unregister() -> None:
    """Undo :func:`register`: ``"base"`` configs build plain ``TopKRouter`` again. (The hook stays
    installed and passes every construction through unchanged; removing a ``__new__`` from a class
    again is not reliable in CPython.)"""
    _state["options"] = None


def is_registered() -> bool:
    return _state["options"] is not None


def base_config_kwargs(**overrides) -> Dict[str, Any]:
    """The ``TransformerConfig`` settings of a BASE MoE: top-1, ``"base"`` balancing, no aux loss, no
    capacity factor, sigmoid score function (the BASE gate is a sigmoid; Megatron also rejects
    top-1 softmax routing without pre-softmax). Merge into your own kwargs: ``TransformerConfig(**mine,
    **base_config_kwargs())``."""
    kwargs = dict(moe_router_topk=1, moe_router_load_balancing_type=LOAD_BALANCING_TYPE, moe_aux_loss_coeff=0.0,
                  moe_expert_capacity_factor=None, moe_router_score_function="sigmoid")
    kwargs.update(overrides)
    return kwargs
