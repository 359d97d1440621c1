"""The paper's exact mix inside Megatron: :class:`BasePaperMoELayer`.

Megatron's transformer layer computes ``h + MoE(pre_mlp_layernorm(h))``. With
:class:`~base_plugin.megatron.router.BaseRouter` in a plain ``MoELayer`` that is
``h + α(LN h) · g_e(LN h)`` — the paper's ``α·f_e(h) + (1 − α)·h`` with the residual pre-LN expert
``f_e(h) = h + g_e(LN h)``, except that the score and the gate ``α`` are computed from ``LN(h)``.

The paper (and :class:`base_plugin.layer.BaseLayer`) compute them from the layer's input ``h`` itself.
:class:`BasePaperMoELayer` does exactly that: it is used with ``pre_mlp_layernorm = IdentityOp`` (so it
receives ``h``), routes and gates on ``h``, and applies the LayerNorm that used to sit before it
(``submodules.expert_norm``, same norm class, same ``TransformerConfig`` settings) to the tokens the
experts receive. The layer output is then exactly

    h + α · g_e(LN(h)) = α · f_e(h) + (1 − α) · h,   α = σ(h · c_e),   f_e(h) = h + g_e(LN(h)).

The LayerNorm is shared by the experts (the paper's experts have their own; an expert-specific affine
``γ_e, β_e`` is absorbed by the expert's first linear layer, ``W₁(γ_e ⊙ n + β_e) = (W₁ diag γ_e) n + W₁ β_e``,
so the function class is the same). :func:`base_plugin.megatron.with_base_router` with
``paper_form=True`` makes this swap on any GPT layer spec.
"""
from __future__ import annotations

from . import _require_megatron

_require_megatron()

from dataclasses import dataclass
from typing import Optional, Union

import torch

from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec

from .compat import MoELayer, MoESubmodules


@dataclass
class BasePaperMoESubmodules(MoESubmodules):
    """``MoESubmodules`` plus the LayerNorm applied to the tokens the experts receive."""

    expert_norm: Union[ModuleSpec, type] = IdentityOp


class BasePaperMoELayer(MoELayer):
    """``MoELayer`` giving the paper's exact BASE form; see the module docstring.

    Use it with ``pre_mlp_layernorm = IdentityOp`` in the transformer layer spec and a
    :class:`~base_plugin.megatron.router.BaseRouter`; ``forward(h)`` returns ``(α · g_e(LN h), None)``,
    which the layer's residual turns into ``α · f_e(h) + (1 − α) · h``. Shared experts are not part of
    the paper's layer and are rejected (``moe_shared_expert_intermediate_size`` must be None).
    """

    def __init__(self, config, submodules: Optional[BasePaperMoESubmodules] = None,
                 layer_number: Optional[int] = None, pg_collection=None, **megatron_kwargs):
        # megatron_kwargs: what the installed release's TransformerLayer gives its MoE layer besides
        # these (0.17+: is_mtp_layer; 0.19: name), passed to MoELayer unchanged.
        if config.moe_shared_expert_intermediate_size is not None:
            raise ValueError("BasePaperMoELayer: moe_shared_expert_intermediate_size="
                             f"{config.moe_shared_expert_intermediate_size!r} is not supported; allowed: None "
                             "(the paper's BASE layer has no shared expert; use a plain MoELayer with BaseRouter)")
        if config.moe_latent_size:
            raise ValueError(f"BasePaperMoELayer: moe_latent_size={config.moe_latent_size!r} is not supported; "
                             "allowed: None")
        super().__init__(config, submodules, layer_number=layer_number, pg_collection=pg_collection,
                         **megatron_kwargs)
        norm = getattr(submodules, "expert_norm", IdentityOp)
        # a ModuleSpec, a class or (0.17+) a partial: each builds by being called
        self.expert_norm = norm(config=config, hidden_size=config.hidden_size, eps=config.layernorm_epsilon)

    def preprocess(self, hidden_states: torch.Tensor, probs: torch.Tensor, routing_map: torch.Tensor):
        # The router has seen h; the experts get LN(h).
        return super().preprocess(self.expert_norm(hidden_states), probs, routing_map)
