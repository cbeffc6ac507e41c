"""Interval Hamiltonians: what every update rule maximises (DESIGN.md section 2, steps 4-5).

u is constant on each mesh interval I_n, so the pointwise maximisation of the
paper (Alg. 1-2, step 5) becomes, for every n at once,

    u_n <- argmax_u  int_{I_n} H~(t, X_t, P_t, u, Xdot_t, Pdot_t) dt,

with the augmented Hamiltonian of paper eq. (7),

    H~ = H(u) - rho/2 |Xdot - f(u)|^2 - rho/2 |Pdot + grad_x H(u)|^2,

where Xdot = f(u^k) and Pdot = -grad_x H(u^k) are the current sweep's values
(sums of squares run over the K samples: the paper's concatenated state).
The integral is taken by Gauss-Legendre quadrature on the Hermite
trajectories, so int_{I_n} grad_u H dt is the exact gradient -dJ/du_n of the
piecewise-constant problem up to the quadrature and ODE tolerances (this is
what makes the "gradient" rule equal gradient descent, paper Prop. 2).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from .pointwise import PointwiseProblem
from .sweeps import BackwardSweep, ForwardSweep

__all__ = ["IntervalData", "interval_data", "HamiltonianTerms", "IntervalHamiltonian", "gauss_legendre"]


def gauss_legendre(points: int, dtype, device):
    """Nodes [Q] in (0, 1) and weights [Q] (summing to 1) of Q-point Gauss-Legendre quadrature."""
    x, w = np.polynomial.legendre.leggauss(points)
    return (torch.as_tensor((x + 1) / 2, dtype=dtype, device=device),
            torch.as_tensor(w / 2, dtype=dtype, device=device))


class IntervalData(NamedTuple):
    """Pointwise data on every interval at the quadrature points (step 4 of the engine).

    times [N, Q]; weights [N, Q] (quadrature weights times interval lengths);
    states, costates, state_slope (= f(u^k)), costate_slope (= -grad_x H(u^k)): [N, Q, K, n];
    controls u^k [N, m]; hamiltonian int_{I_n} H(u^k) dt [N].
    """

    times: torch.Tensor
    weights: torch.Tensor
    lengths: torch.Tensor
    states: torch.Tensor
    costates: torch.Tensor
    state_slope: torch.Tensor
    costate_slope: torch.Tensor
    controls: torch.Tensor
    hamiltonian: torch.Tensor


def interval_data(pw: PointwiseProblem, u: torch.Tensor, forward: ForwardSweep, backward: BackwardSweep,
                  quadrature: int) -> IntervalData:
    """Evaluate X, P, f(u^k), grad_x H(u^k) and H(u^k) at Q Gauss points of every interval."""
    mesh = forward.states.mesh
    c, w = gauss_legendre(quadrature, mesh.dtype, mesh.device)
    lengths = mesh[1:] - mesh[:-1]  # [N]
    times = mesh[:-1, None] + lengths[:, None] * c  # [N, Q]
    weights = lengths[:, None] * w  # [N, Q]
    X = forward.states.on_intervals(c)  # [N, Q, K, n]
    P = backward.costates.on_intervals(c)
    H, f, gx = pw.hamiltonian(times, X, P, u, with_grad_x=True)
    return IntervalData(times, weights, lengths, X, P, f.detach(), -gx.detach(), u,
                        (weights * H.detach()).sum(-1))


class HamiltonianTerms(NamedTuple):
    """Per-interval integrals [N] at a trial control: H, and the two feasibility errors of Lemma 1."""

    hamiltonian: torch.Tensor  # int H(u) dt
    state_error: torch.Tensor  # int |f(u) - f(u^k)|^2 dt
    costate_error: torch.Tensor  # int |grad_x H(u) - grad_x H(u^k)|^2 dt


class IntervalHamiltonian:
    """u [N, m] -> int_{I_n} H~ dt [N], the objective of every interval at once.

    ``rho = 0`` gives the plain Hamiltonian (basic MSA). The co-state term needs
    grad_x H as a function of u, hence a double backward when it is maximised;
    it is skipped when rho is 0.
    """

    def __init__(self, pw: PointwiseProblem, data: IntervalData, rho: float = 0.0):
        self.pw, self.data, self.rho = pw, data, float(rho)
        self.evaluations = 0

    def terms(self, u: torch.Tensor, *, need_costate: bool = True, create_graph: bool = True) -> HamiltonianTerms:
        d = self.data
        self.evaluations += 1
        H, f, gx = self.pw.hamiltonian(d.times, d.states, d.costates, u, with_grad_x=need_costate,
                                       create_graph=create_graph)
        state_err = ((f - d.state_slope) ** 2).sum(dim=(-1, -2))  # [N, Q]
        if gx is None:
            costate_err = torch.zeros_like(state_err)
        else:
            costate_err = ((gx + d.costate_slope) ** 2).sum(dim=(-1, -2))
        w = d.weights
        return HamiltonianTerms((w * H).sum(-1), (w * state_err).sum(-1), (w * costate_err).sum(-1))

    def __call__(self, u: torch.Tensor) -> torch.Tensor:
        if self.rho == 0.0:
            return self.terms(u, need_costate=False).hamiltonian
        t = self.terms(u)
        return t.hamiltonian - 0.5 * self.rho * (t.state_error + t.costate_error)

    def gradient(self, u: torch.Tensor) -> torch.Tensor:
        """grad_u int_{I_n} H dt at u, [N, m]; at u = u^k this is -dJ/du_n (paper Prop. 2)."""
        u = u.detach().requires_grad_(True)
        with torch.enable_grad():
            H = self.terms(u, need_costate=False).hamiltonian
            (g,) = torch.autograd.grad(H.sum(), u)
        return g
