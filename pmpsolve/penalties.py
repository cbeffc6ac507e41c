"""Non-smooth control costs: c |u|_1 and c |u|_0 in the running cost, handled exactly.

Declared on the problem, ``ControlProblem(..., control_penalty=pmp.L1(c))``, so
that the maximisers know them: J gains int c |u_t|_1 dt (or c times the number
of non-zero components), and the Hamiltonian loses the same pointwise, exactly
(soft and hard thresholding in the closed forms, the value 0 among the
candidates of an enumeration, a proximal step in the iterative maximiser).
"""
from __future__ import annotations

import math

import torch

__all__ = ["ControlPenalty", "L1", "L0", "prox_in_box"]


class ControlPenalty:
    """Base class: ``value(u [..., m]) -> [...]``, the penalty rate (per unit time).

    Example:
        >>> import torch, pmpsolve as pmp
        >>> pmp.L1(0.5).value(torch.tensor([[1.0, -2.0], [0.0, 0.0]]))   # u [2, 2] -> [2]
        tensor([1.5000, 0.0000])
    """

    name = ""

    def __init__(self, weight: float, *, relative: bool = False):
        try:
            weight = float(weight)
        except (TypeError, ValueError):
            raise TypeError(f"{type(self).__name__}: the weight must be a number >= 0, got {weight!r}") from None
        if not (math.isfinite(weight) and weight >= 0):
            raise ValueError(f"{type(self).__name__}: the weight must be a finite number >= 0, got {weight!r}")
        if not isinstance(relative, bool):
            raise TypeError(f"{type(self).__name__}: `relative` must be True or False, got {relative!r}")
        self.weight = weight
        #: True: ``weight`` is a fraction of the layer's own Hamiltonian scale, resolved at every step by the
        #: network optimizer (``pmp.nn``, docs/discrete.md); False: the absolute weight c
        self.relative = relative

    def value(self, u: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def prox(self, v: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """argmin_u  weight * penalty(u) * step + |u - v|^2 / 2, componentwise (step broadcasts)."""
        raise NotImplementedError

    def __repr__(self):
        return f"{type(self).__name__}({self.weight:g}{', relative=True' if self.relative else ''})"

    def to_dict(self):
        out = {"type": type(self).__name__, "weight": self.weight}
        if self.relative:
            out["relative"] = True
        return out


class L1(ControlPenalty):
    """c |u|_1: the sum of absolute values (soft thresholding; makes controls sparse in time).

    Example: a fuel cost, ``control_penalty=`` of a ControlProblem (docs/controls.md).
        >>> import torch, pmpsolve as pmp
        >>> problem = pmp.ControlProblem(lambda t, x, u: u.clone(), torch.tensor([1.0]), 1.0, pmp.Box(-2.0, 2.0),
        ...                              terminal_cost=lambda x: 2.5 * x[..., 0] ** 2, control_penalty=pmp.L1(0.5))
        >>> sol = pmp.solve(problem, mesh=10)
        >>> round(float(sol.controls[0, 0]), 4), round(sol.cost, 4)   # x(1) = 0.1: 5 x(1) = c
        (-0.9, 0.475)
    """

    name = "L1"

    def value(self, u):
        return self.weight * u.abs().sum(-1)

    def prox(self, v, step):
        return torch.sign(v) * (v.abs() - self.weight * step).clamp_min(0.0)


class L0(ControlPenalty):
    """c |u|_0: c times the number of non-zero components (hard thresholding).

    On the weights of a network (``pmp.nn``, ``penalties={name: pmp.L0(f, relative=True)}``) the
    weight may be relative: c is then f times the layer's own scale at each step (for a finite
    set: the mean |dH/dW| times one step of the weight; for float weights under ``pmp.nn.SQH``:
    the proximity cost of moving a weight of the tensor's root mean square to zero, so that the
    hard threshold is sqrt(f) RMS(W); docs/discrete.md), so the same f prunes alike on any scale
    of inputs or loss. A control problem takes absolute weights only.

    Example:
        >>> import torch, pmpsolve as pmp
        >>> pmp.L0(0.5).value(torch.tensor([[1.0, -2.0], [0.0, 3.0]]))
        tensor([1.0000, 0.5000])
    """

    name = "L0"

    def value(self, u):
        return self.weight * (u != 0).to(u.dtype).sum(-1)

    def prox(self, v, step):
        return torch.where(v * v > 2 * self.weight * step, v, torch.zeros_like(v))


def prox_in_box(penalty, v: torch.Tensor, step: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """argmin over low <= u <= high of  step * penalty(u) + |u - v|^2 / 2, componentwise.

    Without a penalty this is the projection onto the box. L1: soft thresholding then the
    box (exact: the objective is convex and separable). L0: the best of the clipped point
    and 0 (when 0 lies in the box), compared on the objective itself, since hard
    thresholding followed by clipping is not the prox of L0 plus a box.
    """
    clipped = torch.maximum(torch.minimum(v, high), low)
    if penalty is None:
        return clipped
    if penalty.name != "L0":
        return torch.maximum(torch.minimum(penalty.prox(v, step), high), low)
    zero_ok = (low <= 0) & (high >= 0)
    keep = (clipped - v) ** 2 + 2 * penalty.weight * step * (clipped != 0) < v * v
    return torch.where(keep | ~zero_ok, clipped, torch.zeros_like(v))
