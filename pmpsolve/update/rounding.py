"""Sum-up rounding: from a relaxed control in [min V, max V] to one taking only values of a finite set V.

The standard way to solve a problem with a two-valued control (on/off, {0, 1}): solve
the relaxation u in [a, b] (a Box), round it so that the integral of the rounded control
follows the integral of the relaxed one, then polish with a method that handles the
finite set (``method="sqh"`` or ``"emsa"`` over ``pmp.Finite``). The rounded control's
J differs from the relaxed optimum by O(max h_n) (Sager, Bock and Diehl 2012), while
the maximum-principle iteration started from a constant binary control can stop at a
poor local solution (no single switch of one interval improves J).
"""
from __future__ import annotations

import numpy as np
import torch

from ..controls import Finite

__all__ = ["sum_up_rounding"]


def sum_up_rounding(controls: torch.Tensor, mesh: torch.Tensor, control_set: Finite) -> torch.Tensor:
    """Round relaxed controls [N, m] on ``mesh`` [N + 1] to the values of ``control_set``.

    Two values a < b, componentwise: with w = (u - a) / (b - a) in [0, 1], the rounded r in
    {0, 1} keeps |int_0^t (w - r) ds| <= h/2 at every node t. Returns a + (b - a) r, [N, m].
    More values v_1 < ... < v_M: u is written as the convex combination of its two
    neighbouring values (weights omega_j(t), summing to 1), and on each interval the value
    whose accumulated deficit int_0^{t_{n+1}} omega_j - int_0^{t_n} r_j is largest is taken
    (SUR for SOS1 constraints, Sager et al. 2012): the integral of every omega_j is followed
    within O(max h_n).

    Example: a relaxed control of 1/2 becomes an alternation whose integral stays within h/2.
        >>> import torch, pmpsolve as pmp
        >>> pmp.sum_up_rounding(torch.full((4, 1), 0.5), torch.linspace(0, 1, 5), pmp.Finite([0.0, 1.0]))[:, 0]
        tensor([1., 0., 1., 0.])
    """
    if not isinstance(control_set, Finite):
        raise ValueError(f"sum_up_rounding: `control_set` must be a pmp.Finite, got {control_set!r}")
    controls = torch.as_tensor(controls)
    mesh = torch.as_tensor(mesh, dtype=controls.dtype, device=controls.device)
    if controls.ndim != 2 or mesh.ndim != 1 or mesh.numel() != controls.shape[0] + 1:
        raise ValueError(f"sum_up_rounding: need controls [N, m] and mesh [N + 1], got {tuple(controls.shape)} "
                         f"and {tuple(mesh.shape)}")
    if control_set.values.numel() == 1:
        return torch.full_like(controls, float(control_set.values[0]))
    if control_set.values.numel() > 2:
        return _sos1_rounding(controls, mesh, control_set.values.to(controls.dtype))
    a, b = (float(v) for v in control_set.values)
    w = ((controls - a) / (b - a)).clamp(0.0, 1.0)
    h = (mesh[1:] - mesh[:-1])[:, None]
    cumulative = torch.cumsum(h * w, dim=0)  # int_0^{t_{n+1}} w
    if torch.allclose(h, h.mean().expand_as(h), rtol=1e-9, atol=0.0):
        # Uniform mesh: the greedy rule keeps the rounded integral at h * round(cumulative / h),
        # so the counts of ones are known in closed form and r is their difference (no loop).
        ones = torch.floor(cumulative / h + 0.5)
        r = torch.diff(ones, dim=0, prepend=torch.zeros_like(ones[:1]))
    else:  # the greedy rule is sequential in time; a non-uniform mesh takes the plain loop
        hn, cn = h.cpu().numpy(), cumulative.cpu().numpy()
        rn = np.zeros_like(cn)
        done = np.zeros(cn.shape[1])
        for n in range(cn.shape[0]):
            rn[n] = cn[n] - done >= 0.5 * hn[n]
            done += hn[n] * rn[n]
        r = torch.as_tensor(rn, dtype=controls.dtype, device=controls.device)
    return a + (b - a) * r.clamp(0.0, 1.0)


def _sos1_rounding(controls: torch.Tensor, mesh: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """SUR over M > 2 values (see ``sum_up_rounding``). The rule is sequential in time, so it runs
    as one loop over the N intervals in numpy, vectorised over the m components and M values."""
    v = values.cpu().numpy()
    u = np.clip(controls.detach().cpu().numpy(), v[0], v[-1])  # [N, m]
    j = np.clip(np.searchsorted(v, u, side="right") - 1, 0, len(v) - 2)  # left neighbour index
    lam = (u - v[j]) / (v[j + 1] - v[j])
    omega = np.zeros(u.shape + (len(v),))  # [N, m, M] convex multipliers
    np.put_along_axis(omega, j[..., None], (1 - lam)[..., None], axis=-1)
    right = np.zeros_like(omega)
    np.put_along_axis(right, (j + 1)[..., None], lam[..., None], axis=-1)
    omega = omega + right
    h = np.diff(mesh.detach().cpu().numpy())[:, None, None]
    target = np.cumsum(h * omega, axis=0)  # int_0^{t_{n+1}} omega_j
    done = np.zeros(omega.shape[1:])
    rounded = np.zeros(u.shape, dtype=int)
    for n in range(u.shape[0]):
        choice = np.argmax(target[n] - done, axis=-1)  # [m]
        rounded[n] = choice
        np.put_along_axis(done, choice[:, None], np.take_along_axis(done, choice[:, None], -1) + h[n, 0], axis=-1)
    return torch.as_tensor(v[rounded], dtype=controls.dtype, device=controls.device)
