"""BaseLayer in one process: the reference formula, gradients, routing, experts, stats, errors.

The helpers at the top (global experts, reference output) are shared with test_layer_multirank.py.
"""
import pytest
import torch
from torch import nn

from base_plugin.assignment import balanced_assignment, default_capacity
from base_plugin.layer import (BaseExpert, BaseLayer, BatchedBaseExperts, ExpertList, all_to_all,
                               exchange_counts, is_expert_parameter)

EXPERT_PARAMS = ("norm.weight", "norm.bias", "ff1.weight", "ff1.bias", "ff2.weight", "ff2.bias")


def make_experts(num_experts, d, ffn, sublayers=2, seed=0):
    """Global experts with a non-zero last Linear (a fresh expert is the identity), and centroids [E, d]."""
    torch.manual_seed(seed)
    experts = [BaseExpert(d, ffn, sublayers) for _ in range(num_experts)]
    with torch.no_grad():
        for e in experts:
            for sub in e:
                sub.ff2.weight.normal_(0, 0.5)
                sub.ff2.bias.normal_(0, 0.1)
                sub.norm.weight.normal_(1, 0.1)
    centroids = torch.randn(num_experts, d) * 0.5
    return experts, centroids


def reference(x, experts, centroids, assign):
    """y_t = α f_a(x_t) + (1 − α) x_t, α = σ(x_t · c_a), for a given assignment a (no routing of its own)."""
    candidates = torch.stack([e(x) for e in experts])  # [E, n, d]
    f = candidates[assign, torch.arange(x.shape[0])]
    alpha = torch.sigmoid((x * centroids[assign]).sum(-1, keepdim=True))
    return alpha * f + (1 - alpha) * x


def expert_grads(layer, first_global):
    """{global expert: {param name: grad}} for a layer with ExpertList(BaseExpert) or BatchedBaseExperts."""
    out = {}
    ex = layer.experts
    for i in range(ex.num_experts):
        g = {}
        if isinstance(ex, ExpertList):
            for s, sub in enumerate(ex.experts[i]):
                for name, p in sub.named_parameters():
                    g[f"{s}.{name}"] = torch.zeros_like(p) if p.grad is None else p.grad.clone()
        else:
            for s, sub in enumerate(ex.sublayers):
                def grad(p, t=False):
                    v = torch.zeros_like(p[i]) if p.grad is None else p.grad[i]
                    return (v.t() if t else v).clone()
                g.update({f"{s}.norm.weight": grad(sub.norm_weight), f"{s}.norm.bias": grad(sub.norm_bias),
                          f"{s}.ff1.weight": grad(sub.w1, True), f"{s}.ff1.bias": grad(sub.b1),
                          f"{s}.ff2.weight": grad(sub.w2, True), f"{s}.ff2.bias": grad(sub.b2)})
        out[first_global + i] = g
    return out


def reference_grads(experts):
    return {i: {f"{s}.{n}": (torch.zeros_like(p) if p.grad is None else p.grad.clone())
                for s, sub in enumerate(e) for n, p in sub.named_parameters()} for i, e in enumerate(experts)}


def build(experts, centroids, batched=False, num_experts=None, **kw):
    """A BaseLayer holding ``experts`` (this rank's) with its centroid rows set to ``centroids``."""
    local = BatchedBaseExperts.from_experts(experts) if batched else experts
    layer = BaseLayer(centroids.shape[1], local, num_experts or centroids.shape[0], **kw)
    with torch.no_grad():
        layer.centroids.copy_(centroids)
    return layer


