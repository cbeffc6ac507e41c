"""A double integrator with bounded acceleration: bang-bang and bang-off-bang answers in closed form."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

import pmpsolve as pmp

__all__ = ["double_integrator", "double_integrator_optimum"]

_SETS = ("box", "binary", "ternary")


def double_integrator(horizon: float = 3.0, controls: str = "box", penalty: Optional[str] = None,
                      weight: float = 0.5) -> Tuple[pmp.ControlProblem, float]:
    """Drive a cart as far as possible and arrive slowly:

        x1' = x2, x2' = u, x0 = (0, 0),  J = -x1(T) + x2(T)^2 / 2 [+ int c |u|_1 or c |u|_0 dt].

    Args:
        horizon: T.
        controls: "box" (u in [-1, 1]), "binary" (u in {-1, 1}) or "ternary" (u in {-1, 0, 1}).
        penalty: None, "L1" (fuel, c |u|) or "L0" (c per unit time the engine is on).
        weight: c.

    Returns ``(problem, J*)``; J* from ``double_integrator_optimum``. J is convex for
    the box with no or an L1 penalty, so the control of the maximum principle is the
    global minimiser; the L0 optimum equals the L1 one because c|u|_0 >= c|u| on
    [-1, 1] with equality at the L1 minimiser, which takes values in {-1, 0, 1}.
    With the defaults (T = 3, c = 0.5) the switches (t = 2; or t = 1.5 and 2.5 with a
    penalty) lie on mesh nodes when N is a multiple of 6, and then the optimum of the
    piecewise-constant problem is J* exactly.
    """
    if controls not in _SETS:
        raise ValueError(f"double_integrator: `controls` must be one of {_SETS}, got {controls!r}")
    if penalty not in (None, "L1", "L0"):
        raise ValueError(f"double_integrator: `penalty` must be None, 'L1' or 'L0', got {penalty!r}")
    if controls == "binary" and penalty is not None:
        raise ValueError("double_integrator: with u in {-1, 1} the engine is always on; a penalty only adds c T. "
                         "Use controls='ternary' or 'box' with a penalty")
    control_set = {"box": pmp.Box(-1.0, 1.0, shape=(1,)), "binary": pmp.Finite([-1.0, 1.0], shape=(1,)),
                   "ternary": pmp.Finite([-1.0, 0.0, 1.0], shape=(1,))}[controls]
    cost = None if penalty is None else {"L1": pmp.L1, "L0": pmp.L0}[penalty](weight)

    def dynamics(t, x, u):
        return torch.stack([x[..., 1], u[..., 0].expand(x.shape[:-1])], dim=-1)

    def terminal_cost(x):
        return -x[..., 0] + 0.5 * x[..., 1] ** 2

    name = "double-integrator" + ("" if controls == "box" else f"-{controls}") + ("" if penalty is None else f"-{penalty}")
    problem = pmp.ControlProblem(dynamics, torch.zeros(2, dtype=torch.float64), horizon, control_set,
                                 terminal_cost=terminal_cost, control_penalty=cost, name=name)
    return problem, double_integrator_optimum(horizon, 0.0 if penalty is None else weight)


def double_integrator_optimum(horizon: float, weight: float = 0.0) -> float:
    """J* of ``double_integrator`` by the maximum principle.

    p1 = 1 and p2(t) = (T - t) - x2(T); u = 1 while p2 > c, 0 while |p2| <= c, -1 after.
    Then x2(T) = T/3 and the switches are t1 = 2T/3 - c, t2 = 2T/3 + c (valid while
    c <= T/3), so J* = -x1(T) + x2(T)^2/2 + c (t1 + T - t2).
    """
    T, c = float(horizon), float(weight)
    if not (T > 0 and 0 <= c <= T / 3):
        raise ValueError(f"double_integrator_optimum needs T > 0 and 0 <= c <= T/3, got T={T}, c={c}")
    t1, t2 = 2 * T / 3 - c, 2 * T / 3 + c
    x1 = (T * t1 - t1 ** 2 / 2) - (T - t2) ** 2 / 2
    x2 = T / 3
    return -x1 + x2 ** 2 / 2 + c * (t1 + T - t2)
