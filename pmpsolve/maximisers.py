"""Batched maximisers of the interval Hamiltonians (DESIGN.md section 2, step 5).

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

from .controls import ControlSet

__all__ = ["MaximiserResult", "ProjectedLBFGS"]

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

        def value_grad(v):  # minimise phi = -objective
            evals[0] += 1
            v = v.detach().requires_grad_(True)
            with torch.enable_grad():
                phi = -objective(v)
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
                curv = _curvature(objective, x, d)
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
