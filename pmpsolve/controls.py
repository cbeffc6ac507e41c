"""Control sets U: where the control u(t) may take its values.

A control set knows its shape ``(m,)``, how to project onto itself, whether a
tensor lies in it, a default starting control, and which maximisers of the
interval Hamiltonian can handle it (``maximisers``, names registered in
``pmpsolve.update.maximisers.MAXIMISERS``). A new control set is one subclass: see
``Ball`` and docs/guide.md, "Extending: a new control set".
"""
from __future__ import annotations

import math
import numbers
from typing import Sequence, Tuple, Union

import numpy as np
import torch

from .penalties import prox_in_box

Number = Union[int, float]

__all__ = ["ControlSet", "Reals", "Box", "Finite", "UserSet", "Ball"]


def _is_integer(value) -> bool:
    """An int of any kind (Python, numpy, 0-d integer tensor), but not a bool."""
    if isinstance(value, (bool, np.bool_)):
        return False
    if isinstance(value, torch.Tensor):
        return value.ndim == 0 and not value.dtype.is_floating_point and not value.dtype.is_complex \
            and value.dtype != torch.bool
    return isinstance(value, numbers.Integral)


def _shape(shape, name: str) -> Tuple[int]:
    if _is_integer(shape):
        shape = (shape,)
    if not isinstance(shape, (tuple, list, torch.Size)) or not all(_is_integer(s) for s in shape):
        hint = ""
        if isinstance(shape, numbers.Real) and not isinstance(shape, (bool, np.bool_)) and math.isfinite(shape) \
                and float(shape).is_integer():
            hint = f"; pass shape=({int(shape)},)"
        raise TypeError(
            f"{name}: `shape` must be an int m or a tuple (m,) of one int, got {type(shape).__name__} {shape!r}{hint}"
        )
    shape = tuple(int(s) for s in shape)
    if len(shape) != 1 or shape[0] < 1:
        raise ValueError(
            f"{name}: `shape` must be (m,) with m >= 1 (controls are vectors of length m), got {shape!r}; "
            f"for m control components pass shape=(m,), e.g. shape=(1,)"
        )
    return shape


class ControlSet:
    """Base class of control sets. Subclasses set ``shape`` and implement the methods.

    Example:
        >>> import pmpsolve as pmp
        >>> [isinstance(U, pmp.ControlSet) for U in (pmp.Reals(2), pmp.Box(0.0, 1.0), pmp.Finite([0.0, 1.0]))]
        [True, True, True]
    """

    shape: Tuple[int]

    @property
    def dim(self) -> int:
        """m, the number of control components."""
        return self.shape[0]

    def bounds(self, dtype: torch.dtype, device) -> Tuple[torch.Tensor, torch.Tensor]:
        """Lower and upper bounds, each [m] (``-inf``/``inf`` where unbounded): the smallest box holding U."""
        raise NotImplementedError

    def project(self, u: torch.Tensor) -> torch.Tensor:
        """Nearest point of U, componentwise, for u [..., m]."""
        low, high = self.bounds(u.dtype, u.device)
        return torch.maximum(torch.minimum(u, high), low)

    def prox(self, v: torch.Tensor, step: torch.Tensor, penalty=None) -> torch.Tensor:
        """argmin over u in U of  step * penalty(u) + |u - v|^2 / 2 (the projection without a penalty).

        The default is exact for boxes (``penalties.prox_in_box``); used by the proximal
        gradient maximiser and the optimality measure.
        """
        low, high = self.bounds(v.dtype, v.device)
        return prox_in_box(penalty, v, step, low, high)

    def maximisers(self, penalty=None) -> Tuple[str, ...]:
        """Names (in ``pmpsolve.update.maximisers.MAXIMISERS``) of the maximisers that can handle this set
        with this control penalty (None, ``L1`` or ``L0``), in the order they are tried.

        The default suits boxes: the closed form (where the objective is a separable concave
        quadratic), then projected L-BFGS for a smooth objective, proximal gradient otherwise.
        """
        if penalty is None:
            return ("closed-form", "lbfgs", "proximal")
        return ("closed-form", "proximal")

    def contains(self, u: torch.Tensor) -> torch.Tensor:
        """Whether each u [..., m] lies in U: a bool tensor [...]."""
        low, high = self.bounds(u.dtype, u.device)
        return ((u >= low) & (u <= high)).all(dim=-1)

    def default_point(self, dtype: torch.dtype, device) -> torch.Tensor:
        """The default initial control value [m] (0 where 0 lies in U, else the midpoint)."""
        low, high = self.bounds(dtype, device)
        zero = torch.zeros(self.shape, dtype=dtype, device=device)
        mid = torch.where(torch.isfinite(low) & torch.isfinite(high), (low + high) / 2, zero)
        return torch.where((low <= 0) & (high >= 0), zero, mid)

    def to_dict(self) -> dict:
        raise NotImplementedError


