"""Control sets and costs beyond gradients: closed forms and enumeration against brute force,
SQH, the bang-bang / bang-off-bang / finite-set examples against their closed-form optima, bad input."""
import itertools

import pytest
import torch

import pmpsolve as pmp
from pmpsolve.update.hamiltonian import IntervalHamiltonian, interval_data
from pmpsolve.update.maximisers import ClosedForm, HamiltonianMaximiser
from pmpsolve.sweep.mesh import make_mesh
from pmpsolve.sweep.pointwise import PointwiseProblem
from pmpsolve.studies.reference import independent_cost
from problems import catalyst_mixing, double_integrator, double_integrator_optimum, lqr

F64 = torch.float64


def objective_for(problem, u, rho=0.0, eps=0.0, N=None):
    """The interval objective at controls u [N, m] (one forward and one backward sweep)."""
    from pmpsolve.sweep.sweeps import Sweeper

    pw = PointwiseProblem(problem, F64, "cpu")
    nodes = make_mesh(u.shape[0], problem.horizon, F64, "cpu")
    sweeper = Sweeper(pw, nodes, rtol=1e-10, atol=1e-12)
    fw = sweeper.forward(u)
    data = interval_data(pw, u, fw, sweeper.backward(u, fw), 3)
    return IntervalHamiltonian(pw, data, rho, eps)


def two_control_problem(controls, penalty=None):
    """Control-affine in u = (u1, u2), each control driving its own state, with a quadratic control cost:
    a separable concave quadratic Hamiltonian for any rho (grad_x f does not depend on u)."""

    def dynamics(t, x, u):
        return torch.stack([x[..., 1] + 0.5 * u[..., 0], -torch.sin(x[..., 0]) + u[..., 1]], -1)

    def running_cost(t, x, u):
        return 0.5 * (x ** 2).sum(-1) + 0.05 * u[..., 0] ** 2

    return pmp.ControlProblem(dynamics, torch.tensor([1.0, -0.5], dtype=F64), 2.0, controls,
                              running_cost=running_cost, terminal_cost=lambda x: (x ** 2).sum(-1),
                              control_penalty=penalty)


def _axis(low, high, points):
    """points equally spaced values from low to high that contain 0 exactly (linspace may give 1e-17)."""
    axis = torch.linspace(low, high, points, dtype=F64)
    return torch.where(axis.abs() < 1e-12, torch.zeros_like(axis), axis)


def brute_force(objective, low, high, points=201):
    """max over a tensor grid of the box (C = points^m candidates per interval, one batched call)."""
    N, m = objective.data.controls.shape
    axis = _axis(low, high, points)
    grid = torch.cartesian_prod(*[axis] * m).reshape(-1, m)
    values = objective.candidates(grid[:, None, :].expand(-1, N, m))  # [C, N]
    return values.max(0).values


def brute_force_lines(objective, u, low, high, points=20001):
    """max along each coordinate line through u on a fine grid, one component at a time: [m, N]."""
    N, m = u.shape
    axis = _axis(low, high, points)
    best = []
    for j in range(m):
        U = u.unsqueeze(0).repeat(points, 1, 1)
        U[:, :, j] = axis[:, None]
        best.append(objective.candidates(U).max(0).values)
    return torch.stack(best)


@pytest.mark.parametrize("rho, eps, penalty", [
    (0.0, 0.0, None), (2.0, 0.0, None), (0.0, 0.5, None), (0.0, 0.0, pmp.L1(0.4)), (1.0, 0.0, pmp.L1(0.4)),
    (0.0, 0.3, pmp.L0(0.2)), (0.0, 0.0, pmp.L0(0.05)),
])
def test_closed_form_is_the_maximum_over_a_fine_grid(rho, eps, penalty):
    problem = two_control_problem(pmp.Box(-1.0, 1.0, shape=(2,)), penalty)
    u = 0.6 * torch.rand(12, 2, dtype=F64, generator=torch.Generator().manual_seed(3)) - 0.3
    objective = objective_for(problem, u, rho, eps)
    result = ClosedForm().maximise(objective, problem.controls)
    assert result is not None, "the objective is a separable concave quadratic: the closed form must apply"
    assert problem.controls.contains(result.controls).all()
    exact = objective(result.controls).detach()
    scale = exact.abs().max()
    grid_max = brute_force(objective, -1.0, 1.0)  # 201^2 points: the grid contains 0 and both bounds
    assert (exact >= grid_max - 1e-12 * scale).all()  # never beaten by the grid of the box
    assert (exact - grid_max <= 1e-3 * scale).all()
    lines = brute_force_lines(objective, result.controls, -1.0, 1.0)  # 20001 points per component
    assert (exact >= lines - 1e-12 * scale).all()
    assert (exact - lines <= 1e-8 * scale).all()  # the fine grid gets within its spacing squared


