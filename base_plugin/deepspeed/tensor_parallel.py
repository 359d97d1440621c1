"""Tokens of a tensor-parallel model in a BASE layer, the way DeepSpeed's ``MoE`` treats them.

With a tensor-parallel ``mpu`` (``deepspeed.initialize(mpu=...)``, stored in
``deepspeed.utils.groups.mpu``), the hidden states that reach an MoE layer are *replicated* over the
tensor-parallel (TP) ranks: every TP rank holds the same tokens. DeepSpeed's ``MOELayer`` then

1. drops the duplicates: each TP rank keeps its 1/TP share (``deepspeed.moe.mappings.drop_tokens``),
   routes and dispatches only those;
2. when the experts themselves are tensor-parallel (``enable_expert_tensor_parallelism=True``: the
   groups record an expert-model-parallel size > 1), gathers the tokens every TP shard of an expert
   received, so that all shards compute on the same tokens, and drops them again afterwards;
3. gathers the outputs over the TP ranks (``gather_tokens``), replicated again for the next
   tensor-parallel layer.

:func:`routed_over_tensor_parallel` does 1 and 3 around a BASE layer, :func:`mix_over_tensor_parallel`
does 2 around its expert-and-gate step, with DeepSpeed's own ``drop_tokens`` / ``gather_tokens``
(autograd: the backward of a drop is a gather and vice versa; their collectives go through
``deepspeed.comm``; rows travel flattened, see :func:`~base_plugin.deepspeed.compat.drop_token_rows`).
So each token is routed once, on one TP rank, as in DeepSpeed's MoE; a BASE layer with TP ranks routes
the same problems as one whose ranks hold those token shares. Both are no-ops without an mpu or with a
tensor-parallel size of 1.

What the tensor-parallel *expert* itself must do is its own business, as with DeepSpeed's MoE (e.g.
Megatron's column- and row-parallel linears with their all-reduces): with (2), every shard sees the
same tokens, its input gradient must be complete (summed over the shards) and its output the full
expert output. The gate α = σ(x·c_e) and the centroid c_e (a full [d] vector on every shard) are then
computed on the same tokens on every shard, so their gradients agree across the shards.
"""
from __future__ import annotations

from typing import Callable, List, Tuple

import torch
from torch.nn import functional as F

from deepspeed import comm as ds_comm
from deepspeed.utils import groups
from deepspeed.utils.bwc import (bwc_tensor_model_parallel_group, bwc_tensor_model_parallel_rank,
                                 bwc_tensor_model_parallel_world_size)

from .compat import drop_token_rows, gather_token_rows


def tensor_parallel_size() -> int:
    """The tensor-parallel size of DeepSpeed's mpu (1 without one)."""
    return bwc_tensor_model_parallel_world_size(groups.mpu)


def experts_are_tensor_parallel() -> bool:
    """True when tokens must be shared between the TP shards of every expert (DeepSpeed's condition)."""
    return tensor_parallel_size() > 1 and groups._get_expert_model_parallel_world_size() > 1


def routed_over_tensor_parallel(layer: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``layer`` on this TP rank's share of the replicated tokens ``x`` [..., d]; the full output, replicated.

    The tokens are flattened and split in TP equal consecutive blocks, TP rank t taking block t.
    ValueError when their number is not divisible by the tensor-parallel size.
    """
    tp = tensor_parallel_size()
    if tp == 1:
        return layer(x)
    flat = x.reshape(-1, x.shape[-1])
    if flat.shape[0] % tp:
        raise ValueError(f"BaseMoE with tensor parallelism: the {flat.shape[0]} tokens replicated over the {tp} "
                         f"tensor-parallel ranks are split evenly among them, so their number must be divisible by "
                         f"{tp}")
    return gather_token_rows(layer(drop_token_rows(flat))).reshape(x.shape)


def mix_over_tensor_parallel(mix: Callable[[torch.Tensor, List[int]], Tuple[torch.Tensor, torch.Tensor]],
                             x: torch.Tensor, counts: List[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """``mix(tokens, counts) -> (y, gates)`` on the tokens of all TP ranks of this expert shard group.

    x: Tensor[T, d], this rank's received tokens sorted by local expert, ``counts[i]`` for local expert i.
    Every TP rank holds shards of the same local experts but received other tokens: the counts are
    gathered, the tokens gathered (padded to the largest T, DeepSpeed's ``gather_tokens`` needs equal
    shapes) and regrouped by local expert — expert i's tokens from TP rank 0, 1, … — ``mix`` runs on all
    of them on every TP rank, and this rank keeps its own rows (``drop_tokens``, whose backward gathers
    every rank's output gradient, so each shard back-propagates through all the tokens it computed on).
    Returns this rank's ``(y [T, d], gates [T])``. Collectives: one all_gather of counts and the two
    token collectives, on the mpu's TP group, through ``deepspeed.comm``.
    """
    tp, rank = tensor_parallel_size(), bwc_tensor_model_parallel_rank(groups.mpu)
    mine = torch.tensor(counts, dtype=torch.long, device=x.device)
    rows = [torch.empty_like(mine) for _ in range(tp)]
    ds_comm.all_gather(rows, mine, group=bwc_tensor_model_parallel_group(groups.mpu))
    table = torch.stack(rows).tolist()  # [tp][local experts]: host ints for the split sizes
    sizes = [sum(r) for r in table]
    widest = max(sizes)
    everyone = gather_token_rows(F.pad(x, (0, 0, 0, widest - x.shape[0])))  # [tp * widest, d]
    starts = [[r * widest + sum(table[r][:i]) for i in range(len(counts))] for r in range(tp)]
    index = torch.cat([torch.arange(starts[r][i], starts[r][i] + table[r][i]) for i in range(len(counts))
                       for r in range(tp)]).to(x.device)
    y, gates = mix(everyone.index_select(0, index), [sum(table[r][i] for r in range(tp)) for i in range(len(counts))])
    own = slice(rank * widest, rank * widest + sizes[rank])
    placed = y.new_zeros(tp * widest, y.shape[-1]).index_copy(0, index, y)
    gate_rows = gates.new_zeros(tp * widest).index_copy(0, index, gates.detach())
    return drop_token_rows(placed)[:sizes[rank]], gate_rows[own]
