"""Two interleaving half circles (the "two moons" classification problem), generated: no download.

The same construction as scikit-learn's ``make_moons`` (without depending on it): class 0
on the upper unit half circle, class 1 on the lower one shifted by (1, 0.5), plus Gaussian
noise. Used to check that ``pmp.nn.EMSA`` trains a network it was not tuned on.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

__all__ = ["two_moons"]


def two_moons(n: int, noise: float = 0.1, generator: Optional[torch.Generator] = None,
              dtype: torch.dtype = torch.float64) -> Tuple[torch.Tensor, torch.Tensor]:
    """``n`` points [n, 2] and labels [n] (int64, 0 or 1, random with equal probability)."""
    if int(n) < 1:
        raise ValueError(f"two_moons: n must be >= 1, got {n}")
    angle = torch.rand(n, generator=generator, dtype=torch.float64) * math.pi
    labels = torch.randint(0, 2, (n,), generator=generator)
    upper = torch.stack([torch.cos(angle), torch.sin(angle)], 1)
    lower = torch.stack([1 - torch.cos(angle), 0.5 - torch.sin(angle)], 1)
    points = torch.where(labels[:, None] == 0, upper, lower)
    points = points + noise * torch.randn(n, 2, generator=generator, dtype=torch.float64)
    return points.to(dtype), labels
