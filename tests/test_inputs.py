"""Bad input found by a user: each gets a clear error or the right behaviour."""
import warnings

import numpy as np
import pytest
import torch

import pmpsolve as pmp
from pmpsolve.sweep.mesh import make_mesh

f2 = lambda t, x, u: torch.stack([x[..., 1], -x[..., 0] + u[..., 0]], -1)  # noqa: E731
L = lambda t, x, u: 0.5 * ((x ** 2).sum(-1) + (u ** 2).sum(-1))  # noqa: E731


def make(**kw):
    args = dict(dynamics=f2, x0=torch.tensor([0.0, 1.0]), horizon=1.0, controls=pmp.Reals(1), running_cost=L)
    args.update(kw)
    return pmp.ControlProblem(**args)


# ------------------------------------------------------------------ 1. mesh
@pytest.mark.parametrize("mesh", [10, np.int64(10), np.int32(10), torch.tensor(10), np.array(10)],
                         ids=["int", "np.int64", "np.int32", "0-d int tensor", "0-d int array"])
def test_any_integer_is_a_number_of_intervals(mesh):
    nodes = make_mesh(mesh, 2.0, torch.float64, "cpu")
    assert torch.equal(nodes, torch.linspace(0, 2.0, 11, dtype=torch.float64))


def test_solve_accepts_a_numpy_integer_mesh():
    sol = pmp.solve(make(), mesh=np.int64(5), stop=pmp.Stop(max_iter=1))
    assert sol.controls.shape == (5, 1) and sol.settings["mesh"] == 5


@pytest.mark.parametrize("mesh, message", [
    (10.0, r"`mesh` must be an int N >= 1 or a 1-D tensor of times, got float 10.0; pass mesh=10"),
    (np.float64(10.0), r"got float64 10.0; pass mesh=10"),
    (torch.tensor(10.0), r"got a 0-d tensor of torch.float32 10.0; pass mesh=10"),
    (torch.tensor(7.0, dtype=torch.float64), r"got a 0-d tensor of torch.float64 7.0; pass mesh=7"),
    (2.5, r"got float 2.5; pass a whole number of intervals, e.g. mesh=200"),
    (float("nan"), r"got float nan; pass a whole number of intervals"),
    (True, r"got bool True"),
    (torch.tensor(True), r"got a 0-d tensor of torch.bool True"),
])
def test_a_mesh_that_is_not_an_integer_is_refused(mesh, message):
    with pytest.raises(TypeError, match=message):
        pmp.solve(make(), mesh=mesh)
    with pytest.raises(TypeError, match=message):
        pmp.cost(make(), torch.zeros(10, 1), mesh=mesh)


# --------------------------------------------------------- 2. control sets
inf = float("inf")


@pytest.mark.parametrize("low, high, component", [(inf, inf, 0), (-inf, -inf, 0), ([0.0, inf], [1.0, inf], 1),
                                                  ([0.0, -inf], [1.0, -inf], 1)])
def test_an_empty_box_is_refused(low, high, component):
    with pytest.raises(ValueError, match=rf"Box: component {component} has low=.*an empty set.*use low=-inf "
                                         r"and/or high=inf"):
        pmp.Box(low, high)


def test_one_sided_and_unbounded_boxes_still_work():
    assert pmp.Box(-inf, inf).contains(torch.tensor([1e300])).item()
    assert pmp.Box(0.0, inf).contains(torch.tensor([5.0])).item()
    assert not pmp.Box(-inf, 1.0).contains(torch.tensor([2.0])).item()


def test_box_bounds_that_are_not_numbers():
    with pytest.raises(TypeError, match=r"Box: `low` and `high` must be numbers.*got low=None, high=1"):
        pmp.Box(None, 1)


@pytest.mark.parametrize("make_set", [pmp.Reals, lambda shape: pmp.Box(0.0, 1.0, shape=shape),
                                      lambda shape: pmp.Finite([0, 1], shape=shape),
                                      lambda shape: pmp.UserSet(lambda data: data.controls, shape)],
                         ids=["Reals", "Box", "Finite", "UserSet"])
