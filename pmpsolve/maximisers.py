"""Batched maximisers of the interval Hamiltonians (docs/theory.md, engine step 5).

The objective is separable over the N intervals, so one optimiser runs on the
[N, m] control tensor with per-row curvature pairs, step lengths and
convergence flags: each row is its own L-BFGS, and one evaluation of the
objective serves all rows (no Python loop over intervals).

Bounds (a Box; Reals is the unbounded case) are handled inside the optimiser
by the projected quasi-Newton method of Kim, Sra and Dhillon (2010): variables
at a bound whose gradient pushes outwards are held fixed, the L-BFGS direction
is taken in the others, and the backtracking line search runs along the
projected path P(u + a d). The result is in U by construction, not clipped
afterwards.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch

from .controls import ControlSet, Finite, UserSet
from .penalties import prox_in_box

__all__ = ["MaximiserResult", "ProjectedLBFGS", "ProximalGradient", "CandidateSearch", "HamiltonianMaximiser",
           "MaximisationData"]

Objective = Callable[[torch.Tensor], torch.Tensor]  # u [N, m] -> values [N]


class MaximiserResult(NamedTuple):
    controls: torch.Tensor  # [N, m]
    value: torch.Tensor  # objective at controls [N]
    iterations: int
    evaluations: int


class ProjectedLBFGS:
    """Maximise ``objective(u) -> [N]`` row by row over u [N, m] in a box.

    Args:
        max_iter: iterations (each one objective + gradient evaluation, more when
            the line search backtracks). The paper's reference code uses 10.
        history: number of curvature pairs kept per row.
        gtol: stop a row when its projected gradient is below ``gtol`` times its
            projected gradient at the start.
        ftol: ... or when its objective changed by less than ``ftol * (1 + |value|)``.
        perturb: half-width a of uniform noise U(-a, a) added to the starting point
            (the reference code uses 0.005; it breaks the symmetry of an all-zero start).
    """

    name = "lbfgs"

    def __init__(self, *, max_iter: int = 50, history: int = 10, gtol: float = 1e-9, ftol: float = 1e-14,
                 perturb: float = 0.0, max_backtracks: int = 30):
        if int(max_iter) < 1:
            raise ValueError(f"maximiser `max_iter` must be >= 1, got {max_iter}")
        if perturb < 0:
            raise ValueError(f"`perturb` must be >= 0 (a half-width), got {perturb}")
        self.max_iter, self.history = int(max_iter), int(history)
        self.gtol, self.ftol, self.perturb = float(gtol), float(ftol), float(perturb)
        self.max_backtracks = int(max_backtracks)

    def maximise(self, objective: Objective, start: torch.Tensor, controls: ControlSet,
                 generator: Optional[torch.Generator] = None) -> MaximiserResult:
        low, high = controls.bounds(start.dtype, start.device)
        project = lambda v: torch.maximum(torch.minimum(v, high), low)  # noqa: E731
        evals = [0]

        smooth = getattr(objective, "smooth", objective)

        def value_grad(v):  # minimise phi = -objective
            evals[0] += 1
            if hasattr(objective, "value_and_grad"):  # the interval Hamiltonian, in cache-sized blocks
                value, g = objective.value_and_grad(v)
                return -value, -g
            v = v.detach().requires_grad_(True)
            with torch.enable_grad():
                phi = -smooth(v)
                (g,) = torch.autograd.grad(phi.sum(), v)
            return phi.detach(), g.detach()

        x = start.detach().clone()
        if self.perturb > 0:
            noise = torch.rand(x.shape, generator=generator, dtype=x.dtype, device="cpu" if generator is None
                               or generator.device.type == "cpu" else x.device)
            x = x + (2 * noise.to(x.device) - 1) * self.perturb
        x = project(x)
        f, g = value_grad(x)
        N = x.shape[0]
        S, Y, R = [], [], []  # curvature pairs [N, m] and 1/(s.y) [N] (0 where a row skipped the pair)
        active = torch.ones(N, dtype=torch.bool, device=x.device)
        pg0 = _projected_gradient(x, g, project).amax(-1).clamp_min(torch.finfo(x.dtype).tiny)
        iterations = 0
        for iterations in range(1, self.max_iter + 1):
            free = ~(((x <= low) & (g > 0)) | ((x >= high) & (g < 0)))
            d = -_two_loop(g * free, S, Y, R) * free
            slope = (g * d).sum(-1)
            steepest = slope >= 0  # not a descent direction (or a row with no pairs yet): steepest descent
            if S:
                d = torch.where(steepest[:, None], -g * free, d)
            else:
                # First step: the exact minimiser along -g of the local quadratic model,
                # a = |g|^2 / g'Hg with g'Hg from one Hessian-vector product (autograd).
                d = -g * free
                curv = objective.curvature(x, d) if hasattr(objective, "curvature") else _curvature(smooth, x, d)
                gg = (d * d).sum(-1)
                fallback = 1.0 / g.abs().amax(-1).clamp_min(1.0)
                alpha = torch.where(curv > 0, gg / torch.where(curv > 0, curv, torch.ones_like(curv)), fallback)
                d = d * alpha[:, None]
                evals[0] += 1
            d = d * active[:, None]
            step = torch.ones(N, dtype=x.dtype, device=x.device)
            x_new = project(x + d)
            f_new, g_new = value_grad(x_new)
            for _ in range(self.max_backtracks):
                ok = f_new <= f + 1e-4 * (g * (x_new - x)).sum(-1)
                if bool(ok.all()):
                    break
                step = torch.where(ok, step, step * 0.5)
                x_try = torch.where(ok[:, None], x_new, project(x + step[:, None] * d))
                f_new, g_new = value_grad(x_try)
                x_new = x_try
            else:
                ok = f_new <= f + 1e-4 * (g * (x_new - x)).sum(-1)
                # Rows without an acceptable step keep their point and stop.
                x_new = torch.where(ok[:, None], x_new, x)
                f_new = torch.where(ok, f_new, f)
                g_new = torch.where(ok[:, None], g_new, g)
                active = active & ok
            s, y = x_new - x, g_new - g
            sy = (s * y).sum(-1)
            keep = sy > 1e-12 * s.norm(dim=-1) * y.norm(dim=-1)
            S.append(s)
            Y.append(y)
            R.append(torch.where(keep, 1.0 / torch.where(keep, sy, torch.ones_like(sy)), torch.zeros_like(sy)))
            if len(S) > self.history:
                S.pop(0), Y.pop(0), R.pop(0)
            small_change = (f - f_new).abs() <= self.ftol * (1 + f_new.abs())
            x, f, g = x_new, f_new, g_new
            pg = _projected_gradient(x, g, project).amax(-1)
            active = active & ~(pg <= self.gtol * pg0) & ~small_change
            if not bool(active.any()):
                break
        return MaximiserResult(x, -f, iterations, evals[0])


def _curvature(objective: Objective, x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """d' (-Hessian of objective) d per row [N], by a Hessian-vector product."""
    v = x.detach().requires_grad_(True)
    with torch.enable_grad():
        phi = -objective(v)
        (g,) = torch.autograd.grad(phi.sum(), v, create_graph=True)
        if not g.requires_grad:  # the objective is linear in u
            return torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        (hd,) = torch.autograd.grad((g * d).sum(), v, allow_unused=True)
    if hd is None:
        return torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    return (d * hd).sum(-1).detach()


