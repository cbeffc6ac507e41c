"""Finite control sets solved by relaxation, rounding and polishing (the default for ``pmp.Finite``).

Iterating on a finite set from a constant control stops at the first control that no
single-interval switch improves: on the binary catalyst-mixing problem E-MSA ends
2.3e-2 and SQH 2.5e-3 above the relaxed optimum that way. The standard route of
mixed-integer optimal control (Sager, Bock and Diehl 2012) does far better:

1. solve the relaxation over the convex hull of the set (a Box from the smallest to
   the largest value), whose optimum bounds the finite problem from below when it is
   global;
2. round the relaxed controls by sum-up rounding, which keeps the integral of the
   rounded control within max h_n of the relaxed one, so J moves by O(max h_n);
3. polish on the set with the same method, starting from the rounded controls.

The polished solve's result is returned (it never ends above the rounded controls'
J: its iterations only keep decreases), with ``relaxed_cost`` set. ``solve`` takes this
route on a Finite set unless given initial controls (``init=pmp.RelaxAndRound()`` is the
default there); ``relax_round_polish`` drives two Solvers with the same settings, one per
problem.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from ..controls import Box, Finite
from ..problem import ControlProblem
from .rounding import sum_up_rounding

__all__ = ["RelaxAndRound", "relax_round_polish", "relaxed_problem"]


@dataclass(frozen=True)
class RelaxAndRound:
    """``init=`` of ``solve`` on a ``pmp.Finite`` set (its default there): start the iteration on
    the set from the relaxed optimum, rounded (steps 1 and 2 above); the solve is step 3.

    Example: x' = u on {0, 1}, J = -x(1) + 0.3 int u dt, whose optimum is u = 1 throughout (J* = -0.7).
        >>> import torch, pmpsolve as pmp
        >>> problem = pmp.ControlProblem(lambda t, x, u: u.clone(), torch.tensor([0.0]), 1.0, pmp.Finite([0.0, 1.0]),
        ...                              terminal_cost=lambda x: -x[..., 0],
        ...                              running_cost=lambda t, x, u: 0.3 * u.sum(-1))
        >>> sol = pmp.solve(problem, mesh=10, init=pmp.RelaxAndRound())   # the default on a Finite set
        >>> sol.converged, round(sol.cost, 6), sol.controls.unique().tolist()
        (True, -0.7, [1.0])
    """


def relaxed_problem(problem: ControlProblem) -> ControlProblem:
    """The same problem with the finite set replaced by its convex hull, a Box."""
    values = problem.controls.values
    hull = Box(float(values[0]), float(values[-1]), shape=problem.controls.shape)
    return ControlProblem(problem.dynamics, problem.x0, problem.horizon, hull, problem.terminal_cost,
                          problem.running_cost, control_penalty=problem.control_penalty,
                          name=f"{problem.name} (relaxed)")


def relax_round_polish(solver, init: RelaxAndRound, *, progress: bool = False, callback=None):
    """``solver.run`` for a Finite set by the three steps above (``solver``: a Solver of the finite problem)."""
    problem = solver.problem
    if not isinstance(problem.controls, Finite):
        raise TypeError(f"solve: `init=pmp.RelaxAndRound()` needs a pmp.Finite control set, got {problem.controls!r}; "
                        "pass initial controls or None")
    start = time.perf_counter()
    relaxed = solver.with_problem(relaxed_problem(problem)).run(None, progress=progress, callback=callback)
    rounded = sum_up_rounding(relaxed.controls, relaxed.mesh, problem.controls)
    polished = solver.run(rounded, progress=progress, callback=callback)
    polished.relaxed_cost = relaxed.cost
    polished.message = (f"relaxed J = {relaxed.cost:.10g} ({relaxed.iterations} iterations, "
                        f"{relaxed.status}), sum-up rounded, polished: {polished.message}")
    polished.settings["finite"] = "relax-round-polish"
    polished.settings["relaxed_iterations"] = relaxed.iterations
    polished.settings["seconds"] = time.perf_counter() - start
    return polished
