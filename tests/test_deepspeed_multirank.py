"""BaseMoE inside real DeepSpeed engines on 1, 2 and 4 gloo CPU ranks.

One spawned job per world size (module-scoped fixtures); the tests check what the jobs return against a
single-process reference computed here. The model is a DeepSpeed ``MoE`` model swapped to BASE by
``base_plugin.deepspeed.initialize`` from the config's ``"base_layer"`` section, as a user would do.

* 2 ranks (EP 2) and 4 ranks (EP 2 x expert-data-parallel 2): losses and reduced gradients (after 2
  accumulated micro-steps) equal the reference; every expert gets exactly its share of tokens.
* clipping (ZeRO 0): the update is the unclipped gradient times DeepSpeed's clip coefficient.
* loss goes down on real text with ZeRO 0, 1, 2, in fp32 and in bf16.
* checkpoint round trip (ZeRO 1 and ZeRO 0): identical outputs and identical next-step losses.
* resharding: the 2-rank EP 2 checkpoint loads with EP 1 on 1 rank and EP 4 on 4 ranks, equal outputs.
* bad config on 2 ranks: ep_size > world size raises before any step; the launcher's
  ``--deepspeed_config`` path is read and stripped.
* DeepSpeed's MoE helpers on 2 ranks: a residual BaseMoE built directly with DeepSpeed's MoE param
  groups in a plain ``deepspeed.initialize``; ``has_moe_layers``, ``l_aux``, ``exp_counts``; our
  ``initialize`` refuses param groups made before its swap.

The rank functions put their inputs on the engine's device and return CPU tensors, so
``tests/test_cuda.py`` runs the same ones over NCCL on GPUs.
"""
import argparse
import json
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from multirank import run_ranks


D, FFN, E, VOCAB, SEQ, MICRO, SEED = 16, 24, 4, 256, 8, 2, 3
TIMEOUT = 400
TEXT_STEPS = 30
TEXT_RUNS = ((0, False), (1, False), (2, False), (0, True), (1, True), (2, True))  # (ZeRO stage, bf16)


class TinyLM(nn.Module):
    """Embedding -> DeepSpeed MoE (swapped to BASE) -> LayerNorm -> head; returns (logits, l_aux)."""

    def __init__(self, ep_size, d=D, k=1):
        super().__init__()
        from deepspeed.moe.layer import MoE
        self.emb = nn.Embedding(VOCAB, d)
        expert = nn.Sequential(nn.Linear(d, FFN), nn.GELU(), nn.Linear(FFN, d))
        self.moe = MoE(d, expert, num_experts=E, ep_size=ep_size, k=k)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, VOCAB)

    def forward(self, x):
        h = self.emb(x)
        out, l_aux, _ = self.moe(h)
        return self.head(self.norm(h + out)), l_aux


def build(ep_size, rank=0, seed=SEED, k=1):
    """The same global model for every ep_size: experts made distinct per *global* id (DeepSpeed's plain
    expert + data layout: EP rank = rank % ep_size). ``k``: top-k of the DeepSpeed MoE (before a swap)."""
    torch.manual_seed(seed)
    model = TinyLM(ep_size, k=k)
    local = E // ep_size
    ep_rank = rank % ep_size
    with torch.no_grad():
        for i, expert in enumerate(model.moe.deepspeed_moe.experts.deepspeed_experts):
            g = torch.Generator().manual_seed(1000 * seed + ep_rank * local + i)
            for p in expert.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model


def section(**kw):
    return {"shuffle": False, **kw}


def ds_config(stage=0, gas=1, clip=0.0, bf16=False, lr=1e-3, base=None, world=1):
    cfg = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": gas,
           "train_batch_size": MICRO * gas * world,
           "optimizer": {"type": "AdamW", "params": {"lr": lr, "torch_adam": True}},
           "zero_optimization": {"stage": stage}, "gradient_clipping": clip, "steps_per_print": 10 ** 9}
    if bf16:
        cfg["bf16"] = {"enabled": True}
    if base is not None:
        cfg["base_layer"] = base
    return cfg


