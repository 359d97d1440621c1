"""One training run of the demo, executed on every rank (a gloo process group is already set up).

Reads top to bottom: build the model, build the DeepSpeed engine (with the ``"base_layer"`` section
for the BASE run), train with a progress bar, evaluate on the held-out text, log, checkpoint.
"""
from __future__ import annotations

import math
import time
from typing import Dict

import torch
import torch.distributed as dist
from torch.nn import functional as F

from torch import nn

from ..models import GPT, GPTConfig
from ..models.gpt import MLP
from .data import batch, eval_batches, load_text, split


class CountedMoE(nn.Module):
    """Wraps a DeepSpeed-style MoE (``forward -> (out, l_aux, exp_counts)``) and keeps the counts.
    The ``"base_layer"`` section swaps the MoE inside for a BASE layer; the wrapper stays."""

    def __init__(self, moe: nn.Module):
        super().__init__()
        self.moe = moe
        self.last_counts = None

    def forward(self, x):
        out, l_aux, self.last_counts = self.moe(x)
        return out, l_aux


def deepspeed_moe(ep_size: int):
    """``moe_factory`` for :class:`~base_plugin.models.GPT`: DeepSpeed's own MoE with the model's FFN as
    the expert (top-k, capacity factor and aux loss from the config)."""
    def factory(cfg: GPTConfig, block_index: int) -> nn.Module:
        from deepspeed.moe.layer import MoE

        return CountedMoE(MoE(hidden_size=cfg.d_model, expert=MLP(cfg.d_model, cfg.expert_ffn, cfg.activation),
                              num_experts=cfg.num_experts, ep_size=ep_size, k=cfg.top_k,
                              capacity_factor=cfg.capacity_factor, eval_capacity_factor=cfg.capacity_factor,
                              min_capacity=1, drop_tokens=True))
    return factory


