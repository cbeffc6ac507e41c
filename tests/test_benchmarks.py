"""The benchmark scripts run end to end at a tiny size (``--quick``) and write what scripts/report.py reads."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))  # as `python scripts/<bench>.py` does: the scripts import their `harness`


def load(name):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def keep_threads():
    """The scripts pin torch to one thread (timings); the rest of the suite keeps its own."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_bench_scaling_writes_split_exponents_and_figure(tmp_path):
    load("bench_scaling").main(["--quick", "--out", str(tmp_path)])  # meshes 10, 20; samples 20, 40; 1 iteration
    data = json.loads((tmp_path / "scaling.json").read_text())
    assert [r["size"] for r in data["mesh"]] == [10, 20] and [r["size"] for r in data["samples"]] == [20, 40]
    for axis in ("mesh", "samples"):
        for r in data[axis]:  # one iteration each: the parts lie inside the whole iteration
            parts = r["forward_seconds"] + r["backward_seconds"] + r["maximise_seconds"]
            assert 0 < parts <= r["seconds"]
        assert set(data[f"{axis}_exponents"]) == {"forward_seconds", "backward_seconds", "maximise_seconds", "seconds"}
    assert (tmp_path / "scaling.png").stat().st_size > 10_000


def test_bench_sine_times_emsa_to_each_baseline_loss(tmp_path):
    load("bench_sine").main(["--quick", "--out", str(tmp_path)])  # 16 samples, 3 / 4 iterations, good init, 1 point
    rows = json.loads((tmp_path / "sine.json").read_text())["rows"]
    assert [r["baseline"] for r in rows] == ["sgd", "adagrad", "adam"]
    for r in rows:
        assert r["quadrature"] == 1 and r["baseline_seconds"] > 0
        if r["emsa_seconds"] is not None:
            assert r["ratio"] == pytest.approx(r["emsa_seconds"] / r["baseline_seconds"])
            assert 0 <= r["emsa_iteration"] <= 4


def test_bench_control_without_casadi_says_how_to_get_it(monkeypatch):
    module = load("bench_control")
    monkeypatch.setattr(module, "ca", None)
    with pytest.raises(SystemExit, match=r"pip install -e '\.\[bench\]'"):
        module.main(["lqr"])


def test_bench_control_against_casadi_on_the_same_mesh(tmp_path):
    pytest.importorskip("casadi")
    load("bench_control").main(["--quick", "--out", str(tmp_path)])  # lqr, mesh 20, one repeat, emsa
    (row,) = json.loads((tmp_path / "control.json").read_text())["rows"]
    # Same piecewise-constant problem: both optima agree (RK4 x4 vs adaptive sweeps), re-checked by scipy.
    assert row["casadi"]["cost"] == pytest.approx(row["pmpsolve-emsa"]["cost"], rel=1e-6)
    assert abs(row["pmpsolve-emsa"]["rel_error"]) < 1e-2


