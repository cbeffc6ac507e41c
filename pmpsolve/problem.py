"""The optimal control problem (docs/guide.md; its scaling: docs/theory.md).

    minimise  J(u) = mean_i [ Phi(X_T^i) + int_0^T L(t, X_t^i, u_t) dt ]
    s.t.      dX^i/dt = f(t, X^i, u_t),  X_0^i = x0^i,  u_t in U,  i = 1..K

The user writes f, L and Phi for ONE time: ``t`` is a 0-d tensor, ``x`` is
[..., n] and ``u`` is [..., m] with the same leading dimensions (the engine
expands u over the K samples, so ``torch.stack([x[..., 1], u[..., 0]], -1)``
works). Every function is checked once here, with a trial call, so that a
mistake is reported where it was made and not deep inside a solve.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Union

import torch

from .constraints import Constraint, FreeTime
from .controls import Box, ControlSet, Reals, UserSet
from .penalties import ControlPenalty

__all__ = ["ControlProblem"]

Dynamics = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
RunningCost = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
TerminalCost = Callable[[torch.Tensor], torch.Tensor]

_BATCH = 3  # leading size of the trial call that checks a function is batched


class ControlProblem:
    """A continuous-time optimal control problem, checked once on construction.

    Args:
        dynamics: ``f(t, x, u) -> dx/dt``; ``t`` 0-d, ``x`` [..., n], ``u`` [..., m]
            (same leading dims), returns [..., n]. Use ``x[..., i]`` indexing and
            ``torch.stack(..., dim=-1)`` so that it works on batches.
        x0: initial state, [n] (one trajectory) or [K, n] (K samples sharing one control).
        horizon: T > 0; time runs over [0, T].
        controls: the control set, e.g. ``Reals(m)`` or ``Box(low, high, shape=(m,))``.
        terminal_cost: ``Phi(x) -> [...]``, per-sample cost of the final state (x [..., n]).
        running_cost: ``L(t, x, u) -> [...]``, per-sample running cost.
        control_penalty: an optional non-smooth control cost added to the running cost,
            ``pmp.L1(c)`` (c |u|_1) or ``pmp.L0(c)`` (c times the number of non-zero
            components), handled exactly by the maximisers.
        terminal_constraints: a list of ``pmp.Equal(fn)`` / ``pmp.AtMost(fn)`` on the final
            state: ``fn(x) -> [..., c]`` (``fn(x, p)`` with parameters), psi(x(T)) == 0 or <= 0.
        path_constraints: a list of ``pmp.AtMost(fn)``, ``fn(t, x, u) -> [..., c] <= 0`` at
            every time of [0, T]; state bounds are the ones that do not read u.
        parameters: the set of static parameters p [q] (``pmp.Reals(q)`` or a ``pmp.Box``),
            optimised with the controls. Every function then takes p as its last argument:
            f(t, x, u, p), L(t, x, u, p), Phi(x, p) and the constraint functions; p is
            [..., q] with the leading dimensions of x. ``controls`` may then be None
            (parameter estimation).
        name: optional label used in plots and tables.

    ``horizon`` may be ``pmp.FreeTime(guess, low=, high=)``: T is then optimised too. A
    problem with constraints, parameters or a free T is solved by the augmented-Lagrangian
    loop of ``pmpsolve.constrained`` (docs/theory.md), which ``pmp.solve`` calls for it.

    J is the mean over the K samples (docs/theory.md, scaling convention).

    Example:
        >>> import torch, pmpsolve as pmp
        >>> lqr = pmp.ControlProblem(
        ...     dynamics=lambda t, x, u: torch.stack([x[..., 1], -x[..., 0] + u[..., 0]], -1),
        ...     x0=torch.tensor([0.0, 1.0]), horizon=5.0, controls=pmp.Reals(1),
        ...     running_cost=lambda t, x, u: 0.5 * ((x ** 2).sum(-1) + (u ** 2).sum(-1)))
        >>> lqr.state_dim, lqr.control_dim, lqr.num_samples
        (2, 1, 1)
    """

    #: The kinks of the running cost inside the mesh intervals, for the co-state sweep, or None (L smooth in t
    #: between the nodes). ``hinges(t, x, u) -> (a [..., c], w [..., c])`` (w shaped like a) declares that L contains
    #: sum_j w_j max(0, a_j)^2 / 2 with a and w smooth in t between the nodes: grad_x L then has kinks where an
    #: a_j changes sign, which the polynomial co-state strategies add exactly (``pmpsolve.sweep.costate``)
    #: instead of interpolating across them. The augmented-Lagrangian transcription sets it for the path
    #: penalties (``pmpsolve.constrained.transcription``).
    running_cost_hinges: Optional[Callable] = None
    #: Whether f, L and the hinges take the times of many points at once: t of the points' leading shape
    #: (t [P] with x [P, ..., K, n]) instead of a 0-d t under ``torch.func.vmap`` (~0.1 ms of dispatch a
    #: call). The transcription sets it where only its own path multiplier mu(s) reads the time.
    batched_time: bool = False

    def __init__(self, dynamics: Dynamics, x0, horizon: Union[float, FreeTime], controls: Optional[ControlSet] = None,
                 terminal_cost: Optional[TerminalCost] = None,
                 running_cost: Optional[RunningCost] = None, *, control_penalty: Optional[ControlPenalty] = None,
                 terminal_constraints: Optional[Sequence[Constraint]] = None,
                 path_constraints: Optional[Sequence[Constraint]] = None,
                 parameters: Optional[ControlSet] = None,
                 name: Optional[str] = None):
        if not callable(dynamics):
            raise TypeError(f"ControlProblem: `dynamics` must be a callable f(t, x, u), got {type(dynamics).__name__}")
        for label, fn in (("terminal_cost", terminal_cost), ("running_cost", running_cost)):
            if fn is not None and not callable(fn):
                raise TypeError(f"ControlProblem: `{label}` must be callable or None, got {type(fn).__name__}")
        if parameters is not None and not isinstance(parameters, (Reals, Box)):
            raise TypeError(f"ControlProblem: `parameters` must be pmp.Reals(q) or a pmp.Box, got {parameters!r}")
        if controls is None and parameters is None:
            raise ValueError("ControlProblem: `controls` is None but there are no `parameters`: with neither "
                             "there is nothing to optimise. Give a control set such as pmp.Reals(m), or "
                             "parameters=pmp.Reals(q) for parameter estimation")
        self.has_controls = controls is not None
        if controls is None:  # parameter estimation: one dummy control that no function reads
            controls = Reals(1)
        if not isinstance(controls, ControlSet):
            raise TypeError(
                "ControlProblem: `controls` must be a control set such as pmp.Reals(m) or "
                f"pmp.Box(low, high, shape=(m,)), got {controls!r}"
            )
        if control_penalty is not None and not isinstance(control_penalty, ControlPenalty):
            raise TypeError(f"ControlProblem: `control_penalty` must be pmp.L1(c), pmp.L0(c) or None, got {control_penalty!r}")
        if control_penalty is not None and getattr(control_penalty, "relative", False):
            raise ValueError(f"ControlProblem: `control_penalty` {control_penalty!r} is relative, which only network "
                             f"weights have (pmp.nn); give the absolute weight, e.g. pmp.{control_penalty.name}(0.1)")
        if getattr(controls, "scale", None) in ("channel", "tensor"):
            raise ValueError(f"ControlProblem: {controls!r} has a scale, which only network weights have (pmp.nn); "
                             "use pmp.Finite(values) (scale=None) for a control problem")
        if control_penalty is not None and isinstance(controls, UserSet):
            raise ValueError(
                f"ControlProblem: `control_penalty` {control_penalty!r} cannot be combined with a UserSet: the library "
                "does not see inside your maximiser. Add the penalty to the objective your `maximise` function uses")
        try:
            x0_t = torch.as_tensor(x0)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"ControlProblem: `x0` must be a tensor [n] or [K, n], got {type(x0).__name__} ({err})") from None
        if not (x0_t.is_floating_point() or x0_t.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"ControlProblem: `x0` must hold real numbers, got dtype {x0_t.dtype}")
        if x0_t.ndim not in (1, 2) or x0_t.shape[-1] == 0 or x0_t.numel() == 0:
            raise ValueError(
                f"ControlProblem: `x0` must have shape [n] or [K, n] with n >= 1, got shape {tuple(x0_t.shape)}"
            )
        if not torch.isfinite(x0_t.double()).all():
            raise ValueError("ControlProblem: `x0` has non-finite entries")
        self.free_time = horizon if isinstance(horizon, FreeTime) else None
        if self.free_time is not None:
            horizon = self.free_time.guess
        try:
            horizon_f = float(horizon)
        except (TypeError, ValueError):
            raise TypeError(f"ControlProblem: `horizon` must be a number T > 0, got {horizon!r}") from None
        if not (math.isfinite(horizon_f) and horizon_f > 0):
            raise ValueError(f"ControlProblem: `horizon` must be a finite T > 0, got {horizon!r}")

        self.dynamics = dynamics
        self.x0 = x0_t if x0_t.is_floating_point() else x0_t.double()
        self.horizon = horizon_f
        self.controls = controls
        self.terminal_cost = terminal_cost
        self.running_cost = running_cost
        self.control_penalty = control_penalty
        self.parameters = parameters
        self.terminal_constraints = _constraints("terminal_constraints", terminal_constraints, ("equal", "at_most"))
        self.path_constraints = _constraints("path_constraints", path_constraints, ("at_most",))
        self.name = name or "problem"
        self.single_sample = self.x0.ndim == 1
        if terminal_cost is None and running_cost is None and control_penalty is None:
            raise ValueError(
                "ControlProblem: give a `terminal_cost`, a `running_cost` or both; with neither, J = 0 for every control"
            )
        # Checked in float64 on the CPU now; `solve` checks again in its own dtype and device.
        self.check(torch.float64, torch.device("cpu"))

    # ------------------------------------------------------------------ sizes
    @property
    def state_dim(self) -> int:
        """n, the dimension of one sample's state."""
        return self.x0.shape[-1]

    @property
    def control_dim(self) -> int:
        """m, the dimension of the control."""
        return self.controls.dim

    @property
    def num_samples(self) -> int:
        """K, the number of samples (trajectories) that share the control."""
        return 1 if self.single_sample else self.x0.shape[0]

    def initial_state(self, dtype: torch.dtype, device) -> torch.Tensor:
        """x0 as [K, n] in the given dtype and device."""
        return self.x0.reshape(self.num_samples, self.state_dim).to(dtype=dtype, device=device)

    def __repr__(self):
        return (f"ControlProblem(name={self.name!r}, n={self.state_dim}, m={self.control_dim}, "
                f"K={self.num_samples}, T={self.horizon}, controls={self.controls!r})")

    # ------------------------------------------------------------- checking
    @property
    def constrained(self) -> bool:
        """True when the problem has constraints, static parameters or a free final time (then
        ``pmp.solve`` runs the augmented-Lagrangian loop of ``pmpsolve.constrained``)."""
        return bool(self.terminal_constraints or self.path_constraints or self.parameters is not None
                    or self.free_time is not None)

    def check(self, dtype: torch.dtype, device) -> None:
        """Trial-call every function in ``dtype`` on ``device``; raise a clear error on misuse.

        Also checks that f and L can be evaluated at many times at once (``torch.func.vmap``
        over a 0-d t), which is how the engine evaluates them on the mesh.
        """
        from .constrained.checks import check_arities, check_constrained

        check_arities(self)
        if self.constrained:
            check_constrained(self, dtype, device)
            return
        K, n, m = self.num_samples, self.state_dim, self.control_dim
        x = self.initial_state(dtype, device)
        u = self.controls.default_point(dtype, device).expand(K, m)
        t = torch.zeros((), dtype=dtype, device=device)
        where = f"in {dtype}" + ("" if torch.device(device).type == "cpu" else f" on {device}")

        out = _call("dynamics", self.dynamics, (t, x, u), f"t 0-d, x [K={K}, n={n}], u [K={K}, m={m}] {where}")
        if tuple(out.shape) != (K, n):
            raise ValueError(
                f"ControlProblem: `dynamics` returned shape {tuple(out.shape)} for x of shape {(K, n)}; "
                f"it must return dx/dt with the shape of x (x0 has n={n} components)"
            )
        xb, ub = x.expand(_BATCH, K, n), u.expand(_BATCH, K, m)
        out = _call("dynamics", self.dynamics, (t, xb, ub), f"x [{_BATCH}, {K}, {n}], u [{_BATCH}, {K}, {m}] {where}")
        if tuple(out.shape) != (_BATCH, K, n):
            raise ValueError(
                f"ControlProblem: `dynamics` must work on batches (x [..., n], u [..., m]); for x of shape "
                f"{(_BATCH, K, n)} it returned {tuple(out.shape)}. Index with x[..., i] and stack with dim=-1"
            )
        _check_many_times("dynamics", self.dynamics, self.horizon, x, u)
        if self.running_cost is not None:
            out = _call("running_cost", self.running_cost, (t, x, u), f"t 0-d, x [{K}, {n}], u [{K}, {m}] {where}")
            _check_per_sample("running_cost", out, (K,))
            out = _call("running_cost", self.running_cost, (t, xb, ub), f"x [{_BATCH}, {K}, {n}] {where}")
            _check_per_sample("running_cost", out, (_BATCH, K))
            _check_many_times("running_cost", self.running_cost, self.horizon, x, u)
        if self.terminal_cost is not None:
            out = _call("terminal_cost", self.terminal_cost, (x,), f"x [{K}, {n}] {where}")
            _check_per_sample("terminal_cost", out, (K,))


