"""The sweeps against closed forms: a linear ODE with known state and co-state."""
import math
import subprocess
import sys
import textwrap

import pytest
import torch

import pmpsolve as pmp
from pmpsolve.sweep.mesh import make_mesh
from pmpsolve.sweep.pointwise import PointwiseProblem
from pmpsolve.sweep.costate import CostatePolicy, ParallelScanCostate, SequentialLinearCostate
from pmpsolve.sweep.sweeps import Sweeper


def _linear_problem(a=-0.7, c=2.0):
    # x' = a x + u, J = c/2 x_T^2 + 1/2 int x^2: X and P have closed forms on each interval.
    return pmp.ControlProblem(lambda t, x, u: a * x + u, torch.tensor([1.0], dtype=torch.float64), 2.0, pmp.Reals(1),
                              terminal_cost=lambda x: 0.5 * c * x[..., 0] ** 2,
                              running_cost=lambda t, x, u: 0.5 * x[..., 0] ** 2)


def _exact(a, c, mesh, u, fractions=()):
    """X and P at the nodes (P by the exact backward recursion), both at t_n + f h_n for f in
    ``fractions`` ([N, len(fractions)] each), and J, all in closed form."""
    X = [1.0]
    J = 0.0
    for n in range(len(u)):
        h, v = mesh[n + 1] - mesh[n], u[n]
        x0 = X[-1]
        e = math.exp(a * h)
        X.append(e * x0 + v / a * (e - 1))
        # int_0^h x(s)^2 ds with x(s) = (x0 + v/a) e^{as} - v/a
        A, B = x0 + v / a, -v / a
        J += 0.5 * (A * A * (math.exp(2 * a * h) - 1) / (2 * a) + 2 * A * B * (e - 1) / a + B * B * h)
    J += 0.5 * c * X[-1] ** 2
    # P' = -a P + x (from H = p (a x + u) - x^2/2), P_T = -c x_T.
    P = [None] * (len(u) + 1)
    P[-1] = -c * X[-1]
    X_in, P_in = [None] * len(u), [None] * len(u)
    for n in reversed(range(len(u))):
        h, v = mesh[n + 1] - mesh[n], u[n]
        # Solve backwards on [0, h]: p(s) with p(h) = P[n+1], x(s) = A e^{as} + B.
        x0 = X[n]
        A, B = x0 + v / a, -v / a
        # p(s) = e^{-as} [K + int_0^s e^{a r} x(r) dr]; choose K from p(h).
        I = lambda s: A * (math.exp(2 * a * s) - 1) / (2 * a) + B * (math.exp(a * s) - 1) / a  # noqa: E731
        K = P[n + 1] * math.exp(a * h) - I(h)
        P[n] = K
        X_in[n] = [A * math.exp(a * f * h) + B for f in fractions]
        P_in[n] = [math.exp(-a * f * h) * (K + I(f * h)) for f in fractions]
    as_tensor = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    return as_tensor(X), as_tensor(P), J, as_tensor(X_in), as_tensor(P_in)


STRATEGIES = {"parallel": CostatePolicy(), "sequential": CostatePolicy(parallel=False),
              "autograd": CostatePolicy(linear_max_elements=0)}


def _sweep_errors(N, a=-0.7, c=2.0, strategy="parallel", rtol=1e-12, atol=1e-14):
    """Max errors of X and P at the nodes, of J, and of X and P at the Gauss points (3 per interval)."""
    problem = _linear_problem(a, c)
    pw = PointwiseProblem(problem, torch.float64, "cpu")
    mesh = make_mesh(N, 2.0, torch.float64, "cpu")
    u = torch.sin(torch.arange(N, dtype=torch.float64) * 16 / N).unsqueeze(1)
    sweeper = Sweeper(pw, mesh, rtol=rtol, atol=atol)
    sweeper.costate_policy = STRATEGIES[strategy]
    fw = sweeper.forward(u)
    bw = sweeper.backward(u, fw)
    gauss = sweeper.gauss_fractions
    X, P, J, X_in, P_in = _exact(a, c, mesh.tolist(), u[:, 0].tolist(), gauss.tolist())
    return (float((fw.states.values[:, 0, 0] - X).abs().max()), float((bw.costates.values[:, 0, 0] - P).abs().max()),
            abs(float(fw.cost) - J), float((fw.samples.on_intervals(gauss)[:, :, 0, 0] - X_in).abs().max()),
            float((bw.samples.on_intervals(gauss)[:, :, 0, 0] - P_in).abs().max()))


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_sweeps_on_a_linear_ode_with_known_solution(strategy):
    """State, co-state and J are exact to the ODE tolerance, at the nodes and at the Gauss points, on
    a coarse mesh as on a fine one: both come from the solvers (X in the co-state equation from the
    forward solver's samples), not from the Hermite interpolants, whose error would be O(h^4) (the
    co-state's was 2e-6 at N = 8 and fell 16x per halving of h before)."""
    for N in (8, 16, 32):
        errors = _sweep_errors(N, strategy=strategy)
        assert max(errors) < 1e-11, (N, errors)


