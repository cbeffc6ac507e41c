"""Co-state strategies: three ways to solve the backward sweep, and the policy choosing one.

dP/dt = -grad_x H(t, X(t), P, u_t), P_T = -grad Phi(X_T) (paper eq. 6), with
X(t) read from the forward sweep's Hermite trajectory (docs/theory.md, engine
step 3). The equation is linear in P, P' = -A(t)^T P + b(t) with A = df/dx and
b = grad_x L / K, which gives three algorithms with the same result (to the
ODE tolerance) and very different costs, so each is a strategy object:

- ``AutogradCostate``: grad_x H by autograd at every right-hand-side
  evaluation, interval by interval. Memory-light; the fallback for very large
  problems.
- ``SequentialLinearCostate``: A and b sampled once at Chebyshev points and
  kept as polynomials per interval (``linear_costate_coefficients``); the
  right-hand side is then a small matrix product, interval by interval.
- ``ParallelScanCostate``: the same polynomial equation for all intervals at
  once (transition maps from one batched adaptive solve, chained by a suffix
  scan). Fastest for few samples and a small state.

``CostatePolicy`` chooses one per backward sweep. A new strategy implements
``CostateStrategy`` and is returned by a policy (``Sweeper.costate_policy``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Protocol

import torch

from .mesh import interval_index
from .ode import ODE
from .pointwise import PointwiseProblem
from .trajectory import HermiteTrajectory

__all__ = ["CostateStrategy", "AutogradCostate", "SequentialLinearCostate", "ParallelScanCostate",
           "CostatePolicy", "LinearCostate", "linear_costate_coefficients", "LINEAR_DEGREE"]

#: Polynomial degree of A(t), b(t) per interval: sampled at LINEAR_DEGREE + 1 Chebyshev points.
LINEAR_DEGREE = 5

Counter = Callable[[Optional[torch.Tensor]], None]


class CostateStrategy(Protocol):
    """One algorithm for the backward sweep of one problem on one mesh with one ODE setting.

    Constructed as ``Strategy(pointwise, mesh, ode)``.
    """

    def solve(self, u: torch.Tensor, states: HermiteTrajectory, count: Counter) -> torch.Tensor:
        """P at the mesh nodes [N + 1, K, n] for controls u [N, m] and the forward sweep's states.

        Every right-hand-side evaluation calls ``count(t)`` first (t None when it has no single
        time); it raises SweepBudgetError past the budget. Runs without autograd graph; may
        raise ``ode.IntegrationFailure``. The caller checks P for non-finite values.
        """
        ...


class AutogradCostate:
    """Interval by interval, grad_x H by autograd at every right-hand-side evaluation."""

    def __init__(self, pointwise: PointwiseProblem, mesh: torch.Tensor, ode: ODE):
        self.pw, self.mesh, self.ode = pointwise, mesh, ode

    def solve(self, u: torch.Tensor, states: HermiteTrajectory, count: Counter) -> torch.Tensor:
        pw, mesh = self.pw, self.mesh

        def rhs(t, p):
            count(t)
            n = interval_index(mesh, t)
            _, _, gx = pw.hamiltonian(t, states.at(t, n), p, u[n], with_grad_x=True)
            return -gx

        pT = pw.costate_terminal(states.values[-1])
        with torch.no_grad():
            return self.ode.solve(rhs, pT, mesh.flip(0)).flip(0)  # [N + 1, K, n]


class LinearCostate(NamedTuple):
    """P' = M(t) P + c(t) as polynomials in the Chebyshev variable z in [-1, 1] of each interval."""

    coefficients: torch.Tensor  # [N, d + 1, K * (n * n + n)]: M = -A^T (K * n * n), then c = b (K * n)
    split: int  # K * n * n: where c starts in the last dimension