def _constraints(label: str, constraints, kinds) -> tuple:
    """A list of constraints as a tuple, each checked to be a pmp.Equal / pmp.AtMost of an allowed kind."""
    if constraints is None:
        return ()
    if isinstance(constraints, Constraint):
        constraints = [constraints]
    if not isinstance(constraints, (list, tuple)):
        raise TypeError(f"ControlProblem: `{label}` must be a list of pmp.Equal(fn) / pmp.AtMost(fn), "
                        f"got {type(constraints).__name__}")
    allowed = " or ".join(f"pmp.{'Equal' if k == 'equal' else 'AtMost'}(fn)" for k in kinds)
    for c in constraints:
        if not isinstance(c, Constraint):
            raise TypeError(f"ControlProblem: every entry of `{label}` must be {allowed}, got {c!r}"
                            + ("; wrap the function: pmp.AtMost(fn)" if callable(c) else ""))
        if c.kind not in kinds:
            raise ValueError(f"ControlProblem: `{label}` takes {allowed}, got {c!r}: an equality on the whole "
                             "path leaves no freedom to the control; write it into the dynamics, or as two "
                             "pmp.AtMost constraints if it is meant")
    return tuple(constraints)


def _call(label: str, fn, args, described: str) -> torch.Tensor:
    try:
        out = fn(*args)
    except Exception as err:  # the user's code: re-raise, same type, saying what we called it with
        message = (
            f"ControlProblem: calling `{label}` with {described} failed: {err}. Functions must accept "
            f"batched tensors x [..., n], u [..., m] (use x[..., i]) and any tensors they capture "
            f"must match the solve dtype/device"
        )
        try:
            new = type(err)(message)
        except Exception:
            new = RuntimeError(message)
        raise new from err
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"ControlProblem: `{label}` must return a torch.Tensor, got {type(out).__name__}")
    if not out.is_floating_point():
        raise TypeError(f"ControlProblem: `{label}` returned dtype {out.dtype}; it must return real floats")
    return out


