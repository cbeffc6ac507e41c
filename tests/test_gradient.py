"""The co-state gradient dJ/du_n = -int_{I_n} grad_u H dt against central finite differences."""
import math

import pytest
import torch

import pmpsolve as pmp
from pmpsolve.sensitivity import cost, cost_gradient
from problems import REFERENCE_PROBLEMS


def _random_controls(problem, N, seed=0):
    g = torch.Generator().manual_seed(seed)
    low, high = problem.controls.bounds(torch.float64, "cpu")
    low, high = low.clamp(min=-1.0), high.clamp(max=1.0)
    return low + (high - low) * torch.rand(N, problem.control_dim, generator=g, dtype=torch.float64)


def _finite_differences(problem, u, indices, eps=1e-5):
    """Central differences of J for the flat control components ``indices`` (ODE rtol 1e-12)."""
    fd = []
    for index in indices:
        e = torch.zeros(u.numel(), dtype=u.dtype)
        e[index] = eps
        e = e.view_as(u)
        fd.append((cost(problem, u + e, rtol=1e-12, atol=1e-14) - cost(problem, u - e, rtol=1e-12, atol=1e-14))
                  / (2 * eps))
    return torch.tensor(fd, dtype=u.dtype)


def _relative_error(problem, u, count=4):
    _, grad = cost_gradient(problem, u, rtol=1e-12, atol=1e-14)
    indices = torch.linspace(0, u.numel() - 1, count).long().tolist()
    fd = _finite_differences(problem, u, indices)
    return float((grad.reshape(-1)[indices] - fd).abs().max() / grad.abs().max())


@pytest.mark.parametrize("name", sorted(REFERENCE_PROBLEMS))
def test_costate_gradient_matches_finite_differences(name):
    problem, _ = REFERENCE_PROBLEMS[name]()
    rel = _relative_error(problem, _random_controls(problem, 40))
    # X and P at the Gauss points come from the ODE solvers: exact up to the tolerances and the
    # 3-point quadrature (the Hermite interpolants' O(h^4) error, 1e-5 here, is gone).
    assert rel < 1e-6, rel


def test_coarse_mesh_gradient_matches_finite_differences():
    """Rayleigh at mesh 20 (h = 0.125): the interval gradient is dJ/du to 2.4e-8 relative (measured;
    all 20 components). Before, with X and P from the Hermite interpolants, it was off by 4.7e-4
    relative (2.9e-3 absolute, 2.3e-2 per unit time), an error no ODE tolerance could remove."""
    problem, _ = REFERENCE_PROBLEMS["rayleigh"]()
    rel = _relative_error(problem, _random_controls(problem, 20), count=5)
    assert rel < 1e-6, rel


def test_gradient_error_does_not_grow_on_coarse_meshes():
    """Measured before (Hermite X and P): 3.1e-4, 1.9e-5, 1.2e-6 at N = 20, 40, 80 (order 4). Now the
    error is the quadrature's and the finite differences', below 1e-7 on all three meshes."""
    problem, _ = REFERENCE_PROBLEMS["vanderpol"]()
    errors = [_relative_error(problem, torch.full((N, 1), 0.3, dtype=torch.float64), count=3) for N in (20, 40, 80)]
    assert max(errors) < 1e-7, errors


def test_time_dependent_dynamics_gradient():
    """f and L that read t go through the per-point (vmap) path of the engine."""
    problem = pmp.ControlProblem(
        dynamics=lambda t, x, u: torch.stack([-x[..., 0] + torch.sin(3 * t) * u[..., 0] + t, x[..., 0] * u[..., 1]], -1),
        x0=torch.tensor([1.0, 0.0], dtype=torch.float64), horizon=2.0, controls=pmp.Reals(2),
        terminal_cost=lambda x: (x ** 2).sum(-1),
        running_cost=lambda t, x, u: torch.cos(t) * (u ** 2).sum(-1) + x[..., 1] ** 2)
    assert _relative_error(problem, _random_controls(problem, 16, seed=3), count=6) < 1e-4


