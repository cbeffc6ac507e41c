"""Van der Pol oscillator with a bounded control."""
from __future__ import annotations

from typing import Tuple

import torch

import pmpsolve as pmp

__all__ = ["van_der_pol"]


def van_der_pol() -> Tuple[pmp.ControlProblem, float]:
    """x1' = (1 - x2^2) x1 - x2 + u, x2' = x1, J = int_0^5 (x1^2 + x2^2 + u^2) dt, x0 = (0, 1),
    u in [-0.3, 1]. Reference J* = 2.867260 (docs/theory.md)."""

    def dynamics(t, x, u):
        x1, x2 = x[..., 0], x[..., 1]
        return torch.stack([(1 - x2 ** 2) * x1 - x2 + u[..., 0], x1], dim=-1)

    def running_cost(t, x, u):
        return (x ** 2).sum(-1) + (u ** 2).sum(-1)

    problem = pmp.ControlProblem(dynamics, torch.tensor([0.0, 1.0], dtype=torch.float64), 5.0,
                                 pmp.Box(-0.3, 1.0, shape=(1,)), running_cost=running_cost, name="vanderpol")
    return problem, 2.867260
