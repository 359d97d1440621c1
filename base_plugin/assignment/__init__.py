"""Balanced assignment of tokens to experts: exact (training) and greedy (inference).

    balanced_assignment(scores[N, E], capacity=None) -> LongTensor[N]
    solve_balanced_assignment(...) -> AssignmentResult (prices, objective, dual bound / certificate)
    greedy_assignment(scores[N, E]) -> LongTensor[N]
"""
from .exact import (BACKENDS, AssignmentError, AssignmentResult, balanced_assignment, kernel_available,
                    solve_balanced_assignment)
from .greedy import greedy_assignment
from .inputs import default_capacity

__all__ = [
    "BACKENDS",
    "AssignmentError",
    "AssignmentResult",
    "balanced_assignment",
    "default_capacity",
    "greedy_assignment",
    "kernel_available",
    "solve_balanced_assignment",
]
