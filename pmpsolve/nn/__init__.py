"""Training networks by the maximum principle (paper section 4, Alg. 3; docs/networks.md).

``Optimizer`` (and its short forms ``EMSA``, ``MSA``, ``SQH``) is a ``torch.optim.Optimizer`` for a
``torch.nn.Sequential`` whose entries are the layers, running the update rules of ``pmp.solve``; ``Residual`` is the residual layer x + delta * f(x). ``DiscreteRule`` sets the
discrete-weight rule of parameters with a ``pmp.Finite`` set; ``StraightThrough`` and
``MagnitudePruning`` are the baselines for discrete and sparse weights (docs/discrete.md).

    >>> import torch, pmpsolve as pmp
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(),
    ...                             pmp.nn.Residual(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh()), 0.5),
    ...                             torch.nn.Linear(8, 2))
    >>> opt = pmp.nn.EMSA(model)
"""
from .baselines import MagnitudePruning, StraightThrough
from .discrete import DiscreteRule
from .layers import Residual
from .ocnopt import OCNOpt
from .optim import EMSA, MSA, SQH, Optimizer

__all__ = ["Residual", "Optimizer", "EMSA", "MSA", "SQH", "OCNOpt", "DiscreteRule", "StraightThrough", "MagnitudePruning"]
