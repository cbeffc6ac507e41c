"""A Gauss-Newton step for a residual layer x + delta tanh(W * x + b) (docs/theory.md, "Closed-form steps").

For ``Residual(Sequential(Conv2d(c, c, k, padding=...), Tanh()), delta)`` write z = W * x + b (affine in
theta = (W, b)), s = tanh(z), g = x + delta s and grad_x H = p + delta W^T (p s'(z)). At theta^k the two
feasibility residuals x_{n+1} - g and p_n - grad_x H vanish, so the Hessian of the feasibility terms is exactly
rho (J'J + K'K) (Gauss-Newton is exact there) and the augmented Hamiltonian's second-order model is

    Htilde(theta^k + d) ~ Htilde(theta^k) + G.d - 1/2 d' Q d,   G = J_z'(delta p s') - weight_decay theta^k,
    Q = J_z' diag(w) J_z + rho K_1'K_1 + (weight_decay + 2 eps) I,
    w = rho delta^2 s'^2 - delta p s''       (the state term, and the plain Hamiltonian's own curvature),

with J_z d = d_W * x + d_b and K_1 d = delta d_W^T (p s'), the change of grad_x H through the weight. Left out:
the change of grad_x H through s'(z) (its Gram needs the Jacobian of a convolution composed with its
transpose), and where w < 0 it is set to 0, so that the model is concave. Its maximiser d solves Q d = G
(``affine.conv_solve``, the convolution's dense system with per-output weights). The model is not exact, so
the step is checked on the exact objective: rows keep theta^k + a d with the first a in 1, 1/2, 1/4, 1/8 that
raises Htilde by at least 1e-4 a G.d (the Armijo test of the engine's L-BFGS); if a row has none, ``None``
and the caller runs L-BFGS.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .affine import _conv_supported, conv_solve
from .groups import LayerGroup
from .hamiltonian import LayerHamiltonian
from .layers import Residual

__all__ = ["residual_step"]

#: step fractions tried on the exact objective
FRACTIONS = (1.0, 0.5, 0.25, 0.125)


def _branch(group: LayerGroup) -> Optional[torch.nn.Conv2d]:
    """The convolution of a ``Residual(Sequential(Conv2d, Tanh))`` group whose rows are (weight[, bias]), or None."""
    layer = group.template
    if type(layer) is not Residual or type(layer.module) is not torch.nn.Sequential or len(layer.module) != 2:
        return None
    conv, act = layer.module[0], layer.module[1]
    if type(conv) is not torch.nn.Conv2d or type(act) is not torch.nn.Tanh or not _conv_supported(conv):
        return None
    if conv.out_channels != conv.in_channels:
        return None
    if group.names not in (["module.0.weight", "module.0.bias"], ["module.0.weight"]):
        return None
    return conv


def residual_step(group: LayerGroup, objective: LayerHamiltonian) -> Optional[torch.Tensor]:
    """New rows [G, m] of a ``Residual(Sequential(Conv2d, Tanh))`` group by one checked Gauss-Newton step, or None."""
    conv = _branch(group)
    if conv is None or objective.penalty is not None or objective._reduce is not None or not group.batched:
        return None
    if not (objective.rho > 0 and objective.data.inputs.is_floating_point()):
        return None
    data, delta = objective.data, group.template.delta
    rho, wd, c = objective.rho, objective.weight_decay, objective.weight_decay + 2 * objective.eps
    bias = len(group.names) == 2
    u0 = data.controls
    G, n_w = u0.shape[0], conv.weight.numel()
    fixed_bias = None if bias or conv.bias is None else conv.bias.detach()
    with torch.no_grad():
        x, p = data.inputs, data.costates  # [G, B, C, H, W]
        weights = u0[:, :n_w].reshape(G, *conv.weight.shape)
        biases = u0[:, n_w:] if bias else [fixed_bias] * G
        z = torch.stack([F.conv2d(x[g], weights[g], biases[g], padding=conv.padding) for g in range(G)])
        s = torch.tanh(z)
        ds = 1 - s * s  # s'
        q = delta * p * ds  # the co-state of z
        w = (rho * (delta * ds) ** 2 + 2 * delta * p * s * ds).clamp_min(0.0)  # s'' = -2 s s'
        d = conv_solve(conv, x, q, w, rho, wd, c, u0, bias)
        if not bool(torch.isfinite(d).all()):
            return None
        # G.d = q . (d_W * x + d_b) - wd theta^k . d, the model's slope along d
        dz = torch.stack([F.conv2d(x[g], d[g, :n_w].reshape(conv.weight.shape), d[g, n_w:] if bias else None,
                                   padding=conv.padding) for g in range(G)])
        slope = (q * dz).sum(tuple(range(1, dz.ndim))) - wd * (u0 * d).sum(1)  # [G]
        value0 = objective(u0)
        u = u0.clone()
        done = torch.zeros(G, dtype=torch.bool, device=u0.device)
        for a in FRACTIONS:
            trial = u0 + a * d
            ok = ~done & (objective(trial) - value0 >= 1e-4 * a * slope)
            u = torch.where(ok[:, None], trial, u)
            done = done | ok
            if bool(done.all()):
                return u
    return None
