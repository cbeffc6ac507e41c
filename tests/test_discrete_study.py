"""``reproduce discrete --quick`` end to end: results.json, weights in the set, CLI errors."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pmpsolve as pmp
from pmpsolve.nn.discrete import in_the_set
from pmpsolve.studies import discrete as study

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    pytest.importorskip("sklearn", reason="--quick uses the 8x8 digits of scikit-learn (pip install 'pmpsolve[data]')")
    out = tmp_path_factory.mktemp("discrete")
    results = study.main(["--quick", "--out", str(out), "--no-progress"])
    return out, results


def test_quick_writes_every_run_with_accuracy_nonzeros_and_time(quick):
    out, results = quick
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["config"]["dataset"] == "digits8x8" and on_disk["config"]["size"] == "quick"
    runs = on_disk["runs"]
    assert [(r["network"], r["variant"]) for r in runs] == [(n, v) for n in study.NETWORKS for v in study.VARIANT_KEYS]
    epochs = on_disk["config"]["epochs"]
    for r in runs:
        assert r["complete"] and not r["diverged"]
        assert r["epoch"] == list(range(epochs + 1))
        assert len(r["test_accuracy"]) == len(r["nonzero_fraction"]) == len(r["seconds"]) == epochs + 1
        assert all(0 <= a <= 1 for a in r["test_accuracy"])
        assert r["final_nonzero_fraction"] == r["nonzero_fraction"][-1]
        assert r["final_nonzero_fraction"] == pytest.approx(r["nonzero_weights"] / r["restricted_weights"])
        assert r["seconds"][-1] > 0 and r["run_seconds"] >= r["seconds"][-1]
        if r["variant"] == "l0-prune":
            assert r["final_nonzero_fraction"] == pytest.approx(0.2, abs=0.01)
        if r["variant"] in ("float-adam",):
            assert r["final_nonzero_fraction"] == 1.0
    # the float network learns something in the smoke test (10 classes: chance is 10 %)
    adam = next(r for r in runs if r["network"] == "fc-bn" and r["variant"] == "float-adam")
    assert adam["final_test_accuracy"] > 0.5
    table = (out / "results.md").read_text()
    assert "| fc-bn | ternary | MSA |" in table and "Targets:" in table
    assert (out / "discrete_digits8x8.png").stat().st_size > 10_000


def test_finite_set_runs_have_every_weight_exactly_in_the_set(quick):
    """Counted twice: the recorded count, and the weights of a model trained again by the same variant."""
    _, results = quick
    finite = [r for r in results["runs"] if r["set"] is not None]
    assert len(finite) == sum(weights in study.SETS for _, weights, _ in study.VARIANTS) * len(study.NETWORKS)
    for r in finite:
        assert r["in_set"] == r["restricted_weights"] > 0, (r["network"], r["variant"])
    data = study.datasets.digits8x8(seed=0)
    config = results["config"]
    for variant in ("binary-msa", "ternary-msa", "binary-ste", "ternary-ste", *study.SCALED):
        def build():
            return study.build_network("cnn", image_size=8, hidden=config["hidden"], channels=config["channels"],
                                       residual_layers=config["residual_layers"], seed=0)
        model = build()
        opt = study.make_optimizer(variant, model, steps=10, settings=config["methods"])
        values = torch.tensor(study.SETS[variant.split("-")[0]])
        for step in range(3):
            x, y = data.train_images[step * 50:(step + 1) * 50], data.train_labels[step * 50:(step + 1) * 50]

            def closure():
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(x), y)
                loss.backward()
                return loss
            opt.step(closure)
        params = dict(model.named_parameters())
        names = study.restricted_names(model)
        assert len(names) == 4  # 2 projection convs, 1 residual conv (quick), the classifier
        finite = pmp.Finite(values.tolist(), scale="channel" if variant in study.SCALED else None)
        inside = sum(int(in_the_set(params[k].detach(), finite).sum()) for k in names)
        assert inside == sum(params[k].numel() for k in names)


def test_resume_loads_the_complete_runs(quick, tmp_path):
    out, results = quick
    again = study.main(["--quick", "--out", str(out), "--no-progress", "--resume", "--networks", "fc"])
    assert len(again["runs"]) == len(study.VARIANT_KEYS)
    assert json.loads((out / "results.json").read_text())["runs"][0] == results["runs"][0]


@pytest.mark.parametrize("args,message", [
    (["--epochs", "0"], "--epochs"),
    (["--networks", "mlp"], "unknown network 'mlp'"),
    (["--batch-size", "x"], "--batch-size"),
    (["--data-dir", "/nonexistent"], "--data-dir is for --dataset mnist or fashion"),
    (["--coherence", "1.5"], "--coherence"),
])
def test_cli_errors_exit_2(args, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        study.main([*args, "--out", str(tmp_path)])
    assert stop.value.code == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before any run


def test_coherence_setting_reaches_the_rule_and_the_results_file():
    assert study.study_settings()["methods"]["coherence"] == pmp.nn.DiscreteRule().coherence == 0.5
    settings = study.study_settings(size="quick", coherence=1.0)
    assert settings["methods"]["coherence"] == 1.0
    model = study.build_network("fc", image_size=8, hidden=4, channels=2, residual_layers=1, seed=0)
    opt = study.make_optimizer("ternary-msa-scaled", model, steps=1, settings=settings["methods"])
    assert opt._finite.rule.coherence == 1.0


def test_cli_error_through_python_m_pmpsolve(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pmpsolve", "reproduce", "discrete", "--threads", "0",
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "--threads" in proc.stderr and "Traceback" not in proc.stderr
