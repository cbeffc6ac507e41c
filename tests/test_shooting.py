"""The multiple-shooting forward sweep (pmpsolve/shooting.py) against an independent integrator, its
fallback, its policy, and the pieces it rests on (the affine scan, the time probe)."""
import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

import pmpsolve as pmp
from pmpsolve.sweep.mesh import make_mesh
from pmpsolve.sweep.pointwise import PointwiseProblem, reads_time
from pmpsolve.sweep.scan import affine_prefix_scan, affine_suffix_scan
from pmpsolve.sweep.shooting import NewtonRate, ShootingPolicy
from pmpsolve.sweep.sweeps import Sweeper
from problems import rayleigh, van_der_pol

RTOL, ATOL = 1e-9, 1e-11


def scipy_nodes(problem, controls, mesh):
    """X at the nodes and J by scipy's DOP853 at rtol 1e-13, interval by interval (K = 1)."""
    pw = PointwiseProblem(problem, torch.float64, "cpu")
    n = pw.state_dim
    z, nodes = np.concatenate([pw.x0[0].numpy(), [0.0]]), [pw.x0[0].numpy()]

    def rhs_for(u):
        def rhs(t, z):
            t, x = torch.tensor(t, dtype=torch.float64), torch.tensor(z[:n])[None]
            return np.concatenate([pw.dynamics(t, x, u)[0].numpy(), pw.running_cost(t, x, u).numpy()])
        return rhs

    for j in range(len(mesh) - 1):
        z = np.concatenate([z[:n], [z[n]]])
        z = solve_ivp(rhs_for(controls[j]), (float(mesh[j]), float(mesh[j + 1])), z, method="DOP853",
                      rtol=1e-13, atol=1e-15).y[:, -1]
        nodes.append(z[:n])
    X = np.array(nodes)
    return X, float(z[n] + pw.terminal_cost(torch.tensor(X[-1])[None])[0])


def two_controls(problem, N: int = 40):
    """A Sweeper on N intervals, random controls u_start [N, 1] and u 0.05 away (real defects), and the mesh."""
    pw = PointwiseProblem(problem, torch.float64, "cpu")
    mesh = make_mesh(N, problem.horizon, torch.float64, "cpu")
    g = torch.Generator().manual_seed(1)
    u_start = 0.3 * torch.rand(N, 1, generator=g, dtype=torch.float64)
    u = u_start + 0.05 * torch.rand(N, 1, generator=g, dtype=torch.float64)
    return Sweeper(pw, mesh, rtol=RTOL, atol=ATOL), u_start, u, mesh


def assert_matches_scipy(problem, sweep, u, mesh) -> None:
    """Nodes and J of ``sweep`` within 10 rtol of scipy's DOP853 at rtol 1e-13."""
    X, J = scipy_nodes(problem, u, mesh)
    scale = max(1.0, float(np.abs(X).max()))
    assert np.abs(sweep.states.values[:, 0].numpy() - X).max() <= 10 * RTOL * scale
    assert abs(float(sweep.cost) - J) <= 10 * RTOL * max(1.0, abs(J))


@pytest.mark.parametrize("make", [van_der_pol, rayleigh])
def test_shooting_matches_an_independent_integrator(make):
    problem = make()[0]
    sweeper, u_start, u, mesh = two_controls(problem)
    start = sweeper.forward(u_start)
    shot, sequential = sweeper.forward(u, start=start), sweeper.forward(u)
    assert (shot.strategy, sequential.strategy) == ("shooting", "sequential")
    assert shot.evaluations < sequential.evaluations / 3
    # Measured: van der Pol 9e-11 (sequential 1.5e-9), Rayleigh 2.6e-9 (1.4e-9) at rtol 1e-9, |X| <= 7.
    assert_matches_scipy(problem, shot, u, mesh)
    # the samples inside the intervals are the solver's, consistent with the nodes it returns
    scale = max(1.0, float(sequential.states.values.abs().max()))
    assert shot.samples.interior.shape == sequential.samples.interior.shape
    assert (shot.samples.interior - sequential.samples.interior).abs().max() <= 10 * RTOL * scale


