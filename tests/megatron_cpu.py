"""Running megatron-core code paths that assume CUDA on a CPU-only torch, in tests only.

Parts of megatron-core that compute happily on CPU still call ``torch.cuda`` unconditionally. With
no CUDA device the right answers are "the CPU" for a device, "nothing to wait for" for a
synchronisation, and a stream / event that orders nothing (CPU ops run in program order);
:func:`cuda_calls_on_cpu` gives those answers while its block runs and restores ``torch.cuda`` after.
megatron-core itself is not modified, and nothing here is used by the package. The calls, by release:

* ``torch.cuda.current_device()`` — every release (0.16.1 – 0.19.x): the DDP gradient buffer
  (distributed/param_and_grad_buffer.py), the global memory buffer the local attention and the
  sequence-parallel / expert-parallel gathers use (utils.py ``GlobalMemoryBuffer``), the failure flag
  of distributed-checkpoint saving (dist_checkpointing/strategies/...).
* ``torch.cuda.synchronize()`` — every release: the end of distributed-checkpoint saving.
* ``torch.cuda.Stream()``, ``torch.cuda.stream(s)``, ``torch.cuda.current_stream()`` /
  ``default_stream()``, ``Event`` — the alltoall token dispatcher's device-to-host side stream (every
  release); the DDP's communication stream calls ``current_stream()`` from 0.19 (``default_stream()``
  before).

One answer is not a ``torch.cuda`` call: the alltoall dispatcher turns its split sizes into numpy
arrays only when they are CUDA tensors (moe_utils.py ``maybe_move_tensor_to_cpu``, every release), so
on CPU it hands ``torch.distributed.all_to_all_single`` tensors, which that function's binding refuses;
inside the block it receives them as lists of ints, which is what the CUDA path gives it.
"""
import contextlib

import torch


class _CPUStream:
    """A stream that orders nothing: CPU work already runs in program order."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return event if event is not None else _CPUEvent()

    def synchronize(self):
        pass

    def query(self):
        return True

    def __eq__(self, other):
        return isinstance(other, _CPUStream)

    def __hash__(self):
        return 0


class _CPUEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        pass

    def wait(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True


_STREAM = _CPUStream()
_ANSWERS = {
    "current_device": lambda: "cpu",
    "synchronize": lambda *args, **kwargs: None,
    "Stream": _CPUStream,
    "Event": _CPUEvent,
    "current_stream": lambda *args, **kwargs: _STREAM,
    "default_stream": lambda *args, **kwargs: _STREAM,
    "stream": lambda *args, **kwargs: contextlib.nullcontext(),
}


def _all_to_all_single_with_tensor_splits(real):
    def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None, *args, **kwargs):
        if torch.is_tensor(output_split_sizes):
            output_split_sizes = output_split_sizes.tolist()
        if torch.is_tensor(input_split_sizes):
            input_split_sizes = input_split_sizes.tolist()
        return real(output, input, output_split_sizes, input_split_sizes, *args, **kwargs)

    return all_to_all_single


@contextlib.contextmanager
def cuda_calls_on_cpu():
    """Answer megatron-core's unconditional ``torch.cuda`` calls (listed in the module docstring) for a
    CPU-only torch while the block runs; the real functions are restored after it, also on error."""
    saved = {name: getattr(torch.cuda, name) for name in _ANSWERS}
    real_all_to_all = torch.distributed.all_to_all_single
    for name, answer in _ANSWERS.items():
        setattr(torch.cuda, name, answer)
    torch.distributed.all_to_all_single = _all_to_all_single_with_tensor_splits(real_all_to_all)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.cuda, name, fn)
        torch.distributed.all_to_all_single = real_all_to_all


def typing_override_for_python311():
    """Megatron-LM core_v0.19.0's training code imports ``typing.override`` (Python 3.12+); on 3.11
    give it ``typing_extensions.override`` (the same decorator, a no-op at run time). For the
    Megatron-LM tests only, inside their rank processes."""
    import typing

    if not hasattr(typing, "override"):
        import typing_extensions

        typing.override = typing_extensions.override
