"""How the model spreads over GPUs, and what one GPU holds while training.

Notation (all per GPU unless said otherwise): N GPUs, E experts per sparse layer, ``ep`` the
expert-parallel size (each group of ``ep`` GPUs holds all E experts, E / ep per GPU), ``D = N`` the
data-parallel degree of shared parameters, ``D_x = N / ep`` the expert-data-parallel degree (copies of
each expert). Ψ_s = shared parameters (on every GPU), Ψ_x = expert parameters / ep (this GPU's experts).
b = micro batch (sequences), s = sequence length, h = d_model, f = FFN width, a = attention heads,
V = vocabulary, S = sublayers per expert, e = bytes per activation element (2 for fp16 / bf16).

**Model states** (mixed precision Adam, Rajbhandari et al. 2020, "ZeRO", §3.1 — 2 + 2 + 12 bytes per
parameter: fp16 weights, fp16 gradients, fp32 master weights + Adam m + v; in fp32 training 4 + 4 + 8):

======  =========================  ==============================  ====================================
ZeRO    parameters                 gradients                       optimizer state
======  =========================  ==============================  ====================================
0       w·(Ψ_s + Ψ_x)              g·(Ψ_s + Ψ_x)                   K·(Ψ_s + Ψ_x)
1       w·(Ψ_s + Ψ_x)              g·(Ψ_s + Ψ_x)                   K·(Ψ_s / D + Ψ_x / D_x)
2       w·(Ψ_s + Ψ_x)              g·(Ψ_s / D + Ψ_x / D_x)         K·(Ψ_s / D + Ψ_x / D_x)
======  =========================  ==============================  ====================================

(DeepSpeed partitions expert states over the expert-data-parallel group, hence D_x. With one expert
copy per layer — N = ep = E, the paper's layout — D_x = 1 and ZeRO cannot shrink the experts' share.)

**Activations** kept for the backward pass, for b·s tokens per GPU (the paper: 2 × 1024), no
recomputation, counted in elements of e bytes plus 1-byte dropout masks (Korthikanti et al. 2022,
"Reducing Activation Recomputation in Large Transformer Models", §4.1, generalised to any f):

* transformer block: ``e·(8h + 2f + a·s·(1 + p)) + p·(2h + a·s)`` bytes per token, with p = 1 if
  dropout > 0 else 0 (8h: two LN inputs, QKV input, Q, K, V, projection input, FFN input; 2f: FFN
  hidden before and after the activation; a·s: the attention probabilities and their dropout output).
  With f = 4h and dropout this is the published ``34h + 5as``. ``flash_attention=True`` drops the a·s
  terms (the kernel recomputes the probabilities).
* block whose FFN is a top-k MoE (capacity factor c): the FFN's ``h + 2f`` become
  ``2h + k·c·(2h + 2f)`` (router input, combined output; per routed copy: expert input/output, hidden ×2).
* BASE layer: ``e·(4h + 1 + S·(2h + 2f))`` (layer input, shuffled and routed tokens, expert output,
  gate; per sublayer LN input, first Linear input, hidden before/after the activation). Balanced
  assignment makes every GPU's experts process exactly b·s tokens, so this is exact, not an average.
* dense inserted stack: ``e·(h + S·(2h + 2f))``.
* embeddings, final LN and loss: ``e·2h + p·h + (e + 4)·V`` (embedding output and final-LN input;
  logits in e bytes and fp32 log-probabilities for the cross entropy — the peak at the loss).
* ``recompute=True`` (full activation checkpointing of every block / inserted layer): each layer keeps
  only its input (``e·h`` per token) plus, during its backward, the working set of the largest layer.

Not modelled: CUDA context, communication buckets and allocator fragmentation — the fit check leaves
``reserve_gib`` (default 2 GiB) for them; temporary buffers inside a layer's forward.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

from ..models import GPTConfig
from .params import ParamCounts

GIB = 2 ** 30
PRECISIONS = {"fp16": (2, 2, 12, 2), "bf16": (2, 2, 12, 2), "fp32": (4, 4, 8, 4)}  # w, g, K, activation bytes


class PlanError(ValueError):
    """A configuration that cannot be laid out on the requested GPUs; the message names the problem."""


@dataclass(frozen=True)
class Layout:
    gpus: int
    ep_size: int            # GPUs that together hold all experts of a layer
    experts_per_gpu: int    # per sparse layer
    expert_dp: int          # copies of each expert = gpus / ep_size


def _divisors(n: int):
    return [d for d in range(1, n + 1) if n % d == 0]


def plan_layout(cfg: GPTConfig, gpus: int, ep_size: Optional[int] = None) -> Layout:
    """Spread the experts over ``gpus``: by default ``ep_size = E`` if E divides N (one expert per GPU,
    N / E copies) else ``ep_size = N`` if N divides E (E / N experts per GPU). PlanError otherwise."""
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
        raise PlanError(f"--gpus must be a positive integer, got {gpus!r}")
    experts = cfg.num_experts if cfg.sparse in ("base", "moe") else 0
    if not experts:
        if ep_size not in (None, 1):
            raise PlanError(f"--ep-size {ep_size}: model {cfg.name!r} has no experts (sparse={cfg.sparse!r})")
        return Layout(gpus, 1, 0, gpus)
    if ep_size is None:
        if gpus % experts == 0:
            ep_size = experts
        elif experts % gpus == 0:
            ep_size = gpus
        else:
            good = sorted(set(_divisors(experts)) | {experts * k for k in (1, 2, 4, 8)})
            raise PlanError(
                f"{experts} experts cannot be spread over {gpus} GPUs: the GPU count must divide the number of "
                f"experts (several experts per GPU) or be a multiple of it (several copies of each expert); "
                f"valid GPU counts include {good}")
    if ep_size < 1 or gpus % ep_size or experts % ep_size:
        raise PlanError(f"--ep-size {ep_size} must divide both the GPU count {gpus} and the number of experts "
                        f"{experts}; valid: {[d for d in _divisors(experts) if gpus % d == 0]}")
    return Layout(gpus, ep_size, experts // ep_size, gpus // ep_size)


@dataclass(frozen=True)
class MemoryEstimate:
    zero: int
    parameters: int
    gradients: int
    optimizer: int
    activations: int
    tokens_per_gpu: int

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.activations

    def fits(self, gpu_mem_gib: float, reserve_gib: float = 2.0) -> bool:
        return self.total + reserve_gib * GIB <= gpu_mem_gib * GIB

    def as_dict(self) -> dict:
        out = asdict(self)
        out["total"] = self.total
        return out


def activation_bytes_per_token(cfg: GPTConfig, act_bytes: int = 2, *, flash_attention: bool = False,
                               recompute: bool = False) -> int:
    """Activation bytes per token per GPU (see the module docstring for each term)."""
    e, h, f, a, s, v = act_bytes, cfg.d_model, cfg.ffn, cfg.n_heads, cfg.max_seq_len, cfg.vocab_size
    p = 1 if cfg.dropout > 0 else 0
    att = 0 if flash_attention else a * s
    dense_ffn = h + 2 * f
    block = e * (8 * h + 2 * f + att * (1 + p)) + p * (2 * h + att)

    layers = []  # (bytes per token) of every block and inserted layer, in order
    moe_blocks = set(cfg.positions) if cfg.sparse == "moe" else set()
    fe, sub = cfg.expert_ffn, cfg.expert_sublayers
    for i in range(cfg.n_layers):
        if i in moe_blocks:
            k, c = cfg.top_k, cfg.capacity_factor
            moe_ffn = 2 * h + k * c * (2 * h + 2 * fe)
            layers.append(block + int(round(e * (moe_ffn - dense_ffn))))
        else:
            layers.append(block)
    inserted = len(cfg.positions) if cfg.sparse in ("base", "dense") else 0
    if cfg.sparse == "base":
        layers += [e * (4 * h + 1 + sub * (2 * h + 2 * fe))] * inserted
    elif cfg.sparse == "dense":
        layers += [e * (h + sub * (2 * h + 2 * fe))] * inserted
    ends = e * 2 * h + p * h + (e + 4) * v
    if recompute:
        return ends + e * h * len(layers) + max(layers)
    return ends + sum(layers)


def estimate_memory(cfg: GPTConfig, counts: ParamCounts, layout: Layout, zero: int = 0, *,
                    micro_batch: int = 2, seq_len: Optional[int] = None, precision: str = "fp16",
                    flash_attention: bool = False, recompute: bool = False) -> MemoryEstimate:
    """Bytes per GPU for parameters, gradients, optimizer state (Adam, ZeRO 0/1/2) and activations of
    ``micro_batch × seq_len`` tokens (default the paper's 2 × 1024; seq_len defaults to max_seq_len)."""
    if zero not in (0, 1, 2):
        raise PlanError(f"--zero {zero}: supported ZeRO stages are 0, 1 and 2 (stage 3 shards parameters "
                        "too; not modelled)")
    if precision not in PRECISIONS:
        raise PlanError(f"precision {precision!r}: one of {sorted(PRECISIONS)}")
    w, g, k, e = PRECISIONS[precision]
    seq_len = seq_len or cfg.max_seq_len
    if seq_len > cfg.max_seq_len:
        raise PlanError(f"sequence length {seq_len} > the model's max_seq_len {cfg.max_seq_len}")
    shared, local_expert = counts.shared, counts.expert // layout.ep_size if counts.expert else 0
    here = shared + local_expert
    sharded = shared / layout.gpus + (local_expert / layout.expert_dp if local_expert else 0)
    params = w * here
    grads = g * (sharded if zero >= 2 else here)
    optim = k * (sharded if zero >= 1 else here)
    tokens = micro_batch * seq_len
    per_token = activation_bytes_per_token(cfg.replace(max_seq_len=seq_len), e, flash_attention=flash_attention,
                                           recompute=recompute)
    return MemoryEstimate(zero, int(params), int(round(grads)), int(round(optim)), tokens * per_token, tokens)
