"""Optimizer benchmark: AdamW / LAMB (dense all-reduce), DeepSpeed's 1-bit LAMB and SLAMB on the demo's LM.

    python benchmarks/optim.py                       # 4 CPU ranks, 600 steps, SLAMB k=0.1 H=100
    python benchmarks/optim.py --steps 200 --sync-interval 50 --ranks 2
    # with DeepSpeed's 1-bit LAMB, in its own venv (set up once, from the repository root):
    python3 -m venv /tmp/onebit && DS_BUILD_OPS=0 /tmp/onebit/bin/pip install -q "torch==2.13.0" "deepspeed==0.19.6" matplotlib -e .
    /tmp/onebit/bin/python benchmarks/optim.py --optimizers adamw,lamb,onebitlamb,slamb --seeds 0,1 \
        --plot docs/slamb_bytes.png

Model: the demo's GPT (:mod:`base_plugin.models.gpt`, dense, tied embeddings), by default at d = 96,
2 blocks, 4 heads, FFN 384, 64-byte windows so that four ranks fit the 2-core machine. Batch: 64
windows per rank per step by default. SLAMB is a large-batch method: between synchronisations most
of each replica's first moment is built from its own gradients, so a small per-rank batch adds its
noise (``--batch 16`` is measured too; see docs/benchmarks.md).
Data: the documentation text that ships with Python (``pydoc_data.topics``), byte level; the last 10 %
is held out for validation. Every optimizer starts from the same weights and sees the same batches
(rank r, step t draws windows from a generator seeded by (seed, r, t)); each rank trains on its own
local batch, so the global batch is ``ranks * batch`` windows. With several ``--seeds`` every seed runs
all optimizers in turn (interleaved, so a drifting machine load hits them alike).

* AdamW: gradients averaged by one flat all-reduce per step (DDP-style), through the same counting
  wrapper (:func:`base_plugin.optim.allreduce_gradients_`).
* LAMB: :class:`base_plugin.optim.LAMB` (dense gradient all-reduce inside the optimizer).
* 1-bit LAMB (``onebitlamb``): DeepSpeed 0.19.6's ``OnebitLamb`` in a DeepSpeed engine (fp32, no ZeRO)
  with the accelerator-agnostic ``"compressed"`` backend, which needs two bridges on gloo CPU ranks
  (benchmarks/onebit_lamb.py; the packbits bridge is checked against ``numpy.packbits`` at every
  start). Warm-up stage (dense gradient all-reduce by the engine, plain LAMB) for ``--freeze-step``
  steps, by default 20 % of ``--steps`` (DeepSpeed's 1-bit LAMB tutorial: "15-25% of the total training
  steps"), then the compressed stage (error-compensated 1-bit momentum). Same lr, schedule, betas and
  weight decay as LAMB; its other settings are DeepSpeed's defaults. Not in the package's DeepSpeed
  (0.19.8 dropped the 1-bit optimizers), hence its separate venv.
* SLAMB: :class:`base_plugin.optim.SLAMB` with ``--compression`` and ``--sync-interval``, once per
  ``--beta3`` value (default 0.93, the paper's setting, and 0.99; the authors advise tuning beta3).

Bytes are the payload each rank handed to collectives, counted by wrapping the calls (our optimizers'
own wrapper; for 1-bit LAMB a wrapper on ``torch.distributed``, which DeepSpeed's comm layer calls), the
initial parameter broadcast excluded. Payload favours no one only among all-reduces; 1-bit LAMB sends
all-to-all and all-gather payloads, so "wire" bytes -- what each rank sends under the usual ring /
pairwise algorithms: all-reduce 2(W-1)/W x payload, all-to-all (W-1)/W x, all-gather (W-1) x -- are
reported beside them. Validation loss (nats per byte) is measured on rank 0's weights every
``--eval-every`` steps with the cumulative bytes so far; the run ends on an H boundary, where all
replicas are identical (the script checks it). "Bytes to target": the cumulative bytes at the first
evaluation whose loss is within ``--target`` (1 %) of LAMB's final loss of the same seed. Prints
markdown tables; ``--plot`` saves validation loss against cumulative bytes (matplotlib), ``--json``
the raw curves. Asserts nothing.
"""
from __future__ import annotations

import argparse
import json
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

ONEBIT = "onebitlamb"


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


# ---------------------------------------------------------------- bytes
def wire_factor(op: str, world: int) -> float:
    """Bytes a rank sends per payload byte under the usual algorithms (ring all-reduce / all-gather,
    pairwise all-to-all)."""
    return {"all_reduce": 2 * (world - 1) / world, "all_to_all_single": (world - 1) / world,
            "all_gather": float(world - 1)}.get(op, 1.0)


