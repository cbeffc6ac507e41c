"""The control mesh 0 = t_0 < t_1 < ... < t_N = T and lookups on it.

Controls are piecewise constant: u(t) = u_n on [t_n, t_{n+1}). Time tensors
always share the state's dtype and device (the dtype policy of the solver),
so that lookups inside ODE right-hand sides are pure tensor ops.
"""
from __future__ import annotations

import math
import numbers
from typing import Union

import numpy as np
import torch

__all__ = ["make_mesh", "interval_index", "gauss_legendre", "chebyshev_fractions", "sample_times"]

#: Relative distance (to max(1, T)) within which given end times count as 0 and T: they are then set
#: to exactly 0 and T, so that rounding in a user-built mesh (e.g. a cumsum of steps) is accepted.
_END_TOLERANCE = 1e-12


def make_mesh(mesh: Union[int, torch.Tensor, "list[float]"], horizon: float, dtype: torch.dtype,
              device) -> torch.Tensor:
    """Validate ``mesh`` and return the node times [N + 1].

    Args:
        mesh: N >= 1 (uniform intervals) or an increasing 1-D sequence of times from 0 to T.
        horizon: T.
    """
    mesh = _intervals_or_times(mesh)
    if isinstance(mesh, int):
        if mesh < 1:
            raise ValueError(f"`mesh` must be a number of intervals N >= 1, got {mesh}")
        return torch.linspace(0.0, horizon, mesh + 1, dtype=dtype, device=device)
    try:
        nodes = torch.as_tensor(mesh, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"`mesh` must be an int N >= 1 or a 1-D tensor of times, got {type(mesh).__name__}") from None
    if nodes.ndim != 1 or nodes.numel() < 2:
        raise ValueError(f"`mesh` given as times must be 1-D with at least 2 entries, got shape {tuple(nodes.shape)}")
    if not torch.isfinite(nodes).all():
        raise ValueError("`mesh` has non-finite times")
    steps = nodes[1:] - nodes[:-1]
    if (steps <= 0).any():
        i = int((steps <= 0).nonzero()[0])
        raise ValueError(
            f"`mesh` must be strictly increasing, but mesh[{i}] = {nodes[i].item():g} >= mesh[{i + 1}] = "
            f"{nodes[i + 1].item():g}"
        )
    scale = max(1.0, abs(horizon))
    if abs(nodes[0].item()) > _END_TOLERANCE * scale or abs(nodes[-1].item() - horizon) > _END_TOLERANCE * scale:
        raise ValueError(
            f"`mesh` must span [0, T] = [0, {horizon:g}], got [{nodes[0].item():g}, {nodes[-1].item():g}]; "
            f"for example torch.linspace(0, {horizon:g}, N + 1)"
        )
    nodes = nodes.clone()
    nodes[0], nodes[-1] = 0.0, horizon
    return nodes.to(dtype=dtype, device=device)


def _intervals_or_times(mesh):
    """``mesh`` as a Python int when it is an integer of any kind, else unchanged; scalars that are not integers
    (a float, a bool, a 0-d float tensor) are refused, with the int to pass instead when there is one."""
    expected = "`mesh` must be an int N >= 1 or a 1-D tensor of times"
    if isinstance(mesh, (bool, np.bool_)):
        raise TypeError(f"{expected}, got bool {mesh!r}")
    if isinstance(mesh, numbers.Integral):  # int, numpy integers
        return int(mesh)
    if isinstance(mesh, (torch.Tensor, np.ndarray)) and mesh.ndim == 0:
        kind = f"a 0-d {'tensor' if isinstance(mesh, torch.Tensor) else 'array'} of {mesh.dtype}"
        is_integer = (not mesh.dtype.is_floating_point and not mesh.dtype.is_complex and mesh.dtype != torch.bool
                      if isinstance(mesh, torch.Tensor) else np.issubdtype(mesh.dtype, np.integer))
        if is_integer:
            return int(mesh.item())
        mesh = mesh.item()
    else:
        kind = type(mesh).__name__
    if isinstance(mesh, (bool, np.bool_)):
        raise TypeError(f"{expected}, got {kind} {mesh!r}")
    if isinstance(mesh, numbers.Number):
        value = float(mesh) if isinstance(mesh, numbers.Real) else mesh
        fix = (f"; pass mesh={int(value)}" if isinstance(value, numbers.Real) and math.isfinite(value)
               and float(value).is_integer() and value >= 1
               else "; pass a whole number of intervals, e.g. mesh=200, or the node times, e.g. "
                    "mesh=torch.linspace(0, T, N + 1)")
        raise TypeError(f"{expected}, got {kind} {value!r}{fix}")
    return mesh


def interval_index(mesh: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Index n of the interval [t_n, t_{n+1}) holding t (clamped to 0..N-1); no host sync.

    ``right=True`` makes a node belong to the interval on its right, which is what
    the ODE solvers expect at a jump point: torchdiffeq evaluates just before a
    node with t - ulp and just after it with t + ulp (its ``jump_t`` handling).
    """
    idx = torch.searchsorted(mesh, t.reshape(-1).to(mesh.dtype), right=True) - 1
    return idx.clamp_(0, mesh.numel() - 2).reshape(t.shape)


def gauss_legendre(points: int, dtype, device):
    """Nodes [Q] in (0, 1) and weights [Q] (summing to 1) of Q-point Gauss-Legendre quadrature."""
    x, w = np.polynomial.legendre.leggauss(points)
    return (torch.as_tensor((x + 1) / 2, dtype=dtype, device=device),
            torch.as_tensor(w / 2, dtype=dtype, device=device))


def chebyshev_fractions(points: int, dtype, device) -> torch.Tensor:
    """The ``points`` Chebyshev points of the first kind as fractions of an interval, (z + 1) / 2 with
    z = cos((2j + 1) pi / (2 points)), j = 0, ..., points - 1 (decreasing, in (0, 1))."""
    j = torch.arange(points, dtype=dtype, device=device)
    return (torch.cos((2 * j + 1) * torch.pi / (2 * points)) + 1) / 2


def sample_times(mesh: torch.Tensor, fractions: torch.Tensor) -> torch.Tensor:
    """The nodes with R points t_n + c h_n (c in ``fractions`` [R], increasing in (0, 1)) inside every
    interval, in order: [N (R + 1) + 1]; entry n (R + 1) is node n, entry n (R + 1) + 1 + r is
    t_n + fractions[r] h_n (computed as ``interval_data`` computes its quadrature times)."""
    starts = mesh[:-1, None]
    inner = starts + (mesh[1:] - mesh[:-1])[:, None] * fractions  # [N, R]
    return torch.cat([torch.cat([starts, inner], dim=1).reshape(-1), mesh[-1:]])
