"""Interval Hamiltonians: what every update rule maximises (docs/theory.md, engine steps 4-5).

u is constant on each mesh interval I_n, so the pointwise maximisation of the
paper (Alg. 1-2, step 5) becomes, for every n at once,

    u_n <- argmax_u  int_{I_n} H~(t, X_t, P_t, u, Xdot_t, Pdot_t) dt,

with the augmented Hamiltonian of paper eq. (7),

    H~ = H(u) - rho/2 |Xdot - f(u)|^2 - rho/2 |Pdot + grad_x H(u)|^2,

where Xdot = f(u^k) and Pdot = -grad_x H(u^k) are the current sweep's values
(sums of squares run over the K samples: the paper's concatenated state).
The integral is taken by Gauss-Legendre quadrature, with X and P at the Gauss
points as the ODE solvers of the two sweeps returned them (their dense output,
``IntervalSamples``; not interpolated between nodes), so int_{I_n} grad_u H dt is
the exact gradient -dJ/du_n of the piecewise-constant problem up to the
quadrature and ODE tolerances, on coarse meshes too (this is what makes the
"gradient" rule equal gradient descent, paper Prop. 2).
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Tuple

import torch

from ..sweep.mesh import gauss_legendre
from ..sweep.pointwise import PointwiseProblem
from ..sweep.sweeps import BackwardSweep, ForwardSweep

__all__ = ["IntervalData", "interval_data", "HamiltonianTerms", "IntervalHamiltonian", "gauss_legendre",
           "hinge_correction"]

#: sub-intervals on which ``hinge_correction`` integrates a hinge that switches inside an interval
HINGE_CELLS = 32


@functools.lru_cache(maxsize=None)
def _hinge_rule(points: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The fine rule of ``hinge_correction`` (float64, CPU; built once per Q): the Lagrange matrix [F, Q] from
    the Q Gauss nodes of an interval to 3-point Gauss rules on each of ``HINGE_CELLS`` equal cells, and the
    fine weights [F] (sum 1)."""
    c, _ = gauss_legendre(points, torch.float64, "cpu")
    g, gw = gauss_legendre(3, torch.float64, "cpu")
    starts = torch.arange(HINGE_CELLS, dtype=torch.float64) / HINGE_CELLS
    s = (starts[:, None] + g / HINGE_CELLS).reshape(-1)  # [F]
    weights = (gw / HINGE_CELLS).repeat(HINGE_CELLS)
    basis = torch.ones(s.numel(), points, dtype=torch.float64)
    for q in range(points):  # Lagrange polynomial of node q at the fine points
        for j in range(points):
            if j != q:
                basis[:, q] *= (s - c[j]) / (c[q] - c[j])
    return basis, weights


def hinge_correction(pw: PointwiseProblem, weights: torch.Tensor, lengths: torch.Tensor, times: torch.Tensor,
                     states: torch.Tensor, u: torch.Tensor) -> Optional[torch.Tensor]:
    """What to add to the Gauss quadrature of int_{I_n} H dt [N] where a hinge w max(0, a)^2 / 2 of the
    running cost (a mixed path constraint's penalty: a reads u) switches inside the interval, or None.

    There the integrand has a kink that the Q-point rule does not resolve: dJ/du_n was off by 1.5e-4 of
    max |dJ/du| (docs/theory.md). a and w are smooth in t: their interpolants through the Q points are
    integrated on ``HINGE_CELLS`` cells instead, on the intervals where a changes sign (elsewhere the
    quadrature is left as it is); differentiable in u. weights, times [N, Q]; states [N, Q, K, n]; u [N, m].
    """
    if not pw.hinges_read_control or times.shape[1] < 2:
        return None
    a, w = pw.hinge_values(times, states, u)  # [N, Q, K, c]
    basis, fine_weights = (r.to(dtype=a.dtype, device=a.device) for r in _hinge_rule(times.shape[1]))
    af = torch.einsum("fq,nqkc->nfkc", basis, a)
    wf = torch.einsum("fq,nqkc->nfkc", basis, w)
    with torch.no_grad():
        switches = (af.amax(1) > 0) & (af.amin(1) < 0)  # [N, K, c]
    gauss = (weights[:, :, None, None] * w * a.clamp(min=0) ** 2).sum(1)
    fine = lengths[:, None, None] * (fine_weights[None, :, None, None] * wf * af.clamp(min=0) ** 2).sum(1)
    # H holds -L / K: the quadrature's hinge integral out, the fine one in
    return torch.where(switches, 0.5 * (gauss - fine), torch.zeros_like(fine)).sum((1, 2)) / pw.reducer.num_samples


