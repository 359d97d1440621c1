"""The DeepSpeed JSON and the launch commands for a model on N GPUs.

The training hyper-parameters are the paper's (§4.1 of Lewis et al. 2021): each GPU processes two
sequences of 1024 tokens, gradients accumulated over 8 updates, Adam, 2000 warm-up steps then linear
decay, gradient clipping at 0.1 (l2 norm), learning rate tuned in {0.5, 0.75, 1.0}·10⁻⁴ (1e-4 here).
The paper trains for a wall-clock budget (≈2.5 days), not a step count: ``total_steps`` is yours to set.

The ``"base_layer"`` section follows :mod:`base_plugin.deepspeed.config`: the model is built with
``sparse="dense"`` (a plain stack of ``S`` sublayers where each BASE layer goes, so the model itself
needs no distributed setup) and the section turns those modules into BASE layers with ``num_experts``
fresh paper experts (``"experts": "paper"``, ``"sublayers": S``) over expert-parallel groups of
``ep_size`` GPUs.
"""
from __future__ import annotations

import json
import shlex
from typing import Dict

from ..models import GPTConfig
from ..resources import shipped
from .memory import Layout, PlanError

MICRO_BATCH, ACCUMULATION, WARMUP, CLIP, LR = 2, 8, 2000, 0.1, 1e-4
ADAM_BETAS, ADAM_EPS = (0.9, 0.98), 1e-8  # not stated in the paper; fairseq's usual LM choice


def deepspeed_config(cfg: GPTConfig, layout: Layout, zero: int = 0, *, precision: str = "fp16",
                     total_steps: int = 100_000, lr: float = LR) -> dict:
    """DeepSpeed's JSON (its own schema) plus our ``"base_layer"`` section for BASE models."""
    conf = {
        "train_batch_size": MICRO_BATCH * ACCUMULATION * layout.gpus,
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_accumulation_steps": ACCUMULATION,
        "gradient_clipping": CLIP,
        "optimizer": {"type": "Adam", "params": {"lr": lr, "betas": list(ADAM_BETAS), "eps": ADAM_EPS,
                                                 "weight_decay": 0.0}},
        "scheduler": {"type": "WarmupDecayLR",
                      "params": {"warmup_min_lr": 0.0, "warmup_max_lr": lr, "warmup_num_steps": WARMUP,
                                 "warmup_type": "linear", "total_num_steps": total_steps}},
        "zero_optimization": {"stage": zero},
        "steps_per_print": 100,
        "wall_clock_breakdown": False,
    }
    if precision == "fp16":
        conf["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                        "hysteresis": 2, "min_loss_scale": 1}
    elif precision == "bf16":
        conf["bf16"] = {"enabled": True}
    if cfg.sparse == "base":
        conf["base_layer"] = base_layer_section(cfg, layout)
    return conf


def base_layer_section(cfg: GPTConfig, layout: Layout) -> dict:
    """The ``"base_layer"`` section for ``cfg`` built with ``sparse="dense"`` (see the module docstring)."""
    return {
        "enabled": True,
        "moe_layers": False,
        "modules": dense_twin_layer_names(cfg),
        "num_experts": cfg.num_experts,
        "ep_size": layout.ep_size,
        "experts": "paper",
        "sublayers": cfg.expert_sublayers,
        "ffn_dim": cfg.expert_ffn,
        "hidden_size": cfg.d_model,
        "shuffle": cfg.base_shuffle,
        "assignment": "exact",
        "inference": cfg.base_inference,
    }


def dense_twin(cfg: GPTConfig) -> GPTConfig:
    """``cfg`` with each BASE layer as a plain dense stack (what the DeepSpeed section then swaps)."""
    return cfg.replace(sparse="dense") if cfg.sparse == "base" else cfg


def dense_twin_layer_names(cfg: GPTConfig):
    """Module names of the inserted layers in ``GPT(dense_twin(cfg))`` (= ``GPT.layer_names()``): the
    j-th inserted layer (positions sorted) follows p_j blocks and j inserted layers."""
    return [f"layers.{p + j}.layer" for j, p in enumerate(sorted(cfg.positions))]


def _nodes(layout: Layout, gpus_per_node: int):
    if layout.gpus <= gpus_per_node:
        return 1, layout.gpus
    if layout.gpus % gpus_per_node:
        raise PlanError(f"--gpus {layout.gpus} is not a multiple of --gpus-per-node {gpus_per_node}")
    return layout.gpus // gpus_per_node, gpus_per_node


def megatron_args(cfg: GPTConfig, layout: Layout, zero: int, precision: str, total_steps: int) -> list:
    """Megatron-LM arguments for the same model (data parallel over all GPUs, expert parallel ep).

    Megatron's MoE replaces a block's FFN by one FFN per expert; the paper's BASE layer is an extra
    layer of S residual sublayers. The closest Megatron model puts the experts in the FFN of the block
    at the BASE position with ``--moe-ffn-hidden-size S·f``: the same parameters and FLOPs per expert
    (up to S − 1 LayerNorms and biases), one wide FFN instead of S narrow ones, and that block's dense
    FFN gone (−(2hf + f + h) shared parameters). The numbers this planner prints are for the paper model.
    """
    args = ["--num-layers", cfg.n_layers, "--hidden-size", cfg.d_model, "--num-attention-heads", cfg.n_heads,
            "--ffn-hidden-size", cfg.ffn, "--seq-length", cfg.max_seq_len,
            "--max-position-embeddings", cfg.max_seq_len, "--position-embedding-type", "learned_absolute",
            "--normalization", "LayerNorm", "--micro-batch-size", MICRO_BATCH,
            "--global-batch-size", MICRO_BATCH * ACCUMULATION * layout.gpus,
            "--lr", LR, "--min-lr", 0.0, "--lr-decay-style", "linear", "--lr-warmup-iters", WARMUP,
            "--train-iters", total_steps, "--clip-grad", CLIP, "--adam-beta1", ADAM_BETAS[0],
            "--adam-beta2", ADAM_BETAS[1], "--weight-decay", 0.0,
            "--attention-dropout", cfg.dropout, "--hidden-dropout", cfg.dropout]
    if not cfg.tie_embeddings:
        args += ["--untie-embeddings-and-output-weights"]
    if precision in ("fp16", "bf16"):
        args += [f"--{precision}"]
    if zero >= 1:
        args += ["--use-distributed-optimizer"]  # Megatron's ZeRO-1 equivalent
    if cfg.sparse in ("base", "moe"):
        freq = [0] * cfg.n_layers
        for p in cfg.positions:
            freq[min(p, cfg.n_layers - 1)] = 1
        width = cfg.expert_ffn * (cfg.expert_sublayers if cfg.sparse == "base" else 1)
        args += ["--num-experts", cfg.num_experts, "--expert-model-parallel-size", layout.ep_size,
                 "--moe-layer-freq", "[" + ",".join(map(str, freq)) + "]", "--moe-ffn-hidden-size", width,
                 "--moe-token-dispatcher-type", "alltoall", "--moe-grouped-gemm"]
        if cfg.sparse == "base":
            args += ["--moe-router-load-balancing-type", "base"]
        else:
            args += ["--moe-router-topk", cfg.top_k, "--moe-router-load-balancing-type", "aux_loss",
                     "--moe-aux-loss-coeff", cfg.aux_loss_coef, "--moe-expert-capacity-factor", cfg.capacity_factor]
    args += ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", "$VOCAB_FILE", "--merge-file", "$MERGE_FILE",
             "--data-path", "$DATA_PATH"]
    return [str(a) for a in args]


