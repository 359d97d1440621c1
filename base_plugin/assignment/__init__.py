"""Balanced assignment of tokens to experts: exact (training) and greedy (inference).

    balanced_assignment(scores[N, E], capacity=None) -> LongTensor[N]
    balanced_topk_assignment(scores[N, E], k, capacity=None) -> LongTensor[N, k]
    solve_balanced_assignment(..., k=1) -> AssignmentResult (prices, objective, dual bound / certificate)
    greedy_assignment(scores[N, E], k=1) -> LongTensor[N] / LongTensor[N, k]
"""
from .exact import (BACKENDS, AssignmentError, AssignmentResult, balanced_assignment, balanced_topk_assignment,
                    kernel_available, solve_balanced_assignment)
from .greedy import greedy_assignment
from .inputs import default_capacity

__all__ = [
    "BACKENDS",
    "AssignmentError",
    "AssignmentResult",
    "balanced_assignment",
    "balanced_topk_assignment",
    "default_capacity",
    "greedy_assignment",
    "kernel_available",
    "solve_balanced_assignment",
]
