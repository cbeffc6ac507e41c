"""The classic constrained and free-time problems of the field (docs/guide.md, "Constraints").

Each function returns ``(problem, published)``: a ``pmpsolve.ControlProblem`` with terminal
or path constraints and/or a free final time, and the published optimal value (J*, or T*
for minimum time, or h(tf)* for Goddard's rocket). ``CASADI_N200`` holds the optimum of the
same problems on the mesh N = 200 by direct multiple shooting (CasADi + IPOPT, RK4 with 4
steps per interval), what the discretisation allows.

    >>> from problems.constrained import min_time_double_integrator
    >>> problem, T_star = min_time_double_integrator(1.0)
    >>> T_star
    2.0
"""
from __future__ import annotations

import math
from typing import Tuple

import torch

import pmpsolve as pmp

__all__ = ["bryson_denham", "zermelo", "brachistochrone", "goddard", "min_time_double_integrator",
           "CONSTRAINED_PROBLEMS", "CASADI_N200"]

#: The optimum on the mesh N = 200 by CasADi + IPOPT (direct multiple shooting, RK4 x 4 per interval).
CASADI_N200 = {"bryson-denham": 4.00022195, "zermelo": 5.26495917, "brachistochrone": 1.80160890,
               "goddard": 1.01283691}


def _ones(x: torch.Tensor) -> torch.Tensor:
    return torch.ones(x.shape[:-1], dtype=x.dtype, device=x.device)


def bryson_denham(l: float = 1 / 9) -> Tuple[pmp.ControlProblem, float]:
    """Bryson & Ho (1975, pp. 120-123): x1' = x2, x2' = u, x(0) = (0, 1), x(1) = (0, -1),
    the state bound x1 <= l, J = 1/2 int_0^1 u^2 dt. For l <= 1/6 the bound is active on
    [3l, 1 - 3l] and J* = 4 / (9 l): 4 at l = 1/9.
    """
    if not 0 < l <= 1 / 6:
        raise ValueError(f"bryson_denham: `l` must lie in (0, 1/6] (where J* = 4/(9l) holds), got {l!r}")

    def dynamics(t, x, u):
        return torch.stack([x[..., 1], u[..., 0].expand(x.shape[:-1])], dim=-1)

    problem = pmp.ControlProblem(
        dynamics, torch.tensor([0.0, 1.0], dtype=torch.float64), 1.0, pmp.Reals(1),
        running_cost=lambda t, x, u: 0.5 * (u ** 2).sum(-1),
        terminal_constraints=[pmp.Equal(lambda x: torch.stack([x[..., 0], x[..., 1] + 1], dim=-1),
                                        name="x(1) = (0, -1)")],
        path_constraints=[pmp.AtMost(lambda t, x, u: x[..., :1] - l, name=f"x1 <= {l:.6g}")],
        name="bryson-denham")
    return problem, 4 / (9 * l)


def zermelo() -> Tuple[pmp.ControlProblem, float]:
    """Zermelo's boat in a shear current: x' = cos(theta) - y, y' = sin(theta), from
    (3.5, -1.8) to (0, 0) in minimum time; T* = 5.26493205 (Betts, Practical Methods for
    Optimal Control, Ex. 10.148). The heading theta is free.
    """
    def dynamics(t, x, u):
        theta = u[..., 0].expand(x.shape[:-1])
        return torch.stack([torch.cos(theta) - x[..., 1], torch.sin(theta)], dim=-1)

    problem = pmp.ControlProblem(
        dynamics, torch.tensor([3.5, -1.8], dtype=torch.float64), pmp.FreeTime(5.0, low=0.5, high=20.0),
        pmp.Reals(1), running_cost=lambda t, x, u: _ones(x),
        terminal_constraints=[pmp.Equal(lambda x: x, name="x(T) = (0, 0)")], name="zermelo")
    return problem, 5.26493205


