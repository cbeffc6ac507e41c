"""Errors a solve can end with. Each keeps what was found before it failed."""
from __future__ import annotations

from typing import Optional

__all__ = ["SolveError", "NonFiniteError", "DivergenceError", "SweepBudgetError"]


class SolveError(RuntimeError):
    """A solve that could not return a result.

    Attributes:
        iteration: the iteration at which it stopped (0 = the initial sweep), or None.
        best_controls: the controls with the lowest J seen so far [N, m], or None.
        best_cost: their J, or None.
        history: the iteration records up to the failure.

    Example: catch it (or any SolveError) and keep the best controls found.
        >>> import pmpsolve as pmp
        >>> try:
        ...     raise pmp.SolveError("J grew on 5 iterations in a row", iteration=7)
        ... except pmp.SolveError as error:
        ...     print(type(error).__name__, error.iteration, error.best_controls)
        SolveError 7 None
    """

    def __init__(self, message: str, *, iteration: Optional[int] = None):
        super().__init__(message)
        self.iteration = iteration
        self.best_controls = None
        self.best_cost: Optional[float] = None
        self.history: list = []

    def attach(self, best_controls, best_cost, history) -> "SolveError":
        """Record the best iterate so far; add it to the message."""
        self.best_controls, self.best_cost, self.history = best_controls, best_cost, list(history)
        if best_cost is not None:
            self.args = (f"{self.args[0]}. The best controls so far (J = {best_cost:.10g}) are in "
                         f"`error.best_controls`, the iteration records in `error.history`",)
        return self


class NonFiniteError(SolveError, FloatingPointError):
    """A sweep or the maximisation produced NaN or inf.

    Attributes (besides those of SolveError):
        sweep: "forward", "backward" or "maximisation".
        time: the time t at which values stopped being finite, when known.

    Example: catch it (or any SolveError) and keep the best controls found.
        >>> import pmpsolve as pmp
        >>> try:
        ...     raise pmp.NonFiniteError("J grew on 5 iterations in a row", iteration=7, sweep="forward")
        ... except pmp.SolveError as error:
        ...     print(type(error).__name__, error.iteration, error.best_controls)
        NonFiniteError 7 None
    """

    def __init__(self, message: str, *, iteration: Optional[int] = None, sweep: str = "forward",
                 time: Optional[float] = None):
        prefix = f"iteration {iteration}: " if iteration is not None else ""
        super().__init__(prefix + message, iteration=iteration)
        self.sweep, self.time = sweep, time


class DivergenceError(SolveError):
    """The iteration diverged (the paper notes basic MSA can, Sec. 3.1).

    Example: catch it (or any SolveError) and keep the best controls found.
        >>> import pmpsolve as pmp
        >>> try:
        ...     raise pmp.DivergenceError("J grew on 5 iterations in a row", iteration=7)
        ... except pmp.SolveError as error:
        ...     print(type(error).__name__, error.iteration, error.best_controls)
        DivergenceError 7 None
    """


class SweepBudgetError(SolveError):
    """A sweep needed far more right-hand-side evaluations than the same sweep at the previous
    iteration (or than the cap of a first sweep): the solution grows without bound (an
    unbounded problem) or the dynamics became stiff.

    Attributes (besides those of SolveError):
        sweep: "forward" or "backward".
        budget: the evaluations it was allowed.
        time: the last time t the solver reached, when known.

    Example: catch it (or any SolveError) and keep the best controls found.
        >>> import pmpsolve as pmp
        >>> try:
        ...     raise pmp.SweepBudgetError("J grew on 5 iterations in a row", iteration=7, budget=1000)
        ... except pmp.SolveError as error:
        ...     print(type(error).__name__, error.iteration, error.best_controls)
        SweepBudgetError 7 None
    """

    def __init__(self, message: str, *, iteration: Optional[int] = None, sweep: str = "forward",
                 budget: int = 0, time: Optional[float] = None):
        prefix = f"iteration {iteration}: " if iteration is not None else ""
        super().__init__(prefix + message, iteration=iteration)
        self.sweep, self.budget, self.time = sweep, budget, time