def model_config(variant: str, m: Dict) -> GPTConfig:
    """The demo's GPT for a run: MoE FFN in the middle block (top-1 for "top1" and "base", top-2 with
    half-width experts so active parameters stay equal), or all dense FFNs for "dense"."""
    top_k = 2 if variant == "top2" else 1
    return GPTConfig(name=f"demo-{variant}", vocab_size=256, max_seq_len=m["seq_len"], d_model=m["d_model"],
                     n_layers=m["n_layers"], n_heads=m["n_heads"], ffn_dim=m["ffn"],
                     sparse="none" if variant == "dense" else "moe",
                     sparse_positions=() if variant == "dense" else (m["n_layers"] // 2,),
                     num_experts=m["num_experts"], top_k=top_k, expert_ffn_dim=m["ffn"] // top_k,
                     capacity_factor=1.0, aux_loss_coef=0.01)


def ds_config(run: Dict) -> Dict:
    """The DeepSpeed config of a run: CPU-friendly, ZeRO stage 0, fp32, gradient clipping."""
    config = {
        "train_micro_batch_size_per_gpu": run["batch"],
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 0},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    if run["variant"] == "base":
        config["base_layer"] = dict(run["base_layer"])
    return config


def _all_mean(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


def evaluate(engine, batches) -> float:
    """Mean next-byte cross-entropy over this rank's share of the fixed validation batches."""
    engine.eval()
    total = 0.0
    with torch.no_grad():
        for x, y in batches:
            logits, _ = engine(x)
            total += float(F.cross_entropy(logits.flatten(0, 1).float(), y.flatten()))
    engine.train()
    return _all_mean(total / max(len(batches), 1))


def train(rank: int, world: int, run: Dict, stop_event=None) -> Dict:
    import logging

    import deepspeed
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    deepspeed.utils.logger.setLevel(logging.WARNING)

    variant, steps = run["variant"], run["steps"]
    cfg = model_config(variant, run["model"])
    torch.manual_seed(run["seed"])  # the same shared weights on every rank (experts differ per rank)
    model = GPT(cfg, moe_factory=deepspeed_moe(run["model"]["ep_size"]))
    seq_len = cfg.max_seq_len
    groups = [{"params": list(model.parameters()), "name": "params"}]
    if cfg.sparse == "moe":
        groups = split_params_into_different_moe_groups_for_optimizer(groups)
    optimizer = torch.optim.AdamW(groups, lr=run["lr"], betas=(0.9, 0.95), weight_decay=0.01)
    if variant == "base":  # the one difference: the config's "base_layer" section, read by our initialize()
        from base_plugin.deepspeed import initialize
    else:
        initialize = deepspeed.initialize
    engine, optimizer, _, _ = initialize(model=model, optimizer=optimizer, config=ds_config(run))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / run["warmup"]) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))

    train_tokens, val_tokens = split(load_text(run["data"]))
    gen = torch.Generator().manual_seed(run["seed"] * 1000 + rank)  # each rank its own batches
    val = eval_batches(val_tokens, run["batch"], seq_len, run["eval_batches"] * world)[rank::world]
    writer = None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm

        writer = SummaryWriter(f"{run['out']}/tensorboard/{variant}")
        bar = tqdm(total=steps, desc=f"{variant:>5}", unit="step", dynamic_ncols=True)
    log = {"step": [], "train_loss": [], "val_step": [], "val_loss": [], "load_max_over_mean": [],
           "dropped_fraction": [], "tokens_per_expert": [], "mean_gate": [], "tokens_per_s": []}
    tokens_per_step = run["batch"] * seq_len * world
    counted = [m for m in model.modules() if isinstance(m, CountedMoE)]
    interrupted, t_start = False, time.perf_counter()
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        x, y = batch(train_tokens, run["batch"], seq_len, gen)
        _, total_loss = engine(x, y)  # cross entropy + aux_loss_coef * aux loss (0 for BASE and dense)
        engine.backward(total_loss)
        engine.step()
        schedule.step()
        # routing statistics of the MoE block, summed over the ranks
        aux = model.aux_loss
        loss = total_loss.detach() - (cfg.aux_loss_coef * aux.detach() if aux is not None else 0.0)
        counts, dropped, gate = None, 0.0, float("nan")
        if counted:
            counts = counted[0].last_counts.detach().to(torch.float64).reshape(-1).clone()
            dist.all_reduce(counts)
            routed = counts.sum()
            if variant in ("top1", "top2"):
                k = 1 if variant == "top1" else 2
                capacity = math.ceil(run["batch"] * seq_len / cfg.num_experts * cfg.capacity_factor * k)
                per_rank = counted[0].last_counts.detach().to(torch.float64).reshape(-1)
                over = torch.clamp(per_rank - max(capacity, 1), min=0).sum().reshape(1)
                dist.all_reduce(over)
                dropped = float(over) / float(routed)
            stats = getattr(counted[0].moe, "last_stats", None)
            if stats is not None:
                gate = _all_mean(float(stats.mean_gate))
        mean_loss = _all_mean(float(loss))
        stop = torch.tensor([1.0 if stop_event is not None and stop_event.is_set() else 0.0])
        dist.all_reduce(stop, op=dist.ReduceOp.MAX)  # every rank stops at the same step
        log["step"].append(step)
        log["train_loss"].append(mean_loss)
        log["tokens_per_s"].append(tokens_per_step / (time.perf_counter() - t0))
        if counts is not None:
            log["tokens_per_expert"].append(counts.tolist())
            log["load_max_over_mean"].append(float(counts.max() / counts.mean()))
            log["dropped_fraction"].append(dropped)
            log["mean_gate"].append(gate)
        if step % run["eval_every"] == 0 or step == steps or bool(stop):
            log["val_step"].append(step)
            log["val_loss"].append(evaluate(engine, val))
        if rank == 0:
            writer.add_scalar("loss/train", mean_loss, step)
            if log["val_step"] and log["val_step"][-1] == step:
                writer.add_scalar("loss/val", log["val_loss"][-1], step)
            if counts is not None:
                writer.add_scalar("experts/max_over_mean_load", log["load_max_over_mean"][-1], step)
                writer.add_scalar("experts/dropped_fraction", dropped, step)
                if not math.isnan(gate):
                    writer.add_scalar("experts/mean_gate", gate, step)
            bar.set_postfix(loss=f"{mean_loss:.3f}", tok_s=f"{log['tokens_per_s'][-1]:.0f}")
            bar.update(1)
        if bool(stop):
            interrupted = True
            break
    engine.save_checkpoint(f"{run['out']}/checkpoints/{variant}", tag=f"step{log['step'][-1]}")
    if rank == 0:
        bar.close()
        writer.close()
    log.update(variant=variant, interrupted=interrupted, seconds=time.perf_counter() - t_start,
               model=cfg.to_dict(), parameters_on_rank0=sum(p.numel() for p in model.parameters()))
    return log if rank == 0 else {}
