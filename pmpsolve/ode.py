"""The ODE layer: torchdiffeq's solvers, with one fix for controls that jump at mesh nodes.

torchdiffeq (0.2.x) clips an adaptive step at a ``jump_t`` time only when the
step would cross it (``t0 < jump < t0 + dt``). A step that lands exactly on a
jump time, which happens often on uniform meshes, is not clipped: the jump
index then never advances, every later jump is ignored, and f keeps the
value from the old side of the node. The solver then steps across control
discontinuities and shrinks its steps to crawl up to each node (seen here:
10x the right-hand-side evaluations for a control 0.002 away from one that
integrated cleanly). ``integrate`` runs torchdiffeq's own solver classes with
that case handled: when a step starts on an unregistered jump time, f is
re-evaluated on the new side and the index advances.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Type

import torch
from torchdiffeq._impl.misc import Perturb, _check_inputs, _flat_to_shape
from torchdiffeq._impl.odeint import SOLVERS
from torchdiffeq._impl.rk_common import RKAdaptiveStepsizeODESolver

__all__ = ["integrate", "METHODS", "is_adaptive"]

METHODS = tuple(SOLVERS)


def _with_exact_jumps(solver: Type[RKAdaptiveStepsizeODESolver]) -> Type[RKAdaptiveStepsizeODESolver]:
    def _adaptive_step(self, rk_state):
        if len(self.jump_t):
            t0 = rk_state.t1
            if bool(t0 == self.jump_t[self.next_jump_index]):  # torchdiffeq syncs per step anyway
                f0 = self.func(t0, rk_state.y1, perturb=Perturb.NEXT)
                rk_state = rk_state._replace(f1=f0)
                if self.next_jump_index != len(self.jump_t) - 1:
                    self.next_jump_index += 1
        return solver._adaptive_step(self, rk_state)

    return type(solver.__name__, (solver,), {"_adaptive_step": _adaptive_step})


_SOLVERS: Dict[str, type] = {
    name: _with_exact_jumps(cls) if issubclass(cls, RKAdaptiveStepsizeODESolver) else cls
    for name, cls in SOLVERS.items()
}


def is_adaptive(method: str) -> bool:
    """Whether ``method`` is an adaptive Runge-Kutta method (it takes ``jump_t``)."""
    return issubclass(SOLVERS[method], RKAdaptiveStepsizeODESolver)


def integrate(func: Callable, y0: torch.Tensor, times: torch.Tensor, *, method: str, rtol: float, atol: float,
              options: Optional[dict] = None) -> torch.Tensor:
    """Like ``torchdiffeq.odeint`` (same arguments and result [len(times), *y0.shape])."""
    shapes, func, y0, t, rtol, atol, method, options, _, _ = _check_inputs(
        func, y0, times, rtol, atol, method, dict(options or {}), None, _SOLVERS)
    solution = _SOLVERS[method](func=func, y0=y0, rtol=rtol, atol=atol, **options).integrate(t)
    if shapes is not None:
        solution = _flat_to_shape(solution, (len(t),), shapes)
    return solution
