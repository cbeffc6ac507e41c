"""The ODE layer: torchdiffeq's solvers on a control mesh, with our own checks and one jump fix.

Everything the engine knows about torchdiffeq lives here, so that a new
torchdiffeq (or another ODE library) is a change to this module only. It
provides:

- ``ODE``: one solver setting (method, tolerances, options) on one mesh, with
  the mesh nodes as the points where the control jumps (``jump_t`` for the
  adaptive methods, step ends for the fixed-step ones). ``ODE.solve_sampled``
  also returns the solution at fixed points inside every interval, from the
  solver itself: adaptive methods interpolate their own steps there (their dense
  output; the steps do not change, so neither do the node values), fixed-step
  methods interpolate their step (cubic Hermite with the step's one-sided end
  slopes). Its error is the solver's, not the mesh's.
- ``StepMemory``: the first step of the solves of all mesh intervals at once on
  the unit axis (``ODE.step_memory``), taken from the last such solve instead of
  torchdiffeq's initial-step heuristic.
- ``EvaluationBudget``: counts right-hand-side evaluations and raises
  SweepBudgetError past a limit. This is the engine's step limit: torchdiffeq's
  own (``max_num_steps``) is a bare ``assert``, gone under ``python -O``.
- ``IntegrationFailure``: raised, instead of torchdiffeq's bare asserts, when an
  adaptive step underflows, the state stops being finite, or an interval needs
  more than ``max_num_steps`` steps. The same checks at the same points as
  torchdiffeq's asserts (ours run first), so they hold under ``python -O`` too
  and callers catch a type instead of matching words in messages.

The jump fix. torchdiffeq (0.2.x) clips an adaptive step at a ``jump_t`` time
only when the step would cross it (``t0 < jump < t0 + dt``). A step that lands
exactly on a jump time, which happens often on uniform meshes, is not clipped:
the jump index then never advances, every later jump is ignored, and f keeps
the value from the old side of the node. The solver then steps across control
discontinuities and shrinks its steps to crawl up to each node (seen here: 10x
the right-hand-side evaluations for a control 0.002 away from one that
integrated cleanly). ``integrate`` runs torchdiffeq's own solver classes with
that case handled: when a step starts on an unregistered jump time, f is
re-evaluated on the new side and the index advances.

Supported torchdiffeq: 0.2.3 <= version < 0.3 (setup.cfg). The fix and the
checks subclass torchdiffeq's solver classes and use its input handling, which
are not public API; the public ``odeint(..., options={"jump_t": ...})`` cannot
express the fix. Importing this module with a torchdiffeq that lacks those
names raises ImportError naming the supported versions.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch

from ..errors import SweepBudgetError
from .mesh import sample_times

SUPPORTED_TORCHDIFFEQ = ">=0.2.3,<0.3"

try:
    import torchdiffeq
    from torchdiffeq._impl.misc import Perturb, _check_inputs, _flat_to_shape, _nextafter, _PerturbFunc
    from torchdiffeq._impl.odeint import SOLVERS
    from torchdiffeq._impl.rk_common import RKAdaptiveStepsizeODESolver, _RungeKuttaState
    from torchdiffeq._impl.solvers import FixedGridODESolver

    for _name in ("_adaptive_step", "_advance"):
        if not callable(getattr(RKAdaptiveStepsizeODESolver, _name, None)):
            raise ImportError(f"RKAdaptiveStepsizeODESolver.{_name} is missing")
except ImportError as _err:  # pragma: no cover - depends on the installed torchdiffeq
    _version = getattr(locals().get("torchdiffeq"), "__version__", "unknown or not installed")
    raise ImportError(
        f"pmpsolve supports torchdiffeq {SUPPORTED_TORCHDIFFEQ} (its ODE layer, pmpsolve/ode.py, extends "
        f"torchdiffeq's solver classes); the installed version is {_version} ({_err}). Install a supported "
        f"one: pip install 'torchdiffeq{SUPPORTED_TORCHDIFFEQ}'") from _err

__all__ = ["ODE", "METHODS", "is_adaptive", "integrate", "EvaluationBudget", "IntegrationFailure", "StepMemory",
           "DEFAULT_BUDGET", "SUPPORTED_TORCHDIFFEQ"]

METHODS = tuple(SOLVERS)

#: Steps an adaptive solver may take between two output times (one mesh interval): torchdiffeq's
#: ``max_num_steps``. A blow-up ends in an error, not a hang, even with a huge evaluation budget.
MAX_STEPS_PER_INTERVAL = 200_000

#: Right-hand-side evaluations a sweep may take when no budget is given (a first sweep, or
#: ``pmp.cost``): a blow-up or a stiff problem ends in a SweepBudgetError within seconds.
DEFAULT_BUDGET = 50_000

#: Fixed-step methods: the step size suggested in the error for a missing one is the mesh
#: interval divided by this.
_SUGGESTED_STEPS_PER_INTERVAL = 10


class IntegrationFailure(RuntimeError):
    """An adaptive solve could not go on: its step underflowed, the state stopped being finite,
    or one output interval needed more than ``max_num_steps`` steps. The message is the one
    torchdiffeq's assert for the same condition carries."""


