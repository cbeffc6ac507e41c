"""The augmented-Lagrangian loop: constraints, a free final time and static parameters.

Each round solves the transcribed problem (``transcription``) at fixed multipliers with the
ordinary Solver, warm-started from the previous round's controls and rule parameters and
stopped at a tolerance that tightens round by round (inexact inner solves, as ALGENCAN does);
then, from that solve's trajectories:

1. the constraints are measured: psi(x(T)) and g on the multiplier grid and between it
   (``CHECK_FRACTIONS``); ``violation`` is the largest violation anywhere;
2. the multipliers take the first-order step nu += r psi, mu = max(0, mu + r c) (pointwise on
   the grid for path constraints, and for their end values g(T), which the inner problems
   penalise as terminal inequalities: a state constraint active at T only, as Goddard's v >= 0
   at the apex, is violated in a window the integral penalty does not see);
3. a penalty grows tenfold only for the constraint groups (terminal, path) whose violation did
   not halve, so a well-behaved group keeps a well-conditioned inner problem, and only after an
   inner solve that settled (converged, or stalled with its measure at most 1e-3 max(1, |J|));
4. T and p take projected quasi-Newton steps on the merit function: the gradient is the
   co-state of their states at s = 0 (dJ/dz0 = -sum_i P_i(0)), the curvature DDP's value function
   at the first node after a DDP inner solve, else a BFGS estimate from the steps' gradients, each
   entry's step at most half of its size (|T|, max(|p_i|, 1)), a quarter with DDP's curvature.

The solve is ``converged`` when the violation is at most ``Stop.violation_tol`` and the
first-order measure of the Lagrangian (the inner solve's optimality measure, which at the
updated multipliers is the Lagrangian's, and the projected gradient in (p, T)) is at most
``tol * max(1, |J|)``. When the penalties grow and the violation stops decreasing the problem
is declared ``infeasible``: the least-violation iterate is returned with the constraint that
is violated most named in the message. When ten rounds near feasibility gain neither violation nor
measure (a first-order inner rule on a stiff state-constraint penalty) the loop ends ``stalled``.
"""
from __future__ import annotations

import dataclasses
import time
import warnings
from typing import Callable, List, NamedTuple, Optional

import torch

from ..arguments import outside_level, resolve_device
from ..controls import Box, Reals
from ..methods import as_method
from ..options import DEFAULT_TOLERANCES, ODE, Maximiser, Stop
from ..solution import Solution
from ..sweep.trajectory import HermiteTrajectory
from ..update.rules import anderson_mixture
from .transcription import CHECK_FRACTIONS, GRID_FRACTIONS, OuterPoint, Transcription

__all__ = ["ConstrainedSolver", "Round", "DEFAULT_VIOLATION_TOL"]

#: ``Stop.violation_tol`` by dtype: the largest constraint violation a converged solve may leave
DEFAULT_VIOLATION_TOL = {torch.float64: 1e-6, torch.float32: 1e-4}
MAX_ROUNDS = 60
#: Anderson memory of the multiplier updates (0: plain first-order updates)
ANDERSON_MEMORY = 5
#: quasi-Newton steps in z = (p, T) per round, and halvings of one step
STATIC_STEPS, LINE_SEARCH_STEPS = 8, 4
#: the largest step of an entry of z, as a fraction of its size (``_StaticStep.size``): with BFGS's curvature, and
#: with the inner rule's (exact at z only: the brachistochrone's merit has 0.22 at T = 2 and 12.6 at T* = 1.80)
STATIC_LIMIT, STATIC_LIMIT_LOCAL = 0.5, 0.25
#: iterations of one inner solve, by method (default: the remaining budget). A Newton-type inner solve that
#: has not converged in this many has stalled on the penalty's kinks (DDP on Goddard at N = 200 and large
#: penalties: 770 iterations in one solve with J fixed to 8 digits); the next round's multipliers help more.
ROUND_ITERATIONS = {"ddp": 50}
PENALTY_GROWTH = 10.0
PENALTY_MAX = 1e9
#: an inner solve stops at max(INNER_TOL_FLOOR * tol, INNER_TOL0 * INNER_TOL_SHRINK**k) in round k: below
#: ``tol`` in the end, since the violation left by an inner solve scales with its optimality measure
INNER_TOL0, INNER_TOL_SHRINK, INNER_TOL_FLOOR = 1e-2, 0.1, 0.01
#: rounds in a row in which the penalty grew and the violation fell by less than 10 %: infeasible
STUCK_ROUNDS = 4
#: rounds in a row whose inner solve stalled at once (at most one iteration): the loop stops ("stalled")
IDLE_ROUNDS = 3
#: ... while the violation is above this multiple of ``violation_tol`` (below it, tighter inner solves help)
STUCK_FACTOR = 100.0
#: rounds in a row near feasibility (violation at most STUCK_FACTOR * violation_tol) in which neither the violation
#: (above violation_tol) nor the first-order measure fell to half its best in the earlier such rounds: the loop stops
#: ("stalled"). E-MSA on Bryson-Denham (mesh 200) met the violation in round 21 and kept its measure at 1e-2 to the
#: 60th round; at mesh 20 and 40 the violation stayed at 7e-5 and 3e-6 (docs/theory.md, "Which inner method").
FLAT_ROUNDS = 10
#: an inner solve that stalled with its optimality measure at most this times max(1, |J|) settled its round for
#: the penalty growth as a converged one does: E-MSA stalls on a penalised state constraint near the round's
#: minimiser, and with the penalty frozen at 1e4 Bryson-Denham's violation fell 3-8 % a round (1.2e-4 after 60
#: rounds at mesh 200; 7e-7 when it grows). Anderson mixing of the multipliers still waits for a converged one
#: (with it Goddard's rocket took 986 iterations instead of 811).
SETTLED_MEASURE = 1e-3


