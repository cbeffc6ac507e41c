"""Small problems with closed-form answers, and network-training helpers, shared by the tests."""
import torch

import pmpsolve as pmp
from pmpsolve.nn.recording import CostateRecorder


def scalar_terminal(c: float = 5.0, T: float = 1.0, x0: float = 1.0) -> pmp.ControlProblem:
    """x' = u, J = 1/2 int u^2 + c/2 x_T^2. Optimum: u* = -c x0 / (1 + c T), J* = c x0^2 / (2 (1 + c T)).

    Basic MSA is u <- p = -c x_T, a map with slope -cT: it diverges for cT > 1.
    """
    return pmp.ControlProblem(lambda t, x, u: u.clone(), torch.tensor([x0], dtype=torch.float64), T, pmp.Reals(1),
                              terminal_cost=lambda x: 0.5 * c * x[..., 0] ** 2,
                              running_cost=lambda t, x, u: 0.5 * (u ** 2).sum(-1), name="scalar")


def scalar_terminal_optimum(c: float = 5.0, T: float = 1.0, x0: float = 1.0):
    return -c * x0 / (1 + c * T), c * x0 ** 2 / (2 * (1 + c * T))


def closure_for(opt, model, x, y):
    """The closure torch.optim.LBFGS takes: the batch's mean cross-entropy, backward, returned."""
    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss
    return closure


def recorded(model, x, y):
    """The parametrised layers {index: module} of a Sequential and their LayerRecords from one forward and
    one backward pass of the mean cross-entropy (the hooks are removed afterwards)."""
    layers = {n: m for n, m in enumerate(model) if any(True for _ in m.parameters())}
    rec = CostateRecorder(layers)
    with rec.recording():
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
    records = rec.records(list(layers))
    rec.remove()
    return layers, records