class _Weights(NamedTuple):
    """A Runge-Kutta tableau (torchdiffeq's ``_ButcherTableau`` and ``mid``) as Python numbers, so that a stage
    combination sum_j (w_j dt) k_j is a chain of axpys with scalar weights (see ``_lean_step``)."""

    alpha: List[float]
    beta: List[List[float]]
    c_sol: Optional[List[float]]  # None when the last stage is the solution (FSAL: Dormand-Prince, Bosh3)
    c_error: List[float]
    mid: List[float]


def _weights(solver: type) -> Optional[_Weights]:
    """``solver``'s tableau as ``_Weights`` for dopri5 (the default method, the one measured), else None:
    the other methods keep torchdiffeq's step bit for bit (dopri8's large weights make the reordered sums
    differ at 1e-10 where dopri5's differ at 1e-15). None too where the lean step would not mirror
    ``_adaptive_step`` (a subclass overriding it or the dense output fit, a torchdiffeq without ``min_step``)."""
    base = RKAdaptiveStepsizeODESolver
    if (solver is not SOLVERS.get("dopri5") or solver._adaptive_step is not base._adaptive_step
            or solver._interp_fit is not base._interp_fit or "min_step" not in base.__init__.__code__.co_varnames):
        return None
    tableau = solver.tableau
    fsal = bool(tableau.c_sol[-1] == 0 and (tableau.c_sol[:-1] == tableau.beta[-1]).all())
    return _Weights(alpha=tableau.alpha.tolist(), beta=[b.tolist() for b in tableau.beta],
                    c_sol=None if fsal else tableau.c_sol.tolist(), c_error=tableau.c_error.tolist(),
                    mid=solver.mid.tolist())


def _combine(y0: Optional[torch.Tensor], k: List[torch.Tensor], weights: List[float], dt: float):
    """y0 + sum_j (w_j dt) k_j (y0 None: the sum alone), as torchdiffeq's ``torch.sum(k * (w * dt), dim=-1)``
    over its stage-last buffer, but as one multiply and in-place axpys on the stage list (zero weights
    skipped): a few small ops instead of a strided reduction over a [..., stages] copy. The same sums in
    another order, so the last bits may differ. Differentiable (the axpys act on a fresh product)."""
    total = None
    for w, kj in zip(weights, k):
        if w != 0:
            total = kj * (w * dt) if total is None else total.add_(kj, alpha=w * dt)
    if y0 is None:
        return total
    return y0 if total is None else y0 + total


