"""Trajectories between mesh nodes (docs/theory.md, engine step 2).

``IntervalSamples``: what the engine computes with. Y at the nodes and at fixed points
inside every interval, as the ODE solver returned them (its dense output at requested
times): their error is the solver's tolerance, whatever the mesh. The interval data at
the Gauss points and the co-state's linearisation read these. ``LagrangeTrajectory``: the
polynomial through the node values and the samples of one interval, for a right-hand side
that needs Y at any time (the autograd co-state sweep).

``HermiteTrajectory``: piecewise cubic Hermite between mesh nodes, for reading a
solution at any time (``Solution.state(t)``, plots).

A trajectory keeps its values at the nodes and, per interval, the derivative
at both ends: Y'(t_n+) and Y'(t_{n+1}-). The two differ at a node because the
control jumps there, so the interpolant is C^0 but is cubic and O(h^4)
accurate inside every interval (linear interpolation would put a kink into
every right-hand side that reads it, which costs the adaptive co-state sweep
~10x more steps).
"""
from __future__ import annotations

import torch

from typing import NamedTuple

from .mesh import interval_index

__all__ = ["HermiteTrajectory", "IntervalSamples", "LagrangeTrajectory"]


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


class IntervalSamples(NamedTuple):
    """Y from the ODE solver at the nodes and at R fixed fractions of every interval (no interpolation
    between nodes: the solver's dense output, accurate to its tolerance).

    mesh [N + 1]; nodes: Y at the nodes [N + 1, *S]; fractions [R], increasing in (0, 1);
    interior: Y at t_n + fractions[r] h_n, [N, R, *S].
    """

    mesh: torch.Tensor
    nodes: torch.Tensor
    fractions: torch.Tensor
    interior: torch.Tensor

    def on_intervals(self, fractions: torch.Tensor) -> torch.Tensor:
        """Y at t_n + c h_n for every interval n and c in ``fractions`` [Q] -> [N, Q, *S]: the stored
        samples themselves; every c must be one of the sampled fractions (ValueError otherwise)."""
        c = fractions.to(self.fractions.dtype)
        index = torch.searchsorted(self.fractions, c).clamp_(max=self.fractions.numel() - 1)
        if not bool((self.fractions[index] == c).all()):
            raise ValueError(f"the sweep sampled its trajectory at the fractions {self.fractions.tolist()} of every "
                             f"interval, not at {c.tolist()}: build the Sweeper with the quadrature used here")
        return self.interior[:, index]

    def interpolant(self, fractions: torch.Tensor) -> "LagrangeTrajectory":
        """The polynomial through the node values and the samples at ``fractions`` on every interval."""
        return LagrangeTrajectory(self.mesh, self.nodes, fractions, self.on_intervals(fractions))


class LagrangeTrajectory:
    """Y(t) on every interval as the polynomial of degree R + 1 through Y at both nodes and at R interior
    fractions (Lagrange form, evaluated from the products of differences: no ill-conditioned monomial
    coefficients). From R = 6 Chebyshev fractions its error is O(h^8) inside an interval; it is C^0.

    Args:
        mesh: node times [N + 1]. nodes: Y at the nodes [N + 1, *S].
        fractions: [R] in (0, 1). interior: Y at t_n + fractions h_n, [N, R, *S].
    """

    def __init__(self, mesh: torch.Tensor, nodes: torch.Tensor, fractions: torch.Tensor, interior: torch.Tensor):
        self.mesh = mesh
        self.points = torch.cat([fractions.new_zeros(1), fractions.to(mesh.dtype), fractions.new_ones(1)])  # [R + 2]
        self.values = torch.cat([nodes[:-1].unsqueeze(1), interior, nodes[1:].unsqueeze(1)], dim=1)  # [N, R + 2, *S]
        differences = self.points[:, None] - self.points[None, :]
        differences.fill_diagonal_(1.0)
        self._inverse_denominators = 1.0 / differences.prod(dim=1)  # [R + 2]
        self._inverse_lengths = 1.0 / (mesh[1:] - mesh[:-1])
        self._trailing = (1,) * (nodes.ndim - 1)

    def at(self, t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Y(t) for a 0-d time t in interval ``index`` (0-d) -> [*S] (what an ODE right-hand side asks)."""
        s = (t - self.mesh[index]) * self._inverse_lengths[index]
        d = s - self.points  # [R + 2]
        others = d.expand(d.numel(), d.numel()).clone()
        others.fill_diagonal_(1.0)
        basis = others.prod(dim=1) * self._inverse_denominators  # l_j(s), [R + 2]
        return (basis.view((-1,) + self._trailing) * self.values[index]).sum(0)
