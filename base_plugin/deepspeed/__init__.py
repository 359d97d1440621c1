"""BASE layers for DeepSpeed: one ``"base_layer"`` section in the DeepSpeed JSON, nothing else changes.

    import base_plugin.deepspeed as bds
    engine, optimizer, loader, scheduler = bds.initialize(args=args, model=model, config="ds.json", ...)

* :func:`initialize` — ``deepspeed.initialize`` with the same arguments and return value; it reads and
  removes the ``"base_layer"`` section, swaps the chosen layers for :class:`BaseMoE` (keeping their
  expert weights) and hands the rest to DeepSpeed.
* :class:`BaseMoE` — drop-in for ``deepspeed.moe.layer.MoE``; :func:`swap_layers` — the swap alone;
  :func:`parse_section` — the section's schema and validation; :mod:`.reshard` — offline resharding.
* :func:`load_checkpoint` — ``engine.load_checkpoint`` that also resumes with another ``ep_size`` or
  world size, optimizer state included, and a top-k run as BASE.

On a machine without CUDA this package selects DeepSpeed's CPU accelerator (``DS_ACCELERATOR=cpu``)
unless the variable is already set, before DeepSpeed is first imported (:func:`import_deepspeed`);
:func:`use_cpu_accelerator` makes the same choice on a machine with CUDA. Needs deepspeed
(``pip install 'base-plugin[deepspeed]'``); names are imported on first use.
"""
from __future__ import annotations

import importlib
import os


def use_cpu_accelerator() -> None:
    """Train with DeepSpeed's CPU accelerator in this process and the ones it spawns, GPUs or not (what
    this package selects by itself where there is no CUDA). Call it before deepspeed is imported: the
    accelerator is fixed at its first use."""
    os.environ["DS_ACCELERATOR"] = "cpu"
    os.environ["BASE_PLUGIN_SELECTED_DS_CPU"] = "1"  # processes we spawn inherit the choice


def _select_accelerator() -> None:
    if "DS_ACCELERATOR" in os.environ:
        return
    try:
        import torch
        cuda = torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - no torch: deepspeed will not import either
        return
    if not cuda:
        use_cpu_accelerator()


_select_accelerator()


def import_deepspeed():
    """``import deepspeed``, set up for this machine: the CPU accelerator when there is no CUDA (see
    above) and, when we selected it, without DeepSpeed's shared-memory communication op — it serves
    CPU *inference* all-reduce, is JIT-compiled at every process start (30–45 s here), and a Ctrl-C
    during that compile kills the run. Training with gloo does not use it."""
    import deepspeed

    if os.environ.get("BASE_PLUGIN_SELECTED_DS_CPU") == "1" and os.environ.get("DS_ACCELERATOR") == "cpu":
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed

_EXPORTS = {
    "BaseMoE": "moe", "DeepSpeedExperts": "moe", "base_moe_layers": "moe", "ensure_expert_groups": "moe",
    "BaseLayerConfig": "config", "parse_section": "config", "split_config": "config", "SECTION": "config",
    "swap_layers": "swap",
    "initialize": "engine", "load_checkpoint": "resume",
    "reshard_checkpoint": "reshard",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'base_plugin.deepspeed' has no attribute {name!r}")
    try:
        import_deepspeed()
    except ImportError as exc:
        raise ImportError("base_plugin.deepspeed needs deepspeed: pip install 'base-plugin[deepspeed]'; "
                          f"import failed with: {exc}") from exc
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
