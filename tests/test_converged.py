"""`converged` is relative to J but capped at J(u^0): a J that runs away to -inf cannot make a
large gradient pass for a small one, and an unbounded problem ends with status "unbounded"."""
import pytest
import torch

import pmpsolve as pmp
from pmpsolve.update.optimality import is_optimal, optimality_scale
from pmpsolve.update.stopping import UNBOUNDED_RATIO

from problems import double_integrator


def unbounded_below():
    """x' = u, x(0) = 1, J = -x(1)^2 over u in R: J(u) -> -inf as |u| -> inf."""
    return pmp.ControlProblem(lambda t, x, u: u.clone(), torch.tensor([1.0]), 1.0, pmp.Reals(1),
                              terminal_cost=lambda x: -x[..., 0] ** 2)


@pytest.mark.parametrize("method", ["msa", "emsa", "sqh", "gradient"])
def test_an_unbounded_problem_is_never_converged(method):
    """Under tol * max(1, |J|) every method reported converged=True at J ~ -1e11 .. -2e13 with a
    measure of 5e5 .. 1e7 (the gradient of J, which grows with |J|)."""
    with pytest.warns(RuntimeWarning, match="did not converge"):
        sol = pmp.solve(unbounded_below(), method, mesh=10)
    assert not sol.converged
    assert sol.status == "unbounded"
    assert "J fell from J(u^0) = -1 to" in sol.message and "the problem looks unbounded below" in sol.message
    assert sol.cost < -UNBOUNDED_RATIO and sol.optimality > 1.0
    assert len(sol.history) <= 10


def test_the_scale_is_max_1_abs_J_while_J_stays_within_the_scale_of_J0():
    for initial in (-3.0, -0.5, 0.0, 0.2, 2.5, 68.4):
        for cost in (-70.0, -3.0, -1.0, -0.048, 0.0, 0.67, 2.0, 29.4, 68.4):
            if abs(cost) <= max(1.0, abs(initial)):
                assert optimality_scale(cost, initial) == max(1.0, abs(cost))
            else:  # a J beyond |J(u^0)|: the scale of J(u^0), stricter
                assert optimality_scale(cost, initial) == max(1.0, abs(initial)) < abs(cost)
    assert not is_optimal(3.26e6, -2.66e12, 1e-5, -1.0)
    assert is_optimal(1e-6, -2.66e12, 1e-5, -1.0)


def test_a_negative_optimum_below_minus_J0_still_converges():
    """x' = u, x(0) = 1, J = -2 x(1) + 1/2 int u^2: u* = 2, J* = -4 from J(u^0) = -2 (the scale is 2)."""
    problem = pmp.ControlProblem(lambda t, x, u: u.clone(), torch.tensor([1.0]), 1.0, pmp.Reals(1),
                                 terminal_cost=lambda x: -2 * x[..., 0],
                                 running_cost=lambda t, x, u: 0.5 * (u ** 2).sum(-1))
    for method in ["emsa", "sqh", "gradient"]:
        sol = pmp.solve(problem, method, mesh=10)
        assert sol.converged and sol.status == "converged", (method, sol.message)
        assert sol.cost == pytest.approx(-4.0, abs=1e-8)
        assert sol.history[0].cost == pytest.approx(-2.0)
        assert "tol * max(1, min(|J|, |J(u^0)|)) = 2e-05" in sol.message


@pytest.mark.parametrize("method", ["emsa", "sqh", "gradient"])
def test_the_double_integrator_with_an_l1_cost_converges_to_its_negative_optimum(method):
    problem, J_star = double_integrator(penalty="L1")  # J* = -1.75 from J(u^0) = 0
    sol = pmp.solve(problem, method, mesh=12)
    assert sol.converged and sol.status == "converged"
    assert sol.cost == pytest.approx(J_star, abs=1e-12)