class Round(NamedTuple):
    """One round of the outer loop (``sol.rounds``)."""

    round: int
    iterations: int
    cost: float          # J of the problem (without constraint terms)
    merit: float         # the augmented Lagrangian the inner solve minimised
    violation: float
    worst: str           # the constraint violated most
    optimality: float    # the inner solve's measure (the Lagrangian's, at the updated multipliers)
    static_gradient: float  # projected gradient in (p, T); 0 without them
    horizon: float
    terminal_penalty: float
    path_penalty: float
    inner_status: str
    seconds: float


class _Iterate(NamedTuple):
    point: OuterPoint
    solution: Solution  # the inner solution
    cost: Optional[float]  # J of the problem; None until ``ConstrainedSolver._with_cost`` (one more sweep)
    violation: float
    worst: str
    terminal: torch.Tensor  # constraint values [K, cT]
    path_grid: torch.Tensor  # [K, M, cP]
    gradient: torch.Tensor  # dJ_A / dz [q (+1)]
    measure: float
    curvature: Optional[torch.Tensor] = None  # d2 J_A / dz2 [q (+1), q (+1)] from the inner rule, if it has one


class ConstrainedSolver:
    """The augmented-Lagrangian solve of a problem with constraints, parameters or a free T.

    Takes the arguments of ``solve``; ``pmp.solve`` builds it for such a problem, so users call
    ``pmp.solve``. ``run`` returns a Solution in the problem's own time (``sol.mesh`` from 0 to
    the optimal T), with ``horizon``, ``parameters``, ``violation``, ``multipliers`` and
    ``rounds`` filled in.
    """

    def __init__(self, problem, *, method="emsa", mesh=200, ode: Optional[ODE] = None,
                 maximiser: Optional[Maximiser] = None, stop: Optional[Stop] = None, device=None,
                 dtype: Optional[torch.dtype] = None, process_group=None):
        if process_group is not None:
            raise NotImplementedError("solve: a problem with constraints, parameters or a free final time is "
                                      "solved in one process; drop `process_group`")
        dtype = torch.float64 if dtype is None else dtype
        if dtype not in DEFAULT_TOLERANCES:
            raise TypeError(f"solve: `dtype` must be torch.float64 or torch.float32, got {dtype!r}")
        self.problem, self.dtype, self.device = problem, dtype, resolve_device(device)
        self.method = as_method(method)
        self.ode, self.maximiser = ode or ODE(), maximiser or Maximiser()
        self.stopping = (stop or Stop()).resolved(dtype)
        problem.check(dtype, self.device)
        self.transcription = Transcription(problem, mesh, dtype, self.device)
        self.violation_tol = (DEFAULT_VIOLATION_TOL[dtype] if self.stopping.violation_tol is None
                              else self.stopping.violation_tol)

    # ------------------------------------------------------------------ one inner solve
    def _inner(self, point: OuterPoint, init, method, tol: float, max_iter: int, progress: bool, callback,
               start: Optional[Solution] = None):
        """The inner solve at ``point`` from the controls ``init``; its first sweep by multiple shooting from
        the nodes of ``start`` (the last inner solution) where given, else from x0 at every node. Returns the
        solution and the curvature of its J in z = (p, T) where the inner rule gives one (DDP's value
        function at the first node), else None."""
        from ..solver import Solver

        if self.transcription.path_sizes and isinstance(init, torch.Tensor) and init.dim() == 2:
            point = point.with_(end_control=init[-1].detach())  # the control the end values are taken at
        inner = self.transcription.inner_problem(point)
        stop = Stop(max_iter=max_iter, tol=tol, stall_tol=self.stopping.stall_tol)
        solver = Solver(inner, method=method, mesh=self.transcription.mesh, ode=self.ode,
                        maximiser=self.maximiser, stop=stop, device=self.device, dtype=self.dtype)
        if start is not None:  # the states of the last solution, with this point's (p, T)
            tr = self.transcription
            nodes = start.states_trajectory.values.reshape(tr.N + 1, tr.K, -1).clone()
            nodes[..., tr.n:] = tr.static(point).to(nodes)
            solver.start_nodes = nodes
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # "did not converge": judged by the outer loop
            sol = solver.run(init, progress=progress, callback=callback)
        value_hessian = getattr(solver.rule, "value_hessian", None)
        V0 = value_hessian() if value_hessian is not None and self.transcription.static_dim else None
        return sol, None if V0 is None else self.transcription.static_hessian(V0)

    def _measure(self, point: OuterPoint, sol: Solution, curvature: Optional[torch.Tensor] = None) -> _Iterate:
        """Constraint values, violation and dJ/dz of an inner solution (J: ``_with_cost``); ``curvature``: its
        d2J/dz2 where the inner rule gave one."""
        tr = self.transcription
        z = sol.states_trajectory
        values = z.values.reshape(tr.N + 1, tr.K, -1)
        x_T, p_T, _ = tr.split(values[-1])
        terminal = tr.terminal_values(x_T, p_T)  # [K, cT]
        path_grid, path_check = self._path_values(point, sol)
        if tr.path_sizes:  # the path constraints' end values (at the last interval's control) [K, cT + cP]
            terminal = torch.cat([terminal, path_grid[:, -1, :]], dim=-1)
        viol, worst = self._violation(terminal, path_check)
        gradient = torch.zeros(tr.static_dim, dtype=self.dtype, device=self.device)
        if tr.static_dim:
            P0 = sol.costates_trajectory.values[0].reshape(tr.K, -1)
            gradient = -P0[:, tr.n:].sum(0)
        measure = self._static_measure(tr.static(point), gradient)
        return _Iterate(point, sol, None, viol, worst, terminal, path_grid, gradient, measure, curvature)

    def _with_cost(self, it: _Iterate) -> _Iterate:
        """The iterate with J filled in (a sweep of its own): only the iterates a round ends with need it (the
        line search in (p, T) compares merits)."""
        return it if it.cost is not None else it._replace(cost=self._cost(it.point, it.solution))

    def _cost(self, point: OuterPoint, sol: Solution) -> float:
        """J without the constraint terms: one forward sweep of the plain problem, by multiple shooting from
        the inner solution's nodes (the constraints enter the costs only, so those are its trajectory: one
        integration of all intervals, 10 ms on Zermelo at N = 200 against 250 ms for the sequential sweep;
        J agrees with it to the ODE tolerance)."""
        from ..sweep.pointwise import PointwiseProblem
        from ..sweep.sweeps import Sweeper

        tr = self.transcription
        if not (tr.terminal_sizes or tr.path_sizes):
            return sol.cost
        ode = self.ode.resolved(self.dtype)
        pw = PointwiseProblem(tr.objective_problem(point), self.dtype, self.device)
        sweeper = Sweeper(pw, tr.mesh, method=ode.method, rtol=ode.rtol, atol=ode.atol)
        nodes = sol.states_trajectory.values.reshape(tr.N + 1, tr.K, -1)
        return float(sweeper.forward(sol.controls, samples=False, nodes=nodes).cost)

    def _path_samples(self, point: OuterPoint, sol: Solution):
        """g at every interval's two ends (with the interval's control) and inside it at ``fractions``:
        (left [N, K, cP], right [N, K, cP], inside(fractions) -> [N, R, K, cP]); None when there are no
        path constraints."""
        tr = self.transcription
        cP = sum(tr.path_sizes)
        if not cP:
            return None
        N, K = tr.N, tr.K
        traj = sol.states_trajectory
        u = sol.controls  # [N, m]
        nodes = traj.values.reshape(N + 1, K, -1)
        T = point.horizon if tr.free else 1.0

        def g_at(s, z, controls):  # s [P], z [P, K, n_aug], controls [P, m] -> [P, K, cP]
            x, p, _ = tr.split(z)
            uu = controls[:, None, :].expand(-1, K, -1)
            args = (s * T, x, uu) + ((p,) if p is not None else ())
            return torch.func.vmap(tr.path_values)(*args)

        left = g_at(tr.mesh[:-1], nodes[:-1], u)  # nodes 0..N-1 with the control on their right
        right = g_at(tr.mesh[1:], nodes[1:], u)  # nodes 1..N with the control on their left
        h = tr.mesh[1:] - tr.mesh[:-1]

        def inside(fractions):
            fr = torch.tensor(fractions, dtype=self.dtype, device=self.device)
            zi = traj.on_intervals(fr).reshape(N, len(fractions), K, -1)
            s = (tr.mesh[:-1, None] + fr * h[:, None]).reshape(-1)
            controls = u[:, None, :].expand(N, len(fractions), -1).reshape(N * len(fractions), -1)
            return g_at(s, zi.reshape(N * len(fractions), K, -1), controls).reshape(N, len(fractions), K, cP)

        return left, right, inside

    def _path_values(self, point: OuterPoint, sol: Solution):
        """g on the multiplier grid [K, M, cP] (at a node: the larger of its two intervals' values)
        and at the check points between nodes [K, N * R, cP]."""
        tr = self.transcription
        samples = self._path_samples(point, sol)
        if samples is None:
            empty = torch.zeros(tr.K, tr.grid.numel(), 0, dtype=self.dtype, device=self.device)
            return empty, torch.zeros(tr.K, 0, 0, dtype=self.dtype, device=self.device)
        left, right, inside = samples
        K, cP = tr.K, left.shape[-1]
        at_nodes = torch.cat([left[:1], torch.maximum(left[1:], right[:-1]), right[-1:]])  # [N + 1, K, cP]
        parts = [at_nodes[:-1, None]] + ([inside(GRID_FRACTIONS)] if GRID_FRACTIONS else [])  # [N, 1 + R, K, cP]
        grid = torch.cat(parts, dim=1).reshape(-1, K, cP)
        grid = torch.cat([grid, at_nodes[-1:]]).permute(1, 0, 2)  # [K, M, cP]
        check = inside(CHECK_FRACTIONS).reshape(-1, K, cP).permute(1, 0, 2)
        return grid, torch.cat([grid, check], dim=1)

    def _path_force(self, point: OuterPoint, sol: Solution) -> torch.Tensor:
        """The path multipliers [K, N + 1, cP] the inner solution's co-state satisfies: the penalty's force
        max(0, mu(s) + r g(s)), which the co-state feels between the nodes too, projected onto the nodes' hat
        functions with a lumped mass matrix, m_i = int f phi_i / int phi_i (non-negative, and int m = int f:
        the atom of an order-two state constraint at a junction keeps its mass, the co-state's jump). The
        integrals are trapezoid sums on the nodes and the check points (8 pieces an interval)."""
        if GRID_FRACTIONS:
            raise NotImplementedError("the path force's projection assumes multipliers on the nodes only")
        tr = self.transcription
        left, right, inside = self._path_samples(point, sol)
        N, K, cP = left.shape[0], tr.K, left.shape[-1]
        fr = torch.tensor((0.0,) + CHECK_FRACTIONS + (1.0,), dtype=self.dtype, device=self.device)  # [R + 2]
        g = torch.cat([left[:, None], inside(CHECK_FRACTIONS), right[:, None]], dim=1)  # [N, R + 2, K, cP]
        mu = point.path.permute(1, 0, 2)  # [N + 1, K, cP]
        mu_s = mu[:-1, None] * (1 - fr)[None, :, None, None] + mu[1:, None] * fr[None, :, None, None]
        force = torch.clamp(mu_s + point.path_penalty * g, min=0)  # [N, R + 2, K, cP]
        h = tr.mesh[1:] - tr.mesh[:-1]
        pieces = fr[1:] - fr[:-1]  # the trapezoid rule on the pieces between the fractions
        weights = 0.5 * (torch.cat([pieces, pieces.new_zeros(1)]) + torch.cat([pieces.new_zeros(1), pieces]))
        to_left = (force * (weights * (1 - fr))[None, :, None, None]).sum(1) * h[:, None, None]  # int f phi_n
        to_right = (force * (weights * fr)[None, :, None, None]).sum(1) * h[:, None, None]  # int f phi_(n+1)
        b = torch.zeros(N + 1, K, cP, dtype=self.dtype, device=self.device)
        b[:-1] += to_left
        b[1:] += to_right
        mass = torch.zeros(N + 1, dtype=self.dtype, device=self.device)
        mass[:-1] += 0.5 * h
        mass[1:] += 0.5 * h
        return (b / mass[:, None, None]).permute(1, 0, 2)

    def _violation(self, terminal: torch.Tensor, path: torch.Tensor):
        """The largest violation and the name of the constraint that has it."""
        tr, prob = self.transcription, self.problem
        worst, name = 0.0, ""
        offset = 0
        for c, size in zip(prob.terminal_constraints, tr.terminal_sizes):
            v = terminal[:, offset:offset + size]
            v = v.abs() if c.kind == "equal" else v.clamp(min=0)
            value = float(v.max()) if v.numel() else 0.0
            if value > worst:
                worst, name = value, f"terminal constraint {c!r} ({c.relation})"
            offset += size
        offset = 0
        for c, size in zip(prob.path_constraints, tr.path_sizes):
            v = path[:, :, offset:offset + size].clamp(min=0)
            value = float(v.max()) if v.numel() else 0.0
            if value > worst:
                worst, name = value, f"path constraint {c!r} ({c.relation})"
            offset += size
        return worst, name

    def _static_measure(self, z: torch.Tensor, gradient: torch.Tensor) -> float:
        if not z.numel():
            return 0.0
        low, high = self.transcription.static_bounds()
        return float((z - torch.minimum(torch.maximum(z - gradient, low), high)).abs().max())

    # ------------------------------------------------------------------ the loop
    def run(self, init=None, *, progress: bool = False, callback: Optional[Callable] = None) -> Solution:
        tr, stopping = self.transcription, self.stopping
        start = time.perf_counter()
        point = tr.initial_point()
        method, u = self.method, init
        rounds: List[Round] = []
        history: list = []
        best: Optional[_Iterate] = None
        status, message = None, ""
        budget = stopping.max_iter
        static = _StaticStep(tr)
        self.acceleration = _MultiplierAcceleration(tr, ANDERSON_MEMORY)
        previous_groups = None
        stuck = idle = 0
        trend = _Progress(self.violation_tol)
        # The initial controls measured (no iteration) give the penalties their scale.
        previous: Optional[Solution] = None  # the last inner solution: its nodes start the next solve's sweep
        if tr.terminal_sizes or tr.path_sizes:
            initial = self._measure(point, *self._inner(point, u, method, 1.0, 0, False, None))
            point = self._initial_penalties(point, self._with_cost(initial))
            previous = initial.solution
        try:
            for k in range(MAX_ROUNDS):
                t0 = time.perf_counter()
                inner_tol = max(INNER_TOL_FLOOR * stopping.tol, INNER_TOL0 * INNER_TOL_SHRINK ** k)
                it, method, used = self._minimise(point, u, previous, method, inner_tol, budget, static, history,
                                                  progress, callback)
                sol, point = it.solution, it.point
                previous = sol
                budget -= used
                u = sol.controls
                groups = self._group_violations(point, it)
                rounds.append(Round(k, used, it.cost, sol.cost, it.violation, it.worst, sol.optimality,
                                    it.measure, point.horizon, _max(point.terminal_penalty),
                                    _max(point.path_penalty), sol.status, time.perf_counter() - t0))
                if best is None or _better(it, best, self.violation_tol):
                    best = it
                if sol.status == "interrupted":
                    status, message = "interrupted", f"interrupted (KeyboardInterrupt) in round {k}"
                    break
                if sol.status == "callback":
                    status, message = "callback", f"stopped by callback in round {k}"
                    break
                if self._kkt(it) and max(groups) <= self.violation_tol:
                    best, status = it, "converged"
                    message = f"KKT point in round {k}"
                    break
                idle = idle + 1 if used <= 1 and sol.status != "converged" else 0
                if idle >= IDLE_ROUNDS:
                    status = "stalled"
                    message = (f"the inner solves made no progress in {idle} rounds in a row "
                               f"({sol.message.split(';')[0]})")
                    break
                kkt = max(sol.optimality / max(1.0, abs(sol.cost)), it.measure / max(1.0, abs(it.cost)))
                if trend.flat(it.violation, kkt):
                    status = "stalled"
                    newton = method.name != "ddp" and isinstance(self.problem.controls, (Reals, Box))
                    message = (f"no progress in the last {FLAT_ROUNDS} rounds near feasibility: violation "
                               f"{it.violation:.3g} (tol {self.violation_tol:.3g}), first-order measure "
                               f"{kkt:.3g} * max(1, |J|) (tol {stopping.tol:.3g}); the inner solves "
                               f"({method.name}) stall on the penalised problem (penalties "
                               f"{_max(point.terminal_penalty):.3g}, {_max(point.path_penalty):.3g})"
                               + ("; method='ddp' takes Newton steps there" if newton else ""))
                    break
                if budget <= 0:
                    status, message = "max_iter", f"reached max_iter = {stopping.max_iter} in round {k}"
                    break
                # infeasibility: the penalties grow and the violation does not fall
                grew = previous_groups is not None and any(
                    g > 0.5 * pg and g > self.violation_tol for g, pg in zip(groups, previous_groups))
                settled = _settled(sol)
                if settled and len(rounds) > 1 and grew \
                        and it.violation > max(0.9 * rounds[-2].violation, STUCK_FACTOR * self.violation_tol):
                    stuck += 1
                else:
                    stuck = 0
                # a penalty at its ceiling is infeasibility only well above the tolerance: near it, a settled
                # stalled solve grows the penalty on violations that tighter rounds still reduce
                if stuck >= STUCK_ROUNDS or (max(_max(point.terminal_penalty), _max(point.path_penalty))
                                             >= PENALTY_MAX and it.violation > STUCK_FACTOR * self.violation_tol):
                    status = "infeasible"
                    message = (f"the constraints cannot be met: the {it.worst} stays violated by "
                               f"{it.violation:.3g} while its penalty grew to "
                               f"{max(_max(point.terminal_penalty), _max(point.path_penalty)):.3g}")
                    break
                point = self._update_multipliers(point, it, groups, previous_groups, grow=settled)
                previous_groups = groups
            else:
                status, message = "max_rounds", f"reached {MAX_ROUNDS} rounds of the outer loop"
        except KeyboardInterrupt:
            if best is None:
                raise
            status, message = "interrupted", f"interrupted (KeyboardInterrupt) after {len(rounds)} rounds"
        return self._solution(best, status, message, rounds, history, start)

    # ------------------------------------------------------------------ pieces of a round
    def _minimise(self, point, u, previous, method, tol, budget, static: _StaticStep, history, progress, callback):
        """Minimise the merit over the controls and z = (p, T) at fixed multipliers, to ``tol``: an inner
        solve in u, then projected quasi-Newton steps in z, each judged by the inner solve it needs
        (the merit minimised over u: its gradient in z is the co-state of z at s = 0).
        Returns (iterate, warm method, iterations used)."""
        used = 0

        def solve_at(pt, controls, start: Optional[Solution], meth):
            nonlocal used
            cap = min(budget - used, ROUND_ITERATIONS.get(meth.name, budget))
            sol, curvature = self._inner(pt, controls, meth, tol, max(cap, 0), progress, callback, start)
            history.extend(_renumbered(sol.history, len(history)))
            used += sol.iterations
            return self._measure(pt, sol, curvature), _warm(meth, sol, self.transcription.K, self.method)

        it, method = solve_at(point, u, previous, method)
        tr = self.transcription
        if not tr.static_dim:
            return self._with_cost(it), method, used
        for _ in range(STATIC_STEPS):
            if it.measure <= tol * max(1.0, abs(it.solution.cost)) or used >= budget \
                    or it.solution.status in ("interrupted", "callback"):
                break
            z, g = tr.static(it.point), it.gradient
            static.observe(it.curvature)
            d = static.direction(z, g)
            slope = float(g @ d)
            if not slope < 0:
                break
            alpha, accepted, trials = 1.0, None, []
            for _ in range(LINE_SEARCH_STEPS):
                trial, trial_method = solve_at(tr.with_static(it.point, z + alpha * d), it.solution.controls,
                                               it.solution, method)
                if trial.solution.cost <= it.solution.cost + 1e-4 * alpha * slope:
                    accepted = trial
                    method = trial_method
                    break
                trials.append((alpha, trial.solution.cost))
                alpha = _next_step(it.solution.cost, slope, trials)
            if accepted is None:
                break
            curvature = _line_curvature(it.solution.cost, trials + [(alpha, accepted.solution.cost)])
            if curvature is None:  # the first trial was accepted: the secant of the gradients
                static.learn(alpha * d, accepted.gradient - g)
            else:  # merit values (accurate to second order in an inexact solve; the gradients only to first)
                static.learn(alpha * d, curvature / float(d @ d) * alpha * d)
            it = accepted
        return self._with_cost(it), method, used

    def _group_violations(self, point: OuterPoint, it: _Iterate):
        """(terminal, path) KKT residuals of the constraints: |c| for an equality, |max(c, -mu/r)| for an
        inequality (violation and complementarity at once, as ALGENCAN measures them): which penalty
        must grow, and what ``converged`` requires to be at most ``violation_tol``."""
        tr = self.transcription
        c = it.terminal
        term = torch.where(tr.terminal_equal, c.abs(),
                           torch.maximum(c, -point.terminal / point.terminal_penalty).abs())
        path = torch.maximum(it.path_grid, -point.path / point.path_penalty).abs()
        return (float(term.max()) if term.numel() else 0.0, float(path.max()) if path.numel() else 0.0)

    def _initial_penalties(self, point: OuterPoint, it: _Iterate) -> OuterPoint:
        """r0 = 10 max(1, |J|) / max(1, |c|^2 / 2), clipped to [1e-6, 1e6] (Birgin & Martinez 2014)."""
        scale = 10 * max(1.0, abs(it.cost))
        tr = self.transcription
        term = torch.where(tr.terminal_equal, it.terminal, it.terminal.clamp(min=0))
        path = it.path_grid.clamp(min=0)
        rT = min(max(scale / max(1.0, 0.5 * float((term ** 2).sum(-1).mean())), 1e-6), 1e6)
        T = point.horizon if tr.free else tr.inner_horizon
        rP = min(max(scale / max(1.0, 0.5 * T * float((path ** 2).sum(-1).mean())), 1e-6), 1e6)
        return point.with_(terminal_penalty=torch.full_like(point.terminal_penalty, rT),
                           path_penalty=torch.full_like(point.path_penalty, rP))

    def _first_order(self, point: OuterPoint, it: _Iterate):
        """nu + r psi (equalities), max(0, mu + r c) (inequalities): the multipliers of the inner
        solution's stationarity, i.e. the Lagrange multipliers its co-state satisfies."""
        tr = self.transcription
        rT, rP = point.terminal_penalty, point.path_penalty
        c = it.terminal
        nu = torch.where(tr.terminal_equal, point.terminal + rT * c, torch.clamp(point.terminal + rT * c, min=0))
        return nu, torch.clamp(point.path + rP * it.path_grid, min=0)

    def _update_multipliers(self, point: OuterPoint, it: _Iterate, groups, previous, grow: bool) -> OuterPoint:
        rT, rP = point.terminal_penalty, point.path_penalty
        nu, mu = self._first_order(point, it)
        if it.solution.status == "converged":  # a fixed-point map only where the inner solves are exact enough
            nu, mu = self.acceleration.mix(point, nu, mu)
        else:
            self.acceleration.reset()
        if previous is not None and grow:  # a stalled inner solve is not helped by a stiffer problem
            if groups[0] > max(0.5 * previous[0], self.violation_tol):
                rT = torch.clamp(rT * PENALTY_GROWTH, max=PENALTY_MAX)
                self.acceleration.reset()
            if groups[1] > max(0.5 * previous[1], self.violation_tol):
                rP = torch.clamp(rP * PENALTY_GROWTH, max=PENALTY_MAX)
                self.acceleration.reset()
        return point.with_(terminal=nu, path=mu, terminal_penalty=rT, path_penalty=rP)

    def _kkt(self, it: _Iterate) -> bool:
        sol, tol = it.solution, self.stopping.tol
        scale = max(1.0, abs(it.cost))
        return (it.violation <= self.violation_tol and sol.optimality <= tol * max(1.0, abs(sol.cost))
                and it.measure <= tol * scale)

    # ------------------------------------------------------------------ the result
    def _solution(self, best: _Iterate, status: str, message: str, rounds, history, start) -> Solution:
        tr, prob = self.transcription, self.problem
        sol = best.solution
        T = best.point.horizon if tr.free else prob.horizon
        scale = T if tr.free else 1.0
        mesh = tr.mesh * scale
        n = tr.n

        def real_time(traj: Optional[HermiteTrajectory]) -> Optional[HermiteTrajectory]:
            if traj is None:
                return None
            values, left, right = traj.fields()
            return HermiteTrajectory(mesh, values[..., :n], left[..., :n] / scale, right[..., :n] / scale)

        converged = status == "converged"
        measure = max(sol.optimality, best.measure)
        message = (f"{message}; violation {best.violation:.3g} {'<=' if best.violation <= self.violation_tol else '>'} "
                   f"{self.violation_tol:.3g}, first-order measure {measure:.3g}")
        if best.violation > self.violation_tol and best.worst:
            message += f"; the {best.worst} is violated most"
        if not converged:
            warnings.warn(f"solve did not converge: {message}", RuntimeWarning, stacklevel=outside_level())
        settings = {**sol.settings, "rounds": len(rounds), "violation_tol": self.violation_tol}
        nu, _ = self._first_order(best.point, best)
        mu = self._path_force(best.point, sol) if tr.path_sizes else best.point.path
        cT = sum(tr.terminal_sizes)
        multipliers = None if not (tr.terminal_sizes or tr.path_sizes) else {
            "terminal": nu[:, :cT], "path": mu, "path_times": tr.grid * scale, "path_end": nu[:, cT:]}
        return Solution(
            cost=best.cost, controls=sol.controls if prob.has_controls else sol.controls[:, :0],
            mesh=mesh, history=history, converged=converged, message=message, method=sol.method,
            states_trajectory=real_time(sol.states_trajectory), costates_trajectory=real_time(sol.costates_trajectory),
            control_set=prob.controls, single_sample=prob.single_sample, problem_name=prob.name, settings=settings,
            problem=prob, optimality=measure, status=status, relaxed_cost=sol.relaxed_cost, horizon=float(T),
            parameters=best.point.parameters.clone() if prob.parameters is not None else None,
            violation=best.violation, multipliers=multipliers, rounds=list(rounds))