def _join(words) -> str:
    # words with $VARS are ours and stay expandable; everything else is quoted for the shell
    return " ".join(w if "$" in w else shlex.quote(w) for w in words)


def launch_commands(cfg: GPTConfig, layout: Layout, zero: int = 0, *, precision: str = "fp16",
                    total_steps: int = 100_000, gpus_per_node: int = 8, model_config: str = "model.json",
                    ds_config: str = "ds_config.json") -> Dict[str, str]:
    """``{"deepspeed": ..., "torchrun": ..., "megatron": ...}`` shell commands.

    The DeepSpeed / torchrun commands run ``$TRAIN_SCRIPT``, your DeepSpeed training script, which
    should build ``GPT(GPTConfig.load(model_config))`` (the dense twin for BASE models) and call
    ``base_plugin.deepspeed.initialize(..., config=ds_config)``. The Megatron command runs, by its absolute
    path, this installation's ``examples/megatron/pretrain_gpt_base.py`` (for BASE; Megatron-LM's
    ``pretrain_gpt.py`` for the others) with a Megatron-LM checkout on ``$PYTHONPATH``.
    """
    nodes, per_node = _nodes(layout, gpus_per_node)
    script_args = ["--model-config", model_config, "--deepspeed", "--deepspeed_config", ds_config]
    ds = ["deepspeed", "--num_nodes", str(nodes), "--num_gpus", str(per_node)]
    if nodes > 1:
        ds += ["--hostfile", "$HOSTFILE"]
    rdzv = ["--rdzv-backend", "c10d", "--rdzv-endpoint", "$MASTER_ADDR:29500"] if nodes > 1 else ["--standalone"]
    tr = ["torchrun", "--nnodes", str(nodes), "--nproc-per-node", str(per_node), *rdzv]
    if cfg.sparse == "base":
        script = str(shipped("examples") / "megatron" / "pretrain_gpt_base.py")
    else:
        script = "$MEGATRON_LM/pretrain_gpt.py"
    return {
        "deepspeed": _join(ds + ["$TRAIN_SCRIPT"] + script_args),
        "torchrun": _join(tr + ["$TRAIN_SCRIPT"] + script_args),
        "megatron": _join(["PYTHONPATH=$MEGATRON_LM"] + tr + [script]
                          + megatron_args(cfg, layout, zero, precision, total_steps)),
    }


def write_json(path, data) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
