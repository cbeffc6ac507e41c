"""Constraints, free final time and static parameters (pmpsolve.constrained).

Checked against numbers computed elsewhere: T* = 2 sqrt(|x0|) of the minimum-time double
integrator, the closed-form optimum of a K-sample problem with a terminal inequality,
finite differences of J for dJ/dT and dJ/dp, the co-state's terminal condition
P(T) = -(grad Phi + nu^T grad psi), and scipy.optimize.least_squares on the same data for a
parameter estimation. Small meshes: the gallery and the benchmark run the full sizes.
"""
import math
import warnings

import numpy as np
import pytest
import torch

import pmpsolve as pmp
from pmpsolve.constrained.transcription import Transcription
from problems.constrained import bryson_denham, goddard, min_time_double_integrator

F64 = torch.float64


def _di(t, x, u):
    return torch.stack([x[..., 1], u[..., 0].expand(x.shape[:-1])], dim=-1)


def _ones(x):
    return torch.ones(x.shape[:-1], dtype=x.dtype)


# ---------------------------------------------------------------------- analytic optima
def test_minimum_time_double_integrator_reaches_two_sqrt_x0():
    problem, T_star = min_time_double_integrator(1.0)
    sol = pmp.solve(problem, mesh=20)
    assert sol.status == "converged" and sol.converged
    assert sol.violation <= 1e-6
    # the switch at T*/2 lies on a node of the even mesh: the mesh's optimum is T* itself
    assert abs(sol.horizon - T_star) <= 1e-5 * T_star
    assert float(sol.mesh[-1]) == pytest.approx(sol.horizon)
    assert sol.state(sol.horizon).abs().max() <= 1e-6
    # bang-bang: -1 then +1, switching at T/2
    u = sol.controls[:, 0]
    assert torch.allclose(u[:10], torch.full((10,), -1.0, dtype=F64), atol=1e-4)
    assert torch.allclose(u[10:], torch.full((10,), 1.0, dtype=F64), atol=1e-4)


