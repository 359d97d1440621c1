"""Collective calls of the optimizers, with byte accounting.

Every collective the optimizers in :mod:`base_plugin.optim` issue goes through a :class:`CountingComm`.
It calls ``torch.distributed`` (looked up at call time) on the given process group and records, per
call, the payload it handed over: ``tensor.numel() * tensor.element_size()`` of the tensor actually
passed. Nothing is estimated from a formula; what is counted is exactly what was given to the
collective. (The wire traffic of a ring all-reduce is ``2 (W - 1) / W`` times its payload per rank;
that factor is the same for every optimizer here, so payload bytes compare them fairly.)

A process group of size 1 (or no initialised ``torch.distributed``) is never called: the collective is
the identity and counts zero bytes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist


def group_size(group) -> int:
    """World size of ``group`` (``None`` = default group); 1 when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


@dataclass
class CommStats:
    """Bytes handed to collectives by one optimizer (payload, per rank).

    ``total_bytes`` / ``total_calls`` since construction; ``last_step_bytes`` for the latest completed
    step; ``by_kind`` splits the total by purpose (``"grad"``: dense gradient averaging, ``"moment"``:
    sparse first-moment averaging, ``"param"``: periodic parameter averaging, ``"broadcast"``: initial
    parameter broadcast); ``steps`` counts completed steps.
    """

    total_bytes: int = 0
    total_calls: int = 0
    steps: int = 0
    last_step_bytes: int = 0
    by_kind: dict = field(default_factory=dict)

    @property
    def bytes_per_step(self) -> float:
        """Average payload bytes per completed step."""
        return self.total_bytes / self.steps if self.steps else 0.0

    def as_dict(self) -> dict:
        return dict(total_bytes=self.total_bytes, total_calls=self.total_calls, steps=self.steps,
                    last_step_bytes=self.last_step_bytes, bytes_per_step=self.bytes_per_step,
                    by_kind=dict(self.by_kind))


class CountingComm:
    """Thin wrapper over ``torch.distributed`` collectives that records the bytes each call moves."""

    def __init__(self):
        self.stats = CommStats()
        self._step_bytes = 0

    def _record(self, tensor: torch.Tensor, kind: str) -> None:
        n = tensor.numel() * tensor.element_size()
        self.stats.total_bytes += n
        self.stats.total_calls += 1
        self.stats.by_kind[kind] = self.stats.by_kind.get(kind, 0) + n
        self._step_bytes += n

    def all_reduce_mean_(self, tensor: torch.Tensor, group, kind: str) -> torch.Tensor:
        """In place: ``tensor`` ← mean over ``group`` (SUM all-reduce, then divide; gloo has no AVG)."""
        w = group_size(group)
        if w == 1 or tensor.numel() == 0:
            return tensor
        self._record(tensor, kind)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
        tensor.div_(w)
        return tensor

    def broadcast_(self, tensor: torch.Tensor, group, kind: str = "broadcast") -> torch.Tensor:
        """In place: ``tensor`` ← the value held by the group's first rank."""
        if group_size(group) == 1 or tensor.numel() == 0:
            return tensor
        self._record(tensor, kind)
        src = dist.get_global_rank(group, 0) if group is not None else 0
        dist.broadcast(tensor, src=src, group=group)
        return tensor

    def end_step(self) -> None:
        self.stats.steps += 1
        self.stats.last_step_bytes = self._step_bytes
        self._step_bytes = 0


def allreduce_gradients_(params, comm: CountingComm, group=None) -> None:
    """Average ``.grad`` of ``params`` over ``group`` in one flat all-reduce (the DDP baseline).

    Used by benchmarks to give a plain optimizer (e.g. AdamW) dense data parallelism through the same
    byte accounting; call ``comm.end_step()`` after each step.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or group_size(group) == 1:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    comm.all_reduce_mean_(flat, group, "grad")
    off = 0
    for g in grads:
        g.copy_(flat[off:off + g.numel()].view_as(g))
        off += g.numel()