def _lean_step(self, rk_state, dt):
    """torchdiffeq's ``RKAdaptiveStepsizeODESolver._adaptive_step`` (0.2.5), decision for decision, after
    ``_checked``'s checks and its clamp of ``dt``. What it saves per step is dispatch, not arithmetic:
    the stages are a Python list combined by ``_combine`` instead of a stage-last tensor written through
    an autograd.Function (``_UncheckedAssign``) and summed per stage; the right-hand side is called past
    the ``_PerturbFunc`` module (its ``y.abs()`` per call only reads a dtype); the error ratio is taken
    without autograd and becomes a Python number once (the step's one host sync besides the time
    comparisons), from which the accept decision and ``_optimal_step_size``'s factor follow in Python.
    The weights times the step are Python numbers too (one more sync: ``float(dt)``)."""
    y0, f0, _, t0, _, interp_coeff = rk_state
    weights = self._weights
    self.func.callback_step(t0, y0, dt)
    t1 = t0 + dt

    # Prescribed grid points, as torchdiffeq: step_t first, then jump_t.
    on_step_t = False
    if len(self.step_t):
        next_step_t = self.step_t[self.next_step_index]
        on_step_t = t0 < next_step_t < t0 + dt
        if on_step_t:
            t1 = next_step_t
            dt = t1 - t0
    on_jump_t = False
    if len(self.jump_t):
        next_jump_t = self.jump_t[self.next_jump_index]
        on_jump_t = t0 < next_jump_t < t0 + dt
        if on_jump_t:
            on_step_t = False
            t1 = next_jump_t
            dt = t1 - t0

    # torchdiffeq's _runge_kutta_step: stage times in y's (real) dtype, the last stages just before t1.
    ts0, tsd, ts1 = t0, dt, t1
    if t0.dtype != self._t_dtype:
        ts0, tsd, ts1 = t0.to(self._t_dtype), dt.to(self._t_dtype), t1.to(self._t_dtype)
    h = float(dt)
    k = [f0]
    for alpha_i, beta_i in zip(weights.alpha, weights.beta):
        yi = _combine(y0, k, beta_i, h)
        if alpha_i == 1.0:
            k.append(self._evaluate(ts1, yi, Perturb.PREV))
        else:
            k.append(self._evaluate(ts0 + alpha_i * tsd, yi, Perturb.NONE))
    y1 = yi if weights.c_sol is None else _combine(y0, k, weights.c_sol, h)
    f1 = k[-1]

    # _compute_error_ratio; the ratio only decides, so no graph.
    with torch.no_grad():
        error = _combine(None, k, weights.c_error, h)
        tolerance = torch.maximum(y0.abs(), y1.abs()).mul_(self.rtol).add_(self.atol)
        ratio = float(self.norm(error / tolerance).abs())
    accept_step = ratio <= 1
    if h > self._max_step:
        accept_step = False
    if h <= self._min_step:
        accept_step = True

    if accept_step:
        self.func.callback_accept_step(t0, y0, dt)
        t_next, y_next = t1, y1
        # RKAdaptiveStepsizeODESolver._interp_fit: the mid point, then the quartic fit.
        interp_coeff = _quartic_fit(y0, y1, _combine(y0, k, weights.mid, h), f0, f1, h)
        if on_step_t and self.next_step_index != len(self.step_t) - 1:
            self.next_step_index += 1
        if on_jump_t:
            if self.next_jump_index != len(self.jump_t) - 1:
                self.next_jump_index += 1
            f1 = self.func(t_next, y_next, perturb=Perturb.NEXT)  # the new side of the discontinuity
        f_next = f1
    else:
        self.func.callback_reject_step(t0, y0, dt)
        t_next, y_next, f_next = t0, y0, f0

    # _optimal_step_size in Python numbers (the same operations on the same doubles), NaN kept NaN.
    if ratio == 0:
        factor = self._ifactor
    elif math.isnan(ratio):
        factor = math.nan
    else:
        dfactor = 1.0 if ratio < 1 else self._dfactor
        factor = min(self._ifactor, max(self._safety / ratio ** (1.0 / self.order), dfactor))
    dt_next = (dt * factor).clamp(self.min_step, self.max_step)
    return _RungeKuttaState(y_next, f_next, t0, t_next, dt_next, interp_coeff)


