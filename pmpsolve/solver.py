"""``solve``: the iteration loop shared by every update rule (paper Alg. 1-2).

Each iteration: backward sweep for the current controls u^k (the forward
sweep is already there), interval data at the quadrature points, then the
rule proposes u^{k+1}; a forward sweep re-simulates it (its J is the
reported cost) and the rule keeps or rejects it. Settings are checked once,
here, before anything runs.
"""
from __future__ import annotations

import math
import time
import warnings
from typing import Callable, Optional, Union

import torch

from .errors import DivergenceError, NonFiniteError, SolveError
from .hamiltonian import IntervalHamiltonian, interval_data
from .maximisers import HamiltonianMaximiser
from .mesh import make_mesh
from .pointwise import PointwiseProblem
from .problem import ControlProblem
from .rules import RULES, ExtendedMSA
from .solution import IterationRecord, Solution
from .sweeps import ODE_METHODS, SweepBudgetExceeded, Sweeper

__all__ = ["solve", "DEFAULT_TOLERANCES"]

#: ODE tolerances (rtol, atol) by dtype when ``rtol``/``atol`` are not given.
DEFAULT_TOLERANCES = {torch.float64: (1e-9, 1e-11), torch.float32: (1e-6, 1e-8)}
_DIVERGENCE_PATIENCE = 3  # consecutive increases above J(u^0) that count as divergence
_BUDGET_FACTOR = 5  # a trial forward sweep may cost this many times the current one
_CYCLE_PATIENCE = 25  # iterations without a new best J (while J keeps changing) that count as cycling


