"""Control sets and maximisers through their protocols: property tests (hypothesis) of projections,
enumeration, the closed form and projected gradient against brute force on small synthetic objectives;
the Ball control set (the example of extending) against closed-form optima."""
import itertools
import math
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pmpsolve as pmp
from pmpsolve.controls import control_set_from_dict
from pmpsolve.update.maximisers import (MAXIMISERS, ClosedForm, Enumeration, HamiltonianMaximiser, IntervalObjective,
                                 Maximiser, ProjectedLBFGS, ProximalGradient)

F64 = torch.float64
PROPERTY = settings(max_examples=40, deadline=None)


class Quadratic:
    """A synthetic IntervalObjective: sum_j g_j u_j - M_j u_j^2 / 2 (+ coupling u_1 u_m) - h * penalty(u),
    for N independent rows; enough for every maximiser (the protocol, not the interval Hamiltonian)."""

    def __init__(self, g, M, u0, penalty=None, coupling=0.0):
        self.g, self.M, self.coupling = g, M, coupling
        self.data = SimpleNamespace(controls=u0, lengths=torch.full(u0.shape[:1], 0.5, dtype=u0.dtype))
        self.penalty, self.rho, self.eps = penalty, 0.0, 0.0

    def smooth(self, u):
        return (self.g * u - 0.5 * self.M * u * u).sum(-1) + self.coupling * u[..., 0] * u[..., -1]

    def penalty_value(self, u):
        if self.penalty is None:
            return u.new_zeros(u.shape[:-1])
        return self.data.lengths * self.penalty.value(u)

    def __call__(self, u):
        return self.smooth(u) - self.penalty_value(u)

    def value_and_grad(self, u):
        v = u.detach().requires_grad_(True)
        with torch.enable_grad():
            value = self.smooth(v)
            (g,) = torch.autograd.grad(value.sum(), v)
        return value.detach(), g

    def curvature(self, u, d):
        return (self.M * d * d).sum(-1) - 2 * self.coupling * d[..., 0] * d[..., -1]

    def candidates(self, U):
        return self(U).detach()


def random_quadratic(seed, N, m, penalty=None, coupling=0.0, start=None):
    gen = torch.Generator().manual_seed(seed)
    g = 4 * torch.rand(N, m, generator=gen, dtype=F64) - 2
    M = 3 * torch.rand(N, m, generator=gen, dtype=F64) + 0.1
    u0 = torch.zeros(N, m, dtype=F64) if start is None else start
    return Quadratic(g, M, u0, penalty, coupling)


def grid(values, m):
    return torch.cartesian_prod(*[torch.as_tensor(values, dtype=F64)] * m).reshape(-1, m)


def brute_force(objective, points):
    """max over candidate points [C, m], all rows at once: [N]."""
    N = objective.data.controls.shape[0]
    return objective.candidates(points[:, None, :].expand(-1, N, -1)).max(0).values


# ----------------------------------------------------------------------------------- control sets
floats = st.floats(-1e3, 1e3, allow_nan=False)


@st.composite
def sets_and_points(draw):
    m = draw(st.integers(1, 3))
    kind = draw(st.sampled_from(["reals", "box", "finite", "ball"]))
    if kind == "reals":
        controls = pmp.Reals(m)
    elif kind == "box":
        low = draw(st.lists(st.floats(-10, 10), min_size=m, max_size=m))
        width = draw(st.lists(st.floats(0, 10), min_size=m, max_size=m))
        controls = pmp.Box(low, [a + w for a, w in zip(low, width)])
    elif kind == "finite":
        controls = pmp.Finite(draw(st.lists(st.floats(-10, 10), min_size=1, max_size=4)), shape=(m,))
    else:
        center = draw(st.lists(st.floats(-10, 10), min_size=m, max_size=m))
        controls = pmp.Ball(draw(st.floats(1e-3, 10)), shape=(m,), center=center)
    u = torch.tensor(draw(st.lists(st.lists(floats, min_size=m, max_size=m), min_size=1, max_size=5)), dtype=F64)
    return controls, u


