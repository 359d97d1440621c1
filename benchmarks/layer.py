"""Forward+backward throughput of BaseLayer vs a dense FFN and DeepSpeed MoE top-1/top-2, on CPU or GPUs.

    python benchmarks/layer.py                       # d=512, ffn=2048, 8 and 32 experts, 1 and 2 ranks
    python benchmarks/layer.py --ranks 1 --experts 8 --steps 3
    python benchmarks/layer.py --device cuda --ranks 1 --tokens 32768   # one GPU per rank, NCCL

Each configuration spawns its ranks (gloo on 127.0.0.1, the CPU cores split between them; with
``--device cuda`` NCCL, GPU r for rank r, every timed call ended by a device synchronisation) and times
whole training steps (forward + backward, no optimizer) on 4096 tokens per rank:

* dense     — one paper expert (LayerNorm → d→ffn → act → ffn→d, residual) on every token: the same
              parameters per token as a BASE expert, and no communication (the targets are against it);
* dense-ddp — (2+ ranks) the same expert in torch's DistributedDataParallel, i.e. with the gradient
              all-reduce that data-parallel training of it pays (the paper's 91 % is against data-parallel
              throughput); BaseLayer's experts are not replicated, so they need no such all-reduce;
* base      — BaseLayer (exact balanced assignment, shuffle on) with its local experts as a list of
              BaseExpert modules (one call per expert, as DeepSpeed's MoE runs them);
* base-noshuffle — the same without the cross-rank shuffle (2 ranks: two fewer all-to-alls of scores
              and chosen experts per forward);
* base-batched — BaseLayer with BatchedBaseExperts (stacked weights, batched matmuls);
* ds-top1/2 — deepspeed.moe.layer.MoE with the same expert (capacity factor 1, tokens may be dropped),
              when DeepSpeed is installed (through base_plugin.deepspeed, which selects its CPU accelerator).

tokens/s counts every rank's tokens. For BaseLayer it also times its parts in isolation: the solver on
the same scores, the token all-to-alls (forward + backward) and the experts (forward + backward);
"rest" is everything else (score shuffle, gate, sorting, waiting for the slower rank).
Numbers on a shared machine are noisy; nothing here asserts a time.
"""
from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from base_plugin.launch import free_port


