"""SLAMB / LAMB: single-process maths, and multi-rank behaviour on gloo CPU ranks (with timeouts)."""
import io
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from base_plugin.optim import LAMB, SLAMB, CountingComm, allreduce_gradients_
from collective_spy import CollectiveSpy
from multirank import run_ranks

LR, BETAS, EPS, WD, CLIP = 0.02, (0.9, 0.999), 1e-6, 0.01, (0.01, 1000.0)


# ---------------------------------------------------------------- helpers (module level: pickled by spawn)
def _model(seed=0, hidden=48):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, hidden),
                               torch.nn.Tanh(), torch.nn.Linear(hidden, 4))


def _shard(step, shard, n=8):
    g = torch.Generator().manual_seed(1000 * step + shard)
    return torch.randn(n, 16, generator=g), torch.randn(n, 4, generator=g)


def _train_step(model, opt, step, shard):
    x, y = _shard(step, shard)
    opt.zero_grad()
    F.mse_loss(model(x), y).backward()
    opt.step()


def _reference_lamb(model, steps, shards):
    """Independent single-process LAMB on the global batch (the union of ``shards`` shards)."""
    params = list(model.parameters())
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    for t in range(1, steps + 1):
        xs, ys = zip(*[_shard(t, s) for s in range(shards)])
        model.zero_grad()
        F.mse_loss(model(torch.cat(xs)), torch.cat(ys)).backward()
        with torch.no_grad():
            for p, mi, vi in zip(params, m, v):
                g = p.grad
                mi.copy_(BETAS[0] * mi + (1 - BETAS[0]) * g)
                vi.copy_(BETAS[1] * vi + (1 - BETAS[1]) * g * g)
                u = (mi / (1 - BETAS[0] ** t)) / ((vi / (1 - BETAS[1] ** t)).sqrt() + EPS) + WD * p
                xn, un = float(p.norm()), float(u.norm())
                phi = xn / un if xn > 0 and un > 0 else 1.0
                p -= LR * min(max(phi, CLIP[0]), CLIP[1]) * u
    return [p.detach().clone() for p in params]


# ---------------------------------------------------------------- single process
@pytest.mark.parametrize("kwargs, name", [
    (dict(lr=-1.0), "lr"), (dict(lr=float("nan")), "lr"), (dict(betas=(0.9, 1.0)), "betas"),
    (dict(betas=(-0.1, 0.9)), "betas"), (dict(beta3=1.5), "beta3"), (dict(compression=0.0), "compression"),
    (dict(compression=1.1), "compression"), (dict(sync_interval=0), "sync_interval"),
    (dict(sync_interval=2.5), "sync_interval"), (dict(weight_decay=-0.1), "weight_decay"), (dict(eps=-1e-8), "eps"),
    (dict(trust_clip=(2.0, 1.0)), "trust_clip"), (dict(trust_clip=(-1.0, 1.0)), "trust_clip"),
    (dict(dense_threshold=-1), "dense_threshold"), (dict(seed=-3), "seed"),
])
def test_bad_hyper_parameters_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name} must be"):
        SLAMB(_model().parameters(), **kwargs)


def test_bad_hyper_parameter_in_param_group():
    m = _model()
    with pytest.raises(ValueError, match="^beta3 must be in \\[0, 1\\]"):
        SLAMB([{"params": m[0].parameters(), "beta3": -0.5}, {"params": m[2].parameters()}])


def test_bad_param_group_added_later_leaves_optimizer_unchanged():
    m = _model()
    opt = SLAMB(m[0].parameters())
    with pytest.raises(ValueError, match="^trust_clip must be"):
        opt.add_param_group({"params": m[2].parameters(), "trust_clip": (1.0, 0.5)})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": m[2].parameters(), "lr": 0.5})
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 0.5]


def test_world1_slamb_equals_lamb_and_reference():
    steps = 6
    ref = _reference_lamb(_model(), steps, shards=1)
    out = []
    for make in (lambda p: SLAMB(p, lr=LR, weight_decay=WD, compression=0.1, sync_interval=2, dense_threshold=0),
                 lambda p: LAMB(p, lr=LR, weight_decay=WD)):
        model = _model()
        opt = make(model.parameters())
        for t in range(1, steps + 1):
            _train_step(model, opt, t, 0)
        assert opt.comm_stats.total_bytes == 0 and opt.comm_stats.steps == steps
        out.append([p.detach().clone() for p in model.parameters()])
    for a, b, r in zip(*out, ref):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out[0][0], _model()[0].weight)  # it did train


