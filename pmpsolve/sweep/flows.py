"""The mesh intervals as a discrete-time system: x_{n+1} = F_n(x_n, u_n), l_n = int_{I_n} L dt.

F_n is the flow of dX/dt = f(t, X, u_n) over I_n = [t_n, t_{n+1}] with the control held
(the engine's piecewise-constant controls), l_n the running cost integrated alongside.
``interval_flows`` integrates every interval from its own start value in ONE batched solve
of the engine's ODE solver on the common axis sigma in [0, 1] (t = t_n + sigma h_n), as the
multiple-shooting sweep does (``shooting.py``). With ``graph=True`` the solve keeps its
autograd graph, so that derivatives of (F_n, l_n) with respect to the start values and the
controls of all intervals come from a few reverse passes over that one graph
(``interval_derivatives``): the sensitivities of the discretisation actually integrated (the
adaptive steps are fixed numbers once chosen; the step-size control runs without graph).
Differential dynamic programming (``pmpsolve.update.ddp``) runs on these.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch

from .ode import ODE
from .pointwise import PointwiseProblem

__all__ = ["interval_flows", "interval_derivatives", "rk4_maps", "IntervalDerivatives", "all_intervals_options"]


def all_intervals_options(ode: ODE, N: int, copies: int = 1, kind: Optional[str] = None) -> dict:
    """The solver options of a solve of all N intervals at once on sigma in [0, 1]: the mesh's jump and
    step times mean nothing on that axis; the error is the nominal copy's (per-interval RMS, as the
    sequential sweep's per step, then the worst interval). With a ``kind``, the first step is the last
    such solve's (``StepMemory``): only for right-hand sides without kinks between the nodes (a running
    cost with hinges, ``PointwiseProblem.has_hinges``, whose kinks no step ends at here; long steps across
    them passed the error test and left Bryson-Denham's inner solves at the penalty 1e9 stalled)."""
    options = {k: v for k, v in ode.options.items() if k not in ("jump_t", "first_step", "step_t")}
    options["norm"] = lambda e: e.reshape(N, copies, -1)[:, 0].pow(2).mean(-1).sqrt().amax()
    memory = None if kind is None else ode.step_memory(kind)
    if memory is not None:
        options["step_memory"] = memory
    return options


