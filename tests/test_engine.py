"""The engine's seams: every registered rule through the same loop, a rule from outside the package,
the Solver driven one iteration at a time, and the option records."""
import dataclasses

import pytest
import torch

import pmpsolve as pmp
from pmpsolve.update.rules import RULES
from problems import REFERENCE_PROBLEMS

from helpers import scalar_terminal, scalar_terminal_optimum


@pytest.mark.parametrize("method", sorted(RULES))
def test_every_registered_rule_reaches_the_optimum(method):
    """x' = u, J = 1/2 int u^2 + c/2 x_T^2 with c T = 0.5 (basic MSA contracts there): J* in closed form.
    Rules that reject steps promise that J never increases."""
    problem = scalar_terminal(c=0.5)
    u_star, J_star = scalar_terminal_optimum(c=0.5)
    sol = pmp.solve(problem, method=method, mesh=8, stop=pmp.Stop(max_iter=300))
    assert sol.converged, sol.message
    assert sol.cost == pytest.approx(J_star, rel=1e-9)
    assert torch.allclose(sol.controls, torch.full_like(sol.controls, u_star), atol=1e-5)
    if RULES[method].adaptive:
        costs = [r.cost for r in sol.history]
        assert all(b <= a for a, b in zip(costs, costs[1:])), costs


@pytest.mark.parametrize("method", [m for m in sorted(RULES) if RULES[m].adaptive])
def test_adaptive_rules_reach_the_lqr_optimum_of_the_mesh(method):
    problem, _ = REFERENCE_PROBLEMS["lqr"]()
    reference = pmp.solve(problem, mesh=20)  # E-MSA, certified first-order optimal
    sol = pmp.solve(problem, method=method, mesh=20, stop=pmp.Stop(max_iter=400))
    assert sol.cost == pytest.approx(reference.cost, rel=1e-7)
    costs = [r.cost for r in sol.history]
    assert all(b <= a for a, b in zip(costs, costs[1:]))
    # SQH may end on its own |du|^2 < kappa rule just above tol (measured 1.5e-5 here): then it says so.
    assert sol.converged == (sol.optimality <= sol.settings["tol"] * max(1.0, abs(sol.cost)))


def test_a_rule_registered_from_outside_the_package():
    class DampedMSA(pmp.UpdateRule):
        """Half a basic-MSA step: u <- u + w (argmax H - u)."""

        name, defaults = "test-damped-msa", {"weight": 0.5}

        def propose(self, data):
            target = self._maximise(data, rho=0.0)
            return data.controls + self.options["weight"] * (target - data.controls)

        def parameters(self):
            return {"weight": self.options["weight"]}

    pmp.register_rule(DampedMSA)
    try:
        problem = scalar_terminal(c=5.0)  # basic MSA diverges here (slope -cT = -5); the damped map contracts
        _, J_star = scalar_terminal_optimum(c=5.0)
        sol = pmp.solve(problem, method=pmp.Rule("test-damped-msa", weight=0.2), mesh=4)
        assert sol.converged and sol.cost == pytest.approx(J_star, rel=1e-9)
        assert sol.history[1].parameters == {"weight": 0.2}
        with pytest.raises(ValueError, match="unknown option"):
            pmp.Rule("test-damped-msa", lr=1.0)
    finally:
        RULES.pop("test-damped-msa")


def test_solver_driven_one_iteration_at_a_time_equals_solve():
    problem, _ = REFERENCE_PROBLEMS["lqr"]()
    solver = pmp.Solver(problem, mesh=20)
    state = solver.init()
    costs = [state.cost]
    while not state.done:
        state = solver.step(state)
        costs.append(state.cost)
        assert state.history[-1].iteration == state.iteration
    sol = solver.solution(state)
    direct = pmp.solve(problem, mesh=20)
    assert torch.equal(sol.controls, direct.controls) and sol.iterations == direct.iterations
    assert sol.converged and state.status == "converged"
    with pytest.raises(AttributeError):
        state.iteration = 0  # states are immutable records


def test_rho_is_an_option_of_emsa():
    """rho lives in pmp.EMSA; the deprecated rho= and options= keywords map onto it."""
    problem = scalar_terminal(c=0.5)
    a = pmp.solve(problem, method=pmp.EMSA(rho=2.0), mesh=4, stop=pmp.Stop(max_iter=5))
    with pytest.warns(DeprecationWarning):
        b = pmp.solve(problem, mesh=4, options={"rho": 2.0}, max_iter=5)
    assert torch.equal(a.controls, b.controls) and a.settings["rho"] == b.settings["rho"] == 2.0
    with pytest.raises(TypeError, match="unexpected keyword argument 'rho'"):
        pmp.SQH(rho=1.0)
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="`rho` is an option of method='emsa'"):
        pmp.solve(problem, mesh=4, method="sqh", rho=1.0)


def test_option_records_check_themselves_and_make_the_settings():
    with pytest.raises(ValueError, match="`max_iter` must be an int >= 0"):
        pmp.Stop(max_iter=-1)
    with pytest.raises(ValueError, match="unknown `method` 'rk45'"):
        pmp.ODE("rk45")
    with pytest.raises(ValueError, match="`quadrature` must be an int from 1 to 10"):
        pmp.Maximiser(quadrature=0)
    with pytest.raises(ValueError, match="unknown `method`"):
        pmp.Rule("newton")
    with pytest.raises(dataclasses.FrozenInstanceError):
        pmp.ODE().method = "rk4"  # frozen
    assert pmp.ODE().resolved(torch.float32).rtol == 1e-6
    sol = pmp.solve(scalar_terminal(), mesh=4)
    for key in ("method", "mesh", "max_iter", "tol", "stall_tol", "rho", "ode_method", "rtol", "atol", "dtype",
                "device", "seed", "maximiser_iter", "perturb", "quadrature", "options", "maximisers_used"):
        assert key in sol.settings, key
