"""Co-state strategies: three ways to solve the backward sweep, and the policy choosing one.

dP/dt = -grad_x H(t, X(t), P, u_t), P_T = -grad Phi(X_T) (paper eq. 6), with
X(t) taken from the forward sweep's samples (docs/theory.md, engine step 3): X at
the nodes and at the Chebyshev points of every interval, as the forward solver
returned them (``IntervalSamples``; not the cubic Hermite interpolant, whose
O(h^4) error on a coarse mesh would bias P and with it the gradient). The
equation is linear in P, P' = -A(t)^T P + b(t) with A = df/dx and
b = grad_x L / K, which gives three algorithms with the same result (to the
ODE tolerance) and very different costs, so each is a strategy object:

- ``AutogradCostate``: grad_x H by autograd at every right-hand-side
  evaluation, interval by interval, with X(t) the degree-7 polynomial through
  the node and Chebyshev samples (``LagrangeTrajectory``, O(h^8)).
  Memory-light; the fallback for very large problems.
- ``SequentialLinearCostate``: A and b evaluated once at the Chebyshev points
  (from the sampled X) and kept as polynomials per interval
  (``linear_costate_coefficients``, through the nodes too: O(h^8)); the right-hand side is then a
  small matrix product, interval by interval.
- ``ParallelScanCostate``: the same polynomial equation for all intervals at
  once (transition maps from one batched adaptive solve, chained by a suffix
  scan). Fastest for few samples and a small state.

Every strategy returns P at the nodes and at requested fractions of every
interval (the Gauss points of the interval Hamiltonian), again from the solver:
the sequential ones from their dense output, the parallel scan from its
transition maps evaluated at the interior points too.

``CostatePolicy`` chooses one per backward sweep. A new strategy implements
``CostateStrategy`` and is returned by a policy (``Sweeper.costate_policy``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Protocol

import torch

from .mesh import chebyshev_fractions, interval_index
from .ode import ODE
from .pointwise import PointwiseProblem, hinge_gradient
from .scan import affine_suffix_scan
from .trajectory import IntervalSamples

__all__ = ["CostateStrategy", "AutogradCostate", "SequentialLinearCostate", "ParallelScanCostate",
           "CostatePolicy", "LinearCostate", "linear_costate_coefficients", "LINEAR_DEGREE", "linearisation_fractions",
           "hinge_kinks"]

#: Polynomial degree of A(t), b(t) per interval: interpolated at both nodes and LINEAR_DEGREE - 1
#: Chebyshev points inside, error O(h^(LINEAR_DEGREE + 1)). Measured on Rayleigh at mesh 20 (random
#: controls, gradient against finite differences of J): 2.0e-7 relative with degree 5 through 6
#: Chebyshev points, 3.3e-9 with degree 7 (with 5 Gauss points; at the default 3 both strategies and
#: the autograd one meet the quadrature's own floor, 2.4e-8).
LINEAR_DEGREE = 7


def linearisation_fractions(dtype, device) -> torch.Tensor:
    """Where a co-state strategy reads X inside every interval: the LINEAR_DEGREE - 1 Chebyshev points,
    as fractions of the interval (decreasing). The forward sweep must sample X there."""
    return chebyshev_fractions(LINEAR_DEGREE - 1, dtype, device)


def chebyshev_basis(z: torch.Tensor, degree: int, orders: Optional[torch.Tensor] = None) -> torch.Tensor:
    """T_0(z), ..., T_degree(z) for a 0-d z -> [degree + 1]. One op per call of a right-hand side, and
    the polynomial continues smoothly beyond [-1, 1]: an adaptive step may overshoot the last node
    of a solve, and a basis clamped there costs the dense output at that node 100x its accuracy.
    ``orders``: 0, ..., degree in z's dtype, made once by a caller that calls this per evaluation."""
    k = torch.arange(degree + 1, dtype=z.dtype, device=z.device) if orders is None else orders
    return torch.special.chebyshev_polynomial_t(z.expand(degree + 1), k)

Counter = Callable[[Optional[torch.Tensor]], None]


class CostateStrategy(Protocol):
    """One algorithm for the backward sweep of one problem on one mesh with one ODE setting.

    Constructed as ``Strategy(pointwise, mesh, ode)``.
    """

    def solve(self, u: torch.Tensor, states: IntervalSamples, count: Counter,
              fractions: torch.Tensor) -> IntervalSamples:
        """P at the mesh nodes [N + 1, K, n] and at t_n + c h_n for c in ``fractions`` ([Q], increasing
        in (0, 1)) [N, Q, K, n], for controls u [N, m] and the forward sweep's samples of X (which hold
        the ``linearisation_fractions``).

        Every right-hand-side evaluation calls ``count(t)`` first (t None when it has no single
        time); it raises SweepBudgetError past the budget. Runs without autograd graph; may
        raise ``ode.IntegrationFailure``. The caller checks P for non-finite values.
        """
        ...


