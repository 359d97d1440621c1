"""Parameter counts read off the real model class built on the meta device (no formula to drift).

    counts = count_parameters(cfg)      # ParamCounts(total, shared, expert, per_expert, active, ...)

* ``total``: every parameter once (a tied embedding / output matrix counts once).
* ``expert``: parameters carrying the expert mark (``allreduce = False``, as DeepSpeed marks them):
  the experts' weights and, for BASE, each expert's centroid (a row of the layer's ``centroids``).
* ``shared`` = total − expert: replicated on every GPU (embeddings, attention, dense FFNs, LayerNorms,
  top-k routers).
* ``per_expert`` = expert / (num_experts × sparse layers): one expert of one sparse layer.
* ``active`` (per token) = shared + sparse layers × experts per token × per_expert — the parameters a
  token's forward pass touches (BASE: 1 expert per layer; top-k MoE: k; dense / none: all are shared).
  For a top-k MoE this counts the router as shared and ignores dropped tokens.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from ..layer import is_expert_parameter
from ..models import GPT, GPTConfig, build_meta


@dataclass(frozen=True)
class ParamCounts:
    total: int
    shared: int
    expert: int
    per_expert: int
    active: int
    num_experts: int
    sparse_layers: int

    def as_dict(self) -> dict:
        return asdict(self)


def count_model(model: GPT) -> ParamCounts:
    """Counts for an already built model (meta or real; any device)."""
    cfg: GPTConfig = model.cfg
    seen, total, expert = set(), 0, 0
    for p in model.parameters():  # parameters() already yields a shared (tied) tensor once
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if is_expert_parameter(p):
            expert += p.numel()
    sparse_layers = len(cfg.positions) if cfg.sparse in ("base", "moe") else 0
    slots = cfg.num_experts * sparse_layers
    if slots and expert % slots:
        raise ValueError(f"{expert} expert parameters do not split evenly over {cfg.num_experts} experts × "
                         f"{sparse_layers} layers (a model built with a group holds only its local experts: "
                         "count a model built without one)")
    per_expert = expert // slots if slots else 0
    shared = total - expert
    active = shared + sparse_layers * cfg.experts_per_token * per_expert
    return ParamCounts(total, shared, expert, per_expert, active, cfg.num_experts if slots else 0, sparse_layers)


def count_parameters(cfg: GPTConfig) -> ParamCounts:
    """Build ``GPT(cfg)`` on the meta device (single process: every expert local) and count it."""
    return count_model(build_meta(cfg))
