"""Optimizer benchmark: AdamW / LAMB (dense all-reduce) vs SLAMB (sparse) on the demo's byte-level LM.

    python benchmarks/optim.py                       # 4 CPU ranks, 600 steps, SLAMB k=0.1 H=100
    python benchmarks/optim.py --steps 200 --sync-interval 50 --ranks 2

Model: the demo's GPT (:mod:`base_plugin.models.gpt`, dense, tied embeddings), by default at d = 96,
2 blocks, 4 heads, FFN 384, 64-byte windows so that four ranks fit the 2-core machine. Batch: 64
windows per rank per step by default. SLAMB is a large-batch method: between synchronisations most
of each replica's first moment is built from its own gradients, so a small per-rank batch adds its
noise (``--batch 16`` is measured too; see docs/benchmarks.md).
Data: the documentation text that ships with Python (``pydoc_data.topics``), byte level; the last 10 %
is held out for validation. Every optimizer starts from the same weights and sees the same batches
(rank r, step t draws windows from a generator seeded by (seed, r, t)); each rank trains on its own
local batch, so the global batch is ``ranks * batch`` windows.

* AdamW: gradients averaged by one flat all-reduce per step (DDP-style), through the same counting
  wrapper (:func:`base_plugin.optim.allreduce_gradients_`).
* LAMB: :class:`base_plugin.optim.LAMB` (dense gradient all-reduce inside the optimizer).
* SLAMB: :class:`base_plugin.optim.SLAMB` with ``--compression`` and ``--sync-interval``, once per
  ``--beta3`` value (default 0.93, the paper's setting, and 0.99; the authors advise tuning beta3).

DeepSpeed's 1-bit LAMB (``OnebitLamb``) has no row: the installed DeepSpeed 0.19.8 does not contain it
(no ``deepspeed/runtime/fp16/onebit/`` package, no ``onebitlamb`` in ``DEEPSPEED_OPTIMIZERS`` of
``deepspeed/runtime/config.py``; DeepSpeed deleted the 1-bit optimizers in PR #8490 and their
compressed-communication backends -- ``deepspeed/runtime/comm/{nccl,mpi,hccl,compressed}.py`` -- in
#8547). Older DeepSpeed releases are not installed here, so whether it ran on gloo CPU ranks could not be
tried.

Bytes are the payload each rank handed to collectives, as counted by the optimizers' wrapper (the
initial parameter broadcast is excluded from the per-step figure). Validation loss (nats per byte) is
measured on rank 0's weights at the end; the run ends on an H boundary, where all replicas are
identical (the script checks it). Prints a table; asserts nothing.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from base_plugin.launch import free_port


# ---------------------------------------------------------------- data
def load_bytes() -> torch.Tensor:
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def batch(data: torch.Tensor, n: int, seq: int, gen: torch.Generator):
    starts = torch.randint(0, data.numel() - seq - 1, (n,), generator=gen)
    idx = starts[:, None] + torch.arange(seq + 1)[None, :]
    chunk = data[idx]
    return chunk[:, :-1], chunk[:, 1:]


# ---------------------------------------------------------------- model
def demo_lm(args) -> nn.Module:
    """The demo's language model (:class:`base_plugin.models.GPT`, dense), at this benchmark's size."""
    from base_plugin.models import GPT, GPTConfig

    return GPT(GPTConfig(name="optim-benchmark", vocab_size=256, max_seq_len=args.seq, d_model=args.d_model,
                         n_layers=args.layers, n_heads=args.heads, ffn_dim=args.ff, sparse="none"))


def loss_fn(model, x, y):
    return F.cross_entropy(model(x)[0].reshape(-1, 256), y.reshape(-1))


# ---------------------------------------------------------------- one rank
def lr_at(step: int, args, peak: float) -> float:
    warm = max(1, int(0.1 * args.steps))
    if step <= warm:
        return peak * step / warm
    frac = (step - warm) / max(1, args.steps - warm)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


@torch.no_grad()
def evaluate(model, val, args) -> float:
    gen = torch.Generator().manual_seed(12345)
    total = 0.0
    for _ in range(args.eval_batches):
        x, y = batch(val, args.batch, args.seq, gen)
        total += float(loss_fn(model, x, y))
    return total / args.eval_batches


def train(rank: int, world: int, name: str, args, data, val):
    from base_plugin.optim import LAMB, SLAMB, CountingComm, allreduce_gradients_

    torch.manual_seed(args.seed)
    model = demo_lm(args)
    params = list(model.parameters())
    if name == "adamw":
        opt = torch.optim.AdamW(params, lr=args.lr_adamw, weight_decay=args.weight_decay)
        comm = CountingComm()
        peak = args.lr_adamw
    elif name == "lamb":
        opt = LAMB(params, lr=args.lr_lamb, weight_decay=args.weight_decay)
        comm = None
        peak = args.lr_lamb
    else:  # "slamb@<beta3>"
        opt = SLAMB(params, lr=args.lr_lamb, weight_decay=args.weight_decay, compression=args.compression,
                    sync_interval=args.sync_interval, beta3=float(name.split("@")[1]))
        comm = None
        peak = args.lr_lamb
    curve = []
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args, peak)
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + rank * 10_007 + step)
        x, y = batch(data, args.batch, args.seq, gen)
        opt.zero_grad(set_to_none=True)
        loss_fn(model, x, y).backward()
        if name == "adamw":
            allreduce_gradients_(params, comm)
            opt.step()
            comm.end_step()
        else:
            opt.step()
        if step % args.eval_every == 0 or step == args.steps:
            curve.append((step, evaluate(model, val, args) if rank == 0 else None))
    wall = time.perf_counter() - t0
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    spread = flat.clone()
    dist.all_reduce(spread, op=dist.ReduceOp.MAX)
    low = flat.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    stats = comm.stats if comm is not None else opt.comm_stats
    init_bytes = stats.by_kind.get("broadcast", 0)  # one-off initial broadcast: not a training cost
    return dict(val=curve[-1][1], curve=curve, bytes_per_step=(stats.total_bytes - init_bytes) / args.steps,
                by_kind=dict(stats.by_kind), replica_spread=float((spread - low).abs().max()), wall=wall,
                numel=flat.numel())


def worker(rank: int, world: int, port: int, args, queue):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        data = load_bytes()
        cut = int(0.9 * data.numel())
        train_data, val = data[:cut], data[cut:]
        for name in args.optimizers:
            out = train(rank, world, name, args, train_data, val)
            if rank == 0:
                queue.put((name, out))
            dist.barrier()
    finally:
        dist.destroy_process_group()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=64, help="windows per rank per step")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--d-model", type=int, default=96)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--ff", type=int, default=384)
    ap.add_argument("--lr-adamw", type=float, default=3e-3)
    ap.add_argument("--lr-lamb", type=float, default=1e-2)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--compression", type=float, default=0.1)
    ap.add_argument("--sync-interval", type=int, default=100)
    ap.add_argument("--beta3", default="0.93,0.99",
                    help="comma-separated: one SLAMB run per value (0.93: paper default)")
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--eval-batches", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--optimizers", default="adamw,lamb,slamb")
    args = ap.parse_args(argv)
    names = []
    for o in (o.strip() for o in args.optimizers.split(",") if o.strip()):
        if o == "onebitlamb":
            ap.error("--optimizers: onebitlamb is not available: DeepSpeed 0.19.8 has no 1-bit LAMB (see the "
                     "module docstring)")
        if o not in ("adamw", "lamb", "slamb"):
            ap.error(f"--optimizers: unknown {o!r} (allowed: adamw, lamb, slamb)")
        names += [f"slamb@{float(b)}" for b in args.beta3.split(",")] if o == "slamb" else [o]
    args.optimizers = names
    if args.steps % args.sync_interval:
        print(f"note: --steps {args.steps} is not a multiple of --sync-interval {args.sync_interval}: SLAMB's "
              "replicas differ at the end; rank 0's weights are evaluated", file=sys.stderr)

    port = free_port()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    t0 = time.perf_counter()
    procs = [ctx.Process(target=worker, args=(r, args.ranks, port, args, queue)) for r in range(args.ranks)]
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in args.optimizers:
            name, out = queue.get(timeout=3600)
            results[name] = out
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    total = time.perf_counter() - t0

    ref = results.get("lamb")
    print(f"\ndemo GPT d={args.d_model} layers={args.layers} ({next(iter(results.values()))['numel']} params), "
          f"{args.ranks} gloo CPU ranks x {args.batch} x {args.seq} bytes/step, {args.steps} steps, "
          f"SLAMB k={args.compression} H={args.sync_interval} (slamb@b = beta3 b); total {total:.0f}s\n")
    evals = [s for s, _ in next(iter(results.values()))["curve"]]
    head = ["optimizer", "val loss", "vs LAMB", "bytes/step", "vs LAMB", "replica spread", "train s"]
    head += [f"val@{s}" for s in evals]
    rows = []
    for name in args.optimizers:
        r = results[name]
        rows.append([name, f"{r['val']:.4f}",
                     f"{100 * (r['val'] / ref['val'] - 1):+.2f}%" if ref else "-",
                     f"{r['bytes_per_step'] / 1024:.1f} KiB",
                     f"{100 * r['bytes_per_step'] / ref['bytes_per_step']:.1f}%" if ref else "-",
                     f"{r['replica_spread']:.1e}", f"{r['wall']:.0f}"] + [f"{v:.4f}" for _, v in r["curve"]])
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    fmt = " | ".join("{:<%d}" % w for w in widths)
    print(fmt.format(*head))
    print("-|-".join("-" * w for w in widths))
    for row in rows:
        print(fmt.format(*row))
    for name in args.optimizers:
        kinds = {k: f"{v / args.steps / 1024:.1f} KiB" for k, v in results[name]["by_kind"].items()}
        print(f"  {name}: bytes per step by kind (incl. one-off broadcast) {kinds}")
    return results


if __name__ == "__main__":
    main()
