"""Layers of a network trained by the maximum principle (docs/networks.md).

A ``torch.nn.Sequential`` is a discrete-time control system: entry n is the
step x_{n+1} = g_n(x_n, theta_n) (paper section 4, Alg. 3). ``Residual`` is
the step of a residual network, the forward-Euler discretisation of
dx/dt = f(x, theta) with step ``delta``.
"""
from __future__ import annotations

import torch

__all__ = ["Residual"]


class Residual(torch.nn.Module):
    """x -> x + delta * module(x): a residual layer (``module`` must keep the shape of x).

    Args:
        module: the residual branch f(x, theta), e.g. ``Sequential(Conv2d(c, c, 3, padding=1), Tanh())``.
        delta: the step size (the paper's CNN uses 0.5).

    Example:
        >>> import torch, pmpsolve as pmp
        >>> layer = pmp.nn.Residual(torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Tanh()), delta=0.5)
        >>> layer(torch.zeros(2, 3)).shape
        torch.Size([2, 3])
    """

    def __init__(self, module: torch.nn.Module, delta: float = 1.0):
        super().__init__()
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"Residual: `module` must be a torch.nn.Module, got {type(module).__name__}")
        delta = float(delta)
        if not delta > 0:
            raise ValueError(f"Residual: `delta` must be > 0, got {delta}")
        self.module, self.delta = module, delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.module(x)
        if y.shape != x.shape:
            raise ValueError(f"Residual: the branch maps a {tuple(x.shape)} input to {tuple(y.shape)}; "
                             "a residual layer needs the shape kept (use a projection layer outside Residual)")
        return x + self.delta * y

    def extra_repr(self) -> str:
        return f"delta={self.delta:g}"
