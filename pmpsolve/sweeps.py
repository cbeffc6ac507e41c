"""Forward (state) and backward (co-state) sweeps (docs/theory.md, engine steps 1-3).

Forward:  dX/dt = f(t, X, u_t), X_0 = x0, with the running cost integrated
alongside as one more component, so that J comes out of the same adaptive
solve (paper eq. 5).
Backward: dP/dt = -grad_x H(t, X(t), P, u_t), P_T = -grad Phi(X_T) (paper eq. 6),
with X(t) read from the Hermite trajectory of the forward sweep.

Controls are piecewise constant, so the interior mesh nodes are passed to the
adaptive solvers as ``jump_t``: no step crosses a control discontinuity, and
f is re-evaluated on the new side after each node. Fixed-grid solvers step
node to node with ``perturb=True`` (their first and last stages look just
inside the interval). Right-hand sides look the control up with
``torch.searchsorted``: no host syncs inside them.
"""
from __future__ import annotations

import time
from typing import NamedTuple, Optional

import torch
from torchdiffeq._impl.solvers import FixedGridODESolver

from .errors import NonFiniteError, SolveError, SweepBudgetError
from .mesh import interval_index
from .ode import METHODS, integrate, is_adaptive
from .pointwise import PointwiseProblem
from .trajectory import HermiteTrajectory

__all__ = ["ForwardSweep", "BackwardSweep", "Sweeper", "ODE_METHODS"]

ODE_METHODS = METHODS
_MAX_STEPS = 200_000  # per mesh interval; a blow-up ends in an error, not a hang
_LINEAR_DEGREE = 5  # polynomial degree of A(t), b(t) per interval in the backward sweep
_LINEAR_MAX_ELEMENTS = 20_000_000  # above this the co-state right-hand side uses autograd per evaluation
_PARALLEL_MAX = 600  # K * n * (n + 1) up to which the linear co-state sweep runs over all intervals at once


#: Right-hand-side evaluations a sweep may take when no budget is given (a first sweep, or
#: ``pmp.cost``): a blow-up or a stiff problem ends in a SweepBudgetError within seconds.
DEFAULT_BUDGET = 50_000


class ForwardSweep(NamedTuple):
    """Result of a forward sweep for controls u."""

    states: HermiteTrajectory  # X(t); values [N + 1, K, n]
    cost: torch.Tensor  # J(u), 0-d
    terminal_cost: torch.Tensor  # Phi(X_T^i) [K]
    running_cost: torch.Tensor  # int_0^T L(t, X^i, u) dt [K]
    evaluations: int  # right-hand-side evaluations
    seconds: float


class BackwardSweep(NamedTuple):
    """Result of a backward (co-state) sweep."""

    costates: HermiteTrajectory  # P(t); values [N + 1, K, n]
    evaluations: int
    seconds: float


