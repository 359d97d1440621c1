"""Exact balanced assignment of tokens to experts (a transportation problem with E sinks).

    maximise  sum_t scores[t, a[t]]   subject to   #{t : a[t] = e} = capacity[e]  for every expert e.

The LP relaxation is integral, and its dual has only E variables, the expert prices p:

    D(p) = sum_t max_e (scores[t, e] - p[e]) + sum_e capacity[e] * p[e]  >=  optimum.

An assignment in which every token sits at a best expert of ``scores[t] - p`` and every expert holds
exactly its capacity is optimal, with D(p) equal to its objective (complementary slackness). The solver
works in that dual:

1. *Price search* (a few damped Newton steps over the whole matrix): prices are moved so that the
   argmax counts approach the capacities. The Jacobian of the counts is the Laplacian of the
   "boundary" graph: tokens whose best and second-best experts (a, b) are close tie a to b.
2. *Working set*: only tokens whose margin (best minus second-best) is small can change expert from
   here on; the rest are fixed at their argmax and their counts subtracted from the capacities.
3. *Exact repair* on the working set, starting from its argmax assignment (optimal for the counts it
   has): primal-dual phases of successive shortest paths on the E-node expert graph, where moving a
   token t from expert e to f costs (r[t,e] - r[t,f]) with r = scores - p. Each phase computes
   shortest-path prices (Bellman-Ford, vectorised over E x E) and moves one token along every tree
   path it can from an over-full to an under-full expert. Every move keeps every token at a best
   expert, so the final assignment is exactly optimal.
4. A fixed token stays optimal if its expert's price rose by less than its margin above the
   least-raised price; tokens for which that fails join the working set and the repair goes on.

The answer is certified by :attr:`AssignmentResult.gap` = D(p) - objective (zero up to round-off).
All work is done with torch tensor operations on the input's device (CPU or CUDA, same code).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from .inputs import CapacityLike, check_scores, finite_scores, resolve_capacity


class AssignmentError(RuntimeError):
    """The solver hit an iteration bound. Never expected; raised instead of looping forever."""


@dataclass
class AssignmentResult:
    """What :func:`solve_balanced_assignment` found.

    experts:  LongTensor[N], the expert of each token; expert e holds exactly ``capacity[e]`` tokens.
    prices:   Tensor[E] (float32, or float64 for float64 scores), dual prices certifying optimality.
    capacity: LongTensor[E].
    scores:   the scores the problem was solved on (after the non-finite rule), in the working dtype.
    info:     how the solve went (python ints): ``newton_steps``, ``working_set`` (tokens in the last
              exact repair), ``repair_phases``, ``rounds`` (working-set rounds, torch path) and, from
              the CPU kernel, ``price_search_us`` / ``repair_us`` (its own wall-clock split).
    """

    experts: torch.Tensor
    prices: torch.Tensor
    capacity: torch.Tensor
    scores: torch.Tensor
    info: Dict[str, int] = field(default_factory=dict)

    @property
    def objective(self) -> torch.Tensor:
        """0-d tensor: sum_t scores[t, experts[t]]."""
        return self.scores.gather(1, self.experts[:, None]).sum()

    @property
    def dual_bound(self) -> torch.Tensor:
        """0-d tensor: D(prices) >= the optimum of the problem."""
        if self.scores.shape[0] == 0:
            return (self.capacity.to(self.prices.dtype) * self.prices).sum()
        best = (self.scores - self.prices).amax(1)
        return best.sum() + (self.capacity.to(self.prices.dtype) * self.prices).sum()

    @property
    def gap(self) -> torch.Tensor:
        """Certificate: dual_bound - objective. Zero up to float round-off for an optimal answer;
        an upper bound on how far ``objective`` can be below the optimum in any case."""
        return self.dual_bound - self.objective


# Tuning constants, chosen by measurement (benchmarks/assignment.py).
_NEWTON_STEPS = 6            # at most this many price-search steps over the whole matrix
_NEWTON_PROGRESS = 0.75      # ... continued while each step cuts the over-full count below this ratio
_BOUNDARY_PER_EXPERT = 8     # Jacobian: the tokens of smallest margin, at least this many per expert
_BOUNDARY_PER_UNIT = 8       # ... and this many per over-full unit
_DAMPING = 0.3               # Levenberg-Marquardt damping of the Jacobian's diagonal
_WORKING_PER_UNIT = 16       # working set: this many tokens per over-full unit ...
_WORKING_PER_EXPERT = 4      # ... and at least this many per expert


def solve_balanced_assignment(scores: torch.Tensor, capacity: CapacityLike = None, *,
                              prices: Optional[torch.Tensor] = None, backend: str = "auto") -> AssignmentResult:
    """Solve the balanced assignment exactly and return the assignment with its dual certificate.

    scores:   Tensor[N, E] of any real dtype, on any device. float64, int32 and int64 are solved in
              float64, everything else in float32. Non-finite values follow the rule of
              :mod:`base_plugin.assignment.inputs`.
    capacity: LongTensor[E] / sequence of E non-negative ints summing to N, or None for
              ``default_capacity(N, E)`` (N // E each, the first N % E experts one more).
    prices:   optional Tensor[E], prices to start from (e.g. the previous batch's ``result.prices``);
              every start reaches an optimum, a good one sooner.
    backend:  "auto" (the compiled CPU kernel for CPU tensors when it was built, else torch),
              "torch" (the pure-torch path, any device) or "kernel" (the CPU kernel; RuntimeError if
              it was not built, ValueError for a non-CPU tensor).

    Raises ValueError for a bad shape, capacity, prices or backend; deterministic for a given input.
    """
    check_scores(scores)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    n, e = scores.shape
    cap = resolve_capacity(capacity, n, e, scores.device)
    s = finite_scores(scores)
    info = dict(newton_steps=0, working_set=0, repair_phases=0, rounds=0)
    p = torch.zeros(e, dtype=s.dtype, device=s.device) if prices is None else _check_prices(prices, e, s)
    if n == 0 or e == 1:
        return AssignmentResult(torch.zeros(n, dtype=torch.long, device=s.device), p, cap, s, info)
    lo, hi = torch.aminmax(s)
    span = float(hi - lo)  # optimal prices never need to differ by more than this
    scale = torch.maximum(lo.abs(), hi.abs())
    if bool((scale > 1e-20) & (scale < 1e20)):
        scale = None  # differences of these scores cannot overflow or vanish
    else:
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    work, p_work = (s, p) if scale is None else (s / scale, p / scale)
    if scale is not None:
        span = span / float(scale)
    if _use_kernel(backend, s):
        a, p_work = _solve_kernel(work, cap, p_work, span, info)
    else:
        a, p_work = _solve(work.t().contiguous(), cap, p_work, span, info)
    return AssignmentResult(a, p_work if scale is None else p_work * scale, cap, s, info)


def balanced_assignment(scores: torch.Tensor, capacity: CapacityLike = None, *,
                        prices: Optional[torch.Tensor] = None, backend: str = "auto") -> torch.Tensor:
    """``LongTensor[N]``: the expert of each token of ``scores[N, E]`` maximising
    ``sum_t scores[t, a[t]]`` with expert e receiving exactly ``capacity[e]`` tokens (default: as equal
    as possible). Exact; see :func:`solve_balanced_assignment` for the options, rules and certificate."""
    return solve_balanced_assignment(scores, capacity, prices=prices, backend=backend).experts


BACKENDS = ("auto", "torch", "kernel")

try:  # built by setup.py when a C++ compiler is present; optional
    from . import _cpu_kernel
except ImportError:  # pragma: no cover - depends on the install
    _cpu_kernel = None


def kernel_available() -> bool:
    """Whether the compiled CPU kernel was built with this install."""
    return _cpu_kernel is not None


def _use_kernel(backend: str, s: torch.Tensor) -> bool:
    if backend == "torch":
        return False
    if backend == "kernel":
        if _cpu_kernel is None:
            raise RuntimeError("backend='kernel': the CPU kernel was not built (reinstall with a C++ compiler)")
        if s.device.type != "cpu":
            raise ValueError(f"backend='kernel' runs on CPU tensors, got a tensor on {s.device}")
        return True
    return _cpu_kernel is not None and s.device.type == "cpu"


def _solve_kernel(s: torch.Tensor, cap: torch.Tensor, p: torch.Tensor, span: float,
                  info: Dict[str, int]) -> Tuple[torch.Tensor, torch.Tensor]:
    s = s.contiguous()
    cap = cap.contiguous()
    a = torch.empty(s.shape[0], dtype=torch.long)
    p = p.clone().contiguous()
    steps, phases, working, search_us, repair_us = _cpu_kernel.solve(
        s.data_ptr(), s.shape[0], s.shape[1], cap.data_ptr(), a.data_ptr(), p.data_ptr(),
        s.dtype == torch.float64, torch.get_num_threads(), span)
    info.update(newton_steps=steps, working_set=working, repair_phases=phases,
                price_search_us=int(search_us), repair_us=int(repair_us))
    return a, p


def _check_prices(prices, e: int, s: torch.Tensor) -> torch.Tensor:
    p = torch.as_tensor(prices, device=s.device).to(s.dtype)
    if p.shape != (e,):
        raise ValueError(f"prices must have shape [{e}] (one per expert), got {tuple(p.shape)}")
    if not bool(torch.isfinite(p).all()):
        raise ValueError("prices must be finite")
    return p


# ----------------------------------------------------------------------------------------------------
# internals; st is the transposed score matrix [E, N] (contiguous: reductions over experts are then
# element-wise over rows, much faster than reducing the short rows of [N, E]).

def _best_and_margin(st: torch.Tensor, p: torch.Tensor):
    """For r = st - p: the 0/1 indicator of best experts [E, N] (several on a tie), counts per expert
    (a tied token counted at each of its best experts) and margin = best - second best (0 on ties)."""
    r = st - p[:, None]
    best = r.amax(0)
    ind = (r - best).sign_().add_(1)
    second = r.sub_(ind, alpha=torch.finfo(st.dtype).max).amax(0)
    margin = torch.where(ind.sum(0) > 1, 0.0, best - second)
    return ind, ind.sum(1), margin


def _excess(counts: torch.Tensor, cap: torch.Tensor) -> int:
    return int((counts - cap).clamp(min=0).sum())


def _newton_step(st, p, cap, counts, margin, excess, span):
    """Damped Newton step on the counts: solve L dp = counts - cap, L the Laplacian of the boundary
    graph (an edge a-b for each token whose best and second-best experts are a and b, weighted by a
    kernel of its margin), estimated from the tokens of smallest margin. None if it cannot be formed."""
    e, n = st.shape
    k = min(n // 2, max(_BOUNDARY_PER_EXPERT * e, _BOUNDARY_PER_UNIT * excess))
    if k < 2:
        return None
    m, idx = torch.topk(margin, k, largest=False)
    tau = m[-1]
    if not bool(tau > 0):
        return None
    top = torch.topk(st.index_select(1, idx) - p[:, None], 2, dim=0).indices  # [2, k]
    w = torch.exp(-m / tau) / tau
    one_a = torch.nn.functional.one_hot(top[0], e).to(st.dtype)
    one_b = torch.nn.functional.one_hot(top[1], e).to(st.dtype)
    h = (one_a * w[:, None]).t() @ one_b  # a matmul, not index_add: deterministic on every device
    h = h + h.t()
    deg = h.sum(1)
    lap = torch.diag(deg * (1 + _DAMPING)) - h
    lap.diagonal().add_(1e-6 * deg.mean() + 1e-30)
    dp, info = torch.linalg.solve_ex(lap, (counts - cap).to(st.dtype))
    if int(info) != 0 or not bool(torch.isfinite(dp).all()):
        return None
    dp = dp - dp.mean()
    # a near-disconnected boundary graph gives huge steps; optimal prices never differ by more than span
    return p + dp * min(1.0, span / max(float(dp.abs().amax()), 1e-300))


def _solve(st: torch.Tensor, cap: torch.Tensor, p: torch.Tensor, span: float,
           info: Dict[str, int]) -> Tuple[torch.Tensor, torch.Tensor]:
    e, n = st.shape
    ind, counts, margin = _best_and_margin(st, p)
    excess = _excess(counts, cap)
    # 1. price search on the whole matrix (a rejected step is retried once at half length)
    for _ in range(_NEWTON_STEPS):
        if excess == 0:
            break
        q = _newton_step(st, p, cap, counts, margin, excess, span)
        if q is None:
            break
        for q in (q, (p + q) / 2):
            q_ind, q_counts, q_margin = _best_and_margin(st, q)
            q_excess = _excess(q_counts, cap)
            if q_excess < excess:
                break
        if q_excess >= excess:
            break
        progress = q_excess / excess
        info["newton_steps"] += 1
        p, ind, counts, margin, excess = q, q_ind, q_counts, q_margin, q_excess
        if progress > _NEWTON_PROGRESS:
            break
    iota = torch.arange(e, dtype=st.dtype, device=st.device)
    # 2. working set: the tokens of smallest margin, plus enough of every over-full expert's tokens that
    #    it can shed its excess; everybody else stays at its (unique) best expert for now
    fixed_a = (iota @ ind).round_().to(torch.long)  # exact wherever margin > 0
    size = min(n, max(_WORKING_PER_UNIT * excess, _WORKING_PER_EXPERT * e))
    work = margin <= torch.kthvalue(margin, size).values
    fixed_a = torch.where(work, 0, fixed_a)  # (tied tokens' sums of indices are not experts)
    fixed_counts = torch.bincount(fixed_a[~work], minlength=e)
    take = (fixed_counts - cap + _WORKING_PER_EXPERT).clamp(min=0) * (fixed_counts > cap)
    if bool(take.any()):
        order = torch.argsort(torch.where(work, torch.finfo(st.dtype).max, margin), stable=True)
        order = order[torch.argsort(fixed_a[order], stable=True)]  # by expert, then by margin
        start = torch.cumsum(torch.bincount(fixed_a, minlength=e), 0) - torch.bincount(fixed_a, minlength=e)
        rank = torch.arange(n, device=st.device) - start[fixed_a[order]]
        work[order[rank < take[fixed_a[order]]]] = True
    p_routed = p
    for _ in range(n + 1):
        widx = work.nonzero().squeeze(1)
        sub_cap = cap - torch.bincount(fixed_a[~work], minlength=e)
        info["rounds"] += 1
        # 3. exact repair of the working set
        a_work, p = _repair(st.index_select(1, widx), sub_cap, p, info)
        # 4. a fixed token t keeps its best expert a[t] while the prices moved (since routing) by d
        #    with d[a[t]] - min(d) < margin[t]; the others join the working set and the repair goes on
        moved = p - p_routed
        stale = ~work & (moved[fixed_a] - moved.amin() >= margin)
        if not bool(stale.any()):
            fixed_a[widx] = a_work
            return fixed_a, p
        work |= stale
    raise AssignmentError("exact balanced assignment: the working set did not settle")


def _repair(st: torch.Tensor, cap: torch.Tensor, p: torch.Tensor,
            info: Dict[str, int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact solve of the problem on st [E, M] with capacities cap, from the argmax assignment under
    prices p, by primal-dual shortest-path phases on the expert graph. Returns (assignment, prices)."""
    e, m = st.shape
    dev, dt = st.device, st.dtype
    inf = float("inf")
    info["working_set"] = m
    a = (st - p[:, None]).argmax(0)
    cols = a[None, :].expand(e, m)
    for _ in range(m + 2):  # each phase moves at least one token towards balance
        diff = (torch.bincount(a, minlength=e) - cap).tolist()
        if all(x <= 0 for x in diff):
            return a, p
        info["repair_phases"] += 1
        r = st - p[:, None]
        # [E, M]: cost[f, t] of moving token t to expert f; >= 0 as every token sits at a best expert
        # (clamped: round-off in the price updates must not create negative cycles)
        cost = (r.gather(0, a[None, :]) - r).clamp_(min=0)
        w = torch.full((e, e), inf, dtype=dt, device=dev)
        w.scatter_reduce_(1, cols, cost, "amin")  # w[f, g] = cheapest move of a token of g to f
        w = w.t().contiguous()
        dist = torch.tensor([0.0 if x > 0 else inf for x in diff], dtype=dt, device=dev)
        pred = torch.full((e,), -1, dtype=torch.long, device=dev)
        check = 1
        for it in range(1, e + 1):  # Bellman-Ford; relaxing after convergence changes nothing, so the
            cand, arg = (dist[:, None] + w).min(0)  # host (a GPU sync) asks only at 1, 2, 4, 8, ...
            better = cand < dist
            dist = torch.where(better, cand, dist)
            pred = torch.where(better, arg, pred)
            if it == check:
                if not bool(better.any()):
                    break
                check *= 2
        # the token that realises each tree edge pred[f] -> f
        tok = torch.where(a[None, :] == pred[:, None], cost, inf).argmin(1)
        p = p - dist
        pred_tok = torch.cat([pred, tok]).tolist()
        moves = _pack_paths(diff, pred_tok[:e], pred_tok[e:], dist.tolist())
        if not moves:
            raise AssignmentError("exact balanced assignment made no progress (non-finite scores?)")
        ti = torch.tensor([t for t, _ in moves], device=dev)
        fi = torch.tensor([f for _, f in moves], device=dev)
        a = a.index_put((ti,), fi)
        cols = a[None, :].expand(e, m)
    raise AssignmentError("exact balanced assignment exceeded its phase bound")


def _pack_paths(diff: List[int], pred: List[int], tok: List[int], dist: List[float]) -> List[Tuple[int, int]]:
    """Vertex-disjoint shortest-path-tree paths from over-full to under-full experts, nearest first;
    returns the token moves (token, new expert) along them. Each tree edge is used once, each token once."""
    used_tokens, used_nodes, moves = set(), set(), []
    for f in sorted((f for f, x in enumerate(diff) if x < 0), key=lambda f: dist[f]):
        if dist[f] == float("inf"):
            continue
        path, x, seen = [], f, set()
        while pred[x] >= 0 and x not in used_nodes and tok[x] not in used_tokens and x not in seen:
            seen.add(x)
            path.append((tok[x], x))
            x = pred[x]
        if pred[x] >= 0 or diff[x] <= 0:
            continue
        moves.extend(path)
        used_tokens.update(t for t, _ in path)
        used_nodes.update(q for _, q in path)
        diff[x] -= 1
        diff[f] += 1
    return moves
