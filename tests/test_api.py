"""The public API (README.md, docs/guide.md): shapes, history, trajectories, save/load, plot, dtypes, callback."""
import math

import pytest
import torch

import pmpsolve as pmp
from problems import REFERENCE_PROBLEMS


@pytest.fixture(scope="module")
def lqr_solution():
    problem, _ = REFERENCE_PROBLEMS["lqr"]()
    return pmp.solve(problem, mesh=40)


def test_solution_fields(lqr_solution):
    sol = lqr_solution
    assert isinstance(sol.cost, float)
    assert sol.controls.shape == (40, 1) and sol.mesh.shape == (41,)
    assert sol.mesh[0] == 0 and sol.mesh[-1] == 5.0
    assert sol.history[0].iteration == 0 and sol.history[-1].iteration == sol.iterations
    record = sol.history[1]
    for field in ("cost", "hamiltonian_gain", "state_error", "costate_error", "seconds", "forward_evals",
                  "backward_evals", "forward_seconds", "backward_seconds", "maximise_seconds"):
        assert math.isfinite(getattr(record, field)), field
    assert record.forward_evals > 0 and record.backward_evals > 0
    # The adaptive default only keeps decreases: the returned J is the last and the lowest.
    assert sol.cost == sol.history[-1].cost == min(r.cost for r in sol.history)


def test_state_and_costate(lqr_solution):
    sol = lqr_solution
    t = torch.linspace(0, 5, 7, dtype=torch.float64)
    X, P = sol.state(t), sol.costate(t)
    assert X.shape == (7, 2) and P.shape == (7, 2)
    assert torch.allclose(X[0], torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert torch.allclose(P[-1], torch.zeros(2, dtype=torch.float64), atol=1e-12)  # no terminal cost
    assert sol.state(2.5).shape == (2,)
    # PMP for LQR: the optimal control is u = argmax_u (p2 u - u^2/2) = p2.
    mid = (sol.mesh[:-1] + sol.mesh[1:]) / 2
    assert torch.allclose(sol.controls[:, 0], sol.costate(mid)[:, 1], atol=5e-3)
    with pytest.raises(ValueError, match=r"\[0, T\]"):
        sol.state(6.0)


def test_save_and_load(tmp_path, lqr_solution):
    path = tmp_path / "sol.pt"
    lqr_solution.save(path)
    loaded = pmp.Solution.load(path)
    assert loaded.cost == lqr_solution.cost
    assert torch.equal(loaded.controls, lqr_solution.controls)
    assert loaded.history == lqr_solution.history
    t = torch.linspace(0, 5, 11, dtype=torch.float64)
    assert torch.allclose(loaded.state(t), lqr_solution.state(t))
    assert loaded.problem is None and loaded.method == "emsa"
    (tmp_path / "junk.pt").write_bytes(b"not a solution")
    with pytest.raises(ValueError, match=r"junk.pt' is not a saved pmpsolve Solution: it is a text file"):
        pmp.Solution.load(tmp_path / "junk.pt")


def test_plot(tmp_path, lqr_solution):
    import matplotlib

    matplotlib.use("Agg")
    fig = lqr_solution.plot(tmp_path / "lqr.png")
    assert len(fig.axes) == 3 and (tmp_path / "lqr.png").stat().st_size > 1000


def test_history_as_columns(lqr_solution):
    columns = lqr_solution.history_dict()
    assert len(columns["cost"]) == len(lqr_solution.history)


def test_float32_and_float64():
    problem, _ = REFERENCE_PROBLEMS["lqr"]()
    sols = {dtype: pmp.solve(problem, mesh=20, dtype=dtype) for dtype in (torch.float32, torch.float64)}
    for dtype, sol in sols.items():
        assert sol.controls.dtype == dtype and sol.mesh.dtype == dtype and sol.state(1.0).dtype == dtype
    assert sols[torch.float32].cost == pytest.approx(sols[torch.float64].cost, rel=1e-5)


def test_callback_can_stop_and_sees_records():
    problem, _ = REFERENCE_PROBLEMS["lqr"]()
    seen = []
    sol = pmp.solve(problem, mesh=10, callback=lambda record, u: seen.append((record.iteration, u.shape)) or
                    record.iteration >= 2)
    assert seen == [(1, (10, 1)), (2, (10, 1))] and sol.iterations == 2 and "callback" in sol.message


def test_progress_bar_runs(capsys):
    problem, _ = REFERENCE_PROBLEMS["lqr"]()
    pmp.solve(problem, mesh=10, progress=True, stop=pmp.Stop(max_iter=2))
    assert "[emsa]" in capsys.readouterr().err  # tqdm draws on stderr, labelled with the problem and method


def test_mesh_as_times_and_init():
    problem, _ = REFERENCE_PROBLEMS["catalyst"]()
    mesh = torch.tensor([0.0, 0.1, 0.3, 0.6, 1.0])
    sol = pmp.solve(problem, mesh=mesh, init=torch.full((4, 1), 0.5), stop=pmp.Stop(max_iter=3))
    assert torch.allclose(sol.mesh, mesh.double())
    assert bool(((sol.controls >= 0) & (sol.controls <= 1)).all())


def test_box_controls_stay_in_the_box():
    problem, _ = REFERENCE_PROBLEMS["vanderpol"]()
    sol = pmp.solve(problem, mesh=20, method="msa", stop=pmp.Stop(max_iter=3))
    assert bool(((sol.controls >= -0.3) & (sol.controls <= 1.0)).all())


def test_zero_iterations_returns_the_initial_control():
    problem, _ = REFERENCE_PROBLEMS["lqr"]()
    sol = pmp.solve(problem, mesh=10, init=0.1, stop=pmp.Stop(max_iter=0))
    assert torch.all(sol.controls == 0.1) and sol.iterations == 0
