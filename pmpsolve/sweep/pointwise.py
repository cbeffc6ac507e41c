"""The user's f, L and Phi evaluated at many points at once, and the Hamiltonian.

Shapes: a batch of P points carries one time each (``t`` [P]) and one control
each (``u`` [P, m]); states and co-states are [P, *B, K, n] where K is the
sample axis. The user's functions are written for one time (t 0-d): when f or
L read t, the P points are mapped with ``torch.func.vmap`` so that each call
sees its own 0-d t (``ControlProblem.check`` made sure the functions allow it);
when they do not (``reads_time``), one plain call takes all P points, x and u
being batched over any leading dimensions (the API contract), which saves
vmap's ~0.1 ms of dispatch per call.

Hamiltonian in the paper's scaling (docs/theory.md, scaling convention): the K samples form
one concatenated state, J is their mean, so

    H(t, x, p, u) = sum_i p_i . f(t, x_i, u) - (1/K) sum_i L(t, x_i, u),

and the co-state P_T = -grad_{X_T} J carries the 1/K of each sample.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import torch

from ..problem import ControlProblem
from .reduce import SampleReducer

__all__ = ["PointwiseProblem", "hinge_gradient"]


class PointwiseProblem:
    """A ControlProblem bound to one dtype and device, with batched evaluations."""

    def __init__(self, problem: ControlProblem, dtype: torch.dtype, device):
        problem.check(dtype, device)
        self.problem = problem
        self.dtype, self.device = dtype, torch.device(device)
        self.x0 = problem.initial_state(dtype, device)  # [K, n]
        self.num_samples, self.state_dim = self.x0.shape
        #: every sum and mean over the samples (one process: the identity; see pmpsolve.sweep.reduce)
        self.reducer = SampleReducer(self.num_samples)
        self.control_dim = problem.control_dim
        self.has_running_cost = problem.running_cost is not None
        #: whether f, L read t (else a batch of times needs no vmap)
        self.dynamics_reads_time = reads_time(problem.dynamics, self.x0, problem.control_dim)
        self.cost_reads_time = self.has_running_cost and reads_time(problem.running_cost, self.x0,
                                                                    problem.control_dim)
        self._hinges_read_control: Optional[bool] = None  # ``hinges_read_control``, probed once
        self.batched_time = problem.batched_time  # f, L and the hinges take t [P] as it is: no vmap

    # ---------------------------------------------------------- user functions
    def dynamics(self, t: torch.Tensor, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """f at t (0-d, or [P] with x [P, ..., n] and u [P, m] or [m]) -> like x."""
        return self._map(self.problem.dynamics, t, x, u, self.dynamics_reads_time)

    def running_cost(self, t: torch.Tensor, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """L per sample -> x.shape[:-1] (zeros when the problem has none)."""
        if not self.has_running_cost:
            return x.new_zeros(x.shape[:-1])
        return self._map(self.problem.running_cost, t, x, u, self.cost_reads_time)

    def dynamics_and_running_cost(self, t: torch.Tensor, x: torch.Tensor, u: torch.Tensor
                                  ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(f, L) as ``dynamics`` and ``running_cost`` give them, from one map over the points when t is
        [P] (a vmap costs ~0.1 ms of dispatch on the CPU: the shooting sweep's stages pay it once)."""
        if not self.has_running_cost:
            return self.dynamics(t, x, u), x.new_zeros(x.shape[:-1])
        problem = self.problem
        return self._map(lambda t, x, u: (problem.dynamics(t, x, u), problem.running_cost(t, x, u)), t, x, u,
                         self.dynamics_reads_time or self.cost_reads_time)

    def terminal_cost(self, x: torch.Tensor) -> torch.Tensor:
        """Phi per sample -> x.shape[:-1] (zeros when the problem has none)."""
        if self.problem.terminal_cost is None:
            return x.new_zeros(x.shape[:-1])
        return self.problem.terminal_cost(x)

    def with_controls(self, u: torch.Tensor, x_shape: torch.Size):
        """``dynamics_and_running_cost`` (``dynamics`` alone when there is no running cost) for points with
        fixed controls u [P, m] and states of shape ``x_shape`` [P, ..., n], as (fn, reads_time): fn(t, x)
        -> (f, L) or f, with t [P] when reads_time, else any one of the points' times (f and L do not read
        it). The control is expanded once, not at every call of a right-hand side that evaluates hundreds
        of times per sweep with the same u."""
        u_full = _expand_control(u, torch.empty(x_shape, device="meta"), batched=True)
        if u_full.numel() <= self.materialise_controls:
            # a stride-0 u makes every matmul in f or L a batch of tiny products (u @ B.T: 3.5x slower at
            # [200, 3, 5, 1], measured); stored once, it folds into one. Large batches keep the view
            # (problems/sine.py reads the one control from it: one matmul over all samples).
            u_full = u_full.contiguous()
        problem = self.problem
        if not self.has_running_cost:
            fn, reads_t = problem.dynamics, self.dynamics_reads_time
        else:
            fn = lambda t, x, u: (problem.dynamics(t, x, u), problem.running_cost(t, x, u))  # noqa: E731
            reads_t = self.dynamics_reads_time or self.cost_reads_time
        if not reads_t:
            return (lambda t, x: fn(t, x, u_full)), False
        return (lambda t, x: self._map_expanded(fn, t, x, u_full, True, self.batched_time)), True

    def _map(self, fn, t, x, u, reads_t: bool = True):
        return self._map_expanded(fn, t, x, _expand_control(u, x, batched=t.ndim > 0), reads_t, self.batched_time)

    @staticmethod
    def _map_expanded(fn, t, x, u_full, reads_t: bool, batched: bool = False):
        if t.ndim == 0:
            return fn(t, x, u_full)
        if not reads_t:  # fn ignores t: one call over all points (x, u share their leading dims)
            return fn(t.reshape(-1)[0], x, u_full)
        if batched:  # fn takes the points' times as they are (``ControlProblem.batched_time``)
            return fn(t, x, u_full)
        # Every point at its own time, always: whether f or L read t cannot be told from outside
        # (torch.where(t < 1, ...) carries no gradient to t). vmap gives each call a 0-d t; the
        # problem checked on construction that the functions allow it.
        points = t.shape
        flat = lambda a: a.reshape((-1,) + a.shape[len(points):])  # noqa: E731
        out = torch.func.vmap(fn)(t.reshape(-1), flat(x), flat(u_full))
        if isinstance(out, tuple):
            return tuple(o.reshape(points + o.shape[1:]) for o in out)
        return out.reshape(points + out.shape[1:])

    # -------------------------------------------------------------- Hamiltonian
    def hamiltonian(self, t, x, p, u, *, with_grad_x: bool = False, create_graph: bool = False
                    ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """H summed over the K samples, f, and optionally grad_x H.

        Args:
            t: 0-d or [P]; x, p: [(P,) *B, K, n]; u: [(P,) m].
            with_grad_x: also return grad_x H [(P,) *B, K, n] (one reverse pass).
            create_graph: keep grad_x H differentiable (needed to maximise the
                co-state penalty of the augmented Hamiltonian over u).
        Returns:
            H [(P,) *B], f [(P,) *B, K, n], grad_x H or None.
        """
        if with_grad_x and not x.requires_grad:
            x = x.detach().requires_grad_(True)
        with torch.set_grad_enabled(True) if with_grad_x else contextlib.nullcontext():
            f = self.dynamics(t, x, u)
            H = self.reducer.sum_states(p * f)
            if self.has_running_cost:
                H = H - self.reducer.sum_costs(self.running_cost(t, x, u)) / self.reducer.num_samples
            if not with_grad_x:
                return H, f, None
            if not H.requires_grad:  # neither f nor L reads x
                return H, f, torch.zeros_like(x)
            (gx,) = torch.autograd.grad(H.sum(), x, create_graph=create_graph, allow_unused=True)
        return H, f, torch.zeros_like(x) if gx is None else gx

    #: ``with_controls`` stores the expanded controls when they have at most this many elements.
    materialise_controls = 2 ** 16

    #: Elements of x that ``point_blocks`` puts in one block (as ``IntervalHamiltonian.block_elements``).
    block_elements = 2 ** 17

    def point_blocks(self, t: torch.Tensor, x: torch.Tensor) -> list:
        """Slices of the first axis of a batch of points (t [R, ...], x [R, ..., K, n]) that keep about
        ``block_elements`` elements of x each: one-shot evaluations over all points (the interval data,
        the gain of a step, the co-state's end slopes) run block by block, so that the intermediates
        (the sine network's W x: 5 x the states) stay cache-sized instead of hundreds of MB (3x faster at
        K = 10 000, measured). Every result is per point, so the blocks give the same numbers bit for bit,
        provided a block holds at least 2 points: a sum with a single output is split across threads
        (ATen's two-pass reduction), one with several outputs is not. One block (the whole batch, not a
        slice) when it fits."""
        R = x.shape[0]
        per_row = max(1, x[0].numel()) if R else 1
        fewest = 2 if t.ndim < 2 or t[0].numel() < 2 else 1  # rows that make 2 points
        rows = max(self.block_elements // per_row, fewest)
        if rows >= R:
            return [slice(None)]
        starts = list(range(0, R, rows))
        if R - starts[-1] < fewest:  # a last block of one point joins the one before
            starts.pop()
        return [slice(a, b) for a, b in zip(starts, starts[1:] + [R])]

    def linearisation(self, t, x, u) -> Tuple[torch.Tensor, torch.Tensor]:
        """A = df/dx [..., K, n, n] (A[..., i, j] = df_i/dx_j) and b = (1/K) grad_x L [..., K, n].

        The co-state equation is linear in P: P' = -A^T P + b (eq. 6). One reverse pass
        per state component, each over all points at once.
        """
        x = x.detach().requires_grad_(True)
        n = x.shape[-1]
        with torch.enable_grad():
            f = self.dynamics(t, x, u)
            rows = []
            for i in range(n if f.requires_grad else 0):
                (g,) = torch.autograd.grad(f[..., i].sum(), x, retain_graph=True, allow_unused=True)
                rows.append(torch.zeros_like(x) if g is None else g)
            A = torch.stack(rows, dim=-2) if rows else x.new_zeros(x.shape + (n,))
            b = torch.zeros_like(x)
            if self.has_running_cost:
                L = self.running_cost(t, x, u)
                if L.requires_grad:
                    (g,) = torch.autograd.grad(L.sum(), x, allow_unused=True)
                    b = torch.zeros_like(x) if g is None else g / self.reducer.num_samples
        return A.detach(), b.detach()

    @property
    def has_hinges(self) -> bool:
        """Whether the running cost declares kinks between the nodes (``ControlProblem.running_cost_hinges``)."""
        return self.has_running_cost and self.problem.running_cost_hinges is not None

    @property
    def hinges_read_control(self) -> bool:
        """Whether a declared hinge reads u (a mixed path constraint): then the kink of max(0, a) moves
        with u and enters grad_u H too (``update.hamiltonian.hinge_correction``). One call at x0, u = 0."""
        if not self.has_hinges:
            return False
        if self._hinges_read_control is None:
            u = self.x0.new_zeros(self.control_dim).requires_grad_(True)
            t = self.x0.new_zeros(())
            with torch.enable_grad():
                a, w = self._map(self.problem.running_cost_hinges, t, self.x0.detach(), u)
            self._hinges_read_control = bool(a.requires_grad or torch.as_tensor(w).requires_grad)
        return self._hinges_read_control

    def hinge_values(self, t, x, u) -> Tuple[torch.Tensor, torch.Tensor]:
        """a and w of the declared hinges (``ControlProblem.running_cost_hinges``) at the points, each
        [..., K, c] (points as in ``running_cost``)."""
        a, w = self._map(self.problem.running_cost_hinges, t, x, u)
        return a, torch.as_tensor(w, dtype=a.dtype, device=a.device).expand_as(a)

    def hinge_linearisation(self, t, x, u) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The kinked part of b = (1/K) grad_x L, for a running cost that declares
        sum_j w_j max(0, a_j)^2 / 2 (``ControlProblem.running_cost_hinges``):

            (1/K) grad_x of it = sum_j max(0, a_j) G_j + max(0, a_j)^2 H_j,
            G_j = w_j grad_x a_j / K,  H_j = grad_x w_j / (2 K),

        a [..., K, c], G and H [..., K, c, n]: smooth between the nodes, so a co-state strategy may keep
        them as polynomials and add the kinks exactly (``hinge_gradient``). Points as in ``linearisation``.
        """
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            a, w = self._map(self.problem.running_cost_hinges, t, x, u)
            w = w.expand_as(a)
            K = self.reducer.num_samples

            def rows(values):  # d values[..., j] / dx for every component j: [..., K, c, n]
                out = []
                for j in range(values.shape[-1]):
                    g = (torch.autograd.grad(values[..., j].sum(), x, retain_graph=True, allow_unused=True)[0]
                         if values.requires_grad else None)
                    out.append(torch.zeros_like(x) if g is None else g)
                return torch.stack(out, dim=-2) if out else x.new_zeros(x.shape[:-1] + (0,) + x.shape[-1:])

            G = w.detach().unsqueeze(-1) * rows(a) / K
            H = rows(w) / (2 * K)
        return a.detach(), G.detach(), H

    def costate_terminal(self, x_final: torch.Tensor) -> torch.Tensor:
        """P_T = -grad_{X_T} mean_i Phi(X_T^i), [K, n]."""
        if self.problem.terminal_cost is None:
            return torch.zeros_like(x_final)
        x = x_final.detach().requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(self.reducer.mean_costs(self.terminal_cost(x)), x)
        return -g


class _TimeProbe(torch.Tensor):
    """A time that notes any torch operation on it (``reads_time``)."""

    touched = False

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        _TimeProbe.touched = True
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))


def reads_time(fn, x0: torch.Tensor, control_dim: int) -> bool:
    """Whether ``fn(t, x, u)`` reads t: one call with a t that notes every torch operation on it (an
    arithmetic op, ``float(t)``, ``t.item()``, ``math.sin(t)`` all go through one). One call tells for
    all: the functions pass ``ControlProblem.check``'s vmap over t, so their operations cannot depend
    on the values (vmap refuses data-dependent Python control flow)."""
    t = torch.zeros((), dtype=x0.dtype, device=x0.device).as_subclass(_TimeProbe)
    _TimeProbe.touched = False
    try:
        with torch.no_grad():
            fn(t, x0, x0.new_zeros(x0.shape[:-1] + (control_dim,)))
    except Exception:  # noqa: BLE001 - whatever the call does with the probe: treat t as read (vmap always)
        return True
    finally:
        touched, _TimeProbe.touched = _TimeProbe.touched, False
    return touched


def _expand_control(u: torch.Tensor, x: torch.Tensor, batched: bool) -> torch.Tensor:
    """u [m] or [P, m] -> [..., m] with the leading dims of x (a view, no copy).

    A batched u [P, m] pairs its first axis with the first axis of x [P, ..., n].
    """
    lead = x.shape[:-1]
    if batched and u.ndim == 2:
        u = u.reshape((u.shape[0],) + (1,) * (len(lead) - 1) + (u.shape[-1],))
    return u.expand(lead + (u.shape[-1],))


def hinge_gradient(a: torch.Tensor, G: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """sum_j max(0, a_j) G_j + max(0, a_j)^2 H_j [..., n] for a [..., c], G, H [..., c, n]: the kinked part of
    (1/K) grad_x L at given a, G, H (``PointwiseProblem.hinge_linearisation``)."""
    r = torch.clamp(a, min=0).unsqueeze(-1)
    return (r * (G + r * H)).sum(-2)
