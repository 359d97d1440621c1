"""SLAMB as a DeepSpeed client optimizer, on 2 gloo CPU ranks (base_plugin.optim.integrations).

* k = 1, H = 1 inside a DeepSpeed engine equals plain SLAMB (no DeepSpeed) on the same data, and the
  global-batch LAMB reference.
* k = 0.1: the engine's process group carries, step by step, exactly the bytes SLAMB itself counted
  (spy on every torch.distributed collective; DeepSpeed's comm layer calls them). Control: the same engine
  with its gradient all-reduce left on moves the gradients on top.
* DeepSpeed MoE (EP 2 on 2 ranks), SLAMB given as a callable: expert parameters are resolved to their
  expert-data-parallel group (size 1 here: never averaged), dense ones synchronised; apart from the MoE
  layer's token all-to-alls the engine moves only SLAMB's bytes.
* config errors name the setting (ZeRO >= 1, fp16/bf16, clipping, "optimizer" section).
* the example (examples/slamb/train_deepspeed.py) trains on 2 ranks with sparse traffic.
"""
import pytest
import torch
import torch.nn.functional as F

import base_plugin.deepspeed  # CPU accelerator: tests/conftest.py
from base_plugin.optim import SLAMB
from base_plugin.optim.integrations import check_deepspeed_config
from collective_spy import CollectiveSpy
from multirank import run_ranks
from test_optim_slamb import LR, WD, _model, _reference_lamb, _shard

import deepspeed  # noqa: E402 - installed by the test extra

STEPS, H = 6, 3
def _ds_config():
    return {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1, "train_batch_size": 16,
            "zero_optimization": {"stage": 0}, "steps_per_print": 10 ** 9}


def _slamb(params, k):
    return SLAMB(params, lr=LR, weight_decay=WD, compression=k, sync_interval=1 if k == 1 else H,
                 dense_threshold=0 if k == 1 else 200)


def _run(rank, world, k, mode):
    """mode: "plain" (no DeepSpeed), "engine" (deepspeed_initialize), "control" (engine all-reduce left on)."""
    from base_plugin.optim.integrations import deepspeed_initialize
    deepspeed.init_distributed(dist_backend="gloo")
    model = _model(seed=0)
    if mode == "plain":
        opt = _slamb(model.parameters(), k)
    elif mode == "engine":
        engine, opt, _, _ = deepspeed_initialize(model=model, optimizer=lambda p: _slamb(p, k),
                                                 model_parameters=model.parameters(), config=_ds_config())
        assert engine.enable_backward_allreduce is False
    else:
        # same checked config (clipping 0), only the engine's flag differs
        engine, opt, _, _ = deepspeed.initialize(model=model, optimizer=lambda p: _slamb(p, k),
                                                 model_parameters=model.parameters(),
                                                 config=check_deepspeed_config(_ds_config()))
        assert engine.enable_backward_allreduce is True
    per_step, slamb_bytes = [], []
    with CollectiveSpy() as spy:
        for t in range(1, STEPS + 1):
            before = spy.bytes()
            x, y = _shard(t, rank)
            if mode == "plain":
                opt.zero_grad()
                F.mse_loss(model(x), y).backward()
                opt.step()
            else:
                loss = F.mse_loss(engine(x), y)
                engine.backward(loss)
                engine.step()
            per_step.append(spy.bytes() - before)
            slamb_bytes.append(opt.comm_stats.last_step_bytes)
    # SLAMB counts its initial broadcast (made in its constructor, before the loop) with its first step
    slamb_bytes[0] -= opt.comm_stats.by_kind.get("broadcast", 0)
    return dict(params=[p.detach().clone() for p in model.parameters()], per_step=per_step,
                slamb_bytes=slamb_bytes, kinds=sorted({c[0] for c in spy.calls}))


def _both(rank, world, k):
    return {mode: _run(rank, world, k, mode) for mode in ("plain", "engine", "control")}


@pytest.fixture(scope="module")
def dense():
    return run_ranks(_both, 2, 1.0, timeout=150)


@pytest.fixture(scope="module")
def sparse():
    return run_ranks(_both, 2, 0.1, timeout=150)


def test_k1_engine_equals_plain_slamb_and_global_lamb(dense):
    ref = _reference_lamb(_model(seed=0), STEPS, shards=2)
    numel = sum(p.numel() for p in _model().parameters())
    for r in range(2):
        eng, plain = dense[r]["engine"], dense[r]["plain"]
        for a, b, c in zip(eng["params"], plain["params"], ref):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)
        # the engine moved nothing but SLAMB's dense gradient average (the first step also SLAMB's broadcast)
        assert eng["per_step"] == eng["slamb_bytes"] == plain["per_step"]
        assert eng["per_step"][1:] == [4 * numel] * (STEPS - 1)
        # control: DeepSpeed's own all-reduce doubles the gradient bytes (averaging twice is idempotent at k=1)
        assert dense[r]["control"]["per_step"][1:] == [8 * numel] * (STEPS - 1)


