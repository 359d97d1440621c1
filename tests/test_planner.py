"""The paper-scale planner: counts from the meta build, memory model, layouts, DeepSpeed JSON, CLI."""
import json
import os

import pytest
import torch

from base_plugin.models import GPT, GPTConfig
from base_plugin.planner import (GIB, PlanError, activation_bytes_per_token, count_model, count_parameters,
                                 deepspeed_config, estimate_memory, launch_commands, plan_layout)
from base_plugin.planner.cli import main, paper_dir, paper_models, resolve_model

BASE_MODELS = ["base-small", "base-standard", "base-large"]


@pytest.fixture(scope="module")
def paper():
    """{name: (cfg, paper reference, counts)} for every config in configs/paper (one meta build each)."""
    out = {}
    for name in paper_models():
        cfg, ref = resolve_model(name)
        out[name] = (cfg, ref, count_parameters(cfg))
    return out


def test_paper_configs_are_all_there():
    assert {"base-small", "base-standard", "base-large", "dense", "moe-top1", "moe-top2"} <= set(paper_models())
    assert (paper_dir() / "README.md").is_file()


@pytest.mark.parametrize("name", BASE_MODELS)
def test_paper_totals_within_one_percent(paper, name):
    cfg, ref, c = paper[name]
    assert c.num_experts == 128 and c.sparse_layers == 1
    assert abs(c.total / ref["total"] - 1) < 0.01
    assert abs(c.per_expert / ref["per_expert"] - 1) < 0.01
    assert abs(c.shared / ref["shared"] - 1) < 0.03
    assert c.total == c.shared + 128 * c.per_expert
    assert c.active == c.shared + c.per_expert


def test_paper_models_have_matched_compute_per_token(paper):
    """Bigger experts, fewer shared layers: active parameters per token stay within 10 % of each other."""
    active = [paper[n][2].active for n in BASE_MODELS]
    assert max(active) / min(active) < 1.10


def test_standard_count_against_closed_form(paper):
    """An independent arithmetic check at full scale: embeddings + 24 blocks + 128 experts × 10 sublayers."""
    cfg, _, c = paper["base-standard"]
    d, f, v, s = 2048, 8192, cfg.vocab_size, cfg.max_seq_len
    shared = v * d + s * d + 2 * d + 24 * (12 * d * d + 13 * d)
    expert = 10 * (2 * d * f + f + 3 * d) + d
    assert (c.shared, c.per_expert, c.total) == (shared, expert, shared + 128 * expert)


@pytest.mark.parametrize("name", paper_models())
def test_scaled_down_paper_config_meta_equals_real_build(paper, name):
    cfg = paper[name][0]
    small = cfg.replace(vocab_size=67, max_seq_len=8, d_model=16, n_heads=2, ffn_dim=24, expert_ffn_dim=20,
                        num_experts=8, n_layers=min(cfg.n_layers, 4),
                        sparse_positions=tuple(p for p in cfg.positions if p <= 3)[:2] or cfg.sparse_positions[:0],
                        expert_sublayers=min(cfg.expert_sublayers, 3))
    torch.manual_seed(0)
    assert count_parameters(small) == count_model(GPT(small))


def test_comparison_models(paper):
    dense = paper["dense"][2]
    assert dense.expert == 0 and dense.total == dense.active
    top1, top2 = paper["moe-top1"][2], paper["moe-top2"][2]
    assert top1.total == top2.total and top1.sparse_layers == 12
    assert top2.active - top1.active == 12 * top1.per_expert
    # compute per token of the dense baseline within 5 % of BASE Standard's
    assert abs(dense.active / paper["base-standard"][2].active - 1) < 0.05


