"""LAMB arithmetic shared by :class:`~base_plugin.optim.SLAMB` and :class:`~base_plugin.optim.LAMB`.

Pure tensor functions, no communication. Notation (You et al., 2020): for one tensor ``x`` with first
and second moments ``m``, ``v`` after ``t`` steps,

    u = (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps) + weight_decay * x
    phi = clip(||x|| / ||u||, c_min, c_max)      (phi = 1 when ||x|| or ||u|| is 0, before clipping)
    x <- x - lr * phi * u
"""
from __future__ import annotations

import torch


def update_moments_(m: torch.Tensor, v: torch.Tensor, grad: torch.Tensor, beta1: float, beta2: float) -> None:
    """In place: ``m <- beta1 m + (1 - beta1) g``, ``v <- beta2 v + (1 - beta2) g^2``."""
    m.mul_(beta1).add_(grad, alpha=1.0 - beta1)
    v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)


def adam_direction(x: torch.Tensor, m: torch.Tensor, v: torch.Tensor, step: int, beta1: float, beta2: float,
                   eps: float, weight_decay: float) -> torch.Tensor:
    """Bias-corrected Adam direction plus (LAMB-style, inside the trust ratio) weight decay: ``u``."""
    bc1 = 1.0 - beta1 ** step
    bc2 = 1.0 - beta2 ** step
    u = (m / bc1) / (v / bc2).sqrt().add_(eps)
    if weight_decay != 0:
        u.add_(x, alpha=weight_decay)
    return u


def trust_ratio(x_norm: torch.Tensor, u_norm: torch.Tensor, c_min: float, c_max: float) -> torch.Tensor:
    """``clip(||x|| / ||u||, c_min, c_max)``, with ratio 1 where either norm is 0 (0-dim tensor, no host sync)."""
    ok = (x_norm > 0) & (u_norm > 0)
    ratio = torch.where(ok, x_norm / torch.where(ok, u_norm, torch.ones_like(u_norm)), torch.ones_like(x_norm))
    return ratio.clamp(c_min, c_max)
