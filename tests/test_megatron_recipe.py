"""The Megatron-LM recipe (examples/megatron/pretrain_gpt_base.py) and patches (patches/megatron-lm/).

On CPU: the example's argument handling, its model builder around a stand-in of Megatron-LM's
``gpt_builders`` module, the patches' size. With MEGATRON_LM_DIR pointing at a Megatron-LM checkout of
tag core_v0.19.0 (or core_v0.16.1): the patch applies cleanly (patches/megatron-lm/check.sh), and both
the example and the patched tree build BASE routers into a real Megatron-LM GPT model from Megatron-LM's
own parsed arguments, on CPU. The training run itself needs GPUs (tests/test_megatron_gpu.py).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess

import pytest

import megatron.core  # noqa: E402,F401 - the README test command installs base-plugin[megatron]

from multirank import run_ranks  # noqa: E402

TIMEOUT = 240
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "megatron", "pretrain_gpt_base.py")
PATCH_DIR = os.path.join(ROOT, "patches", "megatron-lm")


def _example():
    spec = importlib.util.spec_from_file_location("pretrain_gpt_base", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _megatron_like_parser():
    """The Megatron-LM options the example touches, declared as Megatron-LM core_v0.19.0 declares them."""
    parser = argparse.ArgumentParser(allow_abbrev=False)
    parser.add_argument("--moe-router-load-balancing-type", nargs="+", type=str, default="aux_loss",
                        choices=["aux_loss", "seq_aux_loss", "global_aux_loss", "sinkhorn", "quantile_balancing",
                                 "none"])
    parser.add_argument("--moe-router-topk", type=int, default=2)
    parser.add_argument("--moe-aux-loss-coeff", type=float, nargs="+", default=0.0)
    return parser


def test_example_adds_base_choice_and_options():
    ex = _example()
    parser = ex.add_base_args(_megatron_like_parser())
    args = parser.parse_args(["--moe-router-load-balancing-type", "base"])
    assert ex.uses_base(args) and args.moe_router_topk == 1 and args.moe_aux_loss_coeff == 0.0
    assert args.base_shuffle is True and args.base_inference == "greedy" and not args.base_paper_form
    args = parser.parse_args(["--moe-router-load-balancing-type", "base", "--base-no-shuffle", "--base-paper-form",
                              "--base-inference", "exact", "--base-shuffle-group", "ep"])
    assert ex._options(args) == dict(paper_form=True, shuffle=False, shuffle_group="ep", inference="exact")
    assert not ex.uses_base(parser.parse_args(["--moe-router-load-balancing-type", "aux_loss"]))
    ex.add_base_args(parser)  # twice: no duplicate choice
    action = next(a for a in parser._actions if "--moe-router-load-balancing-type" in a.option_strings)
    assert action.choices.count("base") == 1
    with pytest.raises(SystemExit):
        parser.parse_args(["--moe-router-load-balancing-type", "bogus"])


def _example_builder_job(rank, world):
    """base_gpt_builder around a stand-in for Megatron-LM's gpt_builders module (which names GPTModel at
    module level, as Megatron-LM's does): BASE models for "base", Megatron's own otherwise, the name
    restored after, a bad option named before anything is built."""
    import sys
    import types

    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    from base_plugin.megatron import BasePaperMoELayer, BaseRouter, check_base_routers
    from base_plugin.megatron.compat import TopKRouter

    ps.initialize_model_parallel()
    stand_in = types.ModuleType("gpt_builders")
    stand_in.GPTModel = GPTModel

    def gpt_builder(args, pre_process, post_process, vp_stage=None, config=None, pg_collection=None):
        spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False)
        return stand_in.GPTModel(config=config, transformer_layer_spec=spec, vocab_size=64, max_sequence_length=16,
                                 pre_process=pre_process, post_process=post_process, pg_collection=pg_collection)

    stand_in.gpt_builder = gpt_builder
    sys.modules["gpt_builders"] = stand_in
    ex = _example()
    parser = ex.add_base_args(_megatron_like_parser())

    def config(args, **kw):
        kind = args.moe_router_load_balancing_type  # nargs="+": a one-element list, as Megatron-LM collapses it
        kind = kind[0] if isinstance(kind, list) and len(kind) == 1 else kind
        return TransformerConfig(num_layers=2, hidden_size=16, num_attention_heads=2, num_moe_experts=4,
                                 moe_ffn_hidden_size=24, use_cpu_initialization=True, add_bias_linear=False,
                                 moe_router_load_balancing_type=kind,
                                 moe_router_topk=args.moe_router_topk, moe_aux_loss_coeff=args.moe_aux_loss_coeff,
                                 moe_router_score_function="sigmoid", **kw)

    args = parser.parse_args(["--moe-router-load-balancing-type", "base", "--base-paper-form", "--base-no-shuffle"])
    model = ex.base_gpt_builder(args, True, True, config=config(args))
    routers = check_base_routers(model)
    assert len(routers) == 2 and all(isinstance(r, BaseRouter) and r.shuffle is False for r in routers)
    assert all(isinstance(layer.mlp, BasePaperMoELayer) for layer in model.decoder.layers)
    assert stand_in.GPTModel is GPTModel  # restored
    args = parser.parse_args(["--moe-router-load-balancing-type", "aux_loss"])
    model = ex.base_gpt_builder(args, True, True, config=config(args))
    assert all(type(layer.mlp.router) is TopKRouter for layer in model.decoder.layers)
    args = parser.parse_args(["--moe-router-load-balancing-type", "base", "--moe-router-topk", "2"])
    try:
        ex.base_gpt_builder(args, True, True, config=config(args))
    except ValueError as exc:
        assert "moe_router_topk" in str(exc), exc
    else:
        raise AssertionError("moe_router_topk=2 was accepted")
    assert stand_in.GPTModel is GPTModel
    return True


def test_example_builds_base_models_through_megatron_lm_builder():
    assert run_ranks(_example_builder_job, 1, timeout=TIMEOUT) == [True]


PATCHES = {"core_v0.19.0": ["megatron/training/arguments.py", "megatron/training/models/gpt.py"],
           "core_v0.16.1": ["gpt_builders.py", "megatron/training/arguments.py"]}


@pytest.mark.parametrize("tag", sorted(PATCHES))
def test_patch_is_minimal_and_pinned(tag):
    patch = open(os.path.join(PATCH_DIR, f"{tag}-base-router.patch"), encoding="utf-8").read()
    files = [line[len("+++ b/"):] for line in patch.splitlines() if line.startswith("+++ b/")]
    assert files == PATCHES[tag]
    added = [l for l in patch.splitlines() if l.startswith("+") and not l.startswith("+++")]
    assert len(added) <= 10 and any("'base'" in l for l in added)
    assert any("build_gpt_model" in l for l in added) and not any("register" in l for l in added)


# ---------------------------------------------------------------- with a Megatron-LM checkout (MEGATRON_LM_DIR)
needs_megatron_lm = pytest.mark.skipif(
    not os.environ.get("MEGATRON_LM_DIR"),
    reason="set MEGATRON_LM_DIR to a Megatron-LM checkout of tag core_v0.19.0 or core_v0.16.1 (docs/megatron.md)")

from megatron_lm_rank import megatron_lm_model  # noqa: E402

LM_ARGS = ("--num-layers 2 --hidden-size 16 --num-attention-heads 2 --seq-length 16 --max-position-embeddings 16 "
           "--micro-batch-size 1 --global-batch-size 1 --num-experts 4 --moe-token-dispatcher-type alltoall "
           "--moe-router-load-balancing-type base --transformer-impl local --lr 1e-4 --train-iters 1 --mock-data "
           "--tokenizer-type NullTokenizer --vocab-size 64 --use-cpu-initialization "
           "--no-gradient-accumulation-fusion --no-persist-layer-norm").split()


@needs_megatron_lm
def test_patch_applies_cleanly():
    run = subprocess.run(["bash", os.path.join(PATCH_DIR, "check.sh"), os.environ["MEGATRON_LM_DIR"]],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr


@needs_megatron_lm
def test_example_builds_base_routers_in_a_megatron_lm_model():
    (routers, version), = run_ranks(megatron_lm_model, 1, os.environ["MEGATRON_LM_DIR"], "example",
                                    LM_ARGS + ["--base-no-shuffle"], EXAMPLE, timeout=TIMEOUT)
    assert routers == ["BaseRouter", "BaseRouter"], (routers, version)


@needs_megatron_lm
def test_patched_megatron_lm_builds_base_routers(tmp_path):
    tree = str(tmp_path / "Megatron-LM")
    shutil.copytree(os.environ["MEGATRON_LM_DIR"], tree, ignore=shutil.ignore_patterns(".git", "tests", "docs"))
    run = subprocess.run(["bash", os.path.join(PATCH_DIR, "check.sh"), tree, "--apply"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    argv = LM_ARGS + ["--moe-router-topk", "1", "--moe-router-score-function", "sigmoid"]
    (routers, version), = run_ranks(megatron_lm_model, 1, tree, "patch", argv, EXAMPLE, timeout=TIMEOUT)
    assert routers == ["BaseRouter", "BaseRouter"], (routers, version)