# ---- memory -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", BASE_MODELS + ["dense", "moe-top2"])
def test_memory_positive_and_zero_stages_ordered(paper, name):
    cfg, _, c = paper[name]
    lay = plan_layout(cfg, 128)
    m0, m1, m2 = (estimate_memory(cfg, c, lay, z) for z in (0, 1, 2))
    for m in (m0, m1, m2):
        assert min(m.parameters, m.gradients, m.optimizer, m.activations) > 0
        assert m.tokens_per_gpu == 2 * 1024
    assert m0.parameters == m1.parameters == m2.parameters
    assert m0.activations == m1.activations == m2.activations
    assert m0.optimizer > m1.optimizer == m2.optimizer
    assert m0.gradients == m1.gradients > m2.gradients
    assert m0.total > m1.total > m2.total
    # ZeRO 0: 2 + 2 + 12 bytes for each parameter this GPU holds
    here = c.shared + c.expert // lay.ep_size
    assert (m0.parameters, m0.gradients, m0.optimizer) == (2 * here, 2 * here, 12 * here)


def test_zero_shards_shared_state_over_all_gpus_and_experts_over_their_copies(paper):
    cfg, _, c = paper["base-standard"]
    one_copy, two_copies = plan_layout(cfg, 128), plan_layout(cfg, 256)
    assert (one_copy.experts_per_gpu, one_copy.expert_dp, two_copies.expert_dp) == (1, 1, 2)
    m = estimate_memory(cfg, c, one_copy, 1)
    assert m.optimizer == round(12 * (c.shared / 128 + c.per_expert))
    m = estimate_memory(cfg, c, two_copies, 2)
    assert m.gradients == round(2 * (c.shared / 256 + c.per_expert / 2))


def test_activation_formula_matches_korthikanti_for_a_plain_transformer():
    cfg = GPTConfig(vocab_size=1000, max_seq_len=512, d_model=256, n_layers=3, n_heads=8, dropout=0.1)
    h, a, s, v = 256, 8, 512, 1000
    ends = 2 * 2 * h + h + 6 * v
    assert activation_bytes_per_token(cfg) == ends + 3 * (34 * h + 5 * a * s)
    assert activation_bytes_per_token(cfg, flash_attention=True) == ends + 3 * 34 * h
    assert activation_bytes_per_token(cfg.replace(dropout=0.0)) == 2 * 2 * h + 6 * v + 3 * (32 * h + 2 * a * s)
    assert activation_bytes_per_token(cfg, recompute=True) < activation_bytes_per_token(cfg)


def test_base_layer_activations_grow_with_sublayers(paper):
    cfg = paper["base-standard"][0]
    diff = activation_bytes_per_token(cfg.replace(expert_sublayers=11)) - activation_bytes_per_token(cfg)
    assert diff == 2 * (2 * 2048 + 2 * 8192)


def test_fit_check(paper):
    cfg, _, c = paper["base-large"]
    m = estimate_memory(cfg, c, plan_layout(cfg, 128), 1)
    assert m.fits(m.total / GIB + 2.0) and not m.fits(m.total / GIB + 1.9)
    assert m.fits(m.total / GIB, reserve_gib=0) and not m.fits(m.total / GIB - 0.01, reserve_gib=0)
    assert m.fits(80) and not m.fits(16)


def test_bad_zero_stage_and_precision(paper):
    cfg, _, c = paper["base-small"]
    with pytest.raises(PlanError, match="ZeRO"):
        estimate_memory(cfg, c, plan_layout(cfg, 128), 3)
    with pytest.raises(PlanError, match="precision"):
        estimate_memory(cfg, c, plan_layout(cfg, 128), 1, precision="int8")


# ---- layouts ------------------------------------------------------------------------------------

def test_layouts(paper):
    cfg = paper["base-standard"][0]
    assert plan_layout(cfg, 64).experts_per_gpu == 2
    assert plan_layout(cfg, 1).experts_per_gpu == 128
    assert plan_layout(cfg, 512).expert_dp == 4
    assert plan_layout(cfg, 128, ep_size=64).experts_per_gpu == 2
    assert plan_layout(paper["dense"][0], 96).ep_size == 1


