"""``base-plugin demo``: a real BASE training run on CPU, against DeepSpeed top-1, top-2 and dense.

A small byte-level GPT is trained four ways at equal active parameters and equal tokens on real
English text that ships with Python (``pydoc_data.topics``; ``--data PATH`` for your own): a dense
FFN, DeepSpeed's MoE with top-1 and with top-2 gating (capacity factor, auxiliary loss), and BASE —
the top-1 model with ``"base_layer": {...}`` added to its DeepSpeed config, which turns its MoE
block into a BASE layer keeping the experts. Every run goes through the DeepSpeed engine on
``--ranks`` CPU processes (gloo on 127.0.0.1). Outputs in ``--out``: ``metrics.json``, PNG plots,
TensorBoard event files, checkpoints; Ctrl-C stops every run at the same step, checkpoints it and
still writes the plots and table.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

VARIANTS = ("dense", "top1", "top2", "base")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="base-plugin demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=400, help="training steps per run (default 400)")
    p.add_argument("--experts", type=int, default=8, help="experts in the MoE block (default 8)")
    p.add_argument("--ranks", type=int, default=2, help="CPU processes, also the expert-parallel size (default 2)")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default=None, help="a text file to train on (default: Python's pydoc_data.topics)")
    p.add_argument("--batch", type=int, default=8, help="sequences per rank per step (default 8)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--eval-batches", type=int, default=4, help="validation batches per rank (default 4)")
    args = p.parse_args(argv)
    for name in ("steps", "experts", "ranks", "batch", "seq_len", "d_model", "layers", "eval_every", "eval_batches"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.experts % args.ranks:
        p.error(f"--experts {args.experts} must be divisible by --ranks {args.ranks} (experts are split over the ranks)")
    if args.layers < 3:
        p.error("--layers must be >= 3 (the MoE block sits in the middle of the stack)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from ..deepspeed import use_cpu_accelerator
    from ..launch import run_ranks
    from . import report
    from .data import load_text
    from .train import train

    load_text(args.data)  # fail early on a bad --data
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = dict(seq_len=args.seq_len, d_model=args.d_model, n_layers=args.layers, n_heads=4, ffn=4 * args.d_model,
                 num_experts=args.experts, ep_size=args.ranks)
    settings = dict(vars(args), model=model)
    threads = max(1, (os.cpu_count() or 1) // args.ranks)
    import multiprocessing

    stop = multiprocessing.get_context("spawn").Event()
    runs = []
    print(f"base-plugin demo: {len(args.variants)} runs x {args.steps} steps on {args.ranks} CPU rank(s), "
          f"{args.experts} experts, outputs in {out}/  (Ctrl-C stops, checkpoints and reports)", flush=True)
    t0 = time.perf_counter()
    failure = None
    try:
        for variant in args.variants:
            run = dict(variant=variant, steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed,
                       warmup=max(1, args.steps // 10), data=args.data, out=str(out), eval_every=args.eval_every,
                       eval_batches=args.eval_batches,
                       model=model,
                       base_layer=dict(enabled=True, num_experts=args.experts, ep_size=args.ranks))
            result = run_ranks(train, args.ranks, run, stop, timeout=3600, threads_per_rank=threads,
                               stop_event=stop,
                               setup=use_cpu_accelerator)[0]  # a CPU demo, on GPU machines too
            runs.append(result)
            if result.get("interrupted"):
                break
    except KeyboardInterrupt:
        stop.set()
        print("\ninterrupted: reporting the runs so far", file=sys.stderr)
    except Exception as exc:  # a failed run: still report the finished ones, then fail
        failure = exc
    report.write_metrics(out, runs, settings)
    plots = report.plot(out, runs) if runs else []
    print("\n" + report.table(runs))
    print(f"\n{time.perf_counter() - t0:.0f} s; metrics: {out / 'metrics.json'}; plots: "
          + ", ".join(str(p) for p in plots) + f"; TensorBoard: tensorboard --logdir {out / 'tensorboard'}")
    if failure is not None:
        raise failure
    return 130 if stop.is_set() or any(r.get("interrupted") for r in runs) else 0  # 130: stopped by Ctrl-C
