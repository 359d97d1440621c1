"""BASE layers for DeepSpeed: one ``"base_layer"`` section in the DeepSpeed JSON, nothing else changes.

    import base_plugin.deepspeed as bds
    engine, optimizer, loader, scheduler = bds.initialize(args=args, model=model, config="ds.json", ...)

* :func:`initialize` — ``deepspeed.initialize`` with the same arguments and return value; it reads and
  removes the ``"base_layer"`` section, swaps the chosen layers for :class:`BaseMoE` (keeping their
  expert weights) and hands the rest to DeepSpeed.
* :class:`BaseMoE` — drop-in for ``deepspeed.moe.layer.MoE``; :func:`swap_layers` — the swap alone;
  :func:`parse_section` — the section's schema and validation; :mod:`.reshard` — offline resharding.

On a machine without CUDA this package selects DeepSpeed's CPU accelerator (``DS_ACCELERATOR=cpu``)
unless the variable is already set, before DeepSpeed is first imported. Needs deepspeed
(``pip install 'base-plugin[deepspeed]'``); names are imported on first use.
"""
from __future__ import annotations

import importlib
import os


def _select_accelerator() -> None:
    if "DS_ACCELERATOR" in os.environ:
        return
    try:
        import torch
        cuda = torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - no torch: deepspeed will not import either
        return
    if not cuda:
        os.environ["DS_ACCELERATOR"] = "cpu"


_select_accelerator()

_EXPORTS = {
    "BaseMoE": "moe", "DeepSpeedExperts": "moe", "base_moe_layers": "moe", "ensure_expert_groups": "moe",
    "BaseLayerConfig": "config", "parse_section": "config", "split_config": "config", "SECTION": "config",
    "swap_layers": "swap",
    "initialize": "engine",
    "reshard_checkpoint": "reshard",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'base_plugin.deepspeed' has no attribute {name!r}")
    try:
        import deepspeed  # noqa: F401
    except ImportError as exc:
        raise ImportError("base_plugin.deepspeed needs deepspeed: pip install 'base-plugin[deepspeed]'; "
                          f"import failed with: {exc}") from exc
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
