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

Importing this package changes nothing: on a CPU machine call :func:`use_cpu_accelerator` in every
process that trains (our CLI, demo, examples and tests do), on GPUs DeepSpeed picks its accelerator as
usual. Needs deepspeed (``pip install 'base-plugin[deepspeed]'``); names are imported on first use.
"""
from __future__ import annotations

import importlib


def use_cpu_accelerator() -> None:
    """Train with DeepSpeed's CPU accelerator in this process, GPUs or not.

    Explicit, for this process only (DeepSpeed's own ``deepspeed.accelerator.set_accelerator``; no
    environment variable is written, so processes started later call it themselves, before
    ``deepspeed.initialize`` / ``deepspeed.init_distributed``). It also skips the JIT build of
    DeepSpeed's shared-memory communication op (:func:`~base_plugin.deepspeed.compat.skip_shm_comm_build`),
    which serves CPU inference all-reduce only and costs 30–45 s at every process start.
    """
    from deepspeed.accelerator import get_accelerator, set_accelerator
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

    from .compat import skip_shm_comm_build

    if get_accelerator().device_name() != "cpu":
        set_accelerator(CPU_Accelerator())
    skip_shm_comm_build()


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
        import deepspeed  # noqa: F401
    except ImportError as exc:
        raise ImportError("base_plugin.deepspeed needs deepspeed: pip install 'base-plugin[deepspeed]'; "
                          f"import failed with: {exc}") from exc
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
