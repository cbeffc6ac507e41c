"""Gradient baselines: torch.optim (SGD, Adagrad, Adam) on the same problem and discretisation.

The controls are an ``nn.Parameter`` [N, m]; J is computed by the same
forward sweep the PMP methods use (the same adaptive solver, mesh and jump
points), with the autograd graph kept through the solver steps, and
``J.backward()`` back-propagates through that discretisation
(discretise-then-optimise). Box constraints are kept by projecting after each
step. This is what a user would write instead of ``pmpsolve.solve``.
"""
from __future__ import annotations

import time
from typing import Callable, Dict, List, NamedTuple, Optional, Union

import torch

from .sweep.mesh import make_mesh
from .sweep.pointwise import PointwiseProblem
from .problem import ControlProblem
from .arguments import initial_controls, progress_bar
from .options import ODE
from .sweep.sweeps import Sweeper

__all__ = ["OPTIMIZERS", "BaselineRecord", "BaselineResult", "train"]

OPTIMIZERS: Dict[str, Callable] = {
    "sgd": torch.optim.SGD,
    "adagrad": torch.optim.Adagrad,
    "adam": torch.optim.Adam,
}


class BaselineRecord(NamedTuple):
    iteration: int
    cost: float  # J of the controls before the step of this iteration (iteration 0: the initial J)
    elapsed: float  # seconds since the start (training only: callbacks are not counted)


class BaselineResult(NamedTuple):
    controls: torch.Tensor  # [N, m] after the last step
    cost: float  # J of ``controls``, re-simulated
    history: List[BaselineRecord]


def train(problem: ControlProblem, *, optimizer: str = "adam", lr: float = 1e-3, iterations: int = 100,
          mesh: Union[int, torch.Tensor] = 200, init=None, ode_method: str = "dopri5", rtol: Optional[float] = None,
          atol: Optional[float] = None, dtype: Optional[torch.dtype] = None, device=None, progress: bool = False,
          callback: Optional[Callable[[BaselineRecord, torch.Tensor], Optional[bool]]] = None) -> BaselineResult:
    """Minimise J by ``iterations`` steps of a torch.optim optimiser (full batch).

    Args mirror ``pmpsolve.solve``; ``optimizer`` is one of ``OPTIMIZERS`` and ``lr`` its
    learning rate. ``callback(record, controls)`` runs after every evaluation of J
    (return True to stop); its time is excluded from ``elapsed``.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown `optimizer` {optimizer!r}; choose one of {sorted(OPTIMIZERS)}")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"`lr` must be a number > 0, got {lr!r}")
    dtype = torch.float64 if dtype is None else dtype
    device = torch.device("cpu" if device is None else device)
    pw = PointwiseProblem(problem, dtype, device)
    nodes = make_mesh(mesh, problem.horizon, dtype, device)
    ode = ODE(ode_method, rtol, atol).resolved(dtype)  # the tolerances of solve, by dtype
    sweeper = Sweeper(pw, nodes, method=ode.method, rtol=ode.rtol, atol=ode.atol)
    u = torch.nn.Parameter(initial_controls(init, problem, nodes.numel() - 1, problem.control_dim, dtype, device))
    opt = OPTIMIZERS[optimizer]([u], lr=lr)
    history: List[BaselineRecord] = []
    excluded = 0.0
    start = time.perf_counter()
    bar = progress_bar(progress, iterations, problem.name, optimizer)
    try:
        for k in range(iterations + 1):
            opt.zero_grad()
            J = sweeper.forward(u, differentiable=k < iterations, iteration=k, samples=False).cost
            record = BaselineRecord(k, float(J.detach()), time.perf_counter() - start - excluded)
            history.append(record)
            t0 = time.perf_counter()
            stop = callback is not None and callback(record, u.detach())
            excluded += time.perf_counter() - t0
            if k == iterations or stop:
                break
            J.backward()
            opt.step()
            with torch.no_grad():
                u.copy_(problem.controls.project(u))
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"J={record.cost:.6g}")
    finally:
        if bar is not None:
            bar.close()
    return BaselineResult(u.detach().clone(), history[-1].cost, history)
