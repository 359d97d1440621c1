"""DeepSpeed engine training step: BaseMoE vs DeepSpeed's own MoE (top-1, top-2), CPU ranks.

    python benchmarks/deepspeed_moe.py                        # 1 and 2 CPU ranks, markdown table
    python benchmarks/deepspeed_moe.py --worlds 1 2 4 --d-model 512 --rounds 7

Each row: one ``deepspeed.initialize``-made engine (ZeRO 0, fp32, AdamW) training a stack of MoE layers
(random activations in, mean square out). Steps/s and tokens/s are the median over ``--rounds`` rounds
of ``--steps`` steps; the variants take turns within each round (after ``--warmup`` steps), so load from
neighbours on a shared machine hits all of them alike. The variants have the same experts and the same
parameter count (BASE's centroids [E, d] replace the top-k gate's [E, d] weight). DeepSpeed's MoE runs
with its defaults (capacity_factor 1, dropped tokens, aux loss added to the loss); BaseMoE with exact
assignment, with and without the shuffle (two more all-to-alls in forward: score rows out, chosen
experts back). ``--control`` adds "DeepSpeed top-1 + 2 all-to-alls": top-1 with, before each MoE layer,
two all-to-alls of the shuffle's sizes (an [n, E] float deal and an [n] long reply) whose results are
thrown away, i.e. what two more collectives per layer cost on this machine, whatever the routing.
Ranks are gloo processes on 127.0.0.1, ``--threads`` torch threads each. Never a timed assert: just a
table.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

VARIANTS = ("BaseMoE (exact)", "BaseMoE (exact, no shuffle)", "DeepSpeed top-1", "DeepSpeed top-2")
CONTROL = "DeepSpeed top-1 + 2 all-to-alls"


class TwoExchanges(nn.Module):
    """``layer`` after two all-to-alls the size of the shuffle's (score rows out, experts back), discarded."""

    def __init__(self, layer, experts):
        super().__init__()
        self.layer, self.experts = layer, experts

    def forward(self, x):
        with torch.no_grad():
            scores = x.reshape(-1, x.shape[-1])[:, :self.experts].contiguous()
            if dist.get_world_size() > 1:
                dist.all_to_all_single(torch.empty_like(scores), scores)
                choice = scores.argmax(1)
                dist.all_to_all_single(torch.empty_like(choice), choice)
        return self.layer(x)


class Stack(nn.Module):
    def __init__(self, variant, layers, d, ffn, experts, ep_size):
        super().__init__()
        from deepspeed.moe.layer import MoE
        from base_plugin.deepspeed import BaseMoE
        self.layers = nn.ModuleList()
        for _ in range(layers):
            expert = nn.Sequential(nn.Linear(d, ffn), nn.GELU(), nn.Linear(ffn, d))
            if variant.startswith("BaseMoE"):
                self.layers.append(BaseMoE(d, expert, num_experts=experts, ep_size=ep_size,
                                           shuffle="no shuffle" not in variant))
            else:
                k = 2 if variant.endswith("top-2") else 1
                moe = MoE(d, expert, num_experts=experts, ep_size=ep_size, k=k)
                self.layers.append(TwoExchanges(moe, experts) if variant == CONTROL else moe)
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(layers))

    def forward(self, x):
        aux = x.new_zeros(())
        for norm, layer in zip(self.norms, self.layers):
            out, l_aux, _ = layer(norm(x))
            x = x + out
            aux = aux + l_aux
        return x.pow(2).mean() + 0.01 * aux


def _rank(rank, world, store, args, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(args.threads)
    import deepspeed

    from base_plugin.deepspeed import use_cpu_accelerator

    use_cpu_accelerator()  # a CPU benchmark
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    deepspeed.init_distributed(dist_backend="gloo")
    tokens = args.micro * args.seq
    cfg = {"train_micro_batch_size_per_gpu": args.micro, "train_batch_size": args.micro * world,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
           "zero_optimization": {"stage": 0}, "steps_per_print": 10 ** 9}
    engines = {}
    for variant in VARIANTS + ((CONTROL,) if args.control else ()):
        torch.manual_seed(0)
        model = Stack(variant, args.layers, args.d_model, args.ffn, args.experts, min(world, args.experts))
        engines[variant], *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    x = torch.randn(args.micro, args.seq, args.d_model)

    def steps(engine, n):
        for _ in range(n):
            loss = engine(x)
            engine.backward(loss)
            engine.step()

    for engine in engines.values():
        steps(engine, args.warmup)
    # Rounds alternate the variants, so a neighbour's load on a shared machine hits all of them alike;
    # each variant's rate is its median over the rounds.
    rates = {v: [] for v in engines}
    for _ in range(args.rounds):
        for variant, engine in engines.items():
            dist.barrier()
            t0 = time.perf_counter()
            steps(engine, args.steps)
            dist.barrier()
            rates[variant].append(args.steps / (time.perf_counter() - t0))
    rows = []
    for variant, engine in engines.items():
        sps = sorted(rates[variant])[len(rates[variant]) // 2]
        params = sum(p.numel() for p in engine.module.parameters())
        rows.append((variant, world, sps, sps * tokens * world, params))
    if rank == 0:
        queue.put(rows)
    dist.destroy_process_group()


def run(world, args):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="bench-ds-") as tmp:
        store = os.path.join(tmp, "rendezvous")
        procs = [ctx.Process(target=_rank, args=(r, world, store, args, queue)) for r in range(world)]
        for p in procs:
            p.start()
        rows = queue.get(timeout=args.timeout)
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--ffn", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--micro", type=int, default=8, help="sequences per rank per step")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--port", type=int, default=29650)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--control", action="store_true",
                        help='add "DeepSpeed top-1 + 2 all-to-alls": the cost of two more collectives per layer')
    args = parser.parse_args(argv)
    rows = []
    for world in args.worlds:
        rows += run(world, args)
    print(f"\nDeepSpeed engine step, CPU, fp32, ZeRO 0: {args.layers} MoE layers, d={args.d_model}, "
          f"ffn={args.ffn}, {args.experts} experts, ep_size=min(ranks, experts), {args.micro}x{args.seq} "
          f"tokens per rank, {args.threads} thread(s) per rank, median of {args.rounds} rounds of {args.steps} steps\n")
    print("| layer | ranks | parameters (rank 0) | steps/s | tokens/s | vs top-1 |")
    print("|---|---:|---:|---:|---:|---:|")
    for variant, world, sps, tps, params in rows:
        top1 = next(r[3] for r in rows if r[1] == world and r[0] == "DeepSpeed top-1")
        print(f"| {variant} | {world} | {params:,} | {sps:.2f} | {tps:,.0f} | {tps / top1:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