def interval_flows(pw: PointwiseProblem, ode: ODE, starts: torch.Tensor, u: torch.Tensor, *,
                   graph: bool = False, count=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(F_n(x_n, u_n) [N, K, n], l_n [N, K]) for start values ``starts`` [N, K, n] and controls u [N, m]
    (or per sample, [N, K, m]), all intervals in one solve. ``graph``: keep the autograd graph (the
    inputs' ``requires_grad`` decides what it reaches). ``count(t)``: called by every right-hand side
    (an ``EvaluationBudget`` or a counter). May raise ``ode.IntegrationFailure``."""
    mesh = ode.mesh
    N, K, n = starts.shape
    first, h = mesh[:-1], mesh[1:] - mesh[:-1]
    scale = h.view(N, 1, 1)
    evaluate, reads_time = pw.with_controls(u, starts.shape)

    def rhs(sigma, Y):  # Y [N, K, n (+1)]
        if count is not None:
            count(None)
        t = first + sigma * h if reads_time else first[0] + sigma * h[0]
        if not pw.has_running_cost:
            return scale * evaluate(t, Y)
        f, L = evaluate(t, Y[..., :n])
        return scale * torch.cat([f, L.unsqueeze(-1)], dim=-1)

    Y0 = starts if not pw.has_running_cost else torch.cat([starts, starts.new_zeros(N, K, 1)], dim=-1)
    unit = torch.stack([mesh.new_zeros(()), mesh.new_ones(())])
    with torch.enable_grad() if graph else torch.no_grad():
        kind = None if pw.has_hinges else "flows"
        end = ode.solve(rhs, Y0, unit, options=all_intervals_options(ode, N, kind=kind))[-1]
    running = end[..., n] if pw.has_running_cost else end.new_zeros(N, K)
    return end[..., :n], running


class IntervalDerivatives(NamedTuple):
    """First and second derivatives of the intervals' maps at (x_n, u_n), every interval at once.

    A = dF_n/dx_n [N, K, n, n], B = dF_n/du_n [N, K, n, m] (each sample's own; the control is shared);
    hessian [N, K, n + m, n + m]: the Hessian in (x_n, u_n) of w l_n + lam_{n+1} . F_n (w = 1/K: J is the
    mean over samples), or of w l_n alone when no multipliers are given (Gauss-Newton: the dynamics'
    curvature dropped).
    """

    A: torch.Tensor
    B: torch.Tensor
    hessian: torch.Tensor
    ends: Optional[torch.Tensor] = None  # the maps' values F_n(x_n, u_n) [N, K, n]


def interval_derivatives(pw: PointwiseProblem, mesh: torch.Tensor, nodes: torch.Tensor, u: torch.Tensor,
                         multipliers: Optional[torch.Tensor] = None, steps: int = 1) -> IntervalDerivatives:
    """``IntervalDerivatives`` at the nodes [N + 1, K, n] of controls u [N, m], ``multipliers`` lam_{n+1}
    [N, K, n] (None: Gauss-Newton), of the interval maps taken by ``steps`` classical Runge-Kutta steps
    per interval, all intervals and samples as one batch: the Jacobian from n + m reverse passes and the
    Hessian from n + m more over the gradient (each pass batched over the rows, ``is_grads_batched``).

    Why not through the engine's adaptive solve: the same passes over the graph of the batched dopri5
    solve of all intervals (``interval_flows(graph=True)``) took 70 ms at N = 200 on van der Pol and
    ``torch.func`` (vmap of jacfwd(jacrev)) over one interval's RK4 map 65-100 ms on the four reference
    problems, against 9-16 ms this way, which agrees with the former to 7e-8 (Jacobian) and 2e-6
    (Hessian) relative (one step; two: 4e-9 and 2e-7 in 16-28 ms). Only the quadratic model of a step
    is made of these; the gradient it descends is the engine's (``pmpsolve.update.ddp``).
    """
    N, K, n = nodes.shape[0] - 1, nodes.shape[1], nodes.shape[2]
    m = u.shape[-1]
    w = 1.0 / pw.reducer.num_samples
    x0 = nodes[:-1].detach().clone().requires_grad_(True)
    v = u.detach()[:, None, :].expand(N, K, m).clone().requires_grad_(True)  # one copy per sample
    with torch.enable_grad():
        x, cost = rk4_maps(pw, mesh, x0, v, steps)
        scalar = w * cost
        if multipliers is not None:
            scalar = scalar + (multipliers.detach() * x).sum(-1)
        g = x.new_zeros(N, K, n + m)
        if scalar.requires_grad:  # else no running cost and no multipliers: no curvature
            gx, gu = torch.autograd.grad(scalar.sum(), (x0, v), create_graph=True, allow_unused=True,
                                         materialize_grads=True)
            g = torch.cat([gx, gu], dim=-1)
        # The Jacobian's n rows (of x) and the Hessian's n + m (of g) in one batched reverse pass over both
        # graphs: one call's overhead instead of two (the rows of the other output are zero cotangents).
        curved = g.requires_grad
        rows = n + (n + m if curved else 0)
        eye = torch.eye(rows, dtype=x.dtype, device=x.device)
        seeds = eye[:, :n].reshape(rows, 1, 1, n).expand(rows, N, K, n)
        outputs = (x, g) if curved else (x,)
        if curved:
            seeds = (seeds, eye[:, n:].reshape(rows, 1, 1, n + m).expand(rows, N, K, n + m))
        dx, du = (_rows(d, rows) for d in torch.autograd.grad(
            outputs, (x0, v), seeds, is_grads_batched=True, allow_unused=True, materialize_grads=True))
        A, B = dx[:n], du[:n]  # [n, N, K, n], [n, N, K, m]
        if curved:
            hessian = torch.cat([dx[n:], du[n:]], dim=-1).permute(1, 2, 0, 3)
        else:  # linear in (x, u)
            hessian = g.new_zeros(N, K, n + m, n + m)
    A, B = A.permute(1, 2, 0, 3), B.permute(1, 2, 0, 3)
    return IntervalDerivatives(A.detach(), B.detach(), 0.5 * (hessian + hessian.transpose(-1, -2)).detach(),
                               x.detach())


def rk4_maps(pw: PointwiseProblem, mesh: torch.Tensor, starts: torch.Tensor, u: torch.Tensor,
             steps: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
    """(F_n [N, ..., n], l_n [N, ...]) of the intervals' maps taken by ``steps`` classical Runge-Kutta steps
    per interval from ``starts`` [N, ..., n] (e.g. [N, K, n]) with controls u [N, m] (or per sample,
    [N, K, m]), all intervals as one batch: 4 evaluations of f (and L) per step, with the autograd graph
    where grad mode is on."""
    N = starts.shape[0]
    first, length = mesh[:-1], mesh[1:] - mesh[:-1]
    evaluate, _ = pw.with_controls(u, starts.shape)
    dt = (length / steps).view((N,) + (1,) * (starts.dim() - 1))
    x, cost = starts, starts.new_zeros(starts.shape[:-1])
    for j in range(steps):
        t = first + j * dt.view(N)
        half = t + dt.view(N) / 2
        stages = []
        for time, y in ((t, x), (half, None), (half, None), (t + dt.view(N), None)):
            if y is None:  # RK4's stages 2-4 from the previous stage's slope
                y = x + (dt / 2 if len(stages) < 3 else dt) * stages[-1][0]
            out = evaluate(time, y)
            stages.append(out if pw.has_running_cost else (out, None))
        (k1, L1), (k2, L2), (k3, L3), (k4, L4) = stages
        x = x + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        if pw.has_running_cost:
            cost = cost + dt.squeeze(-1) / 6 * (L1 + 2 * L2 + 2 * L3 + L4)
    return x, cost


def _rows(gradient: torch.Tensor, rows: int) -> torch.Tensor:
    """A batched gradient [rows, N, K, d]; an unused input's materialised zeros come without the batch axis."""
    return gradient if gradient.dim() == 4 else gradient.expand(rows, *gradient.shape)