class AutogradCostate:
    """Interval by interval, grad_x H by autograd at every right-hand-side evaluation."""

    def __init__(self, pointwise: PointwiseProblem, mesh: torch.Tensor, ode: ODE):
        self.pw, self.mesh, self.ode = pointwise, mesh, ode

    def solve(self, u: torch.Tensor, states: IntervalSamples, count: Counter,
              fractions: torch.Tensor) -> IntervalSamples:
        pw, mesh = self.pw, self.mesh
        X = states.interpolant(linearisation_fractions(mesh.dtype, mesh.device))

        def rhs(t, p):
            count(t)
            n = interval_index(mesh, t)
            _, _, gx = pw.hamiltonian(t, X.at(t, n), p, u[n], with_grad_x=True)
            return -gx

        pT = pw.costate_terminal(states.nodes[-1])
        with torch.no_grad():
            P, interior = self.ode.solve_sampled(rhs, pT, fractions, backward=True)
        return IntervalSamples(mesh, P, fractions, interior)


class LinearCostate(NamedTuple):
    """P' = M(t) P + c(t) as polynomials in the variable z in [-1, 1] of each interval, in the Chebyshev
    basis T_0(z), ..., T_d(z). A running cost with kinks between the nodes (``PointwiseProblem.has_hinges``)
    keeps c's smooth part as a polynomial, and its hinges' a, G, H too (each smooth): c = b + sum_j
    max(0, a_j) G_j + max(0, a_j)^2 H_j is formed at every evaluation, so the kinks sit where a_j changes
    sign, for the adaptive solver to step across, not smeared over the interval by the polynomial (which
    made the gradient of J 3-30 % wrong where a path penalty switches on or off, measured)."""

    coefficients: torch.Tensor  # [N, d + 1, K (n n + n + c + 2 c n)]: M = -A^T, b, then a, G, H of the c hinges
    K: int
    n: int
    hinges: int = 0  # c

    def decode(self, values: torch.Tensor):
        """M [..., K, n, n] and c [..., K, n] from values [..., K (n n + n + c + 2 c n)] of the polynomials."""
        K, n, c = self.K, self.n, self.hinges
        lead = values.shape[:-1]
        sizes = [K * n * n, K * n] + ([K * c, K * c * n, K * c * n] if c else [])
        parts = values.split(sizes, dim=-1)
        M, b = parts[0].view(lead + (K, n, n)), parts[1].view(lead + (K, n))
        if c:
            a, G, H = (parts[2].view(lead + (K, c)), parts[3].view(lead + (K, c, n)), parts[4].view(lead + (K, c, n)))
            b = b + hinge_gradient(a, G, H)
        return M, b


def linear_costate_coefficients(pw: PointwiseProblem, mesh: torch.Tensor, u: torch.Tensor,
                                states: IntervalSamples) -> LinearCostate:
    """A = df/dx and b = grad_x L / K are smooth inside each interval (X is, and u is constant),
    so they are evaluated once, for all intervals at once, at both nodes and the Chebyshev points
    inside (X there from the forward solver) and kept as degree-LINEAR_DEGREE polynomials: no
    autograd inside the right-hand side."""
    N, K, n = mesh.numel() - 1, pw.num_samples, pw.state_dim
    parts = _linearisation_polynomials(pw, mesh, u, states)
    # One coefficient matrix per interval: [N, d + 1, K * (n * n + n) (+ the hinges)], A transposed for
    # P' = -A^T P + b.
    A_coef = parts[0].neg().transpose(-1, -2)
    coef = torch.cat([part.reshape(N, LINEAR_DEGREE + 1, -1) for part in (A_coef,) + parts[1:]], dim=-1)
    return LinearCostate(coef, K, n, parts[2].shape[-1] if len(parts) > 2 else 0)