def test_closed_form_agrees_with_the_iterative_maximisers():
    problem, _ = lqr()
    u = torch.linspace(-1, 1, 30, dtype=F64)[:, None]
    for rho, eps in [(0.0, 0.0), (3.0, 0.0), (0.0, 2.0)]:
        objective = objective_for(problem, u, rho, eps)
        closed = HamiltonianMaximiser(problem.controls, method="closed-form").maximise(objective)
        lbfgs = HamiltonianMaximiser(problem.controls, method="lbfgs", max_iter=100).maximise(objective)
        assert torch.allclose(closed.controls, lbfgs.controls, rtol=1e-6, atol=1e-8)
    penalised = two_control_problem(pmp.Box(-1.0, 1.0, shape=(2,)), pmp.L1(0.4))
    objective = objective_for(penalised, torch.zeros(12, 2, dtype=F64), 1.0)
    closed = HamiltonianMaximiser(penalised.controls, method="closed-form").maximise(objective)
    proximal = HamiltonianMaximiser(penalised.controls, method="proximal", max_iter=500).maximise(objective)
    assert torch.allclose(closed.controls, proximal.controls, atol=1e-6)


def test_closed_form_is_refused_where_the_hamiltonian_is_not_quadratic():
    def dynamics(t, x, u):
        return torch.sin(u) - x  # not control-affine

    problem = pmp.ControlProblem(dynamics, torch.tensor([0.5], dtype=F64), 1.0, pmp.Box(-1.0, 1.0, shape=(1,)),
                                 terminal_cost=lambda x: (x ** 2).sum(-1))
    objective = objective_for(problem, torch.full((5, 1), 0.2, dtype=F64))
    assert ClosedForm().maximise(objective, problem.controls) is None
    maximiser = HamiltonianMaximiser(problem.controls)
    maximiser.maximise(objective)
    assert maximiser.last == "lbfgs"
    with pytest.raises(ValueError, match="not a separable concave quadratic"):
        HamiltonianMaximiser(problem.controls, method="closed-form").maximise(objective)


@pytest.mark.parametrize("m, values, penalty", [(2, [-1.0, 0.0, 1.0], None), (2, [0.0, 0.5, 2.0], pmp.L0(0.3)),
                                                (4, [-1.0, 0.0, 1.0], pmp.L1(0.2))])
def test_finite_set_maximisation_equals_exhaustive_enumeration(m, values, penalty):
    """m = 2: all V^m combinations (exact for any Hamiltonian, here a coupled one); m = 4 (81 > 64
    combinations): component sweeps, exact because the Hamiltonian separates over components."""

    def dynamics(t, x, u):
        if m == 2:  # the product u1 u2 couples the components
            return torch.stack([x[..., 1] + u[..., 0] * u[..., 1], -x[..., 0] + u[..., 1]], -1)
        return torch.stack([x[..., 1] + u[..., 0] - u[..., 2], -x[..., 0] + u[..., 1] + 0.5 * u[..., 3]], -1)

    problem = pmp.ControlProblem(dynamics, torch.tensor([1.0, 0.0], dtype=F64), 1.5, pmp.Finite(values, shape=(m,)),
                                 terminal_cost=lambda x: (x ** 2).sum(-1), running_cost=lambda t, x, u: (u ** 2).sum(-1),
                                 control_penalty=penalty)
    N = 10
    u = torch.as_tensor(values, dtype=F64)[torch.randint(len(values), (N, m), generator=torch.Generator().manual_seed(0))]
    objective = objective_for(problem, u)
    result = HamiltonianMaximiser(problem.controls).maximise(objective)
    every = torch.tensor(list(itertools.product(values, repeat=m)), dtype=F64)  # [V^m, m]
    scores = objective.candidates(every[:, None, :].expand(-1, N, m))
    assert torch.allclose(objective(result.controls).detach(), scores.max(0).values, rtol=1e-12, atol=1e-14)
    assert problem.controls.contains(result.controls).all()