@pytest.mark.parametrize("method", ["dopri5", "bosh3"])
def test_sampling_inside_the_intervals_leaves_the_steps_alone(method):
    """The forward sweep with samples inside the intervals takes the same steps as the one without:
    the same J and node values, bit for bit, and the same evaluations."""
    from problems import REFERENCE_PROBLEMS

    problem, _ = REFERENCE_PROBLEMS["vanderpol"]()
    pw = PointwiseProblem(problem, torch.float64, "cpu")
    sweeper = Sweeper(pw, make_mesh(30, problem.horizon, torch.float64, "cpu"), method=method)
    u = 0.5 * torch.sin(torch.arange(30, dtype=torch.float64)).unsqueeze(1).clamp(-0.3, 1.0)
    with_samples, without = sweeper.forward(u), sweeper.forward(u, samples=False)
    assert without.samples is None and with_samples.samples.interior.shape == (30, 9, 1, 2)
    assert torch.equal(with_samples.cost, without.cost)
    assert torch.equal(with_samples.states.values, without.states.values)
    assert with_samples.evaluations == without.evaluations


def test_fixed_step_samples_come_from_the_steps():
    """rk4 on the node grid: the samples inside an interval are cubic Hermite on the solver's own step
    (O(step^4)), the node values and J are those of the node-only solve."""
    problem = _linear_problem()
    pw = PointwiseProblem(problem, torch.float64, "cpu")
    mesh = make_mesh(8, 2.0, torch.float64, "cpu")
    u = torch.sin(torch.arange(8, dtype=torch.float64) * 2).unsqueeze(1)
    sweeper = Sweeper(pw, mesh, method="rk4", options={"step_size": 0.025})
    fw, plain = sweeper.forward(u), sweeper.forward(u, samples=False)
    assert torch.equal(fw.cost, plain.cost) and torch.equal(fw.states.values, plain.states.values)
    gauss = sweeper.gauss_fractions
    _, _, _, X_in, P_in = _exact(-0.7, 2.0, mesh.tolist(), u[:, 0].tolist(), gauss.tolist())
    bw = sweeper.backward(u, fw)
    assert float((fw.samples.on_intervals(gauss)[:, :, 0, 0] - X_in).abs().max()) < 1e-8
    assert float((bw.samples.on_intervals(gauss)[:, :, 0, 0] - P_in).abs().max()) < 1e-8


@pytest.mark.parametrize("name", ["vanderpol", "catalyst", "lqr-samples"])
def test_parallel_costate_sweep_equals_the_sequential_one(name):
    """The linear co-state sweep over all intervals at once (transition maps + suffix scan) gives the
    co-state of the interval-by-interval backward solve, with a fraction of its evaluations."""
    from problems import REFERENCE_PROBLEMS, lqr_samples

    problem, _ = lqr_samples(20) if name == "lqr-samples" else REFERENCE_PROBLEMS[name]()
    pw = PointwiseProblem(problem, torch.float64, "cpu")
    N = 50
    mesh = make_mesh(N, problem.horizon, torch.float64, "cpu")
    low, high = problem.controls.bounds(torch.float64, "cpu")
    u = torch.clamp(0.5 * torch.sin(torch.arange(N, dtype=torch.float64) / 3).unsqueeze(1), low, high)
    sweeper = Sweeper(pw, mesh, rtol=1e-10, atol=1e-12)
    assert isinstance(sweeper.costate_policy.choose(pw, mesh, sweeper.ode), ParallelScanCostate)
    fw = sweeper.forward(u)
    parallel = sweeper.backward(u, fw)
    sweeper.costate_policy = CostatePolicy(parallel=False)
    assert isinstance(sweeper.costate_policy.choose(pw, mesh, sweeper.ode), SequentialLinearCostate)
    sequential = sweeper.backward(u, fw)
    P, Q = parallel.costates.values, sequential.costates.values
    assert float((P - Q).abs().max()) <= 1e-8 * float(Q.abs().max())
    assert parallel.evaluations * 10 < sequential.evaluations


