"""Bad input gets a clear error naming the argument, the value and the fix."""
import pytest
import torch

import pmpsolve as pmp
from problems import REFERENCE_PROBLEMS

f2 = lambda t, x, u: torch.stack([x[..., 1], -x[..., 0] + u[..., 0]], -1)  # noqa: E731
L = lambda t, x, u: (x ** 2).sum(-1) + (u ** 2).sum(-1)  # noqa: E731
x0 = torch.tensor([0.0, 1.0])


def make(**kw):
    args = dict(dynamics=f2, x0=x0, horizon=1.0, controls=pmp.Reals(1), running_cost=L)
    args.update(kw)
    return pmp.ControlProblem(**args)


def test_dynamics_output_shape_differs_from_x0():
    with pytest.raises(ValueError, match=r"`dynamics` returned shape \(1, 3\).*n=2"):
        make(dynamics=lambda t, x, u: torch.cat([x, u], -1))


def test_control_of_the_wrong_shape():
    with pytest.raises(IndexError, match=r"calling `dynamics` with .*m=1"):
        make(dynamics=lambda t, x, u: torch.stack([x[..., 1] + u[..., 1], x[..., 0]], -1))


def test_unbatched_function_is_explained():
    with pytest.raises(ValueError, match=r"running_cost.*one cost per sample.*\.sum\(-1\)"):
        make(running_cost=lambda t, x, u: (x ** 2).sum() + (u ** 2).sum())


@pytest.mark.parametrize("horizon", [0.0, -1.0, float("inf"), float("nan")])
def test_horizon_must_be_positive(horizon):
    with pytest.raises(ValueError, match="`horizon` must be a finite T > 0"):
        make(horizon=horizon)


def test_x0_shape_and_type():
    with pytest.raises(ValueError, match=r"`x0` must have shape \[n\] or \[K, n\]"):
        make(x0=torch.zeros(2, 2, 2))
    with pytest.raises(TypeError, match="`controls` must be a control set"):
        make(controls=(0, 1))
    with pytest.raises(TypeError, match="`dynamics` must be a callable"):
        make(dynamics=None)
    with pytest.raises(ValueError, match="give a `terminal_cost`, a `running_cost` or both"):
        make(running_cost=None)


def test_box_with_low_above_high():
    with pytest.raises(ValueError, match=r"component 0 has low=1.0 > high=0.0"):
        pmp.Box(1.0, 0.0, shape=(1,))
    with pytest.raises(ValueError, match="must be numbers or have the control shape"):
        pmp.Box([0, 0, 0], [1, 1], shape=(2,))


@pytest.mark.parametrize("mesh, error, message", [
    (0, ValueError, "number of intervals N >= 1"),
    (torch.tensor([0.0, 0.5, 0.4, 1.0]), ValueError,
     r"strictly increasing, but mesh\[1\] = 0.5 >= mesh\[2\] = 0.4"),
    (torch.tensor([0.0, 0.5, 0.9]), ValueError, r"span \[0, T\] = \[0, 1\], got \[0, 0.9\]"),
    (torch.tensor([[0.0, 1.0]]), ValueError, "1-D"),
    ("fine", TypeError, "must be an int"),
])
def test_bad_mesh(mesh, error, message):
    with pytest.raises(error, match=message):
        pmp.solve(make(), mesh=mesh)


def test_unknown_method_and_option():
    with pytest.raises(ValueError, match=r"unknown `method` 'newton'; choose one of \['ddp', 'emsa', 'gradient', 'msa'"):
        pmp.solve(make(), method="newton")
    with pytest.raises(TypeError, match="unexpected keyword argument 'learning_rate'"):
        pmp.solve(make(), learning_rate=0.1)
    with pytest.raises(TypeError, match="unexpected keyword argument 'lr'; it is set as method=pmp.Gradient"):
        pmp.solve(make(), lr=0.1)
    with pytest.raises(ValueError, match="pmp.ODE: unknown `method` 'rk45'"):
        pmp.solve(make(), ode=pmp.ODE("rk45"))
    with pytest.raises(TypeError, match="unexpected keyword argument 'rho'"):
        pmp.MSA(rho=1.0)
    with pytest.raises(TypeError, match="unexpected keyword argument 'lr'"):
        pmp.EMSA(lr=2.0)
    with pytest.raises(TypeError, match=r"`ode` must be a pmp.ODE\(...\) or None, got 'rk4'"):
        pmp.solve(make(), ode="rk4")


def test_initial_control_outside_the_set():
    problem, _ = REFERENCE_PROBLEMS["catalyst"]()
    init = torch.full((10, 1), 0.5)
    init[3] = 1.5
    with pytest.raises(ValueError, match=r"`init` lies outside the control set Box.*interval 3 .*\[1.5\].*project"):
        pmp.solve(problem, mesh=10, init=init)
    with pytest.raises(ValueError, match=r"`init` has shape \(7, 1\); expected \[N, m\] = \[10, 1\]"):
        pmp.solve(problem, mesh=10, init=torch.zeros(7, 1))


def test_bad_dtype_and_tolerances():
    with pytest.raises(TypeError, match="`dtype` must be torch.float64 or torch.float32"):
        pmp.solve(make(), dtype=torch.int64)
    with pytest.raises(ValueError, match="`rtol` and `atol` must be > 0"):
        pmp.solve(make(), ode=pmp.ODE(rtol=-1.0))


def test_blow_up_names_iteration_sweep_and_time():
    """x' = x^2 from x0 = 1 blows up at t = 1 (before T = 2)."""
    problem = pmp.ControlProblem(lambda t, x, u: x ** 2 + 0 * u, torch.tensor([1.0]), 2.0, pmp.Reals(1),
                                 terminal_cost=lambda x: x[..., 0])
    with pytest.raises(pmp.NonFiniteError, match="iteration 0: the forward sweep") as info:
        pmp.solve(problem, mesh=10)
    assert info.value.sweep == "forward" and info.value.iteration == 0
    assert info.value.time == pytest.approx(1.0, abs=0.05)


def test_blow_up_mid_solve_keeps_the_best_controls():
    """x' = u x^2, J = (x_T - 2)^2 + 1/2 int u^2: basic MSA's first step u = 2 makes x blow up at t = 1/2."""
    problem = pmp.ControlProblem(lambda t, x, u: u * x ** 2, torch.tensor([1.0]), 1.0, pmp.Reals(1),
                                 terminal_cost=lambda x: (x[..., 0] - 2) ** 2,
                                 running_cost=lambda t, x, u: 0.5 * (u ** 2).sum(-1))
    # The trial sweep blows up near t = 1/2: non-finite values, or (first) more evaluations than
    # the sweep's budget allows; either way an error with the best controls, never a hang.
    with pytest.raises((pmp.NonFiniteError, pmp.SweepBudgetError)) as info:
        pmp.solve(problem, method="msa", mesh=10)
    err = info.value
    assert err.iteration == 1 and err.sweep == "forward" and 0.3 < err.time < 0.7
    assert torch.equal(err.best_controls, torch.zeros(10, 1, dtype=torch.float64))
    assert err.best_cost == pytest.approx(1.0)
    assert "best controls so far (J = 1)" in str(err)
    # The safeguarded default steps around the blow-up.
    assert pmp.solve(problem, mesh=10).cost < 0.6