def test_accepted_sweep_is_the_corrected_newton_iterate_whatever_the_start():
    # The sweep accepted with defects up to 0.1 of the tolerance is moved by its Newton correction
    # (first order, no integration): J no longer depends on where Newton started. Measured on van der
    # Pol at N = 200: J from nodes of controls 1e-3 away against J from the exact nodes, 1.6e-14
    # relative (6.1e-11 when the defects were left in: noise E-MSA compares decreases of 1e-12 with).
    problem = van_der_pol()[0]
    pw = PointwiseProblem(problem, torch.float64, "cpu")
    mesh = make_mesh(200, problem.horizon, torch.float64, "cpu")
    g = torch.Generator().manual_seed(1)
    u = 0.3 * torch.rand(200, 1, generator=g, dtype=torch.float64)
    near = u + 1e-3 * torch.randn(200, 1, generator=g, dtype=torch.float64)
    sweeper = Sweeper(pw, mesh, rtol=RTOL, atol=ATOL)
    exact = sweeper.forward(u, start=sweeper.forward(u))
    shot = sweeper.forward(u, start=sweeper.forward(near, start=sweeper.forward(near)))
    assert (exact.strategy, shot.strategy) == ("shooting", "shooting")
    assert abs(float(shot.cost - exact.cost)) <= 1e-12 * abs(float(exact.cost))


@pytest.mark.parametrize("make", [van_der_pol, rayleigh])
def test_known_newton_rate_saves_integrations_at_the_same_accuracy(make):
    # A sweep that starts knowing Newton's contraction factor d_{k+1} / d_k (from the sweeps before it)
    # accepts the corrected iterate once 10 theta d_k is within the tolerance (theta seen from a defect no
    # smaller than d_k) instead of integrating once more.
    # Measured at N = 40: van der Pol 272 -> 204 evaluations (J 2e-12 apart), Rayleigh 168 both.
    problem = make()[0]
    sweeper, u_start, u, mesh = two_controls(problem)
    start = sweeper.forward(u_start)  # sequential: no rate known
    plain = sweeper.forward(u, start=start)
    rate = plain.newton_rate
    assert plain.strategy == "shooting" and rate.steps and all(theta < 1e-2 for _, theta in rate.steps)
    informed = sweeper.forward(u, start=start._replace(newton_rate=plain.newton_rate))
    assert informed.strategy == "shooting" and informed.evaluations <= plain.evaluations
    if make is van_der_pol:  # one integration fewer
        assert informed.evaluations < plain.evaluations
    for sweep in (plain, informed):
        assert_matches_scipy(problem, sweep, u, mesh)
    assert abs(float(informed.cost - plain.cost)) <= 1e-2 * RTOL * max(1.0, abs(float(plain.cost)))


def test_newton_rate_counts_only_fast_steps_and_predicts_within_their_reach():
    rate = NewtonRate().observe(1e6, 1e5)  # Newton's slow phase (10-fold) does not count
    assert rate == NewtonRate()
    rate = rate.observe(1.3e3, 1e-4).observe(5, 1e-7)  # 1e7-fold; the second starts below the counted range
    assert rate == NewtonRate(((1.3e3, 1e-4 / 1.3e3),))
    assert rate.settles(1e3, 0.1) and not rate.settles(2e3, 0.1)  # beyond the largest defect seen
    assert not NewtonRate(((1e4, 1e-4),)).settles(1e3, 0.1)  # 10 theta d = 1 > 0.1


def test_newton_rate_bounds_what_a_step_leaves_linear_or_quadratic():
    # A step from d leaves a d + c d^2. Seen from 1e5 with a = 1e-7 (a differenced Jacobian) and c = 1e-9:
    a, c = 1e-7, 1e-9
    left = lambda d: a * d + c * d ** 2  # noqa: E731
    rate = NewtonRate().observe(1e5, left(1e5)).observe(1e2, left(1e2))
    for d in (20.0, 1e2, 1e3, 1e4, 1e5):  # the prediction, without the safety factor, is never below
        bound = min(theta * d for seen, theta in rate.steps if seen >= d)
        assert left(d) <= bound
    # a quadratic model from the first step, left(1e5) / 1e5^2 d^2, under-predicts at d = 20: 4.0e-7 < 2.4e-6
    assert left(1e5) / 1e10 * 20 ** 2 < left(20.0)
    # the step from 1e2 is the tighter bound below it: the sweep settles at d = 1e2, not at 1e3
    assert rate.settles(1e2, 0.1) and not rate.settles(1e3, 0.1)
    # a step that is beaten in both (a smaller defect, a larger factor) is not kept
    assert rate.observe(50.0, 50.0 * 1e-3).steps == rate.steps


