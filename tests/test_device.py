"""Every path of the solver on every available device (CUDA tests skip where there is none).

Device-agnostic means: the problem's tensors are moved once, every tensor the solver
returns lives on the requested device, and the numbers agree with the CPU's.
"""
import pytest
import torch

import pmpsolve as pmp
from pmpsolve import baselines
from problems import REFERENCE_PROBLEMS, double_integrator
from problems.sine import sine_data, sine_initial_controls, sine_problem

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="no CUDA device on this machine"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["emsa", "sqh"])
def test_reference_problem_on_device(device, method):
    problem, reference = REFERENCE_PROBLEMS["catalyst"]()
    # to 1e-2, not to convergence
    sol = pmp.solve(problem, method=method, mesh=40, device=device, stop=pmp.Stop(max_iter=40))
    assert sol.controls.device.type == device and sol.mesh.device.type == device
    t = torch.tensor([0.0, 0.5], device=device)
    assert sol.state(t).device.type == device and sol.costate(t).device.type == device
    assert abs(sol.cost - reference) / abs(reference) < 1e-2
    if device != "cpu":
        on_cpu = pmp.solve(problem, method=method, mesh=40, device="cpu", stop=pmp.Stop(max_iter=40))
        assert sol.cost == pytest.approx(on_cpu.cost, rel=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_finite_set_and_penalty_paths_on_device(device):
    problem, optimum = double_integrator(horizon=3.0, controls="ternary", penalty="L1")
    sol = pmp.solve(problem, method="sqh", mesh=60, device=device)
    assert sol.controls.device.type == device
    assert set(sol.controls.unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert abs(sol.cost - optimum) / abs(optimum) < 1e-3


@pytest.mark.parametrize("device", DEVICES)
def test_network_training_on_device(device):
    """The sine network: batched L-BFGS maximisation (E-MSA) and a torch.optim baseline."""
    train = sine_problem(*sine_data(32, seed=0), reg=0.001, delta=0.25)
    init = sine_initial_controls("good", 20, seed=0)
    sol = pmp.solve(train, method=pmp.EMSA(rho=0.25), mesh=20, init=init, device=device,
                    ode=pmp.ODE(rtol=1e-6, atol=1e-8), maximiser=pmp.Maximiser(iterations=5, perturb=0.005, seed=0),
                    stop=pmp.Stop(max_iter=3, tol=0.0))
    assert sol.controls.device.type == device
    assert sol.history[-1].cost < sol.history[0].cost
    result = baselines.train(train, optimizer="adam", lr=0.005, iterations=3, mesh=20, init=init, device=device)
    assert result.controls.device.type == device
    assert result.cost < sol.history[0].cost