class _OursBytes:
    """Cumulative training bytes of our optimizers (all all-reduces; the initial broadcast excluded)."""

    def __init__(self, stats, world):
        self.stats, self.world = stats, world

    def payload(self) -> int:
        return self.stats.total_bytes - self.stats.by_kind.get("broadcast", 0)

    def wire(self) -> float:
        return self.payload() * wire_factor("all_reduce", self.world)

    def kinds(self) -> dict:
        return {k: v for k, v in self.stats.by_kind.items() if k != "broadcast"}


class _OnebitBytes:
    def __init__(self, counter, world):
        self.counter, self.world = counter, world

    def payload(self) -> int:
        return self.counter.training_total

    def wire(self) -> float:
        return sum(v * wire_factor(op, self.world) for op, v in self.counter.by_op.items() if op != "broadcast")

    def kinds(self) -> dict:
        return {k: v for k, v in self.counter.by_kind.items() if k != "broadcast"}


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


def train(rank: int, world: int, name: str, seed: int, args, data, val):
    from base_plugin.optim import LAMB, SLAMB, CountingComm, allreduce_gradients_

    torch.manual_seed(seed)
    model = demo_lm(args)
    params = list(model.parameters())
    engine = counter = None
    if name == "adamw":
        opt = torch.optim.AdamW(params, lr=args.lr_adamw, weight_decay=args.weight_decay)
        comm = CountingComm()
        peak = args.lr_adamw
    elif name == "lamb":
        opt = LAMB(params, lr=args.lr_lamb, weight_decay=args.weight_decay)
        comm = None
        peak = args.lr_lamb
    elif name == ONEBIT:
        from onebit_lamb import CollectiveBytes, onebit_lamb_engine

        counter = CollectiveBytes().__enter__()  # from before the engine: its initial broadcast is labelled
        engine, opt = onebit_lamb_engine(model, micro_batch=args.batch, world=world, lr=args.lr_lamb,
                                         weight_decay=args.weight_decay, freeze_step=args.freeze_step)
        comm = None
        peak = args.lr_lamb
    else:  # "slamb@<beta3>"
        opt = SLAMB(params, lr=args.lr_lamb, weight_decay=args.weight_decay, compression=args.compression,
                    sync_interval=args.sync_interval, beta3=float(name.split("@")[1]))
        comm = None
        peak = args.lr_lamb
    meter = (_OnebitBytes(counter, world) if counter is not None
             else _OursBytes(comm.stats if comm is not None else opt.comm_stats, world))
    curve = []  # (step, val loss on rank 0, cumulative payload bytes, cumulative wire bytes)
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args, peak)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + rank * 10_007 + step)
        x, y = batch(data, args.batch, args.seq, gen)
        if engine is not None:
            engine.backward(loss_fn(engine, x, y))
            engine.step()
        else:
            opt.zero_grad(set_to_none=True)
            loss_fn(model, x, y).backward()
            if name == "adamw":
                allreduce_gradients_(params, comm)
                opt.step()
                comm.end_step()
            else:
                opt.step()
        if step % args.eval_every == 0 or step == args.steps:
            curve.append((step, evaluate(model, val, args) if rank == 0 else None, meter.payload(), meter.wire()))
    wall = time.perf_counter() - t0
    if counter is not None:
        counter.__exit__(None, None, None)
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    spread = flat.clone()
    dist.all_reduce(spread, op=dist.ReduceOp.MAX)
    low = flat.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    return dict(val=curve[-1][1], curve=curve, bytes_per_step=meter.payload() / args.steps,
                wire_per_step=meter.wire() / args.steps, by_kind=meter.kinds(),
                replica_spread=float((spread - low).abs().max()), wall=wall, numel=flat.numel())


def worker(rank: int, world: int, port: int, args, queue):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    if ONEBIT in args.optimizers:
        # DeepSpeed's engine insists on a launcher's LOCAL_RANK; this process is its own launcher
        os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
        from base_plugin.deepspeed import use_cpu_accelerator

        use_cpu_accelerator()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        data = load_bytes()
        cut = int(0.9 * data.numel())
        train_data, val = data[:cut], data[cut:]
        bridges = None
        if ONEBIT in args.optimizers:
            import deepspeed
            from onebit_lamb import onebit_lamb_bridges

            deepspeed.init_distributed(dist_backend="gloo")  # wraps the existing group for deepspeed.comm
            bridges = onebit_lamb_bridges()
            bridges.__enter__()
        for seed in args.seeds:
            for name in args.optimizers:
                out = train(rank, world, name, seed, args, train_data, val)
                if rank == 0:
                    queue.put((seed, name, out))
                dist.barrier()
        if bridges is not None:
            bridges.__exit__(None, None, None)
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------- report
def _table(head, rows) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _kib(b) -> str:
    return f"{b / 1024:.1f} KiB"