class IntervalData(NamedTuple):
    """Pointwise data on every interval at the quadrature points (step 4 of the engine).

    This is the whole contract between a sweep and the maximisation: ``IntervalHamiltonian``
    and every rule and maximiser read only these arrays, never the trajectories they came
    from. ``interval_data`` fills them from the samples the continuous sweeps' ODE solvers
    returned at the Gauss points; a discrete-time (layer-by-layer) sweep fills them from its layers instead (one
    point per layer, Q = 1, with the layer's x_n, p_{n+1} and residuals) and reuses the same
    rules and maximisers.

    times [N, Q]; weights [N, Q] (quadrature weights times interval lengths);
    states, costates, state_slope (= f(u^k)), costate_slope (= -grad_x H(u^k)): [N, Q, K, n];
    controls u^k [N, m]; hamiltonian int_{I_n} H(u^k) dt [N].

    In a distributed solve the [N, Q, K, n] fields hold this rank's K_r samples and
    ``hamiltonian`` is the total over all samples of all ranks.
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

    def objective(self, pw: PointwiseProblem, rho: float = 0.0, eps: float = 0.0) -> "IntervalHamiltonian":
        """The (augmented) interval Hamiltonian of this data: what an update rule maximises. A sweep's
        data names its objective, so the rules run unchanged on another sweep's data (``pmp.nn``'s
        ``LayerIterate``)."""
        return IntervalHamiltonian(pw, self, rho, eps)


def interval_data(pw: PointwiseProblem, u: torch.Tensor, forward: ForwardSweep, backward: BackwardSweep,
                  quadrature: int) -> IntervalData:
    """Evaluate X, P, f(u^k), grad_x H(u^k) and H(u^k) at Q Gauss points of every interval.

    X and P are the sweeps' samples there (``ForwardSweep.samples``, ``BackwardSweep.samples``):
    the sweeps must come from a Sweeper built with the same ``quadrature`` (ValueError otherwise).
    """
    mesh = forward.states.mesh
    c, w = gauss_legendre(quadrature, mesh.dtype, mesh.device)
    lengths = mesh[1:] - mesh[:-1]  # [N]
    times = mesh[:-1, None] + lengths[:, None] * c  # [N, Q]
    weights = lengths[:, None] * w  # [N, Q]
    if forward.samples is None or backward.samples is None:
        raise ValueError("interval_data: the sweeps carry no samples inside the intervals (a forward sweep run "
                         "with samples=False)")
    X = forward.samples.on_intervals(c)  # [N, Q, K, n], from the forward solver
    P = backward.samples.on_intervals(c)  # from the co-state solver
    hamiltonian = lengths.new_zeros(lengths.shape)
    with pw.reducer.guard() as guard:
        blocks = pw.point_blocks(times, X)  # intervals in cache-sized blocks: the same numbers, faster
        if len(blocks) == 1:
            H, f, gx = (a.detach() for a in pw.hamiltonian(times, X, P, u, with_grad_x=True))
        else:
            H, f, gx = times.new_empty(times.shape), torch.empty_like(X), torch.empty_like(X)
            for rows in blocks:
                parts = pw.hamiltonian(times[rows], X[rows], P[rows], u[rows], with_grad_x=True)
                H[rows], f[rows], gx[rows] = (a.detach() for a in parts)
        hamiltonian = (weights * H).sum(-1)  # this rank's samples; the total over all below
        correction = hinge_correction(pw, weights, lengths, times, X, u)
        if correction is not None:
            hamiltonian = hamiltonian + correction.detach()
    (hamiltonian,) = pw.reducer.totals(hamiltonian, error=guard.error)
    penalty = pw.problem.control_penalty
    if penalty is not None:
        hamiltonian = hamiltonian - lengths * penalty.value(u)
    return IntervalData(times, weights, lengths, X, P, f, -gx, u, hamiltonian)


class HamiltonianTerms(NamedTuple):
    """Per-interval integrals [N] at a trial control: H (with the control penalty), and the two
    feasibility errors of Lemma 1."""

    hamiltonian: torch.Tensor  # int H(u) dt
    state_error: torch.Tensor  # int |f(u) - f(u^k)|^2 dt
    costate_error: torch.Tensor  # int |grad_x H(u) - grad_x H(u^k)|^2 dt


class IntervalHamiltonian:
    """The objective of every interval at once: u [N, m] -> [N].

        int_{I_n} [ H(u) - rho/2 (|f(u) - f(u^k)|^2 + |grad_x H(u) - grad_x H(u^k)|^2) ] dt
          - eps h_n |u - u^k|^2                        (SQH)
          - h_n * penalty(u)                           (L1 / L0 control cost, non-smooth)

    ``smooth`` is everything but the penalty (what gradient-based maximisers see);
    ``penalty_value`` the rest; calling the object gives the sum. ``rho = 0`` skips
    the co-state term, which needs grad_x H as a function of u (a double backward).

    In a distributed solve (``pw.reducer.distributed``) ``smooth`` is this rank's part (its
    samples; the SQH term on rank 0 only), differentiable, and every evaluation method
    (``terms``, ``value_and_grad``, ``curvature``, ``candidates``, calling the object) returns
    totals over all ranks, one fused all-reduce each; ``total`` makes parts total.
    """

    def __init__(self, pw: PointwiseProblem, data: IntervalData, rho: float = 0.0, eps: float = 0.0):
        self.pw, self.data, self.rho, self.eps = pw, data, float(rho), float(eps)
        self.penalty = pw.problem.control_penalty
        self.evaluations = 0

    def terms(self, u: torch.Tensor, *, need_costate: bool = True, create_graph: bool = True) -> HamiltonianTerms:
        """HamiltonianTerms at u [N, m]: three [N] integrals (totals over all ranks, one all-reduce)."""
        d, pw = self.data, self.pw
        self.evaluations += 1
        parts = [u.new_zeros(u.shape[0])] * 3
        with pw.reducer.guard() as guard:
            sum_states = pw.reducer.sum_states
            # intervals in cache-sized blocks (``PointwiseProblem.point_blocks``): the same numbers, faster
            blocks = [(rows, d if rows == slice(None) else self.restricted(rows).data)
                      for rows in pw.point_blocks(d.times, d.states)]
            pieces = []
            for rows, b in blocks:
                H, f, gx = pw.hamiltonian(b.times, b.states, b.costates, u[rows], with_grad_x=need_costate,
                                          create_graph=create_graph)
                state_err = sum_states((f - b.state_slope) ** 2)  # [rows, Q]
                if gx is None:
                    costate_err = torch.zeros_like(state_err)
                else:
                    costate_err = sum_states((gx + b.costate_slope) ** 2)
                w = b.weights
                value = (w * H).sum(-1)
                correction = hinge_correction(pw, w, b.lengths, b.times, b.states, u[rows])
                if correction is not None:
                    value = value + correction
                pieces.append([value, (w * state_err).sum(-1), (w * costate_err).sum(-1)])
            parts = pieces[0] if len(pieces) == 1 else [torch.cat(column) for column in zip(*pieces)]
        hamiltonian, state_error, costate_error = pw.reducer.totals(*parts, error=guard.error)
        if self.penalty is not None:
            hamiltonian = hamiltonian - self.penalty_value(u)
        return HamiltonianTerms(hamiltonian, state_error, costate_error)

    def smooth(self, u: torch.Tensor) -> torch.Tensor:
        """The objective without the control penalty [N] (differentiable in u; this rank's part in a
        distributed solve, see the class)."""
        d = self.data
        self.evaluations += 1
        if self.rho == 0.0:
            H, _, _ = self.pw.hamiltonian(d.times, d.states, d.costates, u)
            value = (d.weights * H).sum(-1)
        else:
            H, f, gx = self.pw.hamiltonian(d.times, d.states, d.costates, u, with_grad_x=True, create_graph=True)
            sum_states = self.pw.reducer.sum_states
            errors = sum_states((f - d.state_slope) ** 2) + sum_states((gx + d.costate_slope) ** 2)
            value = (d.weights * (H - 0.5 * self.rho * errors)).sum(-1)
        correction = hinge_correction(self.pw, d.weights, d.lengths, d.times, d.states, u)
        if correction is not None:
            value = value + correction
        if self.eps and self.pw.reducer.keeps_shared_terms:  # per interval, not per sample: counted once
            value = value - self.eps * d.lengths * ((u - d.controls) ** 2).sum(-1)
        return value

    def total(self, *parts: torch.Tensor, error: Optional[BaseException] = None) -> Tuple[torch.Tensor, ...]:
        """Parts computed from ``smooth`` (values, gradients, curvatures) made totals over all ranks in one
        all-reduce (the identity in one process): what a maximiser that differentiates ``smooth`` itself
        calls before using the numbers (``ClosedForm``). ``error``: raised on every rank (see
        ``SampleReducer.totals``)."""
        return self.pw.reducer.totals(*parts, error=error)

    #: Elements (quadrature points x samples x state components) evaluated at once by
    #: ``value_and_grad`` and ``curvature``. The objective is a sum of independent rows, and
    #: each row a sum over the samples, so it is taken in blocks of intervals and, when one
    #: interval is too big, of samples: tensors stay cache-sized instead of hundreds of MB
    #: (the sine network: 6x faster maximisation at K = 10000, 4x at K = 100000, measured);
    #: with few samples all intervals form one block.
    block_elements = 2 ** 17

    def blocks(self) -> list:
        """(rows, samples) slices covering the N intervals and K samples, each block with at
        most ``block_elements`` elements (at least one interval and one sample)."""
        d = self.data
        N, Q, K = d.states.shape[0], d.states.shape[1], d.states.shape[-2]
        per_sample = Q * d.states[0, 0].numel() // K  # elements per sample and interval
        samples = min(K, max(1, self.block_elements // per_sample))
        rows = max(1, self.block_elements // (per_sample * samples))
        return [(slice(r, min(r + rows, N)), slice(k, min(k + samples, K)))
                for r in range(0, N, rows) for k in range(0, K, samples)]

    def restricted(self, rows: slice, samples: slice = slice(None)) -> "IntervalHamiltonian":
        """The objective of the intervals ``rows`` and samples ``samples`` only; summed over the
        sample blocks it gives the whole (the SQH term, which is per interval, lives in the
        block holding the first sample)."""
        d = self.data
        per_sample = lambda a: a[rows][..., samples, :]  # noqa: E731  the [N, Q, K, n] fields
        part = IntervalData(d.times[rows], d.weights[rows], d.lengths[rows], per_sample(d.states),
                            per_sample(d.costates), per_sample(d.state_slope), per_sample(d.costate_slope),
                            d.controls[rows], d.hamiltonian[rows])
        first = samples.start is None or samples.start == 0
        return IntervalHamiltonian(self.pw, part, self.rho, self.eps if first else 0.0)

    def value_and_grad(self, u: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The smooth part [N] and its gradient in u [N, m], block by block (see ``blocks``)."""
        self.evaluations += 1
        values = u.new_zeros(u.shape[0])
        grads = torch.zeros_like(u)
        with self.pw.reducer.guard() as guard:
            for rows, samples in self.blocks():
                v = u[rows].detach().requires_grad_(True)
                with torch.enable_grad():
                    value = self.restricted(rows, samples).smooth(v)
                    (g,) = torch.autograd.grad(value.sum(), v)
                values[rows] += value.detach()
                grads[rows] += g
        # Value and gradient in one buffer: every rank's line search sees the same numbers and takes the
        # same branch (an L-BFGS whose value is reduced apart from its gradient drifts apart across ranks).
        return self.pw.reducer.totals(values, grads, error=guard.error)

    def curvature(self, u: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """d' (-Hessian of the smooth part) d per row [N] at u, by Hessian-vector products."""
        self.evaluations += 1
        out = u.new_zeros(u.shape[0])
        with self.pw.reducer.guard() as guard:
            for rows, samples in self.blocks():
                v = u[rows].detach().requires_grad_(True)
                with torch.enable_grad():
                    value = self.restricted(rows, samples).smooth(v)
                    (g,) = torch.autograd.grad(value.sum(), v, create_graph=True)
                    if not g.requires_grad:  # the objective is linear in u
                        continue
                    (hd,) = torch.autograd.grad((g * d[rows]).sum(), v, allow_unused=True)
                if hd is not None:
                    out[rows] -= (d[rows] * hd).sum(-1).detach()
        return self.pw.reducer.totals(out, error=guard.error)[0]

    def penalty_value(self, u: torch.Tensor) -> torch.Tensor:
        """h_n * penalty(u_n) [N] (zeros without a penalty); u may carry leading candidate dims."""
        if self.penalty is None:
            return u.new_zeros(u.shape[:-1])
        return self.data.lengths * self.penalty.value(u)

    def __call__(self, u: torch.Tensor) -> torch.Tensor:
        """The whole objective at u [N, m] -> [N] (the total over all ranks, detached, in a distributed solve)."""
        reducer = self.pw.reducer
        if not reducer.distributed:
            return self.smooth(u) - self.penalty_value(u)
        value = u.new_zeros(u.shape[:-1])
        with reducer.guard() as guard:
            value = self.smooth(u).detach()
        return reducer.totals(value, error=guard.error)[0] - self.penalty_value(u)

    def candidates(self, U: torch.Tensor) -> torch.Tensor:
        """The objective for C candidate controls per interval: U [C, N, m] -> [C, N].

        The interval data are repeated C times (one batched evaluation, no loop).
        """
        C, N, m = U.shape
        d = self.data
        rep = lambda a: a.unsqueeze(0).expand((C,) + a.shape).reshape((C * N,) + a.shape[1:])  # noqa: E731
        big = IntervalData(rep(d.times), rep(d.weights), rep(d.lengths), rep(d.states), rep(d.costates),
                           rep(d.state_slope), rep(d.costate_slope), rep(d.controls), rep(d.hamiltonian))
        other = IntervalHamiltonian(self.pw, big, self.rho, self.eps)
        with torch.enable_grad() if self.rho else torch.no_grad():
            values = other(U.reshape(C * N, m))
        self.evaluations += 1
        return values.detach().reshape(C, N)

    def gradient(self, u: torch.Tensor) -> torch.Tensor:
        """grad_u of the smooth part at u, [N, m]; with rho = eps = 0 at u = u^k this is -dJ/du_n
        for the smooth part of J (paper Prop. 2)."""
        return self.value_and_grad(u)[1]