def test_k01_engine_carries_only_slamb_bytes(sparse):
    numel = sum(p.numel() for p in _model().parameters())
    for r in range(2):
        eng, plain, ctl = sparse[r]["engine"], sparse[r]["plain"], sparse[r]["control"]
        assert eng["per_step"] == eng["slamb_bytes"], (eng["per_step"], eng["slamb_bytes"])
        assert eng["per_step"] == plain["per_step"]
        steady = [b for t, b in enumerate(eng["per_step"][1:], start=2) if t % H]
        assert max(steady) < 0.5 * 4 * numel  # sparse steps: well under a dense gradient
        for a, b in zip(eng["params"], plain["params"]):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        # control: with the engine's all-reduce on, the full gradient crosses the wire every step on top
        assert [c - s for c, s in zip(ctl["per_step"], ctl["slamb_bytes"])] == [4 * numel] * STEPS
    # replicas differ between H boundaries and agree on them (STEPS is a multiple of H)
    for a, b in zip(sparse[0]["engine"]["params"], sparse[1]["engine"]["params"]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("change, key", [
    ({"zero_optimization": {"stage": 1}}, "zero_optimization.stage"),
    ({"zero_optimization": {"stage": 2}}, "zero_optimization.stage"),
    ({"bf16": {"enabled": True}}, "bf16.enabled"),
    ({"fp16": {"enabled": True}}, "fp16.enabled"),
    ({"gradient_clipping": 1.0}, "gradient_clipping"),
    ({"optimizer": {"type": "Lamb", "params": {"lr": 1e-3}}}, "optimizer"),
    ({"torch_autocast": {"enabled": True, "dtype": "torch.float16"}}, "torch_autocast.dtype"),
])
def test_config_that_would_reduce_gradients_is_refused(change, key):
    with pytest.raises(ValueError, match=rf"^{key}"):
        check_deepspeed_config({**_ds_config(), **change})
    check_deepspeed_config({**_ds_config(), "bf16": {"enabled": False}, "gradient_clipping": 0.0})


def test_shipped_config_is_accepted():
    import os
    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "slamb", "deepspeed_cpu.json")
    cfg = check_deepspeed_config(path)
    assert cfg["zero_optimization"]["stage"] == 0


def _example(rank, world, argv):
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "slamb",
                        "train_deepspeed.py")
    spec = importlib.util.spec_from_file_location("slamb_train_deepspeed", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


def test_example_trains_on_two_ranks_with_sparse_traffic():
    argv = ["--steps", "30", "--eval-every", "30", "--d-model", "64", "--layers", "1", "--seq", "32"]
    res = run_ranks(_example, 2, argv, timeout=200)
    for r in res:
        assert r["world"] == 2 and r["val"] < r["first_val"] - 1.0
        comm = r["comm"]
        steady = (comm["total_bytes"] - comm["by_kind"]["broadcast"]) / comm["steps"]
        assert comm["steps"] == 30 and 0 < steady < 0.25 * r["dense_bytes"]


class _MoENet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        from deepspeed.moe.layer import MoE
        self.inp = torch.nn.Linear(16, 32)
        self.moe = MoE(32, torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.ReLU(), torch.nn.Linear(48, 32)),
                       num_experts=4, ep_size=2, k=1)
        self.out = torch.nn.Linear(32, 4)

    def forward(self, x):
        h, l_aux, _ = self.moe(torch.tanh(self.inp(x)))
        return self.out(h), l_aux


def _moe_run(rank, world):
    from base_plugin.optim.integrations import deepspeed_initialize
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    model = _MoENet()
    # a callable: DeepSpeed creates the expert groups first, then SLAMB resolves them from group_name
    engine, opt, _, _ = deepspeed_initialize(model=model, optimizer=lambda p: _slamb(p, 0.1), config=_ds_config())
    worlds = {e.param.group_name if hasattr(e.param, "group_name") else "dense": e.world for e in opt._plan()}
    per_step, a2a, slamb_bytes = [], [], []
    with CollectiveSpy() as spy:
        for t in range(1, STEPS + 1):
            first = len(spy.calls)
            x, y = _shard(t, rank)
            out, l_aux = engine(x)
            engine.backward(F.mse_loss(out, y) + 0.01 * l_aux)
            engine.step()
            calls = spy.calls[first:]
            per_step.append(sum(c[1] for c in calls if c[0] != "all_to_all_single"))
            a2a.append(sum(c[1] for c in calls if c[0] == "all_to_all_single"))
            slamb_bytes.append(opt.comm_stats.last_step_bytes)
    slamb_bytes[0] -= opt.comm_stats.by_kind.get("broadcast", 0)
    named = {n: p.detach().clone() for n, p in model.named_parameters()}
    return dict(worlds=worlds, per_step=per_step, a2a=a2a, slamb_bytes=slamb_bytes, named=named)


def test_moe_experts_stay_local_and_only_slamb_talks():
    res = run_ranks(_moe_run, 2, timeout=150)
    for r in res:
        assert r["worlds"] == {"dense": 2, "ep_size_2": 1}  # expert-data-parallel group of EP 2 on 2 ranks: 1
        # per step: the MoE layer's token all-to-alls (forward and backward), and otherwise only SLAMB's bytes
        assert r["per_step"] == r["slamb_bytes"]
        assert min(r["a2a"]) > 0
    for name, p in res[0]["named"].items():
        same = torch.equal(p, res[1]["named"][name])
        assert same == ("experts" not in name), name  # dense replicas agree at the H boundary; experts differ


def test_slamb_section():
    from base_plugin.optim.integrations import slamb_from_section
    make = slamb_from_section({"lr": 0.01, "betas": [0.9, 0.99], "compression": 0.25, "sync_interval": 10})
    opt = make(_model().parameters())
    assert isinstance(opt, SLAMB) and opt.period == 4 and opt.sync_interval == 10
    assert opt.param_groups[0]["betas"] == (0.9, 0.99)
    with pytest.raises(ValueError, match=r"^slamb\.lrr: unknown key \(allowed: lr, "):
        slamb_from_section({"lrr": 0.01})
    with pytest.raises(ValueError, match=r"^compression must be"):
        slamb_from_section({"compression": 2.0})(_model().parameters())