class Reals(ControlSet):
    """U = R^m: unconstrained controls.

    Example:
        >>> Reals(2).shape
        (2,)
    """

    def __init__(self, m: Union[int, Sequence[int]] = 1):
        self.shape = _shape(m, "Reals")

    def bounds(self, dtype, device):
        inf = torch.full(self.shape, math.inf, dtype=dtype, device=device)
        return -inf, inf

    def project(self, u):
        return u

    def contains(self, u):
        return torch.isfinite(u).all(dim=-1)

    def __repr__(self):
        return f"Reals({self.dim})"

    def to_dict(self):
        return {"type": "Reals", "shape": list(self.shape)}


class Box(ControlSet):
    """U = [low, high] componentwise (a box in R^m).

    Args:
        low, high: numbers or sequences of length m (``-inf``/``inf`` allowed for
            one-sided bounds); ``low <= high`` componentwise.
        shape: ``(m,)``; may be left out when ``low`` or ``high`` is a sequence.

    Example:
        >>> Box(0.0, 1.0, shape=(1,))
        Box(low=[0.0], high=[1.0])
    """

    def __init__(self, low: Union[Number, Sequence[Number]], high: Union[Number, Sequence[Number]],
                 shape: Union[int, Tuple[int], None] = None):
        try:
            low_t = torch.as_tensor(low, dtype=torch.float64)
            high_t = torch.as_tensor(high, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(
                f"Box: `low` and `high` must be numbers or sequences of numbers, got low={low!r}, high={high!r}"
            ) from None
        if shape is None:
            if low_t.ndim == 0 and high_t.ndim == 0:
                shape = (1,)
            else:
                shape = tuple(torch.broadcast_shapes(low_t.shape, high_t.shape))
        self.shape = _shape(shape, "Box")
        try:
            low_t, high_t = low_t.expand(self.shape).clone(), high_t.expand(self.shape).clone()
        except RuntimeError:
            raise ValueError(
                f"Box: `low` (shape {tuple(low_t.shape)}) and `high` (shape {tuple(high_t.shape)}) "
                f"must be numbers or have the control shape {self.shape}"
            ) from None
        if torch.isnan(low_t).any() or torch.isnan(high_t).any():
            raise ValueError(f"Box: bounds must not be NaN, got low={low_t.tolist()}, high={high_t.tolist()}")
        bad = (low_t > high_t).nonzero().flatten().tolist()
        if bad:
            i = bad[0]
            raise ValueError(
                f"Box: need low <= high in every component, but component {i} has "
                f"low={low_t[i].item()} > high={high_t[i].item()}; swap them or fix the bounds"
            )
        empty = ((low_t == math.inf) | (high_t == -math.inf)).nonzero().flatten().tolist()
        if empty:
            i = empty[0]
            raise ValueError(
                f"Box: component {i} has low={low_t[i].item()}, high={high_t[i].item()}, an empty set (no "
                f"number is >= inf or <= -inf); use low=-inf and/or high=inf for an unbounded side, "
                f"e.g. Box(-inf, 1.0) or Box(0.0, inf)"
            )
        self.low, self.high = low_t, high_t

    def bounds(self, dtype, device):
        return self.low.to(dtype=dtype, device=device), self.high.to(dtype=dtype, device=device)

    def __repr__(self):
        return f"Box(low={self.low.tolist()}, high={self.high.tolist()})"

    def to_dict(self):
        return {"type": "Box", "low": self.low.tolist(), "high": self.high.tolist(), "shape": list(self.shape)}


def control_set_from_dict(d: dict) -> ControlSet:
    """Inverse of ``ControlSet.to_dict`` (used when loading a saved Solution)."""
    kind = d.get("type")
    if kind == "Reals":
        return Reals(tuple(d["shape"]))
    if kind == "Box":
        return Box(d["low"], d["high"], shape=tuple(d["shape"]))
    if kind == "Finite":
        return Finite(d["values"], shape=tuple(d["shape"]), scale=d.get("scale", "auto"))
    if kind == "UserSet":  # the maximiser is not saved; the loaded set cannot be solved over again
        return UserSet(lambda data: data.controls, tuple(d["shape"]))
    if kind == "Ball":
        return Ball(d["radius"], shape=tuple(d["shape"]), center=d["center"])
    raise ValueError(f"unknown control set type {kind!r} in saved data")


class Finite(ControlSet):
    """Each component takes one of finitely many values, e.g. {0, 1} or {-1, 0, 1}.

    The Hamiltonian is maximised over such a set exactly by enumeration (all
    intervals and values at once; component by component where the
    Hamiltonian separates), something no gradient method can do.

    Args:
        values: the admissible values (a non-empty sequence of distinct finite numbers).
        shape: ``(m,)``.
        scale: for the weights of a network (``pmp.nn``) only: weights alpha * v with v in
            ``values`` and a scale alpha > 0 chosen with v by the discrete-weight rule
            (docs/discrete.md): "channel" (one alpha per output channel, dim 0 of the weight),
            "tensor" (one alpha per weight tensor), None (alpha = 1: the weights are the values
            themselves) or "auto" (default): "channel" for a layer that no normalisation layer
            follows, None where batch / layer / group norm follows it (it divides out any
            scale), None for a control problem. A scale needs values {-a, a} or {-a, 0, a}.

    Example:
        >>> Finite([0, 1], shape=(1,))
        Finite(values=[0.0, 1.0], shape=(1,))
        >>> Finite([-1, 0, 1], scale="channel")        # ternary weights alpha_c * {-1, 0, 1}
        Finite(values=[-1.0, 0.0, 1.0], shape=(1,), scale='channel')
    """

    SCALES = (None, "auto", "channel", "tensor")

    def __init__(self, values: Sequence[Number], shape: Union[int, Tuple[int]] = (1,), *,
                 scale: Union[str, None] = "auto"):
        try:
            v = torch.as_tensor(values, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"Finite: `values` must be a sequence of numbers, got {values!r}") from None
        if v.ndim > 1:
            raise ValueError(
                f"Finite: `values` must be a flat sequence of numbers (every component takes one of them), got "
                f"shape {tuple(v.shape)}; e.g. Finite([-1, 0, 1], shape=(m,))"
            )
        v = v.reshape(-1)
        if v.numel() == 0:
            raise ValueError("Finite: `values` is empty; give at least one admissible value, e.g. Finite([0, 1])")
        if not torch.isfinite(v).all():
            raise ValueError(f"Finite: `values` must be finite numbers, got {v.tolist()}")
        v = torch.unique(v)  # sorted, distinct
        self.values = v
        self.shape = _shape(shape, "Finite")
        if not (scale is None or (isinstance(scale, str) and scale in self.SCALES)):
            raise ValueError(f"Finite: `scale` must be one of 'channel', 'tensor', None or 'auto', got {scale!r}")
        if scale in ("channel", "tensor") and not self.scalable:
            raise ValueError(f"Finite: scale={scale!r} needs values {{-a, a}} or {{-a, 0, a}} (a > 0), where the best "
                             f"scale has a closed form; got {v.tolist()}. Use e.g. Finite([-1, 0, 1], scale={scale!r})")
        self.scale = scale

    @property
    def scalable(self) -> bool:
        """Whether the values are {-a, a} or {-a, 0, a} with a > 0 (the sets a scale applies to)."""
        v = self.values
        nonzero = v[v != 0]
        return nonzero.numel() == 2 and bool(nonzero[0] == -nonzero[1])

    def bounds(self, dtype, device):
        low = torch.full(self.shape, float(self.values[0]), dtype=dtype, device=device)
        high = torch.full(self.shape, float(self.values[-1]), dtype=dtype, device=device)
        return low, high

    def project(self, u):
        """The nearest admissible value, componentwise."""
        v = self.values.to(dtype=u.dtype, device=u.device)
        return v[(u.unsqueeze(-1) - v).abs().argmin(-1)]

    def contains(self, u):
        v = self.values.to(dtype=u.dtype, device=u.device)
        return (u.unsqueeze(-1) == v).any(-1).all(dim=-1)

    def default_point(self, dtype, device):
        """0 if admissible, else the admissible value nearest to 0."""
        return self.project(torch.zeros(self.shape, dtype=dtype, device=device))

    def maximisers(self, penalty=None):
        return ("enumeration",)

    def __repr__(self):
        scale = "" if self.scale == "auto" else f", scale={self.scale!r}"
        return f"Finite(values={self.values.tolist()}, shape={self.shape}{scale})"

    def to_dict(self):
        out = {"type": "Finite", "values": self.values.tolist(), "shape": list(self.shape)}
        if self.scale != "auto":
            out["scale"] = self.scale
        return out


class UserSet(ControlSet):
    """A control set known only through the user's own maximiser.

    Args:
        maximise: ``maximise(data) -> controls [N, m]`` where ``data`` is a
            ``pmpsolve.MaximisationData`` (times, weights, states, co-states,
            slopes, current controls, rho, eps, and a function evaluating the
            interval objective for candidate controls). It must return controls in U.
        shape: ``(m,)``.
        contains: optional ``contains(u [..., m]) -> bool [...]`` used to check ``init``.
        default: optional default initial control [m] (else 0).

    Example: the values {-1, 0, 1}, maximised by trying each on every interval.
        >>> import torch, pmpsolve as pmp
        >>> values = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)
        >>> def maximise(data):                           # the best of the three values, per interval
        ...     candidates = values[:, None, None].expand(3, *data.controls.shape)  # [C, N, m]
        ...     best = data.objective.candidates(candidates).argmax(0)              # [N]
        ...     return candidates[best, torch.arange(best.numel())]
        >>> U = pmp.UserSet(maximise, (1,), contains=lambda u: (u[..., None] == values).any(-1).all(-1))
        >>> problem = pmp.ControlProblem(lambda t, x, u: u.clone(), torch.tensor([1.0]), 1.0, U,
        ...                              terminal_cost=lambda x: 2.5 * x[..., 0] ** 2)
        >>> sol = pmp.solve(problem, mesh=4)
        >>> sol.controls[:, 0].tolist(), round(sol.cost, 12)     # x(1) = 1 - 4 * 0.25 = 0
        ([-1.0, -1.0, -1.0, -1.0], 0.0)
    """

    def __init__(self, maximise, shape, *, contains=None, default=None):
        if not callable(maximise):
            raise TypeError(f"UserSet: `maximise` must be callable, got {type(maximise).__name__}")
        self.maximise = maximise
        self.shape = _shape(shape, "UserSet")
        self._contains = contains
        self._default = None
        if default is not None:
            d = torch.as_tensor(default, dtype=torch.float64)
            if d.numel() != self.shape[0]:
                raise ValueError(f"UserSet: `default` must have the control shape {self.shape}, "
                                 f"got shape {tuple(d.shape)}")
            self._default = d.reshape(self.shape)

    def bounds(self, dtype, device):
        inf = torch.full(self.shape, math.inf, dtype=dtype, device=device)
        return -inf, inf

    def project(self, u):
        return u

    def contains(self, u):
        if self._contains is None:
            return torch.isfinite(u).all(dim=-1)
        return torch.as_tensor(self._contains(u), dtype=torch.bool)

    def default_point(self, dtype, device):
        if self._default is None:
            return torch.zeros(self.shape, dtype=dtype, device=device)
        return self._default.to(dtype=dtype, device=device)

    def maximisers(self, penalty=None):
        return ("user",)

    def __repr__(self):
        return f"UserSet(shape={self.shape})"

    def to_dict(self):
        return {"type": "UserSet", "shape": list(self.shape)}


class Ball(ControlSet):
    """U = {u : |u - center|_2 <= radius}, a Euclidean ball in R^m.

    The projection is the radial scaling towards the center. The ball is not a box, so the
    closed form and L-BFGS (which treat bounds componentwise) do not apply: the interval
    Hamiltonian is maximised by projected gradient ascent (the "proximal" maximiser with
    ``project`` as its prox). Control penalties (L1 / L0) are not supported on a ball.

    Args:
        radius: r > 0.
        shape: ``(m,)``.
        center: the center c, a number or a sequence of length m (default 0).

    Example:
        >>> Ball(1.0, shape=(2,))
        Ball(radius=1.0, shape=(2,), center=[0.0, 0.0])
    """

    def __init__(self, radius: Number, shape: Union[int, Tuple[int]] = (1,), center=None):
        self.shape = _shape(shape, "Ball")
        if isinstance(radius, bool) or not isinstance(radius, numbers.Real) or not (math.isfinite(radius) and radius > 0):
            raise ValueError(f"Ball: `radius` must be a finite number > 0, got {radius!r}")
        self.radius = float(radius)
        c = torch.as_tensor(0.0 if center is None else center, dtype=torch.float64)
        if c.numel() not in (1, self.dim) or not torch.isfinite(c).all():
            raise ValueError(f"Ball: `center` must be finite, a number or of the control shape {self.shape}, "
                             f"got {center!r}")
        self.center = c.reshape(-1).expand(self.shape).clone()

    def bounds(self, dtype, device):
        c = self.center.to(dtype=dtype, device=device)
        return c - self.radius, c + self.radius

    def project(self, u):
        c = self.center.to(dtype=u.dtype, device=u.device)
        norm = (u - c).norm(dim=-1, keepdim=True)
        outside = norm > self.radius
        scale = self.radius / torch.where(outside, norm, torch.ones_like(norm))
        return torch.where(outside, c + (u - c) * scale, u)  # points of U stay bit for bit

    def contains(self, u):
        c = self.center.to(dtype=u.dtype, device=u.device)
        # rounding: a projected point c + (u - c) r / |u - c| may lie a few ulps of |c| + r outside the sphere
        slack = 4 * torch.finfo(u.dtype).eps * (self.radius + float(self.center.norm()))
        return (u - c).norm(dim=-1) <= self.radius + slack

    def prox(self, v, step, penalty=None):
        self._refuse(penalty)
        return self.project(v)

    def maximisers(self, penalty=None):
        self._refuse(penalty)
        return ("proximal",)

    def _refuse(self, penalty):
        if penalty is not None:
            raise ValueError(f"Ball: control penalties ({penalty!r}) are not supported on a ball; "
                             "use a Box, or put a smooth control cost in running_cost")

    def default_point(self, dtype, device):
        """0 if it lies in the ball, else the center."""
        zero = torch.zeros(self.shape, dtype=dtype, device=device)
        return zero if bool(self.contains(zero)) else self.center.to(dtype=dtype, device=device)

    def __repr__(self):
        return f"Ball(radius={self.radius}, shape={self.shape}, center={self.center.tolist()})"

    def to_dict(self):
        return {"type": "Ball", "radius": self.radius, "shape": list(self.shape), "center": self.center.tolist()}
