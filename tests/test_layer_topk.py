"""BaseLayer with top_k = k > 1 (BASE-k): every token k distinct experts, every expert exactly its share.

Single process against a reference built from the top-k solver and the per-expert formula, then 2 and
4 gloo ranks equal to one process (with uneven and empty ranks, several experts per rank, the shuffle
and greedy top-k inference). Everything in float64, so "equal" means equal to round-off.
"""
import io
import itertools

import pytest
import torch

from base_plugin.assignment import balanced_topk_assignment, default_capacity
from base_plugin.layer import BaseExpert, BaseLayer
from multirank import run_ranks
from test_layer_multirank import _check_equal
from test_layer_single import build, expert_grads, make_experts, reference, reference_grads

TIMEOUT = 150


def reference_topk(x, experts, centroids, assign, combine="mean"):
    """Token t's output from its k mixes α_j f_j(x_t) + (1 − α_j) x_t (assign [n, k])."""
    mixes = torch.stack([reference(x, experts, centroids, assign[:, j]) for j in range(assign.shape[1])], 1)
    if combine == "mean":
        return mixes.mean(1)
    return mixes.sum(1) - (assign.shape[1] - 1) * x


@pytest.fixture
def f64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.mark.parametrize("combine", ["mean", "sum"])
@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("training,k", [(True, 2), (True, 3), (False, 2), (True, 5)])
def test_topk_matches_reference_with_gradients(f64, combine, batched, training, k):
    experts, c = make_experts(5, 6, 10)
    layer = build(experts, c, batched, top_k=k, top_k_combine=combine).train(training)
    x = torch.randn(3, 9, 6, requires_grad=True)  # 27 tokens, 27·k slots: not divisible by 5 experts
    g = torch.randn(3, 9, 6)
    y = layer(x)
    (y * g).sum().backward()

    flat = x.detach().reshape(-1, 6).requires_grad_()
    cr = c.clone().requires_grad_()
    scores = flat.detach() @ c.t()
    assign = balanced_topk_assignment(scores, k) if training else scores.topk(k, dim=1).indices
    ref = reference_topk(flat, experts, cr, assign, combine)
    (ref * g.reshape(-1, 6)).sum().backward()

    assert y.shape == x.shape and y.dtype == x.dtype
    torch.testing.assert_close(y.reshape(-1, 6), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad.reshape(-1, 6), flat.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.centroids.grad, cr.grad, rtol=1e-12, atol=1e-12)
    got, want = expert_grads(layer, 0), reference_grads(experts)
    for e in want:
        for name in want[e]:
            torch.testing.assert_close(got[e][name], want[e][name], rtol=1e-12, atol=1e-12)
    counts = torch.bincount(assign.reshape(-1), minlength=5)
    st = layer.last_stats
    assert st.tokens_per_expert.tolist() == st.tokens_received.tolist() == counts.tolist()
    if training:
        assert counts.tolist() == default_capacity(27, 5, k=k).tolist()
        assert all(len(set(row)) == k for row in assign.tolist())  # k distinct experts per token
        torch.testing.assert_close(st.objective, scores.gather(1, assign).sum())
    torch.testing.assert_close(st.mean_gate, torch.sigmoid((flat.detach()[:, None] * c[assign]).sum(-1)).mean())


def test_topk_gradcheck(f64):
    experts, c = make_experts(4, 4, 5, sublayers=1, seed=1)
    layer = build(experts, c, top_k=2)
    names = [n for n, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_() for _, p in layer.named_parameters()]
    x = torch.randn(7, 4, requires_grad=True)

    def fn(x, *ps):
        return torch.func.functional_call(layer, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-6)


def test_top1_is_the_paper_layer_bit_for_bit():
    experts, c = make_experts(4, 8, 8, seed=3)
    x = torch.randn(37, 8)
    plain = build(experts, c)
    one = build(experts, c, top_k=1, top_k_combine="sum")
    for training in (True, False):
        assert torch.equal(plain.train(training)(x), one.train(training)(x))