def _quartic_fit(y0, y1, y_mid, f0, f1, dt: float):
    """torchdiffeq's ``interp._interp_fit`` (the dense output's coefficients [e, d, c, b, a] of
    a x^4 + b x^3 + c x^2 + d x + e), each coefficient one product and in-place axpys with the same
    weights: 16 small ops instead of 28 (the last bits may differ)."""
    a = (y_mid * 16).sub_(y1, alpha=8).sub_(y0, alpha=8).add_(f1, alpha=2 * dt).sub_(f0, alpha=2 * dt)
    b = (y0 * 18).add_(y1, alpha=14).sub_(y_mid, alpha=32).add_(f0, alpha=5 * dt).sub_(f1, alpha=3 * dt)
    c = (y_mid * 16).sub_(y0, alpha=11).sub_(y1, alpha=5).add_(f1, alpha=dt).sub_(f0, alpha=4 * dt)
    return [y0, f0 * dt, c, b, a]


def _evaluate(self, t, y, perturb):
    """``self.func(t, y, perturb=perturb)`` past the ``_PerturbFunc`` module: its forward without the
    module call and the ``y.abs()`` it takes for a dtype (t is already in it), and without
    ``_StitchGradient`` when t carries no gradient."""
    func = self.func
    if type(func) is not _PerturbFunc:
        return func(t, y, perturb=perturb)
    if perturb is Perturb.NONE:
        return func.base_func(t, y)
    other = t + 1 if perturb is Perturb.NEXT else t - 1
    t = _nextafter(t, other) if t.requires_grad else torch.nextafter(t, other)
    return func.base_func(t, y)


def _checked(solver: type) -> type:
    """``solver`` (an adaptive Runge-Kutta class) with the jump fix, its asserts as exceptions and, where
    ``_weights`` allows, the lean step (``_lean_step``)."""
    weights = _weights(solver)

    def __init__(self, *args, step_memory: Optional["StepMemory"] = None, **kwargs):
        if step_memory is not None and kwargs.get("first_step") is None:
            kwargs["first_step"] = step_memory.step
        solver.__init__(self, *args, **kwargs)
        self._memory = step_memory
        if weights is not None:
            self._weights = weights
            self._t_dtype = self.y0.abs().dtype
            # The step control's constants as Python numbers, once (they are 0-d tensors of self.dtype).
            self._min_step, self._max_step = float(self.min_step), float(self.max_step)
            self._safety, self._ifactor, self._dfactor = float(self.safety), float(self.ifactor), float(self.dfactor)

    def _advance(self, next_t):
        self._steps_to_output = 0
        return solver._advance(self, next_t)

    def _adaptive_step(self, rk_state):
        # torchdiffeq asserts n_steps < max_num_steps before each step of _advance.
        self._steps_to_output += 1
        if self._steps_to_output > self.max_num_steps:
            raise IntegrationFailure(f"max_num_steps exceeded ({self._steps_to_output - 1}>={self.max_num_steps})")
        if len(self.jump_t):
            t0 = rk_state.t1
            if bool(t0 == self.jump_t[self.next_jump_index]):  # torchdiffeq syncs per step anyway
                f0 = self.func(t0, rk_state.y1, perturb=Perturb.NEXT)
                rk_state = rk_state._replace(f1=f0)
                if self.next_jump_index != len(self.jump_t) - 1:
                    self.next_jump_index += 1
        # The two asserts at the top of torchdiffeq's _adaptive_step, with the step it will take.
        y0, t0, dt = rk_state.y1, rk_state.t1, rk_state.dt
        if hasattr(self, "min_step"):  # torchdiffeq >= 0.2.4 clamps the step first
            if not torch.isfinite(dt):
                dt = self.min_step
            dt = dt.clamp(self.min_step, self.max_step)
        if not t0 + dt > t0:
            raise IntegrationFailure(f"underflow in dt {dt.item()}")
        if not torch.isfinite(y0).all():
            raise IntegrationFailure(f"non-finite values in state `y`: {y0}")
        if weights is not None and not (dt.requires_grad or t0.requires_grad):
            new = _lean_step(self, rk_state, dt)
        else:
            new = solver._adaptive_step(self, rk_state)
        if self._memory is not None and self._memory.waiting and bool(new.t1 > t0):  # the first accepted step
            self._memory.remember(float(new.dt))
        return new

    def integrate(self, t):
        # torchdiffeq's loop (one _advance per output time), except that the output times after the
        # first inside a step are interpolated together: the same arithmetic element by element, so
        # the same values, with one host sync per step instead of two per output time.
        solution = torch.empty(len(t), *self.y0.shape, dtype=self.y0.dtype, device=self.y0.device)
        solution[0] = self.y0
        t = t.to(self.dtype)
        if self._memory is not None:
            self._memory.start(float(t[-1] - t[0]))
        self._before_integrate(t)
        i = 1
        while i < len(t):
            solution[i] = self._advance(t[i])
            i += 1
            state = self.rk_state
            j = int(torch.searchsorted(t, state.t1.reshape(1), right=True))
            if j > i:
                solution[i:j] = _interpolate(state.interp_coeff, state.t0, state.t1, t[i:j])
                i = j
        return solution

    return type(solver.__name__, (solver,), {"__init__": __init__, "_advance": _advance,
                                             "_adaptive_step": _adaptive_step, "_evaluate": _evaluate,
                                             "integrate": integrate})


