"""Validation and normalisation of assignment inputs, shared by every solver.

The rule for non-finite scores (documented once, used everywhere): with ``lo``/``hi`` the smallest and
largest finite score and ``gap = (hi - lo) + 1`` (``gap = 1`` if no score is finite),

* ``+inf`` is scored as ``hi + gap`` (better than any finite score),
* ``-inf`` is scored as ``lo - gap`` (worse than any finite score),
* ``NaN``  is scored as ``lo - 2 * gap`` (worse than everything else).

(If a finite score is within a factor 16 of the dtype's largest value, all scores are first divided by
the largest finite magnitude so that these substitutes stay finite.)

Scores whose largest finite magnitude is above 1e20 or below 1e-20 are solved divided by that
magnitude (a positive scale does not change the optimal assignment), so differences never overflow.

Balance is a hard constraint, so an expert whose column is all ``-inf`` still receives its share: the
solver simply prefers every finite alternative first. Objectives and certificates are reported on the
substituted scores.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch

CapacityLike = Union[torch.Tensor, Sequence[int], None]


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64, int32 and int64 scores are solved in float64 (exact for integers below 2**53),
    every other real dtype in float32."""
    return torch.float64 if dtype in (torch.float64, torch.int32, torch.int64) else torch.float32


def check_scores(scores: torch.Tensor) -> None:
    """Raise ValueError unless ``scores`` is a real 2-D tensor ``[tokens, experts]`` with experts >= 1."""
    if not isinstance(scores, torch.Tensor):
        raise ValueError(f"scores must be a torch.Tensor of shape [tokens, experts], got {type(scores).__name__}")
    if scores.dim() != 2:
        raise ValueError(f"scores must have shape [tokens, experts], got shape {tuple(scores.shape)}")
    if scores.shape[1] < 1:
        raise ValueError(f"scores must have at least one expert column, got shape {tuple(scores.shape)}")
    if scores.is_complex() or scores.dtype == torch.bool:
        raise ValueError(f"scores must be real numbers, got dtype {scores.dtype}")


def finite_scores(scores: torch.Tensor) -> torch.Tensor:
    """Return ``scores`` in the working dtype with non-finite values replaced by the module's rule."""
    s = scores.to(working_dtype(scores.dtype))
    if s.numel() == 0 or bool(torch.isfinite(torch.stack(torch.aminmax(s))).all()):
        return s  # min and max are finite (NaN propagates into both): one reduction, one host sync
    finite = torch.isfinite(s)
    big = torch.finfo(s.dtype).max
    lo = torch.where(finite, s, big).amin()
    hi = torch.where(finite, s, -big).amax()
    if not bool(finite.any()):
        lo = hi = torch.zeros((), dtype=s.dtype, device=s.device)
    if bool(torch.maximum(hi.abs(), lo.abs()) > big / 16):  # keep the substitutes finite
        scale = torch.maximum(hi.abs(), lo.abs())
        s, lo, hi = s / scale, lo / scale, hi / scale
    gap = (hi - lo) + 1
    s = torch.where(s == float("inf"), hi + gap, s)
    s = torch.where(s == float("-inf"), lo - gap, s)
    return torch.where(torch.isnan(s), lo - 2 * gap, s)


def default_capacity(num_tokens: int, num_experts: int, device=None) -> torch.Tensor:
    """As equal as possible: every expert gets ``N // E`` tokens and the first ``N % E`` one more."""
    cap = torch.full((num_experts,), num_tokens // num_experts, dtype=torch.long, device=device)
    cap[: num_tokens % num_experts] += 1
    return cap


def resolve_capacity(capacity: CapacityLike, num_tokens: int, num_experts: int, device) -> torch.Tensor:
    """Return capacities as a LongTensor[E] on ``device``; ValueError if they are not E
    non-negative integers summing to the number of tokens."""
    if capacity is None:
        return default_capacity(num_tokens, num_experts, device)
    cap = torch.as_tensor(capacity, device=device)
    if cap.is_floating_point():
        if not bool((cap == cap.round()).all()):
            raise ValueError(f"capacity must hold whole numbers, got {cap.tolist()}")
    elif cap.dtype == torch.bool or cap.is_complex():
        raise ValueError(f"capacity must be integers, got dtype {cap.dtype}")
    cap = cap.to(torch.long)
    if cap.shape != (num_experts,):
        raise ValueError(f"capacity must have shape [{num_experts}] (one entry per expert), got {tuple(cap.shape)}")
    if bool((cap < 0).any()):
        raise ValueError(f"capacity must be non-negative, got {cap.tolist()}")
    total = int(cap.sum())
    if total != num_tokens:
        raise ValueError(f"capacity must sum to the number of tokens ({num_tokens}), got sum {total}")
    return cap
