"""A tiny byte-level GPT trained by a DeepSpeed engine whose optimizer is SLAMB (sparse LAMB).

    # 2 CPU processes (gloo), with either launcher:
    deepspeed --num_gpus 2 examples/slamb/train_deepspeed.py --deepspeed_config configs/slamb/deepspeed_cpu.json
    torchrun --nproc_per_node 2 --master_addr 127.0.0.1 examples/slamb/train_deepspeed.py
    # one process (SLAMB is then plain LAMB):
    python examples/slamb/train_deepspeed.py --steps 100

The only SLAMB line is ``deepspeed_initialize`` (base_plugin.optim.integrations) in place of
``deepspeed.initialize``: it builds SLAMB from the config's "slamb" section, refuses settings under which
DeepSpeed would reduce gradients itself (ZeRO >= 1, fp16/bf16 wrappers, gradient clipping) and turns the
engine's gradient all-reduce off, so the only data-parallel traffic is SLAMB's (reported at the end).
Data: bytes of a UTF-8 text, by default the Python documentation shipped with Python (pydoc_data), or --data.
"""
import argparse
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import deepspeed

from base_plugin.deepspeed import use_cpu_accelerator
from base_plugin.optim.integrations import deepspeed_initialize
from base_plugin.resources import shipped

DEFAULT_CONFIG = str(shipped("configs") / "slamb" / "deepspeed_cpu.json")


def load_text(path=None) -> torch.Tensor:
    if path:
        with open(path, "rb") as f:
            raw = f.read()
    else:
        from pydoc_data.topics import topics
        raw = "\n\n".join(topics[k] for k in sorted(topics)).encode("utf-8")
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()


def get_batch(data, n, seq, gen):
    ix = torch.randint(len(data) - seq - 1, (n,), generator=gen)
    x = torch.stack([data[i:i + seq] for i in ix])
    y = torch.stack([data[i + 1:i + 1 + seq] for i in ix])
    return x, y


class Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.heads = heads

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(a)
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, d=64, layers=2, heads=4, seq=64):
        super().__init__()
        self.tok, self.pos = nn.Embedding(256, d), nn.Embedding(seq, d)
        self.blocks = nn.Sequential(*[Block(d, heads) for _ in range(layers)])
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, 256, bias=False)

    def forward(self, x):
        h = self.tok(x) + self.pos(torch.arange(x.shape[1], device=x.device))
        return self.head(self.ln(self.blocks(h)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="a UTF-8 text file (default: Python's pydoc_data topics)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)))
    parser = deepspeed.add_config_arguments(parser)  # --deepspeed, --deepspeed_config
    args = parser.parse_args(argv)
    config = args.deepspeed_config or DEFAULT_CONFIG

    if "RANK" not in os.environ:  # plain `python train_deepspeed.py`: a world of one process
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", "29513"))
    if not torch.cuda.is_available():
        use_cpu_accelerator()  # DeepSpeed's CPU accelerator, without its 30-45 s shared-memory op build
    deepspeed.init_distributed(dist_backend="gloo" if not torch.cuda.is_available() else None)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()

    data = load_text(args.data)
    split = int(0.95 * len(data))
    train_data, val_data = data[:split], data[split:]
    torch.manual_seed(args.seed)  # the same initial model everywhere (SLAMB also broadcasts rank 0's)
    model = GPT(args.d_model, args.layers, args.heads, args.seq)
    engine, opt, _, _ = deepspeed_initialize(model=model, config=config)
    micro = engine.train_micro_batch_size_per_gpu()

    @torch.no_grad()
    def evaluate(batches=8):
        engine.eval()
        gen = torch.Generator().manual_seed(0)
        losses = [float(F.cross_entropy(engine(x.to(engine.device)).flatten(0, 1), y.to(engine.device).flatten()))
                  for x, y in (get_batch(val_data, micro, args.seq, gen) for _ in range(batches))]
        engine.train()
        return sum(losses) / len(losses)

    gen = torch.Generator().manual_seed(args.seed + 1000 * rank)  # each rank its own data shard
    first_val, t0 = evaluate(), time.time()
    for step in range(1, args.steps + 1):
        for _ in range(engine.gradient_accumulation_steps()):
            x, y = get_batch(train_data, micro, args.seq, gen)
            loss = F.cross_entropy(engine(x.to(engine.device)).flatten(0, 1), y.to(engine.device).flatten())
            engine.backward(loss)
            engine.step()
        if rank == 0 and (step % args.eval_every == 0 or step == args.steps):
            print(f"step {step:5d}  train {loss.item():.3f}  val {evaluate():.3f}  "
                  f"SLAMB bytes/step {opt.comm_stats.bytes_per_step / 1024:.1f} KiB  {time.time() - t0:.0f}s",
                  flush=True)
    val = evaluate()
    stats = opt.comm_stats.as_dict()
    dense_bytes = 4 * sum(p.numel() for p in model.parameters())
    if rank == 0:
        print(f"done: val loss {first_val:.3f} -> {val:.3f} nats/byte ({val / math.log(2):.3f} bits); SLAMB sent "
              f"{stats['bytes_per_step'] / 1024:.1f} KiB/step per rank (a dense gradient all-reduce: "
              f"{dense_bytes / 1024:.1f} KiB); by kind {stats['by_kind']}")
    return dict(first_val=first_val, val=val, comm=stats, dense_bytes=dense_bytes, world=world)


if __name__ == "__main__":
    main()