def _interpolate(coefficients, t0, t1, times):
    """torchdiffeq's ``_interp_evaluate`` (the step's dense output polynomial) at several times [J] of
    one step -> [J, *y.shape], operation for operation, so each value is the one it gives."""
    x = ((times - t0) / (t1 - t0)).to(coefficients[0].dtype)
    x = x.reshape((-1,) + (1,) * coefficients[0].ndim)
    total = coefficients[0] + x * coefficients[1]
    x_power = x
    for coefficient in coefficients[2:]:
        x_power = x_power * x
        total = total + x_power * coefficient
    return total


def _sampled(solver: type) -> type:
    """``solver`` (a fixed-grid class) with an output between two grid times interpolated on that step by
    cubic Hermite with the step's own end slopes, f(t0+) and f(t1-): O(step^4), like the step itself
    for rk4 (torchdiffeq's interpolation is linear, O(step^2); its cubic one takes f at t1 on the side the
    next step sees, wrong when t1 is a node where the control jumps). An output on a grid time is the
    step's value, as before; the end slope costs one evaluation per step that holds an interior output."""

    def integrate(self, t):
        time_grid = self.grid_constructor(self.func, self.y0, t)
        if not (time_grid[0] == t[0] and time_grid[-1] == t[-1]):
            raise IntegrationFailure("the fixed-step grid does not span the output times")
        solution = torch.empty(len(t), *self.y0.shape, dtype=self.y0.dtype, device=self.y0.device)
        solution[0] = self.y0
        j, y0 = 1, self.y0
        for t0, t1 in zip(time_grid[:-1], time_grid[1:]):
            dt = t1 - t0
            self.func.callback_step(t0, y0, dt)
            dy, f0 = self._step_func(self.func, t0, dt, t1, y0)
            y1 = y0 + dy
            f1 = None
            while j < len(t) and t1 >= t[j]:
                if t[j] == t1:
                    solution[j] = y1
                else:
                    if f1 is None:
                        f1 = self.func(t1, y1, perturb=Perturb.PREV if self.perturb else Perturb.NONE)
                    solution[j] = self._cubic_hermite_interp(t0, y0, f0, t1, y1, f1, t[j])
                j += 1
            y0 = y1
        return solution

    return type(solver.__name__, (solver,), {"integrate": integrate})


_SOLVERS: Dict[str, type] = {
    name: _checked(cls) if issubclass(cls, RKAdaptiveStepsizeODESolver)
    else _sampled(cls) if issubclass(cls, FixedGridODESolver) else cls
    for name, cls in SOLVERS.items()
}


def is_adaptive(method: str) -> bool:
    """Whether ``method`` is an adaptive Runge-Kutta method (it takes ``jump_t``)."""
    return issubclass(SOLVERS[method], RKAdaptiveStepsizeODESolver)


def is_fixed_grid(method: str) -> bool:
    """Whether ``method`` steps on a fixed grid (it needs a step size)."""
    return issubclass(SOLVERS[method], FixedGridODESolver)


