"""The multi-rank harness the tests use: :func:`base_plugin.launch.run_ranks` (gloo CPU ranks on
127.0.0.1, file rendezvous, a timeout on every call), with every rank on DeepSpeed's CPU accelerator
(the suite trains DeepSpeed on CPU ranks, on a GPU machine too; ``tests/test_cuda.py``'s GPU jobs
switch their own ranks to CUDA)."""
from base_plugin.launch import free_port  # noqa: F401
from base_plugin.launch import run_ranks as _run_ranks


def cpu_accelerator() -> None:
    import base_plugin.deepspeed

    base_plugin.deepspeed.use_cpu_accelerator()


def run_ranks(fn, world_size, *args, **kwargs):
    kwargs.setdefault("setup", cpu_accelerator)
    return _run_ranks(fn, world_size, *args, **kwargs)
