"""The Megatron-LM recipe (examples/megatron/pretrain_gpt_base.py) and patch (patches/megatron-lm/).

On CPU: the example's argument handling and spec conversion. With MEGATRON_LM_DIR pointing at a
Megatron-LM checkout of tag core_v0.16.1: the patch applies cleanly (patches/megatron-lm/check.sh).
The recipe's training run needs GPUs (tests/test_megatron_gpu.py).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess

import pytest

import megatron.core  # noqa: E402,F401 - the README test command installs base-plugin[megatron]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "megatron", "pretrain_gpt_base.py")
PATCH_DIR = os.path.join(ROOT, "patches", "megatron-lm")


def _example():
    spec = importlib.util.spec_from_file_location("pretrain_gpt_base", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _megatron_like_parser():
    """The two Megatron-LM options the example touches, declared as Megatron-LM 0.16.1 declares them."""
    parser = argparse.ArgumentParser(allow_abbrev=False)
    parser.add_argument("--moe-router-load-balancing-type", nargs="+", type=str, default="aux_loss",
                        choices=["aux_loss", "seq_aux_loss", "global_aux_loss", "sinkhorn", "none"])
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


def test_example_converts_the_specs_megatron_lm_asks_for():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from base_plugin.megatron import BasePaperMoELayer, BaseRouter

    ex = _example()
    args = ex.add_base_args(_megatron_like_parser()).parse_args(
        ["--moe-router-load-balancing-type", "base", "--base-paper-form", "--base-no-shuffle"])
    make = ex._base_spec(get_gpt_layer_local_spec, args)
    moe = make(num_experts=4)
    router = moe.submodules.mlp.submodules.router
    assert router.func is BaseRouter and router.keywords["shuffle"] is False
    assert moe.submodules.mlp.module is BasePaperMoELayer
    dense = make()  # no experts: unchanged
    assert dense.submodules.mlp.module.__name__ == "MLP"
    as_list = ex._base_spec(lambda: [get_gpt_layer_local_spec(), get_gpt_layer_local_spec(num_experts=4)], args)()
    assert as_list[0].submodules.mlp.module.__name__ == "MLP"
    assert as_list[1].submodules.mlp.submodules.router.func is BaseRouter


def test_patch_is_minimal_and_pinned():
    patch = open(os.path.join(PATCH_DIR, "core_v0.16.1-base-router.patch"), encoding="utf-8").read()
    files = [line[len("+++ b/"):] for line in patch.splitlines() if line.startswith("+++ b/")]
    assert files == ["gpt_builders.py", "megatron/training/arguments.py"]
    added = [l for l in patch.splitlines() if l.startswith("+") and not l.startswith("+++")]
    assert len(added) <= 6 and any("'base'" in l for l in added) and any("register()" in l for l in added)


@pytest.mark.skipif(not os.environ.get("MEGATRON_LM_DIR"),
                    reason="set MEGATRON_LM_DIR to a Megatron-LM checkout of tag core_v0.16.1")
def test_patch_applies_cleanly():
    run = subprocess.run(["bash", os.path.join(PATCH_DIR, "check.sh"), os.environ["MEGATRON_LM_DIR"]],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