def _timed(fns: dict, steps: int, warmup: int, group=None, cuda: bool = False) -> dict:
    """Median seconds of each fn() over ``steps`` rounds (after ``warmup``), ranks lined up by a barrier
    (and, with ``cuda``, each call timed up to the end of its GPU work).

    The functions take turns within every round, so slow phases of a shared machine (this VM's speed
    drifts by up to 30 % over tens of seconds) hit every variant alike instead of whichever ran then.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(steps):
        for name, fn in fns.items():
            if group is not None:
                dist.barrier()
            if cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def _init(rank: int, world: int, port: int, device: str) -> bool:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    backend = "gloo"
    if device == "cuda":
        torch.cuda.set_device(rank)
        backend = "nccl"
    try:
        import deepspeed

        from base_plugin.deepspeed import use_cpu_accelerator

        if device == "cpu":
            use_cpu_accelerator()
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
        return True
    except ImportError:
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        return False


def _rank(rank, world, port, args, num_experts, queue):
    from base_plugin.assignment import solve_balanced_assignment
    from base_plugin.layer import BaseExpert, BaseLayer, BatchedBaseExperts
    from base_plugin.layer.all_to_all import exchange

    torch.set_num_threads(max(1, args.threads // world))
    have_ds = _init(rank, world, port, args.device)
    cuda = args.device == "cuda"
    dev = torch.device("cuda", rank) if cuda else torch.device("cpu")
    group = dist.group.WORLD if world > 1 else None
    torch.manual_seed(rank)
    d, n = args.d, args.tokens
    x = torch.randn(n, d, device=dev, requires_grad=True)

    def step(module, unpack=lambda y: y):
        def run():
            y = unpack(module(x))
            y.float().sum().backward()
        return run

    local = num_experts // world
    layers = {"dense": BaseExpert(d, args.ffn),
              "base": BaseLayer(d, [BaseExpert(d, args.ffn) for _ in range(local)], num_experts),
              "base-batched": BaseLayer(d, BatchedBaseExperts(local, d, args.ffn), num_experts)}
    if world > 1:  # on one rank there is nothing to shuffle, nor a gradient to all-reduce
        layers["dense-ddp"] = torch.nn.parallel.DistributedDataParallel(BaseExpert(d, args.ffn).to(dev))
        layers["base-noshuffle"] = BaseLayer(d, [BaseExpert(d, args.ffn) for _ in range(local)], num_experts,
                                             shuffle=False)
    for layer in layers.values():
        layer.to(dev)
        with torch.no_grad():  # as after some training: experts are not the identity
            for p in layer.parameters():
                if not p.any():
                    p.normal_(0, 0.02)
    steps = {name: step(layer) for name, layer in layers.items()}
    if have_ds and not args.no_deepspeed:
        from deepspeed.moe.layer import MoE

        for k in (1, 2):
            moe = MoE(d, BaseExpert(d, args.ffn), num_experts=num_experts, ep_size=world, k=k).to(dev)
            steps[f"ds-top{k}"] = step(moe, lambda out: out[0] + 0 * out[1])

    # BaseLayer's parts, each alone: the solver on scores of the same size, the token dispatch there
    # and back (forward + backward), the experts on an even split
    scores = (x.detach() @ torch.randn(num_experts, d, device=dev).t())
    steps["solver"] = lambda: solve_balanced_assignment(scores)
    if world > 1:
        even = torch.full((world,), n // world, dtype=torch.long, device=dev)

        def a2a():
            y, *_ = exchange(x, even, group)
            back, *_ = exchange(y, even, group)
            back.sum().backward()
        steps["all-to-all"] = a2a
    even_counts = [n // local] * local
    steps["experts"] = lambda: layers["base"].experts(x, even_counts).sum().backward()

    results = _timed(steps, args.steps, args.warmup, group, cuda)
    results["base parts"] = {part: results.pop(part, 0.0) for part in ("solver", "all-to-all", "experts")}
    if rank == 0:
        queue.put(results)
    dist.barrier()
    dist.destroy_process_group()


def run_config(world: int, num_experts: int, args) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
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
    ap.add_argument("--steps", type=int, default=9)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads split between ranks")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--no-deepspeed", action="store_true")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="cuda: one GPU per rank (NCCL); needs as many GPUs as the largest --ranks")
    args = ap.parse_args(argv)
    if args.device == "cuda" and torch.cuda.device_count() < max(args.ranks):
        ap.error(f"--device cuda --ranks {max(args.ranks)} needs {max(args.ranks)} GPUs, "
                 f"found {torch.cuda.device_count()}")

    where = (f"GPU {torch.cuda.get_device_name(0)}" if args.device == "cuda" else
             f"threads={args.threads} (cpus={os.cpu_count()}, load={os.getloadavg()[0]:.1f})")
    print(f"d={args.d} ffn={args.ffn} tokens/rank={args.tokens} {where}; median of {args.steps} steps")
    print(f"{'ranks':>5} {'experts':>7} {'layer':<14} {'ms/step':>9} {'tokens/s':>10} {'vs dense':>8}")
    breakdown = []
    for world in args.ranks:
        for e in args.experts:
            res = run_config(world, e, args)
            tokens = world * args.tokens
            for name in ("dense", "dense-ddp", "base", "base-noshuffle", "base-batched", "ds-top1", "ds-top2"):
                if name in res:
                    t = res[name]
                    print(f"{world:>5} {e:>7} {name:<14} {1e3 * t:>9.1f} {tokens / t:>10.0f} {res['dense'] / t:>8.2f}")
            breakdown.append((world, e, res["base"], res["base parts"]))
    print("\nBaseLayer, where the time goes (parts timed alone, ms per step)")
    print(f"{'ranks':>5} {'experts':>7} {'total':>8} {'solver':>8} {'all-to-all':>10} {'experts':>8} {'rest':>8}")
    for world, e, total, p in breakdown:
        rest = total - p["solver"] - p["all-to-all"] - p["experts"]
        print(f"{world:>5} {e:>7} {1e3 * total:>8.1f} {1e3 * p['solver']:>8.1f} {1e3 * p['all-to-all']:>10.1f} "
              f"{1e3 * p['experts']:>8.1f} {1e3 * rest:>8.1f}")


if __name__ == "__main__":
    main()