def test_period_and_schedule_from_compression():
    p = [torch.nn.Parameter(torch.zeros(4))]
    assert [SLAMB(p, compression=k).period for k in (1.0, 0.5, 0.3, 0.25, 0.1, 0.01)] == [1, 2, 4, 4, 10, 100]


# ---------------------------------------------------------------- multi-rank
def _dense_run(rank, world, steps):
    out = {}
    for name, make in (
            ("slamb_k1_h1", lambda p: SLAMB(p, lr=LR, weight_decay=WD, compression=1.0, sync_interval=1,
                                            dense_threshold=0)),
            ("lamb", lambda p: LAMB(p, lr=LR, weight_decay=WD))):
        model = _model(seed=rank)  # different on each rank: the first step's broadcast must fix that
        with CollectiveSpy(("all_reduce", "broadcast")) as spy:
            opt = make(model.parameters())
            for t in range(1, steps + 1):
                _train_step(model, opt, t, rank)
        out[name] = dict(params=[p.detach().clone() for p in model.parameters()], spy=spy.bytes(),
                         dtypes={c[2] for c in spy.calls}, stats=opt.comm_stats.as_dict())
    # the DDP-style baseline helper: AdamW + counted dense gradient averaging
    model = _model(seed=0)
    opt, comm = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD), CountingComm()
    with CollectiveSpy(("all_reduce", "broadcast")) as spy:
        for t in range(1, steps + 1):
            x, y = _shard(t, rank)
            opt.zero_grad()
            F.mse_loss(model(x), y).backward()
            allreduce_gradients_(model.parameters(), comm)
            opt.step()
            comm.end_step()
    out["adamw"] = dict(params=[p.detach().clone() for p in model.parameters()], spy=spy.bytes(),
                        stats=comm.stats.as_dict())
    return out


def test_k1_equals_global_batch_lamb_on_two_ranks():
    steps, world = 5, 2
    res = run_ranks(_dense_run, world, steps, timeout=120)
    ref = _reference_lamb(_model(seed=0), steps, shards=world)
    numel = sum(p.numel() for p in _model().parameters())
    for name in ("slamb_k1_h1", "lamb"):
        for r in range(world):
            got = res[r][name]
            for a, b in zip(got["params"], ref):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
            for a, b in zip(got["params"], res[0][name]["params"]):
                assert torch.equal(a, b)
            # bytes: the spy's view of the collectives = the optimizer's own count = broadcast + grads
            assert got["spy"] == got["stats"]["total_bytes"] == 4 * numel * (steps + 1)
            assert got["stats"]["by_kind"] == {"broadcast": 4 * numel, "grad": 4 * numel * steps}
            assert got["dtypes"] == {torch.float32}
    # AdamW baseline: equal to single-process AdamW on the global batch; bytes = gradients every step
    model = _model(seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD)
    for t in range(1, steps + 1):
        xs, ys = zip(*[_shard(t, s) for s in range(world)])
        opt.zero_grad()
        F.mse_loss(model(torch.cat(xs)), torch.cat(ys)).backward()
        opt.step()
    for r in range(world):
        for a, b in zip(res[r]["adamw"]["params"], model.parameters()):
            torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)
        assert res[r]["adamw"]["spy"] == res[r]["adamw"]["stats"]["total_bytes"] == 4 * numel * steps
        assert res[r]["adamw"]["stats"]["bytes_per_step"] == 4 * numel


ORACLE_STEP = 7  # off an H boundary (parameters are not averaged after it), after a full period
SPARSE = dict(lr=LR, weight_decay=WD, compression=0.3, sync_interval=3, dense_threshold=200, beta3=0.9)


