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


def drop_token_rows(x):
    """This tensor-parallel rank's block of the rows of x [n, d] (n divisible by the TP size):
    ``deepspeed.moe.mappings.drop_tokens`` along dim 0, whose backward gathers.

    DeepSpeed 0.16 – 0.19.8 (checked on 0.19.8 with torch 2.13): its mappings gather into a flat
    buffer of TP·numel elements, which torch's gloo backend rejects for inputs of more than one
    dimension ("ProcessGroupGloo::allgather: invalid tensor size"). So the rows travel flattened: the
    blocks of the flat tensor are the blocks of rows, the same result on every backend."""
    from deepspeed.moe.mappings import drop_tokens

    return drop_tokens(x.reshape(-1), dim=0).view(-1, x.shape[-1])


def gather_token_rows(x):
    """The rows of every tensor-parallel rank's x [m, d] (the same m on all), in TP rank order:
    ``deepspeed.moe.mappings.gather_tokens`` along dim 0, whose backward drops; flattened for gloo as in
    :func:`drop_token_rows`."""
    from deepspeed.moe.mappings import gather_tokens

    return gather_tokens(x.reshape(-1), dim=0).view(-1, x.shape[-1])
