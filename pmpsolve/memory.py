"""The memory an iteration needs, estimated before the first sweep, and the check against what is free."""
from __future__ import annotations

import torch

__all__ = ["check_memory"]


def check_memory(N, K, n, m, quadrature, dtype, device) -> None:
    return None
