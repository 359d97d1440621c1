"""SLAMB inside DeepSpeed and Megatron-core: keep their data-parallel gradient averaging out of the way.

SLAMB does its own communication (see :class:`~base_plugin.optim.SLAMB`): it must receive each rank's
*local* gradient. A framework that averages gradients after ``backward`` would make every SLAMB step
pay for a dense all-reduce (and, with ``compression < 1``, defeat its purpose). The helpers below turn
that averaging off and refuse settings that would bring it back. DeepSpeed and megatron-core are imported
lazily: :mod:`base_plugin.optim` imports without them.

**DeepSpeed** (checked against DeepSpeed 0.19.8)::

    from base_plugin.optim import SLAMB
    from base_plugin.optim.integrations import deepspeed_initialize

    engine, optimizer, _, scheduler = deepspeed_initialize(
        model=model, optimizer=lambda params: SLAMB(params, lr=1e-2, compression=0.1, sync_interval=100),
        config={"train_micro_batch_size_per_gpu": 16, "zero_optimization": {"stage": 0}})
    # or: deepspeed_initialize(model=model, config="configs/slamb/deepspeed_cpu.json"), whose "slamb"
    # section holds SLAMB's arguments (removed before DeepSpeed sees the config)
    loss = loss_fn(engine(x), y); engine.backward(loss); engine.step()      # the usual loop

The switch is the engine attribute ``enable_backward_allreduce``: ``DeepSpeedEngine._backward_epilogue``
(end of ``engine.backward``) and ``engine.step`` (unmanaged gradient accumulation) call
``allreduce_gradients()`` only while it is true. :func:`deepspeed_initialize` is ``deepspeed.initialize``
followed by :func:`disable_deepspeed_grad_allreduce`, which sets it to ``False`` after checking the
engine (and :func:`check_deepspeed_config` checks the JSON before the engine is built). Refused, with a
``ValueError`` naming the setting:

* ``zero_optimization.stage`` >= 1: ZeRO's optimizer wrapper reduces (stage 1: ``reduce_gradients`` /
  stage 2-3: backward hooks, independently of the flag) and partitions SLAMB's state.
* ``fp16`` / ``bf16`` enabled: DeepSpeed's mixed-precision wrappers (``FP16_Optimizer``,
  ``FP16_UnfusedOptimizer`` for bf16 with ZeRO 0, ``BF16_Optimizer``) swap the optimizer's parameters for
  fp32 master copies (SLAMB would keep stepping the originals) and add a per-step overflow-flag
  all-reduce. Train in fp32 (``"torch_autocast"`` with ``bfloat16`` keeps the model fp32 and passes the
  checks, but is not tested here).
* ``gradient_clipping`` > 0: with ZeRO 0 DeepSpeed clips with the local gradient norm averaged over the
  data-parallel group (``deepspeed/runtime/utils.py`` ``clip_grad_norm_``), an extra all-reduce every
  step; LAMB's trust ratio already bounds the step. DeepSpeed's default when the key is absent is 1.0
  (``GRADIENT_CLIPPING_DEFAULT``): :func:`check_deepspeed_config` sets an absent key to 0.
* an ``"optimizer"`` section (SLAMB is the client optimizer), ``sparse_gradients``, a pipeline engine,
  fp16 autocast (its GradScaler can skip a step on one rank only: the collectives would go out of step).

MoE models: pass the optimizer as a callable (as above). DeepSpeed calls it after it has created its
expert-parallel groups, so SLAMB can resolve each expert parameter's expert-data-parallel group.

**Megatron-core** (checked against megatron-core 0.16.1)::

    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(use_distributed_optimizer=False), module)
    disable_megatron_grad_sync(ddp)
    opt = SLAMB(ddp.parameters(), lr=1e-2, **megatron_slamb_groups(ddp))
    # per iteration: ddp.zero_grad_buffer(); opt.zero_grad(); forward/backward (e.g. the pipeline
    # schedule, whose config.finalize_model_grads_func may stay megatron's finalize_model_grads)
    megatron_grads_to_params_(ddp); opt.step()

Megatron's DDP accumulates gradients into ``param.main_grad`` (a contiguous buffer) and sets
``param.grad = None``; the data-parallel all-reduce / reduce-scatter is issued per bucket group by
``_ParamAndGradBucketGroup.start_grad_sync``, reached either from the backward hook
(``overlap_grad_reduce=True``, via ``register_grad_ready``) or from ``finish_grad_sync`` (called by
``finalize_model_grads``). ``ddp.no_sync()`` only marks buckets "not the last micro-batch", which stops the
overlapped path but not ``finish_grad_sync`` with ``overlap_grad_reduce=False``. So
:func:`disable_megatron_grad_sync` replaces ``start_grad_sync`` / ``finish_grad_sync`` of every bucket
group (dense and expert) of that DDP instance with no-ops. Everything else ``finalize_model_grads`` does
(tensor/pipeline-parallel reductions of layer-norm and embedding gradients, which are not data-parallel)
still runs. The scaling by ``1 / dp_size`` that Megatron applies inside ``start_grad_sync`` is skipped
with it: ``main_grad`` stays the local mean gradient, which is what SLAMB wants. Refused: the distributed
optimizer (``use_distributed_optimizer=True``: it shards state and needs reduce-scattered gradients).
Per-token loss (``finalize_model_grads(..., num_tokens=...)``) still all-reduces the token count (one
scalar) over the data-parallel group and divides the local gradient by the global count; pass
``num_tokens=None`` with SLAMB.

On a CPU-only machine megatron-core 0.16.1 cannot build its DDP: the gradient buffer is allocated with
``device=torch.cuda.current_device()`` in ``megatron/core/distributed/param_and_grad_buffer.py``
(``_ParamAndGradBuffer.__init__``, line 806). The helpers themselves are device-agnostic.
"""
from __future__ import annotations