def test_topk_few_tokens_zero_tokens_and_all_experts(f64):
    experts, c = make_experts(5, 4, 6, seed=4)
    layer = build(experts, c, top_k=2)
    for shape in [(0, 4), (2, 4), (1, 1, 4)]:  # n·k < E too
        x = torch.randn(*shape, requires_grad=True)
        y = layer(x)
        y.sum().backward()
        assert y.shape == x.shape and x.grad.shape == x.shape
    assert layer.last_stats.tokens_per_expert.tolist() == [1, 1, 0, 0, 0]
    every = build(experts, c, top_k=5)  # k = E: every token visits every expert
    x = torch.randn(6, 4)
    y = every(x)
    assert every.last_stats.tokens_per_expert.tolist() == [6] * 5
    all_experts = torch.arange(5).expand(6, 5)
    torch.testing.assert_close(y, reference_topk(x, experts, c, all_experts))


def test_greedy_topk_inference_and_callables():
    torch.manual_seed(5)
    layer = BaseLayer(8, [BaseExpert(8, 8) for _ in range(4)], 4, top_k=2)
    x = layer.centroids.detach()[0] * 50 + torch.randn(41, 8) * 0.01  # crowded around expert 0
    layer(x)
    assert layer.last_stats.tokens_per_expert.tolist() == [21, 21, 20, 20]  # 82 slots, exactly even
    layer.eval()
    layer(x)
    best2 = (x @ layer.centroids.detach().t()).topk(2, dim=1).indices
    assert layer.last_stats.tokens_per_expert.tolist() == torch.bincount(best2.reshape(-1), minlength=4).tolist()
    layer.inference = lambda s: torch.tensor([[3, 1]]).expand(s.shape[0], 2)
    layer(x)
    assert layer.last_stats.tokens_per_expert.tolist() == [0, 41, 0, 41]
    layer.inference = lambda s: torch.zeros(s.shape[0], dtype=torch.long)  # k = 1 answer for k = 2
    with pytest.raises(ValueError, match=r"shape \[41, 2\]"):
        layer(x)


@pytest.mark.parametrize("bad", [0, 6, 2.0, True, "2"])
def test_bad_top_k(bad):
    with pytest.raises(ValueError, match="top_k must be an int from 1 to num_experts=5"):
        BaseLayer(4, [BaseExpert(4, 4) for _ in range(5)], 5, top_k=bad)


def test_bad_combine():
    with pytest.raises(ValueError, match=r"top_k_combine must be one of \('mean', 'sum'\)"):
        BaseLayer(4, [BaseExpert(4, 4) for _ in range(5)], 5, top_k=2, top_k_combine="max")


# ---------------------------------------------------------------------------------------------------
# several ranks

D, FFN, LOCAL, SEED, ROUNDS = 6, 8, 2, 21, 18


def round_plan(r, world):
    g = torch.Generator().manual_seed(SEED * 1000 + r)
    counts = torch.randint(0, 25, (world,), generator=g).tolist()
    if r == 0:
        counts[0] = 0
    mode = ("train", "eval", "shuffle")[r % 3]
    k = 2 if r % 2 == 0 else 3
    x = torch.randn(sum(counts), D, generator=g, dtype=torch.float64)
    up = torch.randn(sum(counts), D, generator=g, dtype=torch.float64)
    return counts, mode, k, x, up


def _job(rank, world):
    torch.set_default_dtype(torch.float64)
    num = LOCAL * world
    experts, c = make_experts(num, D, FFN, seed=SEED)
    mine = slice(rank * LOCAL, (rank + 1) * LOCAL)
    layers = {k: build(experts[mine], c[mine], (k == 3), num, top_k=k) for k in (2, 3)}
    rounds = []
    for r in range(ROUNDS):
        counts, mode, k, x, up = round_plan(r, world)
        layer = layers[k]
        layer.train(mode != "eval")
        layer.shuffle = mode == "shuffle"
        layer.zero_grad(set_to_none=True)
        lo = sum(counts[:rank])
        xs = x[lo:lo + counts[rank]].clone().requires_grad_()
        y = layer(xs)
        (y * up[lo:lo + counts[rank]]).sum().backward()
        st = layer.last_stats
        rounds.append(dict(y=y.detach(), xgrad=xs.grad, cgrad=layer.centroids.grad.clone(),
                           egrads=expert_grads(layer, rank * LOCAL), per_expert=st.tokens_per_expert.clone(),
                           received=st.tokens_received.clone()))
    out = dict(rounds=rounds)
    odd = build(experts[mine], c[mine], False, num, top_k=2 if rank == 0 else 3)  # ranks disagree on top_k
    try:
        odd(torch.randn(3, D))
        out["topk_error"] = None
    except ValueError as e:
        out["topk_error"] = str(e)
    blob = io.BytesIO()
    torch.save(out, blob)
    return blob.getvalue()


