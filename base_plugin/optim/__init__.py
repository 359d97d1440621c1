"""Optimizers that do their own data-parallel communication.

* :class:`SLAMB` -- LAMB with sparse first-moment synchronisation (Xu et al., ICML 2023).
* :class:`LAMB` -- plain LAMB with dense gradient averaging, same code path (``SLAMB(compression=1)``).
* :class:`CountingComm` / :class:`CommStats` -- the collective wrapper that counts bytes sent, and
  :func:`allreduce_gradients_` to give any torch optimizer (e.g. AdamW) counted dense averaging.
* :mod:`.integrations` -- SLAMB inside DeepSpeed (:func:`deepspeed_initialize`: client optimizer, engine
  gradient all-reduce off) and megatron-core (:func:`disable_megatron_grad_sync` and friends). DeepSpeed
  and megatron-core are imported only when those functions run.
"""
from .comm import CommStats, CountingComm, allreduce_gradients_
from .integrations import (check_deepspeed_config, deepspeed_initialize, disable_deepspeed_grad_allreduce,
                           disable_megatron_grad_sync, megatron_grads_to_params_, megatron_slamb_groups)
from .slamb import LAMB, SLAMB

__all__ = ["SLAMB", "LAMB", "CommStats", "CountingComm", "allreduce_gradients_", "check_deepspeed_config",
           "deepspeed_initialize", "disable_deepspeed_grad_allreduce", "disable_megatron_grad_sync",
           "megatron_grads_to_params_", "megatron_slamb_groups"]
