"""First-order optimality of piecewise-constant controls: what ``converged`` promises.

A stopping test on the change of J alone stops on two tiny steps, wherever they
happen. The solver instead measures how far u is from satisfying the first-order
conditions of the discretised problem (controls constant on the mesh intervals),
from the interval data of one forward and one backward sweep (docs/theory.md):

* Boxes, balls and R^m (with or without an L1 cost): the projected gradient in the
  L2(0, T) scaling,

      max_n | u_n - prox_U(u_n + gbar_n) |_inf,    gbar_n = (1/h_n) int_{I_n} grad_u H dt,

  where gbar_n is minus the L2 gradient of J on interval n (the interval mean of
  grad_u H, paper Prop. 2) and prox_U (``ControlSet.prox``) is the projection onto U, composed with
  the prox of the L1 / L0 cost (unit step). It is zero exactly at the KKT points of
  the discretised problem, like scipy's projected-gradient test (``pgtol``).
* Finite sets, user sets and L0 costs (where a stationary point of the prox step can still
  gain by switching a control on or off): the largest Hamiltonian gap per unit time,

      max_n [ max_{v in U} Hbar_n(v) - Hbar_n(u_n) ] / h_n,   Hbar_n = int_{I_n} H dt,

  exact by enumeration for finite sets (the user's maximiser for a UserSet, the closed form
  or proximal maximiser for an L0 cost): zero
  when no control value raises any interval's Hamiltonian (the maximum condition of
  the PMP on the mesh).

Both are zero at a solution and are compared with ``tol * max(1, min(|J|, |J(u^0)|))``
(``optimality_scale``): relative to J, but never to more than the J the solve started from.
"""
from __future__ import annotations

import torch

from ..controls import ControlSet, Finite, UserSet
from .hamiltonian import IntervalData, IntervalHamiltonian
from .maximisers import Enumeration
from ..sweep.pointwise import PointwiseProblem

__all__ = ["optimality", "is_optimal", "optimality_scale", "DEFAULT_OPTIMALITY_TOL"]

#: ``tol`` of ``solve`` by dtype: the measure must exceed the gradient error the sweeps leave
#: at their default tolerances (rtol 1e-9 in float64, 1e-6 in float32) by a safe margin.
DEFAULT_OPTIMALITY_TOL = {torch.float64: 1e-5, torch.float32: 1e-3}


def optimality(pw: PointwiseProblem, data: IntervalData, controls: ControlSet, maximiser=None) -> float:
    """The first-order optimality measure of the controls ``data.controls`` [N, m] (see the module).

    ``maximiser``: the solve's HamiltonianMaximiser, needed only for a UserSet (the gap
    over a set only the user can search).
    """
    u = data.controls
    objective = IntervalHamiltonian(pw, data, 0.0)
    penalty = pw.problem.control_penalty
    l0 = penalty is not None and penalty.name == "L0"
    if isinstance(controls, (Finite, UserSet)) or l0:
        if isinstance(controls, Finite):
            best = Enumeration().maximise(objective, controls)
        elif maximiser is None:
            raise ValueError("optimality: a UserSet or an L0 cost needs the solve's maximiser")
        else:
            best = maximiser.maximise(objective)
        current = objective(u).detach()
        gap = (best.value - current).clamp_min(0.0) / data.lengths
        return float(gap.max())
    gbar = objective.gradient(u) / data.lengths[:, None]  # [N, m]: minus the L2 gradient of the smooth part of J
    step = controls.prox(u + gbar, torch.ones_like(u), penalty) - u
    return float(step.abs().max())


def optimality_scale(cost: float, initial_cost: float) -> float:
    """What ``tol`` is relative to: max(1, min(|J|, |J(u^0)|)).

    Relative to |J| so that a problem with J ~ 1e4 is not held to an absolute 1e-5; capped at
    |J(u^0)| because a J that ran away from its start must not loosen the test it is judged
    by: on an unbounded problem J reaches -1e12 in a few iterations, and tol * |J| would then
    pass a gradient of 1e6. Any J with |J| <= max(1, |J(u^0)|) (e.g. a descent from
    J(u^0) > 0 that stays above -J(u^0)) is judged exactly as by tol * max(1, |J|); any other
    J by the scale of J(u^0), which is stricter, never looser.
    A genuine optimum far below -|J(u^0)| may then end unconverged: rescale its cost (or
    start nearer to it) rather than loosen the test.
    """
    return max(1.0, min(abs(cost), abs(initial_cost)))


def is_optimal(measure: float, cost: float, tol: float, initial_cost: float) -> bool:
    """Whether ``measure`` meets the tolerance: measure <= tol * max(1, min(|J|, |J(u^0)|))."""
    return measure <= tol * optimality_scale(cost, initial_cost)

