"""The parallel-in-time forward sweep: multiple shooting over the mesh intervals, Newton on the node defects.

The sequential forward sweep (``forward.py``) restarts the adaptive solver at every node, where the
control jumps: at least 6 dopri5 stages per interval, N intervals one after the other, each stage a few
tiny tensor ops. With one trajectory (K = 1) that is ~1,500 right-hand-side evaluations of torch
dispatch per sweep, and it bounds an iteration (docs/benchmarks.md, section 1).

Multiple shooting makes the N intervals independent. With start values S_n at the nodes (S_0 = x0),
interval n is integrated from S_n on its own: on the common axis sigma in [0, 1], t = t_n + sigma h_n,
dX/dsigma = h_n f(t, X, u_n), all intervals as one batch in one adaptive solve (the step control takes
the worst interval's error, as the parallel co-state does). The ends phi_n(S_n) must meet the next
start values; Newton on the defects d_{n+1} = phi_n(S_n) - S_{n+1} gives the correction

    delta_0 = 0,   delta_{n+1} = Phi_n delta_n + d_{n+1},   S <- S + delta,

with Phi_n = d phi_n / d S_n, a linear recursion chained by the affine prefix scan (``scan.py``).
Phi_n comes from the same solve: n more copies of every interval start at S_n + eps e_i and are
stepped with the nominal one (the same steps: internal numerical differentiation by forward
differences, eps = sqrt(machine epsilon) |S|, the derivative of the discrete scheme to ~1e-7), one f
call per stage on a batch (1 + n) times larger; in float32 and below by central differences (2n
copies at S_n +- eps e_i, eps = machine epsilon^(1/3)). (Central differences, 2n copies, give Phi to ~1e-10, the
same J to 1e-11 (catalyst to 2e-8: its singular arc) and cost 3-20 % more per solve at K = 1, 20-35 % at
K = 5-10, measured.)
An inexact Phi changes how fast Newton converges, never what it converges to: a Newton step leaves
~1e-7 of the defect it started from (the Jacobian's error) plus a term of second order. A sweep is
accepted when every defect is within 0.1 of the solver's own error tolerance, atol + rtol |X|, or
when the defect the next Newton step would leave, predicted from the contraction factor
theta = d_{k+1} / d_k of earlier steps that contracted at least 100-fold, from defects no smaller
than the current one (``NewtonRate``, carried by ``ForwardSweep.newton_rate``, times a safety factor
10), is. What it returns
(the nodes, J, the samples inside the intervals) is that last integration moved by its Newton
correction to first order, from the same perturbed copies: no further integration, and an error of
second order in the defects, so that J does not carry Newton's residual (0.1 of the tolerance at
each node adds up to noise of 6e-11 in van der Pol's J, where E-MSA compares decreases of 1e-12
near an optimum). Its error is then the tolerance's: on Rayleigh at N = 200 (rtol 1e-9) J is 3.5e-9
from scipy's DOP853 at 1e-12, 3.9e-10 at rtol 1e-10. The sequential sweep, whose steps are cut
at every node (over-resolved for this N), is at 1.2e-10 and 2.4e-11: where J is wanted to more
digits than rtol promises, lower rtol or ``ShootingPolicy(enabled=False)``.

Start values: the previous iterate's nodes, moved by the linear prediction of what the new
controls change (``predict_nodes``: the previous sweep's transition matrices chained with the change
of f at its Gauss points; one batched evaluation and a scan), so that Newton starts with defects of
second order in the interval length and the control change (usually one integration once the rate is
known, else two: a Newton step and the check). When
Newton does not meet the tolerance in a few integrations, or diverges (or an integration fails,
e.g. a trial control that blows the state up) the sweep returns None and the caller runs the
sequential sweep: the result is then exactly the sequential one. ``ShootingPolicy`` says when to try.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from .flows import all_intervals_options
from .forward import StateSolution, state_solution
from .ode import ODE, EvaluationBudget, IntegrationFailure
from .pointwise import PointwiseProblem
from .scan import affine_prefix_scan

__all__ = ["ShootingPolicy", "NewtonRate", "solve_state_shooting", "predict_nodes"]


@dataclass(frozen=True)
class NewtonRate:
    """What the Newton steps of earlier shooting sweeps showed (defects in tolerance units): ``steps``,
    pairs (d_k, theta_k) of the defect a step started from and its contraction factor d_{k+1} / d_k, for
    the steps that contracted at least 100-fold; only the pairs no other pair beats in both (a larger
    d_k and a smaller theta_k) are kept, by increasing d_k. Immutable; it travels with the sweeps
    (``ForwardSweep.newton_rate``).

    What a step from d leaves is a d + c d^2: a, the differenced Jacobian's relative error (forward
    differences: ~1e-7), and c, the nonlinearity. A step seen from d_k >= d bounds it by theta_k d,
    since a + c d <= a + c d_k = theta_k; the tightest such bound is the prediction (a simplified Newton
    iteration stops on its contraction factor, Hairer & Wanner, Solving ODEs II, IV.8, eq. (8.10)-
    (8.12)). No prediction beyond the largest d_k seen. A quadratic model d_{k+1} / d_k^2 would
    under-predict the linear part at a defect 10x below the one it was seen from; a single largest
    factor would over-predict the quadratic part at a small defect by the ratio of the two defects.
    Only steps that contract at least 100-fold count (the slow first steps of Newton from far away
    would never let a sweep settle)."""

    steps: Tuple[Tuple[float, float], ...] = ()

    #: steps from a defect in this range count: below it the floor of rounding and of the differenced
    #: Phi dominates the next defect, above it the linearisation is not trusted
    OBSERVED = (10.0, 1e6)
    #: the contraction a step must show to count
    CONTRACTION = 1e-2
    #: safety factor on the predicted defect
    SAFETY = 10.0

    def observe(self, before: float, after: float) -> "NewtonRate":
        """The record with one more Newton step, from defect ``before`` to ``after``."""
        low, high = self.OBSERVED
        if not (low <= before <= high and after <= self.CONTRACTION * before):
            return self
        new = (before, after / before)
        if any(d >= new[0] and theta <= new[1] for d, theta in self.steps):
            return self
        kept = [(d, theta) for d, theta in self.steps if not (new[0] >= d and new[1] <= theta)]
        return NewtonRate(tuple(sorted(kept + [new])))

    def settles(self, size: float, accept: float) -> bool:
        """Whether one Newton step from defect ``size`` is predicted to leave at most ``accept``."""
        return any(d >= size and self.SAFETY * theta * size <= accept for d, theta in self.steps)


@dataclass(frozen=True)
class ShootingPolicy:
    """When the forward sweep runs by multiple shooting (``Sweeper.forward_policy``).

    With an adaptive method, for a sweep that has start values (the solver's trial sweeps, from the
    current iterate's nodes), not differentiable (the gradient baselines back-propagate through the
    sequential solver's steps), and while the batch per interval, K n (n + 1) numbers, stays at most
    ``max_batch``: like the parallel co-state, all intervals at once pays where the per-step overhead
    of N sequential restarts dominates (few samples, a small state). Measured at N = 200 (one
    thread, a sweep from the nodes of controls 0.01 away; scripts/bench_shooting.py, docs/benchmarks.md
    section 6): lqr_samples (n = 2) 0.07x the sequential sweep's time at K = 1, 0.17x at K = 10,
    0.37x at K = 30 (batch 180), 0.99x at K = 100 (600); the sine network (n = 5) 0.10x at K = 1,
    0.20x at K = 3, 0.55x at K = 10 (300), 1.45x at K = 30 (900). Both ratios grow about linearly
    in K and cross 1 near batch 600; the limit keeps a margin (lqr_samples K <= 80, sine K <= 16).

    ``max_newton`` integrations per sweep at most (``cold_newton`` from a cold start, the solver's
    first sweep: x0 held at every node); a sweep is accepted when every defect is at most ``accept``
    times the solver's local error tolerance, and abandoned when the largest scaled defect grows
    past ``max_growth`` times the smallest so far. Newton need not contract at every step: from the
    cold start at N = 200 lqr and catalyst took 2 and 1 Newton steps, van der Pol 6 and Rayleigh 9,
    its defect growing from 0.09 to 5.9 before it converged (160 and 300 ms against 680 ms
    sequential); on Rayleigh's trial sweeps 4 integrations fell back 5 times in 19 iterations
    (2.8 s of 5 s), 8 never.
    ``ShootingPolicy(enabled=False)`` keeps every sweep sequential.
    """

    enabled: bool = True
    max_batch: int = 480
    max_newton: int = 8
    cold_newton: int = 12
    max_growth: float = 1e3
    accept: float = 0.1

    def applies(self, pointwise: PointwiseProblem, ode: ODE, *, differentiable: bool) -> bool:
        """Whether a sweep that has start values runs by multiple shooting."""
        K, n = pointwise.num_samples, pointwise.state_dim
        return (self.enabled and ode.adaptive and not differentiable
                and K * n * (n + 1) <= self.max_batch)


class _OverBudget(Exception):
    """The attempt used its share of the sweep's evaluation budget."""


def solve_state_shooting(pw: PointwiseProblem, ode: ODE, u: torch.Tensor, budget: EvaluationBudget,
                         start: torch.Tensor, *, fractions: Optional[torch.Tensor] = None, max_newton: int = 4,
                         max_growth: float = 1e3, accept: float = 0.1,
                         newton_rate: NewtonRate = NewtonRate()) -> Optional[StateSolution]:
    """The forward sweep for controls u [N, m] by multiple shooting from start values ``start``
    [N + 1, K, n] (the nodes of a nearby trajectory; entry 0 is replaced by x0), or None when Newton
    did not meet the tolerance within ``max_newton`` integrations (see the module).

    ``fractions`` [R] as in ``forward.solve_state``. The attempt's evaluations are added to
    ``budget``; it gives up (None) past half of what is left of it, so that the sequential sweep
    that follows still has the other half and, if the controls do blow the state up, reports the
    time where (which an all-intervals solve has no single value of). Runs without autograd graph.

    The result is the Newton iterate after the last integration, to first order (nodes, J and the
    samples moved by the correction delta, with the transition matrices of that integration). It is
    accepted when the largest scaled defect ``size`` is at most ``accept``, or when the defect Newton
    would leave after it is predicted to be (``NewtonRate.settles``: from the Newton steps of the sweeps
    this one descends from, ``newton_rate``, and of this one). The returned StateSolution carries that
    record, updated with this sweep's steps.
    """
    mesh = ode.mesh
    N, K, n = mesh.numel() - 1, pw.num_samples, pw.state_dim
    starts, h = mesh[:-1], mesh[1:] - mesh[:-1]
    scale_h = h.view(N, 1, 1, 1)

    share, used = (budget.limit - budget.evaluations) // 2, 0
    # float64: forward differences (Phi to ~1e-7, n copies); in a lower precision their sqrt(eps) error
    # (3e-4 in float32) slows Newton down (measured: 25-30 % more forward evaluations), central ones
    # (2n copies, eps^(2/3)) do not
    central = torch.finfo(mesh.dtype).eps > 1e-10
    copies = 1 + (2 * n if central else n)
    evaluate, reads_time = pw.with_controls(u, torch.Size((N, copies, K, n)))
    start0, h0 = starts[0], h[0]

    def rhs(sigma, Y):  # Y [N, copies, K, n (+1)]: the nominal start and the perturbed ones per interval
        nonlocal used
        used += 1
        if used > share:
            raise _OverBudget
        # [N], each interval at its own time; interval 0's time alone where f and L do not read it
        t = starts + sigma * h if reads_time else start0 + sigma * h0
        if not pw.has_running_cost:
            return scale_h * evaluate(t, Y)
        f, L = evaluate(t, Y[..., :n])
        return scale_h * torch.cat([f, L.unsqueeze(-1)], dim=-1)

    options = all_intervals_options(ode, N, copies, kind=None if pw.has_hinges else "shooting")
    inner = mesh.new_zeros(0) if fractions is None else fractions.to(mesh.dtype)
    unit = torch.cat([mesh.new_zeros(1), inner, mesh.new_ones(1)])
    eps = torch.finfo(mesh.dtype).eps ** (1 / 3 if central else 1 / 2)  # truncation and rounding balanced
    component = torch.arange(n, device=mesh.device)
    plus = 1 + component
    low = slice(1 + n, 1 + 2 * n) if central else slice(0, 1)  # what the copies 1..n are differenced with
    S = torch.cat([pw.x0.unsqueeze(0), start[1:].to(pw.x0)])  # [N + 1, K, n]
    smallest, previous = math.inf, None
    try:  # the attempt's evaluations count, whatever its outcome
        with torch.no_grad():
            for _ in range(max_newton):
                Y0 = S[:-1].unsqueeze(1).repeat(1, copies, 1, 1)  # [N, copies, K, n]
                # copy 1 + i of interval j starts at S_j + eps_i e_i (and copy 1 + n + i at S_j - eps_i e_i)
                offset = eps * S[:-1].abs().clamp_min(1.0)  # [N, K, n]
                bumped, lowered = S[:-1] + offset, (S[:-1] - offset if central else S[:-1])
                Y0[:, plus, :, component] = bumped.permute(2, 0, 1)
                if central:
                    Y0[:, plus + n, :, component] = lowered.permute(2, 0, 1)
                width = bumped - lowered  # the widths as represented (exact differences of the two starts)
                if pw.has_running_cost:
                    Y0 = torch.cat([Y0, Y0.new_zeros(N, copies, K, 1)], dim=-1)
                try:
                    Ys = ode.solve(rhs, Y0, unit, options=options)  # [R + 2, N, copies, K, n (+1)]
                except (IntegrationFailure, _OverBudget):
                    return None
                end = Ys[-1]
                X_end = end[:, 0, :, :n]  # [N, K, n]
                defect = X_end - S[1:]
                # Phi_j[:, a, i] = d X_end_a / d S_i from the perturbed copies: [N, K, n, n]
                Phi = (end[:, 1:1 + n, :, :n] - end[:, low, :, :n]).permute(0, 2, 3, 1) / width.unsqueeze(-2)
                tolerance = ode.atol + ode.rtol * torch.maximum(X_end.abs(), S[1:].abs())
                size = float((defect.abs() / tolerance).amax())  # one host sync per Newton step
                if not math.isfinite(size) or size > max_growth * smallest:
                    return None
                if previous is not None:
                    newton_rate = newton_rate.observe(previous, size)
                _, delta = affine_prefix_scan(Phi, defect)  # delta_{j+1} = Phi_j delta_j + d_{j+1}
                # Accept: the defects are within a fraction of the tolerance, or what the Newton step
                # delta would leave is (Hairer & Wanner, Solving ODEs II, IV.8: a simplified Newton
                # iteration stops on the contraction rate of the previous steps, eq. (8.10)-(8.12)).
                if size <= accept or newton_rate.settles(size, accept):
                    return _corrected(pw, mesh, u, S, delta, Ys, Phi, width, low, newton_rate)
                smallest, previous = min(smallest, size), size
                S = torch.cat([S[:1], S[1:] + delta])
        return None
    finally:
        budget.evaluations += used


def _corrected(pw: PointwiseProblem, mesh: torch.Tensor, u: torch.Tensor, S: torch.Tensor, delta: torch.Tensor,
               Ys: torch.Tensor, Phi: torch.Tensor, width: torch.Tensor, low: slice,
               newton_rate: NewtonRate) -> StateSolution:
    """The sweep from the last integration moved by its Newton correction ``delta`` [N, K, n] (the nodes
    1..N), to first order and without another integration: the nodes S + delta, and J and the samples
    inside the intervals moved by their start-value derivatives, differenced from the same perturbed
    copies as Phi. The defects' own error, up to 0.1 of the tolerance at each of the N nodes, would
    otherwise add up in J to noise that swamps the decreases E-MSA compares near an optimum (catalyst
    stalled at optimality 1.4e-5 on it); what is left is second order in the defects."""
    N, K, n = delta.shape
    X = torch.cat([S[:1], S[1:] + delta])
    # the correction at each interval's start over the width of its differences: [N, K, n]
    ratio = torch.cat([delta.new_zeros(1, K, n), delta[:-1]]) / width
    differences = Ys[1:, :, 1:1 + n] - Ys[1:, :, low]  # [R + 1, N, n (copy), K, n (+1)]
    moved = Ys[1:, :, 0] + torch.einsum("rnika,nki->rnka", differences, ratio)  # [R + 1, N, K, n (+1)]
    running = moved[-1, :, :, n].sum(0) if pw.has_running_cost else X.new_zeros(K)
    interior = moved[:-1, ..., :n].transpose(0, 1)  # [N, R, K, n]
    return state_solution(pw, mesh, u, X, running, interior, Phi)._replace(newton_rate=newton_rate)


def predict_nodes(pw: PointwiseProblem, mesh: torch.Tensor, nodes: torch.Tensor, transitions: torch.Tensor,
                  gauss_states: torch.Tensor, gauss_fractions: torch.Tensor, gauss_weights: torch.Tensor,
                  u_old: torch.Tensor, u_new: torch.Tensor) -> torch.Tensor:
    """Start values for the sweep of ``u_new`` [N, m] from the sweep of ``u_old``: its nodes [N + 1, K, n],
    transition matrices [N, K, n, n] and X at the Gauss points [N, Q, K, n].

    To first order the new trajectory is X + delta with delta_{n+1} = Phi_n delta_n + b_n,
    b_n = int over interval n of Phi(t_{n+1}, s) (f(s, X, u_new) - f(s, X, u_old)) ds, which the
    Gauss rule takes with Phi(t_{n+1}, s) ~ I + (1 - c)(Phi_n - I) at s = t_n + c h_n (linear between
    its two ends): the defects Newton starts from shrink from O(h |du|) to O(h^3 |du| + |du|^2).
    Returns the predicted nodes [N + 1, K, n].
    """
    with torch.no_grad():
        N = mesh.numel() - 1
        h = mesh[1:] - mesh[:-1]
        times = mesh[:-1, None] + h[:, None] * gauss_fractions  # [N, Q]
        Q = times.shape[1]
        index = torch.arange(N, device=mesh.device).repeat_interleave(Q)
        X = gauss_states.reshape((N * Q,) + gauss_states.shape[2:])
        change = (pw.dynamics(times.reshape(-1), X, u_new[index]) - pw.dynamics(times.reshape(-1), X, u_old[index]))
        change = change.view(gauss_states.shape)  # [N, Q, K, n]
        # Phi(t_{n+1}, s) ~ I + (1 - c)(Phi_n - I) at s = t_n + c h_n (linear in c between s = t_{n+1} and s = t_n)
        carried = torch.einsum("nkab,nqkb->nqka", transitions, change) - change
        change = change + (1 - gauss_fractions).view(1, Q, 1, 1) * carried
        b = (gauss_weights.view(1, Q, 1, 1) * change).sum(1) * h.view(N, 1, 1)
        _, delta = affine_prefix_scan(transitions, b)
        return torch.cat([nodes[:1], nodes[1:] + delta])