@PROPERTY
@given(sets_and_points())
def test_projection_lands_in_the_set_and_is_idempotent(case):
    controls, u = case
    p = controls.project(u)
    assert p.shape == u.shape
    assert controls.contains(p).all()
    assert torch.allclose(controls.project(p), p, rtol=1e-12, atol=1e-12)
    inside = controls.contains(u)
    assert torch.equal(p[inside], u[inside])  # points of U stay where they are
    assert controls.contains(controls.default_point(F64, "cpu")).item()
    assert repr(control_set_from_dict(controls.to_dict())) == repr(controls)


@PROPERTY
@given(sets_and_points())
def test_ball_projection_is_the_nearest_point(case):
    controls, u = case
    if not isinstance(controls, pmp.Ball):
        return
    p = controls.project(u)
    c = controls.center.to(F64)
    # the nearest point of a ball lies on the ray from the center through u
    directions = (u - c) / (u - c).norm(dim=-1, keepdim=True).clamp_min(1e-300)
    outside = ~controls.contains(u)
    expected = c + controls.radius * directions
    assert torch.allclose(p[outside], expected[outside], rtol=1e-12, atol=1e-9)


# ------------------------------------------------------------------------------------- maximisers
def test_every_registered_maximiser_implements_the_protocol():
    for name, factory in MAXIMISERS.items():
        maximiser = factory(max_iter=5, perturb=0.0)
        assert isinstance(maximiser, Maximiser)
        assert maximiser.name == name
    for controls in (pmp.Reals(2), pmp.Box(-1, 1), pmp.Finite([0, 1]), pmp.Ball(1.0, shape=(2,)),
                     pmp.UserSet(lambda d: d.controls, (1,))):
        assert set(controls.maximisers(None)) <= set(MAXIMISERS)


def test_the_interval_hamiltonian_and_the_synthetic_objective_implement_the_protocol():
    from pmpsolve.update.hamiltonian import IntervalHamiltonian, interval_data
    from pmpsolve.sweep.mesh import make_mesh
    from pmpsolve.sweep.pointwise import PointwiseProblem
    from pmpsolve.sweep.sweeps import Sweeper

    problem = mover(pmp.Ball(1.0, shape=(2,)), terminal_cost=lambda x: -x.sum(-1))
    pw = PointwiseProblem(problem, F64, "cpu")
    u = torch.zeros(3, 2, dtype=F64)
    sweeper = Sweeper(pw, make_mesh(3, problem.horizon, F64, "cpu"))
    fw = sweeper.forward(u)
    hamiltonian = IntervalHamiltonian(pw, interval_data(pw, u, fw, sweeper.backward(u, fw), 3))
    assert isinstance(hamiltonian, IntervalObjective)
    assert isinstance(random_quadratic(0, 3, 2), IntervalObjective)


@PROPERTY
@given(seed=st.integers(0, 2 ** 31), m=st.integers(1, 3), values=st.lists(st.integers(-3, 3), min_size=1, max_size=4,
                                                                          unique=True),
       coupling=st.floats(-2, 2), penalty=st.sampled_from([None, "L1", "L0"]))
def test_enumeration_equals_brute_force(seed, m, values, coupling, penalty):
    """|V|^m <= 64 here: all combinations, exact even with the coupling term."""
    pen = {None: None, "L1": pmp.L1(0.7), "L0": pmp.L0(0.7)}[penalty]
    controls = pmp.Finite(values, shape=(m,))
    start = controls.project(torch.zeros(6, m, dtype=F64))
    objective = random_quadratic(seed, 6, m, pen, coupling, start)
    result = Enumeration().maximise(objective, controls)
    assert controls.contains(result.controls).all()
    best = brute_force(objective, grid(controls.values, m))
    assert torch.allclose(objective(result.controls), best, rtol=1e-12, atol=1e-12)
    assert torch.allclose(result.value, best, rtol=1e-12, atol=1e-12)