def _projected_gradient(x, g, project):
    return (x - project(x - g)).abs()


def _two_loop(q: torch.Tensor, S, Y, R) -> torch.Tensor:
    """H q for the row-wise L-BFGS inverse Hessians given by the pairs (S, Y, R); rows are independent."""
    alphas = []
    for s, y, r in zip(reversed(S), reversed(Y), reversed(R)):
        a = r * (s * q).sum(-1)
        q = q - a[:, None] * y
        alphas.append(a)
    if S:
        s, y, r = S[-1], Y[-1], R[-1]
        yy = (y * y).sum(-1)
        gamma = torch.where(r > 0, 1.0 / (r * yy).clamp_min(torch.finfo(q.dtype).tiny), torch.ones_like(r))
        q = q * gamma[:, None]
    for s, y, r, a in zip(S, Y, R, reversed(alphas)):
        b = r * (y * q).sum(-1)
        q = q + (a - b)[:, None] * s
    return q


class ProximalGradient:
    """Batched proximal gradient ascent for a smooth objective minus an L1 / L0 penalty, in a box.

    Each row: u <- prox(u + s grad), the prox of the penalty (soft or hard thresholding)
    followed by the box, with Barzilai-Borwein steps s and backtracking until the
    objective (penalty included) does not decrease.
    """

    name = "proximal-gradient"

    def __init__(self, *, max_iter: int = 50, ftol: float = 1e-14, perturb: float = 0.0):
        self.max_iter, self.ftol, self.perturb = int(max_iter), float(ftol), float(perturb)

    def maximise(self, objective, start, controls: ControlSet, generator=None) -> MaximiserResult:
        low, high = controls.bounds(start.dtype, start.device)
        penalty = objective.penalty
        h = objective.data.lengths[:, None]
        evals = [0]

        def step_to(x, g, s):
            return prox_in_box(penalty, x + s[:, None] * g, s[:, None] * h, low, high)

        def value_grad(x):
            evals[0] += 1
            smooth, g = objective.value_and_grad(x)
            return smooth - objective.penalty_value(x), g

        x = _perturbed(start, self.perturb, generator, lambda v: torch.maximum(torch.minimum(v, high), low))
        f, g = value_grad(x)
        s = 1.0 / g.abs().amax(-1).clamp_min(1.0)
        iterations = 0
        for iterations in range(1, self.max_iter + 1):
            for _ in range(40):
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


