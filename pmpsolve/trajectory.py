"""Piecewise cubic Hermite trajectories between mesh nodes (docs/theory.md, engine step 2).

A trajectory keeps its values at the nodes and, per interval, the derivative
at both ends: Y'(t_n+) and Y'(t_{n+1}-). The two differ at a node because the
control jumps there, so the interpolant is C^0 but is cubic and O(h^4)
accurate inside every interval (linear interpolation would put a kink into
every right-hand side that reads it, which costs the adaptive co-state sweep
~10x more steps).
"""
from __future__ import annotations

import torch

from .mesh import interval_index

__all__ = ["HermiteTrajectory"]


class HermiteTrajectory:
    """Y(t) on [0, T] from node values and one-sided end derivatives.

    Args:
        mesh: node times [N + 1].
        values: Y at the nodes [N + 1, *S].
        slope_left: Y' at the left end of each interval, t_n+, [N, *S].
        slope_right: Y' at the right end of each interval, t_{n+1}-, [N, *S].
    """

    def __init__(self, mesh: torch.Tensor, values: torch.Tensor, slope_left: torch.Tensor,
                 slope_right: torch.Tensor):
        self.mesh, self.values, self.slope_left, self.slope_right = mesh, values, slope_left, slope_right
        h = (mesh[1:] - mesh[:-1]).reshape((-1,) + (1,) * (values.ndim - 1))
        y0, y1, d0, d1 = values[:-1], values[1:], h * slope_left, h * slope_right
        # Y(t_n + s h_n) = c0 + c1 s + c2 s^2 + c3 s^3, s in [0, 1]; stacked as [N, 4, *S].
        self.coefficients = torch.stack([y0, d0, 3 * (y1 - y0) - 2 * d0 - d1, 2 * (y0 - y1) + d0 + d1], dim=1)
        self._inverse_lengths = 1.0 / (mesh[1:] - mesh[:-1])

    def fields(self):
        """(values, slope_left, slope_right): what ``save`` needs to rebuild the trajectory."""
        return self.values, self.slope_left, self.slope_right

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        """Y at times ``t`` (any shape) -> [*t.shape, *S]; t must lie in [0, T]."""
        t = torch.as_tensor(t, dtype=self.mesh.dtype, device=self.mesh.device)
        return self.at(t, interval_index(self.mesh, t))

    def at(self, t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Y(t) when the interval index of t is known already (ODE right-hand sides share it)."""
        s = (t - self.mesh[index]) * self._inverse_lengths[index]
        s = s.reshape(s.shape + (1,) * (self.values.ndim - 1))
        c = self.coefficients[index]  # [*t.shape, 4, *S]
        k = index.ndim
        c0, c1, c2, c3 = (c.select(k, j) for j in range(4))
        return ((c3 * s + c2) * s + c1) * s + c0

    def on_intervals(self, fractions: torch.Tensor) -> torch.Tensor:
        """Y at t_n + c h_n for every interval n and fraction c in ``fractions`` [Q] -> [N, Q, *S]."""
        c = fractions.to(self.values.dtype)
        powers = torch.stack([torch.ones_like(c), c, c * c, c * c * c], dim=1)  # [Q, 4]
        return torch.einsum("qj,nj...->nq...", powers, self.coefficients)
