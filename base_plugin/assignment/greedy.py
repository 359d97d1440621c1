"""Greedy routing for inference: every token goes to its best expert(s), load is not balanced."""
from __future__ import annotations

import torch

from .inputs import check_k, check_scores, finite_scores


def greedy_assignment(scores: torch.Tensor, k: int = 1) -> torch.Tensor:
    """The best expert(s) of each token of ``scores[N, E]``: LongTensor[N] (argmax, ties to the lowest
    expert index) for k == 1, LongTensor[N, k] for k > 1 (the k best, highest first, ties by lower
    expert index). Non-finite scores follow the rule in :mod:`base_plugin.assignment.inputs` (so a NaN
    is never chosen over a number, unlike ``torch.argmax``). ValueError for a k outside 1 .. E."""
    check_scores(scores)
    k = check_k(k, scores.shape[1])
    s = finite_scores(scores)
    if k == 1:
        return s.argmax(dim=1)
    # ties by lower index: a stable descending sort keeps equal scores in index order
    return s.argsort(dim=1, descending=True, stable=True)[:, :k]
