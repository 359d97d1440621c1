"""Resuming DeepSpeed engine checkpoints with ``base_plugin.deepspeed.load_checkpoint``: another
expert-parallel size with the optimizer state carried over, and a top-k run switched to BASE.

Jobs on 2, 1 and 4 gloo CPU ranks (module fixtures), the model of ``test_deepspeed_multirank``.

* Resharding (ZeRO 0, 1, 2): a BASE run on 2 ranks (EP 2) trains 2 steps, saves, and trains 2 more —
  the run that does not reshard. Its checkpoint resumes on 1 rank (EP 1), on 4 ranks (EP 4) and, the
  same layout, on 2, and the next 2 steps' losses equal the first run's. Each step averages the same 4 micro-batches, every
  one routed on its own (BASE balances per rank): 2 ranks x 2 accumulation steps, 1 x 4, 4 x 1. A
  control resumes without the optimizer state and must differ.
* Top-k -> BASE: checkpoints of DeepSpeed's own MoE (top-1 and top-2, EP 1 and 2, ZeRO 0 and 2) resume
  with the ``"base_layer"`` section added: experts identical, centroids = the saved gate rows, the Adam
  moments and step of every shared parameter carried over, the centroids without state, the step
  counter kept; then a training step runs.
* The reverse, a BASE checkpoint into DeepSpeed's top-k MoE, is refused with a clear message.
"""
import os
import warnings

import pytest
import torch

from multirank import run_ranks
from test_deepspeed_multirank import E, batches, build, ds_config, lm_loss, section

TIMEOUT = 500
UNITS = 4  # micro-batches per step, each one routing problem
STAGES = (0, 1, 2)
TOPK = ((1, 1, 0), (1, 2, 2), (2, 1, 2), (2, 2, 0))  # (k, ep_size, ZeRO stage) of the top-k runs
LR = 1e-2
GATE = "moe.deepspeed_moe.gate.wg.weight"


def units():
    """LongTensor[4 steps, UNITS, MICRO, SEQ]."""
    return batches(UNITS, 4, 1, seed=21)[:, 0]


def _engine(model, cfg):
    import base_plugin.deepspeed as bds
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine, *_ = bds.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    return engine


def _train(engine, rank, world, steps):
    """Losses {(step, unit): loss} of this rank; rank r takes units r*G .. r*G+G-1 of every step."""
    gas = UNITS // world
    data, out = units(), {}
    for s in steps:
        for m in range(gas):
            j = rank * gas + m
            x = data[s, j]
            loss = lm_loss(engine(x), x)
            engine.backward(loss)
            engine.step()
            out[(s, j)] = loss.item()
    return out