import json
import os
from typing import Any

import torch

from .slamb import SLAMB

__all__ = ["check_deepspeed_config", "deepspeed_initialize", "disable_deepspeed_grad_allreduce",
           "slamb_from_section", "disable_megatron_grad_sync", "megatron_grads_to_params_",
           "megatron_slamb_groups"]


# ====================================================================================== DeepSpeed
def _enabled(section) -> bool:
    if isinstance(section, dict):
        return bool(section.get("enabled", False))
    return bool(section)


def check_deepspeed_config(config: Any) -> dict:
    """Validate a DeepSpeed config (dict or JSON path) for use with SLAMB; returns it as a dict (a copy).

    Raises ``ValueError`` naming the first setting that would reduce gradients behind SLAMB's back, replace
    its parameters, or add per-step collectives (see the module docstring).
    """
    if isinstance(config, (str, os.PathLike)):
        with open(config) as f:
            config = json.load(f)
    if not isinstance(config, dict):
        raise ValueError(f"config must be a dict or a path to a JSON file, got {type(config).__name__}")
    config = json.loads(json.dumps(config))
    zero = config.get("zero_optimization", {})
    stage = zero.get("stage", 0) if isinstance(zero, dict) else 0
    if stage != 0:
        raise ValueError(f"zero_optimization.stage must be 0 with SLAMB, got {stage!r}: ZeRO's optimizer wrapper "
                         "reduces gradients itself and partitions the optimizer state")
    for key in ("fp16", "bf16", "bfloat16"):
        if _enabled(config.get(key)):
            raise ValueError(f"{key}.enabled must be false with SLAMB: DeepSpeed's mixed-precision optimizer "
                             "wrappers replace the optimizer's parameters with fp32 master copies; train in fp32 "
                             "or use \"torch_autocast\" with bfloat16")
    autocast = config.get("torch_autocast")
    if _enabled(autocast) and str(autocast.get("dtype", "bfloat16")).lower().replace("torch.", "") not in (
            "bfloat16", "bf16"):
        raise ValueError("torch_autocast.dtype must be bfloat16 with SLAMB: float16 autocast uses a GradScaler that "
                         "can skip a step on one rank only")
    # DeepSpeed 0.19.8 clips at 1.0 when the key is absent (runtime/constants.py GRADIENT_CLIPPING_DEFAULT)
    clip = config.setdefault("gradient_clipping", 0.0) or 0.0
    if clip > 0:
        raise ValueError(f"gradient_clipping must be 0 with SLAMB, got {clip!r}: DeepSpeed would all-reduce the "
                         "gradient norm every step (LAMB's trust ratio already bounds the step)")
    if "optimizer" in config:
        raise ValueError("optimizer: remove the \"optimizer\" section; SLAMB is passed as the client optimizer "
                         "(deepspeed_initialize(optimizer=SLAMB(...) or a callable))")
    if config.get("sparse_gradients", False):
        raise ValueError("sparse_gradients must be false with SLAMB (it does not take sparse gradients)")
    return config