@pytest.mark.parametrize("gpus", [96, 3, 200])
def test_experts_not_spreadable_is_an_error_naming_the_problem(paper, gpus):
    with pytest.raises(PlanError, match=rf"128 experts cannot be spread over {gpus} GPUs"):
        plan_layout(paper["base-standard"][0], gpus)


def test_bad_ep_size(paper):
    with pytest.raises(PlanError, match="--ep-size 48"):
        plan_layout(paper["base-standard"][0], 96, ep_size=48)
    with pytest.raises(PlanError, match="no experts"):
        plan_layout(paper["dense"][0], 8, ep_size=8)


# ---- DeepSpeed JSON and commands ----------------------------------------------------------------

@pytest.mark.parametrize("zero", [0, 1, 2])
def test_deepspeed_json_passes_deepspeed_and_our_validation(paper, zero):
    from base_plugin.deepspeed.config import check_world, parse_section   # the DeepSpeed integration's own check
    from deepspeed.runtime.config import DeepSpeedConfig
    cfg = paper["base-standard"][0]
    conf = deepspeed_config(cfg, plan_layout(cfg, 128), zero)
    section = parse_section(conf["base_layer"])
    check_world(section, 128)
    assert (section.num_experts, section.ep_size, section.sublayers, section.experts) == (128, 128, 10, "paper")
    assert conf["train_batch_size"] == 2 * 8 * 128
    # DeepSpeed's own parser, for the same model on one process (its batch check uses the world size)
    one = {k: v for k, v in deepspeed_config(cfg, plan_layout(cfg, 1), zero).items() if k != "base_layer"}
    ds = DeepSpeedConfig(one)
    assert (ds.train_batch_size, ds.zero_optimization_stage, ds.gradient_clipping) == (16, zero, 0.1)


def test_deepspeed_section_names_modules_of_the_dense_twin(paper):
    from base_plugin.models import Inserted, build_meta
    from base_plugin.planner import dense_twin
    cfg = paper["base-small"][0]
    twin = build_meta(dense_twin(cfg).replace(d_model=16, n_heads=2, ffn_dim=16, expert_ffn_dim=16, vocab_size=8))
    names = dict(twin.named_modules())
    for name in deepspeed_config(cfg, plan_layout(cfg, 128))["base_layer"]["modules"]:
        assert name in names and isinstance(names[name.rsplit(".", 1)[0]], Inserted)


def test_no_base_section_for_other_models(paper):
    for name in ("dense", "moe-top1"):
        cfg = paper[name][0]
        assert "base_layer" not in deepspeed_config(cfg, plan_layout(cfg, 128))


def test_launch_commands(paper):
    cfg = paper["base-large"][0]
    cmds = launch_commands(cfg, plan_layout(cfg, 128), 1)
    assert "--num_nodes 16 --num_gpus 8" in cmds["deepspeed"]
    assert "--nnodes 16 --nproc-per-node 8" in cmds["torchrun"]
    meg = cmds["megatron"]
    assert "--expert-model-parallel-size 128" in meg and "--moe-router-load-balancing-type base" in meg
    assert f"--moe-ffn-hidden-size {27 * 8192}" in meg and "--use-distributed-optimizer" in meg
    assert "--global-batch-size 2048" in meg
    example = next(w for w in meg.split() if w.endswith("pretrain_gpt_base.py"))
    assert os.path.isabs(example) and os.path.isfile(example)  # runs from any directory
    single = launch_commands(cfg, plan_layout(cfg, 4), 0)
    assert "--standalone" in single["torchrun"] and "--num_gpus 4" in single["deepspeed"]
    with pytest.raises(PlanError, match="gpus-per-node"):
        launch_commands(cfg, plan_layout(cfg, 64), 0, gpus_per_node=6)
    top2 = paper["moe-top2"][0]
    assert "--moe-router-topk 2" in launch_commands(top2, plan_layout(top2, 128), 0)["megatron"]


# ---- CLI ----------------------------------------------------------------------------------------

