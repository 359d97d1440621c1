"""``base-plugin plan``: parameters, per-GPU memory and launch configs for the paper's models.

    base-plugin plan --model base-standard                      # 128 GPUs, 32 GiB, ZeRO 0
    base-plugin plan --model base-small,base-standard,base-large --gpus 128 --gpu-mem 32 --zero 1
    base-plugin plan --model path/to/model.json --gpus 64 --out plans/

``--model`` takes names of ``configs/paper/*.json`` (``base-small``, ``base-standard``, ``base-large``,
``dense``, ``moe-top1``, ``moe-top2``) or paths to model config files, comma-separated. Parameters are
counted on the real model class built on the meta device. With ``--out DIR`` each model gets
``DIR/<name>/`` with ``plan.txt`` (what is printed), ``plan.json``, ``model.json``, ``ds_config.json``,
``deepspeed_model.json`` (the model the DeepSpeed JSON's ``"base_layer"`` section converts) and
``launch.sh`` (DeepSpeed, torchrun and Megatron commands). Exit status 2 with a message naming the
problem when the experts cannot be spread over the GPUs or an option is invalid.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import List, Optional

from ..models import GPTConfig
from ..resources import shipped
from .launch import deepspeed_config, dense_twin, launch_commands, write_json
from .memory import GIB, PRECISIONS, PlanError, estimate_memory, plan_layout
from .params import count_parameters

def paper_dir() -> Path:
    """``configs/paper`` of this installation (the source tree's, or the copy inside the wheel)."""
    return shipped("configs") / "paper"


def paper_models() -> List[str]:
    return sorted(p.stem for p in paper_dir().glob("*.json"))


def resolve_model(spec: str):
    """``(GPTConfig, paper reference dict)`` for a paper model name or a config file path."""
    path = Path(spec)
    if not path.is_file():
        path = paper_dir() / f"{spec}.json"
        if not path.is_file():
            raise PlanError(f"--model {spec!r}: not a config file and not a paper model; paper models: "
                            f"{paper_models()} (from {paper_dir()})")
    try:
        cfg = GPTConfig.load(path)
    except (ValueError, TypeError, json.JSONDecodeError) as exc:
        raise PlanError(f"--model {spec!r}: {exc}") from exc
    data = json.loads(path.read_text(encoding="utf-8")) if path.suffix == ".json" else {}
    return cfg, data.get("paper", {}) if isinstance(data, dict) else {}


def _b(n: float) -> str:
    """Parameters in human units: 1.31B, 335.7M."""
    if n >= 1e9:
        return f"{n / 1e9:.2f}B"
    if n >= 1e6:
        return f"{n / 1e6:.1f}M"
    return f"{n / 1e3:.1f}K" if n >= 1e3 else str(int(n))


def _g(n: float) -> str:
    return f"{n / GIB:.2f}"


def plan(spec: str, args) -> dict:
    cfg, paper = resolve_model(spec)
    counts = count_parameters(cfg)
    layout = plan_layout(cfg, args.gpus, args.ep_size)
    kw = dict(micro_batch=2, seq_len=cfg.max_seq_len, precision=args.precision,
              flash_attention=args.flash_attention, recompute=args.recompute)
    memory = {z: estimate_memory(cfg, counts, layout, z, **kw) for z in (0, 1, 2)}
    return {"spec": spec, "cfg": cfg, "paper": paper, "counts": counts, "layout": layout, "memory": memory}


def report(p: dict, args) -> str:
    cfg, c, lay, paper = p["cfg"], p["counts"], p["layout"], p["paper"]
    lines = [f"model {cfg.name}: d_model={cfg.d_model}, {cfg.n_layers} blocks, {cfg.n_heads} heads, ffn={cfg.ffn}, "
             f"vocab={cfg.vocab_size}, seq={cfg.max_seq_len}, sparse={cfg.sparse}"
             + (f" at {list(cfg.positions)}, {cfg.num_experts} experts" if cfg.sparse in ("base", "moe") else "")
             + (f" x {cfg.expert_sublayers} sublayers" if cfg.sparse in ("base", "dense") else "")
             + (f", top-{cfg.top_k}" if cfg.sparse == "moe" else "")]
    lines.append("parameters (meta-device build)       ours        paper")
    for key, label in (("total", "total"), ("shared", "shared"), ("per_expert", "per expert (one layer)"),
                       ("active", "active per token")):
        ref = paper.get(key)
        ref_s = f"{_b(ref):>8}  ({(getattr(c, key) / ref - 1) * 100:+.1f}%)" if ref else ""
        lines.append(f"  {label:<34}{_b(getattr(c, key)):>8}    {ref_s}")
    lines.append(f"layout: {lay.gpus} GPUs, expert-parallel size {lay.ep_size}, {lay.experts_per_gpu} expert(s) "
                 f"per GPU "
                 f"per sparse layer, {lay.expert_dp} cop{'y' if lay.expert_dp == 1 else 'ies'} of each expert"
                 if lay.experts_per_gpu else f"layout: {lay.gpus} GPUs, data parallel (no experts)")
    mem = p["memory"]
    tokens = mem[0].tokens_per_gpu
    lines.append(f"memory per GPU, GiB ({args.precision}, Adam, {tokens} tokens = 2 x {cfg.max_seq_len} per GPU"
                 + (", flash attention" if args.flash_attention else "") + (", recompute" if args.recompute else "")
                 + f"; fits = total + {args.reserve_gib:g} GiB reserve <= {args.gpu_mem:g} GiB):")
    lines.append("  ZeRO  params  grads  optim  activ   total  fits")
    for z, m in mem.items():
        mark = "*" if z == args.zero else " "
        fits = "yes" if m.fits(args.gpu_mem, args.reserve_gib) else "NO"
        lines.append(f" {mark}{z:>3}  {_g(m.parameters):>6} {_g(m.gradients):>6} {_g(m.optimizer):>6} "
                     f"{_g(m.activations):>6} {_g(m.total):>7}  {fits}")
    return "\n".join(lines)


def summary(plans: List[dict], args) -> str:
    """One Markdown row per model: parameters, and total GiB per GPU with the fit for ZeRO 0 / 1 / 2."""
    rows = [f"| model | total | shared | per expert | active / token | activations GiB | GiB per GPU, ZeRO 0 / 1 / 2 "
            f"| fits {args.gpu_mem:g} GiB (0 / 1 / 2) |", "|" + "---|" * 8]
    for p in plans:
        c, mem = p["counts"], p["memory"]
        totals = " / ".join(_g(m.total) for m in mem.values())
        fits = " / ".join("yes" if m.fits(args.gpu_mem, args.reserve_gib) else "no" for m in mem.values())
        per_expert = _b(c.per_expert) if c.per_expert else "-"
        rows.append(f"| {p['cfg'].name} | {_b(c.total)} | {_b(c.shared)} | {per_expert} | "
                    f"{_b(c.active)} | {_g(mem[0].activations)} | {totals} | {fits} |")
    return "\n".join(rows)


def write_outputs(p: dict, text: str, args, out: Path) -> None:
    cfg, lay = p["cfg"], p["layout"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan.txt").write_text(text + "\n", encoding="utf-8")
    write_json(out / "plan.json", {
        "model": cfg.name, "gpus": lay.gpus, "gpu_mem_gib": args.gpu_mem, "zero": args.zero,
        "precision": args.precision, "parameters": p["counts"].as_dict(), "paper": p["paper"],
        "layout": vars(lay) if hasattr(lay, "__dict__") else lay.__dict__,
        "memory_bytes": {str(z): m.as_dict() for z, m in p["memory"].items()},
        "fits": {str(z): m.fits(args.gpu_mem, args.reserve_gib) for z, m in p["memory"].items()}})
    write_json(out / "model.json", {"model": cfg.to_dict()})
    write_json(out / "deepspeed_model.json", {"model": dense_twin(cfg).to_dict()})
    write_json(out / "ds_config.json", deepspeed_config(cfg, lay, args.zero, precision=args.precision,
                                                        total_steps=args.total_steps))
    cmds = launch_commands(cfg, lay, args.zero, precision=args.precision, total_steps=args.total_steps,
                           gpus_per_node=args.gpus_per_node, model_config=str(out / "deepspeed_model.json"),
                           ds_config=str(out / "ds_config.json"))
    body = ["#!/usr/bin/env bash", f"# {cfg.name} on {lay.gpus} GPUs — written by `base-plugin plan`; pick one.",
            "# Set TRAIN_SCRIPT (your DeepSpeed training script), HOSTFILE / MASTER_ADDR for several nodes,",
            "# MEGATRON_LM (a Megatron-LM core_v0.16.1 checkout), VOCAB_FILE, MERGE_FILE, DATA_PATH.",
            "# Megatron: the BASE layer becomes the experts of the FFN at its position, one FFN of",
            "# sublayers x ffn per expert (see base_plugin/planner/launch.py:megatron_args).",
            "set -euo pipefail", "case \"${1:-deepspeed}\" in"]
    for name, cmd in cmds.items():
        body.append(f"  {name}) {cmd} ;;")
    body += ["  *) echo \"usage: $0 {deepspeed|torchrun|megatron}\" >&2; exit 2 ;;", "esac"]
    (out / "launch.sh").write_text("\n".join(body) + "\n", encoding="utf-8")
    os.chmod(out / "launch.sh", 0o755)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="base-plugin plan", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="base-standard",
                    help=f"paper model name(s) or config path(s), comma-separated (paper: {', '.join(paper_models())})")
    ap.add_argument("--gpus", type=int, default=128, help="number of GPUs (default 128, as in the paper)")
    ap.add_argument("--gpu-mem", type=float, default=32.0, help="GiB per GPU for the fit check (default 32: V100)")
    ap.add_argument("--zero", type=int, choices=(0, 1, 2), default=1,
                    help="ZeRO stage for the DeepSpeed JSON and the summary (default 1: the lowest that fits the "
                         "paper models on 32 GiB)")
    ap.add_argument("--ep-size", type=int, default=None, help="expert-parallel size (default: min(E, N) rule)")
    ap.add_argument("--precision", choices=sorted(PRECISIONS), default="fp16")
    ap.add_argument("--flash-attention", action="store_true", help="do not keep attention probabilities")
    ap.add_argument("--recompute", action="store_true", help="full activation checkpointing per layer")
    ap.add_argument("--reserve-gib", type=float, default=2.0, help="GiB kept free for CUDA context, buffers (2)")
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--total-steps", type=int, default=100_000,
                    help="steps for the LR schedule (the paper trains for a time budget; set your own)")
    ap.add_argument("--out", default=None, help="write plan, DeepSpeed JSON and launch commands under DIR/<model>/")
    ap.add_argument("--json", action="store_true", help="print plan.json-style JSON instead of tables")
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.gpu_mem <= 0 or args.reserve_gib < 0 or args.gpus_per_node < 1 or args.total_steps < 1:
            raise PlanError("--gpu-mem must be > 0, --reserve-gib >= 0, --gpus-per-node and --total-steps >= 1")
        specs = [s.strip() for s in args.model.split(",") if s.strip()]
        if not specs:
            raise PlanError("--model is empty")
        plans = [plan(s, args) for s in specs]
        texts = [report(p, args) for p in plans]
        if args.out:
            for p, text in zip(plans, texts):
                write_outputs(p, text, args, Path(args.out) / p["cfg"].name)
    except PlanError as exc:
        print(f"base-plugin plan: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([{"model": p["cfg"].name, "parameters": p["counts"].as_dict(),
                           "memory_bytes": {str(z): m.as_dict() for z, m in p["memory"].items()}} for p in plans],
                         indent=2))
    else:
        print("\n\n".join(texts))
        if len(plans) > 1:
            print("\n" + summary(plans, args))
    if args.out:
        print(f"\nwrote {', '.join(str(Path(args.out) / p['cfg'].name) for p in plans)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