def _check_per_sample(label: str, out: torch.Tensor, expected) -> None:
    if tuple(out.shape) != tuple(expected):
        raise ValueError(
            f"ControlProblem: `{label}` must return one cost per sample, shape {tuple(expected)} here, but "
            f"returned {tuple(out.shape)}. Reduce over the state with .sum(-1), not .sum()"
        )


def _check_many_times(label: str, fn, horizon: float, x: torch.Tensor, u: torch.Tensor) -> None:
    """The engine evaluates f and L at many times at once: ``torch.func.vmap`` over a 0-d t, with
    x [P, K, n] and u [P, K, m]. Check that this works and agrees with one call per time, at
    times spread over [0, T] (a Python ``if t < 1`` or ``float(t)`` cannot be mapped)."""
    times = torch.tensor([0.0, 0.37, 0.5, 1.0], dtype=x.dtype, device=x.device) * horizon
    P = times.numel()
    xs, us = x.expand((P,) + x.shape), u.expand((P,) + u.shape)
    try:
        mapped = torch.func.vmap(fn)(times, xs, us)
    except Exception as err:
        raise ValueError(
            f"ControlProblem: `{label}` cannot be evaluated at many times at once (torch.func.vmap over a 0-d t "
            f"failed: {str(err).splitlines()[0][:200]}). The solver evaluates it on the whole mesh in one call, so "
            "write time dependence with tensor operations: torch.where(t < 1, a, b) instead of `if t < 1: ...`, "
            "and never float(t) or t.item()") from err
    single = torch.stack([fn(times[i], x, u) for i in range(P)])
    if mapped.shape != single.shape or not torch.allclose(mapped, single, rtol=1e-6, atol=1e-9, equal_nan=True):
        raise ValueError(
            f"ControlProblem: `{label}` gives different values when evaluated at several times at once "
            "(torch.func.vmap over t) than one time at a time; it must be a pure function of (t, x, u)")
