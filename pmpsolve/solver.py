"""The iteration shared by every update rule (paper Alg. 1-2): ``Solver`` and ``solve``.

One iteration (``Solver.step``): the co-state sweep of the current controls u^k (its
forward sweep is already there), the interval data at the quadrature points, the
first-order optimality measure of u^k (stop if it is met: that is what ``converged``
means), then the rule proposes u^{k+1}; a forward sweep re-simulates it (its J is
the reported cost) and the rule keeps or rejects it; the stopping tests
(``pmpsolve.update.stopping``) run after every kept step.

``Solver`` has the optax / diffrax shape: ``state = solver.init(u0)``, then
``state = solver.step(state)`` until ``state.done``, then ``solver.solution(state)``;
a study or a user can drive iterations one at a time. ``Solver.run`` is that loop with a
progress bar, the callback and Ctrl-C (and, on a finite control set, the relax-round-polish
driver, ``pmpsolve.update.relaxation``); ``solve`` is ``Solver(...).run(...)``. The settings are
objects (``pmpsolve.methods``, ``pmpsolve.options``) that check themselves on construction;
``Solver``'s constructor checks the rest and estimates the memory of an iteration
(``pmpsolve.sweep.memory``) before anything runs.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import time
import warnings
from typing import Callable, NamedTuple, Optional, Tuple, Union

import torch

from .arguments import initial_controls, outside_level, progress_bar, resolve_device
from .controls import Finite
from .deprecated import accepts_old_keywords
from .errors import NonFiniteError, SolveError, SweepBudgetError
from .update.hamiltonian import IntervalHamiltonian, interval_data
from .update.maximisers import HamiltonianMaximiser
from .sweep.memory import check_memory
from .sweep.mesh import make_mesh
from .methods import Method, as_method
from .update.optimality import is_optimal, optimality, optimality_scale
from .options import DEFAULT_TOLERANCES, ODE, Maximiser, Stop
from .sweep.pointwise import PointwiseProblem
from .problem import ControlProblem
from .sweep.reduce import distributed_reducer, refuse_user_set
from .update.relaxation import RelaxAndRound, relax_round_polish
from .solution import IterationRecord, Solution
from .update.stopping import StopReason, default_tests
from .update.rules import NoiseFloor
from .sweep.sweeps import ForwardSweep, Sweeper

__all__ = ["solve", "Solver", "SolverState", "DEFAULT_TOLERANCES"]

BUDGET_FACTOR = 5  # a sweep may cost this many times the same sweep at the previous iteration
MIN_EVALS_PER_INTERVAL = 8  # a sweep's budget never drops below this many evaluations per mesh interval
FIRST_SWEEP_EVALS = 50_000  # the budget of the first sweep of each kind (no previous one to compare with)


class Best(NamedTuple):
    """The iterate a solve returns: the lowest J seen (or the one certified optimal)."""

    cost: float
    controls: torch.Tensor  # [N, m]
    forward: ForwardSweep
    index: int  # of its record in the history


@dataclasses.dataclass(frozen=True)
class SolverState:
    """Where a solve stands after ``iteration`` iterations (an immutable record).

    controls, forward, cost: the current iterate u^k, its forward sweep and J(u^k).
    best: the iterate to return. history: one IterationRecord per iteration so far.
    measured: (backward sweep, interval data, optimality) of u^k once measured.
    rises, since_best, small_steps, change: what the stopping tests read.
    status, message: set when the solve is done ("converged", "max_iter", "stalled",
    "unbounded", "callback", "interrupted").

    Example: ``Solver.init`` and ``Solver.step`` return it.
        >>> import torch, pmpsolve as pmp
        >>> problem = pmp.ControlProblem(lambda t, x, u: u.clone(), torch.tensor([1.0]), 1.0, pmp.Reals(1),
        ...                              terminal_cost=lambda x: 2.5 * x[..., 0] ** 2,
        ...                              running_cost=lambda t, x, u: 0.5 * (u ** 2).sum(-1))
        >>> solver = pmp.Solver(problem, mesh=10)
        >>> state = solver.step(solver.init())
        >>> state.iteration, len(state.history), state.done
        (1, 2, False)
    """

    iteration: int
    controls: torch.Tensor
    forward: ForwardSweep
    cost: float
    best: Best
    history: Tuple[IterationRecord, ...]
    start: float
    measured: Optional[tuple] = None
    backward_evals: Optional[int] = None
    rises: int = 0
    since_best: int = 0
    small_steps: int = 0
    change: float = math.inf
    status: Optional[str] = None
    message: str = ""

    @property
    def done(self) -> bool:
        return self.status is not None


class Solver:
    """A solve set up for one problem: sweeps, maximiser, rule and stopping tests.

    Takes the settings of ``solve`` (``problem, method, mesh, ode, maximiser, stop, device,
    dtype, process_group``) and checks them all here; ``run`` takes the rest. With
    ``process_group`` every rank of the group builds its own Solver on its shard of the
    samples (see ``solve``); the constructor is then a collective (the ranks check they agree
    on the problem and settings).

    Example:
        >>> import torch, pmpsolve as pmp
        >>> p = pmp.ControlProblem(lambda t, x, u: u.clone(), torch.tensor([1.0]), 1.0, pmp.Reals(1),
        ...                        terminal_cost=lambda x: 2.5 * x[..., 0] ** 2,
        ...                        running_cost=lambda t, x, u: 0.5 * (u ** 2).sum(-1))
        >>> solver = pmp.Solver(p, mesh=10)
        >>> state = solver.init()
        >>> while not state.done:
        ...     state = solver.step(state)
        >>> round(solver.solution(state).cost, 6)   # 5/12
        0.416667
    """

    @accepts_old_keywords
    def __init__(self, problem: ControlProblem, *, method: Union[str, Method] = "emsa",
                 mesh: Union[int, torch.Tensor] = 200, ode: Optional[ODE] = None, maximiser: Optional[Maximiser] = None,
                 stop: Optional[Stop] = None, device=None, dtype: Optional[torch.dtype] = None,
                 process_group: Optional[torch.distributed.ProcessGroup] = None):
        if not isinstance(problem, ControlProblem):
            raise TypeError(f"solve: `problem` must be a pmpsolve.ControlProblem, got {type(problem).__name__}")
        if problem.constrained:
            raise TypeError("Solver: this problem has constraints, parameters or a free final time; pmp.solve "
                            "solves it by the augmented-Lagrangian loop (pmpsolve.constrained.ConstrainedSolver)")
        self.method = as_method(method)
        ode, self.maximiser_options, stopping = (_record(label, value, cls) for label, value, cls in (
            ("ode", ode, ODE), ("maximiser", maximiser, Maximiser), ("stop", stop, Stop)))
        dtype = torch.float64 if dtype is None else dtype
        if dtype not in DEFAULT_TOLERANCES:
            raise TypeError(f"solve: `dtype` must be torch.float64 or torch.float32, got {dtype!r}; half precision "
                            "(float16, bfloat16) is too coarse for the adaptive sweeps' error control")
        self.device, self.dtype = resolve_device(device), dtype
        self.ode, self.stopping = ode.resolved(dtype), stopping.resolved(dtype)
        self.problem = problem
        self.arguments = dict(method=self.method, ode=ode, maximiser=self.maximiser_options, stop=stopping,
                              device=device, dtype=dtype, process_group=process_group)
        self.pw = PointwiseProblem(problem, dtype, self.device)
        m = self.maximiser_options
        # Before the first sweep (and, for a number of intervals, before the mesh is allocated):
        # refuse a mesh whose iteration would not fit in memory, warn above half of it.
        shape = (self.pw.num_samples, problem.state_dim, problem.control_dim, m.quadrature, dtype, self.device)
        if isinstance(mesh, numbers.Integral) and not isinstance(mesh, bool) and mesh >= 1:
            check_memory(int(mesh), *shape)
        self.mesh = make_mesh(mesh, problem.horizon, dtype, self.device)
        if not isinstance(mesh, numbers.Integral):
            check_memory(self.mesh.numel() - 1, *shape)
        generator = m.generator()
        self.process_group = process_group
        if process_group is not None:
            refuse_user_set(problem)
            # Before the rule is built: it reads the global K (rho0 / K). Every random draw must be the
            # same on every rank (the ranks maximise the same objective): one seed for all.
            self.pw.reducer, seed = distributed_reducer(process_group, self.pw.num_samples, self.pw.state_dim,
                                                        problem.control_dim, self.mesh, self.settings, m.seed)
            generator = torch.Generator(device="cpu").manual_seed(seed)
        self.maximiser = HamiltonianMaximiser(problem.controls, max_iter=m.iterations, perturb=m.perturb, method=m.kind)
        self.rule = self.method.rule(self.pw, problem.controls, self.maximiser, generator, self.method.options())
        self.rule.noise = NoiseFloor(self.ode.rtol)
        self.sweeper = Sweeper(self.pw, self.mesh, method=self.ode.method, rtol=self.ode.rtol, atol=self.ode.atol,
                               options=self.ode.options, quadrature=m.quadrature)
        self.tests = default_tests(self.method.name, self.rule, self.stopping.stall_tol)
        #: the first sweep's multiple-shooting start values [N + 1, K, n] (the nodes of a nearby trajectory,
        #: e.g. the last solve's in a sequence of related problems), or None: x0 at every node (a cold start)
        self.start_nodes: Optional[torch.Tensor] = None

    def with_problem(self, problem: ControlProblem) -> "Solver":
        """A Solver with the same settings and mesh for another problem (the relaxation of a finite set)."""
        return Solver(problem, mesh=self.mesh, **self.arguments)

    @property
    def settings(self) -> dict:
        """Every setting of this solve, flat and JSON-friendly (what ``Solution.settings`` records)."""
        settings = {**self.method.settings(), "mesh": self.mesh.numel() - 1, **self.stopping.settings(),
                    **self.ode.settings(), "dtype": str(self.dtype), "device": str(self.device),
                    **self.maximiser_options.settings()}
        reducer = self.pw.reducer
        if reducer.distributed:  # ranks, samples and what the all-reduces cost so far
            settings["distributed"] = reducer.statistics()
        return settings

    # ------------------------------------------------------------------ iterations
    def init(self, init=None) -> SolverState:
        """The state at iteration 0: ``init`` as in ``solve`` (default: the set's default point), swept."""
        N, m = self.mesh.numel() - 1, self.problem.control_dim
        u = initial_controls(init, self.problem, N, m, self.dtype, self.device)
        start = time.perf_counter()
        if self.start_nodes is None:
            fw = self.sweeper.forward(u, iteration=0, cold_start=True)
        else:
            fw = self.sweeper.forward(u, iteration=0, nodes=self.start_nodes)
        cost = float(fw.cost)
        record = IterationRecord(0, cost, parameters=self.rule.parameters(), seconds=fw.seconds,
                                 elapsed=time.perf_counter() - start, forward_evals=fw.evaluations,
                                 forward_seconds=fw.seconds)
        state = SolverState(0, u, fw, cost, Best(cost, u, fw, 0), (record,), start)
        if self.stopping.max_iter == 0:
            state = dataclasses.replace(state, status="max_iter", message="reached max_iter = 0")
        return state

    def step(self, state: SolverState) -> SolverState:
        """One iteration (see the module); returns the new state (``done`` when the solve ends)."""
        if state.done:
            return state
        k, u, fw, N = state.iteration + 1, state.controls, state.forward, self.mesh.numel() - 1
        t_iter = time.perf_counter()
        state = self.measure(state)
        bw, data, measure = state.measured
        if is_optimal(measure, state.cost, self.stopping.tol, state.history[0].cost):
            # The certified iterate is the result (a rule without safeguard may have seen a lower
            # J on the way, at a point that was not optimal).
            return dataclasses.replace(state, best=Best(state.cost, u, fw, len(state.history) - 1),
                                       status="converged", message=f"first-order optimal at iteration {k - 1}")
        rule, cost = self.rule, state.cost
        rejected, fw_seconds, fw_evals, max_seconds = 0, 0.0, 0, 0.0
        evals_before = rule.evaluations
        t0 = time.perf_counter()
        rule.begin(self.sweeper, fw, bw)
        max_seconds += time.perf_counter() - t0
        while True:
            t0 = time.perf_counter()
            u_new = rule.propose(data).detach()
            max_seconds += time.perf_counter() - t0
            self._check_controls(u_new, k)
            t0 = time.perf_counter()
            # A trial sweep may cost a few times the current one's: more means the trial control makes
            # the dynamics stiff or blow up. An adaptive rule abandons such a trial (counted as rejected).
            budget = BUDGET_FACTOR * max(fw.evaluations, MIN_EVALS_PER_INTERVAL * N)
            try:
                fw_new = self.sweeper.forward(u_new, iteration=k, budget=budget, start=fw, nodes=rule.predicted_nodes())
            except (SweepBudgetError, NonFiniteError):
                if not rule.adaptive:
                    raise
                fw_new = None
            fw_seconds += time.perf_counter() - t0
            fw_evals += 0 if fw_new is None else fw_new.evaluations
            # the Hamiltonian gain of every trial for a rule that judges by it; else of the kept one only (the record)
            terms, gain = self._gain(data, u_new) if rule.judges_gain else (None, None)
            new_cost = math.inf if fw_new is None else float(fw_new.cost)
            if rule.judge(cost, new_cost, gain):
                break
            rejected += 1
            if rejected >= rule.max_rejections:
                record = self._record(k, cost, 0.0, None, u, u, rejected, t_iter, state.start, bw, fw_evals,
                                      rule.evaluations - evals_before, fw_seconds, max_seconds)
                return dataclasses.replace(
                    state, iteration=k, history=state.history + (record,), status="stalled",
                    message=f"no decrease of J found in {rejected} proposals at iteration {k} "
                            f"({describe(rule.parameters())})")
        if terms is None:
            terms, gain = self._gain(data, u_new)
        record = self._record(k, new_cost, gain, terms, u, u_new, rejected, t_iter, state.start, bw, fw_evals,
                              rule.evaluations - evals_before, fw_seconds, max_seconds)
        history = state.history + (record,)
        change = abs(new_cost - cost)
        improved = new_cost < state.best.cost
        state = SolverState(
            k, u_new, fw_new, new_cost, Best(new_cost, u_new, fw_new, k) if improved else state.best, history,
            state.start, None, state.backward_evals,
            rises=state.rises + 1 if (new_cost > cost and new_cost > history[0].cost + self._noise(history[0].cost))
            else 0,
            since_best=0 if improved else state.since_best + 1,
            small_steps=state.small_steps + 1 if change <= self.stopping.stall_tol * max(1.0, abs(new_cost)) else 0,
            change=change)
        for test in self.tests:
            stop = test(state)
            if stop is not None:
                return self.stop(state, stop)
        if k >= self.stopping.max_iter:
            return self.stop(state, StopReason("max_iter", f"reached max_iter = {self.stopping.max_iter}"))
        return state

    def measure(self, state: SolverState) -> SolverState:
        """The co-state sweep, interval data and optimality measure of the current iterate (once)."""
        if state.measured is not None:
            return state
        N = self.mesh.numel() - 1
        bw = self.sweeper.backward(state.controls, state.forward, iteration=state.iteration + 1,
                                   budget=relative_budget(state.backward_evals, N))
        data = interval_data(self.pw, state.controls, state.forward, bw, self.maximiser_options.quadrature)
        # First-order optimality of u^k (docs/guide.md): what `converged` rests on.
        measure = optimality(self.pw, data, self.problem.controls, self.maximiser)
        history = state.history[:-1] + (state.history[-1]._replace(optimality=measure),)
        return dataclasses.replace(state, measured=(bw, data, measure), backward_evals=bw.evaluations,
                                   history=history)

    def stop(self, state: SolverState, stop: StopReason) -> SolverState:
        """``state`` ended with ``stop`` (the result is still decided by the optimality measure)."""
        return dataclasses.replace(state, status=stop.status, message=stop.message)

    def interrupt(self, state: Optional[SolverState]) -> SolverState:
        """Like IPOPT's user stop: the best iterate so far is the result, marked as such."""
        return self.stop(state, StopReason("interrupted", f"interrupted (KeyboardInterrupt) after {state.iteration} "
                                                    "iterations"))

    # ------------------------------------------------------------------ the result
    def solution(self, state: SolverState) -> Solution:
        """The Solution of a finished state: the best iterate, re-measured if needed."""
        best, status, message = state.best, state.status or "max_iter", state.message
        if not self.rule.adaptive and best.cost < state.cost:
            message += f"; returned the best iterate (J = {best.cost:.10g}), not the last (J = {state.cost:.10g})"
        bw, measure = None, math.nan
        if state.measured is not None and state.controls is best.controls:
            bw, _, measure = state.measured
        else:
            try:
                bw = self.sweeper.backward(best.controls, best.forward)
                data = interval_data(self.pw, best.controls, best.forward, bw, self.maximiser_options.quadrature)
                measure = optimality(self.pw, data, self.problem.controls, self.maximiser)
            except KeyboardInterrupt:  # a second Ctrl-C: return without the co-state
                status, message = "interrupted", message + "; the final co-state sweep was interrupted too"
        history = list(state.history)
        history[best.index] = history[best.index]._replace(optimality=measure)
        tol = self.stopping.tol
        initial = state.history[0].cost
        converged = is_optimal(measure, best.cost, tol, initial)
        status = "converged" if converged else status
        message += (f"; first-order optimality {measure:.3g} {'<=' if converged else '>'} "
                    f"tol * max(1, min(|J|, |J(u^0)|)) = {tol * optimality_scale(best.cost, initial):.3g}")
        if not converged and self.stopping.max_iter > 0:
            warnings.warn(f"solve did not converge: {message}", RuntimeWarning, stacklevel=outside_level())
        # e.g. {"closed-form": 41}: what maximised the Hamiltonian
        settings = {**self.settings, "maximisers_used": dict(self.maximiser.used)}
        p = self.problem
        return Solution(cost=best.cost, controls=best.controls, mesh=self.mesh, history=history, converged=converged,
                        message=message, method=self.method.name, states_trajectory=best.forward.states,
                        costates_trajectory=None if bw is None else bw.costates, control_set=p.controls,
                        single_sample=p.single_sample, problem_name=p.name, settings=settings, problem=p,
                        optimality=measure, status=status)

    # ------------------------------------------------------------------ the loop
    def run(self, init=None, *, progress: bool = False, callback: Optional[Callable] = None) -> Solution:
        """``init``, then ``step`` until done, then ``solution``: what ``solve`` does (``init``,
        ``progress`` and ``callback`` as there). On a finite control set with ``init`` None or
        ``pmp.RelaxAndRound()``, the relax-round-polish driver (``pmpsolve.update.relaxation``)."""
        if isinstance(init, RelaxAndRound) or (init is None and isinstance(self.problem.controls, Finite)):
            return relax_round_polish(self, init or RelaxAndRound(), progress=progress, callback=callback)
        state = None
        reducer = self.pw.reducer
        label = f"{self.problem.name} [{self.method.name}]"
        bar = progress_bar(progress and reducer.rank == 0, self.stopping.max_iter, self.problem.name, self.method.name)
        try:
            # The first sweeps have no iteration to count yet (and are the longest at a large mesh): say so.
            _describe(bar, f"{label} forward sweep")
            state = self.init(init)
            if not state.done and bar is not None:
                _describe(bar, f"{label} co-state sweep")
                state = self.measure(state)  # what step() does first; measured once
            _describe(bar, label)
            while not state.done:
                previous = state.iteration
                state = self.step(state)
                if state.iteration == previous or state.history[-1].rejected >= self.rule.max_rejections:
                    continue  # no step was kept (converged at its start, or stalled on rejections)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix_str(f"J={state.cost:.8g} {describe(self.rule.parameters())}")
                # every rank stops if one rank's callback asks to (a collective only in a distributed solve)
                if callback is not None and reducer.any(callback(state.history[-1], state.controls)) and not state.done:
                    state = self.stop(state, StopReason("callback",
                                                        f"stopped by callback at iteration {state.iteration}"))
        except KeyboardInterrupt:
            if state is None:
                raise
            state = self.interrupt(state)
        except SolveError as err:
            if state is not None:
                err.attach(state.best.controls, state.best.cost, state.history)
            raise
        finally:
            if bar is not None:
                bar.close()
        return self.solution(state)

    # ------------------------------------------------------------------ internals
    def _noise(self, cost: float) -> float:
        """What J is known to: 10 times the sweeps' rtol, relative (a rise below it is no divergence: a rule
        that accepts steps within it near a solution, as DDP's line search does, must not be stopped as one)."""
        return NoiseFloor(self.ode.rtol).level(cost)

    def _check_controls(self, u: torch.Tensor, k: int) -> None:
        if not bool(torch.isfinite(u).all()):
            where = float(self.mesh[int((~torch.isfinite(u)).any(-1).nonzero()[0])])
            raise NonFiniteError(f"the Hamiltonian maximisation returned non-finite controls at t = {where:g}",
                                 iteration=k, sweep="maximisation", time=where)

    def _gain(self, data, u_new):
        """(the interval Hamiltonian's terms of u_new on the current sweep, its gain mu_k over u^k)."""
        terms = IntervalHamiltonian(self.pw, data, 0.0).terms(u_new, create_graph=False)
        terms = type(terms)(*(x.detach() for x in terms))
        return terms, float((terms.hamiltonian - data.hamiltonian).sum())

    def _record(self, k, cost, gain, terms, u_old, u_new, rejected, t_iter, start, bw, fw_evals, max_evals,
                fw_seconds, max_seconds) -> IterationRecord:
        now = time.perf_counter()
        return IterationRecord(
            iteration=k, cost=cost, hamiltonian_gain=gain,
            state_error=0.0 if terms is None else float(terms.state_error.sum()),
            costate_error=0.0 if terms is None else float(terms.costate_error.sum()),
            control_change=float((u_new - u_old).abs().max()) if u_new.numel() else 0.0,
            rejected=rejected, parameters=self.rule.parameters(), seconds=now - t_iter, elapsed=now - start,
            forward_evals=fw_evals, backward_evals=bw.evaluations, maximiser_evals=max_evals,
            forward_seconds=fw_seconds, backward_seconds=bw.seconds, maximise_seconds=max_seconds)


@accepts_old_keywords
def solve(problem: ControlProblem, method: Union[str, Method] = "emsa", *, mesh: Union[int, torch.Tensor] = 200,
          ode: Optional[ODE] = None, maximiser: Optional[Maximiser] = None, stop: Optional[Stop] = None, init=None,
          device=None, dtype: Optional[torch.dtype] = None, progress: bool = False,
          callback: Optional[Callable] = None,
          process_group: Optional[torch.distributed.ProcessGroup] = None) -> Solution:
    """Solve ``problem`` by the maximum principle, optimise-then-discretise.

    Args:
        problem: the ControlProblem.
        method: the update rule, an object with its options: ``pmp.EMSA(...)`` (extended MSA,
            paper Alg. 2; the default), ``pmp.MSA()`` (basic MSA, Alg. 1), ``pmp.SQH(...)``
            (sequential quadratic Hamiltonian), ``pmp.Gradient(...)`` (soft step, eq. 12 =
            gradient descent) or ``pmp.Rule(name, ...)`` (a registered rule). A name
            (``"emsa"``, ``"msa"``, ``"sqh"``, ``"gradient"``) means that object with its defaults.
        mesh: number of uniform control intervals N, or node times [N + 1] from 0 to T.
        ode: how the sweeps integrate, ``pmp.ODE(...)`` (default: dopri5, tolerances by dtype).
        maximiser: how the interval Hamiltonians are maximised, ``pmp.Maximiser(...)``.
        stop: when to stop and what ``converged`` means, ``pmp.Stop(...)`` (default:
            200 iterations, optimality tolerance by dtype).
        init: initial controls: [N, m], [m] (constant) or a number; default: 0, or the middle of
            a box that excludes 0. Must lie in the control set. On a ``pmp.Finite`` set the default
            is ``pmp.RelaxAndRound()``: the relaxation over the convex hull solved with the same
            settings and rounded by sum-up rounding; the solve then iterates on the set from there
            (``sol.relaxed_cost`` is the relaxed J). Given controls iterate on the set from them.
        device, dtype: where and in what precision to solve (default: the CPU, float64;
            float32 and float64 are supported).
        progress: show a tqdm progress bar (from the first forward sweep on).
        callback: called as ``callback(record, controls)`` after every iteration;
            return True to stop. A KeyboardInterrupt (Ctrl-C, or raised by the callback)
            returns the best solution so far with ``status="interrupted"``.
        process_group: None (default): one process. A ``torch.distributed`` ProcessGroup
            (e.g. ``torch.distributed.group.WORLD``): a data-parallel solve, called on every rank
            of the group with the same arguments except ``problem.x0`` [K_r, n], this rank's
            shard of one sample set. J is the mean over all K = sum K_r samples; every sum over
            samples is all-reduced (one fused buffer per evaluation), so every rank takes the
            same decisions and returns the same controls and J; trajectories hold this rank's
            samples. An error on one rank is raised on every rank. Collectives wait at most the
            group's timeout (``init_process_group(timeout=...)``). See docs/distributed.md.

    The flat keywords of earlier releases (``max_iter=``, ``rho=``, ``ode_method=``, ``tol=``,
    ``seed=``, ...) still work for one release, with a DeprecationWarning
    (``pmpsolve.deprecated`` maps each onto its object); any other keyword is refused.

    Returns:
        A Solution; ``sol.converged`` is True only when the returned controls are first-order
        optimal (``pmp.Stop``'s ``tol``), ``sol.status`` says why the solve stopped ("converged",
        "max_iter", "stalled", "unbounded" (J fell far below J(u^0): the problem looks unbounded
        below), "callback" or "interrupted"). Raises NonFiniteError if a sweep
        blows up, SweepBudgetError if a sweep needs far more work than before (e.g. an
        unbounded problem), DivergenceError if a method without safeguard (basic MSA, fixed
        rho) diverges (each carries the best controls found so far), and IterationMemoryError
        before the first sweep when an iteration would not fit in memory.

    Example: x' = u, x(0) = 1, J = 5/2 x(1)^2 + 1/2 int_0^1 u^2 dt, whose optimum is J* = 5/12.
        >>> import torch, pmpsolve as pmp
        >>> problem = pmp.ControlProblem(lambda t, x, u: u.clone(), torch.tensor([1.0]), 1.0, pmp.Reals(1),
        ...                              terminal_cost=lambda x: 2.5 * x[..., 0] ** 2,
        ...                              running_cost=lambda t, x, u: 0.5 * (u ** 2).sum(-1))
        >>> sol = pmp.solve(problem, mesh=10)
        >>> round(sol.cost, 6), sol.converged, tuple(sol.controls.shape)
        (0.416667, True, (10, 1))
    """
    if not isinstance(problem, ControlProblem):
        raise TypeError(f"solve: `problem` must be a pmpsolve.ControlProblem, got {type(problem).__name__}")
    if callback is not None and not callable(callback):
        raise TypeError(f"solve: `callback` must be callable or None, got {type(callback).__name__}")
    if problem.constrained:
        from .constrained.outer import ConstrainedSolver

        solver = ConstrainedSolver(problem, method=method, mesh=mesh, ode=ode, maximiser=maximiser, stop=stop,
                                   device=device, dtype=dtype, process_group=process_group)
    else:
        solver = Solver(problem, method=method, mesh=mesh, ode=ode, maximiser=maximiser, stop=stop, device=device,
                        dtype=dtype, process_group=process_group)
    return solver.run(init, progress=progress, callback=callback)


def relative_budget(previous: Optional[int], N: int) -> int:
    """Right-hand-side evaluations a sweep may take: a multiple of the same sweep's cost at the previous
    iteration (or an absolute cap for the first one). Beyond it the sweep is stopped with an error that
    carries the best controls: a co-state that grows without bound (an unbounded problem) must not hang."""
    if previous is None:
        return max(FIRST_SWEEP_EVALS, MIN_EVALS_PER_INTERVAL * BUDGET_FACTOR * N)
    return BUDGET_FACTOR * max(previous, MIN_EVALS_PER_INTERVAL * N)


def _record(label: str, value, cls):
    """``ode=``, ``maximiser=`` or ``stop=`` as its record (None: the defaults)."""
    if value is None:
        return cls()
    if not isinstance(value, cls):
        raise TypeError(f"solve: `{label}` must be a pmp.{cls.__name__}(...) or None, got {value!r}; "
                        f"e.g. {label}=pmp.{cls.__name__}()")
    return value


def _describe(bar, text: str) -> None:
    if bar is not None:
        bar.set_description_str(text, refresh=True)


def describe(parameters) -> str:
    """A rule's parameters for a progress bar or a message, e.g. 'rho=0.5'."""
    return " ".join(f"{k}={v:.3g}" for k, v in parameters.items())
