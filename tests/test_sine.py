"""The sine study: the model, the baselines, and a small version of the whole study."""
import json
import math

import pytest
import torch

import pmpsolve as pmp
from pmpsolve import baselines
from pmpsolve.studies import sine as study
from problems.sine import CONTROL_DIM, predict, sine_data, sine_initial_controls, sine_problem


def test_model_matches_a_hand_written_network():
    x, y = sine_data(7, seed=3)
    u = sine_initial_controls("good", 20, seed=1)
    W, b = u[0, :25].reshape(5, 5), u[0, 25:]
    X = x[:, None].expand(-1, 5)
    assert torch.allclose(sine_problem(x, y).dynamics(torch.tensor(0.0), X, u[0].expand(7, -1)),
                          torch.tanh(X @ W.T + b))
    # Zero weights: X stays at (x, ..., x), so the prediction is 5 x.
    assert torch.allclose(predict(torch.zeros(20, CONTROL_DIM, dtype=torch.float64), x), 5 * x)


def test_initialisations():
    good = sine_initial_controls("good", 20, seed=0)
    assert good.shape == (20, 30)
    assert torch.all(good[:, 25:] == 0.1)
    W = good[:, :25]
    assert W.abs().max() <= 0.2 and 0.06 < float(W.std()) < 0.1  # std 0.1 truncated at 2 std: ~0.088
    assert torch.all(sine_initial_controls("zero") == 0)
    with pytest.raises(ValueError, match="'good' or 'zero'"):
        sine_initial_controls("random")


def test_regulariser_is_the_reference_codes():
    """sum over layers of reg |theta_n|^2 / 2 equals int reg / (2 delta) |u|^2 dt."""
    x, y = sine_data(5)
    u = sine_initial_controls("good", 20, seed=2)
    reg = 0.01
    with_reg = pmp.cost(sine_problem(x, y, reg=reg), u)
    without = pmp.cost(sine_problem(x, y), u)
    assert with_reg - without == pytest.approx(reg / 2 * float((u ** 2).sum()), rel=1e-6)  # ODE tolerance


def test_backpropagation_through_the_sweep_agrees_with_the_costate_gradient():
    x, y = sine_data(20, seed=4)
    problem = sine_problem(x, y, reg=0.001)
    u = sine_initial_controls("good", 20, seed=0).requires_grad_(True)
    from pmpsolve.sweep.mesh import make_mesh
    from pmpsolve.sweep.pointwise import PointwiseProblem
    from pmpsolve.sweep.sweeps import Sweeper

    sweeper = Sweeper(PointwiseProblem(problem, torch.float64, "cpu"), make_mesh(20, 5.0, torch.float64, "cpu"),
                      rtol=1e-10, atol=1e-12)
    sweeper.forward(u, differentiable=True).cost.backward()
    _, grad = pmp.cost_gradient(problem, u.detach(), rtol=1e-10, atol=1e-12)
    assert float((u.grad - grad).abs().max() / grad.abs().max()) < 1e-3


def test_baselines_decrease_the_loss_and_refuse_bad_input():
    x, y = sine_data(30)
    problem = sine_problem(x, y)
    init = sine_initial_controls("good", 20)
    for name, lr in study.LEARNING_RATES.items():
        result = baselines.train(problem, optimizer=name, lr=lr, iterations=3, mesh=20, init=init, rtol=1e-6,
                                 atol=1e-8)
        assert [r.iteration for r in result.history] == [0, 1, 2, 3]
        assert result.history[-1].cost < result.history[0].cost
    with pytest.raises(ValueError, match="unknown `optimizer` 'rmsprop'"):
        baselines.train(problem, optimizer="rmsprop", mesh=20)
    with pytest.raises(ValueError, match="`lr` must be a number > 0"):
        baselines.train(problem, lr=-1.0, mesh=20)


def test_small_study_writes_the_results_file(tmp_path):
    results = study.main(["--quick", "--iterations", "3", "--emsa-iterations", "2", "--out", str(tmp_path),
                          "--no-progress"])
    data = json.loads((tmp_path / "results.json").read_text())
    assert set(data) >= {"config", "runs"}
    assert {(r["method"], r["init"]) for r in data["runs"]} == {
        (m, i) for m in ("emsa", "sgd", "adagrad", "adam", "ocnopt") for i in ("good", "zero")}
    for run in data["runs"]:
        n = 3 if run["method"] == "emsa" else 4
        for key in ("iteration", "train_loss", "test_loss", "wall_time"):
            assert len(run[key]) == n, (run["method"], key)
        assert run["iteration"] == list(range(n))
        assert all(math.isfinite(v) for v in run["train_loss"] + run["test_loss"])
        assert run["train_loss"][-1] < run["train_loss"][0], run["method"]
        assert all(b >= a for a, b in zip(run["wall_time"], run["wall_time"][1:]))
    assert len(list(tmp_path.glob("*.png"))) == 4
    assert results["config"]["learning_rates"]["good"] == dict(study.LEARNING_RATES, ocnopt=study.OCNOPT_LR)
