"""Sine approximation by a continuous-time network (paper Sec. 5, Fig. 1).

    dX/dt = tanh(W_t X + b_t),  X in R^5,  t in [0, 5],  controls u_t = (W_t, b_t): 30 numbers,
    X_0 = (x, x, x, x, x) with x ~ U[-pi, pi],  prediction = sum_i X_T^i,
    J = mean over samples of (prediction - sin x)^2  (+ an optional L2 regulariser of the weights).

Facts from the paper's reference code (LiQianxiao/MaxPrinciple-DeepLearning,
main_toy.py, config.yml, msalib/layers.py): a residual network
x_{n+1} = x_n + delta tanh(W_n x_n + b_n), 20 layers, delta = 0.25; loss =
mean squared error of the summed output plus reg * |theta_n|^2 / 2 per layer,
reg = 0.001; E-MSA with rho = 1.0, 10 L-BFGS-B iterations per layer from the
current weights plus U(-0.005, 0.005). Its config trains on 100 samples for
500 full-batch epochs; the paper's text uses 1000 training and 1000 test samples.

Controls are stored as u[..., :25] = W (row-major, W[i, j] = u[5 i + j]) and
u[..., 25:] = b.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

import pmpsolve as pmp

__all__ = ["sine_data", "sine_problem", "sine", "sine_initial_controls", "predict", "IntervalFlow", "SumReadout",
           "sine_network", "network_controls"]

DIM = 5
HORIZON = 5.0
CONTROL_DIM = DIM * DIM + DIM


def sine_data(num_samples: int = 1000, *, seed: int = 0, dtype=torch.float64) -> Tuple[torch.Tensor, torch.Tensor]:
    """Inputs x ~ U[-pi, pi] [K] and targets sin(x) [K]."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(num_samples, generator=g, dtype=torch.float64) * 2 - 1) * math.pi
    return x.to(dtype), torch.sin(x).to(dtype)


def _one_control(u: torch.Tensor) -> Optional[torch.Tensor]:
    """u [..., K, m] -> [..., m] when it is one control repeated over the K samples, else None.

    The engine passes the control expanded over the sample axis (a view with stride 0 there,
    pmpsolve/problem.py); reading that one row lets W x be a matrix product over the samples and
    the regulariser be computed once instead of K times. Any other u takes the general path.
    """
    if u.ndim >= 2 and u.shape[-2] > 1 and u.stride(-2) == 0:
        return u.select(-2, 0)
    return None


def _dynamics(t, x, u):
    shared = _one_control(u) if x.ndim >= 2 else None
    if shared is not None:
        # x [..., K, 5] @ W^T [..., 5, 5]: one matrix product per point over all samples (its
        # derivative in W too), 1.8x faster for the maximisation's double backward at K = 10 000
        # than the broadcast product below (measured)
        # W^T made contiguous: the layout (hence the rounding) of the batched product is then the same
        # for any number of points, so the engine's blocks give the one-pass numbers bit for bit.
        Wt = shared[..., : DIM * DIM].unflatten(-1, (DIM, DIM)).mT.contiguous()
        return torch.tanh(torch.matmul(x, Wt) + shared[..., None, DIM * DIM:])
    W = u[..., : DIM * DIM].unflatten(-1, (DIM, DIM))
    b = u[..., DIM * DIM:]
    # W x as a broadcast product and a sum, not a matmul: a u expanded over the sample axis
    # would be copied into K tiny matrix products; this form makes the maximisation's double
    # backward 2.5x faster at K = 1000-10000 than that (measured).
    return torch.tanh((W * x.unsqueeze(-2)).sum(-1) + b)


def sine_problem(x: torch.Tensor, y: torch.Tensor, *, reg: float = 0.0, delta: float = 0.25,
                 name: str = "sine") -> pmp.ControlProblem:
    """The control problem for inputs x [K] and targets y [K].

    ``reg`` is the L2 weight of the paper's reference code, which adds
    reg * |theta_n|^2 / 2 for every layer n to the loss; for controls piecewise
    constant on intervals of length ``delta`` that is the running cost
    L(u) = reg / (2 delta) * |u|^2 (all 30 weights and biases). 0 turns it off.
    """
    if reg < 0:
        raise ValueError(f"`reg` must be >= 0, got {reg}")
    if delta <= 0:
        raise ValueError(f"`delta` must be > 0, got {delta}")
    x, y = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(f"x and y must be 1-D of the same length, got {tuple(x.shape)} and {tuple(y.shape)}")
    x0 = x[:, None].expand(-1, DIM).clone()

    def terminal_cost(xT):
        return (xT.sum(-1) - y.to(xT)) ** 2

    running = None
    if reg > 0:
        weight = reg / (2 * delta)

        def running(t, x, u):
            shared = _one_control(u)
            if shared is not None:  # the same for every sample: once, then repeated (a view)
                return (weight * (shared ** 2).sum(-1)).unsqueeze(-1).expand(u.shape[:-1])
            return weight * (u ** 2).sum(-1)

    return pmp.ControlProblem(_dynamics, x0, HORIZON, pmp.Reals(CONTROL_DIM), terminal_cost=terminal_cost,
                              running_cost=running, name=name)


