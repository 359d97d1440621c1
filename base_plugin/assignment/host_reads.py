"""Counting host reads: every read of a tensor's value on the host (``bool()``, ``int()``, ``float()``,
``.item()``, ``.tolist()``, ``.cpu()``) is, for a CUDA tensor, a synchronisation that waits for the
device's queue to drain. Counted on any device (on CPU they cost nothing, but the count is the one a
GPU would see), so the bound on the torch path is testable without a GPU.

    count_host_reads(fn) -> (reads, fn's return value)
"""
from __future__ import annotations

import threading

import torch

_READS = ("__bool__", "item", "tolist", "__float__", "__int__", "__index__", "cpu")
_lock = threading.Lock()


def count_host_reads(fn):
    """Run ``fn()`` and return ``(number of host reads of tensor values it made, its result)``.
    Not re-entrant and not thread-safe with other torch work (it patches ``torch.Tensor``'s readers
    for the duration of the call)."""
    count = 0

    def counting(orig):
        def read(self, *args, **kwargs):
            nonlocal count
            count += 1
            return orig(self, *args, **kwargs)
        return read

    with _lock:
        saved = {name: getattr(torch.Tensor, name) for name in _READS}
        for name, orig in saved.items():
            setattr(torch.Tensor, name, counting(orig))
        try:
            result = fn()
        finally:
            for name, orig in saved.items():
                setattr(torch.Tensor, name, orig)
    return count, result