def _mib(b) -> str:
    return f"{b / 2 ** 20:.1f} MiB"


def bytes_to_loss(curve, target: float):
    """(step, payload, wire) of the first evaluation with loss <= target, or None."""
    for step, val, payload, wire in curve:
        if val is not None and val <= target:
            return step, payload, wire
    return None


def report(results, args) -> str:
    """Markdown tables from ``results[(seed, name)]``; an optimizer missing for some seed is left out of it."""
    seeds = sorted({s for s, _ in results})
    names = [n for n in args.optimizers if any((s, n) in results for s in seeds)]
    out = []
    evals = [s for s, *_ in next(iter(results.values()))["curve"]]
    head = ["seed", "optimizer", "val loss", "vs LAMB", "bytes/step", "vs LAMB", "wire/step", "vs LAMB",
            "replica spread", "train s"]
    rows = []
    for seed in seeds:
        ref = results.get((seed, "lamb"))
        for name in names:
            r = results.get((seed, name))
            if r is None:
                continue
            rows.append([str(seed), name, f"{r['val']:.4f}",
                         f"{100 * (r['val'] / ref['val'] - 1):+.2f}%" if ref else "-",
                         _kib(r["bytes_per_step"]),
                         f"{100 * r['bytes_per_step'] / ref['bytes_per_step']:.1f}%" if ref else "-",
                         _kib(r["wire_per_step"]),
                         f"{100 * r['wire_per_step'] / ref['wire_per_step']:.1f}%" if ref else "-",
                         f"{r['replica_spread']:.1e}", f"{r['wall']:.0f}"])
    out.append(_table(head, rows))

    if "lamb" in names:
        out.append(f"\nBytes to reach LAMB's final validation loss + {100 * args.target:g} % (same seed), "
                   f"first of the evaluations every {args.eval_every} steps; cumulative payload (wire) bytes; "
                   f"'-': not reached in {args.steps} steps:\n")
        rows = []
        for seed in seeds:
            target = results[(seed, "lamb")]["val"] * (1 + args.target)
            onebit = results.get((seed, ONEBIT))
            onebit_hit = bytes_to_loss(onebit["curve"], target) if onebit else None
            for name in names:
                r = results.get((seed, name))
                if r is None:
                    continue
                hit = bytes_to_loss(r["curve"], target)
                rows.append([str(seed), f"{target:.4f}", name,
                             str(hit[0]) if hit else "-",
                             f"{_mib(hit[1])} ({_mib(hit[2])})" if hit else "-",
                             f"{100 * hit[1] / onebit_hit[1]:.0f}% ({100 * hit[2] / onebit_hit[2]:.0f}%)"
                             if hit and onebit_hit else "-"])
        out.append(_table(["seed", "target loss", "optimizer", "step", "bytes to target", "vs 1-bit LAMB"], rows))

    for seed in seeds:
        for name in names:
            r = results.get((seed, name))
            if r is not None:
                kinds = {k: _kib(v / args.steps) for k, v in r["by_kind"].items()}
                out.append(f"  seed {seed} {name}: bytes per step by kind {kinds}; val@{evals[-4:]}: "
                           + ", ".join(f"{v:.4f}" for _, v, *_ in r["curve"][-4:]))
    return "\n".join(out)


