"""Row permutations whose backward is a gather too.

``x[index]`` differentiates into a scatter-add (``index_put_`` with accumulation), which on CPU costs
several times a gather; for a permutation the gradient is just the inverse gather.
"""
from __future__ import annotations

import torch


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, index, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


class Permutation:
    """A permutation of n rows: ``apply(x) = x[index]`` and ``undo(y) = y[inverse]``, both differentiable.

    index: LongTensor[n], a permutation of ``0 … n-1`` (not checked).
    """

    def __init__(self, index: torch.Tensor):
        self.index = index
        self.inverse = torch.empty_like(index)
        self.inverse[index] = torch.arange(index.numel(), device=index.device)

    @classmethod
    def sorting(cls, keys: torch.Tensor) -> "Permutation":
        """The stable sort of ``keys`` [n]: ``apply`` puts rows in increasing key order."""
        return cls(torch.argsort(keys, stable=True))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return _Gather.apply(x, self.index, self.inverse)

    def undo(self, y: torch.Tensor) -> torch.Tensor:
        return _Gather.apply(y, self.inverse, self.index)