def brachistochrone(g: float = 9.80665) -> Tuple[pmp.ControlProblem, float]:
    """The brachistochrone: x' = v sin(theta), y' = -v cos(theta), v' = g cos(theta), from
    (x, y, v) = (0, 10, 0) to x = 10, y = 5 (v free), theta in [0, pi], minimum time;
    T* = 1.8016 (Dymos's test value).
    """
    def dynamics(t, x, u):
        theta = u[..., 0].expand(x.shape[:-1])
        v = x[..., 2]
        return torch.stack([v * torch.sin(theta), -v * torch.cos(theta), g * torch.cos(theta)], dim=-1)

    problem = pmp.ControlProblem(
        dynamics, torch.tensor([0.0, 10.0, 0.0], dtype=torch.float64), pmp.FreeTime(2.0, low=0.1, high=10.0),
        pmp.Box(0.0, math.pi, shape=(1,)), running_cost=lambda t, x, u: _ones(x),
        terminal_constraints=[pmp.Equal(lambda x: torch.stack([x[..., 0] - 10, x[..., 1] - 5], dim=-1),
                                        name="(x, y)(T) = (10, 5)")],
        name="brachistochrone")
    return problem, 1.8016


def goddard() -> Tuple[pmp.ControlProblem, float]:
    """Goddard's rocket as in COPS 3.0: h' = v, v' = (T - D)/m - 1/h^2, m' = -T/c with
    D = 310 v^2 exp(-500 (h - 1)), c = 0.5, thrust 0 <= T <= 3.5, from (h, v, m) = (1, 0, 1),
    m(tf) = 0.6, h >= 1, v >= 0, tf free; maximise h(tf) (J = -h(tf)). COPS reports
    h(tf)* = 1.01283; the published value returned is that height.

    The drag is written 310 v |v| exp(...), equal to COPS's on the feasible set v >= 0, so that it
    opposes the motion when an iterate falls (v < 0): with COPS's v^2 the default start (no thrust)
    makes the fall accelerate without bound and the first sweep blow up in finite time.
    """
    c = 0.5

    def dynamics(t, x, u):
        h, v, m = x[..., 0], x[..., 1], x[..., 2]
        thrust = u[..., 0].expand(x.shape[:-1])
        drag = 310.0 * v * v.abs() * torch.exp(-500.0 * (h - 1.0))
        return torch.stack([v, (thrust - drag) / m - 1.0 / h ** 2, -thrust / c], dim=-1)

    problem = pmp.ControlProblem(
        dynamics, torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64), pmp.FreeTime(0.2, low=0.01, high=1.0),
        pmp.Box(0.0, 3.5, shape=(1,)), terminal_cost=lambda x: -x[..., 0],
        terminal_constraints=[pmp.Equal(lambda x: x[..., 2:3] - 0.6, name="m(tf) = 0.6")],
        path_constraints=[pmp.AtMost(lambda t, x, u: torch.stack([1.0 - x[..., 0], -x[..., 1]], dim=-1),
                                     name="h >= 1, v >= 0")],
        name="goddard")
    return problem, 1.01283


def min_time_double_integrator(x0: float = 1.0, controls: str = "box") -> Tuple[pmp.ControlProblem, float]:
    """x'' = u, |u| <= 1, from (x0, 0) to the origin in minimum time: T* = 2 sqrt(|x0|), bang-bang
    with one switch at T*/2. ``controls``: "box" (u in [-1, 1]) or "binary" (u in {-1, 1}).
    """
    if controls not in ("box", "binary"):
        raise ValueError(f"min_time_double_integrator: `controls` must be 'box' or 'binary', got {controls!r}")
    if not (isinstance(x0, (int, float)) and math.isfinite(x0) and x0 != 0):
        raise ValueError(f"min_time_double_integrator: `x0` must be a finite non-zero number, got {x0!r}")
    T_star = 2 * math.sqrt(abs(x0))
    control_set = pmp.Box(-1.0, 1.0, shape=(1,)) if controls == "box" else pmp.Finite([-1.0, 1.0], shape=(1,))

    def dynamics(t, x, u):
        return torch.stack([x[..., 1], u[..., 0].expand(x.shape[:-1])], dim=-1)

    problem = pmp.ControlProblem(
        dynamics, torch.tensor([float(x0), 0.0], dtype=torch.float64),
        pmp.FreeTime(T_star / 2, low=0.05 * T_star, high=10 * T_star), control_set,
        running_cost=lambda t, x, u: _ones(x), terminal_constraints=[pmp.Equal(lambda x: x, name="x(T) = 0")],
        name="min-time-double-integrator" + ("" if controls == "box" else "-binary"))
    return problem, T_star


#: The constrained and free-time problems by name (``scripts/bench_control.py``'s constrained group).
CONSTRAINED_PROBLEMS = {
    "bryson-denham": bryson_denham,
    "zermelo": zermelo,
    "brachistochrone": brachistochrone,
    "goddard": goddard,
    "min-time-double-integrator": min_time_double_integrator,
}