@pytest.fixture
def f64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_matches_reference_with_gradients(f64, batched, training):
    experts, c = make_experts(5, 6, 10)
    layer = build(experts, c, batched).train(training)
    x = torch.randn(3, 9, 6, requires_grad=True)  # 27 tokens: not divisible by 5 experts
    g = torch.randn(3, 9, 6)
    y = layer(x)
    (y * g).sum().backward()

    flat = x.detach().reshape(-1, 6).requires_grad_()
    cr = c.clone().requires_grad_()
    scores = flat.detach() @ c.t()
    assign = balanced_assignment(scores) if training else scores.argmax(1)
    ref = reference(flat, experts, cr, assign)
    (ref * g.reshape(-1, 6)).sum().backward()

    assert y.shape == x.shape and y.dtype == x.dtype
    torch.testing.assert_close(y.reshape(-1, 6), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad.reshape(-1, 6), flat.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.centroids.grad, cr.grad, rtol=1e-12, atol=1e-12)
    got, want = expert_grads(layer, 0), reference_grads(experts)
    for e in want:
        for name in want[e]:
            torch.testing.assert_close(got[e][name], want[e][name], rtol=1e-12, atol=1e-12)
    counts = torch.bincount(assign, minlength=5)
    assert layer.last_stats.tokens_per_expert.tolist() == counts.tolist()
    if training:
        assert counts.tolist() == default_capacity(27, 5).tolist()


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_gradcheck_float64(f64, batched, training):
    experts, c = make_experts(3, 4, 5, sublayers=1, seed=1)
    layer = build(experts, c, batched).train(training)
    names = [n for n, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_() for _, p in layer.named_parameters()]
    x = torch.randn(7, 4, requires_grad=True)

    def f(x, *ps):
        return torch.func.functional_call(layer, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-7, fast_mode=True)


def test_centroids_learn_through_the_gate_only(f64):
    # Fresh experts are the identity, so y = α x + (1 − α) x = x whatever α: the centroids, which decide
    # the routing, must then get exactly zero gradient.
    torch.manual_seed(3)
    layer = BaseLayer(6, [BaseExpert(6, 8) for _ in range(4)], 4)
    x = torch.randn(20, 6, requires_grad=True)
    y = layer(x)
    y.pow(2).sum().backward()
    torch.testing.assert_close(y, x.detach(), rtol=0, atol=1e-14)
    assert torch.count_nonzero(layer.centroids.grad) == 0
    # With non-trivial experts the gradient is that of the gate alone:
    # dL/dc_e = Σ_{t→e} (g_t · (f_e(x_t) − x_t)) σ'(x_t·c_e) x_t.
    experts, c = make_experts(4, 6, 8, seed=4)
    layer = build(experts, c)
    x = torch.randn(20, 6)
    g = torch.randn(20, 6)
    (layer(x) * g).sum().backward()
    assign = balanced_assignment(x @ c.t())
    expected = torch.zeros_like(c)
    with torch.no_grad():
        for t in range(20):
            e = int(assign[t])
            s = torch.sigmoid(x[t] @ c[e])
            expected[e] += (g[t] @ (experts[e](x[t]) - x[t])) * s * (1 - s) * x[t]
    torch.testing.assert_close(layer.centroids.grad, expected, rtol=1e-10, atol=1e-12)


def test_greedy_in_eval_balanced_in_training():
    torch.manual_seed(5)
    layer = BaseLayer(8, [BaseExpert(8, 8) for _ in range(4)], 4)
    # Tokens crowd around expert 0's centroid, so greedy routing is far from balanced.
    x = layer.centroids.detach()[0] * 50 + torch.randn(41, 8) * 0.01
    layer.train()
    layer(x)
    assert layer.last_stats.tokens_per_expert.tolist() == [11, 10, 10, 10]
    assert float(layer.last_stats.gap) <= 1e-4 * max(1.0, abs(float(layer.last_stats.objective)))
    layer.eval()
    layer(x)
    greedy = torch.bincount((x @ layer.centroids.detach().t()).argmax(1), minlength=4)
    assert layer.last_stats.tokens_per_expert.tolist() == greedy.tolist() == [41, 0, 0, 0]
    # the mode is module.training, not grad mode
    with torch.no_grad():
        layer.train()
        layer(x)
    assert layer.last_stats.tokens_per_expert.tolist() == [11, 10, 10, 10]


def test_configurable_routers():
    torch.manual_seed(6)
    x = torch.randn(30, 8)
    layer = BaseLayer(8, [BaseExpert(8, 8) for _ in range(3)], 3, assignment="greedy", inference="exact")
    layer(x)
    greedy = torch.bincount((x @ layer.centroids.detach().t()).argmax(1), minlength=3)
    assert layer.last_stats.tokens_per_expert.tolist() == greedy.tolist()
    layer.eval()
    layer(x)
    assert layer.last_stats.tokens_per_expert.tolist() == [10, 10, 10]
    layer.inference = lambda s: torch.full((s.shape[0],), 2, dtype=torch.long)
    layer(x)
    assert layer.last_stats.tokens_per_expert.tolist() == [0, 0, 30]
    assert torch.isnan(layer.last_stats.gap)