def _settled(sol: Solution) -> bool:
    """Whether an inner solve ended at its round's minimiser: converged, or stalled within SETTLED_MEASURE."""
    return sol.status == "converged" or (
        sol.status == "stalled" and sol.optimality <= SETTLED_MEASURE * max(1.0, abs(sol.cost)))


class _Progress:
    """Whether the outer loop still gains near feasibility: a round records its violation (clamped at the
    tolerance: below it there is nothing to gain) and its first-order measure; ``flat`` says when the last
    ``FLAT_ROUNDS`` rounds were all within STUCK_FACTOR of the tolerance and none halved either number's best
    over the earlier rounds near feasibility (the slow but steady decrease of a converging loop halves the
    violation within a few rounds)."""

    def __init__(self, violation_tol: float):
        self.tol = violation_tol
        self.rounds: List[tuple] = []  # (violation clamped at tol, measure, near feasibility)

    def flat(self, violation: float, measure: float) -> bool:
        self.rounds.append((max(violation, self.tol), measure, violation <= STUCK_FACTOR * self.tol))
        last, earlier = self.rounds[-FLAT_ROUNDS:], [r for r in self.rounds[:-FLAT_ROUNDS] if r[2]]
        if len(last) < FLAT_ROUNDS or not earlier or not all(near for _, _, near in last):
            return False
        return all(min(r[i] for r in last) > 0.5 * min(r[i] for r in earlier) for i in (0, 1))