def linear_costate_coefficients(pw: PointwiseProblem, mesh: torch.Tensor, u: torch.Tensor,
                                states: HermiteTrajectory) -> LinearCostate:
    """A = df/dx and b = grad_x L / K are smooth inside each interval (X is, and u is constant),
    so they are sampled once, for all intervals at once, at Chebyshev points and kept as
    degree-LINEAR_DEGREE polynomials: no autograd inside the right-hand side."""
    N, K, n = mesh.numel() - 1, pw.num_samples, pw.state_dim
    A_coef, b_coef = _linearisation_polynomials(pw, mesh, u, states)
    # One coefficient matrix per interval: [N, d + 1, K * (n * n + n)], A transposed for P' = -A^T P + b.
    coef = torch.cat([(-A_coef).transpose(-1, -2).reshape(N, LINEAR_DEGREE + 1, -1),
                      b_coef.reshape(N, LINEAR_DEGREE + 1, -1)], dim=-1)
    return LinearCostate(coef, K * n * n)


def _linearisation_polynomials(pw, mesh, u, states):
    """Monomial coefficients in z = 2 (t - t_n) / h_n - 1 of A and b on every interval:
    [N, d + 1, K, n, n] and [N, d + 1, K, n], from values at d + 1 Chebyshev points."""
    d = LINEAR_DEGREE
    j = torch.arange(d + 1, dtype=mesh.dtype, device=mesh.device)
    z = torch.cos((2 * j + 1) * torch.pi / (2 * (d + 1)))  # Chebyshev points in (-1, 1)
    times = mesh[:-1, None] + (mesh[1:] - mesh[:-1])[:, None] * (z + 1) / 2  # [N, d + 1]
    X = states.on_intervals((z + 1) / 2)  # [N, d + 1, K, n]
    A, b = pw.linearisation(times, X, u)
    inverse = torch.linalg.inv(z[:, None] ** j)  # values -> coefficients
    return torch.einsum("cj,njkab->nckab", inverse, A), torch.einsum("cj,njka->ncka", inverse, b)


class SequentialLinearCostate:
    """Interval by interval (restarted at every node), the polynomial linear equation."""

    def __init__(self, pointwise: PointwiseProblem, mesh: torch.Tensor, ode: ODE):
        self.pw, self.mesh, self.ode = pointwise, mesh, ode

    def solve(self, u: torch.Tensor, states: HermiteTrajectory, count: Counter) -> torch.Tensor:
        pw, mesh = self.pw, self.mesh
        K, n_state = pw.num_samples, pw.state_dim
        coef, split = linear_costate_coefficients(pw, mesh, u, states)
        inv_h = 1.0 / (mesh[1:] - mesh[:-1])
        powers = torch.arange(LINEAR_DEGREE + 1, device=mesh.device, dtype=mesh.dtype)

        def rhs(t, p):
            count(t)
            n = interval_index(mesh, t)
            z = (2 * (t - mesh[n]) * inv_h[n] - 1) ** powers  # [d + 1], Chebyshev variable in [-1, 1]
            values = z @ coef[n]  # [K * (n * n + n)]
            M = values[:split].view(K, n_state, n_state)
            return (M @ p.unsqueeze(-1)).squeeze(-1) + values[split:].view(K, n_state)

        pT = pw.costate_terminal(states.values[-1])
        with torch.no_grad():
            return self.ode.solve(rhs, pT, mesh.flip(0)).flip(0)  # [N + 1, K, n]


