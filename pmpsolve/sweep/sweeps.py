"""The sweeps of one iteration, as one object: ``Sweeper`` (docs/theory.md, engine steps 1-3).

``Sweeper`` combines the parts, each in its own module: the ODE layer
(``ode.py``: solver set-up on the mesh, the evaluation budget), the forward
sweep (``forward.py``) and the co-state strategies with the policy choosing
one (``costate.py``). What it adds is what every sweep shares: the result
types, the points where both sweeps sample their solution inside every interval
(the Gauss points of the interval Hamiltonian, and for the state also the
co-state's linearisation points; ``IntervalSamples``, from the solver itself),
the Hermite trajectories made of node values and end slopes for reading a
solution at any time (``trajectory.py``), the checks that turn a failed or
non-finite solve into NonFiniteError, and timing.

Forward:  dX/dt = f(t, X, u_t), X_0 = x0, running cost alongside (paper eq. 5).
Backward: dP/dt = -grad_x H(t, X(t), P, u_t), P_T = -grad Phi(X_T) (paper eq. 6).
"""
from __future__ import annotations

import time
from typing import NamedTuple, Optional

import torch

from .costate import CostatePolicy, linearisation_fractions
from ..errors import NonFiniteError
from .forward import solve_state
from .mesh import gauss_legendre
from .ode import DEFAULT_BUDGET, METHODS, ODE, EvaluationBudget, IntegrationFailure
from .pointwise import PointwiseProblem
from .shooting import NewtonRate, ShootingPolicy, predict_nodes, solve_state_shooting
from .trajectory import HermiteTrajectory, IntervalSamples

__all__ = ["ForwardSweep", "BackwardSweep", "Sweeper", "ODE_METHODS", "DEFAULT_BUDGET"]

ODE_METHODS = METHODS
#: Characters of a solver's message quoted in a NonFiniteError.
_QUOTED_CHARS = 200


class ForwardSweep(NamedTuple):
    """Result of a forward sweep for controls u."""

    states: HermiteTrajectory  # X(t) for reading at any time (O(h^4) inside intervals); values [N + 1, K, n]
    # (a distributed solve: this rank's K_r samples)
    cost: torch.Tensor  # J(u), 0-d (over all samples, all ranks)
    terminal_cost: torch.Tensor  # Phi(X_T^i) [K]
    running_cost: torch.Tensor  # int_0^T L(t, X^i, u) dt [K]
    evaluations: int  # right-hand-side evaluations
    seconds: float
    # X from the solver at the nodes and at the Sweeper's sample fractions (the Gauss and the
    # linearisation points); None for a forward sweep asked for J only (``samples=False``).
    samples: Optional[IntervalSamples] = None
    strategy: str = "sequential"  # "shooting" when multiple shooting gave it (``shooting.py``)
    controls: Optional[torch.Tensor] = None  # the u [N, m] swept
    transitions: Optional[torch.Tensor] = None  # d X(t_{n+1}) / d X(t_n) [N, K, n, n] (shooting), else None
    # what the Newton steps of the shooting sweeps this one descends from showed (``shooting.NewtonRate``)
    newton_rate: NewtonRate = NewtonRate()


class BackwardSweep(NamedTuple):
    """Result of a backward (co-state) sweep."""

    costates: HermiteTrajectory  # P(t) for reading at any time (O(h^4) inside intervals); values [N + 1, K, n]
    evaluations: int
    seconds: float
    samples: Optional[IntervalSamples] = None  # P from the solver at the nodes and the Gauss points