def test_step_budget_holds_under_python_O():
    """torchdiffeq's step limit and its step checks are bare asserts; the engine's own budget must
    still end an unbounded problem, and its own checks a blow-up, when asserts are compiled away."""
    code = textwrap.dedent("""
        import torch
        import pmpsolve as pmp
        problem = pmp.ControlProblem(lambda t, x, u: x ** 2 + u, torch.tensor([0.0]), 1.0, pmp.Reals(1),
                                     terminal_cost=lambda x: -10 * x[..., 0],
                                     running_cost=lambda t, x, u: 0.01 * (u ** 2).sum(-1))
        try:  # the gradient rule takes every step: the co-state sweep outgrows its budget at iteration 4
            pmp.solve(problem, mesh=10, method="gradient")
        except (pmp.SweepBudgetError, pmp.NonFiniteError) as err:
            print("stopped:", type(err).__name__)
        else:
            print("no error")
        # x' = x^2 from x0 = 1 blows up at t = 1: the adaptive step underflows there.
        blow_up = pmp.ControlProblem(lambda t, x, u: x ** 2 + 0 * u, torch.tensor([1.0]), 2.0, pmp.Reals(1),
                                     terminal_cost=lambda x: x[..., 0])
        try:
            pmp.solve(blow_up, mesh=10)
        except pmp.NonFiniteError as err:
            print("blow-up:", err.sweep, round(err.time, 2))
        """)
    out = subprocess.run([sys.executable, "-O", "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("stopped:") and lines[1] == "blow-up: forward 1.0", (out.stdout, out.stderr)


@pytest.mark.parametrize("method", ["dopri5", "bosh3", "dopri8"])
def test_dense_output_in_batches_is_torchdiffeqs_own(method):
    """The ODE layer interpolates the output times after the first inside a step together; every value
    is the one torchdiffeq's own loop (one ``_advance`` per output time) gives with the same solver class,
    bit for bit, in both directions. That class is torchdiffeq's step itself for bosh3 and dopri8 (so
    torchdiffeq.odeint gives the same bits); for dopri5 it is the lean step (``ode._lean_step``): the same
    steps and evaluations as torchdiffeq, its sums in another order (the last bits)."""
    import torchdiffeq
    from torchdiffeq._impl.misc import _check_inputs
    from torchdiffeq._impl.solvers import AdaptiveStepsizeODESolver

    from pmpsolve.sweep.ode import _SOLVERS, integrate

    calls = []

    def rhs(t, y):
        calls.append(1)
        return torch.stack([y[1], -torch.sin(y[0]) + 0.1 * torch.cos(3 * t)])

    y0 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    times = torch.sort(torch.rand(200, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 5)[0]
    times = torch.cat([torch.zeros(1, dtype=torch.float64), times])
    for t in (times, times.flip(0)):
        ours = integrate(rhs, y0, t, method=method, rtol=1e-7, atol=1e-9)
        evaluations = len(calls)
        _, func, y, tt, rtol, atol, _, options, _, _ = _check_inputs(rhs, y0, t, 1e-7, 1e-9, method, {}, None, _SOLVERS)
        one_by_one = AdaptiveStepsizeODESolver.integrate(_SOLVERS[method](func=func, y0=y, rtol=rtol, atol=atol,
                                                                         **options), tt)
        assert torch.equal(ours, one_by_one)
        del calls[:]
        theirs = torchdiffeq.odeint(rhs, y0, t, method=method, rtol=1e-7, atol=1e-9)
        assert len(calls) == evaluations
        del calls[:]
        if method == "dopri5":
            assert float((ours - theirs).abs().max()) < 1e-13
        else:
            assert torch.equal(ours, theirs)


def test_hinge_kinks_are_the_roots_of_a_on_the_scan_axis():
    """The parallel co-state scan ends its steps where a hinge's a changes sign (``hinge_kinks``, jump_t):
    a = z - 0.3 on interval 0 (z = 1 - 2 sigma: sigma = 0.35), 2 z^2 - 1 on interval 1 (sigma = (1 -+ 1/sqrt 2) / 2),
    a constant 0.5 (no kink) on interval 2."""
    from pmpsolve.sweep.costate import LINEAR_DEGREE, LinearCostate, hinge_kinks
    K, n, c = 1, 1, 1
    coef = torch.zeros(3, LINEAR_DEGREE + 1, K * (n * n + n + c + 2 * c * n), dtype=torch.float64)
    a = K * (n * n + n)  # the column of a, in the Chebyshev basis T_0, T_1, ...
    coef[0, 0, a], coef[0, 1, a] = -0.3, 1.0
    coef[1, 2, a] = 1.0  # T_2 = 2 z^2 - 1
    coef[2, 0, a] = 0.5
    kinks = hinge_kinks(LinearCostate(coef, K, n, c))
    expected = torch.tensor([(1 - 2 ** -0.5) / 2, 0.35, (1 + 2 ** -0.5) / 2], dtype=torch.float64)
    assert torch.allclose(kinks, expected, rtol=0, atol=1e-15)
    assert hinge_kinks(LinearCostate(coef[2:], K, n, c)).numel() == 0
