"""``solve``: the iteration loop shared by every update rule (paper Alg. 1-2).

Each iteration: backward sweep for the current controls u^k (the forward
sweep is already there), interval data at the quadrature points, then the
rule proposes u^{k+1}; a forward sweep re-simulates it (its J is the
reported cost) and the rule keeps or rejects it. Settings are checked once,
here, before anything runs.
"""
from __future__ import annotations

import math
import numbers
import time
import warnings
from typing import Callable, Optional, Union

import torch

from .errors import DivergenceError, NonFiniteError, SolveError, SweepBudgetError
from .hamiltonian import IntervalHamiltonian, interval_data
from .maximisers import HamiltonianMaximiser
from .mesh import make_mesh
from .optimality import DEFAULT_OPTIMALITY_TOL, is_optimal, optimality
from .pointwise import PointwiseProblem
from .problem import ControlProblem
from .controls import Finite
from .rules import RULES, ExtendedMSA
from .solution import IterationRecord, Solution
from .sweeps import ODE_METHODS, Sweeper

__all__ = ["solve", "DEFAULT_TOLERANCES"]

#: ODE tolerances (rtol, atol) by dtype when ``rtol``/``atol`` are not given.
DEFAULT_TOLERANCES = {torch.float64: (1e-9, 1e-11), torch.float32: (1e-6, 1e-8)}
_DIVERGENCE_PATIENCE = 3  # consecutive increases above J(u^0) that count as divergence
_BUDGET_FACTOR = 5  # a trial forward sweep may cost this many times the current one
_CYCLE_PATIENCE = 25  # iterations without a new best J (while J keeps changing) that count as cycling
_STALL_PATIENCE = 3  # iterations in a row with |dJ| <= stall_tol * max(1, |J|) that count as a stall
_MIN_EVALS_PER_INTERVAL = 8  # a sweep's budget never drops below this many evaluations per mesh interval
_FIRST_SWEEP_EVALS = 50_000  # the budget of the first sweep of each kind (no previous one to compare with)


