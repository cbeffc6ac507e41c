"""Update rules: Theorem 2 monotonicity, basic MSA divergence, gradient = Prop. 2, the scaling convention."""
import pytest
import torch

import pmpsolve as pmp
from helpers import scalar_terminal, scalar_terminal_optimum
from pmpsolve.update.hamiltonian import IntervalHamiltonian, interval_data
from pmpsolve.update.maximisers import ProjectedLBFGS
from pmpsolve.sweep.mesh import make_mesh
from pmpsolve.sweep.pointwise import PointwiseProblem
from pmpsolve.sweep.sweeps import Sweeper
from problems import REFERENCE_PROBLEMS


def test_emsa_with_large_fixed_rho_decreases_J_every_iteration():
    """Theorem 2: for rho large enough, J(u^{k+1}) - J(u^k) <= -D mu_k."""
    problem, _ = REFERENCE_PROBLEMS["vanderpol"]()
    sol = pmp.solve(problem, method=pmp.EMSA(rho=100.0), mesh=20, stop=pmp.Stop(max_iter=15))
    costs = [r.cost for r in sol.history]
    assert all(b < a for a, b in zip(costs, costs[1:])), costs
    assert all(r.hamiltonian_gain >= 0 for r in sol.history[1:])
    assert all(r.rejected == 0 for r in sol.history)  # fixed rho: every step is taken (Alg. 2)


@pytest.mark.parametrize("method", ["emsa", "gradient"])
def test_safeguarded_methods_solve_the_problem_basic_msa_diverges_on(method):
    u_star, J_star = scalar_terminal_optimum()
    sol = pmp.solve(scalar_terminal(), method=method, mesh=10)
    assert sol.cost == pytest.approx(J_star, rel=1e-6)
    assert torch.allclose(sol.controls, torch.full((10, 1), u_star, dtype=torch.float64), atol=1e-3)


def test_basic_msa_divergence_is_detected_and_reported():
    with pytest.raises(pmp.DivergenceError, match="diverged") as info:
        pmp.solve(scalar_terminal(), method="msa", mesh=10)
    err = info.value
    assert err.best_controls is not None and err.best_controls.shape == (10, 1)
    assert err.best_cost == pytest.approx(err.history[0].cost)  # the initial control was the best
    assert len(err.history) >= 3


def test_basic_msa_converges_where_the_map_contracts():
    """For cT < 1 the MSA map u <- -c(x0 + T u) contracts (slope -cT): one step per digit or so."""
    u_star, J_star = scalar_terminal_optimum(c=0.5)
    sol = pmp.solve(scalar_terminal(c=0.5), method="msa", mesh=5)
    assert sol.converged and sol.cost == pytest.approx(J_star, rel=1e-8)


def test_gradient_step_is_gradient_descent():
    """Prop. 2: the soft step moves u by lr times minus the L2 gradient of J (dJ/du_n / h_n)."""
    from pmpsolve.sensitivity import cost_gradient

    problem, _ = REFERENCE_PROBLEMS["rayleigh"]()
    N, lr = 25, 1e-3
    u0 = torch.zeros(N, 1, dtype=torch.float64)
    sol = pmp.solve(problem, method=pmp.Gradient(lr=lr, adaptive=False), mesh=N, stop=pmp.Stop(max_iter=1))
    _, grad = cost_gradient(problem, u0)
    h = problem.horizon / N
    # The solve's first sweep shoots (error ~ rtol = 1e-9 on J and the co-state), cost_gradient's is
    # sequential: the two agree to 3.7e-9 relative (measured), not to rounding.
    assert torch.allclose(sol.controls, u0 - lr * grad / h, rtol=2e-8, atol=1e-12)
    assert sol.history[1].cost < sol.history[0].cost


def _proposal(problem, rho, N=8):
    pw = PointwiseProblem(problem, torch.float64, "cpu")
    mesh = make_mesh(N, problem.horizon, torch.float64, "cpu")
    sweeper = Sweeper(pw, mesh)
    u = torch.full((N, problem.control_dim), 0.2, dtype=torch.float64)
    fw = sweeper.forward(u)
    data = interval_data(pw, u, fw, sweeper.backward(u, fw), 3)
    return ProjectedLBFGS(gtol=1e-12).maximise(IntervalHamiltonian(pw, data, rho), problem.controls).controls


def test_scaling_convention_K_copies_multiply_rho_by_K():
    """docs/theory.md, scaling convention: J is the mean, P carries 1/K, the penalties are sums over samples.

    With K identical samples H is unchanged and the feasibility penalties grow K-fold, so
    E-MSA with K copies at rho equals E-MSA with one sample at K * rho.
    """
    base, _ = REFERENCE_PROBLEMS["rayleigh"]()
    K = 4
    copies = pmp.ControlProblem(base.dynamics, base.x0.expand(K, -1).clone(), base.horizon, base.controls,
                                running_cost=base.running_cost)
    assert torch.allclose(_proposal(copies, 0.5), _proposal(base, 0.5 * K), atol=1e-8)
    assert not torch.allclose(_proposal(copies, 0.5), _proposal(base, 0.5), atol=1e-4)


def test_perturbed_start_is_seeded():
    problem, _ = REFERENCE_PROBLEMS["lqr"]()
    a = pmp.solve(problem, mesh=10, maximiser=pmp.Maximiser(perturb=0.01, seed=3), stop=pmp.Stop(max_iter=2))
    b = pmp.solve(problem, mesh=10, maximiser=pmp.Maximiser(perturb=0.01, seed=3), stop=pmp.Stop(max_iter=2))
    assert torch.equal(a.controls, b.controls)


def test_unknown_rule_option_is_refused():
    problem, _ = REFERENCE_PROBLEMS["lqr"]()
    with pytest.raises(ValueError, match="unknown option.*'stepsize'.*lr"):
        pmp.solve(problem, method=pmp.Rule("gradient", stepsize=0.1), mesh=5)


def test_emsa_iteration_options_are_validated_and_converge_on_lqr():
    """The rho-rule and Anderson options of E-MSA: bad values are refused; the non-default ones still converge, monotonically."""
    problem, _ = REFERENCE_PROBLEMS["lqr"]()
    with pytest.raises(ValueError, match="anderson_reset"):
        pmp.solve(problem, method=pmp.EMSA(anderson_reset="sometimes"), mesh=20)
    with pytest.raises(ValueError, match="floor_decay"):
        pmp.solve(problem, method=pmp.EMSA(floor_decay=2.0), mesh=20)
    sol = pmp.solve(problem, method=pmp.EMSA(anderson_reset="grow", floor_decay=0.9, anderson_screen=None), mesh=20)
    assert sol.converged
    costs = [r.cost for r in sol.history]
    assert all(b < a for a, b in zip(costs, costs[1:]))  # steps are kept only when J decreases
