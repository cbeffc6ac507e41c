"""J and its gradient for given piecewise-constant controls, by one forward and one backward sweep.

dJ/du_n = -int_{I_n} grad_u H(t, X_t, P_t, u_n) dt (the co-state gradient; paper
Prop. 2 in continuous time). Useful on its own (e.g. to check a model, or to
drive another optimiser) and as the reference the tests compare with finite
differences.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from .update.hamiltonian import IntervalHamiltonian, interval_data
from .update.maximisers import HamiltonianMaximiser
from .sweep.mesh import make_mesh
from .update.optimality import optimality
from .sweep.pointwise import PointwiseProblem
from .problem import ControlProblem
from .options import ODE
from .sweep.reduce import distributed_reducer, refuse_user_set
from .sweep.sweeps import Sweeper

__all__ = ["cost", "cost_gradient", "optimality_of"]


def _setup(problem, controls, mesh, ode_method, rtol, atol, dtype, device, quadrature=3, process_group=None):
    if not isinstance(problem, ControlProblem):
        raise TypeError(f"`problem` must be a pmpsolve.ControlProblem, got {type(problem).__name__}")
    u = torch.as_tensor(controls)
    dtype = torch.float64 if dtype is None else dtype  # as in solve: the controls' dtype does not decide
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point and not dtype.is_complex):
        raise TypeError(f"`dtype` must be a real floating torch dtype such as torch.float64, got {dtype!r}")
    device = torch.device(device) if device is not None else u.device
    u = u.to(dtype=dtype, device=device)
    if u.ndim != 2 or u.shape[1] != problem.control_dim:
        raise ValueError(f"`controls` must have shape [N, m] with m = {problem.control_dim}, got {tuple(u.shape)}")
    nodes = make_mesh(u.shape[0] if mesh is None else mesh, problem.horizon, dtype, device)
    if nodes.numel() - 1 != u.shape[0]:
        raise ValueError(f"`controls` has {u.shape[0]} rows but `mesh` has {nodes.numel() - 1} intervals")
    pw = PointwiseProblem(problem, dtype, device)
    ode = ODE(ode_method, rtol, atol).resolved(dtype)  # the tolerances of solve, by dtype
    if process_group is not None:  # x0 is this rank's shard; every sum over samples is all-reduced
        refuse_user_set(problem)
        settings = {"ode_method": ode.method, "rtol": ode.rtol, "atol": ode.atol, "dtype": str(dtype)}
        pw.reducer, _ = distributed_reducer(process_group, pw.num_samples, pw.state_dim, problem.control_dim,
                                            nodes, settings)
    sweeper = Sweeper(pw, nodes, method=ode.method, rtol=ode.rtol, atol=ode.atol, quadrature=quadrature)
    return pw, sweeper, u


def cost(problem: ControlProblem, controls: torch.Tensor, *, mesh: Union[int, torch.Tensor, None] = None,
         ode_method: str = "dopri5", rtol: Optional[float] = None, atol: Optional[float] = None,
         dtype: Optional[torch.dtype] = None, device=None,
         process_group: Optional[torch.distributed.ProcessGroup] = None) -> float:
    """J(u) for piecewise-constant controls u [N, m] on ``mesh`` (default: N uniform intervals).

    Computed in ``dtype`` (float64 unless given, whatever the dtype of ``controls``), like ``solve``.
    ``process_group``: as in ``solve`` (x0 is this rank's shard; J is over all ranks' samples).

    Example: the optimal control of x' = u, x(0) = 1, J = 5/2 x(1)^2 + 1/2 int u^2 is u = -5/6.
        >>> import torch, pmpsolve as pmp
        >>> problem = pmp.ControlProblem(lambda t, x, u: u.clone(), torch.tensor([1.0]), 1.0, pmp.Reals(1),
        ...                              terminal_cost=lambda x: 2.5 * x[..., 0] ** 2,
        ...                              running_cost=lambda t, x, u: 0.5 * (u ** 2).sum(-1))
        >>> round(pmp.cost(problem, torch.full((10, 1), -5 / 6)), 6)   # J* = 5/12
        0.416667
    """
    pw, sweeper, u = _setup(problem, controls, mesh, ode_method, rtol, atol, dtype, device,
                            process_group=process_group)
    return float(sweeper.forward(u, samples=False).cost)


def cost_gradient(problem: ControlProblem, controls: torch.Tensor, *, mesh: Union[int, torch.Tensor, None] = None,
                  ode_method: str = "dopri5", rtol: Optional[float] = None, atol: Optional[float] = None,
                  quadrature: int = 3, dtype: Optional[torch.dtype] = None, device=None,
                  process_group: Optional[torch.distributed.ProcessGroup] = None
                  ) -> Tuple[float, torch.Tensor]:
    """J(u) and dJ/du [N, m] (the gradient with respect to the N piecewise-constant values).

    Computed in ``dtype`` (float64 unless given, whatever the dtype of ``controls``); dJ/du has that dtype.
    ``process_group``: as in ``solve`` (both over all ranks' samples, the same on every rank).

    Example: at u = 0, J = 5/2 and dJ/du_n = h * 5 x(1) = 0.5 on each of 10 intervals.
        >>> import torch, pmpsolve as pmp
        >>> problem = pmp.ControlProblem(lambda t, x, u: u.clone(), torch.tensor([1.0]), 1.0, pmp.Reals(1),
        ...                              terminal_cost=lambda x: 2.5 * x[..., 0] ** 2,
        ...                              running_cost=lambda t, x, u: 0.5 * (u ** 2).sum(-1))
        >>> J, grad = pmp.cost_gradient(problem, torch.zeros(10, 1))
        >>> J, tuple(grad.shape), round(float(grad[0, 0]), 6)
        (2.5, (10, 1), 0.5)
    """
    pw, sweeper, u = _setup(problem, controls, mesh, ode_method, rtol, atol, dtype, device, quadrature,
                            process_group)
    fw = sweeper.forward(u)
    bw = sweeper.backward(u, fw)
    data = interval_data(pw, u, fw, bw, quadrature)
    return float(fw.cost), -IntervalHamiltonian(pw, data, 0.0).gradient(u)


def optimality_of(problem: ControlProblem, controls: torch.Tensor, *, mesh: Union[int, torch.Tensor, None] = None,
                  ode_method: str = "dopri5", rtol: Optional[float] = None, atol: Optional[float] = None,
                  quadrature: int = 3, dtype: Optional[torch.dtype] = None, device=None,
                  process_group: Optional[torch.distributed.ProcessGroup] = None) -> float:
    """The first-order optimality measure of controls u [N, m] (``pmpsolve.update.optimality``): what ``solve``
    compares with ``tol * max(1, min(|J|, |J(u^0)|))`` to say ``converged``.

    Example:
        >>> import torch, pmpsolve as pmp
        >>> p = pmp.ControlProblem(lambda t, x, u: u.clone(), torch.tensor([1.0]), 1.0, pmp.Reals(1),
        ...                        terminal_cost=lambda x: x[..., 0] ** 2)
        >>> pmp.optimality_of(p, torch.zeros(4, 1)) > 1.0   # dJ/du = 2 x_T = 2 on every interval
        True
    """
    pw, sweeper, u = _setup(problem, controls, mesh, ode_method, rtol, atol, dtype, device, quadrature,
                            process_group)
    fw = sweeper.forward(u)
    data = interval_data(pw, u, fw, sweeper.backward(u, fw), quadrature)
    return optimality(pw, data, problem.controls, HamiltonianMaximiser(problem.controls))