def test_ddp_convergence_records_the_measure_per_iteration(tmp_path):
    load("ddp_convergence").main(["--quick", "--out", str(tmp_path)])  # lqr, mesh 20: DDP (both), E-MSA
    rows = json.loads((tmp_path / "ddp_convergence.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["ddp (exact)", "ddp (gauss-newton)", "emsa"]
    for r in rows:
        assert r["converged"] and len(r["optimality"]) == r["iterations"] + 1
    assert rows[0]["iterations"] <= 2 < rows[2]["iterations"]
    assert (tmp_path / "ddp_convergence.png").stat().st_size > 10_000


def test_bench_maximisers_closed_form_agrees_with_iterative(tmp_path):
    load("bench_maximisers").main(["--quick", "--out", str(tmp_path)])  # mesh 20, one repeat
    rows = json.loads((tmp_path / "maximisers.json").read_text())["rows"]
    assert {r["problem"] for r in rows} >= {"lqr", "catalyst", "vanderpol", "rayleigh"}
    for r in rows:
        assert r["max_control_difference"] < 1e-6, r


def test_bench_gpu_reports_a_missing_gpu_or_compares_both_devices(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the full comparison is too long for the suite")
    load("bench_gpu").main(["--quick", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "bench_gpu.json").read_text())
    assert data["cuda"] is False and "no CUDA device" in data["message"]


def test_bench_networks_splits_an_emsa_step_and_compares_with_adam(tmp_path):
    load("bench_networks").main(["--quick", "--out", str(tmp_path)])  # batch 8, one repeat, no training
    data = json.loads((tmp_path / "bench_networks.json").read_text())
    steps = data["steps"]
    assert steps["adam"]["ratio_to_adam"] == 1.0
    for name, row in steps.items():
        assert row["step_s"] > 0 and row["closure_calls"] >= 1
        assert abs(row["closure_s"] + row["maximisation_s"] - row["step_s"]) < 1e-9
    assert steps["emsa adaptive, 10 it"]["closure_calls"] >= 2  # the trial step is re-evaluated


def test_bench_closed_form_times_both_paths_against_adam(tmp_path):
    load("bench_closed_form").main(["--quick", "--out", str(tmp_path)])  # batch 8, two rounds
    steps = json.loads((tmp_path / "bench_closed_form.json").read_text())["steps"]
    assert steps["adam"]["ratio_to_adam"] == 1.0 and len(steps) == 30
    assert all(row["step_s"] > 0 and row["closure_calls"] >= 1 for row in steps.values())
    assert {"emsa rho 0.03, wd 0.001, closed form, autograd", "emsa adaptive, wd 0, closed form, 5 iterations",
            "emsa rho 0.03, wd 0.001, closed form, unpreconditioned", "emsa rho 0.03, wd 0, closed form, 4 iterations"} <= set(steps)


def test_bench_compile_records_timings_or_failures_and_host_syncs(tmp_path):
    if not hasattr(torch, "compile"):
        pytest.skip("torch.compile is not available in this torch build")
    # aot_eager only (tracing, no C++ code generation): seconds, not the minutes inductor takes.
    code = load("bench_compile").main(["--quick", "--out", str(tmp_path)])  # lqr at mesh 10, aot_eager only
    assert code == 0
    (row,) = json.loads((tmp_path / "compile.json").read_text())["rows"]
    forward = row["forward"]["aot_eager"]
    assert forward["ok"] and forward["max_difference"] == 0.0 and forward["median_seconds"] > 0
    for task in ("value_and_grad", "maximise_lbfgs", "value_and_grad_rho0"):
        result = row[task]["aot_eager"]
        assert result["ok"] or result["error"], result  # a failure is recorded with its message
    assert row["host_syncs"]["total"] >= row["host_syncs"]["iterations"] >= 1


def test_bench_func_objective_matches_autograd_and_records_dynamo_failures(tmp_path, monkeypatch):
    if not hasattr(torch, "compile"):
        pytest.skip("torch.compile is not available in this torch build")
    module = load("bench_func_objective")
    monkeypatch.setitem(sys.modules, "bench_func_objective", module)  # dynamo looks the traced code's module up
    # torch.func eager and aot_eager only (tracing, no C++ code generation): seconds, not inductor's minutes.
    code = module.main(["--quick", "--out", str(tmp_path)])  # sine K = 40 and lqr, one round, func eager and aot_eager
    assert code == 0
    cases = json.loads((tmp_path / "func_objective.json").read_text())["cases"]
    assert set(cases) == {"sine K=40", "lqr", "side-effect"}
    for label, case in cases.items():
        eager = case["variants"]["func eager"]  # the same aten ops as the autograd path: the same bits
        assert eager["ok"] and eager["max_diff_value"] == 0.0 and eager["max_diff_grad"] == 0.0, label
        assert eager["bit_identical_repeats"] and eager["speedup_wall"] > 0
    for label in ("sine K=40", "lqr"):  # one graph, no double backward for aot_autograd to refuse
        traced = cases[label]["variants"]["aot_eager"]
        assert traced["ok"] and traced["dynamo"]["graph_breaks"] == 0, traced
        assert traced["rel_diff_value"] < 1e-12 and traced["rel_diff_grad"] < 1e-12
    # a print in f: fullgraph=True makes dynamo refuse it, with its message, instead of running eagerly
    failed = cases["side-effect"]["variants"]["aot_eager"]
    assert not failed["ok"] and "print" in failed["error"]


def test_bench_shooting_compares_the_two_forward_sweeps(tmp_path):
    data = load("bench_shooting").main(["--quick", "--out", str(tmp_path)])  # mesh 10, lqr, K = 1
    assert json.loads((tmp_path / "shooting.json").read_text())["mesh"] == 10
    for row in data["sweeps"]:
        assert (row["sequential"]["strategy"], row["shooting"]["strategy"]) == ("sequential", "shooting")
        assert row["cost_difference"] <= 1e-8 * max(1.0, abs(row["sequential"]["cost"]))
    assert [r["shooting"] for r in data["solves"]] == [True, False]
    assert data["solves"][0]["cost"] == pytest.approx(data["solves"][1]["cost"], rel=1e-8)


def test_bench_shooting_compares_the_lean_step_with_torchdiffeqs(tmp_path):
    from pmpsolve.sweep import ode

    lean = ode._SOLVERS["dopri5"]
    data = load("bench_shooting").main(["--step-only", "--quick", "--out", str(tmp_path)])
    assert ode._SOLVERS["dopri5"] is lean  # the benchmark puts the lean step back
    (row,) = data["steps"]
    assert json.loads((tmp_path / "shooting_step.json").read_text())["rows"][0]["problem"] == "lqr"
    assert row["lean"]["iterations"] == row["torchdiffeq"]["iterations"]
    assert row["lean"]["cost"] == pytest.approx(row["torchdiffeq"]["cost"], rel=1e-10)


def test_bench_shooting_compiles_one_step_of_the_shooting_batch(tmp_path):
    if not hasattr(torch, "compile"):
        pytest.skip("torch.compile is not available in this torch build")
    # aot_eager (tracing, no C++ code generation): seconds; the documented run uses inductor
    data = load("bench_shooting").main(["--compiled-step", "--backend", "aot_eager", "--quick", "--lqr-samples", "1",
                                        "3", "--out", str(tmp_path)])  # an option given explicitly beats --quick
    rows = data["compiled_steps"]
    assert [(r["problem"], r["samples"]) for r in rows] == [("lqr", 1), ("lqr_samples", 3)]
    assert rows[1]["batch"] == [10, 3, 3, 3]  # N, 1 + n copies, K, n + the running cost
    for row in rows:
        assert row["max_difference"] <= 1e-15 and row["eager_us"] > 0 and row["compiled_us"] > 0
    assert json.loads((tmp_path / "shooting_compiled_step.json").read_text())["rows"] == rows


def test_bench_iterations_counts_sweeps_of_each_variant(tmp_path):
    load("bench_iterations").main(["--quick", "--out", str(tmp_path)])  # lqr at mesh 10, "before" and "default"
    data = json.loads((tmp_path / "iterations.json").read_text())
    assert set(data["results"]) == {"before", "default"} and data["machine"]["threads"] == 1
    for variant in data["results"].values():
        row = variant["lqr"]
        assert row["converged"] and row["forward_sweeps"] >= row["iterations"] >= 1


def test_bench_iteration_parts_split_a_step_into_its_parts(tmp_path):
    load("bench_iteration_parts").main(["--quick", "--out", str(tmp_path)])  # sine K = 20, 2 iterations
    median = json.loads((tmp_path / "iteration_parts.json").read_text())["runs"]["K=20"]["current"]["median"]
    parts = sum(median[p]["wall"] for p in median if p not in ("other", "iteration"))
    assert 0 < parts <= median["iteration"]["wall"] * (1 + 1e-9)


def test_harness_quick_defaults_yield_to_explicit_options_and_the_json_names_the_machine(tmp_path):
    harness = load("harness")
    parser = harness.parser("A benchmark.\n\nMore.")
    parser.add_argument("--mesh", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    assert harness.parse(parser, []).mesh == 200
    args = harness.parse(parser, ["--quick", "--repeats", "5"], quick=dict(mesh=10, repeats=1))
    assert (args.mesh, args.repeats, args.out) == (10, 5, harness.DEFAULT_OUT)
    calls = []
    timing = harness.timed(lambda: calls.append(1) or len(calls), repeats=3, warmup=2, clock="cpu")
    assert len(timing.times) == 3 and timing.result == 5 and timing.median >= 0
    path = harness.write_json(tmp_path / "sub" / "x.json", {"rows": []}, quiet=True)
    machine = json.loads(path.read_text())["machine"]
    assert {"processor", "cpus", "python", "torch", "threads"} <= set(machine)
