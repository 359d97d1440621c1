"""Every difference between the supported megatron-core releases, in one place.

Supported: megatron-core 0.16.1 up to the newest 0.19.x (``>= 0.16.1, < 0.20``), one code path. What
differs, and which releases need each shim below:

=====================================  =======================================================
difference                             releases
=====================================  =======================================================
``MoELayer`` passes ``is_mtp_layer``     0.17+ (0.16: ``config`` and ``pg_collection`` only).
to the router, ``name`` (0.19) and       :func:`router_kwargs` keeps what the installed
``is_mtp_layer`` to the MoE layer        ``TopKRouter`` takes; ``BasePaperMoELayer`` passes the
                                         layer's own keywords on unchanged.
an MoE layer in a spec                   0.16, 0.17: ``ModuleSpec(module=MoELayer,
                                         submodules=MoESubmodules(...))``; 0.18+:
                                         ``functools.partial(MoELayer, submodules=...)``.
                                         :func:`moe_spec_parts` / :func:`with_moe_module` read and
                                         rebuild both forms.
a norm or module "builder"               0.16: a ``ModuleSpec`` or a class; 0.17+: also a
                                         ``functools.partial``. All are built by calling them
                                         with keywords (``ModuleSpec.__call__`` is
                                         ``build_module`` in every release).
config options the router must refuse    ``moe_router_force_biased`` and the
                                         ``quantile_balancing`` type exist from 0.19 only; they
                                         are read with :func:`config_value` (absent = off).
``pg_collection``                        every release: ``None`` means the default groups of
                                         ``parallel_state`` (:func:`default_pg_collection`).
DDP gradient buffers, checkpoint saving  every release calls ``torch.cuda`` there (0.19 adds
                                         ``torch.cuda.current_stream()`` in the DDP); no shim
                                         in the package: on a CPU-only torch the tests answer
                                         those calls (``tests/megatron_cpu.py``).
=====================================  =======================================================

Nothing here patches Megatron: BASE reaches Megatron through ``MoESubmodules.router`` and the
layer-spec builders in every supported release.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import re
from typing import Any, Optional, Tuple

SUPPORTED = ((0, 16, 1), (0, 20, 0))  # [lowest, first unsupported)
SUPPORTED_TEXT = "megatron-core >= 0.16.1, < 0.20 (0.16.1, 0.17.x, 0.18.x, 0.19.x)"


def _parse(version: str) -> Tuple[int, int, int]:
    m = re.match(r"(\d+)\.(\d+)\.(\d+)", version)
    if not m:
        raise ImportError(f"base_plugin.megatron: cannot read the megatron-core version {version!r}; "
                          f"supported: {SUPPORTED_TEXT}")
    return tuple(int(x) for x in m.groups())


def check_version(version: str) -> Tuple[int, int, int]:
    """The ``(major, minor, patch)`` of ``version``; ImportError naming it and the supported range if
    it is outside :data:`SUPPORTED`."""
    parsed = _parse(version)
    if not SUPPORTED[0] <= parsed < SUPPORTED[1]:
        raise ImportError(f"base_plugin.megatron: megatron-core {version} is installed; supported: "
                          f"{SUPPORTED_TEXT}. Install one of those, e.g. pip install 'megatron-core>=0.16.1,<0.20'")
    return parsed


def installed_version() -> str:
    from megatron.core import package_info

    return package_info.__version__


VERSION = check_version(installed_version())
VERSION_TEXT = installed_version()

# ------------------------------------------------------------------ router construction (0.17+: is_mtp_layer)
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules  # noqa: E402
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection  # noqa: E402
from megatron.core.transformer.moe.router import Router, TopKRouter  # noqa: E402
from megatron.core.transformer.spec_utils import ModuleSpec  # noqa: E402

_ROUTER_KEYWORDS = frozenset(p for p in inspect.signature(TopKRouter.__init__).parameters
                             if p not in ("self", "config", "pg_collection"))


def router_kwargs(owner: str, kwargs: dict) -> dict:
    """The keywords an ``MoELayer`` gave its router that the installed ``TopKRouter.__init__`` takes
    (0.17+: ``is_mtp_layer``); ValueError naming any other keyword."""
    bad = sorted(set(kwargs) - _ROUTER_KEYWORDS)
    if bad:
        raise ValueError(f"{owner}: unknown option(s) {bad}; allowed: shuffle, shuffle_group, assignment, "
                         f"inference{''.join(', ' + k for k in sorted(_ROUTER_KEYWORDS))} "
                         f"(megatron-core {VERSION_TEXT})")
    return dict(kwargs)


def default_pg_collection():
    """Megatron's default process groups (``parallel_state``'s), as ``MoELayer`` uses them."""
    return get_default_pg_collection()


# ------------------------------------------------------------------ spec objects (0.18+: functools.partial)
def moe_spec_parts(node: Any) -> Optional[Tuple[Any, Any]]:
    """``(module, submodules)`` if ``node`` is the spec of an MoE layer — a ``ModuleSpec`` (0.16, 0.17)
    or a ``functools.partial`` (0.18+) whose submodules are ``MoESubmodules`` — else None."""
    if isinstance(node, ModuleSpec) and isinstance(node.submodules, MoESubmodules):
        return node.module, node.submodules
    if isinstance(node, functools.partial) and isinstance(node.keywords.get("submodules"), MoESubmodules):
        return node.func, node.keywords["submodules"]
    return None


def with_moe_module(node: Any, module: type, submodules: Any) -> Any:
    """``node`` (an MoE-layer spec in either form) building ``module`` with ``submodules``; the
    ``ModuleSpec`` is changed in place, a ``partial`` is rebuilt (its ``func`` cannot be set)."""
    if isinstance(node, ModuleSpec):
        node.module, node.submodules = module, submodules
        return node
    keywords = dict(node.keywords, submodules=submodules)
    return functools.partial(module, *node.args, **keywords)


def children(node: Any):
    """``(get, set)`` pairs for the parts of a spec node a walk descends into: ``ModuleSpec``
    submodules and params, a ``partial``'s keywords, dataclass fields, list / tuple items."""
    if isinstance(node, ModuleSpec):
        yield lambda: node.submodules, lambda v: setattr(node, "submodules", v)
    elif isinstance(node, functools.partial):
        for key in node.keywords:  # a partial's keywords dict is its own and mutable
            yield (lambda k=key: node.keywords[k]), (lambda v, k=key: node.keywords.__setitem__(k, v))
    elif isinstance(node, list):
        for i in range(len(node)):
            yield (lambda i=i: node[i]), (lambda v, i=i: node.__setitem__(i, v))
    elif dataclasses.is_dataclass(node) and not isinstance(node, type):
        for f in dataclasses.fields(node):
            yield (lambda n=f.name: getattr(node, n)), (lambda v, n=f.name: setattr(node, n, v))


def config_value(config, name: str, default=None):
    """``config.name``, or ``default`` where the installed release has no such option."""
    return getattr(config, name, default)


__all__ = ["SUPPORTED", "SUPPORTED_TEXT", "VERSION", "VERSION_TEXT", "Router", "TopKRouter", "MoELayer",
           "MoESubmodules", "ModuleSpec", "check_version", "installed_version", "router_kwargs",
           "default_pg_collection", "moe_spec_parts", "with_moe_module", "children", "config_value"]
