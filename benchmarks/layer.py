"""Forward+backward throughput of BaseLayer vs a dense FFN and DeepSpeed MoE top-1/top-2, on CPU.

    python benchmarks/layer.py                       # d=512, ffn=2048, 8 and 32 experts, 1 and 2 ranks
    python benchmarks/layer.py --ranks 1 --experts 8 --steps 3

Each configuration spawns its ranks (gloo on 127.0.0.1; the CPU cores are split between them) and
times whole training steps (forward + backward, no optimizer) on 4096 tokens per rank:

* dense     — one paper expert (LayerNorm → d→ffn → act → ffn→d, residual) on every token: the same
              parameters per token as a BASE expert, and no communication;
* base      — BaseLayer (exact balanced assignment, shuffle on, batched local experts);
* ds-top1/2 — deepspeed.moe.layer.MoE with the same expert (capacity factor 1, tokens may be dropped),
              when DeepSpeed is installed (DS_ACCELERATOR=cpu is set here).

tokens/s counts every rank's tokens. For BaseLayer it also times its parts in isolation: the solver on
the same scores, the token all-to-alls (forward + backward) and the experts (forward + backward).
Numbers on a shared machine are noisy; nothing here asserts a time.
"""
from __future__ import annotations

import argparse
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

os.environ.setdefault("DS_ACCELERATOR", "cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _timed(fn, steps: int, warmup: int, group=None) -> float:
    """Median seconds of fn() over ``steps`` runs (after ``warmup``), ranks lined up by a barrier."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        if group is not None:
            dist.barrier()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def _init(rank: int, world: int, port: int) -> bool:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    try:
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo", verbose=False)
        return True
    except ImportError:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        return False


def _rank(rank, world, port, args, num_experts, queue):
    from base_plugin.assignment import solve_balanced_assignment
    from base_plugin.layer import BaseExpert, BaseLayer, BatchedBaseExperts
    from base_plugin.layer.all_to_all import exchange

    torch.set_num_threads(max(1, args.threads // world))
    have_ds = _init(rank, world, port)
    group = dist.group.WORLD if world > 1 else None
    torch.manual_seed(rank)
    d, n = args.d, args.tokens
    x = torch.randn(n, d, requires_grad=True)
    results = {}

    def step(module, unpack=lambda y: y):
        def run():
            y = unpack(module(x))
            y.float().sum().backward()
        return run

    dense = BaseExpert(d, args.ffn)
    results["dense"] = _timed(step(dense), args.steps, args.warmup, group)

    local = num_experts // world
    layer = BaseLayer(d, BatchedBaseExperts(local, d, args.ffn), num_experts)
    with torch.no_grad():  # as after some training: experts are not the identity
        for s in layer.experts.sublayers:
            s.w2.normal_(0, 0.02)
    results["base"] = _timed(step(layer), args.steps, args.warmup, group)

    # BaseLayer's parts, each alone
    scores = (x.detach() @ torch.randn(num_experts, d).t())
    parts = {"solver": _timed(lambda: solve_balanced_assignment(scores), args.steps, 1)}
    if world > 1:
        even = torch.full((world,), n // world, dtype=torch.long)

        def a2a():
            y, *_ = exchange(x, even, group)
            back, *_ = exchange(y, even, group)
            back.sum().backward()
        parts["all-to-all"] = 2 * _timed(a2a, args.steps, 1, group)  # shuffle + expert dispatch, each a round trip
    else:
        parts["all-to-all"] = 0.0
    even_counts = [n // local] * local
    parts["experts"] = _timed(lambda: layer.experts(x, even_counts).sum().backward(), args.steps, 1)
    results["base parts"] = parts

    if have_ds and not args.no_deepspeed:
        from deepspeed.moe.layer import MoE

        for k in (1, 2):
            moe = MoE(d, BaseExpert(d, args.ffn), num_experts=num_experts, ep_size=world, k=k)
            results[f"ds-top{k}"] = _timed(step(moe, lambda out: out[0] + 0 * out[1]), args.steps, args.warmup, group)
    if rank == 0:
        queue.put(results)
    dist.barrier()
    dist.destroy_process_group()


def run_config(world: int, num_experts: int, args) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, world, port, args, num_experts, queue)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        return queue.get(timeout=args.timeout)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--ffn", type=int, default=2048)
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per rank")
    ap.add_argument("--experts", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads split between ranks")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--no-deepspeed", action="store_true")
    args = ap.parse_args(argv)

    print(f"d={args.d} ffn={args.ffn} tokens/rank={args.tokens} threads={args.threads} "
          f"(cpus={os.cpu_count()}, load={os.getloadavg()[0]:.1f}); median of {args.steps} steps")
    print(f"{'ranks':>5} {'experts':>7} {'layer':<8} {'ms/step':>9} {'tokens/s':>10} {'vs dense':>8}")
    breakdown = []
    for world in args.ranks:
        for e in args.experts:
            res = run_config(world, e, args)
            tokens = world * args.tokens
            for name in ("dense", "base", "ds-top1", "ds-top2"):
                if name in res:
                    t = res[name]
                    print(f"{world:>5} {e:>7} {name:<8} {1e3 * t:>9.1f} {tokens / t:>10.0f} {res['dense'] / t:>8.2f}")
            breakdown.append((world, e, res["base"], res["base parts"]))
    print("\nBaseLayer, where the time goes (parts timed alone, ms per step)")
    print(f"{'ranks':>5} {'experts':>7} {'total':>8} {'solver':>8} {'all-to-all':>10} {'experts':>8} {'rest':>8}")
    for world, e, total, p in breakdown:
        rest = total - p["solver"] - p["all-to-all"] - p["experts"]
        print(f"{world:>5} {e:>7} {1e3 * total:>8.1f} {1e3 * p['solver']:>8.1f} {1e3 * p['all-to-all']:>10.1f} "
              f"{1e3 * p['experts']:>8.1f} {1e3 * rest:>8.1f}")


if __name__ == "__main__":
    main()
