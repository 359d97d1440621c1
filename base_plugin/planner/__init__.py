"""Paper-scale planning: parameter counts from the meta-device model, per-GPU memory, launch configs.

    from base_plugin.planner import count_parameters, plan_layout, estimate_memory
    counts = count_parameters(GPTConfig.load("configs/paper/base-large.json"))
    layout = plan_layout(cfg, gpus=128)                 # PlanError if the experts cannot be spread
    mem = estimate_memory(cfg, counts, layout, zero=1)  # bytes per GPU; mem.fits(32)

The command line is :func:`base_plugin.planner.cli.main` (``base-plugin plan``).
"""
from .launch import base_layer_section, deepspeed_config, dense_twin, launch_commands, megatron_args
from .memory import (GIB, Layout, MemoryEstimate, PlanError, activation_bytes_per_token, estimate_memory,
                     plan_layout)
from .params import ParamCounts, count_model, count_parameters

__all__ = ["GIB", "Layout", "MemoryEstimate", "ParamCounts", "PlanError", "activation_bytes_per_token",
           "base_layer_section", "count_model", "count_parameters", "deepspeed_config", "dense_twin",
           "estimate_memory", "launch_commands", "megatron_args", "plan_layout"]