def _linearisation_polynomials(pw, mesh, u, states):
    """Chebyshev-basis coefficients in z = 2 (t - t_n) / h_n - 1 of A and b on every interval:
    [N, d + 1, K, n, n] and [N, d + 1, K, n], from values at the two nodes (with the interval's
    control) and d - 1 Chebyshev points inside. With hinges, b without them, then a, G, H
    ([N, d + 1, K, c], [N, d + 1, K, c, n] twice)."""
    d = LINEAR_DEGREE
    fractions = linearisation_fractions(mesh.dtype, mesh.device)  # Chebyshev points (z + 1) / 2
    inner = 2 * fractions - 1
    z = torch.cat([-inner.new_ones(1), inner, inner.new_ones(1)])  # [d + 1]
    times = torch.cat([mesh[:-1, None], mesh[:-1, None] + (mesh[1:] - mesh[:-1])[:, None] * fractions,
                       mesh[1:, None]], dim=1)  # [N, d + 1]
    X = torch.cat([states.nodes[:-1].unsqueeze(1), states.on_intervals(fractions), states.nodes[1:].unsqueeze(1)],
                  dim=1)  # [N, d + 1, K, n], from the forward solver
    values = pw.linearisation(times, X, u)
    if pw.has_hinges:
        a, G, H = pw.hinge_linearisation(times, X, u)
        values = (values[0], values[1] - hinge_gradient(a, G, H), a, G, H)  # b's smooth part, then the hinges
    k = torch.arange(d + 1, dtype=mesh.dtype, device=mesh.device)
    inverse = torch.linalg.inv(torch.special.chebyshev_polynomial_t(z[:, None], k))  # values -> coefficients (cond 4.2)
    return tuple(torch.einsum("cj,nj...->nc...", inverse, v) for v in values)


