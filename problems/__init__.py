"""A library of ready optimal control problems.

Each function returns ``(problem, reference)``: a ``pmpsolve.ControlProblem`` and
the published optimal value J* of the continuous-time problem (docs/theory.md,
reference problems), or None where none is known.

    >>> from problems import lqr
    >>> problem, J_star = lqr()
    >>> J_star
    0.673999
"""
from .catalyst import catalyst_mixing
from .double_integrator import double_integrator, double_integrator_optimum
from .lqr import lqr, lqr_samples, random_lqr
from .rayleigh import rayleigh
from .vanderpol import van_der_pol

#: The reference problems of docs/theory.md, by name.
REFERENCE_PROBLEMS = {
    "lqr": lqr,
    "catalyst": catalyst_mixing,
    "vanderpol": van_der_pol,
    "rayleigh": rayleigh,
}

#: Examples with bang-bang, bang-off-bang and finite-set answers known in closed form (controls.md).
CONTROL_SET_PROBLEMS = {
    "double-integrator": lambda: double_integrator(),
    "double-integrator-binary": lambda: double_integrator(controls="binary"),
    "double-integrator-L1": lambda: double_integrator(penalty="L1"),
    "double-integrator-L0": lambda: double_integrator(penalty="L0"),
    "double-integrator-ternary-L1": lambda: double_integrator(controls="ternary", penalty="L1"),
    "catalyst-binary": lambda: catalyst_mixing("binary"),
}

__all__ = ["double_integrator", "double_integrator_optimum", "CONTROL_SET_PROBLEMS", "lqr", "lqr_samples", "random_lqr", "catalyst_mixing", "van_der_pol", "rayleigh", "REFERENCE_PROBLEMS"]
