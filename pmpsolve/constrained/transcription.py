"""A constrained problem, at fixed multipliers, as an ordinary ``ControlProblem`` (docs/theory.md).

Three rewritings, each exact:

* **free final time**: time is rescaled to s = t / T in [0, 1]; the dynamics and the running
  cost are multiplied by T, so J is unchanged;
* **static parameters** p (and the free T) are states with zero dynamics and initial value p
  (T); the co-state of those states at s = 0 is -dJ/dp (-dJ/dT), as for any initial state;
* **constraints** enter the costs by the augmented Lagrangian of Powell-Hestenes-Rockafellar:
  a terminal equality psi adds nu psi + r/2 |psi|^2 to Phi, an inequality c <= 0 adds
  (max(0, mu + r c)^2 - mu^2) / (2 r) to Phi, and a path constraint g <= 0 the same term with
  a multiplier function mu(s), piecewise linear on the multiplier grid, to L, and once more to
  Phi at s = 1 (its end value g(T, x(T), u) <= 0 with a multiplier of its own: the atom a state
  constraint's multiplier may have at T, which an integral penalty cannot see).

The sweeps, the Hamiltonian maximisation and every update rule then run on that problem
unchanged; ``pmpsolve.constrained.outer`` updates the multipliers, the penalties, T and p.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch

from ..problem import ControlProblem

__all__ = ["Transcription", "OuterPoint", "GRID_FRACTIONS", "CHECK_FRACTIONS"]

#: where path multipliers live besides the nodes (the multiplier grid). None: mu(s) is piecewise
#: linear between the nodes, with its kinks on them, where the sweeps restart and the interval
#: quadrature of the Hamiltonian stays exact to its order (a kink inside an interval would make
#: the gradient of J inconsistent with J at the 1e-3 level)
GRID_FRACTIONS = ()
#: where path constraints are checked besides the grid (the states between nodes by the
#: sweeps' cubic Hermite interpolation, 4th order in the interval length)
CHECK_FRACTIONS = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875)


@dataclass(frozen=True)
class OuterPoint:
    """What the outer loop fixes for one inner solve.

    horizon: T; parameters: p [q] (empty when none);
    terminal: multipliers of the terminal constraints [K, cT + cP] (equalities and inequalities,
    in the problem's order, then the path constraints' end values); path: multipliers of the path
    constraints on the grid [K, M, cP]; terminal_penalty [cT + cP], path_penalty [cP]: the penalty
    weights r per component; end_control [m]: the control of the last interval, at which a mixed
    path constraint's end value is taken during an inner solve (frozen: Phi reads no control).
    """

    horizon: float
    parameters: torch.Tensor
    terminal: torch.Tensor
    path: torch.Tensor
    terminal_penalty: torch.Tensor
    path_penalty: torch.Tensor
    end_control: Optional[torch.Tensor] = None

    def with_(self, **changes) -> "OuterPoint":
        return replace(self, **changes)


class Transcription:
    """Maps a constrained problem and an ``OuterPoint`` to the ``ControlProblem`` the Solver runs.

    Args:
        problem: the constrained ControlProblem.
        mesh: N (uniform intervals) or node times [N + 1] in the problem's time (fixed T) or
            in s in [0, 1] (free T).
    """

    def __init__(self, problem: ControlProblem, mesh, dtype: torch.dtype, device):
        from ..sweep.mesh import make_mesh

        self.problem, self.dtype, self.device = problem, dtype, device
        self.free = problem.free_time is not None
        self.n = problem.state_dim
        self.q = 0 if problem.parameters is None else problem.parameters.dim
        self.K = problem.num_samples
        self.inner_horizon = 1.0 if self.free else problem.horizon
        self.mesh = make_mesh(mesh, self.inner_horizon, dtype, device)  # [N + 1], in s (free T) or t
        N = self.mesh.numel() - 1
        self.N = N
        h = self.mesh[1:] - self.mesh[:-1]
        inner = self.mesh[:-1, None] + torch.tensor(GRID_FRACTIONS, dtype=dtype, device=device) * h[:, None]
        grid = torch.cat([self.mesh[:-1, None], inner], dim=1).reshape(-1)
        self.grid = torch.cat([grid, self.mesh[-1:]])  # [M], the multiplier grid
        self.terminal_sizes = getattr(problem, "terminal_sizes", ())
        self.path_sizes = getattr(problem, "path_sizes", ())
        # the terminal constraints' components, then the path constraints' end values (inequalities)
        self.terminal_equal = torch.tensor(
            [c.kind == "equal" for c, size in zip(problem.terminal_constraints, self.terminal_sizes)
             for _ in range(size)] + [False] * sum(self.path_sizes), dtype=torch.bool, device=device)
        # Which of the user's f, L and path constraints read t (probed once): with a free T the others are
        # called with s as it is, not s T, so that the inner problem reads its time only where they do and
        # its points are evaluated in one call instead of under vmap (``PointwiseProblem._map_expanded``).
        self._reads_time = {fn: self._probe_time(fn) for fn in (problem.dynamics, problem.running_cost,
                                                                  self.path_values) if fn is not None}

    # ------------------------------------------------------------------ the outer variables
    def initial_point(self, penalty: float = 1.0) -> OuterPoint:
        p = self.problem
        parameters = (torch.zeros(0, dtype=self.dtype, device=self.device) if p.parameters is None
                      else p.parameters.default_point(self.dtype, self.device).clone())
        cT, cP = self.terminal_equal.numel(), sum(self.path_sizes)
        full = lambda *shape: torch.full(shape, penalty, dtype=self.dtype, device=self.device)  # noqa: E731
        return OuterPoint(float(p.horizon), parameters,
                          torch.zeros(self.K, cT, dtype=self.dtype, device=self.device),
                          torch.zeros(self.K, self.grid.numel(), cP, dtype=self.dtype, device=self.device),
                          full(cT), full(cP))

    @property
    def static_dim(self) -> int:
        """q + 1 with a free T, q otherwise: the extra states of the inner problem."""
        return self.q + int(self.free)

    def static(self, point: OuterPoint) -> torch.Tensor:
        """(p, T) [q (+1)]: the static variables the outer loop optimises."""
        parts = [point.parameters]
        if self.free:
            parts.append(torch.tensor([point.horizon], dtype=self.dtype, device=self.device))
        return torch.cat(parts)

    def static_hessian(self, V0: torch.Tensor) -> torch.Tensor:
        """The Hessian [q (+1), q (+1)] in z = (p, T) of a function of the inner problem's initial state, from
        its Hessian V0 [K (n + q (+1)), same] in the samples' concatenated states: each sample carries a copy
        of z, and the copies move together."""
        d = self.n + self.static_dim
        return V0.reshape(self.K, d, self.K, d)[:, self.n:, :, self.n:].sum((0, 2))

    def static_bounds(self):
        """Lower and upper bounds of (p, T), each [q (+1)]."""
        low, high = [], []
        if self.q:
            lo, hi = self.problem.parameters.bounds(self.dtype, self.device)
            low.append(lo)
            high.append(hi)
        if self.free:
            ft = self.problem.free_time
            # T > 0 always: a tiny floor keeps the scaled dynamics meaningful.
            low.append(torch.tensor([max(ft.low, 1e-6 * ft.guess)], dtype=self.dtype, device=self.device))
            high.append(torch.tensor([ft.high], dtype=self.dtype, device=self.device))
        if not low:
            empty = torch.zeros(0, dtype=self.dtype, device=self.device)
            return empty, empty
        return torch.cat(low), torch.cat(high)

    def with_static(self, point: OuterPoint, z: torch.Tensor) -> OuterPoint:
        return point.with_(parameters=z[:self.q].clone(),
                           horizon=float(z[self.q]) if self.free else point.horizon)

    # ------------------------------------------------------------------ user functions on z
    def split(self, z: torch.Tensor):
        """x [..., n], p [..., q] or None, T [..., 1] or None from the inner state z."""
        n, q = self.n, self.q
        x = z[..., :n]
        p = z[..., n:n + q] if q else None
        T = z[..., n + q:n + q + 1] if self.free else None
        return x, p, T

    def time(self, s: torch.Tensor, T: Optional[torch.Tensor]) -> torch.Tensor:
        """The problem's time t of inner time s (t = s T with a free T; [..., 1] then, else 0-d)."""
        return s if T is None else s * T

    def _args(self, *args, p):
        return args if p is None else args + (p,)

    def _probe_time(self, fn) -> bool:
        """Whether fn(t, x, u[, p]) reads t (``pointwise.reads_time``, at x0 and the default parameters)."""
        from ..sweep.pointwise import reads_time

        x0 = self.problem.initial_state(self.dtype, self.device)
        p = None if not self.q else self.initial_point().parameters.expand(self.K, self.q)
        return reads_time(lambda t, x, u: fn(*self._args(t, x, u, p=p)), x0, self.problem.control_dim)

    def _at_time(self, fn, s, x, u, p, T):
        """fn(t, x, u[, p]) at the problem's time t of inner time s: t = s for a fixed T; t = s T with a
        free T, read from the first sample's T state (every sample carries the same T; the dynamics and
        costs scale by each sample's own copy, so dJ/dT is the sum of the copies' co-states). A function
        that does not read t gets s."""
        if T is None or not self._reads_time.get(fn, True):
            return fn(*self._args(s, x, u, p=p))
        # All samples share T: use the first one's (T is a state only to carry its co-state).
        t = s * T.reshape(-1)[0]
        return fn(*self._args(t, x, u, p=p))

    def terminal_values(self, x: torch.Tensor, p: Optional[torch.Tensor] = None) -> torch.Tensor:
        """All terminal constraint values [..., cT] at final states x [..., n]."""
        outs = [c.fn(*self._args(x, p=p)) for c in self.problem.terminal_constraints]
        return torch.cat(outs, dim=-1) if outs else x.new_zeros(x.shape[:-1] + (0,))

    def path_values(self, t, x, u, p=None) -> torch.Tensor:
        """All path constraint values [..., cP]."""
        outs = [c.fn(*self._args(t, x, u, p=p)) for c in self.problem.path_constraints]
        return torch.cat(outs, dim=-1) if outs else x.new_zeros(x.shape[:-1] + (0,))

    def path_multiplier(self, path: torch.Tensor, s: torch.Tensor, batch: int = 0) -> torch.Tensor:
        """mu(s), piecewise linear on the grid: [K, cP] for a 0-d inner time s; for times s [*S] of points
        [*S, *B, K, n] (``batch`` = len(B)), [*S, 1 (B times), K, cP]."""
        grid = self.grid
        flat = s.reshape(-1).contiguous()
        i = (torch.searchsorted(grid, flat, right=True) - 1).clamp(0, grid.numel() - 2)
        w = ((flat - grid[i]) / (grid[i + 1] - grid[i])).clamp(0, 1)[:, None, None]
        mu = (1 - w) * path.index_select(1, i).transpose(0, 1) + w * path.index_select(1, i + 1).transpose(0, 1)
        return mu[0] if s.ndim == 0 else mu.reshape(s.shape + (1,) * batch + mu.shape[1:])

    # ------------------------------------------------------------------ the inner problem
    def inner_problem(self, point: OuterPoint, constraints: bool = True) -> ControlProblem:
        """The ControlProblem of ``point``: time-scaled, parameters as states, constraints in the costs
        (``constraints=False``: without them)."""
        prob, free = self.problem, self.free
        f, L, Phi = prob.dynamics, prob.running_cost, prob.terminal_cost
        has_path = constraints and bool(self.path_sizes)
        has_terminal = constraints and bool(self.terminal_sizes or self.path_sizes)
        nu, rT, equal = point.terminal, point.terminal_penalty, self.terminal_equal
        mu_path, rP = point.path, point.path_penalty
        extra = self.static_dim

        def dynamics(s, z, u):
            x, p, T = self.split(z)
            dx = self._at_time(f, s, x, u, p, T)
            if not prob.has_controls:  # the dummy control of parameter estimation, read by nothing
                dx = dx + 0.0 * u[..., :1]
            if free:
                dx = T * dx
            return torch.cat([dx, z.new_zeros(z.shape[:-1] + (extra,))], dim=-1) if extra else dx

        def running(s, z, u):
            x, p, T = self.split(z)
            value = self._at_time(L, s, x, u, p, T) if L is not None else z.new_zeros(z.shape[:-1])
            if has_path:
                g = self._at_time(self.path_values, s, x, u, p, T)
                mu = self.path_multiplier(mu_path, s, z.ndim - s.ndim - 2)
                value = value + phr_inequality(g, mu, rP).sum(-1)
            return value * T[..., 0] if free else value

        def terminal(z):
            x, p, _ = self.split(z)
            value = Phi(*self._args(x, p=p)) if Phi is not None else z.new_zeros(z.shape[:-1])
            if has_terminal:
                c = self.terminal_values(x, p)
                if self.path_sizes:  # the path constraints at s = 1, at the frozen last control
                    _, _, T = self.split(z)
                    u_end = point.end_control
                    if u_end is None:
                        u_end = z.new_zeros(prob.control_dim if prob.has_controls else 1)
                    u_end = u_end.to(z).expand(z.shape[:-1] + u_end.shape[-1:])
                    end = self._at_time(self.path_values, z.new_tensor(self.inner_horizon), x, u_end, p, T)
                    c = torch.cat([c, end], dim=-1)
                value = value + torch.where(equal, nu * c + 0.5 * rT * c * c, phr_inequality(c, nu, rT)).sum(-1)
            return value

        def hinges(s, z, u):  # the path penalties' kinks: (max(0, a)^2 - mu^2) / (2 r) with a = mu + r g (T / r: time scaling)
            x, p, T = self.split(z)
            a = (self.path_multiplier(mu_path, s, z.ndim - s.ndim - 2)
                 + rP * self._at_time(self.path_values, s, x, u, p, T))
            w = (T if free else 1.0) / rP
            return a, w.expand_as(a)

        x0 = prob.initial_state(self.dtype, self.device)
        if extra:
            static = self.static(point).to(x0).expand(self.K, extra)
            x0 = torch.cat([x0, static], dim=-1)
        if prob.single_sample:
            x0 = x0[0]
        inner = ControlProblem(dynamics, x0, self.inner_horizon, prob.controls,
                               terminal if (Phi is not None or has_terminal) else None,
                               running if (L is not None or has_path) else None,
                               control_penalty=prob.control_penalty, name=prob.name)
        if has_path:
            inner.running_cost_hinges = hinges
        # only mu(s) reads the time: the points' times are taken as they are (the user's functions get s)
        inner.batched_time = not any(self._reads_time.values())
        return inner

    def initial_problem(self) -> ControlProblem:
        """The inner problem at the initial point (what ``ControlProblem`` checks)."""
        return self.inner_problem(self.initial_point())

    def objective_problem(self, point: OuterPoint) -> ControlProblem:
        """The inner problem without the constraint terms: its J is the problem's J."""
        return self.inner_problem(point, constraints=False)


def phr_inequality(c: torch.Tensor, mu: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """(max(0, mu + r c)^2 - mu^2) / (2 r): the Powell-Hestenes-Rockafellar term of c <= 0."""
    return (torch.clamp(mu + r * c, min=0) ** 2 - mu * mu) / (2 * r)