def sine(num_samples: int = 1000, *, seed: int = 0, reg: float = 0.0):
    """The training problem of the study and its reference value (None: no published optimum)."""
    return sine_problem(*sine_data(num_samples, seed=seed), reg=reg), None


def sine_initial_controls(kind: str, mesh: int = 20, *, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    """Initial controls [mesh, 30]: ``"good"`` (weights truncated normal, std 0.1, cut at 2 std as
    TensorFlow's truncated_normal; biases 0.1) or ``"zero"`` (all weights and biases 0, paper Fig. 1b)."""
    if kind == "zero":
        return torch.zeros(mesh, CONTROL_DIM, dtype=dtype)
    if kind != "good":
        raise ValueError(f"initialisation must be 'good' or 'zero', got {kind!r}")
    g = torch.Generator().manual_seed(seed)
    W = torch.empty(mesh, DIM * DIM, dtype=torch.float64)
    torch.nn.init.trunc_normal_(W, mean=0.0, std=0.1, a=-0.2, b=0.2, generator=g)
    b = torch.full((mesh, DIM), 0.1, dtype=torch.float64)
    return torch.cat([W, b], dim=-1).to(dtype)


def predict(controls: torch.Tensor, x: torch.Tensor, *, rtol: float = 1e-9, atol: float = 1e-11) -> torch.Tensor:
    """The network's output sum_i X_T^i for inputs x [K], with the adaptive forward sweep."""
    from pmpsolve.sweep.mesh import make_mesh
    from pmpsolve.sweep.pointwise import PointwiseProblem
    from pmpsolve.sweep.sweeps import Sweeper

    problem = sine_problem(x, torch.zeros_like(torch.as_tensor(x, dtype=torch.float64)))
    pw = PointwiseProblem(problem, controls.dtype, controls.device)
    nodes = make_mesh(controls.shape[0], HORIZON, controls.dtype, controls.device)
    return Sweeper(pw, nodes, rtol=rtol, atol=atol).forward(controls, samples=False).states.values[-1].sum(-1)


class IntervalFlow(torch.nn.Module):
    """One mesh interval of the network as a layer: x -> the flow of dx/dt = tanh(W x + b) over ``delta``.

    Fixed-step classical Runge-Kutta, ``substeps`` steps per interval (measured: 4 steps of 1/16 give
    the prediction of ``predict`` to 9e-10 with the "good" initial controls, to 5e-5 with weights 20
    times larger), so that the layer is a plain function of (x, W, b) that ``torch.func`` can
    differentiate per sample: the layer ``pmp.nn.OCNOpt`` trains (curvature="exact", 30 parameters).
    """

    def __init__(self, controls: torch.Tensor, delta: float = 0.25, substeps: int = 4):
        super().__init__()
        controls = torch.as_tensor(controls)
        self.linear = torch.nn.Linear(DIM, DIM).to(controls.dtype)
        with torch.no_grad():  # u[:25] = W row-major (W[i, j] = u[5 i + j]), u[25:] = b
            self.linear.weight.copy_(controls[:DIM * DIM].reshape(DIM, DIM))
            self.linear.bias.copy_(controls[DIM * DIM:])
        self.delta, self.substeps = float(delta), int(substeps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.delta / self.substeps
        f = lambda z: torch.tanh(self.linear(z))
        for _ in range(self.substeps):
            k1 = f(x)
            k2 = f(x + 0.5 * h * k1)
            k3 = f(x + 0.5 * h * k2)
            k4 = f(x + h * k3)
            x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        return x


class SumReadout(torch.nn.Module):
    """The prediction from the final state: X_T [K, 5] -> the sum of its components [K, 1]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum(-1, keepdim=True)


def sine_network(controls: torch.Tensor, *, delta: float = 0.25, substeps: int = 4,
                 readout: bool = False) -> torch.nn.Sequential:
    """The network with controls [N, 30] as a Sequential of N ``IntervalFlow`` layers: inputs [K, 5] -> X_T [K, 5].

    ``readout=True`` appends a ``SumReadout`` entry: inputs [K, 5] -> predictions [K, 1], so that the loss is
    ``mse_loss(model(x), y[:, None])`` (what ``pmp.nn.OCNOpt(value_hessian="gauss-newton", loss="mse")`` takes).
    """
    layers = [IntervalFlow(u, delta, substeps) for u in controls]
    return torch.nn.Sequential(*layers, *([SumReadout()] if readout else []))


def network_controls(model: torch.nn.Sequential) -> torch.Tensor:
    """The controls [N, 30] of a ``sine_network`` (the layout of ``sine_problem``)."""
    return torch.stack([torch.cat([layer.linear.weight.detach().reshape(-1), layer.linear.bias.detach()])
                        for layer in model if isinstance(layer, IntervalFlow)])
