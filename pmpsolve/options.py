"""The settings of a solve, one record per concept: ``pmp.ODE``, ``pmp.Maximiser``, ``pmp.Stop``.

``solve(problem, ode=pmp.ODE(...), maximiser=pmp.Maximiser(...), stop=pmp.Stop(...))``
takes them as diffrax takes a solver and a step-size controller. Each record is
frozen, checks itself on construction (the error names the argument, the value
and the fix) and documents its options in its own docstring, nowhere else.
``Solution.settings`` is the union of their ``settings()`` dicts (plain values,
JSON-friendly) with the method's.
"""
from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Optional

import torch

__all__ = ["ODE", "Maximiser", "Stop", "DEFAULT_TOLERANCES"]

#: ODE tolerances (rtol, atol) by dtype when ``rtol``/``atol`` are not given.
DEFAULT_TOLERANCES = {torch.float64: (1e-9, 1e-11), torch.float32: (1e-6, 1e-8)}


def _count(record: str, label: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{record}: `{label}` must be an int >= {low}, got {value!r}")
    return int(value)


def _nonnegative(record: str, label: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= 0:
        raise ValueError(f"{record}: `{label}` must be a number >= 0, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class ODE:
    """How the forward (state) and backward (co-state) sweeps integrate.

    Args:
        method: a torchdiffeq method (default ``"dopri5"``). Fixed-step methods
            (``"rk4"``, ``"euler"``, ...) need ``options={"step_size": h}``.
        rtol, atol: the adaptive methods' tolerances; None (default): by dtype,
            1e-9 / 1e-11 in float64 and 1e-6 / 1e-8 in float32 (``DEFAULT_TOLERANCES``).
        options: passed to torchdiffeq (e.g. ``{"step_size": 0.01}`` for a fixed-grid method).

    Example:
        >>> import pmpsolve as pmp
        >>> pmp.ODE("rk4", options={"step_size": 0.01}).method
        'rk4'
    """

    method: str = "dopri5"
    rtol: Optional[float] = None
    atol: Optional[float] = None
    options: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        from .sweep.ode import METHODS

        if self.method not in METHODS:
            raise ValueError(f"pmp.ODE: unknown `method` {self.method!r}; choose a torchdiffeq method: "
                             f"{sorted(METHODS)}")
        for label in ("rtol", "atol"):
            value = getattr(self, label)
            if value is not None and not (isinstance(value, numbers.Real) and not isinstance(value, bool)
                                          and value > 0):
                raise ValueError(f"pmp.ODE: `rtol` and `atol` must be > 0 or None (by dtype), got {label}={value!r}")
        if self.options is not None and not isinstance(self.options, dict):
            raise TypeError(f"pmp.ODE: `options` must be a dict of torchdiffeq options, got "
                            f"{type(self.options).__name__}")
        object.__setattr__(self, "options", dict(self.options or {}))

    def resolved(self, dtype: torch.dtype) -> "ODE":
        """The same options with the tolerances filled in for ``dtype``."""
        rtol, atol = DEFAULT_TOLERANCES.get(dtype, DEFAULT_TOLERANCES[torch.float32])
        return ODE(self.method, rtol if self.rtol is None else float(self.rtol),
                   atol if self.atol is None else float(self.atol), self.options)

    def settings(self) -> dict:
        return {"ode_method": self.method, "rtol": self.rtol, "atol": self.atol, "ode_options": dict(self.options)}


@dataclass(frozen=True)
class Maximiser:
    """How the interval Hamiltonians are maximised.

    Args:
        kind: how boxes and R^m are maximised: ``"auto"`` (default: the closed form where
            the objective is a separable concave quadratic in u, else L-BFGS, or proximal
            gradient with an L1/L0 cost), ``"closed-form"``, ``"lbfgs"`` or ``"proximal"``.
            Finite sets are enumerated, UserSets use their own maximiser.
        iterations: iterations of the iterative maximisers per maximisation (default 50).
        perturb: half-width of uniform noise added to the maximiser's start (default 0;
            0.005 in the paper's reference code).
        seed: seeds every random part of a solve (the start perturbation); identical calls
            give bit-identical results on the CPU with or without it.
        quadrature: Gauss points per interval of the interval Hamiltonian (1 to 10, default 3).

    Example:
        >>> import pmpsolve as pmp
        >>> pmp.Maximiser(kind="lbfgs", perturb=0.005, seed=0).iterations
        50
    """

    kind: str = "auto"
    iterations: int = 50
    perturb: float = 0.0
    seed: Optional[int] = None
    quadrature: int = 3

    def __post_init__(self):
        from .update.maximisers import MAXIMISERS

        if self.kind != "auto" and self.kind not in MAXIMISERS:
            choices = ", ".join(repr(name) for name in ("auto", *MAXIMISERS))
            raise ValueError(f"pmp.Maximiser: unknown maximiser `kind` {self.kind!r}; choose one of {choices}")
        if isinstance(self.quadrature, bool) or not isinstance(self.quadrature, int) or not 1 <= self.quadrature <= 10:
            raise ValueError(f"pmp.Maximiser: `quadrature` must be an int from 1 to 10 (Gauss points), "
                             f"got {self.quadrature!r}")
        object.__setattr__(self, "iterations", _count("pmp.Maximiser", "iterations", self.iterations, 1))
        if isinstance(self.perturb, bool) or not (isinstance(self.perturb, numbers.Real) and self.perturb >= 0):
            raise ValueError(f"pmp.Maximiser: `perturb` must be >= 0 (a half-width), got {self.perturb!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral)):
            raise TypeError(f"pmp.Maximiser: `seed` must be an int or None, got {self.seed!r}")

    def generator(self) -> Optional[torch.Generator]:
        """One generator for every random draw of a solve (none touches torch's global generator)."""
        return None if self.seed is None else torch.Generator(device="cpu").manual_seed(int(self.seed))

    def settings(self) -> dict:
        return {"maximiser": self.kind, "maximiser_iter": self.iterations, "perturb": self.perturb,
                "seed": self.seed, "quadrature": self.quadrature}


@dataclass(frozen=True)
class Stop:
    """When a solve stops.

    Args:
        max_iter: iteration limit (default 200; 0 returns the initial controls, measured).
        tol: ``converged`` means first-order optimal: the optimality measure of the
            returned controls (``pmpsolve.update.optimality``: the projected L2 gradient for boxes
            and R^m, the largest Hamiltonian gap per unit time for finite and user sets) is
            at most ``tol * max(1, min(|J|, |J(u^0)|))`` (relative to J, but never to more than
            the J of the initial controls: a J running away to -inf does not loosen it); the
            solve stops as soon as it is. None (default):
            by dtype, 1e-5 in float64 and 1e-3 in float32 (``optimality.DEFAULT_OPTIMALITY_TOL``).
        stall_tol: stop (``converged=False`` unless the measure says otherwise) when
            |J(u^{k+1}) - J(u^k)| <= stall_tol * max(1, |J|) on 3 iterations in a row
            (default 1e-12).
        violation_tol: for a problem with constraints, ``converged`` also requires every
            constraint to hold within this absolute tolerance, in the units of the constraint
            functions (scale them to order 1). None (default): 1e-6 in float64, 1e-4 in float32.
            ``max_iter`` then counts the iterations of all rounds of the outer loop.

    Example:
        >>> import pmpsolve as pmp
        >>> pmp.Stop(max_iter=50, tol=1e-8)
        Stop(max_iter=50, tol=1e-08, stall_tol=1e-12, violation_tol=None)
    """

    max_iter: int = 200
    tol: Optional[float] = None
    stall_tol: float = 1e-12
    violation_tol: Optional[float] = None

    def __post_init__(self):
        object.__setattr__(self, "max_iter", _count("pmp.Stop", "max_iter", self.max_iter, 0))
        if self.tol is not None:
            object.__setattr__(self, "tol", _nonnegative("pmp.Stop", "tol", self.tol))
        object.__setattr__(self, "stall_tol", _nonnegative("pmp.Stop", "stall_tol", self.stall_tol))
        if self.violation_tol is not None:
            object.__setattr__(self, "violation_tol", _nonnegative("pmp.Stop", "violation_tol", self.violation_tol))

    def resolved(self, dtype: torch.dtype) -> "Stop":
        from .update.optimality import DEFAULT_OPTIMALITY_TOL

        return Stop(self.max_iter, DEFAULT_OPTIMALITY_TOL[dtype] if self.tol is None else self.tol, self.stall_tol,
                    self.violation_tol)

    def settings(self) -> dict:
        settings = asdict(self)
        if settings["violation_tol"] is None:  # only a constrained solve reads it
            del settings["violation_tol"]
        return settings
