"""Linear-quadratic regulators: the one class with an exact answer (the Riccati equation)."""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch
from scipy.integrate import solve_ivp

import pmpsolve as pmp

__all__ = ["lqr", "lqr_samples", "random_lqr", "random_lq_data", "linear_quadratic_problem", "riccati_cost"]


def lqr() -> Tuple[pmp.ControlProblem, float]:
    """x1' = x2, x2' = -x1 + u, J = 1/2 int_0^5 (x1^2 + x2^2 + u^2) dt, x0 = (0, 1), u free.

    Reference J* = 0.673999 (Riccati; docs/theory.md).
    """

    def dynamics(t, x, u):
        return torch.stack([x[..., 1], -x[..., 0] + u[..., 0]], dim=-1)

    def running_cost(t, x, u):
        return 0.5 * ((x ** 2).sum(-1) + (u ** 2).sum(-1))

    problem = pmp.ControlProblem(dynamics, torch.tensor([0.0, 1.0], dtype=torch.float64), 5.0, pmp.Reals(1),
                                 running_cost=running_cost, name="lqr")
    return problem, 0.673999


def linear_quadratic_problem(A, B, Q, R, x0, horizon: float, S=None, name: str = "lq") -> pmp.ControlProblem:
    """x' = A x + B u, J = 1/2 x_T' S x_T + 1/2 int (x' Q x + u' R u) dt, u free."""
    A, B, Q, R = (torch.as_tensor(M, dtype=torch.float64) for M in (A, B, Q, R))
    S = torch.zeros_like(Q) if S is None else torch.as_tensor(S, dtype=torch.float64)

    def quadratic(v, M):  # v' M v per row, [..., k] -> [...]
        # summed by a product with ones: torch's CPU sum over a last axis of 2 or 3 doubles takes
        # ~10x longer (130 us against 14 us on [200, 5, 5, 2], torch 2.13; docs/guide.md)
        return ((v @ M.to(v)) * v) @ v.new_ones(v.shape[-1])

    def dynamics(t, x, u):
        return x @ A.to(x).T + u @ B.to(u).T

    def running_cost(t, x, u):
        return 0.5 * (quadratic(x, Q) + quadratic(u, R))

    def terminal_cost(x):
        return 0.5 * quadratic(x, S)

    return pmp.ControlProblem(dynamics, torch.as_tensor(x0, dtype=torch.float64), horizon, pmp.Reals(B.shape[1]),
                              terminal_cost=terminal_cost, running_cost=running_cost, name=name)


def riccati_cost(A, B, Q, R, x0, horizon: float, S=None) -> float:
    """J* = 1/2 x0' P(0) x0 from the Riccati equation -P' = A'P + PA - P B R^-1 B' P + Q, P(T) = S (scipy)."""
    A, B, Q, R, x0 = (np.asarray(M, dtype=float) for M in (A, B, Q, R, x0))
    n = A.shape[0]
    S = np.zeros((n, n)) if S is None else np.asarray(S, dtype=float)
    Rinv = np.linalg.inv(R)

    def rhs(t, p):
        P = p.reshape(n, n)
        return -(A.T @ P + P @ A - P @ B @ Rinv @ B.T @ P + Q).ravel()

    sol = solve_ivp(rhs, (horizon, 0.0), S.ravel(), method="DOP853", rtol=1e-12, atol=1e-14)
    P0 = sol.y[:, -1].reshape(n, n)
    return float(0.5 * x0 @ P0 @ x0)


def random_lq_data(n: int = 3, m: int = 2, seed: int = 0, terminal: bool = True):
    """The matrices of ``random_lqr``: (A, B, Q, R, S or None, x0) as numpy arrays."""
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(n, n)) / np.sqrt(n)
    B = rng.normal(size=(n, m))
    Qh = rng.normal(size=(n, n))
    Q = Qh @ Qh.T / n + 0.1 * np.eye(n)
    Rh = rng.normal(size=(m, m))
    R = Rh @ Rh.T / m + 0.5 * np.eye(m)
    S = np.eye(n) if terminal else None
    x0 = rng.normal(size=n)
    return A, B, Q, R, S, x0


def random_lqr(n: int = 3, m: int = 2, horizon: float = 2.0, seed: int = 0,
               terminal: bool = True) -> Tuple[pmp.ControlProblem, float]:
    """A random stable-ish LQR instance and its exact optimum from the Riccati equation."""
    A, B, Q, R, S, x0 = random_lq_data(n, m, seed, terminal)
    problem = linear_quadratic_problem(A, B, Q, R, x0, horizon, S=S, name=f"random_lqr(n={n}, m={m}, seed={seed})")
    return problem, riccati_cost(A, B, Q, R, x0, horizon, S=S)


def lqr_samples(samples: int = 100, spread: float = 0.5, seed: int = 0) -> Tuple[pmp.ControlProblem, float]:
    """The LQR of ``lqr()`` from K initial states sharing one control: J = mean_i J_i(u).

    x0_i = (0, 1) + spread * N(0, I). Exact optimum: the deviations e_i = x_i - mean_j x_j
    obey e' = A e whatever u is (B u is common), so J splits into the LQR of the mean
    state (Riccati) plus the uncontrolled cost of the deviations; A is a rotation here,
    so |e_i(t)| = |e_i(0)| and that cost is T/2 mean_i |e_i(0)|^2.
    """
    rng = np.random.default_rng(seed)
    x0 = np.array([0.0, 1.0]) + spread * rng.normal(size=(samples, 2))
    A, B, Q, R = np.array([[0.0, 1.0], [-1.0, 0.0]]), np.array([[0.0], [1.0]]), np.eye(2), np.eye(1)
    mean = x0.mean(axis=0)
    reference = riccati_cost(A, B, Q, R, mean, 5.0) + 0.5 * 5.0 * float(((x0 - mean) ** 2).sum(-1).mean())
    problem = linear_quadratic_problem(A, B, Q, R, x0, 5.0, name=f"lqr_samples(K={samples})")
    return problem, reference
