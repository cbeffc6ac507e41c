"""Batched maximisers of the interval Hamiltonians (docs/theory.md, engine step 5).

The objective is separable over the N intervals, so every maximiser works on
the [N, m] control tensor at once: one evaluation of the objective serves all
rows (no Python loop over intervals).

Two protocols are the seams of this module:

* ``IntervalObjective``: what a maximiser may ask of the objective it
  maximises (``hamiltonian.IntervalHamiltonian`` implements it);
* ``Maximiser``: ``maximise(objective, controls, generator)`` returning a
  ``MaximiserResult``, or None for "I cannot handle this objective" (the closed
  form on an objective that is not a separable quadratic, L-BFGS on an objective
  with a non-smooth penalty).

``MAXIMISERS`` maps names to factories. A control set names, in order, the
maximisers that can handle it (``ControlSet.maximisers(penalty)``), and
``HamiltonianMaximiser`` tries them in that order. A new maximiser is one class
registered here; a new control set is one class in controls.py naming the
maximisers it can use (docs/guide.md, "Extending: a new control set").

Bounds (a Box; Reals is the unbounded case) are handled inside ``ProjectedLBFGS``
by the projected quasi-Newton method of Kim, Sra and Dhillon (2010): variables
at a bound whose gradient pushes outwards are held fixed, the L-BFGS direction
is taken in the others, and the backtracking line search runs along the
projected path P(u + a d). The result is in U by construction, not clipped
afterwards.
"""
from __future__ import annotations

from typing import Callable, Dict, NamedTuple, Optional, Protocol, Tuple, runtime_checkable

import torch

from ..controls import ControlSet, Reals

__all__ = ["IntervalObjective", "Maximiser", "MaximiserResult", "MAXIMISERS", "ProjectedLBFGS", "ProximalGradient",
           "ClosedForm", "Enumeration", "UserMaximiser", "HamiltonianMaximiser", "MaximisationData",
           "perturbed_start"]


class MaximiserResult(NamedTuple):
    controls: torch.Tensor  # [N, m]
    value: torch.Tensor  # objective at controls [N]
    iterations: int
    evaluations: int