@PROPERTY
@given(seed=st.integers(0, 2 ** 31), values=st.lists(st.integers(-3, 3), min_size=3, max_size=5, unique=True))
def test_enumeration_by_components_is_exact_for_separable_objectives(seed, values):
    m = 4  # |V|^4 >= 81 > 64: component sweeps
    controls = pmp.Finite(values, shape=(m,))
    objective = random_quadratic(seed, 5, m, start=controls.project(torch.zeros(5, m, dtype=F64)))
    result = Enumeration().maximise(objective, controls)
    best = brute_force(objective, grid(controls.values, m))
    assert torch.allclose(objective(result.controls), best, rtol=1e-12, atol=1e-12)


@PROPERTY
@given(seed=st.integers(0, 2 ** 31), m=st.integers(1, 2), penalty=st.sampled_from([None, "L1", "L0"]),
       start=st.floats(-1, 1))
def test_closed_form_equals_a_fine_grid(seed, m, penalty, start):
    pen = {None: None, "L1": pmp.L1(0.7), "L0": pmp.L0(0.7)}[penalty]
    controls = pmp.Box(-1.0, 1.0, shape=(m,))
    objective = random_quadratic(seed, 6, m, pen, start=torch.full((6, m), start, dtype=F64))
    result = ClosedForm().maximise(objective, controls)
    assert result is not None
    assert controls.contains(result.controls).all()
    axis = torch.linspace(-1, 1, 2001 if m == 1 else 401, dtype=F64)
    axis = torch.where(axis.abs() < 1e-12, torch.zeros_like(axis), axis)  # 0 exactly (the L1 / L0 kink)
    best = brute_force(objective, grid(axis, m))
    exact = objective(result.controls)
    assert (exact >= best - 1e-12).all()  # never beaten by the grid
    assert (exact - best <= 1e-4).all()  # and the grid comes within its spacing squared


def test_closed_form_refuses_an_unbounded_objective():
    objective = Quadratic(torch.ones(3, 1, dtype=F64), torch.zeros(3, 1, dtype=F64), torch.zeros(3, 1, dtype=F64))
    assert ClosedForm().maximise(objective, pmp.Reals(1)) is None


@PROPERTY
@given(seed=st.integers(0, 2 ** 31), radius=st.floats(0.1, 2.0), cx=st.floats(-1, 1))
def test_projected_gradient_on_a_ball_equals_a_fine_polar_grid(seed, radius, cx):
    controls = pmp.Ball(radius, shape=(2,), center=[cx, 0.0])
    objective = random_quadratic(seed, 6, 2, start=controls.center.to(F64).expand(6, 2).clone())
    assert HamiltonianMaximiser(controls).order(None) == ("proximal",)
    result = ProximalGradient(max_iter=500).maximise(objective, controls)
    assert controls.contains(result.controls).all()
    angles = torch.linspace(0, 2 * math.pi, 1441, dtype=F64)[:-1]
    radii = torch.linspace(0, radius, 201, dtype=F64)
    polar = torch.cartesian_prod(radii, angles)
    points = controls.center.to(F64) + polar[:, :1] * torch.stack([polar[:, 1].cos(), polar[:, 1].sin()], -1)
    best = brute_force(objective, points)
    exact = objective(result.controls)
    scale = 1 + best.abs()
    assert (exact >= best - 1e-9 * scale).all()
    assert (exact - best <= 1e-3 * scale).all()


def test_forcing_a_maximiser_follows_the_set():
    box, l1 = pmp.Box(-1, 1), pmp.L1(0.1)
    assert HamiltonianMaximiser(box).order(None) == ("closed-form", "lbfgs", "proximal")
    assert HamiltonianMaximiser(box).order(l1) == ("closed-form", "proximal")
    assert HamiltonianMaximiser(box, method="lbfgs").order(l1) == ("proximal",)  # L-BFGS needs a smooth objective
    assert HamiltonianMaximiser(box, method="proximal").order(None) == ("proximal", "lbfgs")
    assert HamiltonianMaximiser(box, perturb=0.01).order(None) == ("lbfgs", "proximal")
    assert HamiltonianMaximiser(pmp.Finite([0, 1]), method="lbfgs").order(None) == ("enumeration",)
    with pytest.raises(ValueError, match="not supported on a ball"):
        HamiltonianMaximiser(pmp.Ball(1.0)).order(l1)


