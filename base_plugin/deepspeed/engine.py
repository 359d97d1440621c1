"""``initialize``: ``deepspeed.initialize`` plus the ``"base_layer"`` section.

    engine, optimizer, dataloader, lr_scheduler = base_plugin.deepspeed.initialize(
        args=args, model=model, model_parameters=model.parameters(), config="ds_config.json")

Same arguments and return value as ``deepspeed.initialize``. The config comes from ``config`` (dict or
JSON path), ``config_params``, or ``args.deepspeed_config`` (what the ``deepspeed`` launcher's
``--deepspeed_config`` sets). The section is validated, removed, and applied with
:func:`~base_plugin.deepspeed.swap.swap_layers` before DeepSpeed sees the model; DeepSpeed gets the rest
of the config as a dict (the user's dict and ``args`` are not modified). Without a section (or with
``"enabled": false``) this is exactly ``deepspeed.initialize``.

``model_parameters``: a generator (``model.parameters()``) is lazy, so DeepSpeed reads it after the swap
and the new layers' parameters are included. A *list* (of parameters, or of param groups such as
``split_params_into_different_moe_groups_for_optimizer`` makes) built before the call would miss the
new centroids and any new experts: it is rejected with ValueError when the swap added parameters.

``mpu``: handed to DeepSpeed, which stores it before the layers make their process groups
(``set_deepspeed_parallelism``), for DeepSpeed's MoE layers and BaseMoE alike.
"""
from __future__ import annotations

import copy
import inspect
from typing import Any

import deepspeed
import torch.distributed as tdist

from .config import split_config
from .swap import swap_layers


def _use_data_before_expert_parallel(config: Any) -> bool:
    return bool(isinstance(config, dict) and config.get("use_data_before_expert_parallelism", False))


def initialize(args=None, model=None, optimizer=None, model_parameters=None, training_data=None, lr_scheduler=None,
               distributed_port=None, mpu=None, dist_init_required=None, collate_fn=None, config=None,
               mesh_param=None, config_params=None, **kwargs):
    """``deepspeed.initialize`` that first applies (and removes) the ``"base_layer"`` config section."""
    source = config if config is not None else config_params
    from_args = None
    if source is None and args is not None:
        for attr in ("deepspeed_config", "deepscale_config"):
            if getattr(args, attr, None) is not None:
                source, from_args = getattr(args, attr), attr
                break
    clean, section = split_config(source)
    if section is not None:
        if from_args is not None:  # hand DeepSpeed the stripped dict, on a copy of args
            args = copy.copy(args)
            setattr(args, from_args, None)
        if not (tdist.is_available() and tdist.is_initialized()):
            init_kwargs = {"dist_init_required": dist_init_required}
            if distributed_port is not None:
                init_kwargs["distributed_port"] = distributed_port
            deepspeed.init_distributed(**init_kwargs)
        before = {id(p) for p in model.parameters()} if model is not None else set()
        swap_layers(model, section, use_data_before_expert_parallel=_use_data_before_expert_parallel(clean))
        added = [p for p in model.parameters() if id(p) not in before]
        listed = [entry.get("params") if isinstance(entry, dict) else [entry]
                  for entry in model_parameters] if isinstance(model_parameters, (list, tuple)) else []
        if added and listed and all(isinstance(ps, (list, tuple)) for ps in listed):
            known = {id(p) for ps in listed for p in ps}
            if not any(id(p) in known for p in added):
                raise ValueError("model_parameters (a list of parameters or of param groups) was made before the BASE "
                                 "swap and misses the new layers' parameters: pass model.parameters() (a generator) or "
                                 "build the list or groups afterwards")
        config, config_params = clean, None
    call = dict(args=args, model=model, optimizer=optimizer, model_parameters=model_parameters,
                training_data=training_data, lr_scheduler=lr_scheduler, mpu=mpu,
                dist_init_required=dist_init_required, collate_fn=collate_fn, config=config,
                config_params=config_params, **kwargs)
    if distributed_port is not None:
        call["distributed_port"] = distributed_port
    if mesh_param is not None:
        call["mesh_param"] = mesh_param
    accepted = inspect.signature(deepspeed.initialize).parameters
    return deepspeed.initialize(**{k: v for k, v in call.items() if k in accepted or k in kwargs})
