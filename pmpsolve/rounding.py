"""Sum-up rounding: from a relaxed control in [a, b] to one taking only the values a and b.

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

from .controls import Finite

__all__ = ["sum_up_rounding"]


def sum_up_rounding(controls: torch.Tensor, mesh: torch.Tensor, control_set: Finite) -> torch.Tensor:
    """Round relaxed controls [N, m] on ``mesh`` [N + 1] to the two values of ``control_set``.

    Componentwise: with w = (u - a) / (b - a) in [0, 1], the rounded r in {0, 1} keeps
    |int_0^t (w - r) ds| <= h/2 at every node t. Returns a + (b - a) r, [N, m].
    """
    if not isinstance(control_set, Finite) or control_set.values.numel() != 2:
        raise ValueError(f"sum_up_rounding: `control_set` must be a pmp.Finite with exactly two values, "
                         f"got {control_set!r}")
    controls = torch.as_tensor(controls)
    mesh = torch.as_tensor(mesh, dtype=controls.dtype, device=controls.device)
    if controls.ndim != 2 or mesh.ndim != 1 or mesh.numel() != controls.shape[0] + 1:
        raise ValueError(f"sum_up_rounding: need controls [N, m] and mesh [N + 1], got {tuple(controls.shape)} "
                         f"and {tuple(mesh.shape)}")
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
