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

import math
import numbers
from typing import Optional, Sequence, Union

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


def finite_scores_with_range(scores: torch.Tensor, extra: Optional[torch.Tensor] = None):
    """``(s, lo, hi, extra_values)``: ``finite_scores(scores)``, its smallest and largest value as
    floats, and ``extra`` (a 1-d tensor on the scores' device, or None) read back as a list. One host
    read when every score is finite; a few more otherwise. ``lo = hi = 0`` for an empty matrix."""
    s = scores.to(working_dtype(scores.dtype))
    parts = [] if s.numel() == 0 else [torch.stack(torch.aminmax(s)).double()]
    if extra is not None:
        parts.append(extra.reshape(-1).to(device=s.device, dtype=torch.float64))
    values = torch.cat(parts).tolist() if parts else []
    if s.numel() == 0:
        return s, 0.0, 0.0, values
    lo, hi, rest = values[0], values[1], values[2:]
    if not (math.isfinite(lo) and math.isfinite(hi)):
        s = finite_scores(s)
        lo, hi = torch.stack(torch.aminmax(s)).double().tolist()
    return s, lo, hi, rest


def check_k(k, num_experts: int) -> int:
    """Return ``k`` (experts per token) as an int; ValueError unless it is an integer in 1 .. E."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise ValueError(f"k (experts per token) must be an integer, got {k!r}")
    k = int(k)
    if k < 1:
        raise ValueError(f"k (experts per token) must be at least 1, got {k}")
    if k > num_experts:
        raise ValueError(f"k (experts per token) must be at most the number of experts ({num_experts}), got {k}")
    return k


def default_capacity(num_tokens: int, num_experts: int, device=None, k: int = 1) -> torch.Tensor:
    """As equal as possible: the ``N * k`` token-expert slots split over the E experts, every expert
    getting ``N * k // E`` and the first ``N * k % E`` one more (each at most N when k <= E)."""
    slots = num_tokens * k
    cap = torch.full((num_experts,), slots // num_experts, dtype=torch.long, device=device)
    cap[: slots % num_experts] += 1
    return cap


def resolve_capacity(capacity: CapacityLike, num_tokens: int, num_experts: int, device, k: int = 1) -> torch.Tensor:
    """Return capacities as a LongTensor[E] on ``device``; ValueError unless they are E non-negative
    integers summing to ``N * k``, each at most N when k > 1 (a token cannot take an expert twice)."""
    if capacity is None:
        return default_capacity(num_tokens, num_experts, device, k)
    cap = torch.as_tensor(capacity, device=device)
    if cap.is_floating_point():
        if not bool((cap == cap.round()).all()):
            raise ValueError(f"capacity must hold whole numbers, got {cap.tolist()}")
    elif cap.dtype == torch.bool or cap.is_complex():
        raise ValueError(f"capacity must be integers, got dtype {cap.dtype}")
    cap = cap.to(torch.long)
    if cap.shape != (num_experts,):
        raise ValueError(f"capacity must have shape [{num_experts}] (one entry per expert), got {tuple(cap.shape)}")
    low, total, high = (int(v) for v in torch.stack([cap.amin(), cap.sum(), cap.amax()]).tolist())
    if low < 0:
        raise ValueError(f"capacity must be non-negative, got {cap.tolist()}")
    slots = num_tokens * k
    if total != slots:
        what = "the number of tokens" if k == 1 else f"the number of tokens times k ({num_tokens} * {k})"
        raise ValueError(f"capacity must sum to {what} ({slots}), got sum {total}")
    if high > num_tokens:
        raise ValueError(f"capacity cannot be met: an expert can take at most the {num_tokens} tokens (a token "
                         f"cannot take an expert twice), got capacities {cap.tolist()}")
    return cap
