"""Stopping tests: small objects the solver asks after every kept step.

Each test looks at the ``SolverState`` after an iteration and returns ``None`` (go on),
a ``StopReason(status, message)`` (end the solve; the result is the best iterate and
``converged`` is decided by the optimality measure alone), or raises a
``DivergenceError`` (a method without safeguard that diverges must not return a result).
The test that decides ``converged`` (first-order optimality) is not among them: it runs
at the start of each iteration, when the co-state sweep of the iterate is available
(``pmpsolve.update.optimality``).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Protocol

from ..errors import DivergenceError

__all__ = ["StopReason", "StoppingTest", "Divergence", "Unbounded", "Cycling", "RuleStop", "Stall", "default_tests"]

DIVERGENCE_PATIENCE = 3  # consecutive increases above J(u^0) that count as divergence
CYCLE_PATIENCE = 25  # iterations without a new best J (while J keeps changing) that count as cycling
# J below J(u^0) by more than this many times max(1, |J(u^0)|) ends the solve as "unbounded". A finite
# J* that far down is held by `converged` (scale capped at max(1, |J(u^0)|)) to tol * 1e-6 relative to
# |J*|, i.e. 1e-11 in float64 and 1e-9 in float32, well beneath the sweeps' rtol (1e-9, 1e-6): it could
# not be certified anyway, so stopping there forfeits nothing. An unbounded run crosses the line within
# a few iterations (x' = u, J = -x(1)^2 from J(u^0) = -1: 3 to 8 iterations, by method).
UNBOUNDED_RATIO = 1e6
STALL_PATIENCE = 3  # iterations in a row with |dJ| <= stall_tol * max(1, |J|) that count as a stall


class StopReason(NamedTuple):
    status: str  # "stalled", "callback", ...
    message: str


class StoppingTest(Protocol):
    def __call__(self, state) -> Optional[StopReason]:
        """``state``: the SolverState after a kept step. Return a StopReason to end the solve."""


class Divergence:
    """J rose above J(u^0) on ``patience`` iterations in a row: DivergenceError (basic MSA, fixed rho)."""

    def __init__(self, method: str, patience: int = DIVERGENCE_PATIENCE):
        self.method, self.patience = method, patience

    def __call__(self, state) -> Optional[StopReason]:
        if state.rises >= self.patience:
            raise DivergenceError(
                f"method {self.method!r} diverged: J rose in {state.rises} consecutive iterations to "
                f"{state.cost:.6g} (J(u^0) = {state.history[0].cost:.6g}) at iteration {state.iteration}. Basic MSA "
                "can diverge (paper Sec. 3.1); use method='emsa' (adaptive rho by default) or a larger fixed rho",
                iteration=state.iteration)
        return None


class Unbounded:
    """J fell below J(u^0) - ``ratio`` * max(1, |J(u^0)|): status "unbounded" (never converged)."""

    def __init__(self, ratio: float = UNBOUNDED_RATIO):
        self.ratio = ratio

    def __call__(self, state) -> Optional[StopReason]:
        initial = state.history[0].cost
        if initial - state.cost > self.ratio * max(1.0, abs(initial)):
            return StopReason("unbounded", f"J fell from J(u^0) = {initial:.6g} to {state.cost:.6g} in "
                                           f"{state.iteration} iterations: the problem looks unbounded below "
                                           "(check the signs of the costs and the bounds of the control set)")
        return None


class Cycling:
    """No new best J in ``patience`` iterations while J keeps changing: DivergenceError. Only for rules
    that ask for it (basic MSA): a fixed-rho E-MSA run on a network may spike and recover."""

    def __init__(self, method: str, stall_tol: float, patience: int = CYCLE_PATIENCE):
        self.method, self.stall_tol, self.patience = method, stall_tol, patience

    def __call__(self, state) -> Optional[StopReason]:
        if state.since_best >= self.patience and state.change > self.stall_tol * max(1.0, abs(state.cost)):
            raise DivergenceError(
                f"method {self.method!r} does not converge: J has not improved on its best value "
                f"{state.best.cost:.6g} in {state.since_best} iterations but keeps changing (now {state.cost:.6g}, "
                f"iteration {state.iteration}): the iteration cycles or drifts away. Basic MSA can (paper Sec. "
                "3.1); use method='emsa' or 'sqh'", iteration=state.iteration)
        return None


class RuleStop:
    """The update rule's own stopping rule (SQH's kappa test, E-MSA's fixed point at rho_min)."""

    def __init__(self, rule):
        self.rule = rule

    def __call__(self, state) -> Optional[StopReason]:
        reason = self.rule.converged()
        return None if reason is None else StopReason("stalled", reason)


class Stall:
    """|dJ| <= stall_tol * max(1, |J|) on ``patience`` iterations in a row."""

    def __init__(self, stall_tol: float, patience: int = STALL_PATIENCE):
        self.stall_tol, self.patience = stall_tol, patience

    def __call__(self, state) -> Optional[StopReason]:
        if state.small_steps >= self.patience:
            return StopReason("stalled", f"|dJ| <= stall_tol * max(1, |J|) on {self.patience} iterations in a row "
                                   f"(stall_tol = {self.stall_tol:g})")
        return None


def default_tests(method: str, rule, stall_tol: float) -> list:
    """The tests a solve asks, in order."""
    tests = [Divergence(method), Unbounded()]
    if rule.detect_cycles:
        tests.append(Cycling(method, stall_tol))
    return tests + [RuleStop(rule), Stall(stall_tol)]
