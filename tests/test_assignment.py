"""Exactness of the balanced assignment against scipy's exact solvers, on random and adversarial inputs."""
import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

import base_plugin.assignment.exact as exact
from base_plugin.assignment import (AssignmentError, balanced_assignment, default_capacity,
                                    greedy_assignment, kernel_available, solve_balanced_assignment)
from base_plugin.assignment.inputs import finite_scores

# Every exactness test runs on both solvers: the pure-torch path (any device) and the compiled CPU
# kernel that the install builds.
BACKENDS = ["torch", "kernel"]


def optimum(scores: torch.Tensor, capacity) -> float:
    """Exact optimum by the Hungarian method on the matrix with each expert repeated capacity times."""
    s = scores.double().numpy()
    cols = np.repeat(np.arange(s.shape[1]), np.asarray(capacity))
    if s.shape[0] == 0:
        return 0.0
    big = s[:, cols]
    rows, picked = linear_sum_assignment(big, maximize=True)
    return float(big[rows, picked].sum())


def check_exact(scores, capacity=None, rtol=1e-6, backend="auto"):
    """Solve, then assert exact balance and an objective equal to scipy's optimum."""
    res = solve_balanced_assignment(scores, capacity, backend=backend)
    n, e = scores.shape
    cap = default_capacity(n, e) if capacity is None else torch.as_tensor(capacity)
    assert res.experts.dtype == torch.long and res.experts.shape == (n,)
    assert torch.equal(torch.bincount(res.experts, minlength=e), cap.long())
    work = finite_scores(scores)
    got = float(work.double().gather(1, res.experts[:, None]).sum())
    want = optimum(work, cap)
    scale = max(1.0, float(work.double().abs().sum()))
    assert abs(got - want) <= rtol * scale, (got, want)
    gap = float(res.gap)
    assert -rtol * scale <= gap <= rtol * scale, gap
    return res


def _gen(seed):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(0, 160, (1,), generator=g))
    e = int(torch.randint(1, 24, (1,), generator=g))
    kind = seed % 5
    if kind == 0:
        s = torch.randn(n, e, generator=g, dtype=torch.float64)
    elif kind == 1:  # integer scores with massive ties
        s = torch.randint(0, 3, (n, e), generator=g).double()
    elif kind == 2:  # strong expert biases: everybody prefers a few experts
        s = torch.randn(n, e, generator=g, dtype=torch.float64) + 4 * torch.randn(e, generator=g, dtype=torch.float64)
    elif kind == 3:  # low-rank, like token x centroid scores
        s = torch.randn(n, 8, generator=g, dtype=torch.float64) @ torch.randn(8, e, generator=g, dtype=torch.float64)
    else:  # negative scores of mixed magnitude
        s = -torch.rand(n, e, generator=g, dtype=torch.float64) * 10 ** torch.randint(-3, 4, (1,), generator=g).item()
    return s


@pytest.mark.parametrize("seed", range(300))
@pytest.mark.parametrize("backend", BACKENDS)
def test_random_default_capacity(seed, backend):
    check_exact(_gen(seed), rtol=1e-9)


@pytest.mark.parametrize("seed", range(100))
@pytest.mark.parametrize("backend", BACKENDS)
def test_random_explicit_capacity(seed, backend):
    s = _gen(seed + 1000)
    n, e = s.shape
    g = torch.Generator().manual_seed(seed)
    cut = torch.sort(torch.randint(0, n + 1, (e - 1,), generator=g)).values
    cap = torch.diff(torch.cat([torch.tensor([0]), cut, torch.tensor([n])]))
    check_exact(s, cap, rtol=1e-9)