def test_prediction_of_the_control_change_moves_the_start_values_closer():
    problem = van_der_pol()[0]
    pw = PointwiseProblem(problem, torch.float64, "cpu")
    mesh = make_mesh(40, problem.horizon, torch.float64, "cpu")
    g = torch.Generator().manual_seed(2)
    u_old = 0.3 * torch.rand(40, 1, generator=g, dtype=torch.float64)
    u_new = u_old + 0.01 * torch.randn(40, 1, generator=g, dtype=torch.float64)
    sweeper = Sweeper(pw, mesh, rtol=RTOL, atol=ATOL)
    old = sweeper.forward(u_old, start=sweeper.forward(u_old))  # a shooting sweep: it has transitions
    assert old.strategy == "shooting" and old.transitions.shape == (40, 1, 2, 2)
    true = sweeper.forward(u_new).states.values
    predicted = sweeper._start_values(old, u_new)
    # measured at h = 0.125: 1.7e-2 from the old nodes, 5.0e-4 from the predicted ones
    assert (predicted - true).abs().max() <= 0.1 * (old.states.values - true).abs().max()


def test_shooting_falls_back_to_the_sequential_sweep_bit_for_bit():
    # x' = x^2 + u from x0 = 1: x = 1 / (1 - t) for u = 0, from the nodes of u = -1 one integration
    # does not meet the tolerance; with one allowed the sequential sweep is the result, unchanged.
    problem = pmp.ControlProblem(lambda t, x, u: x ** 2 + u, torch.tensor([1.0]), 0.9, pmp.Reals(1),
                                 terminal_cost=lambda x: x[..., 0])
    pw = PointwiseProblem(problem, torch.float64, "cpu")
    mesh = make_mesh(10, 0.9, torch.float64, "cpu")
    sweeper = Sweeper(pw, mesh, rtol=RTOL, atol=ATOL)
    start = sweeper.forward(-torch.ones(10, 1, dtype=torch.float64))
    u = torch.zeros(10, 1, dtype=torch.float64)
    assert sweeper.forward(u, start=start).strategy == "shooting"  # converges with the default policy
    sweeper.forward_policy = ShootingPolicy(max_newton=1)
    fallback, sequential = sweeper.forward(u, start=start), sweeper.forward(u)
    assert fallback.strategy == "sequential"
    assert torch.equal(fallback.states.values, sequential.states.values) and torch.equal(fallback.cost, sequential.cost)
    assert fallback.evaluations > sequential.evaluations  # the Newton attempt is counted


def test_policy_keeps_sweeps_sequential_where_shooting_does_not_apply():
    problem = van_der_pol()[0]
    pw = PointwiseProblem(problem, torch.float64, "cpu")
    mesh = make_mesh(8, problem.horizon, torch.float64, "cpu")
    u = torch.full((8, 1), 0.1, dtype=torch.float64)
    fixed = Sweeper(pw, mesh, method="rk4", options={"step_size": 0.1})
    assert fixed.forward(u, start=fixed.forward(u)).strategy == "sequential"  # needs an adaptive method
    adaptive = Sweeper(pw, mesh)
    start = adaptive.forward(u)
    assert adaptive.forward(u, start=start, differentiable=True).strategy == "sequential"
    adaptive.forward_policy = ShootingPolicy(enabled=False)
    assert adaptive.forward(u, start=start).strategy == "sequential"
    assert not ShootingPolicy().applies(PointwiseProblem(pmp.ControlProblem(
        problem.dynamics, torch.zeros(81, 2), 1.0, pmp.Reals(1), terminal_cost=lambda x: x[..., 0]),
        torch.float64, "cpu"), adaptive.ode,
        differentiable=False)  # K n (n + 1) = 486 > 480