def disable_deepspeed_grad_allreduce(engine) -> None:
    """Stop ``engine`` from averaging gradients (``engine.enable_backward_allreduce = False``) after checking
    that nothing else in it reduces gradients and that its optimizer is a bare :class:`SLAMB`."""
    from deepspeed.runtime.pipe.engine import PipelineEngine  # noqa: PLC0415 - optional dependency

    if isinstance(engine, PipelineEngine):
        raise ValueError("pipeline engines are not supported with SLAMB (they reduce gradients in their schedule)")
    if engine.zero_optimization_stage() != 0:
        raise ValueError(f"zero_optimization.stage must be 0 with SLAMB, got {engine.zero_optimization_stage()}")
    if engine.fp16_enabled() or engine.bfloat16_enabled():
        raise ValueError("fp16/bf16 must be disabled with SLAMB (DeepSpeed's mixed-precision wrappers)")
    if engine.gradient_clipping() > 0:
        raise ValueError(f"gradient_clipping must be 0 with SLAMB, got {engine.gradient_clipping()}")
    if getattr(engine, "torch_autocast_z0_gradscaler", None) is not None:
        raise ValueError("torch_autocast.dtype must be bfloat16 with SLAMB (float16 autocast uses a GradScaler)")
    if not isinstance(engine.optimizer, SLAMB) or engine.optimizer is not engine.basic_optimizer:
        raise ValueError(f"the engine's optimizer must be a bare SLAMB/LAMB, got {type(engine.optimizer).__name__}")
    engine.enable_backward_allreduce = False


SLAMB_SECTION = "slamb"
_SECTION_KEYS = ("lr", "betas", "beta3", "compression", "sync_interval", "weight_decay", "eps", "trust_clip",
                 "dense_threshold", "seed")


def slamb_from_section(section: dict):
    """A callable ``params -> SLAMB`` from a config's ``"slamb"`` section (keys: SLAMB's keyword arguments
    ``lr, betas, beta3, compression, sync_interval, weight_decay, eps, trust_clip, dense_threshold, seed``).
    Unknown keys raise ``ValueError`` naming them; values are checked by SLAMB itself."""
    if not isinstance(section, dict):
        raise ValueError(f"{SLAMB_SECTION} must be an object, got {type(section).__name__}")
    unknown = sorted(set(section) - set(_SECTION_KEYS))
    if unknown:
        raise ValueError(f"{SLAMB_SECTION}.{unknown[0]}: unknown key (allowed: {', '.join(_SECTION_KEYS)})")
    kwargs = dict(section)
    for key in ("betas", "trust_clip"):
        if isinstance(kwargs.get(key), list):
            kwargs[key] = tuple(kwargs[key])
    return lambda params: SLAMB(params, **kwargs)