_JOBS = {}


@pytest.fixture(params=[2, 4], ids=["2ranks", "4ranks"])
def job(request):
    world = request.param
    if world not in _JOBS:
        blobs = run_ranks(_job, world, timeout=TIMEOUT)
        _JOBS[world] = [torch.load(io.BytesIO(b), weights_only=False) for b in blobs]
    return world, _JOBS[world]


def _reference(world, r, assign):
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        counts, mode, k, x, up = round_plan(r, world)
        experts, c = make_experts(LOCAL * world, D, FFN, seed=SEED)
        xr, cr = x.clone().requires_grad_(), c.clone().requires_grad_()
        if callable(assign):
            assign = assign(x, c, counts, k)
        y = reference_topk(xr, experts, cr, assign)
        (y * up).sum().backward()
        return dict(y=y.detach(), xgrad=xr.grad, cgrad=cr.grad, egrads=reference_grads(experts), assign=assign,
                    counts=counts, x=x, experts=experts, c=c, k=k)
    finally:
        torch.set_default_dtype(old)


def _per_rank_balanced(x, c, counts, k):
    return torch.cat([balanced_topk_assignment(chunk @ c.t(), k).reshape(-1, k) for chunk in x.split(counts)])


def _greedy(x, c, counts, k):
    return (x @ c.t()).topk(k, dim=1).indices


def test_topk_ranks_equal_one_process(job):
    world, out = job
    num = LOCAL * world
    for r in range(ROUNDS):
        counts, mode, k = round_plan(r, world)[:3]
        res = [out[i]["rounds"][r] for i in range(world)]
        assert [x["y"].shape[0] for x in res] == counts
        if mode != "shuffle":
            ref = _reference(world, r, _per_rank_balanced if mode == "train" else _greedy)
            _check_equal(world, res, ref)
            for i in range(world):
                lo = sum(counts[:i])
                mine = ref["assign"][lo:lo + counts[i]]
                assert res[i]["per_expert"].tolist() == torch.bincount(mine.reshape(-1), minlength=num).tolist()
                if mode == "train":
                    assert res[i]["per_expert"].tolist() == default_capacity(counts[i], num, k=k).tolist()
            continue
        # After the shuffle the routing is random: find each token's expert set from its output (every
        # set of k experts gives a different output), then require outputs and gradients for it.
        ref0 = _reference(world, r, _greedy)
        x, experts, c = ref0["x"], ref0["experts"], ref0["c"]
        y = torch.cat([i["y"] for i in res])
        sets = torch.tensor(list(itertools.combinations(range(num), k)))
        with torch.no_grad():
            cand = torch.stack([reference_topk(x, experts, c, s.expand(x.shape[0], k)) for s in sets])
            assign = sets[(cand - y).abs().amax(-1).argmin(0)]
        _check_equal(world, res, _reference(world, r, assign))
        for i in range(world):  # every rank balanced the rows it was dealt, exactly
            pe = res[i]["per_expert"]
            assert pe.tolist() == default_capacity(int(pe.sum()) // k, num, k=k).tolist()
        total = sum(res[i]["per_expert"] for i in range(world))
        assert torch.bincount(assign.reshape(-1), minlength=num).tolist() == total.tolist()
    for r in range(ROUNDS):  # slots each expert processed == slots sent to it
        sent = sum(out[i]["rounds"][r]["per_expert"] for i in range(world))
        assert sent.tolist() == torch.cat([out[i]["rounds"][r]["received"] for i in range(world)]).tolist()


def test_ranks_disagreeing_on_top_k_raise_everywhere(job):
    world, out = job
    for i in range(world):
        assert "local experts, top_k" in out[i]["topk_error"]
