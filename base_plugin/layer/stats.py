"""Per-call routing statistics of a :class:`~base_plugin.layer.BaseLayer`, kept on the device."""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class RoutingStats:
    """What one forward call of the layer did on this rank. Every field is a detached tensor on the
    input's device; reading one with ``.item()`` / ``.tolist()`` is the only host synchronisation.

    tokens_per_expert: LongTensor[num_experts], tokens this rank assigned to each global expert
                       (after the shuffle); exactly the balanced capacities when routing is exact.
    tokens_received:   LongTensor[local_experts], tokens each local expert processed.
    objective:         0-d, sum of the chosen scores x·c_e of this rank's tokens (score dtype).
    gap:               0-d, solver certificate dual_bound - objective (>= 0, ~0 when exact is optimal);
                       0 for greedy routing (the unconstrained maximum), NaN for a user callable.
    mean_gate:         0-d, mean gate α over the tokens processed by this rank's experts (0 if none).
    tokens_moved:      0-d long, tokens this rank sent to experts on other ranks.
    """

    tokens_per_expert: torch.Tensor
    tokens_received: torch.Tensor
    objective: torch.Tensor
    gap: torch.Tensor
    mean_gate: torch.Tensor
    tokens_moved: torch.Tensor

    def as_dict(self) -> dict:
        """Plain Python values (forces a host synchronisation)."""
        return {f.name: getattr(self, f.name).tolist() for f in fields(self)}
