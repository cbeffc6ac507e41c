"""The augmented Hamiltonian of a residual tanh layer and its exact gradient, without autograd (docs/theory.md).

For a ``Residual(Sequential(A, Tanh()), delta)`` entry, A a ``Linear`` or ``Conv2d`` (stride 1), the layer is
g(x, theta) = x + delta tanh(z), z = A_W x + b, and grad_x H = p + delta A_W' (s * p) with s = 1 - tanh(z)^2.
The augmented Hamiltonian of ``hamiltonian.LayerHamiltonian`` (paper eq. (7), discrete form) is

    Htilde(theta) = p . g - rho/2 |e|^2 - rho/2 |r|^2 - wd/2 |theta|^2 - eps |theta - theta^k|^2,
    e = x_{n+1} - g,   r = p_n - grad_x H,

and its gradient, by the chain rule through tanh and its derivative (t = tanh(z), v = A_W r):

    dHtilde/dz  = delta s * (p + rho e) - 2 rho delta t * s * v * p
    dHtilde/dW  = (dHtilde/dz) x'  +  rho delta (s * p) r'      (the weight gradients of A: inputs x and r)
    dHtilde/db  = sum of dHtilde/dz over the batch (and positions).

Autograd gets the same numbers by differentiating the co-state term (a vector-Jacobian product) once
more under ``torch.func.vmap``: on the CNN study's 7 x 7 residual layers that double backward is
dispatch overhead more than arithmetic. Here one evaluation is a forward map, two adjoint-side maps
(A_W' a, A_W r) and two weight gradients for all rows of the group at once (a grouped convolution,
a batched matrix product). ``ResidualHamiltonian`` replaces only ``value_and_grad``, what L-BFGS
asks for; everything else (values at trial points, gains) stays the autograd ``LayerHamiltonian``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .groups import LayerGroup
from .hamiltonian import LayerHamiltonian
from .layers import Residual

__all__ = ["ResidualHamiltonian", "residual_objective"]


def _branch(group: LayerGroup) -> Optional[Tuple[torch.nn.Module, float, bool]]:
    """(the affine map A, delta, has bias) of a Residual(Sequential(A, Tanh())) template, or None."""
    layer = group.template
    if type(layer) is not Residual or type(layer.module) is not torch.nn.Sequential or len(layer.module) != 2:
        return None
    affine, act = layer.module[0], layer.module[1]
    if type(act) is not torch.nn.Tanh:
        return None
    if type(affine) is torch.nn.Conv2d:
        if not (affine.stride == (1, 1) and affine.dilation == (1, 1) and affine.groups == 1
                and affine.padding_mode == "zeros" and isinstance(affine.padding, tuple)):
            return None
    elif type(affine) is not torch.nn.Linear:
        return None
    if group.names == ["module.0.weight", "module.0.bias"]:
        return affine, layer.delta, True
    if group.names == ["module.0.weight"] and affine.bias is None:
        return affine, layer.delta, False
    return None  # a fixed (excluded) bias or weight: the autograd objective handles it


class ResidualHamiltonian(LayerHamiltonian):
    """``LayerHamiltonian`` of a residual tanh group with the hand-derived ``value_and_grad`` (module docstring).

    Rows u [G, m] are (weight, bias) flattened per layer; the frozen data are laid out once so that the G
    layers run as one grouped convolution ([B, G C, H, W]) or one batched matrix product ([G, N, K]).
    """

    def __init__(self, objective: LayerHamiltonian, affine: torch.nn.Module, delta: float, bias: bool):
        super().__init__(objective.group, objective.data, objective.rho, objective.eps, objective.weight_decay)
        self.affine, self.delta, self.bias = affine, float(delta), bias
        d = self.data
        G = d.controls.shape[0]
        self._conv = isinstance(affine, torch.nn.Conv2d)
        if self._conv:
            def lay(t):  # [G, B, C, H, W] -> [B, G C, H, W]
                return t.transpose(0, 1).reshape(t.shape[1], G * t.shape[2], *t.shape[3:])
        else:
            def lay(t):  # [G, B, ..., K] -> [G, N, K]
                return t.reshape(G, -1, t.shape[-1])
        self._x, self._y, self._p, self._p_in = (lay(t) for t in (d.inputs, d.outputs, d.costates,
                                                                   d.input_costates))

    # -- the affine map A_W of all rows at once, its adjoint in x and its weight gradient --------------
    def _weights(self, u: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        G = u.shape[0]
        n_w = self.affine.weight.numel()
        W = u[:, :n_w].reshape(G, *self.affine.weight.shape)
        b = u[:, n_w:] if self.bias else None
        if self._conv:
            return W.reshape(G * W.shape[1], *W.shape[2:]), None if b is None else b.reshape(-1)
        return W, b

    def _forward(self, x, W, b=None):
        if self._conv:
            return F.conv2d(x, W, b, padding=self.affine.padding, groups=self.data.controls.shape[0])
        z = x @ W.transpose(1, 2)
        return z if b is None else z + b[:, None, :]

    def _adjoint(self, a, W):
        """A_W' a: the transposed map (the gradient of a . A_W x in x)."""
        if self._conv:
            return F.conv_transpose2d(a, W, padding=self.affine.padding, groups=self.data.controls.shape[0])
        return a @ W

    def _weight_grad(self, x, a, W):
        """The gradient of a . A_W x in W: [G, *weight.shape]."""
        G = self.data.controls.shape[0]
        if self._conv:
            gw = torch.ops.aten.convolution_backward(
                a, x, W, None, (1, 1), self.affine.padding, (1, 1), False, [0, 0], G, (False, True, False))[1]
            return gw.reshape(G, -1)
        return (a.transpose(1, 2) @ x).reshape(G, -1)

    def _row_sums(self, t: torch.Tensor) -> torch.Tensor:
        """Sum per row (layer) [G] of a tensor in the grouped layout."""
        G = self.data.controls.shape[0]
        if self._conv:
            return t.reshape(t.shape[0], G, -1).sum((0, 2))
        return t.reshape(G, -1).sum(1)

    def _bias_grad(self, dz: torch.Tensor) -> torch.Tensor:
        G = self.data.controls.shape[0]
        if self._conv:
            return dz.sum((0, 2, 3)).reshape(G, -1)
        return dz.sum(1)

    # -- IntervalObjective ----------------------------------------------------------------------------
    def value_and_grad(self, u: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if self._last is not None and torch.equal(self._last[0], u):
            return self._last[1], self._last[2]
        rho, delta = self.rho, self.delta
        u = u.detach()
        with torch.no_grad():
            W, b = self._weights(u)
            x, y, p, p_in = self._x, self._y, self._p, self._p_in
            t = torch.tanh(self._forward(x, W, b))
            s = 1 - t * t
            a = s * p
            e = y - (x + delta * t)
            r = p_in - (p + delta * self._adjoint(a, W))
            values = self._row_sums(delta * p * t + x * p - 0.5 * rho * (e * e + r * r))
            v = self._forward(r, W)
            dz = (delta * s) * (p + rho * e - (2 * rho) * t * v * p)
            grads = [self._weight_grad(x, dz, W) + (rho * delta) * self._weight_grad(r, a, W)]
            if self.bias:
                grads.append(self._bias_grad(dz))
            grads = torch.cat(grads, dim=1)
            if self.weight_decay:
                values = values - 0.5 * self.weight_decay * (u * u).sum(1)
                grads = grads - self.weight_decay * u
            if self.eps:
                diff = u - self.data.controls
                values = values - self.eps * (diff * diff).sum(1)
                grads = grads - 2 * self.eps * diff
        self._last = (u.clone(), values, grads)
        return values, grads


def residual_objective(group: LayerGroup, objective: LayerHamiltonian) -> Optional[ResidualHamiltonian]:
    """``ResidualHamiltonian`` for a residual tanh group in one process with rho > 0, else None."""
    if objective._reduce is not None or objective.penalty is not None or not group.batched:
        return None
    if not (objective.rho > 0 and objective.data.inputs.is_floating_point()):
        return None
    branch = _branch(group)
    if branch is None:
        return None
    return ResidualHamiltonian(objective, *branch)
