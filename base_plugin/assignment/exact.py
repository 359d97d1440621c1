"""Exact balanced assignment (v0: argmax start + successive shortest paths on the expert graph)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .inputs import CapacityLike, check_scores, finite_scores, resolve_capacity


class AssignmentError(RuntimeError):
    """The solver hit its iteration bound (never expected; reported instead of looping forever)."""


@dataclass
class AssignmentResult:
    """What :func:`solve_balanced_assignment` found.

    experts:    LongTensor[N], the expert of each token; expert e holds exactly capacity[e] tokens.
    prices:     Tensor[E], dual prices p of the experts (working dtype).
    capacity:   LongTensor[E].
    objective:  0-d tensor, sum_t scores[t, experts[t]] (after the non-finite rule).
    dual_bound: 0-d tensor, D(p) = sum_t max_e(scores[t, e] - p[e]) + sum_e capacity[e] * p[e] >= optimum.
    """

    experts: torch.Tensor
    prices: torch.Tensor
    capacity: torch.Tensor
    objective: torch.Tensor
    dual_bound: torch.Tensor

    @property
    def gap(self) -> torch.Tensor:
        """Certificate: dual_bound - objective >= 0; zero up to float round-off when optimal."""
        return self.dual_bound - self.objective


def solve_balanced_assignment(scores: torch.Tensor, capacity: CapacityLike = None) -> AssignmentResult:
    check_scores(scores)
    n, e = scores.shape
    cap = resolve_capacity(capacity, n, e, scores.device)
    s = finite_scores(scores)
    st = s.t().contiguous()
    if n == 0 or e == 1:
        a = torch.zeros(n, dtype=torch.long, device=s.device)
        p = torch.zeros(e, dtype=s.dtype, device=s.device)
    else:
        p = torch.zeros(e, dtype=s.dtype, device=s.device)
        a = (st - p[:, None]).argmax(0)
        a, p = _repair(st, cap, a, p)
    objective = s.gather(1, a[:, None]).sum()
    dual = (st - p[:, None]).amax(0).sum() + (cap.to(s.dtype) * p).sum()
    return AssignmentResult(a, p, cap, objective, dual)


def balanced_assignment(scores: torch.Tensor, capacity: CapacityLike = None) -> torch.Tensor:
    """``LongTensor[N]``: the expert of each token maximising ``sum_t scores[t, a[t]]`` subject to
    expert e receiving exactly ``capacity[e]`` tokens (default: as equal as possible)."""
    return solve_balanced_assignment(scores, capacity).experts


def _repair(st, cap, a, p):
    e_count, n = st.shape
    inf = torch.tensor(float("inf"), dtype=st.dtype, device=st.device)
    for _ in range(n + 1):
        counts = torch.bincount(a, minlength=e_count)
        excess = counts > cap
        if not bool(excess.any()):
            return a, p
        r = st - p[:, None]
        d = r.gather(0, a[None, :]) - r
        w = torch.full((e_count, e_count), float("inf"), dtype=st.dtype, device=st.device)
        w.scatter_reduce_(1, a[None, :].expand(e_count, n), d, "amin")
        w = w.t()
        dist = torch.where(excess, 0.0, inf)
        pred = torch.full((e_count,), -1, dtype=torch.long, device=st.device)
        for _ in range(e_count):
            cand, arg = (dist[:, None] + w).min(0)
            better = cand < dist
            if not bool(better.any()):
                break
            dist = torch.where(better, cand, dist)
            pred = torch.where(better, arg, pred)
        deficit = counts < cap
        target_dist = torch.where(deficit, dist, inf)
        f = int(target_dist.argmin())
        t_dist = dist[f]
        while not bool(excess[f]):
            e = int(pred[f])
            members = a == e
            tok = int(torch.where(members, d[f], inf).argmin())
            a[tok] = f
            f = e
        p = p - torch.minimum(dist, t_dist)
    raise AssignmentError("exact balanced assignment did not converge")
