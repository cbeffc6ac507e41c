"""Trial calls of a constrained problem's functions: each mistake reported where it was made.

With static parameters every user function takes p [..., q] as its last argument; without
them it must not. The arity is read from the signature (a function that ignores p, or
expects one that is never passed, is a mistake to point at before any solve), then every
function is called once with the shapes the solve uses and its output checked.
"""
from __future__ import annotations

import inspect
from typing import Callable, Optional

import torch

__all__ = ["check_arities", "check_constrained", "positional_arity"]


def positional_arity(fn: Callable) -> Optional[tuple]:
    """(required, maximum) positional arguments of ``fn``; None when its signature cannot be read."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    required, maximum = 0, 0
    for parameter in signature.parameters.values():
        if parameter.kind == parameter.VAR_POSITIONAL:
            return None
        if parameter.kind in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD):
            maximum += 1
            if parameter.default is parameter.empty:
                required += 1
    return required, maximum


def _check_arity(label: str, fn: Callable, names: str, with_parameters: bool) -> None:
    arity = positional_arity(fn)
    if arity is None:
        return
    required, maximum = arity
    base = len(names.split(", "))
    if with_parameters and maximum < base + 1:
        raise TypeError(f"ControlProblem: `{label}` takes {maximum} argument(s), but the problem has `parameters`: "
                        f"write it as {label}({names}, p), p [..., q] being the static parameters")
    if not with_parameters and required > base:
        raise TypeError(f"ControlProblem: `{label}` requires {required} arguments ({names} and more), but the "
                        f"problem has no `parameters`: write it as {label}({names}), or give "
                        "parameters=pmp.Reals(q) if the last argument is a parameter vector")


def check_arities(problem) -> None:
    """Every user function takes p last when the problem has parameters, and only then."""
    has_p = problem.parameters is not None
    for label, fn, names in (("dynamics", problem.dynamics, "t, x, u"),
                             ("running_cost", problem.running_cost, "t, x, u"),
                             ("terminal_cost", problem.terminal_cost, "x")):
        if fn is not None:
            _check_arity(label, fn, names, has_p)
    for i, c in enumerate(problem.terminal_constraints):
        _check_arity(f"terminal_constraints[{i}]", c.fn, "x", has_p)
    for i, c in enumerate(problem.path_constraints):
        _check_arity(f"path_constraints[{i}]", c.fn, "t, x, u", has_p)


def check_constrained(problem, dtype: torch.dtype, device) -> None:
    """Check the functions of a problem with constraints, parameters or a free T (see the module).

    Sets ``problem.terminal_sizes`` and ``problem.path_sizes`` (components per constraint).
    """
    from ..problem import _call
    from .transcription import Transcription

    has_p = problem.parameters is not None
    K, n, m = problem.num_samples, problem.state_dim, problem.control_dim
    x = problem.initial_state(dtype, device)
    u = problem.controls.default_point(dtype, device).expand(K, m)
    t = torch.zeros((), dtype=dtype, device=device)
    extra = ()
    if has_p:
        p = problem.parameters.default_point(dtype, device).expand(K, problem.parameters.dim)
        extra = (p,)
    where = f"in {dtype}"
    sizes = []
    for i, c in enumerate(problem.terminal_constraints):
        out = _call(f"terminal_constraints[{i}]", c.fn, (x,) + extra, f"x [K={K}, n={n}] {where}")
        sizes.append(_constraint_size(f"terminal_constraints[{i}]", out, K, "x"))
    problem.terminal_sizes = tuple(sizes)
    sizes = []
    for i, c in enumerate(problem.path_constraints):
        out = _call(f"path_constraints[{i}]", c.fn, (t, x, u) + extra,
                    f"t 0-d, x [K={K}, n={n}], u [K={K}, m={m}] {where}")
        sizes.append(_constraint_size(f"path_constraints[{i}]", out, K, "t, x, u"))
        xb, ub = x.expand(3, K, n), u.expand(3, K, m)
        out = _call(f"path_constraints[{i}]", c.fn, (t, xb, ub) + tuple(e.expand(3, *e.shape) for e in extra),
                    f"x [3, {K}, {n}] {where}")
        if tuple(out.shape) != (3, K, sizes[-1]):
            raise ValueError(f"ControlProblem: `path_constraints[{i}]` must work on batches: for x [3, {K}, {n}] "
                             f"it returned {tuple(out.shape)}, expected [3, {K}, {sizes[-1]}]. Index with x[..., i]")
    problem.path_sizes = tuple(sizes)
    # f, L and Phi, through the problem the solve builds (its checks call them with p appended).
    Transcription(problem, 8, dtype, device).initial_problem()


def _constraint_size(label: str, out: torch.Tensor, K: int, names: str) -> int:
    if out.ndim == 1 and out.shape[0] == K:
        raise ValueError(f"ControlProblem: `{label}` returned shape {tuple(out.shape)}: one value per sample. "
                         f"A constraint returns [..., c], c values per sample; keep the last axis, e.g. "
                         f"x[..., :1] instead of x[..., 0]")
    if out.ndim != 2 or out.shape[0] != K or out.shape[1] < 1:
        raise ValueError(f"ControlProblem: `{label}` must return [..., c] (c >= 1 constraint values per sample): "
                         f"[{K}, c] for inputs with leading dims [{K}], got {tuple(out.shape)}")
    return int(out.shape[1])