def _states(engine):
    """{global name: {"exp_avg", "exp_avg_sq": full tensors}} of this rank's parameters, and the steps."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    from deepspeed.utils import safe_get_full_optimizer_state

    from base_plugin.deepspeed.optimizer_state import global_names
    names, opt = global_names(engine), engine.optimizer
    out, steps = {}, set()
    zero = isinstance(opt, DeepSpeedZeroOptimizer)
    if zero:
        # DeepSpeed (0.19.8) links each parameter's view of the optimizer state after the first param
        # group's first step, when the expert group has no state yet: link them again now.
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()
        steps = {float(s["step"]) for s in opt.optimizer.state_dict()["state"].values()}
    for n, p in engine.module.named_parameters():
        if zero:
            out[names[id(p)]] = {k: safe_get_full_optimizer_state(p, k).clone() for k in ("exp_avg", "exp_avg_sq")}
        elif p in opt.state:
            out[names[id(p)]] = {k: opt.state[p][k].clone() for k in ("exp_avg", "exp_avg_sq")}
            steps.add(float(opt.state[p]["step"]))
    return out, steps


def _weights(engine):
    from base_plugin.deepspeed.optimizer_state import global_names
    names = global_names(engine)
    return {names[id(p)]: p.detach().clone() for p in engine.module.parameters()}


# ----------------------------------------------------------------------------------------------------
# what runs on the ranks

def _reshard_source(rank, world, root, stage):
    engine = _engine(build(2, rank), ds_config(stage=stage, gas=UNITS // world, world=world, lr=LR, base=section()))
    _train(engine, rank, world, range(2))
    engine.save_checkpoint(os.path.join(root, f"base_z{stage}"), tag="t2")
    return _train(engine, rank, world, range(2, 4))


def _topk_source(rank, world, root, k, ep, stage):
    """DeepSpeed's own top-k MoE trains 2 steps and saves; its weights and optimizer state."""
    engine = _engine(build(ep, rank, k=k), ds_config(stage=stage, gas=UNITS // world, world=world, lr=LR))
    _train(engine, rank, world, range(2))
    engine.save_checkpoint(os.path.join(root, f"topk_{k}_{ep}_{stage}"), tag="t2")
    states, steps = _states(engine)
    return dict(weights=_weights(engine), states=states, steps=steps)


def _topk_resumed(rank, world, root, k, ep, stage):
    """The same model code with the "base_layer" section, resumed from the top-k checkpoint."""
    import base_plugin.deepspeed as bds
    engine = _engine(build(ep, rank, seed=99, k=k),
                     ds_config(stage=stage, gas=UNITS // world, world=world, lr=LR, base=section()))
    bds.load_checkpoint(engine, os.path.join(root, f"topk_{k}_{ep}_{stage}"))
    weights = _weights(engine)
    states, steps = _states(engine)
    global_steps = engine.global_steps
    losses = _train(engine, rank, world, range(2, 3))
    return dict(weights=weights, states=states, steps=steps, global_steps=global_steps, losses=losses,
                kind=type(engine.module.moe).__name__)


def _refused(rank, world, root):
    """A BASE checkpoint into DeepSpeed's top-k MoE: ours and DeepSpeed's own load both refuse."""
    import base_plugin.deepspeed as bds
    engine = _engine(build(2, rank), ds_config(stage=0, gas=UNITS // world, world=world, lr=LR))
    out = {}
    for key, load in (("ours", bds.load_checkpoint), ("deepspeed", type(engine).load_checkpoint)):
        try:
            load(engine, os.path.join(root, "base_z0"))
        except (ValueError, RuntimeError) as exc:
            out[key] = f"{type(exc).__name__}: {exc}"
    return out


def job2(rank, world, root):
    out = {"reshard": {stage: _reshard_source(rank, world, root, stage) for stage in STAGES}}
    out["resumed"] = {stage: _resharded(rank, world, root, stage) for stage in STAGES}  # the same layout
    out["refused"] = _refused(rank, world, root)
    out["topk"] = {}
    for k, ep, stage in TOPK:
        out["topk"][(k, ep, stage)] = (_topk_source(rank, world, root, k, ep, stage),
                                       _topk_resumed(rank, world, root, k, ep, stage))
    return out


def _resharded(rank, world, root, stage, load_optimizer_states=True):
    import base_plugin.deepspeed as bds
    engine = _engine(build(world, rank, seed=77),
                     ds_config(stage=stage, gas=UNITS // world, world=world, lr=LR, base=section()))
    assert engine.module.moe.ep_size == world
    bds.load_checkpoint(engine, os.path.join(root, f"base_z{stage}"), load_optimizer_states=load_optimizer_states)
    assert engine.global_steps == 2
    return _train(engine, rank, world, range(2, 4))


def job_resharded(rank, world, root):
    out = {stage: _resharded(rank, world, root, stage) for stage in STAGES}
    if world == 1:
        out["fresh optimizer"] = _resharded(rank, world, root, 0, load_optimizer_states=False)
    return out


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("ds_resume"))


@pytest.fixture(scope="module")
def two(root):
    return run_ranks(job2, 2, root, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def resharded(two, root):
    return {w: run_ranks(job_resharded, w, root, timeout=TIMEOUT) for w in (1, 4)}


def _merged(results):
    out = {}
    for r in results:
        out.update(r)
    return out


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("stage", STAGES)
def test_resharded_run_continues_the_same_trajectory(two, resharded, stage, world):
    baseline = _merged(r["reshard"][stage] for r in two)
    got = _merged(r["resumed"][stage] for r in two) if world == 2 else _merged(r[stage] for r in resharded[world])
    assert sorted(got) == sorted(baseline) == [(s, j) for s in (2, 3) for j in range(UNITS)]
    for key in baseline:
        assert got[key] == pytest.approx(baseline[key], rel=1e-5), key


def test_resharding_without_the_optimizer_state_does_not(two, resharded):
    baseline = _merged(r["reshard"][0] for r in two)
    fresh = _merged(r["fresh optimizer"] for r in resharded[1])
    assert max(abs(fresh[k] - baseline[k]) for k in baseline if k[0] == 3) > 1e-3


def test_base_checkpoint_into_topk_is_refused(two):
    for r in two:
        assert r["refused"]["ours"].startswith("ValueError") and "BASE" in r["refused"]["ours"]
        assert "base_layer" in r["refused"]["ours"]
        assert "base_centroid" in r["refused"]["deepspeed"]


@pytest.mark.parametrize("k,ep,stage", TOPK)
def test_topk_checkpoint_resumes_as_base(two, k, ep, stage):
    local = E // ep
    prefix = "moe.deepspeed_moe.experts.deepspeed_experts."
    for r in two:
        source, resumed = r["topk"][(k, ep, stage)]
        assert resumed["kind"] == "BaseMoE" and resumed["global_steps"] == 2
        gate = source["weights"][GATE]
        assert GATE not in resumed["weights"]
        centroids = {n: w for n, w in resumed["weights"].items() if n.endswith(".base_centroid")}
        assert len(centroids) == local
        for n, w in centroids.items():
            assert torch.equal(w, gate[int(n[len(prefix):].split(".")[0])])
        shared = [n for n in resumed["weights"] if not n.endswith(".base_centroid")]
        assert set(shared) == set(source["weights"]) - {GATE}
        for n in shared:
            assert torch.equal(resumed["weights"][n], source["weights"][n]), n
            for key in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(resumed["states"][n][key], source["states"][n][key], rtol=0, atol=0)
        assert resumed["steps"] == source["steps"] == {2.0}
        for n in centroids:  # no moments: fresh without ZeRO, zeros in the ZeRO partition
            if stage == 0:
                assert n not in resumed["states"]
            else:
                assert all(not v.any() for v in resumed["states"][n].values())
        assert all(v == v and v < 20 for v in resumed["losses"].values())  # it trains on