@pytest.mark.parametrize("controls, penalty", [("box", None), ("binary", None), ("ternary", None), ("box", "L1"),
                                               ("box", "L0"), ("ternary", "L1")])
@pytest.mark.parametrize("method", ["emsa", "sqh"])
def test_double_integrator_reaches_its_closed_form_optimum(controls, penalty, method):
    """The switches lie on the nodes (N = 60, T = 3), so the piecewise-constant optimum is J* exactly."""
    problem, J_star = double_integrator(controls=controls, penalty=penalty)
    sol = pmp.solve(problem, method=method, mesh=60)
    assert sol.converged
    assert sol.cost == pytest.approx(J_star, rel=1e-9)
    assert independent_cost(problem, sol.controls, sol.mesh) == pytest.approx(J_star, rel=1e-9)
    t = sol.mesh[:-1]
    expected = torch.where(t < (1.5 if penalty else 2.0) - 1e-9, 1.0, -1.0)
    if penalty:
        expected = torch.where((t >= 1.5 - 1e-9) & (t < 2.5 - 1e-9), 0.0, expected)
    assert torch.allclose(sol.controls[:, 0], expected.to(F64), rtol=0, atol=1e-12)  # bang-(off-)bang


def test_double_integrator_optimum_formula():
    assert double_integrator_optimum(3.0) == pytest.approx(-3.0)  # -T^2/3
    assert double_integrator_optimum(3.0, 0.5) == pytest.approx(-1.75)
    with pytest.raises(ValueError, match="c <= T/3"):
        double_integrator_optimum(3.0, 2.0)


def test_basic_msa_cycling_on_a_bang_bang_problem_is_reported():
    problem, _ = double_integrator()
    with pytest.raises(pmp.DivergenceError, match="cycles") as info:
        pmp.solve(problem, method="msa", mesh=30)
    assert info.value.best_controls is not None


def test_sqh_decreases_J_over_accepted_steps_and_records_eps():
    problem, J_star = catalyst_mixing()
    sol = pmp.solve(problem, method="sqh", mesh=100, stop=pmp.Stop(max_iter=60))
    costs = [r.cost for r in sol.history]
    assert all(b <= a for a, b in zip(costs, costs[1:])), costs
    assert all("eps" in r.parameters for r in sol.history)
    assert sum(r.rejected for r in sol.history) > 0  # the sufficient-decrease test did reject steps
    # SQH creeps along the singular arc: J is right long before the gradient is below tol, and
    # `converged` says exactly what the optimality measure says.
    assert abs(sol.cost - J_star) / abs(J_star) < 1e-3
    assert sol.converged == (sol.optimality <= sol.settings["tol"] * max(1.0, abs(sol.cost)))


def test_binary_catalyst_by_relaxation_rounding_and_sqh():
    relaxed, J_star = catalyst_mixing()
    binary, _ = catalyst_mixing("binary")
    N = 100
    sol = pmp.solve(relaxed, mesh=N)
    rounded = pmp.sum_up_rounding(sol.controls, sol.mesh, binary.controls)
    assert set(rounded.flatten().tolist()) <= {0.0, 1.0}
    polished = pmp.solve(binary, method="sqh", mesh=N, init=rounded)
    assert polished.cost >= J_star - 1e-9  # the relaxed optimum bounds every binary control
    assert abs(polished.cost - J_star) / abs(J_star) < 1e-3