class _MultiplierAcceleration:
    """Anderson acceleration of the multiplier map (nu, mu) -> first-order update, at fixed penalties.

    The first-order update converges linearly, slowly where the multiplier is concentrated (the
    atoms of a state constraint's multiplier at the junctions of a boundary arc); the map is a
    fixed-point iteration, which Anderson's mixture of the last steps accelerates as it does
    E-MSA's (``rules.anderson_mixture``); path multipliers are weighted by their share of time,
    inequality multipliers projected back onto mu >= 0.
    """

    def __init__(self, tr: Transcription, memory: int):
        self.tr, self.memory = tr, memory
        self.history: list = []
        self.current = None
        mesh = tr.grid
        h = mesh[1:] - mesh[:-1]
        node_share = torch.cat([h[:1] / 2, (h[1:] + h[:-1]) / 2, h[-1:] / 2])  # trapezoidal weights [M]
        cT, cP = tr.terminal_equal.numel(), sum(tr.path_sizes)
        self.weights = torch.cat([torch.ones(tr.K * cT, dtype=mesh.dtype, device=mesh.device),
                                  node_share[None, :, None].expand(tr.K, -1, cP).reshape(-1)])
        self.nonnegative = torch.cat([~tr.terminal_equal.expand(tr.K, cT).reshape(-1),
                                      torch.ones(tr.K * tr.grid.numel() * cP, dtype=torch.bool,
                                                 device=mesh.device)])

    def reset(self) -> None:
        self.history, self.current = [], None

    def project(self, v: torch.Tensor) -> torch.Tensor:
        return torch.where(self.nonnegative[:, None], v.clamp(min=0), v)

    def mix(self, point: OuterPoint, nu: torch.Tensor, mu: torch.Tensor):
        if not self.memory:
            return nu, mu
        x = torch.cat([point.terminal.reshape(-1), point.path.reshape(-1)])[:, None]
        g = torch.cat([nu.reshape(-1), mu.reshape(-1)])[:, None]
        if self.current is not None:
            self.history = (self.history + [self.current])[-self.memory:]
        self.current = (x, g)
        if not self.history:
            return nu, mu
        mixed = anderson_mixture(self.history, self.current, self.weights, self)
        if mixed is None:
            return nu, mu
        mixed = mixed[:, 0]
        cut = nu.numel()
        return mixed[:cut].reshape(nu.shape), mixed[cut:].reshape(mu.shape)


