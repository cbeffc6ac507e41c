"""DDP over the mesh intervals (``pmp.DDP``, ``pmpsolve.update.ddp``): numbers computed elsewhere.

The discretised linear-quadratic problem is solved independently (exact zero-order-hold matrices by
Van Loan's integral, a discrete Riccati recursion with cross terms, numpy/scipy); the gains are
checked against finite differences of DDP's own forward pass; the box QP against enumeration of
its active sets.
"""
import itertools
import math
import warnings

import numpy as np
import pytest
import scipy.integrate
import scipy.linalg
import torch

import pmpsolve as pmp
from pmpsolve.update.boxqp import box_qp
from problems import REFERENCE_PROBLEMS, lqr, lqr_samples
from problems.lqr import linear_quadratic_problem, random_lq_data


def _quiet_solve(problem, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return pmp.solve(problem, **kwargs)


def _random_lq(seed=0, n=3, m=2, T=2.0):
    """(A, B, Q, R, S, x0, T) of ``problems.lqr.random_lqr``'s instance ``seed`` (terminal cost S = I)."""
    return (*random_lq_data(n, m, seed), T)


def _discrete_lq(A, B, Q, R, S, x0, T, N):
    """The piecewise-constant LQ problem on N uniform intervals, solved exactly: x_{n+1} = Ad x_n + Bd u_n and
    the stage cost 1/2 (x_n, u_n)' M (x_n, u_n) from Van Loan's block exponential, then the discrete Riccati
    recursion. Returns (u* [N, m], gains K_n [N, m, n], J*, the value's Hessian P_0 [n, n] at the first node)."""
    n, m = B.shape
    h = T / N
    Abar = np.zeros((n + m, n + m))
    Abar[:n, :n], Abar[:n, n:] = A, B
    C = np.block([[-Abar.T, scipy.linalg.block_diag(Q, R)], [np.zeros_like(Abar), Abar]])
    F = scipy.linalg.expm(C * h)
    E, M = F[n + m:, n + m:], F[n + m:, n + m:].T @ F[:n + m, n + m:]
    Ad, Bd = E[:n, :n], E[:n, n:]
    P, gains = S.copy(), []
    for _ in range(N):
        Qxx, Quu, Qux = M[:n, :n] + Ad.T @ P @ Ad, M[n:, n:] + Bd.T @ P @ Bd, M[n:, :n] + Bd.T @ P @ Ad
        K = -np.linalg.solve(Quu, Qux)
        P = Qxx + Qux.T @ K
        P = 0.5 * (P + P.T)
        gains.append(K)
    gains = gains[::-1]
    x, controls = x0.copy(), []
    for K in gains:
        controls.append(K @ x)
        x = Ad @ x + Bd @ controls[-1]
    return np.array(controls), np.array(gains), 0.5 * x0 @ P @ x0, P


def _expansion(problem, method, mesh, init=None, later=False):
    """The solver after iteration 0's sweeps with the DDP rule's expansion and gains (alpha = 1 proposed);
    ``later``: the rule proposes as in a later iteration than the first."""
    solver = pmp.Solver(problem, method=method, mesh=mesh)
    state = solver.measure(solver.init(init))
    backward, data, _ = state.measured
    rule = solver.rule
    rule._iteration += int(later)
    rule.begin(solver.sweeper, state.forward, backward)
    rule.propose(data)
    return solver, state, rule


def test_one_step_on_linear_quadratic_is_the_discrete_riccati_solution():
    A, B, Q, R, S, x0, T = _random_lq()
    N = 20
    controls, _, optimum, _ = _discrete_lq(A, B, Q, R, S, x0, T, N)
    problem = linear_quadratic_problem(A, B, Q, R, x0, T, S=S)
    # model_steps=4: the curvature of the expansion to 4e-9 (its RK4 error); the default's 1 step: 1e-6
    for method, tol in ((pmp.DDP(model_steps=4), 1e-7), (pmp.DDP(), 1e-5)):
        sol = _quiet_solve(problem, method=method, mesh=N, stop=pmp.Stop(max_iter=1))
        assert sol.iterations == 1 and sol.converged  # the one step is certified optimal by the engine's measure
        error = np.abs(sol.controls.numpy() - controls).max() / np.abs(controls).max()
        assert error < tol, error
        assert abs(sol.cost - optimum) < 1e-8 * optimum  # J by the engine's adaptive sweep (rtol 1e-9)


def test_lqr_reference_problem_in_one_iteration():
    problem, reference = lqr()  # J* = 0.673999 (continuous Riccati)
    ddp = _quiet_solve(problem, method="ddp", mesh=50)
    emsa = _quiet_solve(problem, method="emsa", mesh=50)
    # one step leaves the curvature model's error (RK4, one step per interval of h = 0.1): a second removes it
    assert ddp.converged and ddp.iterations <= 2 and ddp.method == "ddp"
    exact = _quiet_solve(problem, method=pmp.DDP(model_steps=4), mesh=50)
    assert exact.converged and exact.iterations == 1
    assert abs(ddp.cost - emsa.cost) < 1e-8 * emsa.cost  # the same discretised optimum
    assert abs(ddp.cost - reference) < 2e-3 * reference  # the continuous one, to the mesh's O(h^2)
    assert len(ddp.history) == ddp.iterations + 1 and ddp.history[-1].optimality <= 1e-5  # records as every method's


def test_feedback_gain_is_the_derivative_of_the_optimal_first_control():
    """K_0 = d u*_0 / d x_0: DDP's gain against central differences of the controls its one-step forward
    pass gives from perturbed initial states (and against the independent Riccati gain)."""
    A, B, Q, R, S, x0, T = _random_lq(seed=1)
    N, eps = 10, 1e-4
    method = pmp.DDP(model_steps=4)
    problem = linear_quadratic_problem(A, B, Q, R, x0, T, S=S)
    _, _, rule = _expansion(problem, method, N)
    K0 = rule._gains.K[0].numpy()  # [m, n]
    columns = []
    for i in range(len(x0)):
        shift = eps * np.eye(len(x0))[i]
        first = [_quiet_solve(linear_quadratic_problem(A, B, Q, R, x0 + sign * shift, T, S=S), method=method,
                              mesh=N, stop=pmp.Stop(max_iter=1)).controls[0].numpy() for sign in (1, -1)]
        columns.append((first[0] - first[1]) / (2 * eps))
    differences = np.stack(columns, axis=1)
    _, riccati, _, _ = _discrete_lq(A, B, Q, R, S, x0, T, N)
    assert np.abs(K0 - differences).max() < 1e-6 * np.abs(K0).max()
    assert np.abs(K0 - riccati[0]).max() < 1e-6 * np.abs(K0).max()


def test_value_hessian_is_the_riccati_matrix_at_the_first_node():
    """``DDP.value_hessian`` (the outer loop's curvature in a free T or parameters): V_0 = d2 J*/d x0^2, the
    discrete Riccati matrix P_0 of the piecewise-constant problem, and the continuous one's P(0) (the Riccati
    ODE integrated by scipy) to O(h^2)."""
    A, B, Q, R, S, x0, T = _random_lq(seed=2)
    N = 20
    # two iterations (tol below J's rounding): the first takes the Gauss-Newton curvature, which gives no V_0
    stop = pmp.Stop(max_iter=2, tol=1e-15)
    solver = pmp.Solver(linear_quadratic_problem(A, B, Q, R, x0, T, S=S), method=pmp.DDP(model_steps=4), mesh=N,
                        stop=stop)
    assert solver.rule.value_hessian() is None  # before a backward pass
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        solver.run()
    V0 = solver.rule.value_hessian().numpy()
    P0 = _discrete_lq(A, B, Q, R, S, x0, T, N)[3]
    assert np.abs(V0 - P0).max() < 2e-7 * np.abs(P0).max()

    def riccati(t, p):
        P = p.reshape(A.shape)
        return -(A.T @ P + P @ A - P @ B @ np.linalg.solve(R, B.T @ P) + Q).ravel()

    continuous = scipy.integrate.solve_ivp(riccati, (T, 0.0), S.ravel(), rtol=1e-12, atol=1e-12).y[:, -1]
    errors = []
    for mesh in (20, 40):
        solver = pmp.Solver(linear_quadratic_problem(A, B, Q, R, x0, T, S=S), method="ddp", mesh=mesh, stop=stop)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            solver.run()
        errors.append(np.abs(solver.rule.value_hessian().numpy() - continuous.reshape(A.shape)).max())
    assert 3.0 < errors[0] / errors[1] < 5.0, errors  # second order in h


def _along_forward_pass(problem, N, start, alpha=1e-2, forward_solves=0):
    """The expansion's (linear, quadratic) terms at ``start`` and central differences of J along DDP's forward
    pass u(alpha) (feedback on the new trajectory) for the same two terms. alpha = 1e-2: J's error (rtol
    1e-9) over alpha^2 stays at 1e-5 of the second difference."""
    solver, state, rule = _expansion(problem, pmp.DDP(model_steps=4, forward_solves=forward_solves), N, init=start,
                                     later=True)  # the exact curvature (the first iteration tries Gauss-Newton's)
    gains = rule._gains
    assert rule.mu == 0.0 and gains.linear < 0
    J = {a: float(solver.sweeper.forward(rule._rollout(start, gains, a)).cost) for a in (-alpha, alpha)}
    slope = (J[alpha] - J[-alpha]) / (2 * alpha)
    curvature = (J[alpha] + J[-alpha] - 2 * state.cost) / alpha ** 2
    return gains, slope, curvature


@pytest.mark.parametrize("forward_solves", [0, 1])
def test_predicted_decrease_matches_finite_differences_of_the_forward_pass(forward_solves):
    """Nonlinear dynamics (Rayleigh), near the optimum where mu = 0: the first-order term exactly. (The
    second-order one is Newton's, the dynamics' curvature weighted by the co-state rather than by DDP's
    V_x = co-state + O(step): it differs from J's along the closed loop by O(step), 2e-3 here.) The feedback
    acting on the linear prediction of the closed loop (forward_solves=0) or on the nodes corrected by one
    batched solve (1)."""
    problem, _ = REFERENCE_PROBLEMS["rayleigh"]()
    N = 20
    mesh = torch.linspace(0, problem.horizon, N + 1, dtype=torch.float64)
    start = _quiet_solve(problem, method="emsa", mesh=N).controls + 0.3 * torch.sin(mesh[:-1, None])
    gains, slope, curvature = _along_forward_pass(problem, N, start, forward_solves=forward_solves)
    assert abs(slope - gains.linear) < 2e-5 * abs(gains.linear)  # the central difference's O(alpha^2)
    assert abs(curvature - 2 * gains.quadratic) < 1e-2 * abs(2 * gains.quadratic)


def test_predicted_curvature_matches_finite_differences_with_linear_dynamics():
    """Linear dynamics and a quartic cost: no dynamics curvature, so the expansion's second-order term is
    exactly J's along the forward pass (to the differences' own error)."""
    A, B, Q, R, S, x0, T = _random_lq(seed=3)
    base = linear_quadratic_problem(A, B, Q, R, x0, T, S=S)
    problem = pmp.ControlProblem(
        base.dynamics, base.x0, T, pmp.Reals(2), terminal_cost=base.terminal_cost,
        running_cost=lambda t, x, u: base.running_cost(t, x, u) + 0.2 * (x ** 4).sum(-1) + 0.1 * (u ** 4).sum(-1))
    N = 20
    start = 0.5 * torch.ones(N, 2, dtype=torch.float64)
    gains, slope, curvature = _along_forward_pass(problem, N, start)
    assert abs(slope - gains.linear) < 2e-5 * abs(gains.linear)  # the central difference's O(alpha^2)
    assert abs(curvature - 2 * gains.quadratic) < 1e-3 * abs(2 * gains.quadratic)


def _proposal(problem, method, N, later=False):
    solver, state, rule = _expansion(problem, method, N, later=later)
    return rule._rollout(state.controls, rule._gains, 1.0), rule


def test_indefinite_exact_curvature_falls_back_to_gauss_newton():
    """Rayleigh from u = 0, as in a later iteration (exact curvature first): the co-state-weighted dynamics'
    curvature makes Q_uu indefinite; the iteration then takes the Gauss-Newton expansion at mu = 0, i.e.
    proposes exactly what hessian="gauss-newton" does."""
    problem, _ = REFERENCE_PROBLEMS["rayleigh"]()
    reference, rule = _proposal(problem, pmp.DDP(hessian="gauss-newton"), 20, later=True)
    assert rule.mu == 0.0 and rule._gains.positive and not rule._switched
    proposal, rule = _proposal(problem, pmp.DDP(), 20, later=True)
    assert rule._switched and rule._gauss_newton and rule.mu == 0.0
    assert torch.equal(proposal, reference)


def test_first_iteration_tries_gauss_newton_then_exact():
    """The first iteration's curvature is Gauss-Newton's where it is positive definite (van der Pol: what
    hessian="gauss-newton" proposes, the exact one proposing something else); where it is singular (catalyst
    mixing: no running cost, a linear terminal cost, no curvature in u) the exact one, still at mu = 0."""
    problem, _ = REFERENCE_PROBLEMS["vanderpol"]()
    reference, _ = _proposal(problem, pmp.DDP(hessian="gauss-newton"), 20)
    proposal, rule = _proposal(problem, pmp.DDP(), 20)
    assert rule._gauss_newton and not rule._switched
    assert torch.equal(proposal, reference)
    later, rule = _proposal(problem, pmp.DDP(), 20, later=True)
    assert not rule._gauss_newton and not torch.equal(later, reference)
    problem, _ = REFERENCE_PROBLEMS["catalyst"]()
    proposal, rule = _proposal(problem, pmp.DDP(), 20)
    assert rule._switched and not rule._gauss_newton and rule.mu == 0.0 and rule._gains.positive
    exact, _ = _proposal(problem, pmp.DDP(), 20, later=True)
    assert torch.equal(proposal, exact) and torch.isfinite(proposal).all()


def test_rejected_step_is_followed_by_the_minimiser_of_the_interpolating_parabola():
    """Predicted J(a) - J(0) = -a + a^2/4 (linear -1, quadratic 1/4); measured at a = 1: +1, i.e. the parabola
    -a + 2 a^2, minimal at a = 1/4. A measured change that makes the minimiser longer than shrink * a, or
    that is not finite, gives shrink * a; a shorter one than a / 10 gives a / 10."""
    problem, _ = REFERENCE_PROBLEMS["rayleigh"]()
    _, _, rule = _expansion(problem, pmp.DDP(), 10)
    rule._gains = rule._gains._replace(linear=-1.0, quadratic=0.25)
    rule._expected, rule._noise = 0.75, 1e-8
    for change, expected in ((1.0, 0.25), (-0.9, 0.5), (math.inf, 0.5), (100.0, 0.1)):
        rule._trial_change = change
        assert rule._shorter(1.0) == pytest.approx(expected, rel=1e-12)


def test_kept_full_step_with_a_poor_ratio_grows_mu():
    """The trust-region ratio rule: a kept full step (alpha = 1) whose decrease of J is 0.1 of the predicted one
    grows mu, one of 0.9 shrinks it; a predicted decrease at J's noise level cannot be judged and does not grow it."""
    from pmpsolve.update.rules import NoiseFloor

    problem, _ = REFERENCE_PROBLEMS["rayleigh"]()
    _, _, rule = _expansion(problem, pmp.DDP(), 10)

    def judged(predicted, ratio, cost=10.0):
        rule.noise = NoiseFloor(1e-8)  # noise level 10 * 1e-8 * |J| = 1e-6 at J = 10
        rule.alpha, rule.mu, rule._delta, rule._expected = 1.0, 1.0, 1.0, predicted
        assert rule.judge(cost, cost - ratio * predicted, 0.0)  # kept (c = 1e-4)
        return rule.mu

    assert judged(1.0, 0.1) > 1.0
    assert judged(1.0, 0.24) > 1.0
    assert judged(1.0, 0.9) < 1.0
    assert judged(1.0, 0.25) < 1.0
    assert judged(1e-7, 0.1) < 1.0  # unmeasurable: shrinks as for any kept full step


def test_noise_level_steps_that_never_lower_j_stop_ddp_as_stalled():
    """Kept steps whose predicted decrease is below J's noise and that do not lower the lowest J (DDP alternating
    between two controls whose J differs by less than the noise): after NOISE_PATIENCE of them in a row the rule
    says it cannot improve J measurably; a measurable step, or one that lowers J, starts the count again."""
    from pmpsolve.update import ddp
    from pmpsolve.update.rules import NoiseFloor

    problem, _ = REFERENCE_PROBLEMS["rayleigh"]()
    _, _, rule = _expansion(problem, pmp.DDP(), 10)
    rule.noise = NoiseFloor(1e-8)  # noise level 1e-6 at J = 10
    rule.alpha = 1.0

    def step(old, new, predicted=1e-8):
        rule._expected = predicted
        assert rule.judge(old, new, 0.0)
        return rule.converged()

    lowest = 10.0 - 5e-7
    assert step(10.0, lowest) is None  # a new lowest J
    patience = ddp.NOISE_PATIENCE
    for i in range(patience - 1):  # up and down within the noise, never below the lowest
        assert step(lowest + 1e-9 * (i % 2), lowest + 1e-9 * ((i + 1) % 2)) is None
    lowest -= 1e-7
    assert step(lowest + 1e-9, lowest) is None  # lower than any J before: the count starts again
    for _ in range(patience - 1):
        assert step(lowest, lowest + 1e-9) is None
    assert step(lowest + 1e-9, lowest + 5e-10, predicted=2e-6) is None  # measurable (noise 1e-6): starts again
    for _ in range(patience - 1):
        assert step(lowest, lowest + 1e-9) is None
    assert "cannot improve J measurably" in step(lowest, lowest + 1e-9)


def _enumerated_box_qp(H, g, lower, upper):
    """The minimiser over every assignment free / at the lower / at the upper bound (exact for a convex QP)."""
    best, best_value = None, np.inf
    m = len(g)
    for pattern in itertools.product((0, 1, 2), repeat=m):
        d = np.where(np.array(pattern) == 1, lower, np.where(np.array(pattern) == 2, upper, 0.0))
        free = np.array(pattern) == 0
        if free.any():
            d[free] = np.linalg.solve(H[np.ix_(free, free)], -(g[free] + H[np.ix_(free, ~free)] @ d[~free]))
        if np.all(d >= lower - 1e-12) and np.all(d <= upper + 1e-12):
            value = g @ d + 0.5 * d @ H @ d
            if value < best_value:
                best, best_value = d, value
    return best


@pytest.mark.parametrize("seed", range(5))
def test_box_qp_against_enumeration_of_active_sets(seed):
    rng = np.random.default_rng(seed)
    m = 4
    L = rng.normal(size=(m, m))
    H = L @ L.T + 0.1 * np.eye(m)
    g = 3 * rng.normal(size=m)
    lower, upper = -rng.uniform(0.1, 1, size=m), rng.uniform(0.1, 1, size=m)
    expected = _enumerated_box_qp(H, g, lower, upper)
    t = lambda a: torch.as_tensor(a, dtype=torch.float64)  # noqa: E731
    result = box_qp(t(H), t(g), t(lower), t(upper), torch.zeros(m, dtype=torch.float64))
    assert result.positive
    assert np.abs(result.solution.numpy() - expected).max() < 1e-10
    at_bound = (np.abs(expected - lower) < 1e-12) | (np.abs(expected - upper) < 1e-12)
    assert np.array_equal(~result.free.numpy(), at_bound)


def test_two_boxed_controls_reach_the_same_optimum_as_emsa():
    """The box QP inside the backward pass (m = 2): a convex LQ problem with an active box."""
    A, B, Q, R, S, x0, T = _random_lq(seed=2)
    base = linear_quadratic_problem(A, B, Q, R, 3 * x0, T, S=S)
    problem = pmp.ControlProblem(base.dynamics, base.x0, T, pmp.Box(-0.5, 0.5, shape=(2,)),
                                 terminal_cost=base.terminal_cost, running_cost=base.running_cost)
    ddp = _quiet_solve(problem, method="ddp", mesh=20)
    emsa = _quiet_solve(problem, method="emsa", mesh=20)
    assert ddp.converged and emsa.converged and ddp.iterations <= 10
    assert ((ddp.controls.abs() - 0.5).abs() < 1e-12).any()  # the box is active
    assert abs(ddp.cost - emsa.cost) < 1e-7 * abs(emsa.cost)


def test_box_problem_van_der_pol():
    problem, _ = REFERENCE_PROBLEMS["vanderpol"]()  # u in [-0.3, 1]
    ddp = _quiet_solve(problem, method="ddp", mesh=10)
    emsa = _quiet_solve(problem, method="emsa", mesh=10)
    assert ddp.converged and ddp.iterations <= 15
    assert abs(ddp.cost - emsa.cost) < 1e-7 * abs(emsa.cost)
    gn = _quiet_solve(problem, method=pmp.DDP(hessian="gauss-newton"), mesh=10)
    assert gn.converged and abs(gn.cost - emsa.cost) < 1e-7 * abs(emsa.cost)


def test_samples_share_one_control():
    problem, _ = lqr_samples(4)
    ddp = _quiet_solve(problem, method="ddp", mesh=20)
    emsa = _quiet_solve(problem, method="emsa", mesh=20)
    assert ddp.converged and ddp.iterations <= 2  # still linear-quadratic: one Newton step (+ the model's error)
    assert abs(ddp.cost - emsa.cost) < 1e-8 * emsa.cost
    assert ddp.controls.shape == (20, 1)


def test_same_call_same_bits():
    problem, _ = REFERENCE_PROBLEMS["vanderpol"]()
    first = _quiet_solve(problem, method="ddp", mesh=8)
    second = _quiet_solve(problem, method="ddp", mesh=8)
    assert first.iterations > 2
    assert torch.equal(first.controls, second.controls)
    assert [r.cost for r in first.history] == [r.cost for r in second.history]
    assert [r.optimality for r in first.history] == [r.optimality for r in second.history]


def _problem(controls, **kwargs):
    return pmp.ControlProblem(lambda t, x, u: u.clone(), torch.tensor([1.0], dtype=torch.float64), 1.0, controls,
                              terminal_cost=lambda x: 2.5 * x[..., 0] ** 2, **kwargs)


@pytest.mark.parametrize("controls, kwargs, words", [
    (pmp.Finite([-1.0, 0.0, 1.0], shape=(1,)), {}, "pmp.Reals or pmp.Box"),
    (pmp.Reals(1), {"control_penalty": pmp.L1(0.1)}, "L1 control cost"),
    (pmp.Reals(1), {"control_penalty": pmp.L0(0.1)}, "L0 control cost"),
    (pmp.Ball(1.0, shape=(1,)), {}, "pmp.Reals or pmp.Box"),
])
def test_refused_control_sets_and_costs_name_the_methods_that_handle_them(controls, kwargs, words):
    with pytest.raises(ValueError, match=words) as info:
        pmp.Solver(_problem(controls, **kwargs), method="ddp", mesh=10)
    assert "'emsa', 'sqh' or 'msa'" in str(info.value)


def test_refused_too_many_samples():
    many, _ = lqr_samples(600)  # K n = 1200: a [1200, 1200] value matrix per node
    with pytest.raises(ValueError, match=r"\[1200, 1200\].*method='emsa'"):
        pmp.Solver(many, method="ddp", mesh=10)


@pytest.mark.parametrize("options, words", [
    ({"hessian": "newton"}, "'exact' or 'gauss-newton'"),
    ({"shrink": 1.5}, "shrink"),
    ({"mu_factor": 1.0}, "mu_factor"),
    ({"model_steps": 0}, "model_steps"),
    ({"forward_solves": -1}, "forward_solves"),
    ({"mu0": -1.0}, "mu0"),
])
def test_bad_options_are_refused(options, words):
    with pytest.raises(ValueError, match=words):
        pmp.DDP(**options)


def test_the_solver_computes_no_trial_gain_for_ddp_but_records_the_kept_one():
    """DDP judges by its predicted decrease (``judges_gain`` False): its judge gets no gain, and the record still
    has the kept proposal's Hamiltonian gain over the iterate."""
    problem, _ = REFERENCE_PROBLEMS["vanderpol"]()
    solver = pmp.Solver(problem, method="ddp", mesh=20)
    seen, judge = [], solver.rule.judge
    solver.rule.judge = lambda old, new, gain: seen.append(gain) or judge(old, new, gain)
    state = solver.step(solver.init())
    assert seen and all(g is None for g in seen)
    _, data, _ = solver.measure(solver.init()).measured
    _, gain = solver._gain(data, state.controls)
    assert gain != 0.0 and state.history[1].hamiltonian_gain == pytest.approx(gain, rel=1e-12)