def deepspeed_initialize(*, model, config, optimizer=None, **kwargs):
    """``deepspeed.initialize`` with SLAMB as the client optimizer and the engine's gradient all-reduce off.

    ``config``: dict or JSON path, checked with :func:`check_deepspeed_config`; it may hold a ``"slamb"``
    section (SLAMB's keyword arguments, see :func:`slamb_from_section`), removed before DeepSpeed sees it.
    ``optimizer``: a :class:`SLAMB` (or :class:`LAMB`) instance, or a callable ``params -> SLAMB`` (needed for
    MoE models: DeepSpeed creates its expert groups before calling it); default: built from the section.
    Other keyword arguments go to ``deepspeed.initialize``. Returns its 4-tuple
    ``(engine, optimizer, dataloader, lr_scheduler)``; ``optimizer`` is the SLAMB instance.
    """
    import deepspeed  # noqa: PLC0415 - optional dependency

    config = check_deepspeed_config(config)
    section = config.pop(SLAMB_SECTION, None)
    if optimizer is None:
        if section is None:
            raise ValueError(f"pass optimizer=SLAMB(...) (or a callable) or put a \"{SLAMB_SECTION}\" section "
                             "in the config")
        optimizer = slamb_from_section(section)
    elif section is not None:
        raise ValueError(f"{SLAMB_SECTION}: the config has a \"{SLAMB_SECTION}\" section and optimizer= was "
                         "given too; keep one")
    if kwargs.get("model_parameters") is None:
        kwargs["model_parameters"] = model.parameters()
    out = deepspeed.initialize(model=model, optimizer=optimizer, config=config, **kwargs)
    disable_deepspeed_grad_allreduce(out[0])
    return out


# ====================================================================================== Megatron-core
def _noop(*args, **kwargs) -> None:
    return None


def disable_megatron_grad_sync(ddp) -> None:
    """Turn off the data-parallel gradient all-reduce / reduce-scatter of a megatron-core
    ``DistributedDataParallel`` (this instance only; see the module docstring). Idempotent."""
    cfg = ddp.ddp_config
    if cfg.use_distributed_optimizer:
        raise ValueError("use_distributed_optimizer must be False with SLAMB: Megatron's distributed optimizer "
                         "shards the optimizer state and needs reduce-scattered gradients")
    groups = list(ddp.bucket_groups) + list(ddp.expert_parallel_bucket_groups)
    for bg in groups:
        bg.start_grad_sync = _noop
        bg.finish_grad_sync = _noop
    ddp.slamb_grad_sync_disabled = True


def megatron_grads_to_params_(ddp) -> int:
    """Point ``param.grad`` at the accumulated local gradient ``param.main_grad`` (no copy when the dtypes
    match) for every trainable parameter of ``ddp``, so that :class:`SLAMB` sees it. Call after the
    backward passes (and ``finalize_model_grads``, if used), before ``optimizer.step()``. Returns the
    number of parameters set."""
    if not getattr(ddp, "slamb_grad_sync_disabled", False):
        raise RuntimeError("call disable_megatron_grad_sync(ddp) first: Megatron's DDP would average these "
                           "gradients")
    n = 0
    for p in ddp.module.parameters():
        g = getattr(p, "main_grad", None)
        if p.requires_grad and g is not None:
            p.grad = g if g.dtype == p.dtype else g.to(p.dtype)
            n += 1
    return n


def megatron_slamb_groups(ddp) -> dict:
    """``SLAMB(**megatron_slamb_groups(ddp))`` keywords: dense parameters synchronised over the DDP's
    data(-and-context)-parallel group, expert parameters (``allreduce=False``) over its expert
    data-parallel group -- the groups Megatron's DDP would have reduced them over."""
    dense, expert = ddp.dp_cp_group, ddp.expt_dp_group
    return {"group": dense, "group_resolver": lambda name: expert}