@runtime_checkable
class IntervalObjective(Protocol):
    """What a maximiser may call: the objective of all N intervals at once, to be maximised over u [N, m].

    Implementers (``hamiltonian.IntervalHamiltonian`` is the one the solver uses) provide:

    * ``objective(u [N, m]) -> [N]``: the total objective of every interval,
      ``smooth(u) - penalty_value(u)``.
    * ``smooth(u [N, m]) -> [N]``: the part without the control penalty,
      differentiable in u (autograd), what gradient-based maximisers see.
    * ``value_and_grad(u) -> (values [N], gradient [N, m])``: ``smooth`` and its
      gradient in u, detached.
    * ``curvature(u, d [N, m]) -> [N]``: d' (-Hessian of ``smooth``) d per row at u.
    * ``candidates(U [C, N, m]) -> [C, N]``: the total objective for C candidate
      controls per interval in one batched evaluation (detached).
    * ``penalty_value(u [..., N, m]) -> [..., N]``: h_n * penalty(u_n), zeros without a
      penalty; u may carry leading candidate dimensions.
    * ``penalty``: the problem's ``ControlPenalty`` (``pmp.L1`` / ``pmp.L0``) or None.
    * ``data``: at least ``data.controls`` (u^k [N, m], the start of every
      maximisation) and ``data.lengths`` (interval lengths h_n [N]); the solver's
      ``IntervalData`` also carries the quadrature points, states and co-states
      that a ``UserSet`` maximiser receives.
    * ``rho``, ``eps``: the E-MSA and SQH proximity weights already inside ``smooth``
      (for information; user maximisers receive them).
    * optional ``preconditioner(u [N, m])``: a positive definite approximation A of -Hessian of
      ``smooth`` at u, ``ProjectedLBFGS``'s initial inverse Hessian A^-1 (built once per
      maximisation): either its diagonal, a tensor [N, m] > 0, or a function ``solve(q [N, m])``
      returning A^-1 q row by row (a new tensor); objectives whose parameters are strongly
      coupled or differ in curvature by orders of magnitude (a layer's weights over correlated
      inputs, its biases) gain most from it.
    * optional ``trial_values(u [N, m]) -> [N]``: the values of ``value_and_grad`` alone, for an
      objective whose gradient costs more than its value and whose ``value_and_grad`` at the same
      u then reuses what the values computed: ``ProjectedLBFGS`` tries its line search's steps
      with it and asks for the gradient at the accepted step only.
    * optional ``total(*parts, error=None) -> tuple``: in a distributed solve
      (docs/distributed.md) ``smooth`` is one rank's part of the objective (its samples)
      while every other member returns totals over all ranks; a maximiser that
      differentiates ``smooth`` itself passes what it computed from it through ``total``
      (one all-reduce) before using it, with ``error`` the exception it caught computing
      them (zeros of the same shapes then), which ``total`` raises on every rank. An
      objective without it is whole (one process).

    Rows are independent: a maximiser may change one row without affecting the others.
    """

    penalty: object
    data: object
    rho: float
    eps: float

    def __call__(self, u: torch.Tensor) -> torch.Tensor: ...

    def smooth(self, u: torch.Tensor) -> torch.Tensor: ...

    def value_and_grad(self, u: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]: ...

    def curvature(self, u: torch.Tensor, d: torch.Tensor) -> torch.Tensor: ...

    def candidates(self, U: torch.Tensor) -> torch.Tensor: ...

    def penalty_value(self, u: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class Maximiser(Protocol):
    """One way of maximising an ``IntervalObjective`` over a control set.

    Implementers provide:

    * ``name``: the key under which it is registered in ``MAXIMISERS``, what
      ``ControlSet.maximisers`` names, what ``solve(maximiser=...)`` forces and what
      ``Solution.settings["maximisers_used"]`` counts.
    * ``maximise(objective, controls, generator=None) -> MaximiserResult | None``:
      maximise every row of ``objective`` over ``controls`` (a ``ControlSet``),
      starting from ``objective.data.controls``; the returned controls [N, m] must lie
      in the set. ``generator`` is the solve's ``torch.Generator`` (for any random
      part, e.g. the start perturbation), or None. Return None when this maximiser
      cannot handle the objective (e.g. the closed form when the objective is not a
      separable concave quadratic): the next maximiser the control set names is tried,
      and this one is not asked again during the solve.

    Register a factory ``factory(*, max_iter: int, perturb: float) -> Maximiser`` in
    ``MAXIMISERS`` (a class with that constructor is one).
    """

    name: str

    def maximise(self, objective: IntervalObjective, controls: ControlSet,
                 generator: Optional[torch.Generator] = None) -> Optional[MaximiserResult]: ...


def perturbed_start(objective: IntervalObjective, controls: ControlSet, perturb: float,
                    generator: Optional[torch.Generator]) -> torch.Tensor:
    """The start u^k of a maximisation, plus uniform noise U(-perturb, perturb) when perturb > 0
    (drawn from ``generator``), projected onto the control set."""
    x = objective.data.controls.detach().clone()
    if perturb > 0:
        on_cpu = generator is None or generator.device.type == "cpu"
        noise = torch.rand(x.shape, generator=generator, dtype=x.dtype, device="cpu" if on_cpu else x.device)
        x = x + (2 * noise.to(x.device) - 1) * perturb
    return controls.project(x)


class ProjectedLBFGS:
    """Maximise a smooth objective row by row over u [N, m] in a box (Reals is the unbounded box).

    Each row is its own L-BFGS, with per-row curvature pairs, step lengths and
    convergence flags. Returns None for an objective with a control penalty (not smooth).

    Args:
        max_iter: iterations (each one objective + gradient evaluation, more when
            the line search backtracks). The paper's reference code uses 10.
        history: number of curvature pairs kept per row.
        gtol: stop a row when its projected gradient is below ``gtol`` times its
            projected gradient at the start.
        ftol: ... or when its objective changed by less than ``ftol * (1 + |value|)``.
        rtol: ... or when its last step increased the objective by at most ``rtol`` times its increase
            since the start (0: never; for well-preconditioned objectives, whose first steps take
            nearly all of the increase the iterations can give).
        newton_start: with the objective's ``preconditioner``, make the first step its Newton step
            (a step length of 1, backtracked like any other) instead of the minimiser along it from one
            more evaluation (``curvature``): for a preconditioner that models the whole quadratic.
        perturb: half-width a of uniform noise U(-a, a) added to the starting point
            (the reference code uses 0.005; it breaks the symmetry of an all-zero start).
    """

    name = "lbfgs"

    def __init__(self, *, max_iter: int = 50, history: int = 10, gtol: float = 1e-9, ftol: float = 1e-14,
                 rtol: float = 0.0, newton_start: bool = False, perturb: float = 0.0, max_backtracks: int = 30):
        if int(max_iter) < 1:
            raise ValueError(f"maximiser `max_iter` must be >= 1, got {max_iter}")
        if perturb < 0:
            raise ValueError(f"`perturb` must be >= 0 (a half-width), got {perturb}")
        if not 0 <= rtol < 1:
            raise ValueError(f"`rtol` must be in [0, 1), got {rtol}")
        self.max_iter, self.history = int(max_iter), int(history)
        self.gtol, self.ftol, self.rtol, self.perturb = float(gtol), float(ftol), float(rtol), float(perturb)
        self.newton_start = bool(newton_start)
        self.max_backtracks = int(max_backtracks)

    def maximise(self, objective: IntervalObjective, controls: ControlSet,
                 generator: Optional[torch.Generator] = None) -> Optional[MaximiserResult]:
        if objective.penalty is not None:
            return None
        start = objective.data.controls
        low, high = controls.bounds(start.dtype, start.device)
        project = controls.project
        evals = [0]

        def value_grad(v):  # minimise phi = -objective
            evals[0] += 1
            value, g = objective.value_and_grad(v)
            return -value, -g

        trial_values = getattr(objective, "trial_values", None)

        def trial(v):  # phi at a line search's step, with its gradient unless the objective has trial values
            if trial_values is None:
                return value_grad(v)
            evals[0] += 1
            return -trial_values(v), None

        x = perturbed_start(objective, controls, self.perturb, generator)
        f, g = value_grad(x)
        f_start = f
        N = x.shape[0]
        # Reals (or a box without finite bounds): no bound can hold a variable, every one is free
        unbounded = isinstance(controls, Reals) or _unbounded(low, high)
        # the preconditioner (None: the identity), fixed for this maximisation
        preconditioner = getattr(objective, "preconditioner", None)
        solve = preconditioner(start) if preconditioner is not None else None
        if isinstance(solve, torch.Tensor):  # a diagonal D: steps scaled by 1 / D
            solve = _Diagonal(solve)
        # curvature pairs [N, m] and (r, r s, r y) with r = 1/(s.y) [N, 1] (0 where a row skipped the pair)
        S, Y, R = [], [], []
        active = torch.ones(N, dtype=torch.bool, device=x.device)
        projected_gradient = (lambda x, g: g.abs()) if unbounded else (lambda x, g: _projected_gradient(x, g, project))
        pg0 = projected_gradient(x, g).amax(-1).clamp_min(torch.finfo(x.dtype).tiny)
        iterations = 0
        for iterations in range(1, self.max_iter + 1):
            if unbounded:
                g_free, on_free = g, (lambda v: v)
            else:
                free = ~(((x <= low) & (g > 0)) | ((x >= high) & (g < 0)))
                g_free, on_free = g * free, (lambda v, free=free: v * free)
            d = on_free(-_two_loop(g_free, S, Y, R, solve))
            slope = (g * d).sum(-1)
            steepest = slope >= 0  # not a descent direction (or a row with no pairs yet): steepest descent
            if S:
                if bool(steepest.any()):
                    d = torch.where(steepest[:, None], -g_free if solve is None else on_free(-solve(g_free)), d)
            elif solve is not None and self.newton_start:
                d = on_free(-solve(g_free))
            else:
                # First step: the exact minimiser along -g (-P g with a preconditioner P) of the local
                # quadratic model, a = -g'd / d'Hd with d'Hd from one Hessian-vector product (autograd); where
                # that curvature is not positive, 1 / max|g| (with P: 1, the preconditioner's Newton step).
                d = -g_free if solve is None else on_free(-solve(g_free))
                curv = objective.curvature(x, d)
                gd = -(g * d).sum(-1)
                fallback = 1.0 / g.abs().amax(-1).clamp_min(1.0) if solve is None else torch.ones_like(curv)
                alpha = torch.where(curv > 0, gd / torch.where(curv > 0, curv, torch.ones_like(curv)), fallback)
                d = d * alpha[:, None]
                evals[0] += 1
            d = d * active[:, None]
            x_new = project(x + d)
            f_new, g_new = trial(x_new)
            step = None  # the step lengths, formed at the first backtrack
            for _ in range(self.max_backtracks):
                ok = f_new <= f + 1e-4 * (g * (x_new - x)).sum(-1)
                if bool(ok.all()):
                    break
                if step is None:
                    step = torch.ones(N, dtype=x.dtype, device=x.device)
                step = torch.where(ok, step, step * 0.5)
                x_try = torch.where(ok[:, None], x_new, project(x + step[:, None] * d))
                f_new, g_new = trial(x_try)
                x_new = x_try
            else:
                ok = f_new <= f + 1e-4 * (g * (x_new - x)).sum(-1)
            all_ok = bool(ok.all())
            if not all_ok:
                # Rows without an acceptable step keep their point and stop.
                x_new = torch.where(ok[:, None], x_new, x)
                f_new = torch.where(ok, f_new, f)
                active = active & ok
            small_change = (f - f_new).abs() <= self.ftol * (1 + f_new.abs())
            if self.rtol:
                small_change = small_change | ((f - f_new) <= self.rtol * (f_start - f_new))
            active = active & ~small_change
            if g_new is None:
                if iterations == self.max_iter or not bool(active.any()):
                    # no iteration follows: the gradient at the accepted step would go unused
                    x, f = x_new, f_new
                    break
                # the gradient at the accepted step (the values stay the trial's; counted with it)
                g_new = -objective.value_and_grad(x_new)[1]
            if not all_ok:
                g_new = torch.where(ok[:, None], g_new, g)
            s, y = x_new - x, g_new - g
            sy = (s * y).sum(-1, keepdim=True)
            keep = sy > 1e-12 * s.norm(dim=-1, keepdim=True) * y.norm(dim=-1, keepdim=True)
            r = torch.where(keep, 1.0 / torch.where(keep, sy, torch.ones_like(sy)), torch.zeros_like(sy))
            S.append(s)
            Y.append(y)
            R.append((r, r * s, r * y))
            if len(S) > self.history:
                S.pop(0), Y.pop(0), R.pop(0)
            x, f, g = x_new, f_new, g_new
            pg = projected_gradient(x, g).amax(-1)
            active = active & ~(pg <= self.gtol * pg0)
            if not bool(active.any()):
                break
        return MaximiserResult(x, -f, iterations, evals[0])


def _projected_gradient(x, g, project):
    return (x - project(x - g)).abs()


class _Diagonal:
    """A diagonal preconditioner D [N, m] as a solve: q -> q / D."""

    def __init__(self, D: torch.Tensor):
        self.D = D

    def __call__(self, q: torch.Tensor) -> torch.Tensor:
        return q / self.D

    def quadratic(self, y: torch.Tensor) -> torch.Tensor:
        """y * y / D (y' D^-1 y before the sum)."""
        return y * y / self.D


def _two_loop(q: torch.Tensor, S, Y, R, solve: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
              ) -> torch.Tensor:
    """H q for the row-wise L-BFGS inverse Hessians given by the pairs (S, Y, R); rows are independent. The
    initial inverse Hessian is gamma I, or gamma P with a preconditioner ``solve``: q -> P q [N, m] (gamma =
    s'y / y'y, s'y / y'P y: Nocedal and Wright, 7.20, in the preconditioned metric). R holds per pair
    (r, r s, r y) with r = 1 / s'y [N, 1] (0 where a row skipped the pair)."""
    # q updated in place (addcmul_) and r folded into the pairs: rows are few and short in a network's layers,
    # so the number of tensor operations, not arithmetic, is the cost
    alphas = []
    q = q.clone()
    for y, (_, rs, _) in zip(reversed(Y), reversed(R)):
        a = (rs * q).sum(-1, keepdim=True)
        q.addcmul_(a, y, value=-1)
        alphas.append(a)
    if S:
        y, r = Y[-1], R[-1][0]
        yy = (y * y if solve is None else solve.quadratic(y) if isinstance(solve, _Diagonal) else y * solve(y)).sum(
            -1, keepdim=True)
        gamma = torch.where(r > 0, 1.0 / (r * yy).clamp_min(torch.finfo(q.dtype).tiny), torch.ones_like(r))
        q = (q if solve is None else solve(q)) * gamma
    elif solve is not None:
        q = solve(q)
    for s, (_, _, ry), a in zip(S, R, reversed(alphas)):
        q.addcmul_(a - (ry * q).sum(-1, keepdim=True), s)
    return q


def _unbounded(low, high) -> bool:
    """Whether the bounds (floats or tensors [m]) are -inf and inf everywhere: nothing to project."""
    inf = float("inf")
    if isinstance(low, torch.Tensor) or isinstance(high, torch.Tensor):
        return bool(((torch.as_tensor(low) == -inf) & (torch.as_tensor(high) == inf)).all())
    return low == -inf and high == inf


class ProximalGradient:
    """Batched proximal gradient ascent for a smooth objective minus an L1 / L0 penalty, over U.

    Each row: u <- prox(u + s grad), the prox of the penalty composed with the control set
    (``ControlSet.prox``: soft or hard thresholding and the box; the projection alone
    without a penalty, which makes this projected gradient ascent, e.g. on a ``Ball``),
    with Barzilai-Borwein steps s and backtracking until the objective (penalty
    included) does not decrease.
    """

    name = "proximal"
    #: step halvings per iteration before a row keeps its point (2^-40 ~ 1e-12 of the BB step)
    max_backtracks = 40

    def __init__(self, *, max_iter: int = 50, ftol: float = 1e-14, perturb: float = 0.0):
        self.max_iter, self.ftol, self.perturb = int(max_iter), float(ftol), float(perturb)

    def maximise(self, objective: IntervalObjective, controls: ControlSet,
                 generator: Optional[torch.Generator] = None) -> MaximiserResult:
        penalty = objective.penalty
        h = objective.data.lengths[:, None]
        evals = [0]

        def step_to(x, g, s):
            return controls.prox(x + s[:, None] * g, s[:, None] * h, penalty)

        def value_grad(x):
            evals[0] += 1
            smooth, g = objective.value_and_grad(x)
            return smooth - objective.penalty_value(x), g

        x = perturbed_start(objective, controls, self.perturb, generator)
        f, g = value_grad(x)
        s = 1.0 / g.abs().amax(-1).clamp_min(1.0)
        iterations = 0
        for iterations in range(1, self.max_iter + 1):
            for _ in range(self.max_backtracks):
                x_new = step_to(x, g, s)
                f_new, g_new = value_grad(x_new)
                ok = f_new >= f - 1e-15 * f.abs()
                if bool(ok.all()):
                    break
                s = torch.where(ok, s, s * 0.5)
            x_new = torch.where(ok[:, None], x_new, x)
            f_new = torch.where(ok, f_new, f)
            g_new = torch.where(ok[:, None], g_new, g)
            dx, dg = x_new - x, g_new - g
            sy = -(dx * dg).sum(-1)  # curvature of -objective along the step
            s = torch.where(sy > 0, (dx * dx).sum(-1) / sy.clamp_min(torch.finfo(x.dtype).tiny), s * 2)
            done = (f_new - f).abs() <= self.ftol * (1 + f_new.abs())
            x, f, g = x_new, f_new, g_new
            if bool(done.all()):
                break
        return MaximiserResult(x, f, iterations, evals[0])


class Enumeration:
    """Exact maximisation over a ``Finite`` set, all intervals at once.

    Every admissible value is a candidate. With few components (|V|^m <=
    ``max_combinations``) all combinations are enumerated (exact for any
    Hamiltonian); otherwise component by component, repeated until nothing changes
    (exact where the Hamiltonian separates over components).
    """

    name = "enumeration"

    def __init__(self, *, max_combinations: int = 64, max_sweeps: int = 20, max_iter: int = 50, perturb: float = 0.0):
        # max_iter and perturb (the factory's arguments) do not apply: the search is exact and starts nowhere
        self.max_combinations, self.max_sweeps = int(max_combinations), int(max_sweeps)

    def maximise(self, objective: IntervalObjective, controls: ControlSet,
                 generator: Optional[torch.Generator] = None) -> MaximiserResult:
        start = objective.data.controls
        values = controls.values.to(dtype=start.dtype, device=start.device)
        N, m = start.shape
        V = values.numel()
        if V ** m <= self.max_combinations:
            grid = torch.cartesian_prod(*[values] * m).reshape(-1, m)  # [V^m, m]
            U = grid[:, None, :].expand(-1, N, m)
            scores = objective.candidates(U)  # [C, N]
            best = scores.argmax(0)
            return MaximiserResult(grid[best], scores.max(0).values, 1, 1)
        u = controls.project(start.clone())
        evaluations, sweeps = 0, 0
        for sweeps in range(1, self.max_sweeps + 1):
            changed = False
            for j in range(m):  # components, not intervals: each step is batched over all intervals
                U = u.unsqueeze(0).repeat(V, 1, 1)
                U[:, :, j] = values[:, None]
                scores = objective.candidates(U)
                evaluations += 1
                choice = values[scores.argmax(0)]
                changed = changed or bool((choice != u[:, j]).any())
                u[:, j] = choice
            if not changed:
                break
        return MaximiserResult(u, objective(u).detach(), sweeps, evaluations)


class ClosedForm:
    """The exact maximiser over a box or R^m when the objective is a separable concave quadratic in u.

    That is the case for control-affine dynamics with a quadratic or no control cost,
    the E-MSA / SQH terms included. The per-component maximiser of the model, with the
    soft (L1) or hard (L0) threshold and the box, is the answer. The model comes from
    the exact gradient and curvature at u^k (autograd); it is verified by one exact
    evaluation, and ``maximise`` returns None when the objective is not such a quadratic.
    """

    name = "closed-form"
    #: agreement of the model's predicted gain with the exact gain, relative to the
    #: objective's scale, below which the objective counts as the quadratic of the model
    rtol = 1e-8

    def __init__(self, *, max_iter: int = 50, perturb: float = 0.0):
        pass  # nothing to set: exact, one evaluation, no start to perturb

    def maximise(self, objective: IntervalObjective, controls: ControlSet,
                 generator: Optional[torch.Generator] = None) -> Optional[MaximiserResult]:
        start = objective.data.controls
        N, m = start.shape
        low, high = controls.bounds(start.dtype, start.device)
        total = getattr(objective, "total", None)
        if total is None:
            base, g, M = self._model(objective, start)
        else:
            # smooth() is this rank's part in a distributed solve: the model is summed over the ranks in
            # one all-reduce, which also carries a failure of this rank to every rank.
            parts, error = (start.new_zeros(N), torch.zeros_like(start), torch.zeros_like(start)), None
            try:
                parts = self._model(objective, start)
            except Exception as err:  # noqa: BLE001 - raised again by total, on every rank
                error = err
            base, g, M = total(*parts, error=error)
        u0 = start.detach()
        h = objective.data.lengths[:, None]
        penalty = objective.penalty

        def model(v):  # per component [.., N, m]
            d = v - u0
            out = g * d - 0.5 * M * d * d
            if penalty is not None:
                out = out - h * penalty.value(v.unsqueeze(-1))
            return out

        cands = [u0]
        for bound in (low, high):
            cands.append(torch.where(torch.isfinite(bound), bound, u0).expand(N, m))
        safe_M = torch.where(M > 0, M, torch.ones_like(M))
        if penalty is None or penalty.name == "L0":
            cands.append(torch.where(M > 0, u0 + g / safe_M, u0))
        if penalty is not None:
            cands.append(torch.zeros_like(u0))
            if penalty.name == "L1":
                shifted = g + M * u0
                cands.append(torch.where(M > 0, (shifted - h * penalty.weight) / safe_M, u0).clamp_min(0.0))
                cands.append(torch.where(M > 0, (shifted + h * penalty.weight) / safe_M, u0).clamp_max(0.0))
        C = torch.stack([controls.project(c) for c in cands])  # [C, N, m]
        scores = model(C)
        # Unbounded above (linear or convex direction with no bound): no closed form.
        unbounded = ((M <= 0) & (g.abs() > 0) & ~(torch.isfinite(low) & torch.isfinite(high))).any()
        if bool(unbounded):
            return None
        best = scores.argmax(0)  # [N, m]
        u = C.gather(0, best.unsqueeze(0)).squeeze(0)
        # Predicted and exact gains over u0 (the model of u0 is minus its own penalty).
        predicted = scores.gather(0, best.unsqueeze(0)).squeeze(0).sum(-1) + objective.penalty_value(u0)
        value = objective(u).detach()
        exact = value - base + objective.penalty_value(u0)
        scale = base.abs() + predicted.abs() + 1e-300  # 1e-300: a zero objective with a zero gain is not 0/0
        if not bool(((exact - predicted).abs() <= self.rtol * scale + 1e-12 * scale.max()).all()):
            return None
        return MaximiserResult(u, value, 1, 2 + m)

    @staticmethod
    def _model(objective: IntervalObjective, start: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The smooth objective at u^k [N], its gradient g [N, m] and minus its Hessian diagonal M [N, m]
        (autograd): the model g d - M d^2 / 2 per component."""
        N, m = start.shape
        x = start.detach().requires_grad_(True)
        with torch.enable_grad():
            value = objective.smooth(x)
            (g,) = torch.autograd.grad(value.sum(), x, create_graph=True)
            curvature = []
            for j in range(m):
                if not g.requires_grad:
                    curvature.append(torch.zeros(N, dtype=x.dtype, device=x.device))
                    continue
                (col,) = torch.autograd.grad(g[:, j].sum(), x, retain_graph=True, allow_unused=True)
                curvature.append(torch.zeros(N, dtype=x.dtype, device=x.device) if col is None else -col[:, j])
        return value.detach(), g.detach(), torch.stack(curvature, dim=-1).detach()


class MaximisationData(NamedTuple):
    """What a user-supplied maximiser gets (all intervals at once).

    times, weights [N, Q]; states, costates, state_slope (f(u^k)), costate_slope
    (-grad_x H(u^k)) [N, Q, K, n]; controls u^k [N, m]; rho (E-MSA) and eps (SQH);
    objective: ``objective(u [N, m]) -> [N]`` evaluates the interval objective and
    ``objective.candidates(U [C, N, m]) -> [C, N]`` many candidates at once.

    Example: a ``pmp.UserSet`` maximiser that looks at what it gets (see ``UserSet`` for one
    that maximises).
        >>> import torch, pmpsolve as pmp
        >>> def maximise(data):
        ...     print(tuple(data.times.shape), tuple(data.states.shape), tuple(data.controls.shape))
        ...     return data.controls
        >>> problem = pmp.ControlProblem(lambda t, x, u: u.clone(), torch.tensor([1.0]), 1.0,
        ...                              pmp.UserSet(maximise, (1,)), terminal_cost=lambda x: x[..., 0] ** 2)
        >>> sol = pmp.solve(problem, mesh=4, quadrature=3, max_iter=1)
        (4, 3) (4, 3, 1, 1) (4, 1)
    """

    times: torch.Tensor
    weights: torch.Tensor
    states: torch.Tensor
    costates: torch.Tensor
    state_slope: torch.Tensor
    costate_slope: torch.Tensor
    controls: torch.Tensor
    rho: float
    eps: float
    objective: object


class UserMaximiser:
    """The ``maximise(data)`` function of a ``UserSet``, given a ``MaximisationData``."""

    name = "user"

    def __init__(self, *, max_iter: int = 50, perturb: float = 0.0):
        pass  # the user's function has its own settings

    def maximise(self, objective: IntervalObjective, controls: ControlSet,
                 generator: Optional[torch.Generator] = None) -> MaximiserResult:
        d, start = objective.data, objective.data.controls
        data = MaximisationData(d.times, d.weights, d.states, d.costates, d.state_slope, d.costate_slope,
                                d.controls, objective.rho, objective.eps, objective)
        u = torch.as_tensor(controls.maximise(data), dtype=start.dtype, device=start.device)
        if tuple(u.shape) != tuple(start.shape):
            raise ValueError(f"the UserSet maximiser returned shape {tuple(u.shape)}, expected {tuple(start.shape)}")
        return MaximiserResult(u, objective(u).detach(), 1, 1)


#: name -> factory(*, max_iter, perturb) -> Maximiser. ``ControlSet.maximisers`` names
#: entries of this table; ``solve(maximiser=name)`` forces one.
MAXIMISERS: Dict[str, Callable[..., Maximiser]] = {
    m.name: m for m in (ClosedForm, ProjectedLBFGS, ProximalGradient, Enumeration, UserMaximiser)}

#: why a forced maximiser may refuse an objective (for the error message)
_REFUSALS = {"closed-form": "the interval objective is not a separable concave quadratic in u here",
             "lbfgs": "L-BFGS needs a smooth objective, and this one has a control penalty"}


class HamiltonianMaximiser:
    """Maximises the interval objective over a control set with the maximisers the set names.

    ``controls.maximisers(penalty)`` lists them in order of preference (Box / Reals:
    the closed form, then projected L-BFGS, or proximal gradient with an L1 / L0 cost;
    Finite: enumeration; UserSet: the user's function; Ball: projected gradient).
    Each is tried in turn until one returns a result; one that returns None (cannot
    handle this objective) is not asked again in this solve: the closed form is
    checked on the first maximisation and used while its check keeps passing.

    ``method`` forces one ("closed-form", "lbfgs", "proximal", or any name registered
    in ``MAXIMISERS``): if the set names it, it is tried first (an error if it
    refuses), followed by the set's other maximisers without the closed form; a name
    the set does not use is ignored, except that the closed form is skipped
    (e.g. ``method="lbfgs"`` with an L1 cost runs proximal gradient). ``perturb > 0``
    asks for a randomised start, which the closed form has not: it is skipped.
    """

    def __init__(self, controls: ControlSet, *, max_iter: int = 50, perturb: float = 0.0, method: str = "auto"):
        if method != "auto" and method not in MAXIMISERS:
            choices = ", ".join(repr(name) for name in ("auto", *MAXIMISERS))
            raise ValueError(f"unknown maximiser {method!r}; choose one of {choices}")
        if int(max_iter) < 1:
            raise ValueError(f"maximiser `max_iter` must be >= 1, got {max_iter}")
        if perturb < 0:
            raise ValueError(f"`perturb` must be >= 0 (a half-width), got {perturb}")
        self.controls, self.method = controls, method
        self.max_iter, self.perturb = int(max_iter), float(perturb)
        self._maximisers: Dict[str, Maximiser] = {}  # built on first use
        self._refused = set()  # names that returned None once in this solve
        self.last = ""  # which maximiser ran last (for diagnostics and tests)
        self.used = {}  # how often each ran

    def order(self, penalty) -> Tuple[str, ...]:
        """The names to try, in order, for an objective with this control penalty."""
        names = tuple(self.controls.maximisers(penalty))
        if self.method != "auto":
            forced = (self.method,) if self.method in names else ()
            names = forced + tuple(n for n in names if n not in (self.method, "closed-form"))
        if self.perturb > 0:
            names = tuple(n for n in names if n != "closed-form")
        return names

    def maximiser(self, name: str) -> Maximiser:
        if name not in self._maximisers:
            self._maximisers[name] = MAXIMISERS[name](max_iter=self.max_iter, perturb=self.perturb)
        return self._maximisers[name]

    def maximise(self, objective: IntervalObjective, generator: Optional[torch.Generator] = None) -> MaximiserResult:
        order = self.order(objective.penalty)
        for name in order:
            if name in self._refused:
                continue
            result = self.maximiser(name).maximise(objective, self.controls, generator)
            if result is None:
                if name == self.method:
                    why = _REFUSALS.get(name, "it returned None")
                    raise ValueError(f"maximiser={name!r}: {why}; use maximiser='auto'")
                self._refused.add(name)
                continue
            self.last = name
            self.used[name] = self.used.get(name, 0) + 1
            return result
        raise ValueError(f"no maximiser can handle this interval objective over {self.controls!r} "
                         f"(tried {', '.join(order) or 'none'})")