# ------------------------------------------------------------------------------ the Ball in a solve
def mover(controls, **costs):
    """x' = u in R^2 from the origin over [0, 1]."""
    return pmp.ControlProblem(lambda t, x, u: u.expand(x.shape), torch.zeros(2, dtype=F64), 1.0, controls, **costs)


@pytest.mark.parametrize("method", ["emsa", "sqh", "gradient"])
def test_ball_boundary_optimum(method):
    """J = -x1(1) - x2(1): H = p.u with p = (1, 1), maximised on the sphere at u = r (1, 1) / sqrt 2, J* = -r sqrt 2."""
    r = 0.7
    sol = pmp.solve(mover(pmp.Ball(r, shape=(2,)), terminal_cost=lambda x: -x.sum(-1)), mesh=8, method=method)
    assert sol.converged
    expected = torch.full((8, 2), r / math.sqrt(2), dtype=F64)
    assert torch.allclose(sol.controls, expected, atol=1e-10)
    assert sol.cost == pytest.approx(-r * math.sqrt(2), rel=1e-10)
    if method != "gradient":
        assert set(sol.settings["maximisers_used"]) == {"proximal"}


def test_ball_interior_optimum():
    """J = int |u|^2 / 2 + |x(1) - a|^2: u = 2a/3 on every interval (inside the ball), J* = |a|^2 / 3."""
    a = torch.tensor([0.3, -0.2], dtype=F64)
    problem = mover(pmp.Ball(1.0, shape=(2,), center=[0.5, 0.0]), running_cost=lambda t, x, u: 0.5 * (u ** 2).sum(-1),
                    terminal_cost=lambda x: ((x - a) ** 2).sum(-1))
    sol = pmp.solve(problem, mesh=8)
    assert sol.converged
    assert torch.allclose(sol.controls, (2 * a / 3).expand(8, 2), atol=1e-6)
    assert sol.cost == pytest.approx(float(a @ a) / 3, rel=1e-8)


def test_ball_refuses_a_control_penalty():
    problem = mover(pmp.Ball(1.0, shape=(2,)), terminal_cost=lambda x: -x.sum(-1), control_penalty=pmp.L1(0.1))
    with pytest.raises(ValueError, match="not supported on a ball"):
        pmp.solve(problem, mesh=4)


@pytest.mark.parametrize("bad", [0.0, -1.0, math.inf, math.nan, "1"])
def test_ball_radius_must_be_positive(bad):
    with pytest.raises(ValueError, match="radius"):
        pmp.Ball(bad, shape=(2,))


def _coupled(seed=3, N=4, m=6, coupling=0.4):
    """A coupled Quadratic and its -Hessian [N, m, m] (diag M, -coupling at (0, m-1) and (m-1, 0))."""
    q = random_quadratic(seed, N, m, coupling=coupling)
    q.M = q.M + coupling  # positive definite: every M_j > coupling
    hessian = torch.diag_embed(q.M)
    hessian[:, 0, -1] = hessian[:, -1, 0] = -coupling
    return q, hessian


