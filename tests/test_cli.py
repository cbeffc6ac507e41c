"""The command line of the studies: Ctrl-C loses nothing, --resume, user mistakes.

Interruptions are simulated in-process (a run raising KeyboardInterrupt, or a solve
returning ``status == "interrupted"``); the option checks run the real command line
in a subprocess and look for exit code 2 and no traceback.
"""
import argparse
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from pmpsolve.studies import cli
from pmpsolve.studies import controls as controls_study
from pmpsolve.studies import sine as sine_study

ROOT = Path(__file__).resolve().parents[1]
SINE_QUICK = ["--quick", "--iterations", "2", "--emsa-iterations", "1", "--no-progress"]


def _cli_run(args, cwd):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "pmpsolve", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_sine_interrupted_after_the_first_run_keeps_it_and_resume_does_not_recompute_it(tmp_path, monkeypatch,
                                                                                         capsys):
    args = SINE_QUICK + ["--out", str(tmp_path)]

    def ctrl_c(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(sine_study, "_run_baseline", ctrl_c)  # the second run (good, sgd) is "interrupted"
    with pytest.raises(SystemExit) as stop:
        sine_study.main(args)
    assert stop.value.code == 130
    err = capsys.readouterr().err
    assert "resume with: python -m pmpsolve reproduce sine" in err and "--resume" in err
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [(r["init"], r["method"]) for r in saved["runs"]] == [("good", "emsa")]
    assert not list(tmp_path.glob("*.tmp"))  # the atomic write left no temporary file
    monkeypatch.undo()

    real_emsa, calls = sine_study._run_emsa, []

    def counting_emsa(*a, **k):
        calls.append(k.get("rho"))
        return real_emsa(*a, **k)

    monkeypatch.setattr(sine_study, "_run_emsa", counting_emsa)
    results = sine_study.main(args + ["--resume"])
    assert len(calls) == 1  # only the zero initialisation's E-MSA run; the good one was loaded
    final = json.loads((tmp_path / "results.json").read_text())
    assert [(r["init"], r["method"]) for r in final["runs"]] == [
        (i, m) for i in ("good", "zero") for m in ("emsa", "sgd", "adagrad", "adam", "ocnopt")]
    assert final["runs"][0] == saved["runs"][0]
    assert results["runs"] == final["runs"]
    assert len(list(tmp_path.glob("*.png"))) == 4
    assert "1 run(s) loaded" in capsys.readouterr().out


def test_a_solve_that_reports_an_interruption_stops_the_study_and_is_not_recorded(tmp_path, monkeypatch, capsys):
    """The solve of the lead's change returns ``status == "interrupted"`` instead of raising."""
    args = ["double-integrator", "--methods", "emsa", "sqh", "--mesh", "10", "--max-iter", "10", "--out",
            str(tmp_path)]
    real_solve, calls = controls_study.pmp.solve, []

    def solve_interrupted_second(*a, **k):
        calls.append(k.get("method"))
        if len(calls) == 2:
            return types.SimpleNamespace(status="interrupted", converged=False)
        return real_solve(*a, **k)

    monkeypatch.setattr(controls_study.pmp, "solve", solve_interrupted_second)
    with pytest.raises(SystemExit) as stop:
        controls_study.main(args)
    assert stop.value.code == 130
    assert "--resume" in capsys.readouterr().err
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [(r["problem"], r["method"]) for r in saved["rows"]] == [("double-integrator", "emsa")]

    calls.clear()
    monkeypatch.setattr(controls_study.pmp, "solve",
                        lambda *a, **k: calls.append(k.get("method")) or real_solve(*a, **k))
    controls_study.main(args + ["--resume"])
    assert calls == ["sqh"]  # emsa was loaded
    final = json.loads((tmp_path / "results.json").read_text())
    assert [r["method"] for r in final["rows"]] == ["emsa", "sqh"]
    assert final["rows"][0] == saved["rows"][0]
    assert all(r["status"] != "interrupted" for r in final["rows"])


def test_resume_with_other_settings_is_refused_before_any_run(tmp_path, monkeypatch, capsys):
    args = ["double-integrator", "--methods", "emsa", "--mesh", "10", "--max-iter", "10", "--out", str(tmp_path)]
    controls_study.main(args)
    before = (tmp_path / "results.json").read_text()
    monkeypatch.setattr(controls_study, "_row", lambda *a, **k: pytest.fail("a run started"))
    with pytest.raises(SystemExit) as stop:
        controls_study.main([a if a != "10" else "12" for a in args] + ["--resume"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "mesh = 10 there, 12 now" in err and "use another --out" in err
    assert (tmp_path / "results.json").read_text() == before  # untouched
    (tmp_path / "results.json").write_text("{not json")
    with pytest.raises(SystemExit) as stop:
        controls_study.main(args + ["--resume"])
    assert stop.value.code == 2 and "cannot read" in capsys.readouterr().err
    # The sine study compares its settings too (here: the number of iterations).
    (tmp_path / "results.json").write_text(json.dumps({"config": sine_study.study_settings(size="quick"),
                                                       "runs": []}))
    monkeypatch.setattr(sine_study, "run_study", lambda **k: pytest.fail("a run started"))
    with pytest.raises(SystemExit) as stop:
        sine_study.main(SINE_QUICK + ["--out", str(tmp_path), "--resume"])
    assert stop.value.code == 2 and "iterations = 8 there, 2 now" in capsys.readouterr().err


@pytest.fixture(scope="module")
def a_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "a-file"
    path.write_text("not a folder")
    return path


MISTAKES = [
    (["reproduce", "nosuchstudy"], "argument study: invalid choice: 'nosuchstudy'"),
    (["simulate"], "argument command: invalid choice: 'simulate'"),
    (["reproduce", "reference", "foo"], "argument problems: unknown problem 'foo'"),
    (["reproduce", "controls", "foo"], "argument problems: unknown problem 'foo'"),
    (["reproduce", "controls", "--methods", "newton"], "argument --methods: invalid choice: 'newton'"),
    (["reproduce", "reference", "--method", "newton"], "argument --method: invalid choice: 'newton'"),
    (["reproduce", "reference", "--mesh", "0"], "argument --mesh: expected a whole number >= 1, got '0'"),
    (["reproduce", "controls", "--max-iter", "-1"], "argument --max-iter: expected a whole number >= 1, got '-1'"),
    (["reproduce", "sine", "--iterations", "-3"], "argument --iterations: expected a whole number >= 1, got '-3'"),
    (["reproduce", "sine", "--emsa-iterations", "0"], "argument --emsa-iterations: expected a whole number >= 1"),
    (["reproduce", "sine", "--iterations", "ten"], "argument --iterations: expected a whole number >= 1, got 'ten'"),
    (["reproduce", "sine", "--rho", "-1"], "argument --rho: expected a number >= 0, got '-1'"),
    (["reproduce", "sine", "--reg", "abc"], "argument --reg: expected a number >= 0, got 'abc'"),
    (["reproduce", "sine", "--seed", "-2"], "argument --seed: expected a whole number >= 0, got '-2'"),
    (["reproduce", "sine", "--quadrature", "11"], "argument --quadrature: expected a whole number from 1 to 10"),
    (["reproduce", "sine", "--device", "tpu"], "argument --device:"),
    (["reproduce", "sine", "--out", "{file}"], "argument --out: expected a folder, got '{file}', which is a file"),
    (["reproduce", "reference", "--out", "{file}/sub"], "argument --out: expected a folder that can be created"),
]


@pytest.mark.parametrize("args, message", MISTAKES, ids=[" ".join(a) for a, _ in MISTAKES])
def test_command_line_mistakes_are_argparse_errors_without_traceback(args, message, a_file, tmp_path, monkeypatch,
                                                                     capsys):
    # In-process (a subprocess per case costs an interpreter and torch's import, ~3 s): an argparse error is
    # SystemExit(2) with the usage on stderr; any other exception would be a traceback and fail here.
    from pmpsolve.__main__ import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        main([a.format(file=a_file) for a in args])
    err = capsys.readouterr().err
    assert stop.value.code == 2, err
    assert message.format(file=a_file) in err
    assert "usage:" in err
    assert not (tmp_path / "results").exists()  # refused before any run (nothing written)


def test_a_command_line_mistake_exits_2_without_traceback_in_a_real_process(tmp_path):
    done = _cli_run(["reproduce", "sine", "--iterations", "ten"], cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert "argument --iterations: expected a whole number >= 1, got 'ten'" in done.stderr


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root can write a read-only folder")
def test_read_only_out_folder_is_refused(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        done = _cli_run(["reproduce", "sine", "--out", str(folder)], cwd=tmp_path)
        assert done.returncode == 2 and "Traceback" not in done.stderr
        assert "argument --out: expected a folder that can be written" in done.stderr
    finally:
        folder.chmod(0o755)


def test_writable_dir_reports_a_folder_that_cannot_be_written(tmp_path, monkeypatch):
    """What the read-only case does where the tests run as root (who may write anywhere)."""
    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(cli.tempfile, "mkstemp", refuse)
    with pytest.raises(argparse.ArgumentTypeError, match="expected a folder that can be written.*Permission denied"):
        cli.writable_dir(str(tmp_path))
    with pytest.raises(argparse.ArgumentTypeError, match=r"its parent .* cannot be written"):
        cli.writable_dir(str(tmp_path / "new" / "sub"))


def test_validators():
    assert cli.positive_int("3") == 3 and cli.nonnegative_int("0") == 0
    assert cli.positive_float("0.5") == 0.5 and cli.nonnegative_float("0") == 0.0
    for check, value in ((cli.positive_int, "0"), (cli.positive_int, "1.5"), (cli.nonnegative_int, "-1"),
                         (cli.positive_float, "0"), (cli.positive_float, "inf"), (cli.nonnegative_float, "nan")):
        with pytest.raises(argparse.ArgumentTypeError, match=repr(value)):
            check(value)


def test_help_works_and_points_to_docs(tmp_path):
    top = _cli_run(["--help"], cwd=tmp_path)
    assert top.returncode == 0 and "docs/" in top.stdout and "DESIGN" not in top.stdout
    assert all(study in top.stdout for study in ("sine", "reference", "controls"))
    sine = _cli_run(["reproduce", "sine", "--help"], cwd=tmp_path)
    assert sine.returncode == 0 and "--resume" in sine.stdout and "--iterations" in sine.stdout
    assert "Traceback" not in top.stderr + sine.stderr


def test_write_json_is_atomic(tmp_path):
    path = tmp_path / "results.json"
    cli.write_json(path, {"a": 1})
    cli.write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    with pytest.raises(TypeError):
        cli.write_json(path, {"a": object()})  # fails half-way: the old file stays, no temporary is left
    assert json.loads(path.read_text()) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]
