"""A small, legible GPT-style language model with BASE layers, dense FFN stacks or top-k MoE.

    cfg = GPTConfig(vocab_size=256, max_seq_len=128, d_model=64, n_layers=4, n_heads=4,
                    sparse="base", num_experts=4, expert_sublayers=2)
    model = GPT(cfg)                                  # or GPT(cfg, group=ep_group) expert-parallel
    logits, loss = model(idx, targets)                # idx, targets: LongTensor[batch, seq]

Architecture (pre-LayerNorm, as GPT-2 / nanoGPT): token + learned position embeddings → ``n_layers``
:class:`Block` s (``x + Attn(LN(x))``, ``x + FFN(LN(x))``) → final LayerNorm → output projection
(tied to the token embedding by default). Into this stack go, depending on ``cfg.sparse``:

* ``"base"`` — the paper's BASE layer (Lewis et al. 2021, §3): a :class:`~base_plugin.layer.BaseLayer`
  whose ``num_experts`` experts are each ``expert_sublayers`` residual sublayers
  (LN → Linear d→f → activation → Linear f→d), *inserted between* blocks (the paper adds BASE layers to
  a transformer; it does not replace an FFN). ``sparse_positions`` = the number of blocks before each
  inserted layer (default: one layer in the middle, ``n_layers // 2``; k layers evenly spaced).
* ``"dense"`` — the same insertion points hold one dense stack of ``expert_sublayers`` sublayers: the
  compute of a BASE layer (one expert per token) with no routing. This is the dense counterpart at equal
  active parameters, and the plain module a DeepSpeed ``"base_layer"`` section can swap for BASE.
* ``"moe"`` — the FFN of the blocks *at index* ``sparse_positions`` (default every other block:
  1, 3, 5, …) is a top-k mixture of experts from ``moe_factory(cfg, block_index)`` (default
  :class:`TopKMoE`, a single-process Switch / GShard-style layer; pass a factory building
  ``deepspeed.moe.layer.MoE`` to train through DeepSpeed).
* ``"none"`` — a plain dense transformer.

A sparse module may return a tensor or a tuple ``(out, aux_loss, ...)`` (DeepSpeed's MoE convention);
aux losses are summed into ``loss`` with weight ``aux_loss_coef``.

Expert parameters carry DeepSpeed's marks (``allreduce = False``; see
:func:`base_plugin.layer.is_expert_parameter`), which is how :mod:`base_plugin.planner` tells them from
shared ones. The model builds on the meta device (``with torch.device("meta"): GPT(cfg)``) without
allocating memory, which is how the planner counts the paper models' 117B parameters.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..layer import BaseExpert, BaseLayer, BatchedBaseExperts, mark_expert_parameters, resolve_group
from ..layer.experts import resolve_activation

SPARSE_KINDS = ("base", "dense", "moe", "none")


@dataclass
class GPTConfig:
    """Every dimension of :class:`GPT`. ``None`` widths default to ``4 * d_model``.

    ``sparse_positions`` means, for ``"base"`` / ``"dense"``: how many blocks come before each inserted
    layer (0 … n_layers); for ``"moe"``: the indices of the blocks whose FFN is an MoE (0 … n_layers−1).
    Empty: one inserted layer after ``n_layers // 2`` blocks, or an MoE in every other block.
    """

    name: str = "gpt"
    vocab_size: int = 50304
    max_seq_len: int = 1024
    d_model: int = 2048
    n_layers: int = 24
    n_heads: int = 16
    ffn_dim: Optional[int] = None
    activation: str = "gelu"
    tie_embeddings: bool = True
    dropout: float = 0.0
    sparse: str = "none"
    sparse_positions: Tuple[int, ...] = ()
    num_experts: int = 1
    expert_sublayers: int = 1
    expert_ffn_dim: Optional[int] = None
    top_k: int = 1
    capacity_factor: float = 1.0
    aux_loss_coef: float = 0.01
    base_shuffle: bool = True
    base_inference: str = "greedy"
    notes: str = field(default="", compare=False)

    def __post_init__(self):
        self.sparse_positions = tuple(int(p) for p in self.sparse_positions)
        self.validate()

    # ---- derived values -------------------------------------------------------------------------
    @property
    def ffn(self) -> int:
        return self.ffn_dim or 4 * self.d_model

    @property
    def expert_ffn(self) -> int:
        return self.expert_ffn_dim or self.ffn

    @property
    def positions(self) -> Tuple[int, ...]:
        """The effective ``sparse_positions`` (defaults filled in; empty for ``"none"``)."""
        if self.sparse == "none":
            return ()
        if self.sparse_positions:
            return self.sparse_positions
        if self.sparse == "moe":
            return tuple(range(1, self.n_layers, 2))
        return (self.n_layers // 2,)

    @property
    def experts_per_token(self) -> int:
        """Experts each token passes through in one sparse layer (BASE: 1; MoE: top_k; else 0)."""
        return {"base": 1, "moe": self.top_k}.get(self.sparse, 0)

    # ---- checks and (de)serialisation -----------------------------------------------------------
    def validate(self) -> None:
        """ValueError naming the field for anything the model cannot be built with."""
        def bad(key, allowed):
            return ValueError(f"GPTConfig.{key} = {getattr(self, key)!r} is not valid: {allowed}")
        for key in ("vocab_size", "max_seq_len", "d_model", "n_layers", "n_heads", "num_experts",
                    "expert_sublayers", "top_k"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise bad(key, "a positive integer")
        for key in ("ffn_dim", "expert_ffn_dim"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise bad(key, "a positive integer or null (4 * d_model)")
        if self.d_model % self.n_heads:
            raise bad("n_heads", f"a divisor of d_model={self.d_model}")
        if self.sparse not in SPARSE_KINDS:
            raise bad("sparse", f"one of {list(SPARSE_KINDS)}")
        resolve_activation(self.activation)
        if not 0.0 <= self.dropout < 1.0:
            raise bad("dropout", "in [0, 1)")
        if self.capacity_factor <= 0:
            raise bad("capacity_factor", "> 0")
        if self.base_inference not in ("greedy", "exact"):
            raise bad("base_inference", "'greedy' or 'exact'")
        if self.sparse == "moe":
            if self.top_k > self.num_experts:
                raise bad("top_k", f"at most num_experts={self.num_experts}")
            positions = self.positions
            if any(not 0 <= p < self.n_layers for p in positions) or len(set(positions)) != len(positions):
                raise bad("sparse_positions", f"distinct block indices in [0, {self.n_layers - 1}] for sparse='moe'")
        elif self.sparse in ("base", "dense"):
            if any(not 0 <= p <= self.n_layers for p in self.positions):
                raise bad("sparse_positions", f"block counts in [0, {self.n_layers}] for sparse={self.sparse!r}")
        elif self.sparse_positions:
            raise bad("sparse_positions", "empty for sparse='none'")

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["sparse_positions"] = list(self.sparse_positions)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "GPTConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown GPTConfig keys {unknown}; allowed: {sorted(known)}")
        data = dict(data)
        if "sparse_positions" in data:
            data["sparse_positions"] = tuple(data["sparse_positions"])
        return cls(**data)

    @classmethod
    def load(cls, path) -> "GPTConfig":
        """Read a JSON file (or YAML, if PyYAML is installed); a top-level ``"model"`` key is allowed."""
        path = Path(path)
        text = path.read_text(encoding="utf-8")
        if path.suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError as exc:
                raise ValueError(f"{path}: reading YAML needs PyYAML (pip install pyyaml), or use JSON") from exc
            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON/YAML object")
        return cls.from_dict(data.get("model", data))

    def replace(self, **changes) -> "GPTConfig":
        return dataclasses.replace(self, **changes)


# ---- building blocks ----------------------------------------------------------------------------

class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: one fused QKV Linear (d → 3d) and an output Linear (d → d)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_heads, self.dropout = cfg.n_heads, cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(b, s, d))


class MLP(nn.Module):
    """The dense FFN of a block: Linear d → f, activation, Linear f → d."""

    def __init__(self, d_model: int, ffn_dim: int, activation: str = "gelu"):
        super().__init__()
        self.fc = nn.Linear(d_model, ffn_dim)
        self.proj = nn.Linear(ffn_dim, d_model)
        self.act = resolve_activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.act(self.fc(x)))


class TopKMoE(nn.Module):
    """A single-process top-k mixture of FFN experts (Switch for k = 1, GShard-style for k = 2).

    Router ``Linear(d, E, bias=False)``; softmax probabilities; each token goes to its k most probable
    experts, each expert taking at most ``ceil(k · T · capacity_factor / E)`` tokens (first come, first
    served; the rest are dropped — their expert output is 0, the block's residual carries them). Output
    = Σ over kept choices of gate · expert(x), the gates renormalised over the k choices when k > 1.
    Aux loss (Switch, Fedus et al. 2021): ``E · Σ_e fraction_e · mean_prob_e``.
    Returns ``(out, aux_loss, tokens_per_expert)``, DeepSpeed's MoE convention. Experts are stored
    stacked: ``w1 [E, d, f]``, ``b1 [E, f]``, ``w2 [E, f, d]``, ``b2 [E, d]`` — one FFN's parameters each.
    """

    def __init__(self, d_model: int, ffn_dim: int, num_experts: int, top_k: int = 1,
                 capacity_factor: float = 1.0, activation: str = "gelu"):
        super().__init__()
        self.num_experts, self.top_k, self.capacity_factor = num_experts, top_k, capacity_factor
        self.act = resolve_activation(activation)
        self.router = nn.Linear(d_model, num_experts, bias=False)
        bound1, bound2 = 1 / math.sqrt(d_model), 1 / math.sqrt(ffn_dim)
        self.w1 = nn.Parameter(torch.empty(num_experts, d_model, ffn_dim).uniform_(-bound1, bound1))
        self.b1 = nn.Parameter(torch.zeros(num_experts, ffn_dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, ffn_dim, d_model).uniform_(-bound2, bound2))
        self.b2 = nn.Parameter(torch.zeros(num_experts, d_model))
        mark_expert_parameters([self.w1, self.b1, self.w2, self.b2], "ep_size_1")
        self.last_dropped: Optional[torch.Tensor] = None

    def forward(self, x: torch.Tensor):
        shape = x.shape
        h = x.reshape(-1, shape[-1])
        t, e, k = h.shape[0], self.num_experts, self.top_k
        probs = torch.softmax(self.router(h).float(), dim=-1)                 # [T, E]
        gate, expert = probs.topk(k, dim=-1)                                  # [T, k]
        if k > 1:
            gate = gate / gate.sum(-1, keepdim=True)
        capacity = max(1, math.ceil(k * t * self.capacity_factor / e))
        onehot = F.one_hot(expert.t().reshape(-1), e)                         # choice-major: all 1st choices first
        slot = (onehot.cumsum(0) - 1).mul(onehot).sum(-1)                     # position inside its expert
        keep = slot < capacity
        flat_expert, flat_gate = expert.t().reshape(-1), gate.t().reshape(-1)
        token = torch.arange(t, device=h.device).repeat(k)
        buf = h.new_zeros(e, capacity, h.shape[-1])
        buf[flat_expert[keep], slot[keep]] = h[token[keep]]
        z = self.act(torch.baddbmm(self.b1.unsqueeze(1), buf, self.w1))
        y = torch.baddbmm(self.b2.unsqueeze(1), z, self.w2)                   # [E, C, d]
        out = torch.zeros_like(h)
        out.index_add_(0, token[keep], y[flat_expert[keep], slot[keep]] * flat_gate[keep, None].to(h.dtype))
        counts = onehot[: t].sum(0)                                           # first-choice load per expert
        aux = e * (counts.float() / max(t, 1) * probs.mean(0)).sum()
        self.last_dropped = (~keep).sum().detach()                           # dropped (token, choice) pairs
        return out.reshape(shape), aux, counts


class Block(nn.Module):
    """Pre-LN transformer block: ``x + attn(ln1(x))`` then ``x + ffn(ln2(x))``; ``ffn`` may be an MoE."""

    def __init__(self, cfg: GPTConfig, ffn: Optional[nn.Module] = None):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.ffn = ffn if ffn is not None else MLP(cfg.d_model, cfg.ffn, cfg.activation)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor):
        x = x + self.drop(self.attn(self.ln1(x)))
        out, aux = _split(self.ffn(self.ln2(x)))
        return x + self.drop(out), aux


def _split(result):
    """``(tensor, aux or None)`` from a module returning a tensor or ``(tensor, aux, ...)``."""
    if isinstance(result, tuple):
        return result[0], (result[1] if len(result) > 1 else None)
    return result, None


class Inserted(nn.Module):
    """An inserted (BASE or dense) layer. BASE's output already is ``α·f(x) + (1 − α)·x``; a dense
    stack of residual sublayers is ``f(x)`` with its own residuals; so the layer returns ``module(x)``."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.layer = module

    def forward(self, x: torch.Tensor):
        return _split(self.layer(x))


MoEFactory = Callable[[GPTConfig, int], nn.Module]


def default_moe_factory(cfg: GPTConfig, block_index: int) -> nn.Module:
    return TopKMoE(cfg.d_model, cfg.expert_ffn, cfg.num_experts, cfg.top_k, cfg.capacity_factor, cfg.activation)


class GPT(nn.Module):
    """The language model of :mod:`base_plugin.models.gpt` (see the module docstring).

    Args:
        cfg: the :class:`GPTConfig`.
        group: the expert-parallel process group for BASE layers (``None``: the world if
            torch.distributed is initialised, else one process holding every expert). Each rank builds
            only its ``num_experts / W`` local experts.
        moe_factory: builds the MoE module for block ``i`` when ``cfg.sparse == "moe"``.
        batched_experts: BASE experts as one :class:`~base_plugin.layer.BatchedBaseExperts` (stacked
            weights, batched matmuls) rather than a list of :class:`~base_plugin.layer.BaseExpert` (same
            parameter count). Default False: on CPU the list is the faster form (see
            :mod:`base_plugin.layer.experts`).

    ``self.layers`` is a ModuleList of :class:`Block` and :class:`Inserted` in order, so an inserted
    layer is ``layers.<i>`` (``layer_names()`` lists them — what a DeepSpeed ``"base_layer"."modules"``
    entry names).
    """

    def __init__(self, cfg: GPTConfig, *, group=None, moe_factory: Optional[MoEFactory] = None,
                 batched_experts: bool = False):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        moe_factory = moe_factory or default_moe_factory
        inserted = sorted(cfg.positions) if cfg.sparse in ("base", "dense") else []
        layers = []
        for i in range(cfg.n_layers + 1):
            layers += [self._inserted(cfg, group, batched_experts) for p in inserted if p == i]
            if i < cfg.n_layers:
                moe = cfg.sparse == "moe" and i in cfg.positions
                layers.append(Block(cfg, moe_factory(cfg, i) if moe else None))
        self.layers = nn.ModuleList(layers)
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.tok_emb.weight
        self._init_shared()
        self.aux_loss: Optional[torch.Tensor] = None

    @staticmethod
    def _inserted(cfg: GPTConfig, group, batched: bool) -> Inserted:
        d, f, s = cfg.d_model, cfg.expert_ffn, cfg.expert_sublayers
        if cfg.sparse == "dense":
            return Inserted(BaseExpert(d, f, s, cfg.activation))
        _, world, _ = resolve_group(group)  # as BaseLayer will resolve it: this rank holds E / W experts
        if cfg.num_experts % world:
            raise ValueError(f"GPTConfig.num_experts = {cfg.num_experts} is not divisible by the expert-parallel "
                             f"group size {world}")
        local = cfg.num_experts // world
        experts = (BatchedBaseExperts(local, d, f, s, cfg.activation) if batched
                   else [BaseExpert(d, f, s, cfg.activation) for _ in range(local)])
        return Inserted(BaseLayer(d, experts, cfg.num_experts, group, shuffle=cfg.base_shuffle,
                                  inference=cfg.base_inference))

    def _init_shared(self) -> None:
        """GPT-2 style: normal(0, 0.02) embeddings and block Linears; output Linears of blocks scaled by
        1/sqrt(2·n_layers). Expert weights keep their own initialisation (BASE: last Linear zero)."""
        std = 0.02
        nn.init.normal_(self.tok_emb.weight, std=std)
        nn.init.normal_(self.pos_emb.weight, std=std)
        for layer in self.layers:
            if not isinstance(layer, Block):
                continue
            for name, m in layer.named_modules():
                if isinstance(m, nn.Linear):
                    scale = 1 / math.sqrt(2 * self.cfg.n_layers) if name.endswith("proj") else 1.0
                    nn.init.normal_(m.weight, std=std * scale)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
        if not self.cfg.tie_embeddings:
            nn.init.normal_(self.head.weight, std=std)

    def layer_names(self) -> list:
        """Names of the inserted (BASE / dense) layers, e.g. ``["layers.12.layer"]``."""
        return [f"layers.{i}.layer" for i, m in enumerate(self.layers) if isinstance(m, Inserted)]

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None):
        """``idx`` LongTensor[b, s] (s ≤ max_seq_len) → ``(logits [b, s, V], loss or None)``.

        ``loss`` = mean next-token cross entropy (targets −100 are ignored) + ``aux_loss_coef`` × the
        summed aux losses of the sparse layers (kept in ``self.aux_loss``).
        """
        b, s = idx.shape
        if s > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {s} > max_seq_len {self.cfg.max_seq_len}")
        x = self.drop(self.tok_emb(idx) + self.pos_emb(torch.arange(s, device=idx.device)))
        aux_total = None
        for layer in self.layers:
            x, aux = layer(x)
            if aux is not None:
                aux_total = aux if aux_total is None else aux_total + aux
        logits = self.head(self.ln_f(x))
        self.aux_loss = aux_total
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
        if aux_total is not None:
            loss = loss + self.cfg.aux_loss_coef * aux_total.to(loss.dtype)
        return logits, loss


def build_meta(cfg: GPTConfig, **kwargs) -> GPT:
    """The model on the meta device: shapes only, no memory (how the planner counts the paper models)."""
    with torch.device("meta"):
        return GPT(cfg, **kwargs)