def test_lbfgs_takes_a_full_preconditioners_newton_step_first():
    """A preconditioner that is the exact inverse Hessian: with ``newton_start`` the first step is the maximiser
    (no curvature evaluation: 2 evaluations in all, the gradient there is rounding); without it the step length
    comes from one more evaluation along the same direction."""
    q, hessian = _coupled()
    optimum = torch.linalg.solve(hessian, q.g[..., None])[..., 0]
    q.preconditioner = lambda u: (lambda v: torch.linalg.solve(hessian, v[..., None])[..., 0])
    newton = ProjectedLBFGS(max_iter=10, newton_start=True).maximise(q, pmp.Reals(6))
    assert torch.allclose(newton.controls, optimum, rtol=1e-12, atol=1e-12)
    assert (newton.iterations, newton.evaluations) == (1, 2)
    line = ProjectedLBFGS(max_iter=10).maximise(q, pmp.Reals(6))
    assert torch.allclose(line.controls, optimum, rtol=1e-12, atol=1e-12) and line.evaluations == 3


def test_lbfgs_relative_stop_ends_a_row_when_its_steps_add_little():
    """With the diagonal of a coupled quadratic as the preconditioner (a tensor: steps scaled by 1 / D) L-BFGS
    converges over several iterations; ``rtol`` stops when the last step added at most rtol times the increase so
    far: fewer iterations, every row's value between the start and the maximum, and the criterion met at the end."""
    q, hessian = _coupled(coupling=1.2)
    best = q.smooth(torch.linalg.solve(hessian, q.g[..., None])[..., 0])
    start = q.smooth(q.data.controls)
    q.preconditioner = lambda u: q.M
    full = ProjectedLBFGS(max_iter=30, gtol=1e-14).maximise(q, pmp.Reals(6))
    values = []
    original = q.value_and_grad

    def tracked(u):
        value, grad = original(u)
        values.append(value)
        return value, grad

    q.value_and_grad = tracked
    early = ProjectedLBFGS(max_iter=30, gtol=1e-14, rtol=0.05).maximise(q, pmp.Reals(6))
    assert torch.allclose(full.value, best, rtol=1e-10)
    assert early.iterations < full.iterations
    assert (early.value > start).all() and (early.value <= best + 1e-12).all()
    last, before = values[-1], values[-2]
    assert ((last - before) <= 0.05 * (last - start) + 1e-12).any()


def test_relative_stop_must_be_a_fraction():
    with pytest.raises(ValueError, match="rtol"):
        ProjectedLBFGS(rtol=1.0)


class _Quartic(Quadratic):
    """A Quadratic minus quartic * sum u^4: steep far from the start, so that L-BFGS's line search backtracks."""

    quartic = 4.0

    def smooth(self, u):
        return super().smooth(u) - self.quartic * (u ** 4).sum(-1)


@pytest.mark.parametrize("controls", [pmp.Reals(6), pmp.Box(-1.0, 1.0, shape=(6,))], ids=["reals", "box"])
def test_lbfgs_tries_its_line_search_steps_on_trial_values_and_takes_the_same_steps(controls):
    """An objective with ``trial_values`` (values alone, cheaper than the gradient): the line search tries its
    steps on them and asks for the gradient at the accepted step only. Same iterates to the bit, same count of
    evaluations; gradients only at the start and at the accepted steps an iteration follows."""
    base, _ = _coupled(coupling=0.4)
    q = _Quartic(3 * base.g, base.M, base.data.controls, coupling=base.coupling)
    calls = {"grad": 0, "trial": 0}
    original = q.value_and_grad

    def counted(u):
        calls["grad"] += 1
        return original(u)

    q.value_and_grad = counted
    plain = ProjectedLBFGS(max_iter=15).maximise(q, controls)
    without = calls["grad"]

    def trial_values(u):
        calls["trial"] += 1
        return q.smooth(u).detach()

    q.trial_values = trial_values
    calls["grad"] = 0
    lazy = ProjectedLBFGS(max_iter=15).maximise(q, controls)
    assert torch.equal(lazy.controls, plain.controls) and torch.equal(lazy.value, plain.value)
    assert (lazy.iterations, lazy.evaluations) == (plain.iterations, plain.evaluations)
    assert calls["trial"] + 1 == without  # every evaluation but the start's was a line-search step
    # the start, then one gradient per accepted step but the last (no iteration follows it: max_iter reached)
    assert lazy.iterations == 15 and calls["grad"] == lazy.iterations < without
