"""Greedy (argmax) routing for inference: every token goes to its best expert, load is not balanced."""
from __future__ import annotations

import torch

from .inputs import check_scores, finite_scores


def greedy_assignment(scores: torch.Tensor) -> torch.Tensor:
    """``LongTensor[N]``: the best expert of each token of ``scores[N, E]``; ties go to the lowest
    expert index. Non-finite scores follow the rule in :mod:`base_plugin.assignment.inputs` (so a NaN
    is never chosen over a number, unlike ``torch.argmax``)."""
    check_scores(scores)
    return finite_scores(scores).argmax(dim=1)
