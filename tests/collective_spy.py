"""A spy on torch.distributed: records every collective called while installed, independently of the
code under test (which counts its own bytes), so tests can compare the two."""
from __future__ import annotations

import torch
import torch.distributed as dist

COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "all_to_all",
               "all_to_all_single", "all_reduce_coalesced", "reduce", "reduce_scatter", "reduce_scatter_tensor", "gather",
               "scatter", "all_gather_object", "broadcast_object_list", "barrier", "send", "recv", "isend",
               "irecv", "_all_gather_base", "_reduce_scatter_base")


def nbytes(x) -> int:
    """Payload bytes of a tensor or a (nested) list of tensors; 0 for anything else."""
    if torch.is_tensor(x):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(nbytes(t) for t in x)
    return 0


class CollectiveSpy:
    """``with CollectiveSpy() as spy: ...`` then ``spy.calls``: (op, bytes of the first argument, dtype of
    the first argument or None, ranks of the group) per call, and ``spy.bytes()`` their total."""

    def __init__(self, ops=COLLECTIVES):
        self.ops, self.calls, self._orig = ops, [], {}

    def __enter__(self):
        for name in self.ops:
            orig = getattr(dist, name, None)
            if orig is None:
                continue
            self._orig[name] = orig

            def wrapped(*a, _orig=orig, _name=name, **kw):
                first = a[0] if a else next(iter(kw.values()), None)
                group = kw.get("group")
                ranks = (tuple(dist.get_process_group_ranks(group)) if group is not None
                         else tuple(range(dist.get_world_size())))
                self.calls.append((_name, nbytes(first), first.dtype if torch.is_tensor(first) else None, ranks))
                return _orig(*a, **kw)
            setattr(dist, name, wrapped)
        return self

    def __exit__(self, *exc):
        for name, orig in self._orig.items():
            setattr(dist, name, orig)

    def bytes(self) -> int:
        return sum(c[1] for c in self.calls)
