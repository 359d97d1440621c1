"""``load_checkpoint``: resume a DeepSpeed engine from a checkpoint of another layout, or of a top-k run.

    engine, *_ = base_plugin.deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    load_path, client_state = base_plugin.deepspeed.load_checkpoint(engine, "checkpoints/")

Same arguments and return value as ``engine.load_checkpoint``, which it is whenever DeepSpeed can load
the checkpoint itself. Two more cases:

* **Another layout** — the checkpoint was written with another ``ep_size`` (or, with ZeRO 1/2, another
  data-parallel size). DeepSpeed reads the weights for any layout (one file per global expert) but not
  the optimizer state. Here the weights come through ``engine.load_checkpoint(load_module_only=True)``
  and the optimizer state of every parameter — Adam's moments of each expert moved with the expert,
  the step, the fp32 master weights — through :mod:`.optimizer_state`; the step counters and the LR
  scheduler as DeepSpeed restores them. Training then continues the run that did not reshard.
* **Top-k → BASE** — the checkpoint was written by DeepSpeed's own top-k ``MoE`` (top-1 or top-2,
  any ``ep_size``) and the model now has BaseMoE layers in their place (the ``"base_layer"`` section
  added to the config, :func:`~base_plugin.deepspeed.initialize`). The experts load unchanged, each
  layer's centroids are the rows of its saved gate weight (as ``"centroids": "gate"`` does in memory),
  and the optimizer state of every parameter the two models share (the experts, embeddings, norms, …)
  carries over with the step counters; the gate's state goes with the gate, and the centroids start
  with no moments (without ZeRO: their own step 0; with ZeRO 1/2: their group's step, which they
  share). The ``ep_size`` may change at the same time.

The reverse — a BASE checkpoint into DeepSpeed's top-k ``MoE`` — is refused with ValueError: the top-k
gate cannot be recovered from centroids trained for a balanced assignment. (``engine.load_checkpoint``
itself refuses it too, with torch's "Unexpected key(s) … base_centroid".)
"""
from __future__ import annotations

import glob
import os
from typing import Optional

import torch

from .moe import CENTROID, GATE, BaseMoE
from .optimizer_state import apply_optimizer_state, moe_layers, read_optimizer_state
from .reshard import resolve_tag

# what DeepSpeed restores besides the module and the optimizer when it loads a checkpoint fully
_DEEPSPEED_STATES = ("module", "optimizer", "lr_scheduler", "skipped_steps", "global_steps", "global_samples",
                     "dp_world_size", "mp_world_size", "data_sampler", "random_ltd")


def _saved_expert_groups(ckpt: str) -> Optional[set]:
    """The names (DeepSpeed's ``ep_size_<n>``) of the saved expert param groups; None if it cannot tell."""
    for pattern, pick in (("*zero_pp_rank_0_mp_rank_00_optim_states.pt",
                           lambda sd: sd["optimizer_state_dict"]["base_optimizer_state"]),
                          ("expp_rank_0_mp_rank_00_optim_states.pt", lambda sd: sd["optimizer"])):
        paths = glob.glob(os.path.join(ckpt, pattern))
        if paths:
            base = pick(torch.load(paths[0], map_location="cpu", weights_only=False, mmap=True))
            if not isinstance(base, dict):
                return None
            return {g["name"] for g in base["param_groups"] if g.get("moe")}
    return None


def _layer_kinds(engine, ckpt: str, main: dict):
    """``(top-k checkpoint into BASE layers, BASE checkpoint into top-k layers)``."""
    layers = moe_layers(engine.module)
    base = {n for n, m in layers.items() if isinstance(m, BaseMoE)}
    topk = set(layers) - base
    gates = {k[:-len(GATE) - 1] if len(k) > len(GATE) else "" for k in main["module"] if k.endswith(GATE)}
    expert_files = glob.glob(os.path.join(ckpt, "layer_*_expert_0_mp_rank_00_model_states.pt"))
    saved_base = any(k.endswith("." + CENTROID) for p in expert_files
                     for k in torch.load(p, map_location="cpu", weights_only=False, mmap=True))
    return bool(base & gates), bool(topk) and saved_base


def load_checkpoint(engine, load_dir: str, tag: Optional[str] = None, load_module_strict: bool = True,
                    load_optimizer_states: bool = True, load_lr_scheduler_states: bool = True,
                    load_module_only: bool = False, custom_load_fn=None):
    """``engine.load_checkpoint(load_dir, tag, ...)`` that also resumes across expert-parallel and
    data-parallel sizes and from a top-k run (module docstring). Collective like the engine's: every
    rank calls it. Returns ``(load_path, client_state)``. ValueError for a BASE checkpoint into
    top-k MoE layers; NotImplementedError for a layout change it cannot carry the optimizer across
    (see :mod:`.optimizer_state`) — pass ``load_optimizer_states=False`` to start the optimizer afresh."""
    tag = resolve_tag(load_dir, tag)
    ckpt = os.path.join(load_dir, tag)
    main = torch.load(os.path.join(ckpt, "mp_rank_00_model_states.pt"), map_location="cpu", weights_only=False,
                      mmap=True)
    from_topk, into_topk = _layer_kinds(engine, ckpt, main)
    if into_topk:
        raise ValueError(f"{ckpt} was written by BASE layers (its experts have '{CENTROID}'), but this model has "
                         "DeepSpeed top-k MoE layers: a top-k gate cannot be recovered from BASE centroids. Resume it "
                         "with the \"base_layer\" section in the DeepSpeed config (base_plugin.deepspeed.initialize)")
    layers = moe_layers(engine.module).values()
    same_layout = (not from_topk and main.get("dp_world_size") == engine.dp_world_size
                   and _saved_expert_groups(ckpt) == {m.expert_group_name for m in layers})
    kwargs = dict(load_module_strict=load_module_strict, load_lr_scheduler_states=load_lr_scheduler_states,
                  custom_load_fn=custom_load_fn)
    if same_layout or load_module_only:
        return engine.load_checkpoint(load_dir, tag, load_optimizer_states=load_optimizer_states,
                                      load_module_only=load_module_only, **kwargs)
    load_path, _ = engine.load_checkpoint(load_dir, tag, load_module_only=True, **kwargs)
    if load_optimizer_states and engine.optimizer is not None:
        apply_optimizer_state(engine, read_optimizer_state(engine, load_dir, tag, from_topk=from_topk))
    engine.global_steps = main["global_steps"]
    engine.global_samples = main.get("global_samples", engine.global_steps * engine.train_batch_size())
    engine.skipped_steps = main["skipped_steps"]
    if load_lr_scheduler_states and engine.lr_scheduler is not None and main.get("lr_scheduler") is not None:
        engine.lr_scheduler.load_state_dict(main["lr_scheduler"])
    return load_path, {k: v for k, v in main.items() if k not in _DEEPSPEED_STATES}
