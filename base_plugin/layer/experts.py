"""Experts for :class:`~base_plugin.layer.BaseLayer`.

* :class:`BaseExpert` — the paper's expert: a stack of residual sublayers
  ``h = h + W2·act(W1·LayerNorm(h) + b1) + b2``, the last Linear zero-initialised so a fresh expert is
  the identity.
* :class:`GroupedExperts` — what the layer calls: the local experts of one rank applied to tokens
  sorted by local expert, ``forward(x[T, d], counts: list[int]) -> [T, d]``, or block by block,
  ``pieces(x, counts) -> [Tensor[counts[i], d]]``.
* :class:`ExpertList` — any user ``nn.Module`` experts, one call per non-empty expert.
* :func:`run_each` — the one loop that calls a list of experts on their chunks.
* :class:`BatchedBaseExperts` — L paper experts with stacked weights, run as batched matmuls.

Which to use for the paper's experts: on CPU a list of :class:`BaseExpert` (an :class:`ExpertList`).
Measured forward + backward (``benchmarks/layer.py``, ``docs/benchmarks.md``) it beat the batched form
in 7 of 8 runs at 8 and 32 local experts of 128–1024 tokens, and also at 64 experts of 8 tokens: each
expert's weight gradient is a separate small tensor, while the batched form materialises one
[L, d, f] gradient per weight. :class:`BatchedBaseExperts` is meant for accelerators, where one kernel launch per expert and
op dominates small experts (not measured: no GPU was available).
"""
from __future__ import annotations

import math
from typing import Callable, List, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

Activation = Union[str, Callable[[torch.Tensor], torch.Tensor]]
_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}


def resolve_activation(activation: Activation) -> Callable[[torch.Tensor], torch.Tensor]:
    """``"relu" | "gelu" | "silu"`` or a callable; ValueError otherwise."""
    if callable(activation):
        return activation
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)} or a callable, got {activation!r}")
    return _ACTIVATIONS[activation]


