"""Exact balanced (top-k) assignment of tokens to experts: a b-matching / transportation problem.

    maximise  sum_t sum_{e in S_t} scores[t, e]   subject to   |S_t| = k distinct experts per token,
                                                               #{t : e in S_t} = capacity[e] per expert.

The LP relaxation is integral (a bipartite b-matching), and after eliminating the per-token duals its
dual has only E variables, the expert prices p:

    D(p) = sum_t (sum of the k largest of scores[t, :] - p) + sum_e capacity[e] * p[e]  >=  optimum.

(The per-token dual u_t of "k experts" and the bounds x <= 1 give min_u k*u + sum_e (r_e - u)^+, which
is the sum of the k largest r_e.) An assignment in which every token holds a top-k set of
``scores[t] - p`` and every expert holds exactly its capacity is optimal, with D(p) equal to its
objective (complementary slackness). The solver works in that dual:

1. *Price search* (damped Newton steps over the whole matrix): prices are moved so that the top-k
   counts approach the capacities. The Jacobian of the counts is the Laplacian of the "boundary"
   graph: tokens whose k-th and (k+1)-th experts (a, b) are close tie a to b.
2. *Working set*: only tokens whose margin (k-th minus (k+1)-th) is small can change experts from
   here on; the rest keep their top-k set and their counts are subtracted from the capacities.
3. *Exact repair* on the working set, from its top-k sets (optimal for the counts they have):
   primal-dual phases of successive shortest paths on the E-node expert graph, where moving a token's
   slot from expert g to an expert f it does not hold costs r[t,g] - r[t,f] with r = scores - p
   (:mod:`base_plugin.assignment.host_repair`). Every move keeps every token at a top-k set, so the
   final assignment is exactly optimal.
4. A fixed token stays optimal while the prices moved (since it was routed) by d with
   max over its experts of d - min(d) <= its margin; tokens for which that fails join the working set
   and the repair goes on.

Two backends run this one method: the compiled CPU kernel (``_cpu_kernel.cpp``, every step in C++) and
the torch path, for CUDA tensors (and CPU tensors on request): steps 1, 2 and 4 as tensor operations
on the device with fixed budgets and masks (no host read), the small repair on the host, so a solve
reads device values back at most a few times (:mod:`base_plugin.assignment.host_reads` counts them):
once for the score range, once for the working set, and once per round in which some fixed token
went stale.

The answer is certified by :attr:`AssignmentResult.gap` = D(p) - objective (zero up to round-off).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from . import host_repair
from .inputs import CapacityLike, check_k, check_scores, finite_scores_with_range, resolve_capacity


class AssignmentError(RuntimeError):
    """The solver hit an iteration bound. Never expected; raised instead of looping forever."""


@dataclass
class AssignmentResult:
    """What :func:`solve_balanced_assignment` found.

    experts:  LongTensor[N] for k == 1, LongTensor[N, k] for k > 1 (each row k distinct experts,
              ordered by score, highest first, ties by lower expert index); expert e is taken by
              exactly ``capacity[e]`` tokens.
    prices:   Tensor[E] (float32, or float64 for float64 scores), dual prices certifying optimality,
              on the scores' device; a good ``prices=`` start for the next solve of similar scores.
    capacity: LongTensor[E].
    scores:   the scores the problem was solved on (after the non-finite rule), in the working dtype.
    k:        experts per token.
    info:     how the solve went (python ints): ``newton_steps``, ``working_set`` (tokens in the last
              exact repair), ``repair_phases``, ``rounds`` (working-set rounds, torch path) and, from
              the CPU kernel, ``price_search_us`` / ``repair_us`` (its own wall-clock split).
    """

    experts: torch.Tensor
    prices: torch.Tensor
    capacity: torch.Tensor
    scores: torch.Tensor
    info: Dict[str, int] = field(default_factory=dict)
    k: int = 1

    def _held(self) -> torch.Tensor:
        return self.experts if self.experts.dim() == 2 else self.experts[:, None]

    @property
    def objective(self) -> torch.Tensor:
        """0-d tensor: sum over tokens of the scores of their experts."""
        return self.scores.gather(1, self._held()).sum()

    @property
    def dual_bound(self) -> torch.Tensor:
        """0-d tensor: D(prices) >= the optimum of the problem."""
        fixed = (self.capacity.to(self.prices.dtype) * self.prices).sum()
        if self.scores.shape[0] == 0:
            return fixed
        r = self.scores - self.prices
        best = r.amax(1) if self.k == 1 else r.topk(self.k, dim=1).values.sum(1)
        return best.sum() + fixed

    @property
    def gap(self) -> torch.Tensor:
        """Certificate: dual_bound - objective. Zero up to float round-off for an optimal answer;
        an upper bound on how far ``objective`` can be below the optimum in any case."""
        return self.dual_bound - self.objective


# Tuning constants, chosen by measurement (benchmarks/assignment.py).
_NEWTON_STEPS = 6            # price-search steps over the whole matrix (torch path: always this many)
_BOUNDARY_PER_EXPERT = 8     # Jacobian: the tokens of smallest margin, this many per expert
_DAMPING = 0.3               # Levenberg-Marquardt damping of the Jacobian's diagonal
_WORKING_PER_EXPERT = 8      # torch path: the working set holds this many tokens per expert ...
_WORKING_FRACTION = 8       # ... and at least 1/this of the tokens
_STALE_PER_EXPERT = 16      # ... and a stale round adds up to this many per expert (or all stale)


def solve_balanced_assignment(scores: torch.Tensor, capacity: CapacityLike = None, *, k: int = 1,
                              prices: Optional[torch.Tensor] = None, backend: str = "auto") -> AssignmentResult:
    """Solve the balanced top-k assignment exactly and return it with its dual certificate.

    scores:   Tensor[N, E] of any real dtype, on any device. float64, int32 and int64 are solved in
              float64, everything else in float32. Non-finite values follow the rule of
              :mod:`base_plugin.assignment.inputs`.
    capacity: LongTensor[E] / sequence of E non-negative ints summing to N * k, each at most N, or
              None for ``default_capacity(N, E, k=k)`` (as even as possible).
    k:        experts per token, an int in 1 .. E. ``experts`` is LongTensor[N] for k == 1 and
              LongTensor[N, k] for k > 1.
    prices:   optional Tensor[E], prices to start from (e.g. the previous step's ``result.prices``);
              every start reaches an optimum, a good one sooner.
    backend:  "auto" (the compiled CPU kernel for CPU tensors when it was built, else torch),
              "torch" (the torch path, any device: the one CUDA tensors take) or "kernel" (the CPU
              kernel; RuntimeError if it was not built, ValueError for a non-CPU tensor).

    Raises ValueError for a bad shape, k, capacity, prices or backend; deterministic for a given input.
    """
    check_scores(scores)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    n, e = scores.shape
    k = check_k(k, e)
    cap = resolve_capacity(capacity, n, e, scores.device, k)
    p = None if prices is None else _as_prices(prices, e, scores)
    # one host read: the score range (and whether the given prices are finite)
    s, lo, hi, flags = finite_scores_with_range(scores, None if p is None else torch.isfinite(p).all()[None])
    if flags and not flags[0]:
        raise ValueError("prices must be finite")
    p = torch.zeros(e, dtype=s.dtype, device=s.device) if p is None else p.to(s.dtype)
    info = dict(newton_steps=0, working_set=0, repair_phases=0, rounds=0)
    if n == 0 or k == e:  # nothing to choose: every token holds every expert
        experts = torch.arange(k, device=s.device).expand(n, k).contiguous()
        return AssignmentResult(experts[:, 0] if k == 1 else _order_rows(s, experts), p, cap, s, info, k)
    span = hi - lo  # optimal prices never need to differ by more than this
    magnitude = max(abs(lo), abs(hi))
    scale = None if 1e-20 < magnitude < 1e20 else (magnitude if magnitude > 0 else 1.0)
    work, p_work = (s, p) if scale is None else (s / scale, p / scale)
    if scale is not None:
        span = span / scale
    if _use_kernel(backend, s):
        held, p_work = _solve_kernel(work, cap, p_work, k, span, info)
    else:
        held, p_work = _solve_torch(work, cap, p_work, k, span, info)
    experts = held[:, 0] if k == 1 else _order_rows(s, held)
    return AssignmentResult(experts, p_work if scale is None else p_work * scale, cap, s, info, k)


def balanced_assignment(scores: torch.Tensor, capacity: CapacityLike = None, *,
                        prices: Optional[torch.Tensor] = None, backend: str = "auto") -> torch.Tensor:
    """``LongTensor[N]``: the expert of each token of ``scores[N, E]`` maximising
    ``sum_t scores[t, a[t]]`` with expert e receiving exactly ``capacity[e]`` tokens (default: as equal
    as possible). Exact; see :func:`solve_balanced_assignment` for the options, rules and certificate."""
    return solve_balanced_assignment(scores, capacity, prices=prices, backend=backend).experts


def balanced_topk_assignment(scores: torch.Tensor, k: int, capacity: CapacityLike = None, *,
                             prices: Optional[torch.Tensor] = None, backend: str = "auto") -> torch.Tensor:
    """``LongTensor[N, k]``: k distinct experts for each token of ``scores[N, E]`` maximising the total
    score with expert e taken by exactly ``capacity[e]`` tokens (default: the N * k slots as even as
    possible); rows ordered by score, highest first, ties by lower expert index. k = 1 gives
    ``balanced_assignment(...)[:, None]``. Exact; see :func:`solve_balanced_assignment`."""
    experts = solve_balanced_assignment(scores, capacity, k=k, prices=prices, backend=backend).experts
    return experts[:, None] if experts.dim() == 1 else experts


BACKENDS = ("auto", "torch", "kernel")

_cpu_kernel = host_repair._cpu_kernel


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


def _as_prices(prices, e: int, scores: torch.Tensor) -> torch.Tensor:
    p = torch.as_tensor(prices, device=scores.device)
    if p.is_complex() or p.dtype == torch.bool:
        raise ValueError(f"prices must be real numbers, got dtype {p.dtype}")
    if p.shape != (e,):
        raise ValueError(f"prices must have shape [{e}] (one per expert), got {tuple(p.shape)}")
    return p.to(torch.float64)


def _order_rows(s: torch.Tensor, held: torch.Tensor) -> torch.Tensor:
    """Each row's experts by score, highest first, ties by lower expert index."""
    held = held.sort(dim=1).values
    order = s.gather(1, held).argsort(dim=1, descending=True, stable=True)
    return held.gather(1, order)


def _solve_kernel(s: torch.Tensor, cap: torch.Tensor, p: torch.Tensor, k: int, span: float,
                  info: Dict[str, int]) -> Tuple[torch.Tensor, torch.Tensor]:
    s = s.contiguous()
    cap = cap.contiguous()
    held = torch.empty(s.shape[0], k, dtype=torch.long)
    p = p.clone().contiguous()
    steps, phases, working, search_us, repair_us = _cpu_kernel.solve(
        s.data_ptr(), s.shape[0], s.shape[1], k, cap.data_ptr(), held.data_ptr(), p.data_ptr(),
        s.dtype == torch.float64, torch.get_num_threads(), span)
    info.update(newton_steps=steps, working_set=working, repair_phases=phases,
                price_search_us=int(search_us), repair_us=int(repair_us))
    return held, p


# ----------------------------------------------------------------------------------------------------
# the torch path: no host read from here to the working set's copy (fixed budgets, masks, no
# bincount / nonzero / boolean indexing, which synchronise on CUDA)

def _route(s: torch.Tensor, p: torch.Tensor, k: int):
    """Top-k routing under prices p: (held [N, k], kth [N], nxt [N], margin [N], counts [E]) with
    kth/nxt the k-th and (k+1)-th experts of each token and margin the gap between them."""
    vals, idx = (s - p).topk(k + 1, dim=1)
    held = idx[:, :k]
    return held, idx[:, k - 1], idx[:, k], vals[:, k - 1] - vals[:, k], _counts(held, s.shape[1])


def _counts(held: torch.Tensor, e: int) -> torch.Tensor:
    flat = held.reshape(-1)
    return torch.zeros(e, dtype=torch.long, device=held.device).scatter_add_(0, flat, torch.ones_like(flat))


def _newton_direction(p, cap, kth, nxt, margin, counts, span):
    """Damped Newton step on the counts: dp solving L dp = counts - cap, L the Laplacian of the boundary
    graph (an edge kth-nxt per token of small margin, weighted by a kernel of its margin); zero where
    it cannot be formed (ties everywhere, a singular system)."""
    n, e = margin.shape[0], p.shape[0]
    dt = p.dtype
    nb = min(n, max(2, _BOUNDARY_PER_EXPERT * e))
    m, idx = torch.topk(margin, nb, largest=False)
    tau = m[-1]
    ok = tau > 0
    tau = torch.where(ok, tau, torch.ones_like(tau))
    w = torch.exp(-m / tau) / tau
    a = torch.zeros(nb, e, dtype=dt, device=p.device).scatter_(1, kth[idx][:, None], w[:, None])
    b = torch.zeros(nb, e, dtype=dt, device=p.device).scatter_(1, nxt[idx][:, None], 1.0)
    h = a.t() @ b  # a matmul, not index_add: deterministic on every device
    h = h + h.t()
    deg = h.sum(1)
    lap = torch.diag(deg * (1 + _DAMPING)) - h
    lap.diagonal().add_(1e-6 * deg.mean() + 1e-30)
    dp, status = torch.linalg.solve_ex(lap, (counts - cap).to(dt))
    dp = dp - dp.mean()
    ok = ok & (status == 0) & torch.isfinite(dp).all()
    dp = torch.where(ok, dp, torch.zeros_like(dp))
    # a near-disconnected boundary graph gives huge steps; optimal prices never differ by more than span
    return dp * (span / dp.abs().amax().clamp(min=1e-300)).clamp(max=1.0)


def _price_search(s, cap, p, k, span, info):
    held, kth, nxt, margin, counts = _route(s, p, k)
    excess = (counts - cap).clamp(min=0).sum()
    step = torch.ones((), dtype=s.dtype, device=s.device)
    for _ in range(_NEWTON_STEPS):  # a step that does not cut the excess is undone and halved
        q = p + step * _newton_direction(p, cap, kth, nxt, margin, counts, span)
        q_held, q_kth, q_nxt, q_margin, q_counts = _route(s, q, k)
        q_excess = (q_counts - cap).clamp(min=0).sum()
        better = q_excess < excess
        p = torch.where(better, q, p)
        held = torch.where(better, q_held, held)
        kth, nxt = torch.where(better, q_kth, kth), torch.where(better, q_nxt, nxt)
        margin, counts = torch.where(better, q_margin, margin), torch.where(better, q_counts, counts)
        excess = torch.where(better, q_excess, excess)
        step = torch.where(better, torch.ones_like(step), step / 2)
        info["newton_steps"] += 1
    return p, held, margin, counts


def _to_host(*tensors: torch.Tensor):
    """Copy tensors of one device to host numpy arrays with a single device->host transfer (one
    synchronisation): their bytes are concatenated, copied once and split again."""
    flat = [t.contiguous().reshape(-1).view(torch.uint8) for t in tensors]
    raw = torch.cat(flat).cpu().numpy()
    out, pos = [], 0
    for t, f in zip(tensors, flat):
        size = f.numel()
        out.append(raw[pos:pos + size].view(_NUMPY[t.dtype]).reshape(t.shape))
        pos += size
    return out


_NUMPY = {torch.float32: np.float32, torch.float64: np.float64, torch.int64: np.int64, torch.bool: np.bool_}


def _to_device(arr: np.ndarray, device: torch.device) -> torch.Tensor:
    """Host array to the device without a synchronisation (pinned memory, non-blocking, on CUDA)."""
    t = torch.from_numpy(np.ascontiguousarray(arr))
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _inf(s: torch.Tensor) -> torch.Tensor:
    return torch.full((1,), float("inf"), dtype=s.dtype, device=s.device)


def _solve_torch(s: torch.Tensor, cap: torch.Tensor, p: torch.Tensor, k: int, span: float,
                 info: Dict[str, int]) -> Tuple[torch.Tensor, torch.Tensor]:
    n, e = s.shape
    dev = s.device
    p, held, margin, counts = _price_search(s, cap, p, k, span, info)
    # working set: the tokens of smallest margin (a fixed budget); the others keep their top-k sets
    size = min(n, max(_WORKING_PER_EXPERT * e, -(-n // _WORKING_FRACTION)))
    m_sorted, order = torch.topk(margin, min(n, size + 1), largest=False)
    cand = order[:size]
    cut = m_sorted[size:size + 1] if size < n else _inf(s)
    sub_cap = cap - counts + _counts(held[cand], e)  # capacities left for the working set
    rows_h, held_h, cap_h, p_h, cut_h = _to_host(s[cand], held[cand], sub_cap, p, cut)
    in_work = torch.zeros(n, dtype=torch.bool, device=dev).index_fill_(0, cand, True)
    host = _HostProblem(rows_h, held_h, cap_h, p_h, float(cut_h[0]), cand, info)
    for _ in range(n + 1):
        if (host.cap < 0).any():
            # rare: the fixed tokens over-fill an expert; its fixed tokens of smallest margin join
            over = np.maximum(-host.cap, 0)
            need = _to_device(np.where(over > 0, over + _WORKING_PER_EXPERT, 0), dev)
            slot_key = torch.where(in_work[:, None] | (need[held] == 0), float("inf"), margin[:, None])
            new = _smallest_per_expert(slot_key, held, need, e)
            new_held = held[new]
        elif not host.repair():
            # rare: the working set cannot meet its capacities; the next smallest margins join
            key = torch.where(in_work, float("inf"), margin)
            sl, new = torch.topk(key, min(n, max(_WORKING_PER_EXPERT * e, host.rows.shape[0])), largest=False)
            keep = np.flatnonzero(_to_host(sl)[0] < float("inf"))
            if keep.size == 0:
                raise AssignmentError("exact balanced assignment made no progress (non-finite scores?)")
            new = new[_to_device(keep, dev)]
            new_held = held[new]
        else:
            if host.settled():
                break
            # a stale round: under the new prices, fixed tokens whose sets are no longer a top-k set
            # (slack < 0) join the working set, with the smallest-slack others up to a budget
            held = held.index_put((host.cand,), _to_device(host.held, dev))
            r = s - _to_device(host.p, dev).to(s.dtype)
            slack = r.gather(1, held).amin(1) - r.scatter(1, held, float("-inf")).amax(1)
            slack = torch.where(in_work, float("inf"), slack)
            budget = min(n, _STALE_PER_EXPERT * e)
            sl, idx = torch.topk(slack, min(n, budget + 1), largest=False)
            cut2 = sl[budget:budget + 1] if budget < n else _inf(s)
            new, sl = idx[:budget], sl[:budget]
            new_held = r[new].topk(k, dim=1).indices
            # one read: whether any went stale, and the rows of the candidates
            stale, cut2_h, sl_h, rows_n, old_n, held_n = _to_host((slack < 0).sum()[None], cut2, sl, s[new],
                                                                   held[new], new_held)
            if int(stale[0]) == 0:
                break
            keep = np.flatnonzero(sl_h < float("inf"))  # never re-add working tokens
            # every stale token is among the new ones if the budget held them all
            host.cut = float(cut2_h[0]) if int(stale[0]) <= keep.size else float("-inf")
            host.p_ref = host.p.astype(np.float64)
            host.extend(rows_n[keep], old_n[keep], held_n[keep], new[_to_device(keep, dev)])
            in_work.index_fill_(0, host.cand, True)
            continue
        rows_n, old_n, held_n = _to_host(s[new], held[new], new_held)
        host.extend(rows_n, old_n, held_n, new)
        in_work.index_fill_(0, new, True)
    else:
        raise AssignmentError("exact balanced assignment: the working set did not settle")
    held = held.index_put((host.cand,), _to_device(host.held, dev))
    return held, _to_device(host.p, dev).to(s.dtype)


def _smallest_per_expert(slot_key: torch.Tensor, held: torch.Tensor, need: torch.Tensor, e: int) -> torch.Tensor:
    """Tokens holding each expert f with the ``need[f]`` smallest finite keys (key per slot [N, k]).
    Rare path: reads the selection back to the host."""
    key, ex = slot_key.reshape(-1), held.reshape(-1)
    order = torch.argsort(key, stable=True)
    order = order[torch.argsort(ex[order], stable=True)]  # by expert, then by key
    per = _counts(held, e)
    start = torch.cumsum(per, 0) - per
    rank = torch.arange(key.numel(), device=key.device) - start[ex[order]]
    pick = (rank < need[ex[order]]) & torch.isfinite(key[order])
    tokens = torch.unique(order[pick] // held.shape[1])
    if tokens.numel() == 0:
        raise AssignmentError("exact balanced assignment: the working set cannot meet the capacities")
    return tokens


class _HostProblem:
    """The working set on the host: its rows, top-k sets, capacities and the prices; ``cut`` bounds the
    margins (at prices ``p_ref``) of every token outside it."""

    def __init__(self, rows, held, cap, p, cut, cand, info):
        self.rows, self.held, self.cap = rows, np.array(held, dtype=np.int64), np.array(cap, dtype=np.int64)
        self.p = np.array(p, dtype=rows.dtype)
        self.p_ref = self.p.astype(np.float64)
        self.cut, self.cand, self.info = cut, cand, info

    def repair(self):
        self.info["rounds"] += 1
        self.info["working_set"] = int(self.rows.shape[0])
        got = host_repair.repair_rows(self.rows, self.held, self.cap, self.p)
        if got is None:
            return False
        self.held, self.p, phases = got
        self.info["repair_phases"] += phases
        return True

    def settled(self) -> bool:
        """Whether every token outside the set provably kept a top-k set: the prices moved by d with
        max(d) - min(d) <= every outside margin."""
        d = self.p.astype(np.float64) - self.p_ref
        return bool(d.max() - d.min() <= self.cut)

    def extend(self, rows, old_held, new_held, idx):
        """Tokens ``idx`` (device) join: their old experts' slots return to the capacities, and they
        start from ``new_held`` (a top-k set under the current prices)."""
        self.cap = self.cap + np.bincount(old_held.reshape(-1), minlength=self.cap.shape[0])
        self.rows = np.concatenate([self.rows, rows])
        self.held = np.concatenate([self.held, new_held.astype(np.int64)])
        self.cand = torch.cat([self.cand, idx])