class CandidateSearch:
    """Exact maximisation over candidate values, all intervals at once.

    * Finite sets: every admissible value is a candidate. With few components
      (|V|^m <= ``max_combinations``) all combinations are enumerated (exact for
      any Hamiltonian); otherwise component by component, repeated until nothing
      changes (exact where the Hamiltonian separates over components).
    * Closed forms for boxes and R^m: when the objective is a separable concave
      quadratic in u (control-affine dynamics with a quadratic or no control cost,
      the E-MSA / SQH terms included), the per-component maximiser of the model,
      with the soft (L1) or hard (L0) threshold and the box, is the answer. The
      model comes from the exact gradient and curvature at u^k (autograd); it is
      verified by one exact evaluation, and ``closed_form`` returns None when the
      objective is not such a quadratic.
    """

    name = "candidates"

    def __init__(self, *, max_combinations: int = 64, max_sweeps: int = 20):
        self.max_combinations, self.max_sweeps = int(max_combinations), int(max_sweeps)

    # ------------------------------------------------------------ finite sets
    def enumerate(self, objective, start: torch.Tensor, controls: Finite) -> MaximiserResult:
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

    # ----------------------------------------------------------- closed forms
    def closed_form(self, objective, controls: ControlSet) -> Optional[MaximiserResult]:
        start = objective.data.controls
        N, m = start.shape
        low, high = controls.bounds(start.dtype, start.device)
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
        g, M = g.detach(), torch.stack(curvature, dim=-1).detach()  # model: g d - M d^2 / 2 per component
        base = value.detach()
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
        C = torch.stack([torch.maximum(torch.minimum(c, high), low) for c in cands])  # [C, N, m]
        scores = model(C)
        # Unbounded above (linear or convex direction with no bound): no closed form.
        unbounded = ((M <= 0) & (g.abs() > 0) & ~(torch.isfinite(low) & torch.isfinite(high))).any()
        if bool(unbounded):
            return None
        best = scores.argmax(0)  # [N, m]
        u = C.gather(0, best.unsqueeze(0)).squeeze(0)
        # Predicted and exact gains over u0 (the model of u0 is minus its own penalty).
        predicted = scores.gather(0, best.unsqueeze(0)).squeeze(0).sum(-1) + objective.penalty_value(u0)
        exact = objective(u).detach() - base + objective.penalty_value(u0)
        scale = base.abs() + predicted.abs() + 1e-300
        if not bool(((exact - predicted).abs() <= 1e-8 * scale + 1e-12 * scale.max()).all()):
            return None
        return MaximiserResult(u, objective(u).detach(), 1, 2 + m)