@pytest.mark.parametrize("shape, error, message", [
    (0, ValueError, r"m >= 1 .*got \(0,\); for m control components pass shape=\(m,\)"),
    (-2, ValueError, r"m >= 1"),
    ((2, 3), ValueError, r"m >= 1 .*got \(2, 3\)"),
    (2.5, TypeError, r"`shape` must be an int m or a tuple \(m,\) of one int, got float 2.5"),
    (2.0, TypeError, r"got float 2.0; pass shape=\(2,\)"),
    ((2.5,), TypeError, r"got tuple \(2.5,\)"),
    (True, TypeError, r"got bool True"),
    ("2", TypeError, r"got str '2'"),
])
def test_bad_control_shape(make_set, shape, error, message):
    with pytest.raises(error, match=message):
        make_set(shape)


def test_reals_of_none():
    with pytest.raises(TypeError, match=r"Reals: `shape` must be an int m .*got NoneType None"):
        pmp.Reals(None)


@pytest.mark.parametrize("shape", [2, np.int64(2), torch.tensor(2), (2,), [2], torch.Size([2])],
                         ids=["int", "np.int64", "0-d tensor", "tuple", "list", "Size"])
def test_any_integer_shape_is_accepted(shape):
    assert pmp.Reals(shape).shape == (2,) and pmp.Finite([0, 1], shape=shape).shape == (2,)


def test_finite_values_must_be_flat():
    with pytest.raises(ValueError, match=r"Finite: `values` must be a flat sequence.*got shape \(2, 2\)"):
        pmp.Finite([[0, 1], [2, 3]], shape=(2,))


def test_user_set_default_of_the_wrong_shape():
    with pytest.raises(ValueError, match=r"UserSet: `default` must have the control shape \(2,\), got shape \(3,\)"):
        pmp.UserSet(lambda data: data.controls, 2, default=[1.0, 2.0, 3.0])


# ------------------------------------------------- 3. cost in float64 by default
def test_cost_of_float32_controls_is_computed_in_float64():
    problem = make()
    u64 = torch.linspace(-1, 1, 10, dtype=torch.float64).reshape(10, 1)
    u32 = u64.to(torch.float32)
    u32_exact = u32.to(torch.float64)  # the same numbers as u32, so J must agree to float64 accuracy
    assert pmp.cost(problem, u32) == pytest.approx(pmp.cost(problem, u32_exact), rel=1e-12, abs=1e-12)
    J32, dJ32 = pmp.cost_gradient(problem, u32)
    J64, dJ64 = pmp.cost_gradient(problem, u32_exact)
    assert J32 == pytest.approx(J64, rel=1e-12, abs=1e-12)
    assert dJ32.dtype == torch.float64 and torch.allclose(dJ32, dJ64, rtol=1e-12, atol=1e-14)
    # float32 on request
    J, dJ = pmp.cost_gradient(problem, u64, dtype=torch.float32)
    assert dJ.dtype == torch.float32 and J == pytest.approx(J64, rel=1e-4)


def test_cost_refuses_a_dtype_that_is_not_floating():
    with pytest.raises(TypeError, match=r"`dtype` must be a real floating torch dtype.*got torch.int64"):
        pmp.cost(make(), torch.zeros(4, 1), dtype=torch.int64)


# ---------------------------------------------- 4. times given to a Solution
@pytest.fixture(scope="module")
def small_solution():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # max_iter reached
        return pmp.solve(make(), mesh=8, stop=pmp.Stop(max_iter=3))


@pytest.mark.parametrize("query", ["state", "costate", "control"])
@pytest.mark.parametrize("t, message", [
    (float("nan"), r"got NaN; NaN is not a time"),
    (torch.tensor([0.0, float("nan"), 0.5]), r"got NaN at index \(1,\)"),
    (-0.1, r"times must lie in \[0, T\] = \[0, 1\], got values in \[-0.1, -0.1\]"),
    (torch.tensor([0.5, 1.5]), r"got values in \[0.5, 1.5\]; clamp them with t.clamp\(0, 1\)"),
])
def test_times_outside_the_horizon_or_nan(small_solution, query, t, message):
    with pytest.raises(ValueError, match=message):
        getattr(small_solution, query)(t)


