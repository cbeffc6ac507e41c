"""Catalyst mixing in a tubular reactor (COPS problem 14; Dolan, More and Munson 2004)."""
from __future__ import annotations

from typing import Tuple

import torch

import pmpsolve as pmp

__all__ = ["catalyst_mixing"]


def catalyst_mixing(controls: str = "box") -> Tuple[pmp.ControlProblem, float]:
    """x1' = u (10 x2 - x1), x2' = u (x1 - 10 x2) - (1 - u) x2, x0 = (1, 0), u in [0, 1], T = 1;
    minimise J = -1 + x1(1) + x2(1) (i.e. maximise the conversion 1 - x1 - x2).

    Reference J* = -0.0480556 (COPS). The optimal control is bang-singular-bang:
    u = 1, then a singular arc near u = 0.22, then u = 0.

    ``controls="binary"`` restricts u to {0, 1} (mixing switched on or off). No binary
    control reaches J* (the singular arc needs u = 0.22), but binary controls that switch
    ever faster approach it (chattering; Sager's relaxation theorem), so J* is the
    reference value of both: a lower bound that the binary optimum on N intervals
    approaches as N grows.
    """
    if controls not in ("box", "binary"):
        raise ValueError(f"catalyst_mixing: `controls` must be 'box' or 'binary', got {controls!r}")
    control_set = pmp.Box(0.0, 1.0, shape=(1,)) if controls == "box" else pmp.Finite([0.0, 1.0], shape=(1,))

    def dynamics(t, x, u):
        x1, x2, v = x[..., 0], x[..., 1], u[..., 0]
        return torch.stack([v * (10 * x2 - x1), v * (x1 - 10 * x2) - (1 - v) * x2], dim=-1)

    def terminal_cost(x):
        return -1.0 + x[..., 0] + x[..., 1]

    problem = pmp.ControlProblem(dynamics, torch.tensor([1.0, 0.0], dtype=torch.float64), 1.0,
                                 control_set, terminal_cost=terminal_cost,
                                 name="catalyst" if controls == "box" else "catalyst-binary")
    return problem, -0.0480556
