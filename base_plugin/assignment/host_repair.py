"""Exact repair of a small balanced top-k problem on the host (the last step of the torch path).

    repair_rows(rows[M, E], held[M, k], capacity[E], prices[E]) -> (held, prices, phases) or None

``rows`` are the scores of the working set (numpy, float32 or float64, finite), ``held`` every row's k
distinct experts, a top-k set of ``rows - prices`` (int64), ``capacity`` int64 summing to ``M * k``.
Returns the optimal ``held`` for these rows and capacities with prices certifying it (every row still
at a top-k set), or None when no assignment of these rows meets the capacities.

Primal-dual successive shortest paths on the E-node expert graph: moving a slot of token t from
expert g to an expert f that t does not hold costs ``r[t, g] - r[t, f] >= 0`` (r = rows - prices).
Each phase computes shortest distances from the over-full experts, lowers the prices by them (every
tree edge becomes tight, no reduced cost turns negative) and moves one slot along every tree path it
can towards an under-full expert. The compiled CPU kernel (``_cpu_kernel.repair``, the same method
with Dijkstra) runs it when it was built; this module's numpy version otherwise. Everything here is
host memory: nothing reads a device tensor.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np

try:  # built by setup.py when a C++ compiler is present; optional
    from . import _cpu_kernel
except ImportError:  # pragma: no cover - depends on the install
    _cpu_kernel = None


def repair_rows(rows: np.ndarray, held: np.ndarray, capacity: np.ndarray,
                prices: np.ndarray) -> Optional[Tuple[np.ndarray, np.ndarray, int]]:
    if _cpu_kernel is not None:
        return _repair_kernel(rows, held, capacity, prices)
    return _repair_numpy(rows, held, capacity, prices)


def _repair_kernel(rows, held, capacity, prices):
    rows = np.ascontiguousarray(rows)
    held = np.array(held, dtype=np.int64, order="C")
    capacity = np.ascontiguousarray(capacity, dtype=np.int64)
    prices = np.array(prices, dtype=rows.dtype, order="C")
    m, e = rows.shape
    phases = _cpu_kernel.repair(rows.ctypes.data, m, e, held.shape[1], capacity.ctypes.data, held.ctypes.data,
                                prices.ctypes.data, rows.dtype == np.float64)
    if phases < 0:
        return None
    return held, prices, int(phases)


def _repair_numpy(rows, held, capacity, prices):
    m, e = rows.shape
    k = held.shape[1]
    held = np.array(held, dtype=np.int64)
    r64 = rows.astype(np.float64)
    p = prices.astype(np.float64)
    inf = np.inf
    phases = 0
    for _ in range(m * k + 2):  # each phase moves at least one slot towards balance
        diff = np.bincount(held.ravel(), minlength=e) - capacity
        if (diff <= 0).all():
            return held, p.astype(rows.dtype), phases
        phases += 1
        r = r64 - p
        own = np.take_along_axis(r, held, 1)                                  # [M, k]
        holds = np.zeros((m, e), dtype=bool)
        np.put_along_axis(holds, held, True, 1)
        # cost[slot, f] of moving a slot to expert f; >= 0 at a top-k set (clamped: price round-off
        # must not create negative cycles); inf where the token holds f already
        cost = np.maximum(own[:, :, None] - r[:, None, :], 0.0)
        cost = np.where(holds[:, None, :], inf, cost).reshape(m * k, e)
        src = held.ravel()
        w = np.full((e, e), inf)
        np.minimum.at(w, src, cost)                                            # w[g, f]
        dist = np.where(diff > 0, 0.0, inf)
        pred = np.full(e, -1, dtype=np.int64)
        for _ in range(e):  # Bellman-Ford
            total = dist[:, None] + w
            arg = total.argmin(0)
            cand = total[arg, np.arange(e)]
            better = cand < dist
            if not better.any():
                break
            dist = np.where(better, cand, dist)
            pred = np.where(better, arg, pred)
        finite = dist < inf
        p = p - np.minimum(dist, dist[finite].max())
        # the slot that realises each tree edge pred[f] -> f
        tok = np.where(src[:, None] == pred[None, :], cost, inf).argmin(0)
        moves = _pack_paths(diff.tolist(), pred.tolist(), tok.tolist(), dist.tolist(), k)
        if not moves:
            return None
        flat = held.reshape(-1)
        for slot, f in moves:
            flat[slot] = f
    return None


def _pack_paths(diff: List[int], pred: List[int], slot: List[int], dist: List[float],
                k: int) -> List[Tuple[int, int]]:
    """Shortest-path-tree paths from over-full to under-full experts, nearest first, sharing no
    expert but their root and no token; returns the slot moves (slot, new expert) along them."""
    used_tokens, used_nodes, moves = set(), set(), []
    for f in sorted((f for f, x in enumerate(diff) if x < 0), key=lambda f: (dist[f], f)):
        if dist[f] == float("inf"):
            continue
        path, x, seen = [], f, set()
        while pred[x] >= 0 and x not in used_nodes and slot[x] // k not in used_tokens and x not in seen:
            seen.add(x)
            path.append((slot[x], x))
            x = pred[x]
        if pred[x] >= 0 or diff[x] <= 0:
            continue
        moves.extend(path)
        used_tokens.update(s // k for s, _ in path)
        used_nodes.update(q for _, q in path)
        diff[x] -= 1
        diff[f] += 1
    return moves