def plot(results, args, path: str) -> None:
    """Validation loss against cumulative payload bytes, one panel per seed, LAMB + target marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = sorted({s for s, _ in results})
    fig, axes = plt.subplots(1, len(seeds), figsize=(5.5 * len(seeds), 4.2), squeeze=False, sharey=True)
    style = {"adamw": ("tab:gray", "--"), "lamb": ("black", "-"), ONEBIT: ("tab:red", "-")}
    blues = iter(["tab:blue", "tab:cyan", "tab:purple", "tab:green"])
    colours = {}
    for ax, seed in zip(axes[0], seeds):
        for name in args.optimizers:
            r = results.get((seed, name))
            if r is None:
                continue
            if name not in colours:
                colours[name] = style.get(name) or (next(blues), "-")
            c, ls = colours[name]
            xs = [max(p, 1) / 2 ** 20 for _, _, p, _ in r["curve"]]
            ax.plot(xs, [v for _, v, *_ in r["curve"]], ls, color=c, marker=".", ms=4,
                    label={ONEBIT: "1-bit LAMB (DeepSpeed 0.19.6)"}.get(name, name.replace("slamb@", "SLAMB β3=")))
        if (seed, "lamb") in results:
            ax.axhline(results[(seed, "lamb")]["val"] * (1 + args.target), color="black", lw=0.6, ls=":",
                       label=f"LAMB final + {100 * args.target:g} %")
        ax.set_xscale("log")
        ax.set_xlabel("cumulative payload bytes per rank (MiB)")
        ax.set_title(f"seed {seed}")
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel("validation loss (nats / byte)")
    lo = min(v for r in results.values() for _, v, *_ in r["curve"])
    axes[0][0].set_ylim(lo - 0.02, lo + 0.6)
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(f"demo GPT, {args.ranks} gloo CPU ranks x {args.batch} x {args.seq} bytes, {args.steps} steps; "
                 f"SLAMB k={args.compression} H={args.sync_interval}; 1-bit LAMB freeze_step={args.freeze_step}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


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
    ap.add_argument("--lr-lamb", type=float, default=1e-2, help="LAMB, 1-bit LAMB and SLAMB")
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--compression", type=float, default=0.1)
    ap.add_argument("--sync-interval", type=int, default=100)
    ap.add_argument("--beta3", default="0.93,0.99",
                    help="comma-separated: one SLAMB run per value (0.93: paper default)")
    ap.add_argument("--freeze-step", type=int, default=None,
                    help="1-bit LAMB's warm-up steps (default: 20%% of --steps, as DeepSpeed's tutorial advises)")
    ap.add_argument("--eval-every", type=int, default=None, help="default: --steps / 20")
    ap.add_argument("--eval-batches", type=int, default=16)
    ap.add_argument("--seeds", "--seed", default="0", help="comma-separated seeds, each running every optimizer")
    ap.add_argument("--target", type=float, default=0.01, help="bytes-to-target: LAMB's final loss x (1 + this)")
    ap.add_argument("--optimizers", default="adamw,lamb,slamb",
                    help=f"comma-separated from adamw, lamb, {ONEBIT}, slamb")
    ap.add_argument("--plot", default=None, help="save loss against cumulative bytes here (PNG; needs matplotlib)")
    ap.add_argument("--json", default=None, help="save the raw results here")
    args = ap.parse_args(argv)
    names = []
    for o in (o.strip() for o in args.optimizers.split(",") if o.strip()):
        if o not in ("adamw", "lamb", ONEBIT, "slamb"):
            ap.error(f"--optimizers: unknown {o!r} (allowed: adamw, lamb, {ONEBIT}, slamb)")
        names += [f"slamb@{float(b)}" for b in args.beta3.split(",")] if o == "slamb" else [o]
    args.optimizers = names
    try:
        args.seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
    except ValueError:
        ap.error(f"--seeds: comma-separated integers, got {args.seeds!r}")
    if args.freeze_step is None:
        args.freeze_step = max(1, round(0.2 * args.steps))
    if args.eval_every is None:
        args.eval_every = max(1, args.steps // 20)
    if ONEBIT in names:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from onebit_lamb import check_packbits_bridge, require_deepspeed_with_onebit_lamb

        try:
            require_deepspeed_with_onebit_lamb()
        except RuntimeError as e:
            ap.error(f"--optimizers {ONEBIT}: {e}")
        print(f"1-bit LAMB: packbits bridge == numpy.packbits/unpackbits on {check_packbits_bridge()} values; "
              f"freeze_step {args.freeze_step} of {args.steps} steps", file=sys.stderr)
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
        import queue as queue_mod

        for _ in range(len(args.seeds) * len(args.optimizers)):
            while True:  # fail fast when a rank died instead of waiting for a result that never comes
                try:
                    seed, name, out = queue.get(timeout=5)
                    break
                except queue_mod.Empty:
                    dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                    if dead:
                        raise RuntimeError(f"a rank exited with code {dead[0]}; see its traceback above")
            results[(seed, name)] = out
            print(f"  [{time.perf_counter() - t0:.0f}s] seed {seed} {name}: val {out['val']:.4f}, "
                  f"{_kib(out['bytes_per_step'])}/step", file=sys.stderr, flush=True)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    total = time.perf_counter() - t0

    print(f"\ndemo GPT d={args.d_model} layers={args.layers} ({next(iter(results.values()))['numel']} params), "
          f"{args.ranks} gloo CPU ranks x {args.batch} x {args.seq} bytes/step, {args.steps} steps, seeds "
          f"{','.join(map(str, args.seeds))}; SLAMB k={args.compression} H={args.sync_interval} (slamb@b = beta3 b)"
          + (f"; 1-bit LAMB freeze_step={args.freeze_step}" if ONEBIT in names else "") + f"; total {total:.0f}s\n")
    print(report(results, args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items()},
                       "results": [dict(seed=s, optimizer=n, **r) for (s, n), r in results.items()]}, f, indent=1)
    if args.plot:
        plot(results, args, args.plot)
        print(f"\nplot: {args.plot}")
    return results


if __name__ == "__main__":
    main()