def test_first_sweep_shoots_from_the_initial_state_held_at_every_node():
    problem = van_der_pol()[0]  # nonlinear: several Newton steps from the flat start
    state = pmp.Solver(problem, mesh=30).init()
    sequential = pmp.Solver(problem, mesh=30)
    sequential.sweeper.forward_policy = ShootingPolicy(enabled=False)
    reference = sequential.init()
    assert (state.forward.strategy, reference.forward.strategy) == ("shooting", "sequential")
    assert abs(state.cost - reference.cost) <= 10 * RTOL * max(1.0, abs(reference.cost))


def test_solve_with_and_without_shooting_agree():
    problem = rayleigh()[0]
    with_shooting = pmp.solve(problem, mesh=20, stop=pmp.Stop(max_iter=3))
    solver = pmp.Solver(problem, mesh=20, stop=pmp.Stop(max_iter=3))
    solver.sweeper.forward_policy = ShootingPolicy(enabled=False)
    state = solver.init()
    while not state.done:
        state = solver.step(state)
    without = solver.solution(state)
    assert abs(with_shooting.cost - without.cost) <= 1e-8 * abs(without.cost)
    assert (with_shooting.controls - without.controls).abs().max() <= 1e-6


def test_affine_scans_equal_the_recursions():
    g = torch.Generator().manual_seed(0)
    A, b = torch.randn(13, 2, 3, 3, generator=g, dtype=torch.float64) / 2, torch.randn(13, 2, 3, generator=g,
                                                                                         dtype=torch.float64)
    _, forward = affine_prefix_scan(A, b)
    y = torch.zeros(2, 3, dtype=torch.float64)
    for j in range(13):
        y = (A[j] @ y.unsqueeze(-1)).squeeze(-1) + b[j]
        assert torch.allclose(forward[j], y, rtol=1e-12, atol=1e-12)
    _, backward = affine_suffix_scan(A, b)
    y = torch.zeros(2, 3, dtype=torch.float64)
    for j in reversed(range(13)):
        y = (A[j] @ y.unsqueeze(-1)).squeeze(-1) + b[j]
        assert torch.allclose(backward[j], y, rtol=1e-12, atol=1e-12)


def test_time_probe_and_the_plain_batched_call():
    x0, reads = torch.zeros(1, 2, dtype=torch.float64), lambda fn: reads_time(fn, x0, 1)
    assert not reads(lambda t, x, u: x * u)
    assert reads(lambda t, x, u: x * t) and reads(lambda t, x, u: x * float(t))
    assert reads(lambda t, x, u: torch.where(t < 1, x, u))
    # f that ignores t is called once on all points; one that reads t is mapped: same values
    free, timed = (pmp.ControlProblem(f, torch.ones(2), 1.0, pmp.Reals(1), terminal_cost=lambda x: x[..., 0])
                   for f in (lambda t, x, u: x * u, lambda t, x, u: x * u + 0 * t))
    a, b = (PointwiseProblem(p, torch.float64, "cpu") for p in (free, timed))
    assert not a.dynamics_reads_time and b.dynamics_reads_time
    t, x, u = (torch.rand(shape, dtype=torch.float64) for shape in ((5,), (5, 3, 1, 2), (5, 1)))
    assert torch.equal(a.dynamics(t, x, u), b.dynamics(t, x, u))


def test_shooting_in_float32_differences_centrally_and_meets_its_tolerance():
    # float32: forward differences would carry sqrt(eps) ~ 3e-4 into Phi; the central ones (2n copies, where
    # float64 takes n) are used there, and the sweep matches the float64 sweep to its own tolerance
    problem = van_der_pol()[0]
    sweeps, copies = {}, {}
    for dtype in (torch.float32, torch.float64):
        pw = PointwiseProblem(problem, dtype, "cpu")
        mesh = make_mesh(40, problem.horizon, dtype, "cpu")
        g = torch.Generator().manual_seed(1)
        u_start = 0.3 * torch.rand(40, 1, generator=g, dtype=torch.float64)
        u = (u_start + 0.05 * torch.rand(40, 1, generator=g, dtype=torch.float64)).to(dtype)
        low_precision = dtype == torch.float32
        sweeper = Sweeper(pw, mesh, rtol=1e-5 if low_precision else RTOL, atol=1e-7 if low_precision else ATOL)
        start = sweeper.forward(u_start.to(dtype))
        solve, seen = sweeper.ode.solve, []
        sweeper.ode.solve = lambda rhs, y0, *a, **k: (seen.append(y0.shape[1]), solve(rhs, y0, *a, **k))[1]
        sweeps[dtype], copies[dtype] = sweeper.forward(u, start=start), set(seen)
    assert copies == {torch.float32: {1 + 2 * 2}, torch.float64: {1 + 2}}
    low = sweeps[torch.float32]
    assert low.strategy == "shooting" and low.transitions.dtype == torch.float32
    X64, J64 = sweeps[torch.float64].states.values, float(sweeps[torch.float64].cost)
    assert (low.states.values.double() - X64).abs().max() <= 10 * 1e-5 * max(1.0, float(X64.abs().max()))
    assert abs(float(low.cost) - J64) <= 10 * 1e-5 * abs(J64)