def test_stats_are_device_tensors_and_right():
    torch.manual_seed(7)
    experts, c = make_experts(4, 8, 8)
    layer = build(experts, c)
    x = torch.randn(13, 8)
    layer(x)
    st = layer.last_stats
    assert all(isinstance(v, torch.Tensor) for v in vars(st).values())
    assign = balanced_assignment(x @ c.t())
    torch.testing.assert_close(st.objective, (x @ c.t()).gather(1, assign[:, None]).sum(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(st.mean_gate, torch.sigmoid((x * c[assign]).sum(-1)).mean(), rtol=1e-5, atol=1e-6)
    assert st.tokens_received.tolist() == st.tokens_per_expert.tolist() == [4, 3, 3, 3]
    assert int(st.tokens_moved) == 0
    assert set(st.as_dict()) == {"tokens_per_expert", "tokens_received", "objective", "gap", "mean_gate",
                                 "tokens_moved"}


def test_zero_and_few_tokens_and_shapes():
    torch.manual_seed(8)
    experts, c = make_experts(5, 4, 6)
    for batched in (False, True):
        layer = build(experts, c, batched)
        for shape in [(0, 4), (2, 0, 4), (3, 4), (4,), (1, 2, 1, 4)]:
            x = torch.randn(*shape, requires_grad=True)
            y = layer(x)
            y.sum().backward()
            assert y.shape == x.shape and x.grad.shape == x.shape
        assert layer.last_stats.tokens_per_expert.tolist() == [1, 1, 0, 0, 0]


def test_batched_experts_equal_the_list_for_uneven_counts():
    experts, _ = make_experts(4, 6, 12, sublayers=2, seed=9)
    batched = BatchedBaseExperts.from_experts(experts)
    listed = ExpertList(experts)
    # equal counts, mildly uneven (packed), very uneven (per-expert), empty experts, nothing at all
    for counts in ([5, 5, 5, 5], [6, 4, 5, 3], [17, 0, 1, 0], [0, 0, 0, 2], [0, 0, 0, 0]):
        x = torch.randn(sum(counts), 6, requires_grad=True)
        yb = batched(x, counts)
        gb = torch.autograd.grad(yb.sum(), x, allow_unused=True)[0] if x.shape[0] else None
        yl = listed(x, counts)
        torch.testing.assert_close(yb, yl, rtol=1e-5, atol=1e-5)
        # block by block (what the layer mixes with the gate): the same rows, counts[i] of them each;
        # the default (BatchedBaseExperts) goes through the module call, so its hooks fire
        calls = []
        hook = batched.register_forward_hook(lambda *a: calls.append(1))
        batched.pieces(x, counts)
        hook.remove()
        assert calls == [1]
        for grouped in (batched, listed):
            blocks = grouped.pieces(x, counts)
            assert [b.shape for b in blocks] == [(c, 6) for c in counts]
            torch.testing.assert_close(torch.cat(blocks), yl, rtol=1e-5, atol=1e-5)
        if gb is not None:
            torch.testing.assert_close(gb, torch.autograd.grad(yl.sum(), x)[0], rtol=1e-5, atol=1e-5)


def test_fresh_experts_are_identity_and_configurable():
    x = torch.randn(10, 8)
    for act in ("relu", "gelu", "silu", torch.tanh):
        e = BaseExpert(8, 32, num_sublayers=3, activation=act)
        assert len(e) == 3 and e[0].ff1.out_features == 32
        torch.testing.assert_close(e(x), x)
        torch.testing.assert_close(BatchedBaseExperts(2, 8, 32, 3, act)(x, [4, 6]), x)


def test_any_module_is_an_expert():
    torch.manual_seed(10)
    experts = [nn.Linear(4, 4) for _ in range(2)]
    layer = BaseLayer(4, experts, 2)
    x = torch.randn(6, 4, requires_grad=True)
    layer(x).sum().backward()
    assert all(p.grad is not None for p in layer.parameters())
    single = BaseLayer(4, nn.Sequential(nn.Linear(4, 4), nn.ReLU()), 1)  # one module, not split up
    assert single.experts.num_experts == 1
    assert single(x).shape == x.shape

    class TupleOut(nn.Linear):  # DeepSpeed's convention: an expert may return (output, extra)
        def forward(self, h):
            return super().forward(h), None
    tupled = ExpertList([TupleOut(4, 4), TupleOut(4, 4)])
    rows = torch.randn(5, 4)
    torch.testing.assert_close(tupled(rows, [2, 3]),
                               torch.cat([nn.Linear.forward(e, r) for e, r in zip(tupled.experts, rows.split([2, 3]))]))
    assert [p.shape[0] for p in tupled.pieces(rows, [5, 0])] == [5, 0]  # one block per expert, empty ones too


def test_expert_parameters_carry_deepspeed_marks():
    layer = BaseLayer(4, [BaseExpert(4, 4)], 1, group_name="my_ep")
    assert all(p.allreduce is False and p.group_name == "my_ep" for p in layer.parameters())
    assert all(is_expert_parameter(p) for p in layer.parameters())
    assert BaseLayer(4, [BaseExpert(4, 4)], 1).centroids.group_name == "ep_size_1"
    assert not is_expert_parameter(nn.Parameter(torch.zeros(1)))
    # deepspeed.moe.utils.is_moe_param's test, restated: has "allreduce" and it is false
    assert all(hasattr(p, "allreduce") and not p.allreduce for p in layer.parameters())


def test_bad_input_errors():
    experts = [BaseExpert(8, 8) for _ in range(2)]
    layer = BaseLayer(8, experts, 2)
    with pytest.raises(ValueError, match=r"shape \[\.\.\., 8\]"):
        layer(torch.randn(3, 7))
    with pytest.raises(ValueError, match=r"shape \[\.\.\., 8\]"):
        layer(torch.tensor(1.0))
    with pytest.raises(ValueError, match="needs 4 per rank"):
        BaseLayer(8, experts, 4)
    with pytest.raises(ValueError, match="d_model=8, the layer has d_model=6"):
        BaseLayer(6, experts, 2)
    with pytest.raises(ValueError, match="d_model=8, the layer has d_model=6"):
        BaseLayer(6, BatchedBaseExperts(2, 8), 2)
    with pytest.raises(ValueError, match="nn.Module"):
        BaseLayer(8, ["not a module"], 1)
    with pytest.raises(ValueError, match="assignment must be one of"):
        BaseLayer(8, experts, 2, assignment="sinkhorn")
    with pytest.raises(ValueError, match="inference must be one of"):
        BaseLayer(8, experts, 2, inference="top2")
    with pytest.raises(ValueError, match="not initialised"):
        BaseLayer(8, experts, 2, group=object())
    with pytest.raises(ValueError, match=">= 1"):
        BaseLayer(0, experts, 2)
    with pytest.raises(ValueError, match="activation"):
        BaseExpert(8, activation="swishy")

    class OneBlockShort(ExpertList):  # a custom GroupedExperts whose pieces() drops an expert
        def pieces(self, x, counts):
            return super().pieces(x, counts)[:-1]
    with pytest.raises(ValueError, match="returned 1 blocks for 2 local experts"):
        BaseLayer(8, OneBlockShort([BaseExpert(8, 8) for _ in range(2)]), 2)(torch.randn(4, 8))


def test_group_size_waits_for_its_group():
    experts = [BaseExpert(4, 4) for _ in range(2)]
    layer = BaseLayer(4, experts, 4, group_size=2)
    assert not layer.attached
    with pytest.raises(ValueError, match="call set_group"):
        layer(torch.randn(3, 4))
    with pytest.raises(ValueError, match="group of 2 ranks, got a group of 1"):
        layer.set_group(None)  # no torch.distributed: a single process
    with pytest.raises(ValueError, match=r"shape \(4, 4\)"):
        layer.set_centroids(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="group_size"):
        BaseLayer(4, experts, 4, group=object(), group_size=2)
    one = BaseLayer(4, experts[:1], 1, group_size=1)  # a group of one is there at once
    full = torch.randn(1, 4)
    one.set_centroids(full)
    assert one.attached and torch.equal(one.centroids.detach(), full)


def test_single_process_all_to_all_is_identity():
    x = torch.randn(5, 3)
    assert all_to_all(x, [5], [5], None) is x
    c = torch.tensor([2, 3])
    assert exchange_counts(c, None) is c