def test_control_lookup_inside_the_horizon(small_solution):
    sol = small_solution
    t = torch.tensor([0.0, 0.125, 0.2, 1.0], dtype=torch.float64)
    u = sol.control(t)
    assert u.shape == (4, 1)
    assert torch.equal(u[:, 0], sol.controls[[0, 1, 1, 7], 0])  # a node belongs to the interval on its right
    assert sol.control(1.0).shape == (1,)
    with pytest.raises(TypeError, match=r"times `t` must be a number or a tensor"):
        sol.state("end")


# ------------------------------------------------ 5. loading what is not a Solution
class _NotPlainData:
    pass


@pytest.mark.parametrize("content, message", [
    ("text", r"'.*junk' is not a saved pmpsolve Solution: it is a text file beginning 'not a solution' that "
             r"torch.load\(weights_only=True\) cannot read"),
    ("empty", r"it is an empty file that torch.load"),
    ("tensor", r"holds a Tensor of shape \(3,\), not a saved pmpsolve Solution"),
    ("dict", r"holds a dict with no 'format' entry \(keys: \['a'\]\)"),
    ("other format", r"holds a dict with format 'pmpsolve.Solution/9', which this version cannot read"),
    ("damaged", r"has the Solution format but lacks the entry 'mesh'"),
    ("object", r"it is a binary file of \d+ bytes that torch.load\(weights_only=True\) cannot read"),
    ("directory", r"is a directory"),
])
def test_loading_a_file_that_is_not_a_solution(tmp_path, content, message):
    path = tmp_path / "junk"
    if content == "text":
        path.write_text("not a solution\n")
    elif content == "empty":
        path.write_bytes(b"")
    elif content == "tensor":
        torch.save(torch.zeros(3), path)
    elif content == "dict":
        torch.save({"a": 1}, path)
    elif content == "other format":
        torch.save({"format": "pmpsolve.Solution/9"}, path)
    elif content == "damaged":
        torch.save({"format": "pmpsolve.Solution/1", "cost": 1.0}, path)
    elif content == "object":
        torch.save({"x": _NotPlainData()}, path)
    else:
        path.mkdir()
    with pytest.raises(ValueError, match=message) as info:
        pmp.Solution.load(path)
    assert "expected a file written by Solution.save" in str(info.value) or content == "damaged"
    error = info.value  # no unpickling traceback attached
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)


def test_loading_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"Solution.load: there is no file '.*nothing.pt'; expected a file "
                                                r"written by Solution.save"):
        pmp.Solution.load(tmp_path / "nothing.pt")


# ------------------------------------------------------------------ 6. plot
def _legend_texts(ax):
    legend = ax.get_legend()
    return [] if legend is None else [text.get_text() for text in legend.get_texts()]


def test_plot_legends_and_control_steps(small_solution):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import StepPatch

    fig = small_solution.plot()
    try:
        control_ax, state_ax, costate_ax = fig.axes
        assert _legend_texts(control_ax) == ["u1"]
        assert _legend_texts(state_ax) == ["x1", "x2"]
        assert _legend_texts(costate_ax) == ["p1", "p2"]
        steps = [p for p in control_ax.patches if isinstance(p, StepPatch)]
        assert len(steps) == 1
        values, edges, baseline = steps[0].get_data()
        assert baseline is None  # steps only, not closed down to 0 at t = 0 and t = T
        assert len(values) == 8 and len(edges) == 9
    finally:
        plt.close(fig)


def test_plot_with_several_samples_and_controls():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    problem = make(dynamics=lambda t, x, u: torch.stack([x[..., 1] + u[..., 1], -x[..., 0] + u[..., 0]], -1),
                   controls=pmp.Box(-1.0, 1.0, shape=(2,)), x0=torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.5, 0.5]]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        sol = pmp.solve(problem, mesh=6, stop=pmp.Stop(max_iter=2))
    fig = sol.plot(samples=2)
    try:
        assert [_legend_texts(ax) for ax in fig.axes] == [["u1", "u2"], ["x1", "x2"], ["p1", "p2"]]
        assert fig.axes[0].get_title().endswith(", 2 of 3 samples")
        assert len(fig.axes[1].lines) == 2 * 2  # 2 of the 3 samples, 2 states each
    finally:
        plt.close(fig)
