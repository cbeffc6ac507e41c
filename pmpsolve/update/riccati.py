"""The backward pass's loop over the mesh intervals (``pmpsolve.update.ddp``, step 2), scripted.

A module of its own without ``from __future__ import annotations``: TorchScript reads the annotations.
Scripted lazily (``riccati_loop``), so that importing pmpsolve does not pay the compilation.
"""
import functools
import warnings
from typing import List, Tuple

import torch

from .boxqp import box_qp, restricted

__all__ = ["riccati_loop"]


@torch.jit.ignore
def _box_gains(Quu: torch.Tensor, qu: torch.Tensor, Qux: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor,
               start: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """k and K for several boxed controls: the projected-Newton QP (``boxqp``); the clamped rows of K are
    zero (Tassa et al. 2014, sec. III.C)."""
    result = box_qp(Quu, qu, lower, upper, start)
    free = result.free
    K = -torch.linalg.solve(restricted(Quu, free), torch.where(free[:, None], Qux, torch.zeros_like(Qux)))
    return result.solution, K


def _riccati(Z: torch.Tensor, H: torch.Tensor, G: torch.Tensor, V: torch.Tensor, lengths: torch.Tensor, mu: float,
             boxed: bool, lower: torch.Tensor, upper: torch.Tensor, start: torch.Tensor
             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The loop of ``ddp.backward_pass``, sequential over the intervals by nature: about 25 small operations
    per interval (the intervals' matrices unbound into lists once, the results stacked after the loop,
    the positive-definiteness checked after it from the stored Q_uu), scripted (TorchScript: 2.5x faster
    than the same loop in Python at N = 200, D = 2, where dispatching the operations is the whole cost).
    No host sync but in the box QP of several controls. Returns k [N, m], K [N, m, D], q_u [N, m],
    Q_uu [N, m, m] (regularised) and the largest shift of mu (in Q_uu / h_n) a Q_uu needed (0-d)."""
    N, D, m = Z.shape[0], Z.shape[1], G.shape[1]
    eye_D = torch.eye(D, dtype=Z.dtype, device=Z.device)
    Zs = Z.unbind(0)
    ZTs = Z.transpose(-1, -2).unbind(0)
    Hs = H.unbind(0)
    Gs = torch.cat([torch.zeros(N, D, dtype=G.dtype, device=G.device), G], 1).unbind(0)  # (0, G_n)
    shifts: List[float] = (mu * lengths).tolist()
    s = torch.zeros(D, dtype=Z.dtype, device=Z.device)
    ks: List[torch.Tensor] = []
    Ks: List[torch.Tensor] = []
    qus: List[torch.Tensor] = []
    Quus: List[torch.Tensor] = []
    for i in range(N):
        n = N - 1 - i
        Q = torch.addmm(Hs[n], ZTs[n], V @ Zs[n])
        q = torch.addmv(Gs[n], ZTs[n], s)
        Quu, Qux, qu = Q[D:, D:], Q[D:, :D], q[D:]
        Quu.diagonal().add_(shifts[n])  # Levenberg-Marquardt, scaled by h_n as Q_uu is
        if m == 1:  # one control: a division; on a box the QP's minimiser is the clamped Newton step
            gains = torch.cat([qu.unsqueeze(1), Qux], 1).div_(Quu).neg_()
            k, K = gains[:, 0], gains[:, 1:]
            if boxed:
                free = (k > lower[n]) & (k < upper[n])
                k = torch.minimum(torch.maximum(k, lower[n]), upper[n])
                K = K * free.unsqueeze(1)
        elif not boxed:
            factor, _ = torch.linalg.cholesky_ex(Quu)  # not positive definite: seen after the loop
            gains = torch.cholesky_solve(torch.cat([qu.unsqueeze(1), Qux], 1), factor).neg_()
            k, K = gains[:, 0], gains[:, 1:]
        else:
            k, K = _box_gains(Quu, qu, Qux, lower[n], upper[n], start[n])
        ks.append(k)
        Ks.append(K)
        qus.append(qu)
        Quus.append(Quu)
        W = torch.cat([eye_D, K])  # [D + m, D]
        V = W.t() @ (Q @ W)
        s = torch.mv(W.t(), torch.addmv(q, Q[:, D:], k))
    Quu_all = torch.stack(Quus[::-1])
    if m == 1:
        smallest = Quu_all[:, 0, 0]
    else:  # on a box, Q_uu on the free set is what must be positive definite; all of it is checked here
        smallest = torch.linalg.eigvalsh(Quu_all)[:, 0]
    # a singular Q_uu (no curvature in u, e.g. Gauss-Newton without running cost) is deficient too: its
    # gains divide by zero
    singular = (smallest <= 0).to(smallest.dtype) * 1e-30
    deficiency = (torch.clamp(-smallest / lengths, min=0.0) + singular).max()
    return torch.stack(ks[::-1]), torch.stack(Ks[::-1]), torch.stack(qus[::-1]), Quu_all, deficiency


@functools.lru_cache(maxsize=None)
def riccati_loop():
    """``_riccati`` compiled by TorchScript (once), or the Python function itself where TorchScript is not
    available. torch 2.13 marks ``torch.jit.script`` deprecated; its DeprecationWarning is silenced here
    (the fallback keeps DDP working once it is gone)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.script(_riccati)
    except Exception:  # noqa: BLE001 - any failure to compile: the same loop in Python (2x slower)
        return _riccati
