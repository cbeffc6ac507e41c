"""A library of ready optimal control problems.

Each function returns ``(problem, reference)``: a ``pmpsolve.ControlProblem`` and
the published optimal value J* of the continuous-time problem (DESIGN.md
section 5), or None where none is known.

    >>> from problems import lqr
    >>> problem, J_star = lqr()
    >>> J_star
    0.673999
"""
from .catalyst import catalyst_mixing
from .lqr import lqr, random_lqr
from .rayleigh import rayleigh
from .vanderpol import van_der_pol

#: The reference problems of DESIGN.md section 5, by name.
REFERENCE_PROBLEMS = {
    "lqr": lqr,
    "catalyst": catalyst_mixing,
    "vanderpol": van_der_pol,
    "rayleigh": rayleigh,
}

__all__ = ["lqr", "random_lqr", "catalyst_mixing", "van_der_pol", "rayleigh", "REFERENCE_PROBLEMS"]
