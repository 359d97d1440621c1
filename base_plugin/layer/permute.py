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


class _GatherRepeated(torch.autograd.Function):
    """out[j] = x[index[j] // k]: every row of x repeated k times, then permuted; the gradient of a
    row is the sum over its k copies (a gather and a reshape-sum, no scatter)."""

    @staticmethod
    def forward(ctx, x, index, inverse, k):
        ctx.save_for_backward(inverse)
        ctx.k = k
        return x.index_select(0, torch.div(index, k, rounding_mode="floor"))

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        slots = grad.index_select(0, inverse)
        return slots.view(-1, ctx.k, *grad.shape[1:]).sum(1), None, None, None


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

    def apply(self, x: torch.Tensor, repeat: int = 1) -> torch.Tensor:
        """``x[index]``; with ``repeat=k`` the permutation is of the n = k·m slots of x's m rows (row i
        owns slots ``i·k … i·k + k − 1``): returns ``x.repeat_interleave(k, 0)[index]`` without
        building the repeated copy, and its backward sums each row's k slot gradients."""
        if repeat == 1:
            return _Gather.apply(x, self.index, self.inverse)
        return _GatherRepeated.apply(x, self.index, self.inverse, repeat)

    def undo(self, y: torch.Tensor) -> torch.Tensor:
        return _Gather.apply(y, self.inverse, self.index)
