"""A small GPT with DeepSpeed MoE layers, switched to BASE routing by the config's "base_layer" section.

    # 2 CPU processes, with either launcher:
    deepspeed --num_gpus 2 examples/deepspeed/train_gpt.py --deepspeed_config configs/deepspeed/cpu_smoke.json
    torchrun --nproc_per_node 2 examples/deepspeed/train_gpt.py --deepspeed_config configs/deepspeed/cpu_smoke.json
    # one process:
    python examples/deepspeed/train_gpt.py --deepspeed_config configs/deepspeed/cpu_smoke.json --steps 100

The model is ordinary DeepSpeed MoE code (deepspeed.moe.layer.MoE in every other block). The only BASE
line is ``base_plugin.deepspeed.initialize`` in place of ``deepspeed.initialize``; remove the
"base_layer" section from the JSON and the same script trains DeepSpeed's top-1 MoE.
Data: byte-level text, by default the Python documentation shipped with Python (pydoc_data), or --data.
"""
import argparse
import json
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import deepspeed
import base_plugin.deepspeed as bds
from deepspeed.moe.layer import MoE

# -------------------------------------------------------------------------------------------- arguments
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--data", default=None, help="a UTF-8 text file (default: Python's pydoc_data topics)")
parser.add_argument("--steps", type=int, default=300)
parser.add_argument("--seq", type=int, default=64, help="context length in bytes")
parser.add_argument("--d-model", type=int, default=64)
parser.add_argument("--layers", type=int, default=4)
parser.add_argument("--heads", type=int, default=4)
parser.add_argument("--experts", type=int, default=4, help="experts per MoE layer")
parser.add_argument("--ep-size", type=int, default=None, help="expert-parallel size (default: the world size, "
                    "or the largest divisor of --experts below it)")
parser.add_argument("--moe-every", type=int, default=2, help="an MoE FFN in every n-th block")
parser.add_argument("--eval-every", type=int, default=50)
parser.add_argument("--seed", type=int, default=1234)
parser.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)))  # set by launchers
parser = deepspeed.add_config_arguments(parser)  # --deepspeed, --deepspeed_config
args = parser.parse_args()

if "RANK" not in os.environ:  # plain `python train_gpt.py`: a world of one process on this machine
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=os.environ.get("MASTER_PORT", "29512"))
if not torch.cuda.is_available():
    bds.use_cpu_accelerator()  # DeepSpeed's CPU accelerator, without its 30-45 s shared-memory op build
deepspeed.init_distributed()
rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
torch.manual_seed(args.seed)  # the same initial model on every rank
ep_size = args.ep_size or max(d for d in range(1, min(world, args.experts) + 1)
                              if world % d == 0 and args.experts % d == 0)

# -------------------------------------------------------------------------------------------- data
if args.data:
    with open(args.data, "rb") as f:
        raw = f.read()
else:
    from pydoc_data.topics import topics
    raw = "\n\n".join(topics[k] for k in sorted(topics)).encode("utf-8")
data = torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()
split = int(0.95 * len(data))
train_data, val_data = data[:split], data[split:]


def get_batch(source, batch_size, generator):
    """(x, y): LongTensor[batch, seq] of bytes and the next bytes."""
    ix = torch.randint(len(source) - args.seq - 1, (batch_size,), generator=generator)
    x = torch.stack([source[i:i + args.seq] for i in ix])
    y = torch.stack([source[i + 1:i + 1 + args.seq] for i in ix])
    return x, y


# -------------------------------------------------------------------------------------------- model
class Attention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


def mlp(d):
    return nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))


class Block(nn.Module):
    def __init__(self, d, heads, moe):
        super().__init__()
        self.ln1, self.attn, self.ln2 = nn.LayerNorm(d), Attention(d, heads), nn.LayerNorm(d)
        # An ordinary DeepSpeed MoE layer (top-1 gating) — the "base_layer" section replaces it.
        self.ffn = MoE(d, mlp(d), num_experts=args.experts, ep_size=ep_size, k=1) if moe else mlp(d)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        out = self.ffn(self.ln2(x))
        if isinstance(out, tuple):  # MoE layers return (output, l_aux, exp_counts)
            out, l_aux, _ = out
        else:
            l_aux = x.new_zeros(())
        return x + out, l_aux


class GPT(nn.Module):
    def __init__(self):
        super().__init__()
        d = args.d_model
        self.tok = nn.Embedding(256, d)
        self.pos = nn.Embedding(args.seq, d)
        self.blocks = nn.ModuleList(Block(d, args.heads, moe=(i % args.moe_every == args.moe_every - 1))
                                    for i in range(args.layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, 256, bias=False)

    def forward(self, idx, targets):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        aux = 0.0
        for block in self.blocks:
            x, l_aux = block(x)
            aux = aux + l_aux
        logits = self.head(self.ln(x))
        loss = F.cross_entropy(logits.view(-1, 256).float(), targets.view(-1))
        return loss + 0.01 * aux, loss  # with BASE, aux is 0: no balancing loss is needed


model = GPT()

# -------------------------------------------------------------------------------------------- engine
# Same call as deepspeed.initialize; the "base_layer" section (if any) swaps the MoE layers to BASE.
engine, optimizer, _, lr_scheduler = bds.initialize(args=args, model=model, model_parameters=model.parameters())
device = engine.device
if rank == 0:
    kinds = sorted({type(b.ffn).__name__ for b in engine.module.blocks})
    n_params = sum(p.numel() for p in engine.module.parameters())
    print(f"world {world}, ep_size {ep_size}, FFN layers: {kinds}, {n_params / 1e6:.2f}M parameters on rank 0, "
          f"{len(train_data) / 1e6:.2f}M training bytes")


@torch.no_grad()
def evaluate(batches=8):
    engine.eval()
    g = torch.Generator().manual_seed(0)  # the same batches each time
    total = 0.0
    for _ in range(batches):
        x, y = get_batch(val_data, engine.train_micro_batch_size_per_gpu(), g)
        total += engine(x.to(device), y.to(device))[1].item()
    engine.train()
    return total / batches


# -------------------------------------------------------------------------------------------- training
gen = torch.Generator().manual_seed(args.seed + rank)  # each rank reads its own batches
t0 = time.time()
for step in range(1, args.steps + 1):
    for _ in range(engine.gradient_accumulation_steps()):
        x, y = get_batch(train_data, engine.train_micro_batch_size_per_gpu(), gen)
        total_loss, loss = engine(x.to(device), y.to(device))
        engine.backward(total_loss)
        engine.step()
    if rank == 0 and (step % 10 == 0 or step == 1):
        tokens = step * engine.train_batch_size() * args.seq
        print(f"step {step:5d} | loss {loss.item():.3f} ({loss.item() / math.log(2):.2f} bits/byte) | "
              f"{tokens / (time.time() - t0):,.0f} tokens/s")
    if step % args.eval_every == 0 or step == args.steps:
        val = evaluate()
        if rank == 0:
            print(f"step {step:5d} | val loss {val:.3f}")

if rank == 0:
    moe = next((b.ffn for b in engine.module.blocks if isinstance(b.ffn, MoE)), None)
    if isinstance(moe, bds.BaseMoE) and moe.last_stats is not None:
        print("tokens per expert in the last eval batch (greedy routing):", moe.last_stats.tokens_per_expert.tolist())
    print(json.dumps({"final_val_loss": round(val, 4), "steps": args.steps, "world": world, "ep_size": ep_size}))