def solve(problem: ControlProblem, *, method: str = "emsa", mesh: Union[int, torch.Tensor] = 200,
          max_iter: int = 200, tol: float = 1e-8, rho: Optional[float] = None, ode_method: str = "dopri5",
          rtol: Optional[float] = None, atol: Optional[float] = None, init=None, device=None,
          dtype: Optional[torch.dtype] = None, seed: Optional[int] = None, progress: bool = False,
          callback: Optional[Callable] = None, maximiser_iter: int = 50, perturb: float = 0.0,
          quadrature: int = 3, options: Optional[dict] = None, ode_options: Optional[dict] = None,
          maximiser: str = "auto") -> Solution:
    """Solve ``problem`` by the maximum principle, optimise-then-discretise.

    Args:
        problem: the ControlProblem.
        method: the update rule: ``"emsa"`` (extended MSA, paper Alg. 2; default),
            ``"msa"`` (basic MSA, Alg. 1), ``"sqh"`` (sequential quadratic Hamiltonian) or
            ``"gradient"`` (soft step, eq. 12 = gradient descent).
        mesh: number of uniform control intervals N, or node times [N + 1] from 0 to T.
        max_iter: iteration limit.
        tol: stop when |J(u^{k+1}) - J(u^k)| <= tol * max(1, |J|) on two iterations in a row.
        rho: E-MSA penalty (eq. 7). A number: fixed, every step taken (Alg. 2). None
            (default): adaptive, steps kept only when J decreases (see ``ExtendedMSA``).
        ode_method: any torchdiffeq method (default ``"dopri5"``); rtol, atol: its tolerances
            (default by dtype: float64 1e-9/1e-11, float32 1e-6/1e-8).
        init: initial controls: [N, m], [m] (constant) or a number; default 0, or the
            middle of a box that excludes 0. Must lie in the control set.
        device, dtype: where and in what precision to solve (default: the CPU, float64).
        seed: seeds the maximiser's start perturbation.
        progress: show a tqdm progress bar.
        callback: called as ``callback(record, controls)`` after every iteration;
            return True to stop.
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

    Returns:
        A Solution. Raises NonFiniteError if a sweep blows up and DivergenceError if a
        method without safeguard (basic MSA, fixed rho) diverges; both carry the best
        controls found so far.
    """
    # ------------------------------------------------------------- the door
    if not isinstance(problem, ControlProblem):
        raise TypeError(f"solve: `problem` must be a pmpsolve.ControlProblem, got {type(problem).__name__}")
    if method not in RULES:
        raise ValueError(f"solve: unknown `method` {method!r}; choose one of {sorted(RULES)}")
    if ode_method not in ODE_METHODS:
        raise ValueError(f"solve: unknown `ode_method` {ode_method!r}; choose a torchdiffeq method: {sorted(ODE_METHODS)}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 0:
        raise ValueError(f"solve: `max_iter` must be an int >= 0, got {max_iter!r}")
    if not (isinstance(tol, (int, float)) and tol >= 0):
        raise ValueError(f"solve: `tol` must be a number >= 0, got {tol!r}")
    if rho is not None and method != "emsa":
        raise ValueError(f"solve: `rho` is an option of method='emsa', not of method={method!r}")
    if isinstance(quadrature, bool) or not isinstance(quadrature, int) or not 1 <= quadrature <= 10:
        raise ValueError(f"solve: `quadrature` must be an int from 1 to 10 (Gauss points), got {quadrature!r}")
    if callback is not None and not callable(callback):
        raise TypeError(f"solve: `callback` must be callable or None, got {type(callback).__name__}")
    dtype = torch.float64 if dtype is None else dtype
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point and not dtype.is_complex):
        raise TypeError(f"solve: `dtype` must be a real floating torch dtype such as torch.float64, got {dtype!r}")
    device = torch.device("cpu" if device is None else device)
    default_rtol, default_atol = DEFAULT_TOLERANCES.get(dtype, (1e-6, 1e-8))
    rtol = default_rtol if rtol is None else float(rtol)
    atol = default_atol if atol is None else float(atol)
    if not (rtol > 0 and atol > 0):
        raise ValueError(f"solve: `rtol` and `atol` must be > 0, got rtol={rtol}, atol={atol}")

    pw = PointwiseProblem(problem, dtype, device)
    nodes = make_mesh(mesh, problem.horizon, dtype, device)
    N, m = nodes.numel() - 1, problem.control_dim
    u = _initial_controls(init, problem, N, m, dtype, device)
    generator = None
    if seed is not None:
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        torch.manual_seed(int(seed))
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
    settings = dict(method=method, mesh=N, max_iter=max_iter, tol=tol, rho=rho, ode_method=ode_method, rtol=rtol,
                    atol=atol, dtype=str(dtype), device=str(device), seed=seed, maximiser_iter=maximiser_iter,
                    perturb=perturb, quadrature=quadrature, options=dict(options or {}))

    # ------------------------------------------------------------- the loop
    start = time.perf_counter()
    history = []
    best = None  # (cost, controls, forward sweep)
    bar = _progress_bar(progress, max_iter, problem.name, method)
    try:
        fw = sweeper.forward(u, iteration=0)
        cost = float(fw.cost)
        best = (cost, u, fw)
        history.append(IterationRecord(0, cost, parameters=rule.parameters(), seconds=fw.seconds,
                                       elapsed=time.perf_counter() - start, forward_evals=fw.evaluations,
                                       forward_seconds=fw.seconds))
        converged, message, small_steps, rises = False, f"reached max_iter = {max_iter}", 0, 0
        since_best = 0
        for k in range(1, max_iter + 1):
            t_iter = time.perf_counter()
            bw = sweeper.backward(u, fw, iteration=k)
            data = interval_data(pw, u, fw, bw, quadrature)
            rejected, fw_seconds, fw_evals, max_seconds = 0, 0.0, 0, 0.0
            evals_before = rule.evaluations
            while True:
                t0 = time.perf_counter()
                u_new = rule.propose(data).detach()
                max_seconds += time.perf_counter() - t0
                if not bool(torch.isfinite(u_new).all()):
                    raise NonFiniteError("the Hamiltonian maximisation returned non-finite controls at t = "
                                         f"{float(nodes[int((~torch.isfinite(u_new)).any(-1).nonzero()[0])]):g}",
                                         iteration=k, sweep="maximisation",
                                         time=float(nodes[int((~torch.isfinite(u_new)).any(-1).nonzero()[0])]))
                t0 = time.perf_counter()
                try:
                    # An adaptive rule may abandon a trial whose sweep costs far more than the current one's.
                    budget = _BUDGET_FACTOR * max(fw.evaluations, 8 * N) if rule.adaptive else None
                    fw_new = sweeper.forward(u_new, iteration=k, budget=budget)
                except (SweepBudgetExceeded, NonFiniteError):
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
                converged = True
                message = (f"no decrease of J found in {rejected} proposals at iteration {k} "
                           f"({_describe(rule.parameters())}): converged to the tolerance the sweeps allow")
                history.append(_record(k, cost, 0.0, None, u, u, rejected, rule, t_iter, start, bw, fw_evals,
                                       max_evals, fw_seconds, max_seconds))
                break
            change = abs(new_cost - cost)
            record = _record(k, new_cost, gain, terms, u, u_new, rejected, rule, t_iter, start, bw, fw_evals,
                             max_evals, fw_seconds, max_seconds)
            history.append(record)
            rises = rises + 1 if (new_cost > cost and new_cost > history[0].cost) else 0
            u, fw, old_cost, cost = u_new, fw_new, cost, new_cost
            if cost < best[0]:
                best, since_best = (cost, u, fw), 0
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
            if rule.detect_cycles and since_best >= _CYCLE_PATIENCE and change > tol * max(1.0, abs(cost)):
                raise DivergenceError(
                    f"method {method!r} does not converge: J has not improved on its best value {best[0]:.6g} in "
                    f"{since_best} iterations but keeps changing (now {cost:.6g}, iteration {k}): the iteration "
                    "cycles or drifts away. Basic MSA can (paper Sec. 3.1); use method='emsa' or 'sqh'", iteration=k)
            if callback is not None and callback(record, u):
                message = f"stopped by callback at iteration {k}"
                break
            reason = rule.converged()
            if reason is not None:
                converged, message = True, reason
                break
            small_steps = small_steps + 1 if change <= tol * max(1.0, abs(cost)) else 0
            if small_steps >= 2:
                converged = True
                message = f"|dJ| <= tol * max(1, |J|) on two iterations in a row (tol = {tol:g})"
                break
    except SolveError as err:
        if best is not None:
            err.attach(best[1], best[0], history)
        raise
    finally:
        if bar is not None:
            bar.close()

    # --------------------------------------------------------------- result
    cost, u_best, fw_best = best
    if not rule.adaptive:
        if cost < float(fw.cost):
            message += f"; returned the best iterate (J = {cost:.10g}), not the last (J = {float(fw.cost):.10g})"
    if not converged and max_iter > 0:
        warnings.warn(f"solve did not converge: {message}", RuntimeWarning, stacklevel=2)
    settings["maximisers_used"] = dict(maximiser.used)  # e.g. {"closed-form": 41}: what maximised the Hamiltonian
    bw_best = sweeper.backward(u_best, fw_best)
    return Solution(cost=cost, controls=u_best, mesh=nodes, history=history, converged=converged, message=message,
                    method=method, states_trajectory=fw_best.states, costates_trajectory=bw_best.costates,
                    control_set=problem.controls, single_sample=problem.single_sample, problem_name=problem.name,
                    settings=settings, problem=problem)


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