def batches(world, steps, gas, seed=7):
    """LongTensor[steps, gas, world, MICRO, SEQ] of random bytes."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (steps, gas, world, MICRO, SEQ), generator=g)


def lm_loss(model_out, x):
    logits, l_aux = model_out
    return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB).float(), x[:, 1:].reshape(-1)) + l_aux


def global_expert_names(moe_prefix, ep_rank, local):
    """{local parameter name: global name} for the experts of a BaseMoE."""
    return {f"{moe_prefix}.deepspeed_moe.experts.deepspeed_experts.{i}":
            f"{moe_prefix}.deepspeed_moe.experts.deepspeed_experts.{ep_rank * local + i}" for i in range(local)}


def globalize(named, ep_rank, local):
    out = {}
    mapping = global_expert_names("moe", ep_rank, local)
    for n, t in named.items():
        for lp, gp in mapping.items():
            if n.startswith(lp + "."):
                n = gp + n[len(lp):]
                break
        out[n] = t
    return out


def text_bytes():
    from pydoc_data.topics import topics
    return torch.tensor(list("\n".join(topics[k] for k in sorted(topics)).encode("utf-8")[:200_000]),
                        dtype=torch.long)


# ----------------------------------------------------------------------------------------------------
# what runs on the ranks

def _engine(model, cfg, params=True):
    import base_plugin.deepspeed as bds
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine, *_ = bds.initialize(model=model, model_parameters=model.parameters() if params else None,
                                    config=cfg)
    return engine


def _equality_run(rank, world, ep_size, steps=2, gas=2):
    """Losses, reduced grads (at each boundary, before the step) and token counts per micro-step."""
    engine = _engine(build(ep_size, rank), ds_config(gas=gas, base=section(), world=world, lr=1e-2))
    moe = engine.module.moe
    local, ep_rank = moe.num_local_experts, moe.ep_rank
    data = batches(world, steps, gas)
    losses, grads, counts, received = [], [], [], []
    for s in range(steps):
        for m in range(gas):
            x = data[s, m, rank].to(engine.device)
            loss = lm_loss(engine(x), x)
            counts.append(moe.last_stats.tokens_per_expert.cpu().clone())
            received.append(moe.last_stats.tokens_received.cpu().clone())
            engine.backward(loss)
            losses.append(loss.item())
            if m == gas - 1:
                grads.append(globalize({n: p.grad.detach().cpu().clone() for n, p in engine.module.named_parameters()},
                                       ep_rank, local))
            engine.step()
    return dict(losses=losses, grads=grads, counts=counts, received=received, ep_rank=ep_rank,
                edp_ranks=sorted(torch.distributed.get_process_group_ranks(moe.edp_group)))


def _clip_run(rank, world, max_norm=0.05, lr=0.5):
    """One SGD step with clipping: reduced grads before, parameters before and after."""
    model = build(2, rank)
    cfg = ds_config(clip=max_norm, base=section(), world=world)
    del cfg["optimizer"]
    import base_plugin.deepspeed as bds
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine, *_ = bds.initialize(model=model, optimizer=lambda ps: torch.optim.SGD(ps, lr=lr),
                                    model_parameters=model.parameters(), config=cfg)
    x = batches(world, 1, 1)[0, 0, rank]
    engine.backward(lm_loss(engine(x), x))
    grads = {n: p.grad.clone() for n, p in engine.module.named_parameters()}
    before = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    engine.step()
    after = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    return dict(grads=grads, before=before, after=after, max_norm=max_norm, lr=lr)


def _text_run(rank, world, stage, bf16, ep_size=2):
    text = text_bytes()
    torch.manual_seed(SEED)
    model = TinyLM(ep_size, d=32)
    engine = _engine(model, ds_config(stage=stage, bf16=bf16, lr=2e-2, clip=1.0, base=section(shuffle=True),
                                      world=world))
    g = torch.Generator().manual_seed(100 + rank)
    seq = 32
    losses = []
    for _ in range(TEXT_STEPS):
        start = torch.randint(0, len(text) - seq, (MICRO,), generator=g)
        x = torch.stack([text[s:s + seq] for s in start.tolist()]).to(engine.device)
        loss = lm_loss(engine(x), x)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def _eval_outputs(engine, x):
    engine.eval()
    with torch.no_grad():
        out = engine(x.to(engine.device))[0].float().cpu().clone()
    engine.train()
    return out


def _checkpoint_run(rank, world, ckpt_dir, stage=1, ep_size=2):
    """Train, save, continue; a fresh engine loads and continues the same way."""
    data = batches(world, 6, 1, seed=11)
    probe = batches(1, 1, 1, seed=12)[0, 0, 0]

    def steps(engine, rng):
        out = []
        for s in rng:
            x = data[s, 0, rank].to(engine.device)
            loss = lm_loss(engine(x), x)
            engine.backward(loss)
            engine.step()
            out.append(loss.item())
        return out

    first = _engine(build(ep_size, rank), ds_config(stage=stage, base=section(), world=world, lr=1e-2))
    steps(first, range(3))
    first.save_checkpoint(ckpt_dir, tag="t3")
    saved_out = _eval_outputs(first, probe)
    continued = steps(first, range(3, 6))
    second = _engine(build(ep_size, rank, seed=SEED + 1),
                     ds_config(stage=stage, base=section(), world=world, lr=1e-2))
    fresh_out = _eval_outputs(second, probe)
    second.load_checkpoint(ckpt_dir, tag="t3")
    loaded_out = _eval_outputs(second, probe)
    resumed = steps(second, range(3, 6))
    return dict(saved_out=saved_out, loaded_out=loaded_out, fresh_out=fresh_out, continued=continued,
                resumed=resumed)


def _reshard_load(rank, world, ep_size, ckpt_dir):
    engine = _engine(build(ep_size, rank, seed=SEED + 5), ds_config(base=section(), world=world))
    assert engine.module.moe.ep_size == ep_size
    engine.load_checkpoint(ckpt_dir, tag="t3", load_module_only=True)
    probe = batches(1, 1, 1, seed=12)[0, 0, 0]
    return _eval_outputs(engine, probe)


def _bad_config_and_launcher(rank, world, tmp):
    out = {}
    model = build(2, rank)
    try:
        _engine(model, ds_config(base=section(ep_size=4), world=world))
    except ValueError as exc:
        out["ep_too_big"] = str(exc)
    # the deepspeed launcher: --deepspeed_config path.json in args
    path = os.path.join(tmp, f"ds_{rank}.json")
    with open(path, "w") as f:
        json.dump(ds_config(base=section(), world=world), f)
    args = argparse.Namespace(deepspeed_config=path, local_rank=rank)
    import base_plugin.deepspeed as bds
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build(2, rank)
        engine, *_ = bds.initialize(args=args, model=model, model_parameters=model.parameters())
    out["launcher_type"] = type(engine.module.moe).__name__
    out["launcher_args_untouched"] = args.deepspeed_config == path
    out["launcher_section_stripped"] = "base_layer" not in engine.config
    return out


def _compat_run(rank, world):
    """Megatron-DeepSpeed style: a residual BaseMoE built directly, DeepSpeed's MoE param groups, plain
    deepspeed.initialize; and our initialize refusing param groups made before its swap."""
    import deepspeed
    from deepspeed.moe.utils import has_moe_layers, split_params_into_different_moe_groups_for_optimizer

    import base_plugin.deepspeed as bds
    torch.manual_seed(SEED)
    model = TinyLM(2)
    model.moe = bds.BaseMoE(D, nn.Sequential(nn.Linear(D, FFN), nn.GELU(), nn.Linear(FFN, D)), num_experts=E,
                            ep_size=2, use_residual=True, shuffle=False)
    out = {"has_moe_layers": has_moe_layers(model)}
    param_groups = split_params_into_different_moe_groups_for_optimizer(
        {"params": list(model.parameters()), "name": "parameters"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups, config=ds_config(world=world))
    out["groups"] = [(g["name"], bool(g.get("moe")), len(g["params"])) for g in engine.optimizer.param_groups]
    x = batches(world, 1, 1)[0, 0, rank].to(engine.device)
    _, out["l_aux"], out["exp_counts"] = engine.module.moe(engine.module.emb(x))
    engine.backward(lm_loss(engine(x), x))
    out["residual_grads"] = [float(p.grad.abs().sum()) for p in engine.module.moe.coefficient.parameters()]
    engine.step()
    model = build(2, rank)
    stale = split_params_into_different_moe_groups_for_optimizer({"params": list(model.parameters()), "name": "p"})
    try:
        bds.initialize(model=model, model_parameters=stale, config=ds_config(base=section(), world=world))
    except ValueError as exc:
        out["stale_groups"] = str(exc)
    return out


def job2(rank, world, tmp):
    out = {"bad": _bad_config_and_launcher(rank, world, tmp), "compat": _compat_run(rank, world)}
    out["eq"] = _equality_run(rank, world, ep_size=2)
    out["clip"] = _clip_run(rank, world)
    out["ckpt"] = _checkpoint_run(rank, world, os.path.join(tmp, "ckpt"))  # ZeRO 1; resharded below
    out["ckpt0"] = _checkpoint_run(rank, world, os.path.join(tmp, "ckpt0"), stage=0)
    out["text"] = {(stage, bf16): _text_run(rank, world, stage, bf16)
                   for stage, bf16 in TEXT_RUNS}
    return out


def job4(rank, world, ckpt_dir):
    return {"eq": _equality_run(rank, world, ep_size=2), "reshard": _reshard_load(rank, world, 4, ckpt_dir)}


def job1(rank, world, ckpt_dir):
    return {"reshard": _reshard_load(rank, world, 1, ckpt_dir)}


# ----------------------------------------------------------------------------------------------------
# single-process reference

def reference(world, steps=2, gas=2, lr=1e-2):
    """Losses and averaged grads of the EP 1 model fed each rank's micro-batch separately (BASE balances
    per rank), stepping AdamW like the engine."""
    from base_plugin.deepspeed import parse_section, swap_layers
    model = build(1)
    swap_layers(model, parse_section(section()))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    data = batches(world, steps, gas)
    losses, grads = [], []
    for s in range(steps):
        opt.zero_grad()
        per = [[None] * world for _ in range(gas)]
        for m in range(gas):
            for r in range(world):
                loss = lm_loss(model(data[s, m, r]), data[s, m, r])
                (loss / (world * gas)).backward()
                per[m][r] = loss.item()
        losses.append(per)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        opt.step()
    return losses, grads


@pytest.fixture(scope="module")
def ckpt_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("ds_multirank"))


@pytest.fixture(scope="module")
def two(ckpt_root):
    return run_ranks(job2, 2, ckpt_root, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def four(two, ckpt_root):
    return run_ranks(job4, 4, os.path.join(ckpt_root, "ckpt"), timeout=TIMEOUT)


@pytest.fixture(scope="module")
def one(two, ckpt_root):
    return run_ranks(job1, 1, os.path.join(ckpt_root, "ckpt"), timeout=TIMEOUT)


def _check_equal(results, world):
    ref_losses, ref_grads = reference(world)
    steps, gas = len(ref_grads), len(ref_losses[0])
    for rank, res in enumerate(results):
        for s in range(steps):
            for m in range(gas):
                assert res["eq"]["losses"][s * gas + m] == pytest.approx(ref_losses[s][m][rank], rel=1e-5, abs=1e-6)
            got = res["eq"]["grads"][s]
            assert got.keys() <= ref_grads[s].keys()
            for n, g in got.items():
                torch.testing.assert_close(g, ref_grads[s][n], rtol=1e-4, atol=1e-6, msg=f"rank {rank} step {s} {n}")
    # every global expert's gradient is held somewhere, and all holders agree (the reduction group)
    held = {}
    for res in results:
        for n in res["eq"]["grads"][-1]:
            held.setdefault(n, 0)
            held[n] += 1
    assert all(f"moe.deepspeed_moe.experts.deepspeed_experts.{e}.base_centroid" in held for e in range(E))


def test_two_ranks_equal_single_process(two):
    _check_equal(two, 2)


def test_four_ranks_ep2_edp2_equal_single_process(four):
    _check_equal(four, 4)
    # EP 2 x EDP 2: ranks 0,2 hold experts 0,1; ranks 1,3 hold experts 2,3; reduction groups {0,2}, {1,3}
    assert [r["eq"]["ep_rank"] for r in four] == [0, 1, 0, 1]
    assert [r["eq"]["edp_ranks"] for r in four] == [[0, 2], [1, 3], [0, 2], [1, 3]]


@pytest.mark.parametrize("world", [2, 4])
def test_every_expert_gets_its_share(two, four, world):
    results = two if world == 2 else four
    n = MICRO * SEQ
    for res in results:
        for counts, received in zip(res["eq"]["counts"], res["eq"]["received"]):
            assert counts.tolist() == [n // E] * E
            assert received.tolist() == [2 * n // E] * (E // 2)  # EP 2: two ranks send to each expert


def test_clipping_scales_the_update(two):
    # DeepSpeed (ZeRO 0) clips with the mean over ranks of each rank's gradient norm.
    norms = [torch.sqrt(sum((g.double() ** 2).sum() for g in r["clip"]["grads"].values())) for r in two]
    max_norm, lr = two[0]["clip"]["max_norm"], two[0]["clip"]["lr"]
    coef = min(1.0, max_norm / (float(sum(norms)) / len(norms) + 1e-6))
    assert coef < 0.5  # clipping really happened
    for r in two:
        c = r["clip"]
        for n, g in c["grads"].items():
            torch.testing.assert_close(c["after"][n], c["before"][n] - lr * coef * g, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("stage,bf16", TEXT_RUNS)
def test_loss_goes_down_on_text(two, stage, bf16):
    for losses in (r["text"][(stage, bf16)] for r in two):
        k = 4
        assert sum(losses[-k:]) / k < sum(losses[:k]) / k - 0.5, losses


@pytest.mark.parametrize("which", ["ckpt", "ckpt0"])
def test_checkpoint_round_trip(two, which):
    for r in two:
        c = r[which]
        assert not torch.equal(c["fresh_out"], c["saved_out"])
        assert torch.equal(c["loaded_out"], c["saved_out"])
        assert c["resumed"] == c["continued"]


def test_reshard_to_one_and_four_ranks(two, one, four):
    saved = two[0]["ckpt"]["saved_out"]
    torch.testing.assert_close(one[0]["reshard"], saved, rtol=1e-5, atol=1e-6)
    for r in four:
        torch.testing.assert_close(r["reshard"], saved, rtol=1e-5, atol=1e-6)


def test_bad_config_on_ranks_and_launcher_path(two):
    for r in two:
        b = r["bad"]
        assert "ep_size" in b["ep_too_big"] and "4" in b["ep_too_big"] and "[1, 2]" in b["ep_too_big"]
        assert b["launcher_type"] == "BaseMoE"
        assert b["launcher_args_untouched"] and b["launcher_section_stripped"]


def test_deepspeed_moe_helpers_and_outputs(two):
    """has_moe_layers, split_params_into_different_moe_groups_for_optimizer param groups, use_residual,
    l_aux and exp_counts as DeepSpeed's MoE gives them, inside a plain deepspeed.initialize on 2 ranks."""
    n = MICRO * SEQ
    for r in two:
        c = r["compat"]
        assert c["has_moe_layers"] == (True, E)
        # dense: emb, the residual mlp (2 Linear) and coefficient, norm, head; experts: 2 local x 5 (centroid)
        assert c["groups"] == [("parameters", False, 1 + 4 + 2 + 2 + 2), ("ep_size_2", True, 2 * 5)]
        assert float(c["l_aux"]) == 0.0
        assert c["exp_counts"].tolist() == [n // E] * E  # tokens this rank routed per global expert
        assert all(g > 0 for g in c["residual_grads"])
        assert "param groups" in c["stale_groups"] and "model.parameters()" in c["stale_groups"]


def test_offline_reshard_cli(two, ckpt_root, tmp_path):
    """base-plugin reshard: plain state dicts for any ep_size, usable without DeepSpeed or a process group."""
    from base_plugin.deepspeed import parse_section, swap_layers
    from base_plugin.deepspeed.reshard import main
    ckpt = os.path.join(ckpt_root, "ckpt")
    assert main([ckpt, "--ep-size", "1", "--out", str(tmp_path / "one"), "--tag", "t3"]) == 0
    model = build(1, seed=SEED + 9)
    swap_layers(model, parse_section(section()))
    model.load_state_dict(torch.load(tmp_path / "one" / "ep_rank_0_of_1.pt", weights_only=False))
    model.eval()
    probe = batches(1, 1, 1, seed=12)[0, 0, 0]
    with torch.no_grad():
        torch.testing.assert_close(model(probe)[0], two[0]["ckpt"]["saved_out"], rtol=1e-5, atol=1e-6)
    assert main([ckpt, "--ep-size", "4", "--out", str(tmp_path / "four")]) == 0  # tag from "latest"
    full = torch.load(tmp_path / "one" / "ep_rank_0_of_1.pt", weights_only=False)
    prefix = "moe.deepspeed_moe.experts.deepspeed_experts."
    for r in range(4):
        part = torch.load(tmp_path / "four" / f"ep_rank_{r}_of_4.pt", weights_only=False)
        assert {k for k in part if prefix in k} == {k.replace(prefix + str(r), prefix + "0") for k in full
                                                    if k.startswith(prefix + str(r) + ".")}
        for k in full:
            if k.startswith(prefix + str(r) + "."):
                assert torch.equal(part[k.replace(prefix + str(r), prefix + "0")], full[k])
    with pytest.raises(SystemExit):
        main([ckpt, "--ep-size", "3", "--out", str(tmp_path / "three")])
