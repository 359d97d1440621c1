"""Running megatron-core 0.16.1 code paths that assume CUDA on a CPU-only torch, in tests only.

Some of Megatron's CPU-capable code still calls ``torch.cuda`` unconditionally: the DDP gradient
buffer is allocated on ``torch.cuda.current_device()`` (distributed/param_and_grad_buffer.py), and
distributed-checkpoint saving ends its device-to-host copy with ``torch.cuda.synchronize()`` and
broadcasts its failure flag from a tensor on ``torch.cuda.current_device()``
(dist_checkpointing/strategies/filesystem_async.py, state_dict_saver.py). With no CUDA device the
right answers are "the CPU" and "nothing to wait for"; :func:`cuda_calls_on_cpu` gives them while its
block runs. megatron-core itself is not modified.
"""
import contextlib

import torch


@contextlib.contextmanager
def cuda_calls_on_cpu():
    saved = torch.cuda.current_device, torch.cuda.synchronize
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *args, **kwargs: None
    try:
        yield
    finally:
        torch.cuda.current_device, torch.cuda.synchronize = saved
