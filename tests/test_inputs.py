"""Bad input found by a user (issue 10): each gets a clear error or the right behaviour."""
import numpy as np
import pytest
import torch

import pmpsolve as pmp
from pmpsolve.mesh import make_mesh

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
    sol = pmp.solve(make(), mesh=np.int64(5), max_iter=1)
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
