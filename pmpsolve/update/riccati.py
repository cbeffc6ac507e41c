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
             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The loop of ``ddp.backward_pass``, sequential over the intervals by nature, scripted (TorchScript:
    2.5x faster than the same loop in Python at N = 200, D = 2, where dispatching the operations is the
    whole cost). No host sync but in the box QP of several controls. Returns k [N, m], K [N, m, D],
    q_u [N, m], Q_uu [N, m, m] (regularised), the largest shift of mu (in Q_uu / h_n) a Q_uu needed (0-d)
    and V_0 [D, D], the value's Hessian at the first node.

    Each operation on these tiny matrices costs about a microsecond whatever its size, so the loop is
    arranged for few of them (about 10 per interval for one control): the value's gradient s rides
    along as an extra column of V, [V | s], and Q with q as the matching extra column of
    [Q | q] = [H | (0, G_n)] + Z' [V | s] Zaug (Zaug = [Z_x 0 Z_u; 0 1 0], columns x, q, u: both
    from one product), and the value update uses the gains' defining equation: on the free set
    Q_uu K = -Q_ux and Q_uu k = -q_u (Q_uu regularised), elsewhere K = 0, so that

        V <- W' Q W = Q_xx + Q_xu K,   s <- W' (q + Q w) = q_x + Q_xu k,

    one product for [V | s] <- [Q_xx | q_x | Q_xu] [I; K | k] (in exact arithmetic the same as the
    expanded form; in floating point within rounding of it)."""
    N, D, m = Z.shape[0], Z.shape[1], G.shape[1]
    # Zaug [N, D + 1, D + 1 + m] and [H | (0, G)] [N, D + m, D + 1 + m], columns ordered x, q, u
    Zaug = torch.zeros(N, D + 1, D + 1 + m, dtype=Z.dtype, device=Z.device)
    Zaug[:, :D, :D] = Z[:, :, :D]
    Zaug[:, :D, D + 1:] = Z[:, :, D:]
    Zaug[:, D, D] = 1.0
    Hq = torch.cat([H[:, :, :D], torch.cat([torch.zeros(N, D, dtype=G.dtype, device=G.device), G], 1).unsqueeze(2),
                    H[:, :, D:]], 2)
    Zaugs = Zaug.unbind(0)
    ZTs = Z.transpose(-1, -2).unbind(0)
    Hqs = Hq.unbind(0)
    shifts: List[float] = (mu * lengths).tolist()
    eye_m = torch.eye(m, dtype=Z.dtype, device=Z.device)
    eye_x = torch.eye(D + 1, dtype=Z.dtype, device=Z.device)
    Vs = torch.cat([V, torch.zeros(D, 1, dtype=Z.dtype, device=Z.device)], 1)  # [V | s], s_N = 0
    lowers = lower.unbind(0) if boxed and m > 1 else []
    uppers = upper.unbind(0) if boxed and m > 1 else []
    if boxed and m == 1:
        # the bounds of k as bounds of [K | k] (K unbounded); the last column: k's, kept where k is clamped
        inf = torch.full((N, D), float("inf"), dtype=Z.dtype, device=Z.device)
        low_rows = torch.cat([-inf, lower], 1).unsqueeze(1).unbind(0)
        high_rows = torch.cat([inf, upper], 1).unsqueeze(1).unbind(0)
        last = torch.arange(D + 1, device=Z.device) == D
    else:
        low_rows = high_rows = []
        last = torch.zeros(0, dtype=torch.bool, device=Z.device)
    gains: List[torch.Tensor] = []  # [K | k] [m, D + 1] per interval
    rows: List[torch.Tensor] = []  # the u rows of [Q | q] [m, D + 1 + m] (Q_uu unregularised)
    for i in range(N):
        n = N - 1 - i
        # (narrow, not [:, a:b]: TorchScript makes the latter two operations)
        Qq = torch.addmm(Hqs[n], ZTs[n], torch.mm(Vs, Zaugs[n]))  # [Q | q], columns x, q, u
        u_rows = Qq.narrow(0, D, m)
        if m == 1:  # one control: a division; on a box the QP's minimiser is the clamped Newton step
            # [K | k] = -[Q_ux | q_u] / Q_uu
            Kk = u_rows.narrow(1, 0, D + 1) / (-shifts[n] - u_rows.narrow(1, D + 1, 1))
            if boxed:  # k clamped to its box; K zeroed where that moved k (at the bound exactly: free)
                clamped = torch.clamp(Kk, low_rows[n], high_rows[n])
                Kk = clamped * ((clamped == Kk).all(1, keepdim=True) | last)
        elif not boxed:
            Quu = torch.addmm(u_rows[:, D + 1:], eye_m, eye_m, alpha=shifts[n])  # + mu h_n I
            factor, _ = torch.linalg.cholesky_ex(Quu)  # not positive definite: seen after the loop
            Kk = torch.cholesky_solve(u_rows[:, :D + 1], factor).neg_()
        else:
            Quu = torch.addmm(u_rows[:, D + 1:], eye_m, eye_m, alpha=shifts[n])
            k, K = _box_gains(Quu, u_rows[:, D], u_rows[:, :D], lowers[n], uppers[n], start[n])
            Kk = torch.cat([K, k.unsqueeze(1)], 1)
        gains.append(Kk)
        rows.append(u_rows)
        Vs = torch.mm(Qq.narrow(0, 0, D), torch.cat([eye_x, Kk]))  # [Q_xx | q_x] + Q_xu [K | k]
    Kks = torch.stack(gains[::-1])  # [N, m, D + 1]
    u_all = torch.stack(rows[::-1])  # [N, m, D + 1 + m]
    Quu_all = u_all[:, :, D + 1:] + (mu * lengths).view(N, 1, 1) * eye_m
    if m == 1:
        smallest = Quu_all[:, 0, 0]
    else:  # on a box, Q_uu on the free set is what must be positive definite; all of it is checked here
        smallest = torch.linalg.eigvalsh(Quu_all)[:, 0]
    # a singular Q_uu (no curvature in u, e.g. Gauss-Newton without running cost) is deficient too: its
    # gains divide by zero
    singular = (smallest <= 0).to(smallest.dtype) * 1e-30
    deficiency = (torch.clamp(-smallest / lengths, min=0.0) + singular).max()
    return Kks[:, :, D], Kks[:, :, :D], u_all[:, :, D], Quu_all, deficiency, Vs.narrow(1, 0, D)


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
