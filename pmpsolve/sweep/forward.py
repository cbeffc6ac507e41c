"""The forward (state) sweep (docs/theory.md, engine step 1; paper eq. 5).

dX/dt = f(t, X, u_t), X_0 = x0, with the running cost integrated alongside as
one more component, so that J comes out of the same solve. Its own module
because it is the one piece a different time discretisation (a parallel-in-time
or a layer-by-layer forward sweep) replaces; the ODE set-up is in ``ode.py``,
the checks, timing and result type in ``sweeps.py``.

The right-hand side looks the control up with ``torch.searchsorted``
(``interval_index``): no host syncs inside it. Besides the nodes, the solve returns
X at fixed fractions of every interval (the Gauss points of the interval
Hamiltonian, the co-state's linearisation points) from the solver's own dense
output (``ODE.solve_sampled``): the same steps, so the same J and node values.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, NamedTuple, Optional

import torch

from .mesh import interval_index
from .ode import ODE
from .pointwise import PointwiseProblem

if TYPE_CHECKING:  # shooting.py imports this module
    from .shooting import NewtonRate

__all__ = ["StateSolution", "solve_state", "state_solution"]


class StateSolution(NamedTuple):
    """The forward sweep's numbers, before the checks and the trajectory are made of them."""

    values: torch.Tensor  # X at the nodes [N + 1, K, n] (with the graph if differentiable)
    cost: torch.Tensor  # J(u), 0-d (in a distributed solve: this rank's part of it)
    terminal_cost: torch.Tensor  # Phi(X_T^i) [K]
    running_cost: torch.Tensor  # int_0^T L(t, X^i, u) dt [K]
    slope_left: torch.Tensor  # f at the left end of each interval, t_n+, [N, K, n]
    slope_right: torch.Tensor  # f at the right end of each interval, t_{n+1}-, [N, K, n]
    interior: torch.Tensor  # X at the requested fractions of each interval [N, R, K, n] (detached)
    # d X(t_{n+1}) / d X(t_n) per interval [N, K, n, n] where the sweep computed them (shooting), else None
    transitions: Optional[torch.Tensor] = None
    newton_rate: Optional["NewtonRate"] = None  # what a shooting sweep's Newton steps showed, else None


def solve_state(pw: PointwiseProblem, ode: ODE, u: torch.Tensor, count: Callable[[Optional[torch.Tensor]], None],
                *, differentiable: bool = False, fractions: Optional[torch.Tensor] = None) -> StateSolution:
    """Integrate the state (and the running cost) for controls u [N, m].

    ``fractions`` [R] (increasing in (0, 1), default none): X is also returned at t_n + c h_n for
    every interval n and c in ``fractions``, from the same solve.

    ``count(t)`` is called first by every right-hand-side evaluation (the evaluation budget).
    ``differentiable``: keep the autograd graph through the solver steps. May raise
    ``ode.IntegrationFailure``.
    """
    mesh = ode.mesh
    K, n = pw.num_samples, pw.state_dim

    def rhs(t, z):
        count(t)
        un = u[interval_index(mesh, t)]
        if not pw.has_running_cost:
            return pw.dynamics(t, z, un)
        x = z[:, :n]
        return torch.cat([pw.dynamics(t, x, un), pw.running_cost(t, x, un).unsqueeze(-1)], dim=-1)

    z0 = pw.x0 if not pw.has_running_cost else torch.cat([pw.x0, pw.x0.new_zeros(K, 1)], dim=-1)
    with torch.enable_grad() if differentiable else torch.no_grad():
        if fractions is None:
            fractions = mesh.new_zeros(0)
        Z, Z_interior = ode.solve_sampled(rhs, z0, fractions)  # [N + 1, K, n (+1)], [N, R, K, n (+1)]
        running = Z[-1, :, n] if pw.has_running_cost else Z.new_zeros(K)
        return state_solution(pw, mesh, u, Z[..., :n], running, Z_interior[..., :n])


def state_solution(pw: PointwiseProblem, mesh: torch.Tensor, u: torch.Tensor, X: torch.Tensor,
                   running: torch.Tensor, interior: torch.Tensor,
                   transitions: Optional[torch.Tensor] = None) -> StateSolution:
    """The StateSolution of a forward sweep that gave X at the nodes [N + 1, K, n], the running costs
    [K] and X inside the intervals [N, R, K, n] (and maybe the transition matrices): J, and the end
    slopes of every interval."""
    terminal = pw.terminal_cost(X[-1])
    # In a distributed solve this is this rank's part of J (its samples' sum / global K, and the
    # penalty on the rank that keeps shared terms): ``Sweeper.forward`` adds the parts of all ranks.
    cost = pw.reducer.mean_costs(terminal + running)
    penalty = pw.problem.control_penalty
    if penalty is not None and pw.reducer.keeps_shared_terms:  # int c |u|: exact for piecewise-constant u
        cost = cost + ((mesh[1:] - mesh[:-1]) * penalty.value(u)).sum()
    with torch.no_grad():  # end slopes of each interval, both with that interval's control (f jumps at nodes)
        slope_left = pw.dynamics(mesh[:-1], X[:-1].detach(), u.detach())
        slope_right = pw.dynamics(mesh[1:], X[1:].detach(), u.detach())
    return StateSolution(X, cost, terminal, running, slope_left, slope_right, interior.detach(), transitions)