class ParallelScanCostate:
    """All intervals at once: transition maps from one batched solve, chained by a suffix scan.

    On interval n, with t = t_{n+1} - sigma h_n (sigma from 0 to 1), the co-state obeys an affine
    map P(t_n) = Phi_n P(t_{n+1}) + r_n. Y = [Phi | r] ([N, K, n, n + 1]) comes from one adaptive
    solve for all intervals: dY/dsigma = -h_n (M Y + [0 | c]), Y(0) = [I | 0]; the Chebyshev
    variable z = 1 - 2 sigma is the same on every interval. The maps are then chained,
    P_n = F_n(F_{n+1}(... F_{N-1}(P_T))), by an associative suffix scan: log2(N) batched
    compositions. This replaces N sequential restarted solves (>= 6 stages each) by one solve
    of a few steps; the step control takes the worst interval's error (max over intervals of
    the per-interval RMS norm the sequential sweep uses). Needs an adaptive method.
    """

    def __init__(self, pointwise: PointwiseProblem, mesh: torch.Tensor, ode: ODE):
        if not ode.adaptive:
            raise ValueError(f"ParallelScanCostate needs an adaptive ODE method, got {ode.method!r}")
        self.pw, self.mesh, self.ode = pointwise, mesh, ode

    def solve(self, u: torch.Tensor, states: HermiteTrajectory, count: Counter) -> torch.Tensor:
        coef, split = linear_costate_coefficients(self.pw, self.mesh, u, states)
        pT = self.pw.costate_terminal(states.values[-1])
        with torch.no_grad():
            return self._scan(coef, split, pT, count)

    def _scan(self, coef, split, pT, count) -> torch.Tensor:
        mesh, N = self.mesh, self.mesh.numel() - 1
        K, n = pT.shape
        h = (mesh[1:] - mesh[:-1]).view(N, 1, 1, 1)
        powers = torch.arange(coef.shape[1], device=mesh.device, dtype=mesh.dtype)

        def rhs(sigma, Y):
            count(None)
            values = ((1 - 2 * sigma) ** powers) @ coef  # [N, K * (n * n + n)]
            M = values[:, :split].view(N, K, n, n)
            c = values[:, split:].view(N, K, n, 1)
            MY = M @ Y
            return -h * torch.cat([MY[..., :n], MY[..., n:] + c], dim=-1)

        eye = torch.eye(n, dtype=pT.dtype, device=pT.device).expand(N, K, n, n)
        Y0 = torch.cat([eye, pT.new_zeros(N, K, n, 1)], dim=-1)
        # The mesh's jump and step times mean nothing on the common sigma axis [0, 1].
        options = {k: v for k, v in self.ode.options.items() if k not in ("jump_t", "first_step", "step_t")}
        options["norm"] = lambda e: e.reshape(N, -1).pow(2).mean(-1).sqrt().amax()
        unit = torch.tensor([0.0, 1.0], dtype=mesh.dtype, device=mesh.device)
        Y = self.ode.solve(rhs, Y0, unit, options=options)[-1]
        Phi, r = Y[..., :n], Y[..., n]  # [N, K, n, n], [N, K, n]
        d = 1
        while d < N:  # Hillis-Steele: after this step G_j covers F_j ... F_{j + 2d - 1}
            head_Phi, head_r = Phi[: N - d], r[: N - d]
            r = torch.cat([(head_Phi @ r[d:].unsqueeze(-1)).squeeze(-1) + head_r, r[N - d:]])
            Phi = torch.cat([head_Phi @ Phi[d:], Phi[N - d:]])
            d *= 2
        P = (Phi @ pT.unsqueeze(-1)).squeeze(-1) + r  # [N, K, n]
        return torch.cat([P, pT.unsqueeze(0)])


@dataclass(frozen=True)
class CostatePolicy:
    """Chooses the co-state strategy for a problem size and an ODE setting.

    The polynomial (linear) strategies while the coefficients, N (d + 1) K n (n + 1) numbers,
    stay below ``linear_max_elements``; autograd above. Among them, the parallel scan with an
    adaptive method when ``parallel`` and K n (n + 1) <= ``parallel_max``: all intervals at once
    pays where the per-step overhead of N sequential restarts dominates, few samples and a small
    state (measured: lqr K = 1 25x faster, K = 100 1.7x; the sine network, n = 5, is slower that
    way from K = 30 on, 3.9x at K = 1000). ``CostatePolicy(parallel=False)`` forces the
    sequential linear strategy where the linear path applies.
    """

    parallel: bool = True
    linear_max_elements: int = 20_000_000
    parallel_max: int = 600

    def choose(self, pointwise: PointwiseProblem, mesh: torch.Tensor, ode: ODE) -> CostateStrategy:
        N, K, n = mesh.numel() - 1, pointwise.num_samples, pointwise.state_dim
        if N * (LINEAR_DEGREE + 1) * K * n * (n + 1) > self.linear_max_elements:
            return AutogradCostate(pointwise, mesh, ode)
        if ode.adaptive and self.parallel and K * n * (n + 1) <= self.parallel_max:
            return ParallelScanCostate(pointwise, mesh, ode)
        return SequentialLinearCostate(pointwise, mesh, ode)
