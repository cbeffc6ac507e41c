"""The settings of a solve, grouped by concept: frozen records that check themselves once.

``solve(problem, **options)`` takes flat keyword arguments (the public contract);
``Solver`` groups them into these records, each validated in ``__post_init__`` with
an error that names the argument, the value and the fix. ``Solution.settings`` is
the union of their ``settings()`` dicts (plain values, JSON-friendly).
"""
from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Optional

import torch

__all__ = ["ODEOptions", "MaximiserOptions", "RuleOptions", "StoppingOptions", "DEFAULT_TOLERANCES"]

#: ODE tolerances (rtol, atol) by dtype when ``rtol``/``atol`` are not given.
DEFAULT_TOLERANCES = {torch.float64: (1e-9, 1e-11), torch.float32: (1e-6, 1e-8)}


def _count(label: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"solve: `{label}` must be an int >= {low}, got {value!r}")
    return int(value)


def _nonnegative(label: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= 0:
        raise ValueError(f"solve: `{label}` must be a number >= 0, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class ODEOptions:
    """How the sweeps integrate: a torchdiffeq ``method``, its tolerances (``None``: by dtype) and
    extra ``options`` for torchdiffeq (e.g. ``{"step_size": 0.01}`` for fixed-step methods)."""

    method: str = "dopri5"
    rtol: Optional[float] = None
    atol: Optional[float] = None
    options: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        from .ode import METHODS

        if self.method not in METHODS:
            raise ValueError(f"solve: unknown `ode_method` {self.method!r}; choose a torchdiffeq method: "
                             f"{sorted(METHODS)}")
        for label in ("rtol", "atol"):
            value = getattr(self, label)
            if value is not None and not (isinstance(value, numbers.Real) and value > 0):
                raise ValueError(f"solve: `rtol` and `atol` must be > 0, got {label}={value!r}")
        object.__setattr__(self, "options", dict(self.options or {}))

    def resolved(self, dtype: torch.dtype) -> "ODEOptions":
        """The same options with the tolerances filled in for ``dtype``."""
        rtol, atol = DEFAULT_TOLERANCES.get(dtype, DEFAULT_TOLERANCES[torch.float32])
        return ODEOptions(self.method, rtol if self.rtol is None else float(self.rtol),
                          atol if self.atol is None else float(self.atol), self.options)

    def settings(self) -> dict:
        return {"ode_method": self.method, "rtol": self.rtol, "atol": self.atol}


@dataclass(frozen=True)
class MaximiserOptions:
    """How the interval Hamiltonians are maximised: which maximiser (``kind``), its iterations, the
    half-width of the noise added to its start, the seed of that noise, and the Gauss points per
    interval of the interval Hamiltonian."""

    kind: str = "auto"
    iterations: int = 50
    perturb: float = 0.0
    seed: Optional[int] = None
    quadrature: int = 3

    def __post_init__(self):
        if isinstance(self.quadrature, bool) or not isinstance(self.quadrature, int) or not 1 <= self.quadrature <= 10:
            raise ValueError(f"solve: `quadrature` must be an int from 1 to 10 (Gauss points), got {self.quadrature!r}")
        object.__setattr__(self, "iterations", _count("maximiser_iter", self.iterations, 1))
        if not (isinstance(self.perturb, numbers.Real) and self.perturb >= 0):
            raise ValueError(f"solve: `perturb` must be >= 0 (a half-width), got {self.perturb!r}")

    def generator(self) -> Optional[torch.Generator]:
        """One generator for every random draw of a solve (none touches torch's global generator)."""
        return None if self.seed is None else torch.Generator(device="cpu").manual_seed(int(self.seed))

    def settings(self) -> dict:
        return {"maximiser": self.kind, "maximiser_iter": self.iterations, "perturb": self.perturb,
                "seed": self.seed, "quadrature": self.quadrature}


@dataclass(frozen=True)
class RuleOptions:
    """The update rule: its registered name and its options (``rho`` is an option of ``"emsa"``)."""

    method: str = "emsa"
    options: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        from .rules import RULES

        if self.method not in RULES:
            raise ValueError(f"solve: unknown `method` {self.method!r}; choose one of {sorted(RULES)}")
        options = dict(self.options or {})
        if "rho" in options and options["rho"] is not None and "rho" not in RULES[self.method].defaults:
            raise ValueError(f"solve: `rho` is an option of method='emsa', not of method={self.method!r}")
        object.__setattr__(self, "options", options)

    def settings(self) -> dict:
        options = dict(self.options)
        return {"method": self.method, "rho": options.pop("rho", None), "options": options}


@dataclass(frozen=True)
class StoppingOptions:
    """When to stop: ``max_iter`` iterations; ``tol``, the optimality tolerance that ``converged``
    promises (``None``: by dtype, see ``pmpsolve.optimality``); ``stall_tol``, the relative change of
    J below which three iterations in a row count as a stall."""

    max_iter: int = 200
    tol: Optional[float] = None
    stall_tol: float = 1e-12

    def __post_init__(self):
        object.__setattr__(self, "max_iter", _count("max_iter", self.max_iter, 0))
        if self.tol is not None:
            object.__setattr__(self, "tol", _nonnegative("tol", self.tol))
        object.__setattr__(self, "stall_tol", _nonnegative("stall_tol", self.stall_tol))

    def resolved(self, dtype: torch.dtype) -> "StoppingOptions":
        from .optimality import DEFAULT_OPTIMALITY_TOL

        return StoppingOptions(self.max_iter, DEFAULT_OPTIMALITY_TOL[dtype] if self.tol is None else self.tol,
                               self.stall_tol)

    def settings(self) -> dict:
        return asdict(self)