class Sublayer(nn.Module):
    """One residual feed-forward block: ``x + Linear₂(act(Linear₁(LayerNorm(x))))``; x: [..., d]."""

    def __init__(self, d_model: int, ffn_dim: int, activation: Activation = "gelu"):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.ff1 = nn.Linear(d_model, ffn_dim)
        self.ff2 = nn.Linear(ffn_dim, d_model)
        self.act = resolve_activation(activation)
        nn.init.zeros_(self.ff2.weight)
        nn.init.zeros_(self.ff2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ff2(self.act(self.ff1(self.norm(x))))


class BaseExpert(nn.Sequential):
    """The paper's expert: ``num_sublayers`` :class:`Sublayer` blocks; x: [..., d_model] -> same shape."""

    def __init__(self, d_model: int, ffn_dim: int | None = None, num_sublayers: int = 1,
                 activation: Activation = "gelu"):
        ffn_dim = 4 * d_model if ffn_dim is None else ffn_dim
        if d_model < 1 or ffn_dim < 1 or num_sublayers < 1:
            raise ValueError(f"d_model, ffn_dim and num_sublayers must be >= 1, got {d_model}, {ffn_dim}, "
                             f"{num_sublayers}")
        super().__init__(*[Sublayer(d_model, ffn_dim, activation) for _ in range(num_sublayers)])
        self.d_model = d_model


class GroupedExperts(nn.Module):
    """The local experts of one rank, as the layer calls them.

    ``forward(x, counts)``: x is Tensor[T, d] sorted by local expert, ``counts`` a list of
    ``num_experts`` ints summing to T (tokens of expert 0 first). Returns Tensor[T, d] in the same order.
    Subclasses set ``num_experts`` and ``d_model`` (``None`` if unknown).
    """

    num_experts: int
    d_model: int | None = None

    def pieces(self, x: torch.Tensor, counts: List[int]) -> List[torch.Tensor]:
        """Each local expert's output on its tokens separately: ``num_experts`` Tensors [counts[i], d], the
        blocks ``forward`` concatenates. The layer mixes every block with its gate while it is still in
        cache. This default calls the module (its hooks fire) and splits the output (views, no copy);
        the list forms override it to call each expert module directly (the experts' hooks fire, the
        container's do not)."""
        return list(self(x, counts).split(counts))


def run_each(experts: Sequence[nn.Module], x: torch.Tensor, counts: List[int]) -> List[torch.Tensor]:
    """``[experts[i](chunk_i)]`` over ``x.split(counts)``; an empty chunk is passed through without a call,
    and a tuple output keeps its first element (as DeepSpeed's experts do)."""
    out = []
    for expert, chunk, n in zip(experts, x.split(counts), counts):
        y = expert(chunk) if n else chunk
        out.append(y[0] if isinstance(y, tuple) else y)
    return out


class ExpertList(GroupedExperts):
    """Arbitrary ``nn.Module`` experts (each maps [n, d] -> [n, d]), called once per non-empty expert."""

    def __init__(self, experts: Sequence[nn.Module]):
        super().__init__()
        experts = list(experts)
        if not experts or not all(isinstance(e, nn.Module) for e in experts):
            raise ValueError("experts must be a non-empty sequence of torch.nn.Module")
        self.experts = nn.ModuleList(experts)
        self.num_experts = len(experts)
        dims = {getattr(e, "d_model", None) for e in experts}
        self.d_model = dims.pop() if len(dims) == 1 else None

    def pieces(self, x: torch.Tensor, counts: List[int]) -> List[torch.Tensor]:
        return run_each(self.experts, x, counts)

    def forward(self, x: torch.Tensor, counts: List[int]) -> torch.Tensor:
        return torch.cat(self.pieces(x, counts))


class BatchedBaseExperts(GroupedExperts):
    """``num_experts`` paper experts (:class:`BaseExpert`) with weights stacked along a leading expert
    dimension, computed with batched matmuls ([L, c, d] @ [L, d, f]).

    Tokens are packed into an [L, max_count, d] block; when the counts are so uneven that the block
    would be more than twice the real tokens (greedy routing at inference can do that), each expert's
    slice of the weights is applied to its tokens instead. Parameters per sublayer s:
    ``norm_weight/norm_bias [L, d]``, ``w1 [L, d, f]``, ``b1 [L, f]``, ``w2 [L, f, d]``, ``b2 [L, d]``.
    """

    def __init__(self, num_experts: int, d_model: int, ffn_dim: int | None = None, num_sublayers: int = 1,
                 activation: Activation = "gelu"):
        super().__init__()
        ffn_dim = 4 * d_model if ffn_dim is None else ffn_dim
        if num_experts < 1 or d_model < 1 or ffn_dim < 1 or num_sublayers < 1:
            raise ValueError("num_experts, d_model, ffn_dim and num_sublayers must be >= 1, got "
                             f"{num_experts}, {d_model}, {ffn_dim}, {num_sublayers}")
        self.num_experts, self.d_model, self.ffn_dim = num_experts, d_model, ffn_dim
        self.act = resolve_activation(activation)
        self.sublayers = nn.ModuleList()
        bound = 1 / math.sqrt(d_model)  # nn.Linear's default range for the first Linear
        for _ in range(num_sublayers):
            s = nn.Module()
            s.norm_weight = nn.Parameter(torch.ones(num_experts, d_model))
            s.norm_bias = nn.Parameter(torch.zeros(num_experts, d_model))
            s.w1 = nn.Parameter(torch.empty(num_experts, d_model, ffn_dim).uniform_(-bound, bound))
            s.b1 = nn.Parameter(torch.empty(num_experts, ffn_dim).uniform_(-bound, bound))
            s.w2 = nn.Parameter(torch.zeros(num_experts, ffn_dim, d_model))
            s.b2 = nn.Parameter(torch.zeros(num_experts, d_model))
            self.sublayers.append(s)

    @classmethod
    def from_experts(cls, experts: Sequence[BaseExpert], activation: Activation = "gelu") -> "BatchedBaseExperts":
        """Stack the weights of equally shaped :class:`BaseExpert` modules (copied, not shared)."""
        experts = list(experts)
        if not experts or not all(isinstance(e, BaseExpert) for e in experts):
            raise ValueError("from_experts needs a non-empty list of BaseExpert")
        first = experts[0][0]
        out = cls(len(experts), first.ff1.in_features, first.ff1.out_features, len(experts[0]), activation)
        with torch.no_grad():
            for i, s in enumerate(out.sublayers):
                subs = [e[i] for e in experts]
                s.norm_weight.copy_(torch.stack([b.norm.weight for b in subs]))
                s.norm_bias.copy_(torch.stack([b.norm.bias for b in subs]))
                s.w1.copy_(torch.stack([b.ff1.weight.t() for b in subs]))
                s.b1.copy_(torch.stack([b.ff1.bias for b in subs]))
                s.w2.copy_(torch.stack([b.ff2.weight.t() for b in subs]))
                s.b2.copy_(torch.stack([b.ff2.bias for b in subs]))
        return out

    def _run(self, h: torch.Tensor, idx: int | None = None) -> torch.Tensor:
        # h: [L, c, d] with all experts' weights, or [c, d] with expert idx's weights.
        for s in self.sublayers:
            nw, nb, w1, b1, w2, b2 = (p if idx is None else p[idx]
                                      for p in (s.norm_weight, s.norm_bias, s.w1, s.b1, s.w2, s.b2))
            z = F.layer_norm(h, (self.d_model,)) * nw.unsqueeze(-2) + nb.unsqueeze(-2)
            z = self.act(torch.matmul(z, w1) + b1.unsqueeze(-2))
            h = h + torch.matmul(z, w2) + b2.unsqueeze(-2)
        return h

    def forward(self, x: torch.Tensor, counts: List[int]) -> torch.Tensor:
        num, total, widest = self.num_experts, sum(counts), max(counts)
        if total == 0:
            return self._run(x.unsqueeze(0).expand(num, 0, -1)).reshape(0, x.shape[-1])
        if widest * num == total:
            return self._run(x.view(num, widest, -1)).reshape(total, -1)
        if widest * num > 2 * total:
            return torch.cat([self._run(chunk, i) for i, chunk in enumerate(x.split(counts)) if counts[i] > 0])
        count_t = torch.tensor(counts, device=x.device)
        expert = torch.repeat_interleave(torch.arange(num, device=x.device), count_t, output_size=total)
        start = torch.cumsum(count_t, 0) - count_t
        slot = expert * widest + torch.arange(total, device=x.device) - start[expert]
        packed = x.new_zeros(num * widest, x.shape[-1]).index_copy(0, slot, x)
        return self._run(packed.view(num, widest, -1)).reshape(num * widest, -1).index_select(0, slot)