class Sweeper:
    """Runs the two sweeps of one problem on one mesh with one ODE solver setting."""

    def __init__(self, pointwise: PointwiseProblem, mesh: torch.Tensor, *, method: str = "dopri5",
                 rtol: float = 1e-8, atol: float = 1e-10, options: Optional[dict] = None):
        if method not in METHODS:
            raise ValueError(f"`ode_method` must be one of the torchdiffeq methods {sorted(METHODS)}, got {method!r}")
        self.pw = pointwise
        self.mesh = mesh
        self.method, self.rtol, self.atol = method, float(rtol), float(atol)
        self.options = dict(options or {})
        from torchdiffeq._impl.odeint import SOLVERS

        if is_adaptive(method):
            if mesh.numel() > 2:
                self.options.setdefault("jump_t", mesh[1:-1])
            self.options.setdefault("max_num_steps", _MAX_STEPS)
        elif issubclass(SOLVERS[method], FixedGridODESolver):
            step = self.options.pop("step_size", None)
            if step is None or not float(step) > 0:
                raise ValueError(
                    f"ode_method={method!r} is a fixed-step method and needs a step size: pass "
                    f"ode_options={{'step_size': h}} with h > 0, e.g. h = {float(mesh[-1]) / (10 * (mesh.numel() - 1)):.3g} "
                    f"(10 steps per mesh interval); got {step!r}. Without one it would take a single step per "
                    "interval and report an inaccurate J. Or use an adaptive method such as 'dopri5'")
            # Steps end on every mesh node (the control jumps there): each interval gets ceil(h_n / step) steps.
            self.options["grid_constructor"] = _grid_on_nodes(float(step))
            self.options.setdefault("perturb", True)
        self._synchronize = self.pw.device.type == "cuda"
        #: the linear co-state sweep over all intervals at once (``_parallel_linear_costate``)
        self.parallel_costate = True
        self._last_t: Optional[torch.Tensor] = None

    # ----------------------------------------------------------------- forward
    def forward(self, u: torch.Tensor, *, iteration: Optional[int] = None,
                budget: Optional[int] = None, differentiable: bool = False) -> ForwardSweep:
        """Integrate the state (and the running cost) for controls u [N, m].

        ``budget``: raise SweepBudgetError after that many right-hand-side
        evaluations (a trial control that makes the dynamics stiff or blow up is
        abandoned early instead of being integrated at great cost).
        ``differentiable``: keep the autograd graph through the solver steps, so that
        ``cost.backward()`` back-propagates through this discretisation (the gradient
        baselines use it; the PMP methods never do).
        """
        pw, mesh = self.pw, self.mesh
        K, n = pw.num_samples, pw.state_dim
        evals = [0]
        start = self._clock()
        count = self._counter(evals, budget, "forward", iteration)

        def rhs(t, z):
            count(t)
            un = u[interval_index(mesh, t)]
            if not pw.has_running_cost:
                return pw.dynamics(t, z, un)
            x = z[:, :n]
            return torch.cat([pw.dynamics(t, x, un), pw.running_cost(t, x, un).unsqueeze(-1)], dim=-1)

        z0 = pw.x0 if not pw.has_running_cost else torch.cat([pw.x0, pw.x0.new_zeros(K, 1)], dim=-1)
        with torch.enable_grad() if differentiable else torch.no_grad():
            Z = self._integrate(rhs, z0, mesh, "forward", iteration)  # [N + 1, K, n (+1)]
            X = Z[..., :n]
            running = Z[-1, :, n] if pw.has_running_cost else X.new_zeros(K)
            terminal = pw.terminal_cost(X[-1])
            cost = (terminal + running).mean()
            penalty = pw.problem.control_penalty
            if penalty is not None:  # int c |u|: exact for piecewise-constant controls
                cost = cost + ((mesh[1:] - mesh[:-1]) * penalty.value(u)).sum()
            # End slopes of each interval, both with that interval's control (f jumps at nodes).
            slope_left = pw.dynamics(mesh[:-1], X[:-1].detach(), u.detach()).detach()
            slope_right = pw.dynamics(mesh[1:], X[1:].detach(), u.detach()).detach()
        self._check_finite(X, cost, "forward", iteration)
        traj = HermiteTrajectory(mesh, X.detach(), slope_left, slope_right)
        return ForwardSweep(traj, cost, terminal, running, evals[0], self._clock() - start)

    # ---------------------------------------------------------------- backward
    def backward(self, u: torch.Tensor, forward: ForwardSweep, *, iteration: Optional[int] = None,
                 budget: Optional[int] = None) -> BackwardSweep:
        """Integrate the co-state backwards from P_T = -grad_{X_T} J for controls u [N, m].

        ``budget``: raise SweepBudgetError after that many right-hand-side evaluations
        (default ``DEFAULT_BUDGET``): a co-state that grows without bound must not hang.
        """
        pw, mesh, states = self.pw, self.mesh, forward.states
        evals = [0]
        start = self._clock()
        count = self._counter(evals, budget, "backward", iteration)
        N, K, n_state = mesh.numel() - 1, pw.num_samples, pw.state_dim
        if N * (_LINEAR_DEGREE + 1) * K * n_state * (n_state + 1) <= _LINEAR_MAX_ELEMENTS:
            # P' = -A(t)^T P + b(t) is linear in P; A = df/dx and b = grad_x L / K are smooth inside each
            # interval (X is, and u is constant), so they are sampled once, for all intervals at once, at
            # Chebyshev points and kept as degree-5 polynomials: no autograd inside the right-hand side.
            A_coef, b_coef = self._linearisation_polynomials(u, states)
            # One coefficient matrix per interval: [N, d + 1, K * (n * n + n)], A transposed for P' = -A^T P + b.
            coef = torch.cat([(-A_coef).transpose(-1, -2).reshape(N, _LINEAR_DEGREE + 1, -1),
                              b_coef.reshape(N, _LINEAR_DEGREE + 1, -1)], dim=-1)
            inv_h = 1.0 / (mesh[1:] - mesh[:-1])
            powers = torch.arange(_LINEAR_DEGREE + 1, device=mesh.device, dtype=mesh.dtype)
            split = K * n_state * n_state
            pT = pw.costate_terminal(states.values[-1])
            # All intervals at once pays where the per-step overhead of N sequential restarts dominates:
            # few samples and a small state (measured: lqr K = 1 25x faster, K = 100 1.7x; the sine
            # network, n = 5, is slower that way from K = 30 on, 3.9x at K = 1000).
            if is_adaptive(self.method) and self.parallel_costate and K * n_state * (n_state + 1) <= _PARALLEL_MAX:
                with torch.no_grad():
                    P = self._parallel_linear_costate(coef, split, pT, count, iteration)
                return self._backward_result(u, states, P, evals[0], start, iteration)

            def rhs(t, p):
                count(t)
                n = interval_index(mesh, t)
                z = (2 * (t - mesh[n]) * inv_h[n] - 1) ** powers  # [d + 1], Chebyshev variable in [-1, 1]
                values = z @ coef[n]  # [K * (n * n + n)]
                M = values[:split].view(K, n_state, n_state)
                return (M @ p.unsqueeze(-1)).squeeze(-1) + values[split:].view(K, n_state)
        else:
            def rhs(t, p):
                count(t)
                n = interval_index(mesh, t)
                _, _, gx = pw.hamiltonian(t, states.at(t, n), p, u[n], with_grad_x=True)
                return -gx

        pT = pw.costate_terminal(states.values[-1])
        with torch.no_grad():
            P = self._integrate(rhs, pT, mesh.flip(0), "backward", iteration).flip(0)  # [N + 1, K, n]
        return self._backward_result(u, states, P, evals[0], start, iteration)

    def _backward_result(self, u, states, P, evaluations, start, iteration) -> BackwardSweep:
        """The co-state trajectory from P at the nodes [N + 1, K, n]: end slopes -grad_x H per interval."""
        pw, mesh = self.pw, self.mesh
        self._check_finite(P, None, "backward", iteration)
        X = states.values
        _, _, g_left = pw.hamiltonian(mesh[:-1], X[:-1], P[:-1], u, with_grad_x=True)
        _, _, g_right = pw.hamiltonian(mesh[1:], X[1:], P[1:], u, with_grad_x=True)
        traj = HermiteTrajectory(mesh, P, -g_left.detach(), -g_right.detach())
        return BackwardSweep(traj, evaluations, self._clock() - start)

    def _parallel_linear_costate(self, coef, split, pT, count, iteration) -> torch.Tensor:
        """P at every node [N + 1, K, n] for P' = M(t) P + c(t), all intervals at once.

        On interval n, with t = t_{n+1} - sigma h_n (sigma from 0 to 1), the co-state obeys an affine
        map P(t_n) = Phi_n P(t_{n+1}) + r_n. Y = [Phi | r] ([N, K, n, n + 1]) comes from one adaptive
        solve for all intervals: dY/dsigma = -h_n (M Y + [0 | c]), Y(0) = [I | 0]; the Chebyshev
        variable z = 1 - 2 sigma is the same on every interval. The maps are then chained,
        P_n = F_n(F_{n+1}(... F_{N-1}(P_T))), by an associative suffix scan: log2(N) batched
        compositions. This replaces N sequential restarted solves (>= 6 stages each) by one solve
        of a few steps; the step control takes the worst interval's error (max over intervals of
        the per-interval RMS norm the sequential sweep uses).
        """
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
        options = {k: v for k, v in self.options.items() if k not in ("jump_t", "first_step", "step_t")}
        options["norm"] = lambda e: e.reshape(N, -1).pow(2).mean(-1).sqrt().amax()
        unit = torch.tensor([0.0, 1.0], dtype=mesh.dtype, device=mesh.device)
        try:
            Y = integrate(rhs, Y0, unit, rtol=self.rtol, atol=self.atol, method=self.method, options=options)[-1]
        except SolveError:
            raise
        except (AssertionError, RuntimeError, FloatingPointError) as err:
            raise NonFiniteError(f"the backward sweep failed ({str(err).splitlines()[0][:200]}): the co-state "
                                 "blows up or is not finite", iteration=iteration, sweep="backward", time=None) from err
        Phi, r = Y[..., :n], Y[..., n]  # [N, K, n, n], [N, K, n]
        d = 1
        while d < N:  # Hillis-Steele: after this step G_j covers F_j ... F_{j + 2d - 1}
            head_Phi, head_r = Phi[: N - d], r[: N - d]
            r = torch.cat([(head_Phi @ r[d:].unsqueeze(-1)).squeeze(-1) + head_r, r[N - d:]])
            Phi = torch.cat([head_Phi @ Phi[d:], Phi[N - d:]])
            d *= 2
        P = (Phi @ pT.unsqueeze(-1)).squeeze(-1) + r  # [N, K, n]
        return torch.cat([P, pT.unsqueeze(0)])

    # --------------------------------------------------------------- internals
    def _counter(self, evals: list, budget: Optional[int], sweep: str, iteration):
        """A function each right-hand side calls first: counts evaluations into ``evals[0]`` and
        raises SweepBudgetError past ``budget`` (our own limit: torchdiffeq's step limit is a bare
        assert, gone under ``python -O``)."""
        limit = DEFAULT_BUDGET if budget is None else int(budget)
        self._last_t = None  # the time this sweep reached (None: all intervals at once, no single time)

        def count(t):
            evals[0] += 1
            if t is not None:
                self._last_t = t
            if evals[0] > limit:
                where = None if self._last_t is None else float(self._last_t)
                raise SweepBudgetError(
                    f"the {sweep} sweep needed more than {limit} right-hand-side evaluations"
                    + ("" if where is None else f" (it reached t = {where:.6g})")
                    + f": the {'state' if sweep == 'forward' else 'co-state'} grows without bound or the "
                    "dynamics are stiff. If J kept decreasing, the problem may be unbounded below (check the costs "
                    "and bounds); for stiff dynamics see docs/guide.md, section 'Stiff problems'",
                    iteration=iteration, sweep=sweep, budget=limit, time=where)

        return count

    def _linearisation_polynomials(self, u, states):
        """Monomial coefficients in z = 2 (t - t_n) / h_n - 1 of A and b on every interval:
        [N, d + 1, K, n, n] and [N, d + 1, K, n], from values at d + 1 Chebyshev points."""
        mesh, d = self.mesh, _LINEAR_DEGREE
        j = torch.arange(d + 1, dtype=mesh.dtype, device=mesh.device)
        z = torch.cos((2 * j + 1) * torch.pi / (2 * (d + 1)))  # Chebyshev points in (-1, 1)
        times = mesh[:-1, None] + (mesh[1:] - mesh[:-1])[:, None] * (z + 1) / 2  # [N, d + 1]
        X = states.on_intervals((z + 1) / 2)  # [N, d + 1, K, n]
        A, b = self.pw.linearisation(times, X, u)
        inverse = torch.linalg.inv(z[:, None] ** j)  # values -> coefficients
        return torch.einsum("cj,njkab->nckab", inverse, A), torch.einsum("cj,njka->ncka", inverse, b)

    def _integrate(self, rhs, y0, times, sweep: str, iteration):
        try:
            return integrate(rhs, y0, times, rtol=self.rtol, atol=self.atol, method=self.method,
                             options=self.options)
        except SolveError:
            raise
        except (AssertionError, RuntimeError, FloatingPointError) as err:
            text = str(err)
            if "underflow" in text or "non-finite" in text or "max_num_steps" in text or "nan" in text.lower():
                where = None if self._last_t is None else float(self._last_t)
                raise NonFiniteError(
                    f"the {sweep} sweep failed at t = {where} ({text.splitlines()[0][:200]}): the solution "
                    "blows up or is not finite there", iteration=iteration, sweep=sweep, time=where) from err
            raise

    def _check_finite(self, values: torch.Tensor, cost, sweep: str, iteration):
        bad = ~torch.isfinite(values.reshape(values.shape[0], -1)).all(dim=1)  # one sync per sweep
        if bool(bad.any()):
            first = int(bad.nonzero()[0]) if sweep == "forward" else int(bad.nonzero()[-1])
            t = float(self.mesh[first])
            raise NonFiniteError(f"the {sweep} sweep produced non-finite values at t = {t:g}",
                                 iteration=iteration, sweep=sweep, time=t)
        if cost is not None and not bool(torch.isfinite(cost)):
            raise NonFiniteError(f"the cost J is not finite (terminal cost at t = {float(self.mesh[-1]):g})",
                                 iteration=iteration, sweep=sweep, time=float(self.mesh[-1]))

    def _clock(self) -> float:
        if self._synchronize:
            torch.cuda.synchronize(self.pw.device)
        return time.perf_counter()


def _grid_on_nodes(step: float):
    """A torchdiffeq ``grid_constructor``: the output times (the mesh nodes) subdivided into steps of
    at most ``step``, so that no fixed step crosses a node where the control jumps."""
    def construct(func, y0, t):
        h = t[1:] - t[:-1]
        counts = torch.ceil(h.abs() / step).clamp_min(1).long()  # [N] steps per interval
        interval = torch.repeat_interleave(torch.arange(h.numel(), device=t.device), counts)
        first = torch.cumsum(counts, 0) - counts  # index of each interval's first step
        position = torch.arange(interval.numel(), device=t.device) - first[interval]
        inner = t[:-1][interval] + h[interval] * position.to(t.dtype) / counts[interval].to(t.dtype)
        return torch.cat([inner, t[-1:]])

    return construct
