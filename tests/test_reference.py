"""The default solve on the reference problems of docs/theory.md, and on LQRs checked by Riccati."""
import math

import pytest
import torch

import pmpsolve as pmp
from pmpsolve.studies.reference import independent_cost
from problems import REFERENCE_PROBLEMS, lqr_samples, random_lqr
from problems.lqr import riccati_cost


@pytest.mark.parametrize("name", ["lqr", "catalyst", "vanderpol", "rayleigh"])
def test_default_solve_reaches_reference_value(name):
    problem, reference = REFERENCE_PROBLEMS[name]()
    sol = pmp.solve(problem, mesh=100)
    assert sol.converged, sol.message
    assert abs(sol.cost - reference) / abs(reference) < 1e-3
    # The reported cost is J of the returned controls: an independent integrator agrees.
    assert independent_cost(problem, sol.controls, sol.mesh) == pytest.approx(sol.cost, rel=1e-7, abs=1e-10)
    # Piecewise-constant controls cannot beat the continuous optimum (up to the digits of J*).
    assert sol.cost > reference - 1e-7 * max(1.0, abs(reference))


def test_lqr_reference_value_is_the_riccati_value():
    assert riccati_cost([[0, 1], [-1, 0]], [[0], [1]], [[1, 0], [0, 1]], [[1]], [0, 1], 5.0) == pytest.approx(
        0.673999, abs=5e-7)


@pytest.mark.parametrize("seed", [0, 1])
def test_random_lqr_against_riccati(seed):
    problem, exact = random_lqr(n=3, m=2, horizon=2.0, seed=seed)
    sol = pmp.solve(problem, mesh=100)
    assert sol.converged
    assert abs(sol.cost - exact) / abs(exact) < 1e-3
    assert sol.cost >= exact - 1e-9


def test_error_falls_with_second_order_in_the_mesh():
    """J_N - J* = O(h^2) for piecewise-constant controls (smooth optimal control)."""
    problem, _ = REFERENCE_PROBLEMS["lqr"]()
    exact = riccati_cost([[0, 1], [-1, 0]], [[0], [1]], [[1, 0], [0, 1]], [[1]], [0, 1], 5.0)
    errors = [pmp.solve(problem, mesh=N, stop=pmp.Stop(tol=1e-10)).cost - exact for N in (10, 20, 40)]
    orders = [math.log2(errors[i] / errors[i + 1]) for i in range(2)]
    assert all(1.8 < o < 2.2 for o in orders), (errors, orders)


def test_samples_sharing_one_control_against_riccati():
    A, B, Q, R = [[0, 1], [-1, 0]], [[0], [1]], [[1, 0], [0, 1]], [[1]]
    x0 = torch.tensor([[0.0, 1.0], [1.0, 0.0], [-0.5, 0.5]], dtype=torch.float64)
    problem = pmp.ControlProblem(REFERENCE_PROBLEMS["lqr"]()[0].dynamics, x0, 3.0, pmp.Reals(1),
                                 running_cost=REFERENCE_PROBLEMS["lqr"]()[0].running_cost)
    sol = pmp.solve(problem, mesh=60)
    # One open-loop control for all samples: the deviations from the mean state e_i obey e' = A e whatever
    # u is, so J* = Riccati value of the mean state + the uncontrolled cost T/2 mean|e_i(0)|^2 (A rotates).
    mean = x0.mean(0)
    exact = riccati_cost(A, B, Q, R, mean.tolist(), 3.0) + 0.5 * 3.0 * float(((x0 - mean) ** 2).sum(-1).mean())
    individual = sum(riccati_cost(A, B, Q, R, x.tolist(), 3.0) for x in x0) / 3
    assert exact > individual  # one shared control does worse than one control per sample
    assert sol.converged
    assert exact - 1e-9 <= sol.cost <= exact * (1 + 2e-3)  # piecewise constant on 60 intervals: O(h^2) above
    assert sol.state(torch.tensor([0.0, 1.5])).shape == (2, 3, 2)


@pytest.mark.parametrize("samples", [1, 40])
def test_samples_lqr_reaches_its_exact_optimum(samples):
    """K initial states sharing one control: J* = Riccati value of the mean state + the uncontrolled
    deviations' cost (lqr_samples' docstring); the default solve reaches it and in few iterations
    whatever K is (adaptive rho starts at rho0 / K)."""
    problem, exact = lqr_samples(samples)
    sol = pmp.solve(problem, mesh=100)
    assert sol.converged, sol.message
    assert abs(sol.cost - exact) / abs(exact) < 1e-3
    assert sol.cost >= exact - 1e-9
    assert len(sol.history) <= 15
