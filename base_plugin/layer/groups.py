"""The expert-parallel process group, and the marks that tell expert parameters apart.

Marks follow DeepSpeed's convention (``deepspeed.moe.experts.Experts``): a parameter with
``allreduce = False`` is not averaged over the whole data-parallel group, and ``group_name`` names the
expert-parallel layout (DeepSpeed uses ``"ep_size_<W>"``) whose expert-data-parallel group reduces it.
``deepspeed.moe.utils.is_moe_param`` recognises exactly this, so no DeepSpeed import is needed here.
"""
from __future__ import annotations

from typing import Iterable, Optional, Tuple

import torch
import torch.distributed as dist


def resolve_group(group: Optional[dist.ProcessGroup]) -> Tuple[Optional[dist.ProcessGroup], int, int]:
    """``(group, size, rank_in_group)``; ``group`` is ``None`` when there is nothing to talk to.

    ``group=None`` means the default (world) group if torch.distributed is initialised, else a single
    process. ValueError if a group is given without an initialised torch.distributed, or if this
    process is not a member of it.
    """
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise ValueError("a process group was given but torch.distributed is not initialised")
        return None, 1, 0
    group = dist.group.WORLD if group is None else group
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"this process (global rank {dist.get_rank()}) is not a member of the expert-parallel "
                         f"group (global ranks {dist.get_process_group_ranks(group)})")
    size = dist.get_world_size(group)
    return (group if size > 1 else None), size, rank


def expert_group_name(ep_size: int) -> str:
    """DeepSpeed's name for the expert-parallel layout of size ``ep_size``."""
    return f"ep_size_{ep_size}"


def mark_expert_parameters(params: Iterable[torch.nn.Parameter], group_name: str) -> None:
    """Set ``allreduce = False`` and ``group_name`` on each parameter (DeepSpeed's expert marks)."""
    for p in params:
        p.allreduce = False
        p.group_name = group_name


def is_expert_parameter(param: torch.nn.Parameter) -> bool:
    """True for parameters marked by :func:`mark_expert_parameters` (or by DeepSpeed itself)."""
    return getattr(param, "allreduce", True) is False