def test_all_interval_solves_start_from_the_remembered_step():
    """An all-intervals solve on sigma in [0, 1] starts from the step its kind's last solve proposed after its
    first accepted step (``StepMemory``; the whole axis at first), not from torchdiffeq's initial-step heuristic
    (about 1e-3 here, then at most tenfold a step). Same accuracy, fewer evaluations from the second solve on."""
    from pmpsolve.sweep.ode import ODE
    ode = ODE(torch.linspace(0, 1, 3, dtype=torch.float64), "dopri5", rtol=RTOL, atol=ATOL)
    calls = [0]

    def rhs(s, y):
        calls[0] += 1
        return torch.stack([y[1], -4 * y[0]])  # x = cos(2 s)

    unit, y0 = torch.tensor([0.0, 1.0], dtype=torch.float64), torch.tensor([1.0, 0.0], dtype=torch.float64)

    def solve(options):
        calls[0] = 0
        end = ode.solve(rhs, y0, unit, options=options)[-1]
        assert abs(float(end[0]) - np.cos(2.0)) <= 10 * RTOL
        return calls[0]

    heuristic = solve({})
    memory = ode.step_memory("test")
    assert memory.step == 1.0 and ode.step_memory("test") is memory and ode.step_memory("other") is not memory
    first = solve({"step_memory": memory})  # the whole axis: rejected, then the controller's steps
    remembered = memory.step
    assert 0 < remembered < 1.0
    second = solve({"step_memory": memory})
    assert second < heuristic and second <= first
    # measured: 260 evaluations from the heuristic's start, 277 from the whole axis, 253 from the remembered 0.019
    assert ODE(unit, "rk4", options={"step_size": 0.1}).step_memory("test") is None  # fixed steps: none


def test_shooting_remembers_its_first_step_only_without_kinks_between_the_nodes():
    """A running cost with hinges (a penalised path constraint) has kinks no step of the all-intervals solve ends
    at; long steps across them passed the error test and stalled Bryson-Denham's DDP inner solves at the penalty
    1e9 (138 iterations, "stalled", against 89, "converged"). Its shooting sweeps keep the heuristic's start."""
    from pmpsolve.constrained.transcription import Transcription
    N = 20

    def sweep(path_constraints):
        problem = pmp.ControlProblem(lambda t, x, u: torch.stack([x[..., 1], u[..., 0].expand(x.shape[:-1])], -1),
                                     torch.tensor([0.0, 1.0], dtype=torch.float64), 1.0, pmp.Reals(1),
                                     running_cost=lambda t, x, u: 0.5 * (u ** 2).sum(-1),
                                     terminal_constraints=[pmp.Equal(lambda x: x[..., :1])],
                                     path_constraints=path_constraints)
        tr = Transcription(problem, N, torch.float64, "cpu")
        pw = PointwiseProblem(tr.inner_problem(tr.initial_point(penalty=1e3)), torch.float64, "cpu")
        sweeper = Sweeper(pw, tr.mesh, rtol=RTOL, atol=ATOL)
        u = torch.linspace(-1, 1, N, dtype=torch.float64)[:, None]
        shot = sweeper.forward(u, start=sweeper.forward(0.9 * u))
        assert shot.strategy == "shooting"
        return pw.has_hinges, set(sweeper.ode._memories)

    assert sweep(None) == (False, {"shooting"})
    hinged, kinds = sweep([pmp.AtMost(lambda t, x, u: x[..., :1] - 0.05)])
    assert hinged and "shooting" not in kinds