def test_gradient_of_many_samples_is_gradient_of_their_mean():
    problem, _ = REFERENCE_PROBLEMS["vanderpol"]()
    x0 = torch.tensor([[0.0, 1.0], [0.5, -0.5], [1.0, 0.2]], dtype=torch.float64)
    many = pmp.ControlProblem(problem.dynamics, x0, problem.horizon, problem.controls,
                              running_cost=problem.running_cost)
    u = _random_controls(many, 12)
    J, grad = cost_gradient(many, u)
    singles = [cost_gradient(pmp.ControlProblem(problem.dynamics, x, problem.horizon, problem.controls,
                                                running_cost=problem.running_cost), u)
               for x in x0]
    assert J == pytest.approx(sum(s[0] for s in singles) / 3, rel=1e-9)
    assert torch.allclose(grad, sum(s[1] for s in singles) / 3, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("budget", [2 ** 12, 100, 7])
@pytest.mark.parametrize("rho, eps", [(0.25, 0.0), (0.25, 0.3), (0.0, 0.0)])
def test_blocked_evaluation_equals_one_pass(monkeypatch, budget, rho, eps):
    """value_and_grad and curvature, taken in blocks of intervals and of samples, give what one
    autograd pass over all intervals and samples gives (the SQH term counted once per interval)."""
    from pmpsolve.update.hamiltonian import IntervalHamiltonian, interval_data
    from pmpsolve.sweep.mesh import make_mesh
    from pmpsolve.sweep.pointwise import PointwiseProblem
    from pmpsolve.sweep.sweeps import Sweeper
    from problems.sine import sine_data, sine_initial_controls, sine_problem

    pw = PointwiseProblem(sine_problem(*sine_data(60, seed=0), reg=0.001, delta=0.25), torch.float64, "cpu")
    u = sine_initial_controls("good", 20, seed=0)
    sweeper = Sweeper(pw, make_mesh(20, 5.0, torch.float64, "cpu"))
    fw = sweeper.forward(u)
    data = interval_data(pw, u, fw, sweeper.backward(u, fw), 3)
    g = torch.Generator().manual_seed(0)
    v = u + 0.01 * torch.randn(u.shape, generator=g, dtype=u.dtype)
    d = torch.randn(u.shape, generator=g, dtype=u.dtype)
    x = v.clone().requires_grad_(True)
    value = IntervalHamiltonian(pw, data, rho, eps).smooth(x)
    (grad,) = torch.autograd.grad(value.sum(), x, create_graph=True)
    (hd,) = torch.autograd.grad((grad * d).sum(), x)
    monkeypatch.setattr(IntervalHamiltonian, "block_elements", budget)
    blocked = IntervalHamiltonian(pw, data, rho, eps)
    blocks = blocked.blocks()
    assert len(blocks) > 1 and (budget >= 900 or blocks[0][1] != slice(0, 60))  # below 900: samples split too
    value_b, grad_b = blocked.value_and_grad(v)
    torch.testing.assert_close(value_b, value.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_b, grad.detach(), rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(blocked.curvature(v, d), -(d * hd).sum(-1), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("quadrature", [3, 1])
def test_point_blocks_give_the_one_pass_numbers_bit_for_bit(monkeypatch, quadrature):
    """The interval data, the gain terms and the co-state's end slopes, taken in blocks of intervals
    (``PointwiseProblem.point_blocks``), equal one pass over all intervals exactly (torch.equal), and
    every block holds at least 2 points."""
    from pmpsolve.update.hamiltonian import IntervalHamiltonian, interval_data
    from pmpsolve.sweep.mesh import make_mesh
    from pmpsolve.sweep.pointwise import PointwiseProblem
    from pmpsolve.sweep.sweeps import Sweeper
    from problems.sine import sine_data, sine_initial_controls, sine_problem

    pw = PointwiseProblem(sine_problem(*sine_data(60, seed=0), reg=0.001, delta=0.5), torch.float64, "cpu")
    u = sine_initial_controls("good", 9, seed=0)
    sweeper = Sweeper(pw, make_mesh(9, 5.0, torch.float64, "cpu"), quadrature=quadrature)
    fw = sweeper.forward(u)
    v = u + 0.01 * torch.randn(u.shape, generator=torch.Generator().manual_seed(0), dtype=u.dtype)

    def evaluate():
        bw = sweeper.backward(u, fw)
        data = interval_data(pw, u, fw, bw, quadrature)
        return (bw.costates.slope_left, bw.costates.slope_right, *data, *IntervalHamiltonian(pw, data).terms(v))

    one_pass = evaluate()
    assert pw.point_blocks(one_pass[2], one_pass[5]) == [slice(None)]
    monkeypatch.setattr(PointwiseProblem, "block_elements", 1)
    for t, x in ((one_pass[2], one_pass[5]), (sweeper.mesh[:-1], fw.states.values[:-1])):
        blocks = pw.point_blocks(t, x)
        assert len(blocks) > 1 and blocks[-1].stop == x.shape[0]
        assert all(t[b].numel() >= 2 for b in blocks)
    for blocked, whole in zip(evaluate(), one_pass):
        assert torch.equal(blocked, whole)