class SequentialLinearCostate:
    """Interval by interval (restarted at every node), the polynomial linear equation."""

    def __init__(self, pointwise: PointwiseProblem, mesh: torch.Tensor, ode: ODE):
        self.pw, self.mesh, self.ode = pointwise, mesh, ode

    def solve(self, u: torch.Tensor, states: IntervalSamples, count: Counter,
              fractions: torch.Tensor) -> IntervalSamples:
        pw, mesh = self.pw, self.mesh
        linear = linear_costate_coefficients(pw, mesh, u, states)
        coef = linear.coefficients
        inv_h = 1.0 / (mesh[1:] - mesh[:-1])

        def rhs(t, p):
            count(t)
            n = interval_index(mesh, t)
            z = chebyshev_basis(2 * (t - mesh[n]) * inv_h[n] - 1, LINEAR_DEGREE)  # [d + 1]
            M, c = linear.decode(z @ coef[n])
            return (M @ p.unsqueeze(-1)).squeeze(-1) + c

        pT = pw.costate_terminal(states.nodes[-1])
        with torch.no_grad():
            P, interior = self.ode.solve_sampled(rhs, pT, fractions, backward=True)
        return IntervalSamples(mesh, P, fractions, interior)


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

    P inside the intervals: the same solve returns Y also at sigma = 1 - c for the requested
    fractions c (its dense output), and P(t_n + c h_n) = Phi_n(1 - c) P(t_{n+1}) + r_n(1 - c).
    """

    def __init__(self, pointwise: PointwiseProblem, mesh: torch.Tensor, ode: ODE):
        if not ode.adaptive:
            raise ValueError(f"ParallelScanCostate needs an adaptive ODE method, got {ode.method!r}")
        self.pw, self.mesh, self.ode = pointwise, mesh, ode

    def solve(self, u: torch.Tensor, states: IntervalSamples, count: Counter,
              fractions: torch.Tensor) -> IntervalSamples:
        linear = linear_costate_coefficients(self.pw, self.mesh, u, states)
        pT = self.pw.costate_terminal(states.nodes[-1])
        with torch.no_grad():
            P, interior = self._scan(linear, pT, count, fractions)
        return IntervalSamples(self.mesh, P, fractions, interior)

    def _scan(self, linear, pT, count, fractions):
        mesh, N = self.mesh, self.mesh.numel() - 1
        K, n = pT.shape
        minus_h = -(mesh[1:] - mesh[:-1]).view(N, 1, 1, 1)
        coef = linear.coefficients
        degree = coef.shape[1] - 1
        orders = torch.arange(degree + 1, dtype=coef.dtype, device=coef.device)
        # [d + 1, N * J]: the basis is the same on every interval, so the values of all intervals are one
        # matrix-vector product (N batched [1, d + 1] @ [d + 1, J] products cost 4-8x more, measured)
        by_order = coef.transpose(0, 1).reshape(degree + 1, -1)

        def rhs(sigma, Y):  # runs without graph: MY is a fresh product, updated in place
            count(None)
            M, c = linear.decode((chebyshev_basis(1 - 2 * sigma, degree, orders) @ by_order).view(N, -1))
            MY = M @ Y
            MY[..., n:] += c.unsqueeze(-1)
            return minus_h * MY

        eye = torch.eye(n, dtype=pT.dtype, device=pT.device).expand(N, K, n, n)
        Y0 = torch.cat([eye, pT.new_zeros(N, K, n, 1)], dim=-1)
        # The mesh's jump and step times mean nothing on the common sigma axis [0, 1]; the hinges' kinks do.
        options = {k: v for k, v in self.ode.options.items() if k not in ("jump_t", "first_step", "step_t")}
        options["norm"] = lambda e: e.reshape(N, -1).pow(2).mean(-1).sqrt().amax()
        if not linear.hinges:  # the first step as in flows.all_intervals_options (Goddard: 152 DDP its, not 57)
            options["step_memory"] = self.ode.step_memory("costate scan")
        kinks = hinge_kinks(linear)
        if kinks.numel():
            options["jump_t"] = kinks
        # sigma = 1 - c for the fractions c (increasing), so that the output times increase.
        sigma = 1 - fractions.to(mesh.dtype).flip(0)
        unit = torch.cat([sigma.new_zeros(1), sigma, sigma.new_ones(1)])
        Ys = self.ode.solve(rhs, Y0, unit, options=options)  # [Q + 2, N, K, n, n + 1]
        Y = Ys[-1]
        inner = Ys[1:-1].flip(0).transpose(0, 1)  # [N, Q, K, n, n + 1], in the order of ``fractions``
        Phi, r = affine_suffix_scan(Y[..., :n], Y[..., n])  # [N, K, n, n], [N, K, n]: the maps T -> t_n
        P = torch.cat([(Phi @ pT.unsqueeze(-1)).squeeze(-1) + r, pT.unsqueeze(0)])  # [N + 1, K, n]
        # Inside interval n: P(t_n + c h_n) = Phi_n(1 - c) P_{n+1} + r_n(1 - c).
        interior = (inner[..., :n] @ P[1:].unsqueeze(1).unsqueeze(-1)).squeeze(-1) + inner[..., n]
        return P, interior


#: Where ``hinge_kinks`` looks for sign changes of a hinge's a (in z, per interval) before bisecting them
_KINK_SAMPLES, _KINK_BISECTIONS = 64, 60


def hinge_kinks(linear: LinearCostate) -> torch.Tensor:
    """The times sigma in (0, 1) of the parallel scan's axis (z = 1 - 2 sigma) where a hinge's a_j changes
    sign inside some interval, sorted [J] (empty without hinges): the kinks of the co-state's right-hand
    side, where the batched solve's steps must end (``jump_t``). Left to the step control, a kink in any
    interval shrinks the common step of all: Bryson-Denham at N = 200 had kinks in 4 intervals and took
    590 evaluations a sweep, 32 without them. The sign changes are found on a grid of ``_KINK_SAMPLES``
    cells in z, each then bisected to rounding (a_j is a polynomial of degree LINEAR_DEGREE in z)."""
    K, n, c = linear.K, linear.n, linear.hinges
    coef = linear.coefficients
    if not c:
        return coef.new_zeros(0)
    start = K * n * n + K * n
    a = coef[..., start:start + K * c].transpose(1, 2)  # [N, K c, d + 1]
    orders = torch.arange(a.shape[-1], dtype=coef.dtype, device=coef.device)
    z = torch.linspace(-1.0, 1.0, _KINK_SAMPLES + 1, dtype=coef.dtype, device=coef.device)
    values = torch.einsum("zd,njd->njz", torch.special.chebyshev_polynomial_t(z[:, None], orders), a)
    positive = values > 0
    found = (positive[..., 1:] != positive[..., :-1]).nonzero()  # [B, 3]: interval, hinge, cell (one sync)
    if not found.shape[0]:
        return coef.new_zeros(0)
    rows = a[found[:, 0], found[:, 1]]  # [B, d + 1]
    lo, hi = z[found[:, 2]], z[found[:, 2] + 1]
    lo_positive = positive[found[:, 0], found[:, 1], found[:, 2]]
    for _ in range(_KINK_BISECTIONS):
        mid = 0.5 * (lo + hi)
        mid_positive = (torch.special.chebyshev_polynomial_t(mid[:, None], orders) * rows).sum(-1) > 0
        same = mid_positive == lo_positive
        lo, hi = torch.where(same, mid, lo), torch.where(same, hi, mid)
    sigma = torch.unique(0.5 * (1.0 - 0.5 * (lo + hi)))
    return sigma[(sigma > 0) & (sigma < 1)]


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