@pytest.mark.parametrize("n,e", [(2000, 8), (1500, 24), (3000, 4), (1024, 16)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_working_set_path_float32(n, e, backend):
    g = torch.Generator().manual_seed(n + e)
    s = torch.randn(n, 64, generator=g) @ (0.1 * torch.randn(e, 64, generator=g)).T
    check_exact(s, rtol=1e-6)


def test_enlarging_the_working_set_stays_exact(monkeypatch):  # torch path: its constants are patched
    # force working sets that are too small, so the enlargement and fallback branches run
    monkeypatch.setattr(exact, "_WORKING_PER_UNIT", 1)
    monkeypatch.setattr(exact, "_WORKING_PER_EXPERT", 1)
    monkeypatch.setattr(exact, "_NEWTON_STEPS", 1)
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        s = torch.randn(1200, 32, generator=g) @ (0.2 * torch.randn(6, 32, generator=g)).T
        check_exact(s, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_certificate(backend):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(16384, 256, generator=g) @ (0.1 * torch.randn(128, 256, generator=g)).T
    res = solve_balanced_assignment(s, backend=backend)
    assert torch.equal(torch.bincount(res.experts, minlength=128), torch.full((128,), 128))
    assert abs(float(res.gap)) <= 1e-6 * float(s.abs().sum())


@pytest.mark.parametrize("n,e", [(64, 8), (67, 8), (5, 8), (100, 1), (0, 4), (0, 1), (1, 1), (1, 3)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_adversarial_everybody_prefers_expert_0(n, e, backend):
    s = torch.zeros(n, e, dtype=torch.float64)
    if n:
        s[:, 0] = torch.linspace(1, 2, n, dtype=torch.float64)
    check_exact(s)


@pytest.mark.parametrize("n,e", [(96, 8), (97, 7), (10, 16), (256, 32)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_adversarial_ties(n, e, backend):
    check_exact(torch.zeros(n, e))                       # all equal
    check_exact(torch.ones(n, e) * 7.0)                  # all equal, non-zero
    check_exact(torch.arange(n * e).remainder(2).view(n, e).float())  # 0/1 checkerboard
    g = torch.Generator().manual_seed(n)
    check_exact(torch.randint(0, 2, (n, e), generator=g).float())


@pytest.mark.parametrize("magnitude", [1e-30, 1e-8, 1e8, 1e30])
@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_and_tiny_magnitudes(magnitude, backend):
    g = torch.Generator().manual_seed(1)
    s = torch.randn(120, 6, generator=g, dtype=torch.float64) * magnitude
    check_exact(s, rtol=1e-9, backend=backend)
    check_exact(s.float(), rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_extremes(backend):
    s = torch.tensor([[3e38, -3e38], [1.0, 2.0], [-1.0, 3e38], [0.0, 0.0]])
    res = solve_balanced_assignment(s, backend=backend)
    assert torch.equal(torch.bincount(res.experts, minlength=2), torch.tensor([2, 2]))
    assert res.experts[0] == 0 and res.experts[2] == 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("backend", BACKENDS)
def test_dtypes(dtype, backend):
    g = torch.Generator().manual_seed(3)
    s = torch.randn(257, 9, generator=g).to(dtype)
    res = check_exact(s, rtol=1e-6, backend=backend)
    assert res.prices.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_integer_scores(backend):
    g = torch.Generator().manual_seed(4)
    s = torch.randint(-5, 6, (150, 7), generator=g)
    check_exact(s, rtol=1e-12)


def _substituted(s: torch.Tensor) -> torch.Tensor:
    """The documented rule, written independently: +inf -> hi+gap, -inf -> lo-gap, NaN -> lo-2gap."""
    fin = torch.isfinite(s)
    lo, hi = s[fin].min(), s[fin].max()
    gap = hi - lo + 1
    out = s.clone()
    out[s == float("inf")] = hi + gap
    out[s == float("-inf")] = lo - gap
    out[torch.isnan(s)] = lo - 2 * gap
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_rule(backend):
    g = torch.Generator().manual_seed(5)
    s = torch.randn(90, 6, generator=g, dtype=torch.float64)
    s[:, 2] = float("-inf")                 # one column of -inf: expert 2 still gets its share
    s[::7, 4] = float("nan")
    s[3, 1] = float("inf")
    res = solve_balanced_assignment(s, backend=backend)
    assert torch.equal(torch.bincount(res.experts, minlength=6), default_capacity(90, 6))
    assert res.experts[3] == 1
    sub = _substituted(s)
    assert torch.equal(finite_scores(s), sub)
    got = float(sub.gather(1, res.experts[:, None]).sum())
    assert got == pytest.approx(optimum(sub, default_capacity(90, 6)), rel=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_nonfinite(backend):
    s = torch.full((12, 4), float("nan"))
    s[0, 0] = float("inf")
    res = solve_balanced_assignment(s, backend=backend)
    assert torch.equal(torch.bincount(res.experts, minlength=4), torch.full((4,), 3))
    assert res.experts[0] == 0


def test_greedy_is_argmax_with_the_nan_rule():
    s = torch.tensor([[0.0, 1.0, float("nan")], [2.0, 2.0, 1.0], [float("-inf"), float("nan"), -5.0]])
    assert greedy_assignment(s).tolist() == [1, 0, 2]
    g = torch.Generator().manual_seed(6)
    r = torch.randn(50, 5, generator=g)
    assert torch.equal(greedy_assignment(r), r.argmax(1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend):
    g = torch.Generator().manual_seed(7)
    s = torch.randint(0, 4, (3000, 16), generator=g).float() + 0.5 * (torch.randn(3000, 16, generator=g) > 1)
    first = balanced_assignment(s, backend=backend)
    for _ in range(3):
        assert torch.equal(balanced_assignment(s, backend=backend), first)


@pytest.mark.parametrize("bad,match", [
    (torch.zeros(5), r"shape \[tokens, experts\]"),
    (torch.zeros(2, 3, 4), r"shape \[tokens, experts\]"),
    (torch.zeros(4, 0), "at least one expert"),
    ([[1.0, 2.0]], "torch.Tensor"),
    (torch.zeros(3, 2, dtype=torch.complex64), "real"),
])
def test_bad_scores(bad, match):
    with pytest.raises(ValueError, match=match):
        balanced_assignment(bad)


@pytest.mark.parametrize("cap,match", [
    ([2, 2], "sum to the number of tokens"),
    ([3, 3, 0], r"shape \[2\]"),
    ([7, -1], "non-negative"),
    ([2.5, 3.5], "whole numbers"),
])
def test_bad_capacity(cap, match):
    with pytest.raises(ValueError, match=match):
        balanced_assignment(torch.zeros(6, 2), cap)


def test_phase_bound_raises_clear_error(monkeypatch):
    monkeypatch.setattr(exact, "_pack_paths", lambda *a: [])
    s = torch.zeros(10, 2)
    s[:, 0] = 1
    with pytest.raises(AssignmentError, match="no progress"):
        balanced_assignment(s, backend="torch")


def test_the_install_built_the_cpu_kernel():
    # the README's install compiles it; a silent fallback to torch would hide a broken build
    assert kernel_available()


def test_backends_agree_and_warm_start():
    g = torch.Generator().manual_seed(9)
    s = torch.randn(3000, 64, generator=g) @ (0.1 * torch.randn(24, 64, generator=g)).T
    cold = {b: solve_balanced_assignment(s, backend=b) for b in BACKENDS}
    assert float(cold["torch"].objective) == pytest.approx(float(cold["kernel"].objective), rel=1e-6)
    for b in BACKENDS:  # from the optimal prices of the other solver: same optimum
        other = cold["kernel" if b == "torch" else "torch"]
        warm = solve_balanced_assignment(s, prices=other.prices, backend=b)
        assert float(warm.objective) == pytest.approx(float(cold[b].objective), rel=1e-6)


def test_bad_backend_and_prices():
    with pytest.raises(ValueError, match="backend must be one of"):
        balanced_assignment(torch.zeros(4, 2), backend="gpu")
    with pytest.raises(ValueError, match=r"prices must have shape \[2\]"):
        solve_balanced_assignment(torch.zeros(4, 2), prices=torch.zeros(3))
    with pytest.raises(ValueError, match="prices must be finite"):
        solve_balanced_assignment(torch.zeros(4, 2), prices=torch.tensor([0.0, float("nan")]))


def test_returns_on_the_input_device_and_long():
    s = torch.randn(33, 4)
    a = balanced_assignment(s)
    assert a.device == s.device and a.dtype == torch.long


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the CPU path above is the same code)")
def test_cuda_matches_cpu():
    g = torch.Generator().manual_seed(8)
    s = torch.randn(4096, 64, generator=g) @ (0.1 * torch.randn(64, 64, generator=g)).T
    cpu = solve_balanced_assignment(s)
    gpu = solve_balanced_assignment(s.cuda())
    assert gpu.experts.is_cuda
    assert torch.equal(torch.bincount(gpu.experts.cpu(), minlength=64), torch.full((64,), 64))
    assert float(gpu.objective.cpu()) == pytest.approx(float(cpu.objective), rel=1e-6)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("backend", BACKENDS)
def test_strong_expert_bias_float32(seed, backend):
    # regression: a near-disconnected boundary graph once sent Newton's prices to ~1e6, where float32
    # r = scores - prices loses every digit; steps are now bounded by the score span
    g = torch.Generator().manual_seed(seed)
    n, e = int(torch.randint(400, 1400, (1,), generator=g)), int(torch.randint(8, 72, (1,), generator=g))
    s = torch.randn(n, e, generator=g) + 3 * torch.randn(e, generator=g)
    res = check_exact(s, rtol=1e-6, backend=backend)
    assert float(res.prices.abs().amax()) <= 2 * float(s.amax() - s.amin())
