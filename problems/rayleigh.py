"""The Rayleigh problem (an electric circuit with a tunnel diode; Maurer and Augustin)."""
from __future__ import annotations

from typing import Tuple

import torch

import pmpsolve as pmp

__all__ = ["rayleigh"]


def rayleigh() -> Tuple[pmp.ControlProblem, float]:
    """x1' = x2, x2' = -x1 + (1.4 - 0.14 x2^2) x2 + 4 u, J = int_0^2.5 (x1^2 + u^2) dt,
    x0 = (-5, -5), u free. Reference J* = 29.3761 (docs/theory.md)."""

    def dynamics(t, x, u):
        x1, x2 = x[..., 0], x[..., 1]
        return torch.stack([x2, -x1 + (1.4 - 0.14 * x2 ** 2) * x2 + 4 * u[..., 0]], dim=-1)

    def running_cost(t, x, u):
        return x[..., 0] ** 2 + (u ** 2).sum(-1)

    problem = pmp.ControlProblem(dynamics, torch.tensor([-5.0, -5.0], dtype=torch.float64), 2.5, pmp.Reals(1),
                                 running_cost=running_cost, name="rayleigh")
    return problem, 29.3761