def _sparse_run(rank, world, steps, ckpt_at):
    model = _model(seed=0)
    params = list(model.parameters())
    traj, masks, moments, step_bytes, spy_bytes, ckpt = [], [], [], [], [], None
    with CollectiveSpy(("all_reduce", "broadcast")) as spy:
        opt = SLAMB(model.parameters(), **SPARSE)
        prev = 0
        for t in range(1, steps + 1):
            if t == ORACLE_STEP:  # snapshot everything the step reads, for an independent recomputation
                x, y = _shard(t, rank)
                opt.zero_grad()
                F.mse_loss(model(x), y).backward()
                snap = [dict(x=p.detach().clone(), g=p.grad.clone(),
                             **{k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()})
                        for p in params]
                opt.step()
            else:
                _train_step(model, opt, t, rank)
            spy_bytes.append(spy.bytes() - prev)
            prev = spy.bytes()
            step_bytes.append(opt.comm_stats.last_step_bytes)
            traj.append([p.detach().clone() for p in params])
            masks.append([opt.sync_mask(p, t) for p in params])
            moments.append([opt.state[p]["exp_avg"].clone() for p in params])
            if t == ckpt_at:
                buf = io.BytesIO()
                torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
                ckpt = buf.getvalue()
    dtypes = {c[2] for c in spy.calls}
    # resume from the checkpoint into fresh objects (other init, other optimizer settings) and replay
    model2 = _model(seed=123)
    opt2 = SLAMB(model2.parameters(), lr=LR, weight_decay=WD, compression=0.5, sync_interval=7, seed=9,
                 dense_threshold=200, beta3=0.9)
    state = torch.load(io.BytesIO(ckpt), weights_only=False)
    model2.load_state_dict(state["model"])
    opt2.load_state_dict(state["opt"])
    resumed = []
    for t in range(ckpt_at + 1, steps + 1):
        _train_step(model2, opt2, t, rank)
        resumed.append([p.detach().clone() for p in model2.parameters()])
    return dict(traj=traj, masks=masks, moments=moments, step_bytes=step_bytes, spy_bytes=spy_bytes,
                total=opt.comm_stats.total_bytes, spy_total=sum(spy_bytes), dtypes=dtypes, resumed=resumed,
                snap=snap)


def test_sparse_slamb_on_four_ranks():
    world, steps, ckpt_at = 4, 8, 4
    res = run_ranks(_sparse_run, world, steps, ckpt_at, timeout=150)
    params = list(_model().parameters())
    sparse = [p.dim() > 1 and p.numel() >= SPARSE["dense_threshold"] for p in params]
    assert sparse == [True, False, True, False, False, False]  # last weight is 48*4 = 192 < 200: dense
    period = 4  # ceil(1 / 0.3)
    H = SPARSE["sync_interval"]

    for t in range(steps):
        for i, p in enumerate(params):
            mk = res[0]["masks"][t][i]
            # the same mask on every rank (nothing but float values crossed the wire: see dtypes below)
            for r in range(1, world):
                assert torch.equal(res[r]["masks"][t][i], mk)
            if not sparse[i]:
                assert mk.all()
                continue
            assert mk.sum() <= math.ceil(0.3 * p.numel())
            # the synchronised slice of the first moment is identical on all ranks, the rest is not
            for r in range(1, world):
                assert torch.equal(res[r]["moments"][t][i][mk], res[0]["moments"][t][i][mk])
            assert any(not torch.equal(res[r]["moments"][t][i][~mk], res[0]["moments"][t][i][~mk])
                       for r in range(1, world))
    # every element synchronised exactly once in any ceil(1/k) consecutive steps (any window, not only
    # aligned ones), which the staleness counters saved in the oracle snapshot confirm: at most P - 1
    for i in range(len(params)):
        if sparse[i]:
            for start in range(steps - period + 1):
                count = sum(res[0]["masks"][start + j][i].int() for j in range(period))
                assert torch.equal(count, torch.ones_like(count)), (i, start)
            assert int(res[0]["snap"][i]["staleness"].max()) == period - 1

    # parameters: identical on all ranks right after each H boundary; sparse ones differ in between
    for t in range(1, steps + 1):
        for i in range(len(params)):
            same = all(torch.equal(res[r]["traj"][t - 1][i], res[0]["traj"][t - 1][i]) for r in range(world))
            if t % H == 0 or not sparse[i]:
                assert same, (t, i)
            else:
                assert not same, (t, i)

    # bytes: optimizer's count == spy's count == broadcast + dense grads + scheduled moments + H averaging
    dense_n = sum(p.numel() for p, s in zip(params, sparse) if not s)
    sparse_n = sum(p.numel() for p, s in zip(params, sparse) if s)
    all_n = dense_n + sparse_n
    for r in range(world):
        assert res[r]["dtypes"] == {torch.float32}
        assert res[r]["spy_bytes"] == res[r]["step_bytes"]
        assert res[r]["total"] == res[r]["spy_total"]
        for t in range(1, steps + 1):
            moment_n = sum(int(res[0]["masks"][t - 1][i].sum()) for i in range(len(params)) if sparse[i])
            expect = 4 * (dense_n + moment_n + (sparse_n if t % H == 0 else 0) + (all_n if t == 1 else 0))
            assert res[r]["step_bytes"][t - 1] == expect, (r, t)
        steady = sum(res[r]["step_bytes"][1:H - 1])  # steps without broadcast / averaging
        assert steady < 0.5 * 4 * all_n * (H - 2)

    # the update of one step, recomputed from the formulas in SLAMB's docstring
    t, (b1, b2), b3, W = ORACLE_STEP, BETAS, SPARSE["beta3"], world
    assert t % H != 0
    for i in range(len(params)):
        snaps = [res[r]["snap"][i] for r in range(world)]
        g_avg = sum(sn["g"] for sn in snaps) / W
        mask = res[0]["masks"][t - 1][i]
        ms = [b1 * sn["exp_avg"] + (1 - b1) * (sn["g"] if sparse[i] else g_avg) for sn in snaps]
        m_avg = sum(ms) / W
        for r, sn in enumerate(snaps):
            g = sn["g"] if sparse[i] else g_avg
            m = torch.where(mask, m_avg, ms[r])
            v = b2 * sn["exp_avg_sq"] + (1 - b2) * g * g
            x = sn["x"]
            u = (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + EPS) + WD * x

            def phi(sel):
                xn, un = float(x[sel].norm()), float(u[sel].norm())
                return min(max(xn / un if xn > 0 and un > 0 else 1.0, CLIP[0]), CLIP[1])
            if sparse[i]:
                stale = torch.where(mask, torch.zeros_like(sn["staleness"]), sn["staleness"] + 1)
                assert int(stale.max()) >= 2  # the blend is exercised beyond one step of staleness
                rr = b3 ** stale.double()
                coeff = rr * LR * phi(mask) + (1 - rr) * LR / math.sqrt(W) * phi(~mask)
            else:
                coeff = LR * phi(torch.ones_like(mask))
            expect = x - (coeff.to(x.dtype) if torch.is_tensor(coeff) else coeff) * u
            torch.testing.assert_close(res[r]["traj"][t - 1][i], expect, rtol=1e-5, atol=1e-6)

    # checkpoint mid-run -> resume -> the same trajectory, bit for bit
    for r in range(world):
        for t in range(ckpt_at + 1, steps + 1):
            for a, b in zip(res[r]["resumed"][t - ckpt_at - 1], res[r]["traj"][t - 1]):
                assert torch.equal(a, b), (r, t)


