"""The one place that sums over samples (docs/theory.md, scaling convention).

The K samples of a problem share one control; their sweeps never talk to each other,
and everything the iteration needs from them is a sum (the Hamiltonian, its feasibility
penalties, the co-state's 1/K) or a mean (J). Every such reduction goes through a
``SampleReducer``, so that running the samples in several processes changes one class:
a reducer whose ``total`` all-reduces across ranks and whose ``num_samples`` is the
global K. In one process (``SampleReducer``) it is the identity.

Shapes: the sample axis of a state or co-state is dim -2 ([..., K, n]); of a per-sample
cost it is dim -1 ([..., K]).
"""
from __future__ import annotations

import torch

__all__ = ["SampleReducer"]


class SampleReducer:
    """Sums and means over the samples held in this process (all of them, here).

    Args:
        num_samples: K, the number of samples of the problem (the global count: the
            divisor of every mean, also where a process holds only some of them).
    """

    def __init__(self, num_samples: int):
        self.num_samples = int(num_samples)

    def sum_states(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over samples and state components of [..., K, n] -> [...] (the concatenated state)."""
        return x.sum(dim=(-1, -2))

    def sum_costs(self, c: torch.Tensor) -> torch.Tensor:
        """Sum of per-sample costs [..., K] -> [...]."""
        return c.sum(dim=-1)

    def mean_costs(self, c: torch.Tensor) -> torch.Tensor:
        """Mean of per-sample costs [K] -> 0-d, over all K samples."""
        return c.mean()

    def total(self, value: torch.Tensor) -> torch.Tensor:
        """A sum over this process's samples made global: the identity in one process (the hook where
        a multi-process reducer all-reduces, one fused buffer per evaluation)."""
        return value
