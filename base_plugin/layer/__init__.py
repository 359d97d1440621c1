"""The BASE layer, framework-agnostic (torch.distributed only).

    BaseLayer(d_model, experts, num_experts, group=None, *, shuffle=True, assignment="exact", inference="greedy")
"""
from .all_to_all import all_to_all, exchange, exchange_counts
from .base_layer import BaseLayer
from .experts import BaseExpert, BatchedBaseExperts, ExpertList, GroupedExperts, Sublayer
from .groups import expert_group_name, is_expert_parameter, mark_expert_parameters, resolve_group
from .stats import RoutingStats

__all__ = [
    "BaseExpert", "BaseLayer", "BatchedBaseExperts", "ExpertList", "GroupedExperts", "RoutingStats", "Sublayer",
    "all_to_all", "exchange", "exchange_counts", "expert_group_name", "is_expert_parameter",
    "mark_expert_parameters", "resolve_group",
]