class MaximisationData(NamedTuple):
    """What a user-supplied maximiser gets (all intervals at once).

    times, weights [N, Q]; states, costates, state_slope (f(u^k)), costate_slope
    (-grad_x H(u^k)) [N, Q, K, n]; controls u^k [N, m]; rho (E-MSA) and eps (SQH);
    objective: ``objective(u [N, m]) -> [N]`` evaluates the interval objective and
    ``objective.candidates(U [C, N, m]) -> [C, N]`` many candidates at once.
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


class HamiltonianMaximiser:
    """Chooses how the interval objective is maximised for a control set and penalty.

    UserSet -> the user's function; Finite -> enumeration; Box / Reals -> the closed
    form when the objective is a separable concave quadratic in u (checked on the
    first maximisation of a solve, then used while its check keeps passing), else
    projected L-BFGS (smooth) or proximal gradient (with an L1 / L0 penalty).
    ``method`` forces one: "auto", "closed-form", "lbfgs", "proximal".
    """

    def __init__(self, controls: ControlSet, *, max_iter: int = 50, perturb: float = 0.0, method: str = "auto"):
        if method not in ("auto", "closed-form", "lbfgs", "proximal"):
            raise ValueError(f"unknown maximiser {method!r}; choose 'auto', 'closed-form', 'lbfgs' or 'proximal'")
        self.controls, self.method, self.perturb = controls, method, float(perturb)
        self.lbfgs = ProjectedLBFGS(max_iter=max_iter, perturb=perturb)
        self.proximal = ProximalGradient(max_iter=max_iter, perturb=perturb)
        self.search = CandidateSearch()
        self._closed_form_works = None if method == "auto" else method == "closed-form"
        self.last = ""  # which maximiser ran last (for diagnostics and tests)
        self.used = {}  # how often each ran

    def maximise(self, objective, generator=None) -> MaximiserResult:
        result = self._maximise(objective, generator)
        self.used[self.last] = self.used.get(self.last, 0) + 1
        return result

    def _maximise(self, objective, generator=None) -> MaximiserResult:
        start = objective.data.controls
        if isinstance(self.controls, UserSet):
            d = objective.data
            self.last = "user"
            data = MaximisationData(d.times, d.weights, d.states, d.costates, d.state_slope, d.costate_slope,
                                    d.controls, objective.rho, objective.eps, objective)
            u = torch.as_tensor(self.controls.maximise(data), dtype=start.dtype, device=start.device)
            if tuple(u.shape) != tuple(start.shape):
                raise ValueError(f"the UserSet maximiser returned shape {tuple(u.shape)}, expected {tuple(start.shape)}")
            return MaximiserResult(u, objective(u).detach(), 1, 1)
        if isinstance(self.controls, Finite):
            self.last = "enumeration"
            return self.search.enumerate(objective, start, self.controls)
        if self._closed_form_works is not False and self.perturb == 0.0:
            result = self.search.closed_form(objective, self.controls)
            if result is not None:
                self._closed_form_works = True
                self.last = "closed-form"
                return result
            if self.method == "closed-form":
                raise ValueError("maximiser='closed-form': the interval objective is not a separable concave "
                                 "quadratic in u here; use maximiser='auto'")
            self._closed_form_works = False
        if objective.penalty is not None or self.method == "proximal":
            self.last = "proximal"
            return self.proximal.maximise(objective, start, self.controls, generator)
        self.last = "lbfgs"
        return self.lbfgs.maximise(objective, start, self.controls, generator)


def _perturbed(start, perturb, generator, project):
    x = start.detach().clone()
    if perturb > 0:
        noise = torch.rand(x.shape, generator=generator, dtype=x.dtype)
        x = x + (2 * noise.to(x.device) - 1) * perturb
    return project(x)