def solve(problem: ControlProblem, *, method: str = "emsa", mesh: Union[int, torch.Tensor] = 200,
          max_iter: int = 200, tol: Optional[float] = None, stall_tol: float = 1e-12, rho: Optional[float] = None,
          ode_method: str = "dopri5", rtol: Optional[float] = None, atol: Optional[float] = None, init=None,
          device=None, dtype: Optional[torch.dtype] = None, seed: Optional[int] = None, progress: bool = False,
          callback: Optional[Callable] = None, maximiser_iter: int = 50, perturb: float = 0.0,
          quadrature: int = 3, options: Optional[dict] = None, ode_options: Optional[dict] = None,
          maximiser: str = "auto", finite: str = "relax-round-polish") -> Solution:
    """Solve ``problem`` by the maximum principle, optimise-then-discretise.

    Args:
        problem: the ControlProblem.
        method: the update rule: ``"emsa"`` (extended MSA, paper Alg. 2; default),
            ``"msa"`` (basic MSA, Alg. 1), ``"sqh"`` (sequential quadratic Hamiltonian) or
            ``"gradient"`` (soft step, eq. 12 = gradient descent).
        mesh: number of uniform control intervals N, or node times [N + 1] from 0 to T.
        max_iter: iteration limit.
        tol: ``converged`` means first-order optimal: the optimality measure of the returned
            controls (``pmpsolve.optimality``: the projected L2 gradient for boxes and R^m, the
            largest Hamiltonian gap per unit time for finite and user sets) is at most
            ``tol * max(1, |J|)``. The solve stops as soon as it is. Default by dtype:
            1e-6 (float64), 1e-3 (float32).
        stall_tol: stop (``converged=False`` unless the measure says otherwise) when
            |J(u^{k+1}) - J(u^k)| <= stall_tol * max(1, |J|) on 3 iterations in a row.
        rho: E-MSA penalty (eq. 7). A number: fixed, every step taken (Alg. 2). None
            (default): adaptive, steps kept only when J decreases (see ``ExtendedMSA``).
        ode_method: a torchdiffeq method (default ``"dopri5"``); rtol, atol: its tolerances
            (default by dtype: float64 1e-9/1e-11, float32 1e-6/1e-8). Fixed-step methods
            (``"rk4"``, ``"euler"``, ...) need ``ode_options={"step_size": h}``.
        init: initial controls: [N, m], [m] (constant) or a number; default 0, or the
            middle of a box that excludes 0. Must lie in the control set.
        device, dtype: where and in what precision to solve (default: the CPU, float64;
            float32 and float64 are supported).
        seed: seeds every random part (the maximiser's start perturbation); identical calls
            give bit-identical results on the CPU with or without it.
        progress: show a tqdm progress bar.
        callback: called as ``callback(record, controls)`` after every iteration;
            return True to stop. A KeyboardInterrupt (Ctrl-C, or raised by the callback)
            returns the best solution so far with ``status="interrupted"``.
        maximiser_iter: L-BFGS iterations per maximisation.
        perturb: half-width of uniform noise added to the maximiser's start (0.005 in the
            paper's reference code).
        quadrature: Gauss points per interval for the interval Hamiltonian.
        options: options of the update rule (e.g. ``{"lr": 0.5}`` for ``"gradient"``).
        ode_options: passed to torchdiffeq (e.g. ``{"step_size": 0.01}`` for fixed-grid methods).
        maximiser: how boxes and R^m are maximised: "auto" (closed form where the objective is
            a separable concave quadratic in u, else L-BFGS, or proximal gradient with an L1/L0
            cost), "closed-form", "lbfgs" or "proximal". Finite sets are enumerated, UserSets
            use their own maximiser.
        finite: for a finite control set: ``"relax-round-polish"`` (default: solve the
            relaxation over the convex hull, round by sum-up rounding, polish on the set with
            the same method; ``sol.relaxed_cost`` is the relaxed J, a lower bound when the
            relaxation is solved to its global optimum) or ``"plain"`` (iterate on the set
            from ``init``).

    Returns:
        A Solution; ``sol.converged`` is True only when the returned controls are first-order
        optimal (see ``tol``), ``sol.status`` says why the solve stopped ("converged",
        "max_iter", "stalled", "callback" or "interrupted"). Raises NonFiniteError if a sweep
        blows up, SweepBudgetError if a sweep needs far more work than before (e.g. an
        unbounded problem) and DivergenceError if a method without safeguard (basic MSA,
        fixed rho) diverges; each carries the best controls found so far.
    """
    arguments = {key: value for key, value in locals().items() if key != "problem"}
    # ------------------------------------------------------------- the door
    if not isinstance(problem, ControlProblem):
        raise TypeError(f"solve: `problem` must be a pmpsolve.ControlProblem, got {type(problem).__name__}")
    if method not in RULES:
        raise ValueError(f"solve: unknown `method` {method!r}; choose one of {sorted(RULES)}")
    if ode_method not in ODE_METHODS:
        raise ValueError(f"solve: unknown `ode_method` {ode_method!r}; choose a torchdiffeq method: {sorted(ODE_METHODS)}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, numbers.Integral) or max_iter < 0:
        raise ValueError(f"solve: `max_iter` must be an int >= 0, got {max_iter!r}")
    max_iter = int(max_iter)
    if rho is not None and method != "emsa":
        raise ValueError(f"solve: `rho` is an option of method='emsa', not of method={method!r}")
    if isinstance(quadrature, bool) or not isinstance(quadrature, int) or not 1 <= quadrature <= 10:
        raise ValueError(f"solve: `quadrature` must be an int from 1 to 10 (Gauss points), got {quadrature!r}")
    if callback is not None and not callable(callback):
        raise TypeError(f"solve: `callback` must be callable or None, got {type(callback).__name__}")
    if finite not in ("relax-round-polish", "plain"):
        raise ValueError(f"solve: `finite` must be 'relax-round-polish' or 'plain', got {finite!r}")
    dtype = torch.float64 if dtype is None else dtype
    if dtype not in (torch.float64, torch.float32):
        raise TypeError(f"solve: `dtype` must be torch.float64 or torch.float32, got {dtype!r}; half precision "
                        "(float16, bfloat16) is too coarse for the adaptive sweeps' error control")
    device = _device(device)
    default_rtol, default_atol = DEFAULT_TOLERANCES[dtype]
    rtol = default_rtol if rtol is None else float(rtol)
    atol = default_atol if atol is None else float(atol)
    if not (rtol > 0 and atol > 0):
        raise ValueError(f"solve: `rtol` and `atol` must be > 0, got rtol={rtol}, atol={atol}")
    tol = DEFAULT_OPTIMALITY_TOL[dtype] if tol is None else tol
    for label, value in (("tol", tol), ("stall_tol", stall_tol)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= 0:
            raise ValueError(f"solve: `{label}` must be a number >= 0, got {value!r}")
    tol, stall_tol = float(tol), float(stall_tol)
    if isinstance(problem.controls, Finite) and finite == "relax-round-polish" and init is None:
        from .relaxation import relax_round_polish

        return relax_round_polish(problem, solve, arguments)

    pw = PointwiseProblem(problem, dtype, device)
    nodes = make_mesh(mesh, problem.horizon, dtype, device)
    N, m = nodes.numel() - 1, problem.control_dim
    u = _initial_controls(init, problem, N, m, dtype, device)
    # One generator for every random draw of this solve (none touches the global RNG).
    generator = None if seed is None else torch.Generator(device="cpu").manual_seed(int(seed))
    if int(maximiser_iter) < 1:
        raise ValueError(f"solve: `maximiser_iter` must be >= 1, got {maximiser_iter!r}")
    if perturb < 0:
        raise ValueError(f"solve: `perturb` must be >= 0 (a half-width), got {perturb!r}")
    maximiser = HamiltonianMaximiser(problem.controls, max_iter=maximiser_iter, perturb=perturb, method=maximiser)
    rule_class = RULES[method]
    if rule_class is ExtendedMSA:
        rule = rule_class(pw, problem.controls, maximiser, generator, options, rho=rho)
    else:
        rule = rule_class(pw, problem.controls, maximiser, generator, options)
    sweeper = Sweeper(pw, nodes, method=ode_method, rtol=rtol, atol=atol, options=ode_options)
    settings = dict(method=method, mesh=N, max_iter=max_iter, tol=tol, stall_tol=stall_tol, rho=rho,
                    ode_method=ode_method, rtol=rtol, atol=atol, dtype=str(dtype), device=str(device), seed=seed,
                    maximiser_iter=maximiser_iter, perturb=perturb, quadrature=quadrature,
                    options=dict(options or {}), finite=finite)

    # ------------------------------------------------------------- the loop
    start = time.perf_counter()
    history = []
    best = None  # (cost, controls, forward sweep)
    final = None  # (controls, backward sweep, optimality) once measured at the controls to return
    status, message = "max_iter", f"reached max_iter = {max_iter}"
    bar = _progress_bar(progress, max_iter, problem.name, method)
    try:
        fw = sweeper.forward(u, iteration=0)
        cost = float(fw.cost)
        best = (cost, u, fw, 0)  # J, controls, forward sweep, index of its record
        history.append(IterationRecord(0, cost, parameters=rule.parameters(), seconds=fw.seconds,
                                       elapsed=time.perf_counter() - start, forward_evals=fw.evaluations,
                                       forward_seconds=fw.seconds))
        small_steps, rises, since_best, bw_evals = 0, 0, 0, None
        for k in range(1, max_iter + 1):
            t_iter = time.perf_counter()
            bw = sweeper.backward(u, fw, iteration=k, budget=_relative_budget(bw_evals, N))
            bw_evals = bw.evaluations
            data = interval_data(pw, u, fw, bw, quadrature)
            # First-order optimality of u^k (docs/guide.md): what `converged` rests on.
            measure = optimality(pw, data, problem.controls, maximiser)
            history[-1] = history[-1]._replace(optimality=measure)
            if is_optimal(measure, cost, tol):
                # The certified iterate is the result (a rule without safeguard may have seen a lower
                # J on the way, at a point that was not optimal).
                best, final = (cost, u, fw, len(history) - 1), (u, bw, measure)
                status, message = "converged", f"first-order optimal at iteration {k - 1}"
                break
            if u is best[1]:
                final = (u, bw, measure)
            rejected, fw_seconds, fw_evals, max_seconds = 0, 0.0, 0, 0.0
            evals_before = rule.evaluations
            while True:
                t0 = time.perf_counter()
                u_new = rule.propose(data).detach()
                max_seconds += time.perf_counter() - t0
                if not bool(torch.isfinite(u_new).all()):
                    where = float(nodes[int((~torch.isfinite(u_new)).any(-1).nonzero()[0])])
                    raise NonFiniteError(f"the Hamiltonian maximisation returned non-finite controls at t = {where:g}",
                                         iteration=k, sweep="maximisation", time=where)
                t0 = time.perf_counter()
                # A trial sweep may cost a few times the current one's: more means the trial control makes
                # the dynamics stiff or blow up. An adaptive rule abandons such a trial (counted as rejected).
                budget = _BUDGET_FACTOR * max(fw.evaluations, _MIN_EVALS_PER_INTERVAL * N)
                try:
                    fw_new = sweeper.forward(u_new, iteration=k, budget=budget)
                except (SweepBudgetError, NonFiniteError):
                    if not rule.adaptive:
                        raise
                    fw_new = None
                fw_seconds += time.perf_counter() - t0
                fw_evals += 0 if fw_new is None else fw_new.evaluations
                terms = IntervalHamiltonian(pw, data, 0.0).terms(u_new, create_graph=False)
                terms = type(terms)(*(x.detach() for x in terms))
                gain = float((terms.hamiltonian - data.hamiltonian).sum())
                new_cost = math.inf if fw_new is None else float(fw_new.cost)
                if rule.judge(cost, new_cost, gain):
                    break
                rejected += 1
                if rejected >= rule.max_rejections:
                    break
            max_evals = rule.evaluations - evals_before
            if rejected >= rule.max_rejections:
                status = "stalled"
                message = (f"no decrease of J found in {rejected} proposals at iteration {k} "
                           f"({_describe(rule.parameters())})")
                history.append(_record(k, cost, 0.0, None, u, u, rejected, rule, t_iter, start, bw, fw_evals,
                                       max_evals, fw_seconds, max_seconds))
                break
            change = abs(new_cost - cost)
            record = _record(k, new_cost, gain, terms, u, u_new, rejected, rule, t_iter, start, bw, fw_evals,
                             max_evals, fw_seconds, max_seconds)
            history.append(record)
            rises = rises + 1 if (new_cost > cost and new_cost > history[0].cost) else 0
            u, fw, cost = u_new, fw_new, new_cost
            if cost < best[0]:
                best, since_best = (cost, u, fw, len(history) - 1), 0
            else:
                since_best += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"J={cost:.8g} {_describe(rule.parameters())}")
            if rises >= _DIVERGENCE_PATIENCE:
                raise DivergenceError(
                    f"method {method!r} diverged: J rose in {rises} consecutive iterations to {cost:.6g} "
                    f"(J(u^0) = {history[0].cost:.6g}) at iteration {k}. Basic MSA can diverge (paper Sec. 3.1); "
                    "use method='emsa' (adaptive rho by default) or a larger fixed rho", iteration=k)
            if rule.detect_cycles and since_best >= _CYCLE_PATIENCE and change > stall_tol * max(1.0, abs(cost)):
                raise DivergenceError(
                    f"method {method!r} does not converge: J has not improved on its best value {best[0]:.6g} in "
                    f"{since_best} iterations but keeps changing (now {cost:.6g}, iteration {k}): the iteration "
                    "cycles or drifts away. Basic MSA can (paper Sec. 3.1); use method='emsa' or 'sqh'", iteration=k)
            if callback is not None and callback(record, u):
                status, message = "callback", f"stopped by callback at iteration {k}"
                break
            reason = rule.converged()
            if reason is not None:
                status, message = "stalled", reason
                break
            small_steps = small_steps + 1 if change <= stall_tol * max(1.0, abs(cost)) else 0
            if small_steps >= _STALL_PATIENCE:
                status = "stalled"
                message = (f"|dJ| <= stall_tol * max(1, |J|) on {_STALL_PATIENCE} iterations in a row "
                           f"(stall_tol = {stall_tol:g})")
                break
    except KeyboardInterrupt:
        # Like IPOPT's user stop: the best iterate so far is the result, marked as such.
        if best is None:
            raise
        status = "interrupted"
        message = f"interrupted (KeyboardInterrupt) after {len(history) - 1} iterations"
    except SolveError as err:
        if best is not None:
            err.attach(best[1], best[0], history)
        raise
    finally:
        if bar is not None:
            bar.close()

    # --------------------------------------------------------------- result
    cost, u_best, fw_best, index = best
    if not rule.adaptive and cost < float(fw.cost):
        message += f"; returned the best iterate (J = {cost:.10g}), not the last (J = {float(fw.cost):.10g})"
    bw_best, measure = None, math.nan
    if final is not None and final[0] is u_best:
        _, bw_best, measure = final
    else:
        try:
            bw_best = sweeper.backward(u_best, fw_best)
            measure = optimality(pw, interval_data(pw, u_best, fw_best, bw_best, quadrature), problem.controls,
                                 maximiser)
        except KeyboardInterrupt:  # a second Ctrl-C: return without the co-state
            status, message = "interrupted", message + "; the final co-state sweep was interrupted too"
    history[index] = history[index]._replace(optimality=measure)
    converged = is_optimal(measure, cost, tol)
    if converged:
        status = "converged"
    message += (f"; first-order optimality {measure:.3g} "
                f"{'<=' if converged else '>'} tol * max(1, |J|) = {tol * max(1.0, abs(cost)):.3g}")
    if not converged and max_iter > 0:
        warnings.warn(f"solve did not converge: {message}", RuntimeWarning, stacklevel=2)
    settings["maximisers_used"] = dict(maximiser.used)  # e.g. {"closed-form": 41}: what maximised the Hamiltonian
    return Solution(cost=cost, controls=u_best, mesh=nodes, history=history, converged=converged, message=message,
                    method=method, states_trajectory=fw_best.states,
                    costates_trajectory=None if bw_best is None else bw_best.costates,
                    control_set=problem.controls, single_sample=problem.single_sample, problem_name=problem.name,
                    settings=settings, problem=problem, optimality=measure, status=status)


def _relative_budget(previous: Optional[int], N: int) -> int:
    """Right-hand-side evaluations a sweep may take: a multiple of the same sweep's cost at the previous
    iteration (or an absolute cap for the first one). Beyond it the sweep is stopped with an error that
    carries the best controls: a co-state that grows without bound (an unbounded problem) must not hang."""
    if previous is None:
        return max(_FIRST_SWEEP_EVALS, _MIN_EVALS_PER_INTERVAL * _BUDGET_FACTOR * N)
    return _BUDGET_FACTOR * max(previous, _MIN_EVALS_PER_INTERVAL * N)


def _record(k, cost, gain, terms, u_old, u_new, rejected, rule, t_iter, start, bw, fw_evals, max_evals, fw_seconds,
            max_seconds) -> IterationRecord:
    now = time.perf_counter()
    return IterationRecord(
        iteration=k, cost=cost, hamiltonian_gain=gain,
        state_error=0.0 if terms is None else float(terms.state_error.sum()),
        costate_error=0.0 if terms is None else float(terms.costate_error.sum()),
        control_change=float((u_new - u_old).abs().max()) if u_new.numel() else 0.0,
        rejected=rejected, parameters=rule.parameters(), seconds=now - t_iter, elapsed=now - start,
        forward_evals=fw_evals, backward_evals=bw.evaluations, maximiser_evals=max_evals,
        forward_seconds=fw_seconds, backward_seconds=bw.seconds, maximise_seconds=max_seconds)


def _describe(parameters) -> str:
    return " ".join(f"{k}={v:.3g}" for k, v in parameters.items())


def _initial_controls(init, problem: ControlProblem, N: int, m: int, dtype, device) -> torch.Tensor:
    controls = problem.controls
    if init is None:
        return controls.default_point(dtype, device).expand(N, m).clone()
    try:
        u = torch.as_tensor(init, dtype=dtype).to(device)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"solve: `init` must be a tensor [N, m] = [{N}, {m}], [m] or a number, "
                        f"got {type(init).__name__}") from None
    if u.ndim == 0:
        u = u.expand(N, m)
    elif u.ndim == 1 and u.shape[0] == m:
        u = u.expand(N, m)
    if tuple(u.shape) != (N, m):
        raise ValueError(f"solve: `init` has shape {tuple(u.shape)}; expected [N, m] = [{N}, {m}] "
                         f"(N mesh intervals, m controls), [m] or a number")
    inside = controls.contains(u)
    if not bool(inside.all()):
        n = int((~inside).nonzero()[0])
        raise ValueError(f"solve: `init` lies outside the control set {controls!r} on interval {n} "
                         f"(value {u[n].tolist()}); project it first, e.g. problem.controls.project(init)")
    return u.clone()


def _progress_bar(progress: bool, total: int, name: str, method: str):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"{name} [{method}]", leave=False)


def _device(device) -> torch.device:
    """``device`` as a torch.device, refusing one this machine does not have."""
    try:
        device = torch.device("cpu" if device is None else device)
    except (RuntimeError, TypeError):
        raise ValueError(f"solve: `device` must be a torch device such as 'cpu' or 'cuda', got {device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"solve: `device` {str(device)!r} was requested but CUDA is not available on this machine "
                         "(torch.cuda.is_available() is False); use device='cpu'")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"solve: `device` {str(device)!r} does not exist: this machine has "
                         f"{torch.cuda.device_count()} CUDA device(s)")
    return device
