"""The demo's model: a small byte-level GPT whose middle block has a mixture-of-experts FFN.

It stands for "a user's existing DeepSpeed MoE model": the MoE block is DeepSpeed's own
``deepspeed.moe.layer.MoE`` (top-1 or top-2 gating, capacity factor, auxiliary loss), or a dense FFN
for the dense baseline. The BASE run uses the very same model and turns its MoE into a BASE layer
through the ``"base_layer"`` section of the DeepSpeed config, as a user would.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
from torch import nn
from torch.nn import functional as F


@dataclass
class GPTConfig:
    vocab_size: int = 256
    seq_len: int = 128
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    ffn: int = 512                 # hidden size of the dense FFN and of each expert
    moe_layers: tuple = (2,)       # blocks whose FFN is a mixture of experts
    moe: str = "dense"             # "dense" | "top1" | "top2"
    num_experts: int = 8
    ep_size: int = 1
    capacity_factor: float = 1.0
    aux_loss_coeff: float = 0.01


def feed_forward(d_model: int, ffn: int) -> nn.Module:
    return nn.Sequential(nn.Linear(d_model, ffn), nn.GELU(), nn.Linear(ffn, d_model))


class Block(nn.Module):
    """Pre-LayerNorm transformer block; ``mlp`` is a dense FFN or a DeepSpeed MoE."""

    def __init__(self, cfg: GPTConfig, moe: bool):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.n_heads = cfg.n_heads
        if moe and cfg.moe != "dense":
            from deepspeed.moe.layer import MoE

            k = 1 if cfg.moe == "top1" else 2
            # top-2 runs two experts per token: half-width experts keep the active parameters equal
            width = cfg.ffn if k == 1 else cfg.ffn // 2
            self.mlp = MoE(hidden_size=cfg.d_model, expert=feed_forward(cfg.d_model, width),
                           num_experts=cfg.num_experts, ep_size=cfg.ep_size, k=k,
                           capacity_factor=cfg.capacity_factor, eval_capacity_factor=cfg.capacity_factor,
                           min_capacity=1, drop_tokens=True)
        else:
            self.mlp = feed_forward(cfg.d_model, cfg.ffn)

    def forward(self, h: torch.Tensor, aux: List[torch.Tensor]) -> torch.Tensor:
        b, t, d = h.shape
        q, k, v = self.qkv(self.ln1(h)).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + self.proj(att.transpose(1, 2).reshape(b, t, d))
        out = self.mlp(self.ln2(h))
        if isinstance(out, tuple):  # DeepSpeed's MoE (and BASE's drop-in): (output, l_aux, exp_counts)
            out, l_aux, self.last_counts = out
            aux.append(l_aux)
        return h + out


def _init(module: nn.Module) -> None:
    """GPT-2 style: small normal weights, zero biases (keeps the first logits near uniform)."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


class TinyGPT(nn.Module):
    """Byte-level GPT. ``forward(x[b, t]) -> (logits[b, t, vocab], aux_loss)``."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i in cfg.moe_layers) for i in range(cfg.n_layers))
        self.ln = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.head.weight = self.tok.weight
        self.apply(_init)


    def forward(self, x: torch.Tensor):
        h = self.tok(x) + self.pos(torch.arange(x.shape[1], device=x.device))
        aux: List[torch.Tensor] = []
        for block in self.blocks:
            h = block(h, aux)
        aux_loss = sum(aux) if aux else h.new_zeros(())
        return self.head(self.ln(h)), aux_loss

    def moe_blocks(self) -> List[Block]:
        return [b for b in self.blocks if not isinstance(b.mlp, nn.Sequential)]