def _expert_run(rank, world, steps):
    ep_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    mine = ep_groups[rank // 2]

    def build():
        torch.manual_seed(rank)  # every rank starts different: the first-step broadcasts must align them
        shared = torch.nn.Linear(16, 32)
        expert = torch.nn.Linear(32, 4)
        for p in expert.parameters():
            p.allreduce = False
            p.group_name = "ep_size_2"
        return shared, expert

    def run(shared, expert, make_opt):
        with CollectiveSpy(("all_reduce", "broadcast")) as spy:
            opt = make_opt()
            for t in range(1, steps + 1):
                x, y = _shard(t, rank)
                opt.zero_grad()
                F.mse_loss(expert(torch.tanh(shared(x))), y).backward()
                opt.step()
        return [p.detach().clone() for p in (*shared.parameters(), *expert.parameters())], spy.calls

    kw = dict(lr=LR, compression=0.25, sync_interval=2, dense_threshold=100)
    s1, e1 = build()
    explicit = run(s1, e1, lambda: SLAMB([{"params": s1.parameters()}, {"params": e1.parameters(), "group": mine}],
                                          **kw))
    s2, e2 = build()
    resolved = run(s2, e2, lambda: SLAMB([*s2.parameters(), *e2.parameters()], group_resolver=lambda name: mine,
                                          **kw))
    s3, e3 = build()
    try:
        SLAMB([*s3.parameters(), *e3.parameters()], **kw)
        error = None
    except ValueError as exc:
        error = str(exc)
    return dict(explicit=explicit[0], resolved=resolved[0], calls=explicit[1], error=error)


def test_expert_params_sync_only_within_their_group():
    world, steps = 4, 4
    res = run_ranks(_expert_run, world, steps, timeout=150)
    n_shared = 2
    for r in range(world):
        assert "group_name='ep_size_2'" in res[r]["error"]
        for a, b in zip(res[r]["explicit"], res[r]["resolved"]):
            assert torch.equal(a, b)
        # expert collectives only ever on this rank's expert-data-parallel pair
        pair = (0, 1) if r < 2 else (2, 3)
        assert {c[3] for c in res[r]["calls"]} == {(0, 1, 2, 3), pair}
    ps = [res[r]["explicit"] for r in range(world)]
    for i in range(len(ps[0])):
        if i < n_shared:  # shared: identical on all four ranks after the H boundary
            assert all(torch.equal(ps[r][i], ps[0][i]) for r in range(world))
        else:  # experts: identical within a pair, different experts across pairs
            assert torch.equal(ps[0][i], ps[1][i]) and torch.equal(ps[2][i], ps[3][i])
            assert not torch.allclose(ps[0][i], ps[2][i])