@pytest.mark.parametrize("method", ["sqh", "gradient"])
def test_terminal_inequality_and_a_free_time_with_other_methods(method):
    """The K-sample inequality problem below, and x' = u from 1 to 0 in minimum time with |u| <= 2
    and a control cost (T* = 1/2: the running cost 1 + u^2 / 8 gives u = -2 throughout)."""
    x0 = torch.tensor([[0.3], [0.7], [0.5]], dtype=F64)
    problem = pmp.ControlProblem(lambda t, x, u: u.expand(x.shape).clone(), x0, 1.0, pmp.Reals(1),
                                 running_cost=lambda t, x, u: (u ** 2).sum(-1),
                                 terminal_constraints=[pmp.AtMost(lambda x: x - 0.1)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        sol = pmp.solve(problem, method, mesh=8, stop=pmp.Stop(max_iter=1000))
    assert sol.violation <= 1e-6 and sol.cost == pytest.approx(0.36, rel=1e-4)
    problem = pmp.ControlProblem(lambda t, x, u: u.clone(), torch.tensor([1.0], dtype=F64),
                                 pmp.FreeTime(1.0, low=0.1, high=5.0), pmp.Box(-2.0, 2.0, shape=(1,)),
                                 running_cost=lambda t, x, u: 1 + (u ** 2).sum(-1) / 8,
                                 terminal_constraints=[pmp.Equal(lambda x: x)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        sol = pmp.solve(problem, method, mesh=4, stop=pmp.Stop(max_iter=1000))
    assert sol.violation <= 1e-5 and sol.horizon == pytest.approx(0.5, rel=1e-4)


def test_a_state_bound_converges_with_ddp_to_the_analytic_optimum():
    """x' = u, x(0) = 0, J = int_0^1 (u^2/2 - x) dt, x <= 0.3 (a first-order state constraint). Without
    the bound u = 1 - t; with it u = tau - t on [0, tau] (u' = -1 off the boundary, u(tau) = 0 at the
    entry, x(tau) = tau^2/2 = 0.3) and u = 0 on the boundary: tau = sqrt(0.6),
    J* = -tau^3/6 - 0.3 (1 - tau). The piecewise-constant optimum is O(h^2) away (measured with DDP:
    2.3e-3 relative at mesh 10, 8.6e-4 at 16, 1.4e-4 at 40)."""
    problem = pmp.ControlProblem(lambda t, x, u: u.clone(), torch.tensor([0.0], dtype=torch.float64), 1.0,
                                 pmp.Reals(1), running_cost=lambda t, x, u: 0.5 * (u ** 2).sum(-1) - x[..., 0],
                                 path_constraints=[pmp.AtMost(lambda t, x, u: x - 0.3, name="x <= 0.3")])
    tau = math.sqrt(0.6)
    J_star = -tau ** 3 / 6 - 0.3 * (1 - tau)
    sol = pmp.solve(problem, "ddp", mesh=10, stop=pmp.Stop(max_iter=400))
    assert sol.converged and sol.violation <= 1e-6
    assert abs(sol.cost - J_star) <= 3e-3 * abs(J_star)
    # the bound is active from about tau on: the controls there vanish, the multiplier is positive there only
    t = sol.mesh[:-1]
    assert sol.controls[t >= 0.8, 0].abs().max() <= 1e-3
    assert float(sol.multipliers["path"][0, :5].abs().max()) == 0.0


def test_a_state_constraint_active_at_the_free_final_time_only_is_met_there():
    """Maximise the height of x'' = u - 1, u in [0, 1/2], from (0, 1) with a free T and v >= 0: u = 1/2, T* = 2 (the
    apex, v(T*) = 0, where the bound is active at T alone), x(T*) = 1. The bound's end value is a terminal
    inequality of the inner problems (its multiplier ``path_end``): without it a round ended with T past the apex
    (measured: T = 2.0000042, violation 2.1e-6 in two rounds in a row) while the integral penalty, blind to a window
    of that width, grew; with it no round after the first leaves a violation above 1e-6."""
    problem = pmp.ControlProblem(
        lambda t, x, u: torch.stack([x[..., 1], u[..., 0] - 1.0], -1), torch.tensor([0.0, 1.0], dtype=F64),
        pmp.FreeTime(1.0, low=0.1, high=5.0), pmp.Box(0.0, 0.5, shape=(1,)), terminal_cost=lambda x: -x[..., 0],
        path_constraints=[pmp.AtMost(lambda t, x, u: -x[..., 1:2], name="v >= 0")])
    sol = pmp.solve(problem, mesh=20)
    assert sol.converged and sol.violation <= 1e-6
    assert abs(sol.horizon - 2.0) <= 1e-6 and abs(sol.cost + 1.0) <= 1e-9
    assert all(r.violation <= 1e-6 for r in sol.rounds[1:]), [r.violation for r in sol.rounds]
    assert sol.multipliers["path_end"].shape == (1, 1) and float(sol.multipliers["path_end"].min()) >= 0.0


def test_goddard_converges_with_e_msa_from_the_default_start():
    """Goddard's rocket (free tf, m(tf) = 0.6, h >= 1, v >= 0, a singular arc) with E-MSA, the default
    method: an inexact E-MSA solve leaves dJ/dT wrong by up to 2.5 times on the singular arc while the
    merit is accurate, so the static line search interpolates merit values. Before, T never left its guess
    0.2 (every trial rejected; measured here: max_iter = 1000 with T = 0.2). Mesh 10: its optimum
    h(tf) = 1.012809 at tf = 0.19819 (this solve; 1.0128370 at tf = 0.198849 at mesh 200, CasADi's N = 200
    reference 1.0128369 at 0.198851), COPS's published 1.01283."""
    problem, published = goddard()
    sol = pmp.solve(problem, mesh=10, stop=pmp.Stop(max_iter=1000, tol=1e-4))
    assert sol.converged and sol.violation <= 1e-6
    assert abs(-sol.cost - published) <= 3e-5 * published
    assert abs(sol.horizon - 0.1988) <= 2e-3 and sol.horizon != 0.2


def test_minimum_time_bang_bang_on_a_finite_set():
    problem, T_star = min_time_double_integrator(1.0, controls="binary")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        sol = pmp.solve(problem, mesh=10, stop=pmp.Stop(max_iter=800))
    assert set(sol.controls.reshape(-1).tolist()) <= {-1.0, 1.0}
    assert sol.violation <= 1e-6
    assert abs(sol.horizon - T_star) <= 1e-6 * T_star
    # on a finite set the measure is the largest Hamiltonian gap, which the penalised problem
    # leaves on the switching interval: the loop stops when the inner solves stall, not "converged"
    assert sol.status in ("converged", "stalled") and sol.converged == (sol.status == "converged")


def test_terminal_inequality_holds_for_every_sample():
    """x' = u, x_i(1) <= 0.1 for three initial states sharing u, J = int u^2: the largest x0 binds,
    u = 0.1 - max x0 is constant and J* = (0.1 - max x0)^2."""
    x0 = torch.tensor([[0.3], [0.7], [0.5]], dtype=F64)
    problem = pmp.ControlProblem(lambda t, x, u: u.expand(x.shape).clone(), x0, 1.0, pmp.Reals(1),
                                 running_cost=lambda t, x, u: (u ** 2).sum(-1),
                                 terminal_constraints=[pmp.AtMost(lambda x: x - 0.1, name="x(1) <= 0.1")])
    sol = pmp.solve(problem, mesh=8)
    assert sol.converged and sol.violation <= 1e-6
    assert sol.cost == pytest.approx(0.36, rel=1e-5)
    assert torch.allclose(sol.controls, torch.full((8, 1), -0.6, dtype=F64), atol=1e-5)
    nu = sol.multipliers["terminal"]  # [K, 1]: only the binding sample's multiplier is positive
    assert nu.shape == (3, 1) and float(nu[0]) == 0.0 and float(nu[2]) == 0.0 and float(nu[1]) > 0


# ---------------------------------------------------------------------- gradients and multipliers
def _estimation_problem(free=True):
    f = lambda t, x, u, p: torch.stack([x[..., 1], -p[..., 0] * x[..., 0] + u[..., 0]], -1)  # noqa: E731
    L = lambda t, x, u, p: 0.5 * (u ** 2).sum(-1) + 0.1 * p[..., 1] * x[..., 0] ** 2  # noqa: E731
    Phi = lambda x, p: (x ** 2).sum(-1)  # noqa: E731
    x0 = torch.tensor([[1.0, 0.0], [0.5, 0.2], [0.0, 1.0]], dtype=F64)
    horizon = pmp.FreeTime(2.0, low=0.1, high=5.0) if free else 2.0
    return pmp.ControlProblem(f, x0, horizon, pmp.Reals(1), Phi, L, parameters=pmp.Reals(2))


def test_dJ_dT_and_dJ_dp_are_the_costates_of_the_static_states():
    """The co-state of (p, T) at s = 0 gives dJ/d(p, T) (summed over samples): against central
    differences of J at fixed controls."""
    problem = _estimation_problem()
    tr = Transcription(problem, 30, F64, "cpu")
    point = tr.initial_point().with_(parameters=torch.tensor([1.3, 0.7], dtype=F64))
    u = 0.3 * torch.sin(torch.linspace(0, 3, 30, dtype=F64))[:, None]
    sol = pmp.solve(tr.inner_problem(point), mesh=tr.mesh, init=u, stop=pmp.Stop(max_iter=0))
    gradient = -sol.costates_trajectory.values[0].reshape(3, -1)[:, 2:].sum(0)
    z, eps = tr.static(point), 1e-6
    for i in range(3):
        zp, zm = z.clone(), z.clone()
        zp[i] += eps
        zm[i] -= eps
        J = [pmp.cost(tr.inner_problem(tr.with_static(point, w)), u, mesh=tr.mesh, rtol=1e-12, atol=1e-12)
             for w in (zp, zm)]
        assert float(gradient[i]) == pytest.approx((J[0] - J[1]) / (2 * eps), rel=1e-5, abs=1e-8)


def test_ddp_curvature_in_T_is_the_second_derivative_of_the_optimal_merit():
    """The outer loop's curvature in z from DDP (``Transcription.static_hessian`` of its value function at the
    first node, both samples' copies of T) against central second differences of J minimised over the
    controls at T +- eps (each a tight inner solve)."""
    problem = pmp.ControlProblem(
        _di, torch.tensor([[1.0, 0.0], [0.5, 0.5]], dtype=F64), pmp.FreeTime(2.0, low=0.5, high=5.0), pmp.Reals(1),
        running_cost=lambda t, x, u: 0.2 + 0.5 * u[..., 0] ** 2, terminal_cost=lambda x: 5.0 * (x * x).sum(-1))
    tr = Transcription(problem, 40, F64, "cpu")
    point = tr.initial_point()

    def optimum(T):
        inner = tr.inner_problem(tr.with_static(point, torch.tensor([T], dtype=F64)))
        solver = pmp.Solver(inner, method="ddp", mesh=tr.mesh, stop=pmp.Stop(tol=1e-13, max_iter=30))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return solver.run(), solver

    sol, solver = optimum(2.0)
    curvature = float(tr.static_hessian(solver.rule.value_hessian()))
    eps = 1e-3
    second = (optimum(2.0 + eps)[0].cost + optimum(2.0 - eps)[0].cost - 2 * sol.cost) / eps ** 2
    assert curvature == pytest.approx(second, rel=1e-5)


def _central_differences(problem, u, mesh, eps):
    """dJ/du_n [N] by central differences of J, each cost at tight ODE tolerances."""
    tight = dict(rtol=1e-12, atol=1e-14)
    fd = torch.empty(u.shape[0], dtype=F64)
    for n in range(u.shape[0]):
        up, um = u.clone(), u.clone()
        up[n] += eps
        um[n] -= eps
        fd[n] = (pmp.cost(problem, up, mesh=mesh, **tight) - pmp.cost(problem, um, mesh=mesh, **tight)) / (2 * eps)
    return fd


@pytest.mark.parametrize("horizon", [1.0, pmp.FreeTime(1.0, low=0.5, high=2.0)], ids=["fixed T", "free T"])
def test_the_gradient_is_exact_where_a_path_penalty_switches_inside_intervals(horizon):
    """The PHR path penalty max(0, mu + r g)^2 / (2 r) switches on and off inside mesh intervals, where grad_x L
    has kinks: the polynomial co-state strategies add them exactly (ControlProblem.running_cost_hinges). dJ/du
    and dJ/dT against central differences of J; interpolating across the kinks was off by 4.7e-4 of max |dJ/du|
    here (3-30 % on Bryson-Denham's inner problems) and by 1.3e-3 in dJ/dT."""
    f = lambda t, x, u: torch.stack([x[..., 1], u[..., 0].expand(x.shape[:-1])], dim=-1)  # noqa: E731
    problem = pmp.ControlProblem(f, torch.tensor([0.0, 1.0], dtype=F64), horizon, pmp.Reals(1),
                                 running_cost=lambda t, x, u: 0.5 * (u ** 2).sum(-1),
                                 path_constraints=[pmp.AtMost(lambda t, x, u: x[..., :1] - 1 / 9)])
    N, eps, tight = 20, 1e-4, dict(rtol=1e-12, atol=1e-14)
    tr = Transcription(problem, N, F64, "cpu")
    mu = (40 * torch.sin(torch.pi * tr.grid) ** 2 - 15).clamp(min=0)  # positive on the middle third
    u = 6 * (tr.mesh[:-1, None] + 0.5 / N) - 4  # x1 = t - 2 t^2 + t^3 rises to 4/27 > 1/9 and falls back
    point = tr.initial_point(penalty=1e3).with_(path=mu.reshape(1, -1, 1), end_control=u[-1])
    inner = tr.inner_problem(point)
    assert inner.running_cost_hinges is not None
    _, gradient = pmp.cost_gradient(inner, u, mesh=tr.mesh, rtol=1e-10, atol=1e-12)
    fd = _central_differences(inner, u, tr.mesh, eps)
    assert float((gradient[:, 0] - fd).abs().max()) <= 5e-5 * float(fd.abs().max())
    if tr.free:
        sol = pmp.solve(inner, mesh=tr.mesh, init=u, stop=pmp.Stop(max_iter=0), ode=pmp.ODE(rtol=1e-10, atol=1e-12))
        dJ_dT = -float(sol.costates_trajectory.values[0].reshape(-1)[-1])  # the co-state of the T state at s = 0
        z = tr.static(point)
        J = [pmp.cost(tr.inner_problem(tr.with_static(point, z + d)), u, mesh=tr.mesh, **tight) for d in (eps, -eps)]
        assert dJ_dT == pytest.approx((J[0] - J[1]) / (2 * eps), rel=2e-4)


def test_the_inner_problem_takes_many_times_at_once_unless_a_user_function_reads_t():
    """Where the user's f, L and path constraints do not read t, the inner problem's points are evaluated in one
    call (ControlProblem.batched_time: only mu(s) reads the time) and, with a free T, they get s; where one reads
    t, every point is evaluated at its own t = s T under vmap. J and dJ/du agree (here f + 0 t reads t)."""
    from pmpsolve.sweep.pointwise import PointwiseProblem

    def inner(f):
        problem = pmp.ControlProblem(f, torch.tensor([0.0, 1.0], dtype=F64), pmp.FreeTime(1.0, low=0.5, high=2.0),
                                     pmp.Reals(1), running_cost=lambda t, x, u: 0.5 * (u ** 2).sum(-1),
                                     path_constraints=[pmp.AtMost(lambda t, x, u: x[..., :1] - 1 / 9)])
        tr = Transcription(problem, N, F64, "cpu")
        mu = (40 * torch.sin(torch.pi * tr.grid) ** 2 - 15).clamp(min=0)
        return tr.inner_problem(tr.initial_point(penalty=1e3).with_(path=mu.reshape(1, -1, 1), end_control=u[-1]))

    N = 20
    u = 6 * (torch.linspace(0, 1, N + 1, dtype=F64)[:-1, None] + 0.5 / N) - 4
    f = lambda t, x, u: torch.stack([x[..., 1], u[..., 0].expand(x.shape[:-1])], dim=-1)  # noqa: E731
    batched, mapped = inner(f), inner(lambda t, x, u: f(t, x, u) + 0 * t)
    assert batched.batched_time and not mapped.batched_time
    assert not PointwiseProblem(batched, F64, "cpu").dynamics_reads_time
    assert PointwiseProblem(mapped, F64, "cpu").dynamics_reads_time
    (J1, g1), (J2, g2) = (pmp.cost_gradient(p, u, mesh=N) for p in (batched, mapped))
    assert J1 == pytest.approx(J2, rel=1e-14)
    assert torch.allclose(g1, g2, rtol=1e-12, atol=1e-14)


def test_the_gradient_is_accurate_where_a_mixed_constraint_switches_inside_an_interval():
    """g = 0.1 u + x1 - 0.111 reads u: the penalty's switch enters grad_u H, whose Gauss quadrature misses the
    kink (1.5e-4 of max |dJ/du| on that interval); the interpolants of a and w integrated on fine cells there
    (update.hamiltonian.hinge_correction) bring it to the other intervals' 1e-7 level. A state constraint's
    hinges do not read u and keep the plain quadrature."""
    from pmpsolve.sweep.pointwise import PointwiseProblem
    f = lambda t, x, u: torch.stack([x[..., 1], u[..., 0].expand(x.shape[:-1])], dim=-1)  # noqa: E731

    def inner_problem(g):
        problem = pmp.ControlProblem(f, torch.tensor([0.0, 1.0], dtype=F64), 1.0, pmp.Reals(1),
                                     running_cost=lambda t, x, u: 0.5 * (u ** 2).sum(-1),
                                     path_constraints=[pmp.AtMost(g)])
        tr = Transcription(problem, N, F64, "cpu")
        mu = (40 * torch.sin(torch.pi * tr.grid) ** 2 - 15).clamp(min=0)
        return tr, tr.inner_problem(tr.initial_point(penalty=1e3).with_(path=mu.reshape(1, -1, 1),
                                                                         end_control=u[-1]))

    N, eps = 20, 1e-4
    u = 6 * (torch.linspace(0, 1, N + 1, dtype=F64)[:-1, None] + 0.5 / N) - 4
    tr, inner = inner_problem(lambda t, x, u: 0.1 * u + x[..., :1] - 0.111)
    assert PointwiseProblem(inner, F64, "cpu").hinges_read_control
    _, state_bound = inner_problem(lambda t, x, u: x[..., :1] - 0.111)
    assert not PointwiseProblem(state_bound, F64, "cpu").hinges_read_control
    _, gradient = pmp.cost_gradient(inner, u, mesh=tr.mesh, rtol=1e-10, atol=1e-12)
    fd = _central_differences(inner, u, tr.mesh, eps)
    assert float((gradient[:, 0] - fd).abs().max()) <= 5e-6 * float(fd.abs().max())


def test_the_static_line_search_finds_the_merit_minimum_despite_a_wrong_slope():
    """The step rule of the line search in (p, T) (outer._next_step) on a merit m(a) = (a - 0.02)^2 along the
    line, given the slope at 0 2.5 times too steep (an inexact inner solve's gradient in T: Goddard's first
    static step was 25 times too long and its slope 2.5 times too steep). Halving alone (4 trials: 1 ... 1/8)
    never reaches a decrease; the interpolation does, within 4 trials, near a = 0.02."""
    from pmpsolve.constrained.outer import LINE_SEARCH_STEPS, _line_curvature, _next_step

    def merit(a):
        return (a - 0.02) ** 2

    m0, slope = merit(0.0), 2.5 * -0.04
    alpha, trials = 1.0, []
    for _ in range(LINE_SEARCH_STEPS):
        if merit(alpha) <= m0 + 1e-4 * alpha * slope:
            break
        trials.append((alpha, merit(alpha)))
        alpha = _next_step(m0, slope, trials)
    else:
        pytest.fail(f"no decrease in {LINE_SEARCH_STEPS} trials: {trials}")
    assert abs(alpha - 0.02) <= 0.005, (alpha, trials)
    assert all(merit(0.5 ** k) > m0 for k in range(LINE_SEARCH_STEPS))
    # the parabola through three values of a quadratic is the quadratic: its curvature 2
    assert _line_curvature(m0, trials[-1:] + [(alpha, merit(alpha))]) == pytest.approx(2.0)


def test_terminal_multipliers_satisfy_the_costate_condition():
    """At the solution P(T) = -(grad Phi + nu^T grad psi): here Phi = 0 and psi(x) = x, so
    P(T) = -nu; and the free T meets the transversality condition (dJ/dT = 0)."""
    problem, _ = min_time_double_integrator(1.0)
    sol = pmp.solve(problem, mesh=20)
    nu = sol.multipliers["terminal"][0]
    P_T = sol.costate(sol.horizon)
    assert torch.allclose(P_T, -nu, atol=1e-4 * float(nu.abs().max()))
    # dJ/dT = (1/T) int_0^T H dt = 0, H = 1 - P . f(x, u) (P = -dJ/dx): H at the interval midpoints
    mid = 0.5 * (sol.mesh[1:] + sol.mesh[:-1])
    x, P = sol.state(mid), sol.costate(mid)
    H = 1.0 - (P * torch.stack([x[:, 1], sol.controls[:, 0]], -1)).sum(-1)
    assert float((H * (sol.mesh[1:] - sol.mesh[:-1])).sum()) / sol.horizon == pytest.approx(0.0, abs=1e-4)


def test_path_multipliers_carry_the_costate_jump_at_the_junctions_of_an_order_two_bound():
    """Bryson-Denham (l = 1/9): x1 <= l is of order two, its multiplier an atom at each junction (t = 1/3,
    2/3) where P1 jumps by 2 / (9 l^2) = 18 (lambda1' = -mu: P1 from -18 to 0 to 18). The reported path
    multipliers (piecewise linear on the nodes) integrate to the co-state's jump over each junction, and the
    terminal multipliers are (-18, 6). Multipliers sampled at the nodes alone integrated to 18.6 here (23.6 at
    mesh 100): the penalty's force between the nodes was missing."""
    problem, J_star = bryson_denham(1 / 9)
    sol = pmp.solve(problem, "ddp", mesh=200, stop=pmp.Stop(max_iter=400))
    assert sol.converged and abs(sol.cost - J_star) <= 1e-4 * J_star
    mu, t = sol.multipliers["path"][0, :, 0], sol.multipliers["path_times"]
    pieces = 0.5 * (mu[1:] + mu[:-1]) * (t[1:] - t[:-1])  # exact for piecewise linear mu
    middle = 0.5 * (t[1:] + t[:-1])
    jump_in = float(sol.costate(0.5)[0] - sol.costate(0.2)[0])
    jump_out = float(sol.costate(0.8)[0] - sol.costate(0.5)[0])
    assert jump_in == pytest.approx(18.0, rel=1e-3) and jump_out == pytest.approx(18.0, rel=1e-3)
    assert float(pieces[middle < 0.5].sum()) == pytest.approx(jump_in, rel=1e-3)
    assert float(pieces[middle > 0.5].sum()) == pytest.approx(jump_out, rel=1e-3)
    assert float(mu[(t > 0.36) & (t < 0.64)].abs().max()) <= 1e-6 * float(mu.max())  # atoms, not a spread
    assert torch.allclose(sol.multipliers["terminal"][0], torch.tensor([-18.0, 6.0], dtype=F64), rtol=1e-3)


def test_parameter_estimation_matches_least_squares():
    """Fit (k, c) of x'' = -k x - c x' to noisy final states of six trajectories; scipy's
    least_squares on the same residuals (solve_ivp) finds the same parameters."""
    from scipy.integrate import solve_ivp
    from scipy.optimize import least_squares

    rng = np.random.default_rng(0)
    x0 = rng.uniform(-1, 1, size=(6, 2))
    k_true, c_true, T = 2.0, 0.4, 1.5

    def simulate(k, c, start):
        sol = solve_ivp(lambda t, x: [x[1], -k * x[0] - c * x[1]], (0, T), start, rtol=1e-12, atol=1e-12)
        return sol.y[:, -1]

    observed = np.array([simulate(k_true, c_true, s) for s in x0]) + 0.01 * rng.standard_normal((6, 2))
    y = torch.tensor(observed, dtype=F64)
    problem = pmp.ControlProblem(
        lambda t, x, u, p: torch.stack([x[..., 1], -p[..., 0] * x[..., 0] - p[..., 1] * x[..., 1]], -1),
        torch.tensor(x0, dtype=F64), T, None, terminal_cost=lambda x, p: ((x - y) ** 2).sum(-1),
        parameters=pmp.Box(torch.tensor([0.1, 0.0]), torch.tensor([10.0, 5.0])))
    sol = pmp.solve(problem, mesh=10, stop=pmp.Stop(tol=1e-9))
    reference = least_squares(lambda p: np.concatenate([simulate(p[0], p[1], s) for s in x0]) - observed.ravel(),
                              x0=[5.05, 2.5], bounds=([0.1, 0.0], [10.0, 5.0]), xtol=1e-14, ftol=1e-14, gtol=1e-14)
    assert sol.controls.shape == (10, 0)
    assert torch.allclose(sol.parameters, torch.tensor(reference.x, dtype=F64), atol=1e-5)
    assert abs(float(sol.parameters[0]) - k_true) < 0.2 and abs(float(sol.parameters[1]) - c_true) < 0.2


# ---------------------------------------------------------------------- infeasible, interrupted
def test_an_unreachable_target_ends_infeasible_with_the_least_violation():
    """|u| <= 0.1 cannot bring (1, 0) to the origin in T = 1: status "infeasible", the constraint named."""
    problem = pmp.ControlProblem(_di, torch.tensor([1.0, 0.0], dtype=F64), 1.0, pmp.Box(-0.1, 0.1, shape=(1,)),
                                 running_cost=lambda t, x, u: 0.5 * (u ** 2).sum(-1),
                                 terminal_constraints=[pmp.Equal(lambda x: x, name="origin")])
    with pytest.warns(RuntimeWarning, match="origin"):
        sol = pmp.solve(problem, mesh=10)
    assert sol.status == "infeasible" and not sol.converged
    assert "origin" in sol.message
    # the least violation: braking all the way leaves x1(1) = 1 - 0.05 = 0.95; nothing does better
    assert 0.94 <= sol.violation <= 0.951


@pytest.mark.parametrize("status, optimality, cost, settled", [
    ("converged", 1.0, 4.0, True), ("stalled", 3.9e-3, 4.0, True), ("stalled", 4.1e-3, 4.0, False),
    ("stalled", 9e-4, 0.1, True), ("stalled", 1.1e-3, 0.1, False), ("max_iter", 1e-9, 4.0, False)])
def test_a_stalled_inner_solve_settles_its_round_within_the_settled_measure(status, optimality, cost, settled):
    """Penalties grow after an inner solve that converged or stalled with measure <= 1e-3 max(1, |J|)."""
    from types import SimpleNamespace
    from pmpsolve.constrained.outer import _settled
    assert _settled(SimpleNamespace(status=status, optimality=optimality, cost=cost)) is settled


#: (violation, inner measure) of the rounds of E-MSA on Bryson-Denham at mesh 200 (J about 4), without the stop on
#: flat rounds: the violation met 1e-6 in round 21, the measure stayed at 1e-2 to round 59
EMSA_BRYSON_DENHAM = [
    (0.372, 0.01), (0.107, 0.00038), (0.115, 2.2e-05), (0.101, 1.3e-05), (0.0238, 2.8e-05), (0.0109, 1.4e-05),
    (0.0031, 3.2e-06), (0.00073, 0.0037), (0.000344, 0.0028), (0.000103, 0.005), (5.15e-05, 0.00018),
    (1.84e-05, 0.0048), (1.16e-05, 0.03), (6.48e-06, 0.017), (5.07e-06, 0.0057), (3.56e-06, 0.00072),
    (2.71e-06, 0.023), (1.87e-06, 0.025), (1.15e-06, 0.039), (1.06e-06, 0.019), (1.32e-06, 0.02), (7.55e-07, 0.014),
    (7.5e-07, 0.012), (6.92e-07, 0.027), (5.6e-07, 0.018), (5.46e-07, 0.015), (5.46e-07, 0.014), (5.23e-07, 0.018),
    (3.63e-07, 0.033), (1.2e-06, 0.019), (3.39e-07, 0.013), (3.06e-07, 0.0071), (2.96e-07, 0.0079), (9.81e-07, 0.011),
    (8.55e-07, 0.011), (5.01e-07, 0.013), (5.41e-07, 0.038), (4.2e-07, 0.012), (1.36e-06, 0.013)]
#: the same with DDP (converged in round 17)
DDP_BRYSON_DENHAM = [
    (0.371, 1.3e-4), (0.108, 2.6e-6), (0.115, 2.3e-6), (0.101, 1.9e-5), (0.0238, 1.4e-7), (0.0109, 3.6e-7),
    (0.0031, 3.7e-9), (0.000732, 1.1e-8), (0.00034, 2.7e-8), (0.000103, 6.3e-8), (5.12e-05, 2.3e-8),
    (1.76e-05, 1.6e-7), (9.17e-06, 1.2e-7), (6.01e-06, 3.3e-7), (2.8e-06, 8.4e-8), (1.65e-06, 1.3e-7),
    (9.62e-07, 1.7e-4), (5.32e-07, 1.7e-7)]


@pytest.mark.parametrize("rounds, first_flat", [
    (EMSA_BRYSON_DENHAM, 27),  # rounds 18-27: the violation met 1e-6 in round 21, the measure 20-200x its best
    (DDP_BRYSON_DENHAM, None),
    ([(1e-4 * 0.7 ** k, 1e-2) for k in range(20)], None),  # the violation falls 30 % a round (met in round 13)
    ([(1e-7, 1e-2 * 0.84 ** k) for k in range(40)], None),  # feasible, the measure halves every 4 rounds
    ([(1e-3, 1e-2)] * 40, None),  # far from feasibility: the penalties' growth decides (``infeasible``)
    ([(1e-5, 1e-3)] * 40, 10),  # no gain at all: the ten rounds after the first
])
def test_the_loop_ends_after_ten_rounds_without_gain_near_feasibility(rounds, first_flat):
    from pmpsolve.constrained.outer import _Progress
    trend = _Progress(1e-6)
    flat = [trend.flat(v, m / 4) for v, m in rounds]
    assert (flat.index(True) if any(flat) else None) == first_flat


def test_flat_rounds_end_the_solve_as_stalled_with_the_best_iterate(monkeypatch):
    """The loop's end on flat rounds (forced after round 1 here): status "stalled", the reason in the message, the
    least-violation iterate returned."""
    from pmpsolve.constrained import outer
    calls = []
    monkeypatch.setattr(outer._Progress, "flat", lambda self, v, m: calls.append(v) or len(calls) >= 2)
    problem, _ = min_time_double_integrator(1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        sol = pmp.solve(problem, mesh=8, stop=pmp.Stop(max_iter=500))
    assert sol.status == "stalled" and not sol.converged and len(sol.rounds) == 2
    assert "no progress in the last 10 rounds" in sol.message and "method='ddp'" in sol.message
    assert sol.violation == min(calls)


def test_ctrl_c_returns_the_best_iterate_so_far():
    problem, _ = min_time_double_integrator(1.0)
    calls = []

    def interrupt(record, controls):
        calls.append(record.iteration)
        if len(calls) == 30:
            raise KeyboardInterrupt

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        sol = pmp.solve(problem, mesh=10, callback=interrupt)
    assert sol.status == "interrupted" and not sol.converged
    assert sol.horizon > 0 and math.isfinite(sol.cost) and sol.rounds


def test_solution_of_a_constrained_solve_saves_and_loads(tmp_path):
    problem, _ = min_time_double_integrator(1.0)
    sol = pmp.solve(problem, mesh=10)
    sol.save(tmp_path / "s.pt")
    back = pmp.Solution.load(tmp_path / "s.pt")
    assert back.horizon == sol.horizon and back.violation == sol.violation
    assert torch.equal(back.multipliers["terminal"], sol.multipliers["terminal"])


def test_an_unconstrained_solution_reports_its_horizon_and_no_violation():
    problem = pmp.ControlProblem(lambda t, x, u: u.clone(), torch.tensor([1.0]), 2.0, pmp.Reals(1),
                                 terminal_cost=lambda x: x[..., 0] ** 2,
                                 running_cost=lambda t, x, u: (u ** 2).sum(-1))
    sol = pmp.solve(problem, mesh=5)
    assert sol.horizon == 2.0 and sol.violation == 0.0 and sol.parameters is None and sol.multipliers is None


# ---------------------------------------------------------------------- bad input
def _problem(**changes):
    arguments = dict(dynamics=_di, x0=torch.tensor([1.0, 0.0]), horizon=1.0, controls=pmp.Reals(1),
                     running_cost=lambda t, x, u: (u ** 2).sum(-1))
    arguments.update(changes)
    return pmp.ControlProblem(**arguments)


@pytest.mark.parametrize("changes, error, match", [
    (dict(terminal_constraints=[pmp.Equal(lambda x: x[..., 0])]), ValueError, "keep the last axis"),
    (dict(terminal_constraints=[pmp.Equal(lambda x: x.sum())]), ValueError, r"\[\.\.\., c\]"),
    (dict(terminal_constraints=[pmp.Equal(lambda x: (x > 0).long())]), TypeError, "real floats"),
    (dict(path_constraints=[pmp.Equal(lambda t, x, u: x)]), ValueError, "equality on the whole path"),
    (dict(path_constraints=[lambda t, x, u: x]), TypeError, "wrap the function"),
    (dict(path_constraints=[pmp.AtMost(lambda t, x, u: x[:1])]), ValueError, "batches"),
    (dict(parameters=pmp.Reals(1)), TypeError, r"dynamics\(t, x, u, p\)"),
    (dict(controls=None), ValueError, "nothing to optimise"),
    (dict(dynamics=lambda t, x, u, p: _di(t, x, u)), TypeError, "no `parameters`"),
    (dict(parameters=pmp.Finite([0.0, 1.0])), TypeError, "pmp.Reals"),
])
def test_bad_input_says_what_to_change(changes, error, match):
    with pytest.raises(error, match=match):
        _problem(**changes)


@pytest.mark.parametrize("arguments, match", [
    ((1.0,), None), ((0.0,), "low < guess < high"), ((2.0, 0.5, 1.0), "low < guess < high"),
    ((1.0, 2.0, 2.0), "below `high`"), ((1.0, -1.0), ">= 0"), ((float("nan"),), "number"),
])
def test_free_time_checks_its_bounds(arguments, match):
    if match is None:
        assert pmp.FreeTime(*arguments).guess == arguments[0]
        return
    with pytest.raises((ValueError, TypeError), match=match):
        pmp.FreeTime(*arguments)


def test_a_constrained_problem_is_not_run_by_the_plain_solver():
    problem, _ = min_time_double_integrator(1.0)
    with pytest.raises(TypeError, match="pmp.solve"):
        pmp.Solver(problem, mesh=10)