class _StaticStep:
    """The curvature of the merit in z = (p, T), kept across rounds (see the module): BFGS from the steps'
    gradients, or the inner rule's own where it gives one (DDP's value function)."""

    def __init__(self, tr: Transcription):
        self.tr = tr
        self.low, self.high = tr.static_bounds()
        self.B: Optional[torch.Tensor] = None
        self.local = False  # B came from the inner rule (``observe``), not from BFGS's secants alone

    def project(self, z: torch.Tensor) -> torch.Tensor:
        return torch.minimum(torch.maximum(z, self.low), self.high)

    def size(self, z: torch.Tensor) -> torch.Tensor:
        """The scale of each entry of z: max(|p_i|, 1) for a parameter, T itself for the final time
        (a step of 0.25 in T is small at T = 5 and a leap at T = 0.2)."""
        size = torch.maximum(z.abs(), torch.ones_like(z))
        if self.tr.free:
            size = torch.cat([size[:-1], z[-1:].abs()])
        return size

    def observe(self, curvature: Optional[torch.Tensor]) -> None:
        """Take the inner rule's d2J/dz2 at the current z as the curvature when it is positive definite: the
        exact one of DDP's model, which follows the merit when a penalty grows, where BFGS keeps the old one
        for several steps (Zermelo at N = 200: the round after the penalty's growth took 17 DDP iterations
        instead of 35)."""
        if curvature is None or not bool(torch.isfinite(curvature).all()):
            return
        curvature = 0.5 * (curvature + curvature.T)
        if float(torch.linalg.eigvalsh(curvature)[0]) > 0:
            self.B, self.local = curvature, True

    def direction(self, z: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """A projected quasi-Newton step from z, each entry at most ``STATIC_LIMIT`` of its size (a curvature
        from the inner rule: ``STATIC_LIMIT_LOCAL``; the first step without any: a quarter downhill)."""
        size = self.size(z)
        if self.B is None:
            scale = float((g.abs() / (0.25 * size)).max())
            self.B = torch.eye(z.numel(), dtype=z.dtype, device=z.device) * max(scale, 1e-12)
        d = -torch.linalg.solve(self.B, g)
        limit = (STATIC_LIMIT_LOCAL if self.local else STATIC_LIMIT) * size
        d = torch.maximum(torch.minimum(d, limit), -limit)
        return self.project(z + d) - z

    def learn(self, s: torch.Tensor, y: torch.Tensor) -> None:
        """The BFGS update from a step s and the change y of the gradient (skipped unless s.y > 0)."""
        sy = float(s @ y)
        if self.B is None or sy <= 1e-12 * float(s.norm() * y.norm()):
            return
        Bs = self.B @ s
        self.B = self.B - torch.outer(Bs, Bs) / float(s @ Bs) + torch.outer(y, y) / sy


def _next_step(m0: float, slope: float, trials) -> float:
    """The next step of a backtracking line search on the merit, from its value m0 and slope at 0 and
    the rejected trials [(alpha, m)]: after one, the minimiser of the quadratic through m0, the slope
    and the trial, kept in [0.1, 0.5] alpha (Nocedal and Wright, 3.57); after more, the minimiser of the
    parabola through m0 and the last two trials, kept in [0.02, 0.5] alpha. The parabola uses merit
    values alone: an inexact inner solve (E-MSA on a singular arc) leaves the merit accurate to second
    order in its error and its gradient in (p, T), hence the slope, only to first (Goddard at N = 100:
    dJ/dT = 3.3e-3 measured, about 1.3e-3 true, and a first step 25 times too long)."""
    alpha, m = trials[-1]
    if len(trials) == 1:
        curvature = 2.0 * (m - m0 - slope * alpha) / alpha ** 2
        best = -slope / curvature if curvature > 0 else 0.5 * alpha
        return min(max(best, 0.1 * alpha), 0.5 * alpha)
    curvature = _line_curvature(m0, trials[-2:])
    if curvature is None or curvature <= 0:
        return 0.5 * alpha
    # the parabola's minimiser: its slope at 0 from the two trials' divided difference
    a1, m1 = trials[-2]
    b = (m1 - m0) / a1 - 0.5 * curvature * a1
    return min(max(-b / curvature, 0.02 * alpha), 0.5 * alpha)


def _line_curvature(m0: float, points) -> Optional[float]:
    """The second derivative along the line of the parabola through (0, m0) and the last two
    points [(alpha, m)], or None with fewer than two."""
    if len(points) < 2:
        return None
    (a1, m1), (a2, m2) = points[-2:]
    if a1 == a2:
        return None
    return 2.0 * ((m2 - m0) / a2 - (m1 - m0) / a1) / (a2 - a1)


def _warm(method, sol: Solution, K: int, base):
    """The method for the next solve, starting from the rule parameters this one ended with when it
    converged (a solve that stalled ends with rho at its ceiling: the next one restarts from ``base``)."""
    if sol.status != "converged":
        return base
    params = sol.history[-1].parameters if sol.history else {}
    fields = {f.name for f in dataclasses.fields(method)}
    changes = {}
    if "rho" in params and "rho0" in fields and getattr(method, "rho", None) is None:
        changes["rho0"] = min(max(params["rho"] * K, method.rho_min * K), method.rho_max * K)
    if "eps" in params and "eps0" in fields:
        changes["eps0"] = min(max(params["eps"], method.eps_min), method.eps_max)
    return dataclasses.replace(method, **changes) if changes else method


def _renumbered(records, offset: int):
    """A solve's records numbered on from the ``offset`` records so far (a later solve's iteration 0
    repeats the last record and is dropped)."""
    if offset == 0:
        return list(records)
    return [r._replace(iteration=offset - 1 + i) for i, r in enumerate(records) if i > 0]


def _better(a: _Iterate, b: _Iterate, tol: float) -> bool:
    """Feasible and lower J beats anything; otherwise the smaller violation."""
    fa, fb = a.violation <= tol, b.violation <= tol
    if fa and fb:
        return a.cost < b.cost
    if fa != fb:
        return fa
    return a.violation < b.violation


def _max(t: torch.Tensor) -> float:
    return float(t.max()) if t.numel() else 0.0