class Sweeper:
    """Runs the two sweeps of one problem on one mesh with one ODE solver setting.

    ``costate_policy``: chooses the co-state strategy per backward sweep (``costate.CostatePolicy``,
    or any object with its ``choose``); ``CostatePolicy(parallel=False)`` forces the sequential one.
    ``forward_policy``: when a forward sweep given start values runs by multiple shooting
    (``shooting.ShootingPolicy``); ``ShootingPolicy(enabled=False)`` keeps every one sequential.
    ``quadrature``: the Gauss points per interval of the interval data the sweeps feed
    (``hamiltonian.interval_data``): both sweeps sample their solution there.
    """

    def __init__(self, pointwise: PointwiseProblem, mesh: torch.Tensor, *, method: str = "dopri5",
                 rtol: float = 1e-8, atol: float = 1e-10, options: Optional[dict] = None, quadrature: int = 3):
        self.ode = ODE(mesh, method, rtol, atol, options)
        self.pw = pointwise
        self.mesh = mesh
        self.quadrature = quadrature
        #: Fractions of every interval where P is sampled (the Gauss points) and where X is (those and
        #: the co-state's linearisation points), increasing.
        self.gauss_fractions, self.gauss_weights = gauss_legendre(quadrature, mesh.dtype, mesh.device)
        self.state_fractions = torch.unique(torch.cat([self.gauss_fractions,
                                                       linearisation_fractions(mesh.dtype, mesh.device)]))
        self.costate_policy = CostatePolicy()
        self.forward_policy = ShootingPolicy()
        self._synchronize = self.pw.device.type == "cuda"

    # ----------------------------------------------------------------- forward
    def forward(self, u: torch.Tensor, *, iteration: Optional[int] = None,
                budget: Optional[int] = None, differentiable: bool = False, samples: bool = True,
                start: Optional[ForwardSweep] = None, cold_start: bool = False,
                nodes: Optional[torch.Tensor] = None) -> ForwardSweep:
        """Integrate the state (and the running cost) for controls u [N, m].

        ``budget``: raise SweepBudgetError after that many right-hand-side
        evaluations (default ``DEFAULT_BUDGET``; a trial control that makes the dynamics
        stiff or blow up is abandoned early instead of being integrated at great cost).
        ``differentiable``: keep the autograd graph through the solver steps, so that
        ``cost.backward()`` back-propagates through this discretisation (the gradient
        baselines use it; the PMP methods never do).
        ``samples``: also return X at the sample fractions of every interval (what a backward
        sweep and the interval data need); False when only J is wanted. J and the node values
        are the same either way (the solver takes the same steps).
        ``start``: the sweep of nearby controls (the current iterate's, for a trial step): its nodes
        are the start values of a multiple-shooting sweep where ``forward_policy`` allows one
        (``shooting.py``; J and X then agree with the sequential sweep's to the ODE tolerance), else
        the sweep is sequential. ``nodes`` [N + 1, K, n]: with ``start``, the start values to use instead
        of its nodes moved by the linear prediction (an update rule's own prediction of the trajectory of
        u, e.g. DDP's forward pass); ``nodes`` alone: the start values of a multiple-shooting sweep (the
        nodes of a solution of the same dynamics, e.g. for J of a problem without its penalty terms).
        ``cold_start``: the same with x0 held at every node as the start values (the solver's first sweep;
        more Newton steps allowed, ``ShootingPolicy.cold_newton``).
        """
        clock = self._clock()
        count = EvaluationBudget(budget, "forward", iteration)
        reducer = self.pw.reducer
        if differentiable and reducer.distributed:
            raise ValueError("a differentiable forward sweep (the gradient baselines) does not support a process group")
        state, strategy = None, "sequential"
        # In a distributed solve a failure on this rank is kept and raised on every rank by the one
        # collective that adds the ranks' parts of J (ErrorGuard); in one process it propagates as is.
        with reducer.guard() as guard:
            fractions = self.state_fractions if samples else None
            policy = self.forward_policy
            try:
                if (start is not None or nodes is not None or cold_start) and policy.applies(
                        self.pw, self.ode, differentiable=differentiable):
                    if start is not None or nodes is not None:
                        nodes, newton = (self._start_values(start, u) if nodes is None else nodes), policy.max_newton
                    else:
                        nodes, newton = self.pw.x0.expand(self.mesh.numel(), *self.pw.x0.shape), policy.cold_newton
                    try:
                        state = solve_state_shooting(self.pw, self.ode, u, count, nodes, fractions=fractions,
                                                     max_newton=newton, max_growth=policy.max_growth,
                                                     accept=policy.accept,
                                                     newton_rate=NewtonRate() if start is None else start.newton_rate)
                    except IntegrationFailure:
                        # Start values far from the trajectory can blow up an interval of stiff dynamics
                        # (x0 at every node, exp(-500 (h - 1)) in a drag law) that the sequential sweep,
                        # which starts each interval where the last one ended, integrates without trouble.
                        state = None
                strategy = "sequential" if state is None else "shooting"
                if state is None:  # not tried, or Newton did not converge: the sequential sweep
                    state = solve_state(self.pw, self.ode, u, count, differentiable=differentiable,
                                        fractions=fractions)
            except IntegrationFailure as err:
                raise self._failure(err, "forward", count, iteration) from err
            self._check_finite(state.values, state.cost, "forward", iteration)
            if samples:
                self._check_finite(state.interior, None, "forward", iteration)
        part = u.new_zeros(()) if state is None else state.cost
        (cost,) = reducer.totals(part, error=guard.error)
        X = state.values.detach()
        traj = HermiteTrajectory(self.mesh, X, state.slope_left, state.slope_right)
        sampled = IntervalSamples(self.mesh, X, self.state_fractions, state.interior) if samples else None
        return ForwardSweep(traj, cost, state.terminal_cost, state.running_cost, count.evaluations,
                            self._clock() - clock, sampled, strategy, u.detach(), state.transitions,
                            # a shooting sweep's record includes its start's; a sequential one passes it on
                            state.newton_rate or (NewtonRate() if start is None else start.newton_rate))

    def _start_values(self, start: ForwardSweep, u: torch.Tensor) -> torch.Tensor:
        """Shooting start values for controls u from a nearby sweep: its nodes, moved by the linear
        prediction of the control change where it has what that needs (``shooting.predict_nodes``)."""
        if start.transitions is None or start.controls is None or start.samples is None:
            return start.states.values
        return predict_nodes(self.pw, self.mesh, start.states.values, start.transitions,
                             start.samples.on_intervals(self.gauss_fractions), self.gauss_fractions,
                             self.gauss_weights, start.controls, u.detach())

    # ---------------------------------------------------------------- backward
    def backward(self, u: torch.Tensor, forward: ForwardSweep, *, iteration: Optional[int] = None,
                 budget: Optional[int] = None) -> BackwardSweep:
        """Integrate the co-state backwards from P_T = -grad_{X_T} J for controls u [N, m].

        ``budget``: raise SweepBudgetError after that many right-hand-side evaluations
        (default ``DEFAULT_BUDGET``): a co-state that grows without bound must not hang.
        """
        if forward.samples is None:
            raise ValueError("backward: the forward sweep was run with samples=False (J only); the co-state "
                             "needs X sampled inside the intervals")
        start = self._clock()
        count = EvaluationBudget(budget, "backward", iteration)
        strategy = self.costate_policy.choose(self.pw, self.mesh, self.ode)
        result = None
        with self.pw.reducer.guard() as guard:  # nothing to sum here: a status-only agreement across ranks
            try:
                P = strategy.solve(u, forward.samples, count, self.gauss_fractions)
            except IntegrationFailure as err:
                raise self._failure(err, "backward", count, iteration) from err
            result = self._backward_result(u, forward.states, P, count.evaluations, start, iteration)
        self.pw.reducer.agree(guard.error)
        return result

    def _backward_result(self, u, states, P: IntervalSamples, evaluations, start, iteration) -> BackwardSweep:
        """The sweep's result from P sampled by a strategy: the co-state trajectory (end slopes
        -grad_x H per interval) and the samples."""
        pw, mesh = self.pw, self.mesh
        self._check_finite(P.nodes, None, "backward", iteration)
        self._check_finite(P.interior, None, "backward", iteration)  # rows: intervals
        X, nodes = states.values, P.nodes
        slopes = []
        for end in (slice(None, -1), slice(1, None)):  # the left and the right end of every interval
            t, x, p = mesh[end], X[end], nodes[end]
            blocks = pw.point_blocks(t, x)  # cache-sized blocks of intervals: the same numbers, faster
            if len(blocks) == 1:
                slopes.append(-pw.hamiltonian(t, x, p, u, with_grad_x=True)[2].detach())
            else:
                slopes.append(-torch.cat([pw.hamiltonian(t[rows], x[rows], p[rows], u[rows], with_grad_x=True)[2]
                                          .detach() for rows in blocks]))
        traj = HermiteTrajectory(mesh, nodes, *slopes)
        return BackwardSweep(traj, evaluations, self._clock() - start, P)

    # --------------------------------------------------------------- internals
    @staticmethod
    def _failure(err: IntegrationFailure, sweep: str, count: EvaluationBudget, iteration) -> NonFiniteError:
        """The NonFiniteError for a solve that stopped (step underflow, non-finite state, step limit)."""
        text = str(err).splitlines()[0][:_QUOTED_CHARS]
        where = count.reached()
        if where is None:  # all intervals at once (the parallel co-state solve): no single time
            return NonFiniteError(f"the {sweep} sweep failed ({text}): the co-state blows up or is not finite",
                                  iteration=iteration, sweep=sweep, time=None)
        return NonFiniteError(f"the {sweep} sweep failed at t = {where} ({text}): the solution blows up or is "
                              "not finite there", iteration=iteration, sweep=sweep, time=where)

    def _check_finite(self, values: torch.Tensor, cost, sweep: str, iteration):
        # A finite sum means finite values (a sum with an inf or a NaN is not finite): one pass over the
        # values, 25x faster than isfinite (a bool tensor) and all; the rows are searched only when it is not.
        # One sync per check.
        if bool(torch.isfinite(values.sum())):
            bad = None
        else:
            bad = ~torch.isfinite(values.reshape(values.shape[0], -1)).all(dim=1)
        if bad is not None and bool(bad.any()):
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
