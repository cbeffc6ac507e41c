"""Training networks by the maximum principle (paper section 4, Alg. 3; docs/networks.md).

    >>> import torch, pmpsolve as pmp
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(),
    ...                             pmp.nn.Residual(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh()), 0.5),
    ...                             torch.nn.Linear(8, 2))
"""
from .layers import Residual

__all__ = ["Residual"]
