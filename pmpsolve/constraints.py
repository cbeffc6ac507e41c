"""What a problem may require besides its costs: constraints and a free final time.

    pmp.Equal(fn)    fn(...) == 0      pmp.AtMost(fn)    fn(...) <= 0
    pmp.FreeTime(guess, low=0, high=inf)  the final time T is a decision variable

A terminal constraint's ``fn(x)`` (``fn(x, p)`` with static parameters) returns [..., c]
for the final state x [..., n]; a path constraint's ``fn(t, x, u)`` (``fn(t, x, u, p)``)
returns [..., c] and must hold at every time of [0, T]. ``ControlProblem`` checks each
function once, with a trial call; ``pmpsolve.constrained`` solves the problem.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, Optional

__all__ = ["Constraint", "Equal", "AtMost", "FreeTime"]


class Constraint:
    """Base of ``Equal`` and ``AtMost``: a function whose values are constrained.

    Args:
        fn: the constraint function (see the module for its arguments), returning [..., c].
        name: a label for messages and ``sol.multipliers`` (default: the function's name).
    """

    kind: str = ""
    relation: str = ""

    def __init__(self, fn: Callable, name: Optional[str] = None):
        if not callable(fn):
            raise TypeError(f"pmp.{type(self).__name__}: `fn` must be a callable returning [..., c], "
                            f"got {type(fn).__name__}")
        if name is not None and not isinstance(name, str):
            raise TypeError(f"pmp.{type(self).__name__}: `name` must be a string or None, got {name!r}")
        self.fn = fn
        label = getattr(fn, "__name__", "") or ""
        self.name = name or ("" if label == "<lambda>" else label)

    def __repr__(self):
        return f"pmp.{type(self).__name__}({self.name or 'fn'})"


class Equal(Constraint):
    """``fn(...) == 0``: an equality (for terminal constraints; x(T) reaching a target).

    Example: the final state is the origin.
        >>> import pmpsolve as pmp
        >>> pmp.Equal(lambda x: x, name="origin")
        pmp.Equal(origin)
    """

    kind, relation = "equal", "== 0"


class AtMost(Constraint):
    """``fn(...) <= 0``: an inequality (terminal, or on the whole path for path constraints).

    Example: the state bound x1 <= 1/9 as a path constraint.
        >>> import pmpsolve as pmp
        >>> pmp.AtMost(lambda t, x, u: x[..., :1] - 1 / 9, name="x1 <= 1/9")
        pmp.AtMost(x1 <= 1/9)
    """

    kind, relation = "at_most", "<= 0"


class FreeTime:
    """A free final time T in [low, high], starting from ``guess`` (``horizon=pmp.FreeTime(...)``).

    The solve rescales time to s = t / T in [0, 1] and optimises T with the controls; minimum
    time is ``running_cost=lambda t, x, u: torch.ones(x.shape[:-1])`` (or a terminal cost in T's
    place). ``sol.horizon`` is the optimal T.

    Example:
        >>> import pmpsolve as pmp
        >>> pmp.FreeTime(2.0, low=0.5, high=10.0)
        pmp.FreeTime(2.0, low=0.5, high=10.0)
    """

    def __init__(self, guess: float, low: float = 0.0, high: float = math.inf):
        for label, value in (("guess", guess), ("low", low), ("high", high)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or value != value:
                raise TypeError(f"pmp.FreeTime: `{label}` must be a number, got {value!r}")
        guess, low, high = float(guess), float(low), float(high)
        if low < 0:
            raise ValueError(f"pmp.FreeTime: `low` must be >= 0 (time runs forward), got {low:g}")
        if not low < high:
            raise ValueError(f"pmp.FreeTime: `low` must be below `high`, got low = {low:g} >= high = {high:g}")
        if not (math.isfinite(guess) and low < guess < high):
            raise ValueError(f"pmp.FreeTime: `guess` must be a finite T with low < guess < high, got guess = "
                             f"{guess:g} outside ({low:g}, {high:g}); e.g. pmp.FreeTime({_inside(low, high):g}, "
                             f"low={low:g}, high={high:g})")
        self.guess, self.low, self.high = guess, low, high

    def __repr__(self):
        return f"pmp.FreeTime({self.guess!r}, low={self.low!r}, high={self.high!r})"


def _inside(low: float, high: float) -> float:
    """A point strictly inside (low, high), for a hint."""
    if math.isinf(high):
        return max(1.0, 2 * low)
    return 0.5 * (low + high)