def test_cli_writes_its_files(tmp_path, capsys):
    assert main(["--model", "base-small,base-large", "--gpus", "128", "--gpu-mem", "32", "--zero", "1",
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "base-small" in out and "| base-large | 116.87B |" in out and "fits" in out
    for name in ("base-small", "base-large"):
        d = tmp_path / name
        assert sorted(os.listdir(d)) == ["deepspeed_model.json", "ds_config.json", "launch.sh", "model.json",
                                         "plan.json", "plan.txt"]
        plan = json.loads((d / "plan.json").read_text())
        assert plan["fits"]["1"] is True and plan["parameters"]["total"] > 1e10
        assert json.loads((d / "ds_config.json").read_text())["zero_optimization"]["stage"] == 1
        assert GPTConfig.load(d / "model.json").sparse == "base"
        assert GPTConfig.load(d / "deepspeed_model.json").sparse == "dense"
        assert os.access(d / "launch.sh", os.X_OK)


def test_cli_errors(tmp_path, capsys):
    assert main(["--model", "base-standard", "--gpus", "96", "--out", str(tmp_path)]) == 2
    assert "128 experts cannot be spread over 96 GPUs" in capsys.readouterr().err
    assert not (tmp_path / "base-standard").exists()
    assert main(["--model", "base-huge"]) == 2
    assert "paper models" in capsys.readouterr().err


def test_cli_accepts_a_config_path_and_json_output(tmp_path, capsys):
    cfg = GPTConfig(vocab_size=100, max_seq_len=64, d_model=32, n_layers=2, n_heads=4, sparse="base",
                    num_experts=4, expert_sublayers=2, name="mine")
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"model": cfg.to_dict()}))
    assert main(["--model", str(path), "--gpus", "2", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data[0]["model"] == "mine" and data[0]["parameters"]["num_experts"] == 4


# ---- the emitted DeepSpeed config starts a 2-rank CPU run when scaled down ------------------------

def _scaled_down_run(rank, world, conf, model_dict):
    import warnings

    import base_plugin.deepspeed as bds
    import deepspeed.ops
    from base_plugin.deepspeed.moe import BaseMoE
    # In this spawned rank only: skip DeepSpeed's shared-memory CPU collectives, whose C++ op DeepSpeed
    # JIT-compiles at every init_distributed here (30-45 s); collectives then go through gloo.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_dict(model_dict))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine, *_ = bds.initialize(model=model, model_parameters=model.parameters(), config=conf)
    swapped = [n for n, m in engine.module.named_modules() if isinstance(m, BaseMoE)]
    torch.manual_seed(1 + rank)
    losses = []
    for _ in range(conf["gradient_accumulation_steps"]):
        idx = torch.randint(0, model_dict["vocab_size"], (conf["train_micro_batch_size_per_gpu"], 9))
        _, loss = engine(idx[:, :-1], idx[:, 1:])
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return swapped, losses, engine.global_steps


def test_emitted_deepspeed_config_starts_a_two_rank_cpu_run(paper):
    from multirank import run_ranks
    from base_plugin.planner import dense_twin
    cfg = paper["base-standard"][0].replace(vocab_size=64, max_seq_len=8, d_model=16, n_heads=2, ffn_dim=32,
                                            expert_ffn_dim=24, n_layers=2, sparse_positions=(1,), num_experts=4,
                                            expert_sublayers=2)
    layout = plan_layout(cfg, 2)
    conf = deepspeed_config(cfg, layout, 1, precision="fp32", total_steps=10)
    conf["optimizer"]["params"]["torch_adam"] = True     # CPU: DeepSpeed's fused Adam needs CUDA
    assert conf["base_layer"]["ep_size"] == 2 and conf["train_batch_size"] == 2 * 8 * 2
    results = run_ranks(_scaled_down_run, 2, conf, dense_twin(cfg).to_dict(), timeout=240)
    for swapped, losses, steps in results:
        assert swapped == ["layers.1.layer"]
        assert len(losses) == 8 and all(map(lambda v: v == v and abs(v) < 1e3, losses))
        assert steps == 1                                 # 8 micro-steps = one optimizer step