def integrate(func: Callable, y0: torch.Tensor, times: torch.Tensor, *, method: str, rtol: float, atol: float,
              options: Optional[dict] = None) -> torch.Tensor:
    """Like ``torchdiffeq.odeint`` (same arguments and result [len(times), *y0.shape]); adaptive
    methods raise IntegrationFailure where torchdiffeq would fail an assert."""
    shapes, func, y0, t, rtol, atol, method, options, _, _ = _check_inputs(
        func, y0, times, rtol, atol, method, dict(options or {}), None, _SOLVERS)
    solution = _SOLVERS[method](func=func, y0=y0, rtol=rtol, atol=atol, **options).integrate(t)
    if shapes is not None:
        solution = _flat_to_shape(solution, (len(t),), shapes)
    return solution


class ODE:
    """One ODE-solver setting on one control mesh: the control jumps at every mesh node.

    Adaptive methods get the interior nodes as ``jump_t`` (no step crosses a control jump, and f
    is re-evaluated on the new side of each node); fixed-step methods need
    ``options={"step_size": h}`` and step node to node, ceil(h_n / h) steps per interval, with
    ``perturb=True`` (their first and last stages look just inside the interval).
    """

    def __init__(self, mesh: torch.Tensor, method: str = "dopri5", rtol: float = 1e-8, atol: float = 1e-10,
                 options: Optional[dict] = None):
        if method not in METHODS:
            raise ValueError(f"`ode_method` must be one of the torchdiffeq methods {sorted(METHODS)}, got {method!r}")
        self.mesh = mesh
        self.method, self.rtol, self.atol = method, float(rtol), float(atol)
        self.adaptive = is_adaptive(method)
        self.options = dict(options or {})
        self._memories: Dict[str, StepMemory] = {}
        if self.adaptive:
            if mesh.numel() > 2:
                self.options.setdefault("jump_t", mesh[1:-1])
            self.options.setdefault("max_num_steps", MAX_STEPS_PER_INTERVAL)
        elif is_fixed_grid(method):
            step = self.options.pop("step_size", None)
            if step is None or not float(step) > 0:
                suggestion = float(mesh[-1]) / (_SUGGESTED_STEPS_PER_INTERVAL * (mesh.numel() - 1))
                raise ValueError(
                    f"the ODE method {method!r} is a fixed-step method and needs a step size: pass "
                    f"ode=pmp.ODE({method!r}, options={{'step_size': h}}) with h > 0, e.g. h = {suggestion:.3g} "
                    f"({_SUGGESTED_STEPS_PER_INTERVAL} steps per mesh interval); got {step!r}. Without one it "
                    "would take a single step per interval and report an inaccurate J. Or use an adaptive method "
                    "such as 'dopri5'")
            # Steps end on every mesh node (the control jumps there): each interval gets ceil(h_n / step) steps,
            # whatever other output times a solve asks for.
            self.options["grid_constructor"] = _grid_on_nodes(float(step), mesh)
            self.options.setdefault("perturb", True)

    def step_memory(self, kind: str) -> Optional[StepMemory]:
        """The ``StepMemory`` of this setting's all-intervals solves of one ``kind`` (None for a fixed-step
        method): one per Sweeper, so the same call gives the same steps."""
        return self._memories.setdefault(kind, StepMemory()) if self.adaptive else None

    def solve(self, rhs: Callable, y0: torch.Tensor, times: torch.Tensor, *,
              options: Optional[dict] = None) -> torch.Tensor:
        """Y at ``times`` [len(times), *y0.shape]; ``options`` replaces this setting's options."""
        return integrate(rhs, y0, times, rtol=self.rtol, atol=self.atol, method=self.method,
                         options=self.options if options is None else options)

    def solve_sampled(self, rhs: Callable, y0: torch.Tensor, fractions: torch.Tensor, *,
                      backward: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """Y at the mesh nodes [N + 1, *y0.shape] and at t_n + c h_n for c in ``fractions`` ([R], increasing
        in (0, 1); may be empty) [N, R, *y0.shape], from one solve over the mesh: forward from t_0, or
        ``backward`` from t_N (y0 is then Y(T)). The interior values come from the solver (see the module),
        and the node values are those ``solve`` gives on the nodes alone."""
        mesh = self.mesh
        N, R = mesh.numel() - 1, fractions.numel()
        times = sample_times(mesh, fractions) if R else mesh
        Y = self.solve(rhs, y0, times.flip(0) if backward else times)
        if backward:
            Y = Y.flip(0)
        if not R:
            return Y, Y.new_zeros((N, 0) + Y.shape[1:])
        return Y[::R + 1], Y[:-1].unflatten(0, (N, R + 1))[:, 1:]


class StepMemory:
    """The first step of the next solve of one kind on the unit axis sigma in [0, 1] (all mesh intervals at
    once): the whole axis at first, then the step the controller proposed after the previous solve's first
    accepted step, at most the axis. torchdiffeq's initial-step heuristic starts such a solve near 0.005 and
    the step then grows at most tenfold a step: on the brachistochrone at N = 200 every forward solve took 4
    steps (0.0047, 0.047, 0.47 and one past the end) where one step of the whole axis passes the same error
    test. A first step too long is rejected and shrunk by the usual control, and the memory follows the
    proposals, so a rough solve keeps shorter steps."""

    __slots__ = ("step", "span", "waiting")

    def __init__(self):
        self.step, self.span, self.waiting = 1.0, 1.0, False

    def start(self, span: float) -> None:
        self.span, self.waiting = span, True

    def remember(self, proposal: float) -> None:
        self.step, self.waiting = min(proposal, self.span), False


class EvaluationBudget:
    """Counts the right-hand-side evaluations of one sweep; past ``limit`` raises SweepBudgetError.

    Every right-hand side calls it first, with its time t (None when it has no single time, as
    in the all-intervals-at-once co-state solve). Under ``python -O`` too: this, not
    torchdiffeq's ``max_num_steps`` assert, is what ends a blow-up.
    """

    def __init__(self, budget: Optional[int], sweep: str, iteration: Optional[int]):
        self.limit = DEFAULT_BUDGET if budget is None else int(budget)
        self.sweep, self.iteration = sweep, iteration
        self.evaluations = 0
        self.last_t: Optional[torch.Tensor] = None  # the time the sweep reached

    def __call__(self, t: Optional[torch.Tensor]) -> None:
        self.evaluations += 1
        if t is not None:
            self.last_t = t
        if self.evaluations > self.limit:
            where = self.reached()
            sweep = self.sweep
            raise SweepBudgetError(
                f"the {sweep} sweep needed more than {self.limit} right-hand-side evaluations"
                + ("" if where is None else f" (it reached t = {where:.6g})")
                + f": the {'state' if sweep == 'forward' else 'co-state'} grows without bound or the "
                "dynamics are stiff. If J kept decreasing, the problem may be unbounded below (check the costs "
                "and bounds); for stiff dynamics see docs/guide.md, section 'Stiff problems'",
                iteration=self.iteration, sweep=sweep, budget=self.limit, time=where)

    def reached(self) -> Optional[float]:
        """The last time a right-hand side was evaluated at, or None."""
        return None if self.last_t is None else float(self.last_t)


def _grid_on_nodes(step: float, mesh: torch.Tensor):
    """A torchdiffeq ``grid_constructor``: the mesh nodes subdivided into steps of at most ``step``, so
    that no fixed step crosses a node where the control jumps. Output times between the nodes (samples
    inside the intervals) do not change the grid. A backward solve gets its times as given (from T to
    0: torchdiffeq negates around this function)."""
    def construct(func, y0, t):
        t = t[torch.isin(t, mesh.to(dtype=t.dtype, device=t.device))]  # the nodes among the output times
        h = t[1:] - t[:-1]
        counts = torch.ceil(h.abs() / step).clamp_min(1).long()  # [N] steps per interval
        interval = torch.repeat_interleave(torch.arange(h.numel(), device=t.device), counts)
        first = torch.cumsum(counts, 0) - counts  # index of each interval's first step
        position = torch.arange(interval.numel(), device=t.device) - first[interval]
        inner = t[:-1][interval] + h[interval] * position.to(t.dtype) / counts[interval].to(t.dtype)
        return torch.cat([inner, t[-1:]])

    return construct
