"""Megatron-LM GPT pretraining with BASE layers, through Megatron-LM's own ``pretrain()``.

Run from anywhere with a Megatron-LM checkout on ``PYTHONPATH`` (tag ``core_v0.19.0``, which matches
megatron-core 0.19, or ``core_v0.16.1``; its ``megatron/core`` is then the megatron-core in use);
every ``pretrain_gpt.py`` argument works, plus:

    --moe-router-load-balancing-type base     BASE routing in every MoE layer (added to the choices)
    --base-no-shuffle                         no random token shuffle before the assignment
    --base-shuffle-group {tp_dp_cp,ep}        the ranks the shuffle mixes (default tp_dp_cp: all of them)
    --base-inference {greedy,exact}           routing outside training (default greedy)
    --base-paper-form                         the paper's exact mix: route and gate on the layer input,
                                              the pre-MLP LayerNorm moved in front of the experts

With ``base``, Megatron-LM's model builder (``gpt_builders.gpt_builder``) is used unchanged; the model
it builds comes from :func:`base_plugin.megatron.build_gpt_model`, so every MoE layer gets a
:class:`base_plugin.megatron.BaseRouter` or the run stops with an error naming the layer. BASE needs ``--moe-router-topk 1``
and ``--moe-aux-loss-coeff 0`` (the defaults this script sets) and no ``--moe-expert-capacity-factor``;
anything else stops with an error naming the option. Without ``base`` the script is ``pretrain_gpt.py``.

Example (1 node, 8 GPUs, EP 8):

    PYTHONPATH=$MEGATRON_LM torchrun --nproc-per-node 8 examples/megatron/pretrain_gpt_base.py \\
        --num-layers 12 --hidden-size 768 --num-attention-heads 12 --seq-length 1024 \\
        --max-position-embeddings 1024 --micro-batch-size 4 --global-batch-size 256 \\
        --num-experts 8 --expert-model-parallel-size 8 --moe-token-dispatcher-type alltoall \\
        --moe-router-load-balancing-type base --moe-grouped-gemm \\
        --lr 3e-4 --train-iters 1000 --bf16 --mock-data --tokenizer-type NullTokenizer --vocab-size 50304
"""
from __future__ import annotations

import argparse
import inspect
import os
import sys
from functools import partial

BASE = "base"


def add_base_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron-LM ``extra_args_provider``: accept ``base`` for ``--moe-router-load-balancing-type``
    and add the ``--base-*`` options."""
    for action in parser._actions:  # the option is Megatron-LM's own; only its choices grow
        if "--moe-router-load-balancing-type" in action.option_strings and action.choices is not None:
            if BASE not in action.choices:
                action.choices = list(action.choices) + [BASE]
            action.help = (action.help or "") + ' "base": BASE layers (exact balanced assignment, base_plugin).'
    if "--base-no-shuffle" in parser._option_string_actions:  # added before
        return parser
    group = parser.add_argument_group(title="BASE layers (base_plugin)")
    group.add_argument("--base-no-shuffle", dest="base_shuffle", action="store_false",
                       help="Do not shuffle tokens across ranks before the balanced assignment.")
    group.add_argument("--base-shuffle-group", choices=["tp_dp_cp", "ep"], default="tp_dp_cp",
                       help="Ranks over which tokens are shuffled (default: every rank of the stage).")
    group.add_argument("--base-inference", choices=["greedy", "exact"], default="greedy",
                       help="Routing when not training (default: greedy argmax, as in the paper).")
    group.add_argument("--base-paper-form", action="store_true",
                       help="Route and gate on the layer input; the pre-MLP LayerNorm feeds only the experts.")
    # BASE is top-1 without an auxiliary loss; Megatron-LM's parser defaults are top-2 with aux loss.
    parser.set_defaults(moe_router_topk=1, moe_aux_loss_coeff=0.0, moe_router_score_function="sigmoid")
    return parser


def uses_base(args) -> bool:
    kind = args.moe_router_load_balancing_type
    return BASE in kind if isinstance(kind, (list, tuple)) else kind == BASE


def _options(args):
    return dict(paper_form=args.base_paper_form, shuffle=args.base_shuffle,
                shuffle_group=args.base_shuffle_group, inference=args.base_inference)


def base_gpt_builder(args, pre_process, post_process, vp_stage=None, config=None, pg_collection=None):
    """Megatron-LM's ``gpt_builder``, building BASE routers when ``base`` is chosen.

    Megatron-LM's own builder picks the specs (decoder block, MTP, TE or local, ...) as it always
    does; only the ``GPTModel`` it constructs is :func:`base_plugin.megatron.build_gpt_model`, which
    puts :class:`~base_plugin.megatron.BaseRouter` into every MoE layer of those specs and checks the
    built model (every MoE router a BaseRouter, else ValueError naming the layer and the release)."""
    import gpt_builders

    if not uses_base(args):
        return gpt_builders.gpt_builder(args, pre_process, post_process, vp_stage, config=config,
                                        pg_collection=pg_collection)
    from base_plugin.megatron import build_gpt_model, check_base_config

    if config is None:
        from megatron.training.arguments import core_transformer_config_from_args

        config = core_transformer_config_from_args(args)
    check_base_config(config)  # a clear error naming the option, before anything is built
    options = _options(args)
    base_model = partial(build_gpt_model, paper_form=options.pop("paper_form"), router_options=options)
    # gpt_builders names GPTModel at module level; for this one call that name builds BASE models
    saved = gpt_builders.GPTModel
    gpt_builders.GPTModel = base_model
    try:
        return gpt_builders.gpt_builder(args, pre_process, post_process, vp_stage, config=config,
                                        pg_collection=pg_collection)
    finally:
        gpt_builders.GPTModel = saved


def main() -> None:
    try:
        import pretrain_gpt  # Megatron-LM's script: data, batches, loss, forward_step
        from megatron.core.enums import ModelType
        from megatron.training import pretrain
        from model_provider import model_provider
    except ImportError as exc:
        sys.exit(f"pretrain_gpt_base.py needs a Megatron-LM checkout (tag core_v0.19.0 or core_v0.16.1) on "
                 f"PYTHONPATH: {exc}")

    pretrain_gpt.train_valid_test_datasets_provider.is_distributed = True
    provider = partial(model_provider, base_gpt_builder)
    common = dict(get_embedding_ranks=pretrain_gpt.get_embedding_ranks)
    defaults = {"tokenizer_type": "GPT2BPETokenizer"}
    if "cfg_container" in inspect.signature(pretrain).parameters:  # core_v0.19.0: arguments parsed first
        from megatron.training.argument_utils import pretrain_cfg_container_from_args
        from megatron.training.arguments import parse_and_validate_args

        args = parse_and_validate_args(extra_args_provider=add_base_args, args_defaults=defaults)
        pretrain(pretrain_cfg_container_from_args(args), pretrain_gpt.train_valid_test_datasets_provider,
                 ModelType.encoder_or_decoder, pretrain_gpt.forward_step, model_provider=provider, **common)
    else:  # core_v0.16.1
        pretrain(pretrain_gpt.train_valid_test_datasets_provider, provider, ModelType.encoder_or_decoder,
                 pretrain_gpt.forward_step, args_defaults=defaults, extra_args_provider=add_base_args, **common)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
