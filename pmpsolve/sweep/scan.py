"""Chaining N affine maps y -> A_j y + b_j by an associative scan: log2(N) batched compositions.

Both parallel-in-time sweeps end in such a chain: the co-state's transition maps from T back
to every node (``costate.ParallelScanCostate``, a suffix chain) and the multiple-shooting
Newton correction from t_0 forward (``shooting``, a prefix chain). Hillis-Steele: after the
step with stride d, entry j holds the composition of the 2d maps ending (or starting) at j.
"""
from __future__ import annotations

from typing import Tuple

import torch

__all__ = ["affine_prefix_scan", "affine_suffix_scan"]


def affine_prefix_scan(A: torch.Tensor, b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """G_j = F_j o F_{j-1} o ... o F_0 for F_j(y) = A_j y + b_j: (A_j ... A_0, G_j(0)).

    A [N, *B, n, n], b [N, *B, n] -> the same shapes; y_{j+1} = G_j(y_0) for y_{j+1} = F_j(y_j).
    """
    N, d = A.shape[0], 1
    while d < N:  # entry j >= d takes in the 2d maps ending at j: G_j o G_{j-d}
        tail_A = A[d:]
        b = torch.cat([b[:d], (tail_A @ b[: N - d].unsqueeze(-1)).squeeze(-1) + b[d:]])
        A = torch.cat([A[:d], tail_A @ A[: N - d]])
        d *= 2
    return A, b


def affine_suffix_scan(A: torch.Tensor, b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """G_j = F_j o F_{j+1} o ... o F_{N-1} for F_j(y) = A_j y + b_j: (A_j ... A_{N-1}, G_j(0)).

    A [N, *B, n, n], b [N, *B, n] -> the same shapes; y_j = G_j(y_N) for y_j = F_j(y_{j+1}).
    """
    N, d = A.shape[0], 1
    while d < N:  # entry j < N - d takes in the 2d maps starting at j: G_j o G_{j+d}
        head_A, head_b = A[: N - d], b[: N - d]
        b = torch.cat([(head_A @ b[d:].unsqueeze(-1)).squeeze(-1) + head_b, b[N - d:]])
        A = torch.cat([head_A @ A[d:], A[N - d:]])
        d *= 2
    return A, b