def test_sum_up_rounding_keeps_the_integral_within_half_a_step():
    g = torch.Generator().manual_seed(1)
    u = torch.rand(200, 2, dtype=F64, generator=g)
    inner = torch.sort(torch.rand(199, dtype=F64, generator=g)).values
    for mesh in (torch.linspace(0, 1, 201, dtype=F64), torch.cat([torch.zeros(1, dtype=F64), inner, torch.ones(1, dtype=F64)])):
        r = pmp.sum_up_rounding(2 * u - 1, mesh, pmp.Finite([-1.0, 1.0], shape=(2,)))
        h = (mesh[1:] - mesh[:-1])[:, None]
        assert set(r.flatten().tolist()) <= {-1.0, 1.0}
        drift = torch.cumsum(h * ((2 * u - 1) - r) / 2, dim=0).abs().max()
        assert drift <= 0.5 * h.max() + 1e-12


def test_user_supplied_maximiser():
    """A UserSet: the user's function gets the batched data and picks the best of 201 candidates."""
    calls = []

    def maximise(data: pmp.MaximisationData):
        calls.append(data)
        N = data.controls.shape[0]
        grid = torch.linspace(-1, 1, 201, dtype=data.controls.dtype)
        scores = data.objective.candidates(grid[:, None, None].expand(-1, N, 1))
        return grid[scores.argmax(0)][:, None]

    box_problem, J_star = double_integrator()
    problem = pmp.ControlProblem(box_problem.dynamics, box_problem.x0, 3.0, pmp.UserSet(maximise, shape=(1,)),
                                 terminal_cost=box_problem.terminal_cost)
    sol = pmp.solve(problem, method="sqh", mesh=30)
    assert sol.cost == pytest.approx(J_star, rel=1e-9)
    d = next(c for c in calls if c.eps > 0)  # the others measure optimality (rho = eps = 0)
    assert d.times.shape == (30, 3) and d.states.shape == (30, 3, 1, 2) and d.costates.shape == d.states.shape
    assert d.controls.shape == (30, 1) and d.eps > 0 and d.rho == 0.0
    assert sol.settings["maximisers_used"] == {"user": len(calls)}


def test_bad_control_set_and_penalty_input():
    with pytest.raises(ValueError, match="`values` is empty"):
        pmp.Finite([], shape=(1,))
    with pytest.raises(ValueError, match="finite"):
        pmp.Finite([0.0, float("nan")])
    with pytest.raises(ValueError, match=">= 0"):
        pmp.L1(-0.1)
    with pytest.raises(TypeError, match="number"):
        pmp.L0("a lot")
    user = pmp.UserSet(lambda data: data.controls, shape=(1,))
    with pytest.raises(ValueError, match="cannot be combined with a UserSet"):
        pmp.ControlProblem(lambda t, x, u: u, torch.zeros(1), 1.0, user, terminal_cost=lambda x: x[..., 0],
                           control_penalty=pmp.L1(1.0))
    with pytest.raises(TypeError, match="control_penalty"):
        pmp.ControlProblem(lambda t, x, u: u, torch.zeros(1), 1.0, pmp.Reals(1), terminal_cost=lambda x: x[..., 0],
                           control_penalty=0.5)
    binary, _ = double_integrator(controls="binary")
    with pytest.raises(ValueError, match="method='gradient' has no step"):
        pmp.solve(binary, method="gradient", mesh=6)
    l0, _ = double_integrator(penalty="L0")
    with pytest.raises(ValueError, match="L0"):
        pmp.solve(l0, method="gradient", mesh=6)
    with pytest.raises(ValueError, match="outside the control set"):
        pmp.solve(binary, mesh=6, init=0.5)
    with pytest.raises(ValueError, match="must be a pmp.Finite"):
        pmp.sum_up_rounding(torch.zeros(3, 1), torch.linspace(0, 1, 4), pmp.Box(-1, 1))
    with pytest.raises(ValueError, match="unknown maximiser"):
        pmp.solve(binary, mesh=6, maximiser=pmp.Maximiser(kind="newton"))
    with pytest.raises(ValueError, match="sqh option"):
        pmp.solve(binary, method=pmp.SQH(eps0=-1.0), mesh=6)
