"""The flat keywords of ``solve`` and ``Solver`` before the option objects (deprecated).

``solve(problem, max_iter=50, rho=2.0, ode_method="rk4", ...)`` still works, with a
DeprecationWarning, and means exactly ``solve(problem, method=pmp.EMSA(rho=2.0),
stop=pmp.Stop(max_iter=50), ode=pmp.ODE("rk4"), ...)``: ``translate`` below is the
whole mapping. A keyword that is neither a parameter nor an old keyword is refused
with a TypeError that names where such a setting lives now.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import warnings

__all__ = ["OLD_KEYWORDS", "accepts_old_keywords", "translate"]

#: old keyword -> (the parameter that holds it now, the field of that record)
OLD_KEYWORDS = {
    "max_iter": ("stop", "max_iter"), "tol": ("stop", "tol"), "stall_tol": ("stop", "stall_tol"),
    "ode_method": ("ode", "method"), "rtol": ("ode", "rtol"), "atol": ("ode", "atol"),
    "ode_options": ("ode", "options"),
    "maximiser_iter": ("maximiser", "iterations"), "perturb": ("maximiser", "perturb"),
    "seed": ("maximiser", "seed"), "quadrature": ("maximiser", "quadrature"),
    "rho": ("method", "rho"), "options": ("method", None), "finite": ("init", None),
}
_RECORDS = {"stop": "pmp.Stop", "ode": "pmp.ODE", "maximiser": "pmp.Maximiser"}


def _new_form(keyword: str) -> str:
    """Where ``keyword`` lives now, as code."""
    if keyword in OLD_KEYWORDS:
        where, name = OLD_KEYWORDS[keyword]
        if where in _RECORDS:
            return f"{where}={_RECORDS[where]}({name}=...)"
        if keyword == "rho":
            return "method=pmp.EMSA(rho=...)"
        if keyword == "options":
            return "the method object's fields, e.g. method=pmp.Gradient(lr=...) or pmp.Rule(name, **options)"
        return "init=pmp.RelaxAndRound() (the default on a Finite set) or init=<controls> (iterate on the set)"
    if keyword == "maximiser":
        return "maximiser=pmp.Maximiser(kind=...)"
    from .methods import METHODS
    from .options import ODE, Maximiser

    homes = [f"method=pmp.{cls.__name__}({keyword}=...)" for cls in METHODS.values()
             if keyword in cls.defaults()]
    homes += [f"{where}={_RECORDS[where]}({keyword}=...)" for where, record in (("ode", ODE), ("maximiser", Maximiser))
              if keyword in {f.name for f in dataclasses.fields(record)} and keyword != "method"]
    if keyword == "step_size":
        homes.append('ode=pmp.ODE(method=..., options={"step_size": ...})')
    return " or ".join(homes)


def translate(arguments: dict, old: dict) -> dict:
    """``arguments`` (the new parameters given) with the ``old`` keywords mapped onto the objects."""
    from .controls import Finite
    from .methods import METHODS, Method, Rule, as_method
    from .options import ODE, Maximiser, Stop

    arguments = dict(arguments)
    for where, record in (("stop", Stop), ("ode", ODE), ("maximiser", Maximiser)):
        fields = {name: old[key] for key, (home, name) in OLD_KEYWORDS.items() if home == where and key in old}
        if where == "maximiser" and isinstance(arguments.get("maximiser"), str):
            fields["kind"] = arguments.pop("maximiser")
        if not fields:
            continue
        if arguments.get(where) is not None:
            raise TypeError(f"solve: `{where}` was given as an object and as the old keyword(s) "
                            f"{sorted(k for k in old if OLD_KEYWORDS[k][0] == where)}; give only {where}=")
        arguments[where] = record(**fields)
    options = dict(old.get("options") or {})
    if old.get("rho") is not None:
        options["rho"] = old["rho"]
    if options:
        method = arguments.get("method", "emsa")
        if isinstance(method, Method):
            raise TypeError(f"solve: rule options {sorted(options)} were given as old keywords with the method "
                            f"object {method!r}; set them as its fields instead")
        if "rho" in options and as_method(method).name != "emsa":
            raise ValueError(f"solve: `rho` is an option of method='emsa', not of method={method!r}; "
                             f"e.g. method=pmp.EMSA(rho={options['rho']!r})")
        if method in METHODS:
            unknown = sorted(set(options) - set(METHODS[method].defaults()))
            if unknown:
                known = ", ".join(sorted(METHODS[method].defaults())) or "none"
                raise ValueError(f"method {method!r} got unknown option(s) {unknown}; its options are: {known}")
            arguments["method"] = METHODS[method](**options)
        else:
            arguments["method"] = Rule(method, **options)
    if "finite" in old:
        finite = old["finite"]
        if finite not in ("relax-round-polish", "plain"):
            raise ValueError(f"solve: `finite` must be 'relax-round-polish' or 'plain', got {finite!r}")
        if finite == "plain" and arguments.get("init") is None:
            problem = arguments["problem"]
            if isinstance(problem.controls, Finite):
                import torch

                arguments["init"] = problem.controls.default_point(torch.float64, "cpu")
    return arguments


def accepts_old_keywords(function):
    """Wrap ``solve`` or ``Solver.__init__``: old keywords are translated (with a DeprecationWarning),
    unknown ones refused; the signature shown (``inspect.signature``) is the function's own."""
    signature = inspect.signature(function)
    label = "Solver" if function.__name__ == "__init__" else function.__name__

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        old = {key: kwargs.pop(key) for key in list(kwargs) if key in OLD_KEYWORDS and key not in signature.parameters}
        unknown = sorted(set(kwargs) - set(signature.parameters))
        if unknown:
            home = _new_form(unknown[0])
            raise TypeError(f"{label}() got an unexpected keyword argument {unknown[0]!r}"
                            + (f"; it is set as {home}" if home else ""))
        if isinstance(kwargs.get("maximiser"), str):
            old["maximiser"] = kwargs["maximiser"]
        if not old:
            return function(*args, **kwargs)
        if "finite" in old and "init" not in signature.parameters:
            raise TypeError(f"{label}() got an unexpected keyword argument 'finite'")
        warnings.warn(f"{label}(): the keyword(s) {', '.join(sorted(old))} are deprecated and will be removed in "
                      "the next release; use " + "; ".join(f"{k} -> {_new_form(k)}" for k in sorted(old)),
                      DeprecationWarning, stacklevel=2)
        bound = signature.bind_partial(*args, **kwargs)
        arguments = translate(bound.arguments, {k: v for k, v in old.items() if k != "maximiser"})
        return function(**arguments)

    return wrapper
