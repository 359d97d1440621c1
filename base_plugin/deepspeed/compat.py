"""What differs between DeepSpeed releases, or what a release forces us to work around: one place.

Each function names what it works around and the releases it is for.
"""
from __future__ import annotations


def skip_shm_comm_build() -> None:
    """DeepSpeed 0.16 – 0.19.8 (checked on 0.19.6 and 0.19.8): with the CPU accelerator, every
    ``deepspeed.comm`` backend start JIT-compiles the ``deepspeed_shm_comm`` op (30–45 s per process,
    and a Ctrl-C during the compile kills the run) although training over gloo never uses it — it
    serves CPU inference all-reduce. DeepSpeed builds it only when ``deepspeed.ops.__compatible_ops__``
    marks it compatible, so this marks it not compatible for this process. Called only by
    :func:`base_plugin.deepspeed.use_cpu_accelerator`."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
