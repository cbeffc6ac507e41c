"""The box-constrained quadratic program of control-limited DDP (Tassa, Mansard and Todorov, ICRA 2014).

    minimise  1/2 d' H d + g' d   subject to  lower <= d <= upper

by projected Newton: the variables at a bound whose gradient pushes outwards are clamped, a
Newton step is taken on the free ones (Cholesky of H restricted to them) and an Armijo line
search along the projected path; it ends when no variable changes set and the free gradient
vanishes. Its by-product is what DDP's feedback needs: the free set and the Cholesky factor of
H on it (the clamped rows of the gain K are zero, Tassa et al. 2014, sec. III.C).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["BoxQP", "box_qp", "restricted"]

_ARMIJO = 0.1  # the decrease a line-search step must reach, as a fraction of the linear prediction
_STEP_SHRINK = 0.6
_MIN_STEP = 1e-22
_MIN_GRADIENT = 1e-13  # relative to |g|: the free gradient at which the Newton iteration stops


class BoxQP(NamedTuple):
    solution: torch.Tensor  # d [m]
    free: torch.Tensor  # [m] bool: the components not at a bound
    positive: bool  # H restricted to the free set was positive definite (else d is not a minimiser)
    iterations: int


def restricted(H: torch.Tensor, free: torch.Tensor) -> torch.Tensor:
    """H [m, m] on the free set, the identity on the clamped rows and columns (so a solve with it leaves the
    clamped components of a right-hand side that is zero there at zero)."""
    both = free[:, None] & free[None, :]
    return torch.where(both, H, torch.eye(H.shape[-1], dtype=H.dtype, device=H.device))


def box_qp(H: torch.Tensor, g: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, start: torch.Tensor,
           max_iter: int = 100) -> BoxQP:
    """Minimise 1/2 d' H d + g' d over lower <= d <= upper ([m, m], [m], [m], [m]; +-inf allowed) from
    ``start`` (projected onto the box), by projected Newton (see the module).

    Example: one variable, the unconstrained minimum -g/H = 2 beyond the upper bound 1.
        >>> import torch
        >>> from pmpsolve.update.boxqp import box_qp
        >>> r = box_qp(torch.tensor([[1.0]]), torch.tensor([-2.0]), torch.tensor([-1.0]), torch.tensor([1.0]),
        ...            torch.zeros(1))
        >>> r.solution.tolist(), r.free.tolist()
        ([1.0], [False])
    """
    d = torch.minimum(torch.maximum(start, lower), upper)
    value = g @ d + 0.5 * d @ (H @ d)
    scale = float(g.abs().max()) if g.numel() else 0.0
    free = torch.ones_like(d, dtype=torch.bool)
    previous = None
    for iteration in range(1, max_iter + 1):
        gradient = g + H @ d
        clamped = ((d <= lower) & (gradient > 0)) | ((d >= upper) & (gradient < 0))
        free = ~clamped
        if bool(clamped.all()):
            return BoxQP(d, free, True, iteration)
        factor, info = torch.linalg.cholesky_ex(restricted(H, free))
        if int(info) != 0:
            return BoxQP(d, free, False, iteration)
        if float(gradient[free].abs().max()) <= _MIN_GRADIENT * max(scale, 1e-300) and (
                previous is not None and torch.equal(previous, free)):
            return BoxQP(d, free, True, iteration)
        previous = free
        # Newton on the free set with the clamped components held (Tassa et al. 2014, Alg. 1):
        # the free components go to the minimiser of the QP restricted to them.
        held = torch.where(free, torch.zeros_like(d), d)
        rhs = torch.where(free, g + H @ held, torch.zeros_like(d))
        target = -torch.cholesky_solve(rhs[:, None], factor)[:, 0]
        search = torch.where(free, target - d, torch.zeros_like(d))
        slope = float(search @ gradient)
        if slope >= 0:  # no descent left (the free gradient is at rounding level)
            return BoxQP(d, free, True, iteration)
        step = 1.0
        while True:
            trial = torch.minimum(torch.maximum(d + step * search, lower), upper)
            trial_value = g @ trial + 0.5 * trial @ (H @ trial)
            if float(trial_value - value) <= _ARMIJO * step * slope:
                break
            step *= _STEP_SHRINK
            if step < _MIN_STEP:
                return BoxQP(d, free, True, iteration)
        converged = torch.equal(trial, d)
        d, value = trial, trial_value
        if converged:
            break
    gradient = g + H @ d
    free = ~(((d <= lower) & (gradient > 0)) | ((d >= upper) & (gradient < 0)))
    return BoxQP(d, free, True, iteration)
