"""An E-MSA step with and without the closed form of its Linear / Conv2d entries, against Adam (docs/networks.md).

On the CNN study's network and batch (128 MNIST digits, 8 channels, 2 residual layers), one thread:
every round takes one step of each configuration in turn (round-robin, so that load on a shared
machine hits all of them alike), the first round is a warm-up; printed and saved are the median step
time, its ratio to Adam's step (with the same weight decay) and the median number of closure calls.
Configurations: pmp.nn.EMSA with rho 0.03 and adaptive, weight decay 0 and 0.001 (the study's),
``closed_form=True`` (default) and ``False`` (L-BFGS on every layer), and ``autograd`` rows: the closed form
with the residual layers' gradient from autograd (``pmp.nn`` without ``derived.DerivedHamiltonian``),
every convolution Gram matrix from im2col patches (``affine.MAX_PATCHES`` unbounded) and p_n formed for
every layer at every step: the step as it was before those three, for the record; ``unpreconditioned`` rows: the
residual layers' L-BFGS without its preconditioner (``derived.DerivedHamiltonian.precondition``: the Gauss-Newton
diagonal at a fixed rho, the Kronecker-factored blocks under the adaptive rule); and the closed form with
``maximiser_iter`` 5 and 4 instead of the study's 10.
Target: an E-MSA step <= 5x Adam's.

    python scripts/bench_closed_form.py [--rounds 8] [--batch 128] [--out results/bench]
"""
from __future__ import annotations

import contextlib
import statistics
import time
from unittest import mock

import torch

import harness
import pmpsolve as pmp
from problems.cnn import cross_entropy, residual_cnn


def autograd_paths():
    """The residual layers on autograd's gradient and every convolution Gram matrix from im2col patches."""
    stack = contextlib.ExitStack()
    stack.enter_context(mock.patch("pmpsolve.nn.optim.derived_objective", lambda group, objective, *rest: None))
    stack.enter_context(mock.patch("pmpsolve.nn.affine.MAX_PATCHES", float("inf")))
    stack.enter_context(mock.patch("pmpsolve.nn.affine.MAX_PATCHES_BLOCKED", float("inf")))
    stack.enter_context(mock.patch.object(pmp.nn.Optimizer, "_input_costates", lambda self, group: self.method == "emsa"))
    return stack


def unpreconditioned():
    """The residual layers' L-BFGS without its preconditioner (the diagonal at a fixed rho, the Kronecker blocks
    under the adaptive rule)."""
    from pmpsolve.nn.derived import DerivedHamiltonian

    return mock.patch.object(DerivedHamiltonian, "precondition", False)


def configurations():
    """name -> (weight decay, make(model) -> optimizer, context of its steps)."""
    out = {"adam": (0.0, lambda m: torch.optim.Adam(m.parameters(), lr=1e-3), contextlib.nullcontext),
           "adam, wd 0.001": (1e-3, lambda m: torch.optim.Adam(m.parameters(), lr=1e-3, weight_decay=1e-3),
                              contextlib.nullcontext)}
    for wd in (0.0, 1e-3):
        for rho, label in ((0.03, "rho 0.03"), (None, "adaptive")):
            contexts = {"closed form, autograd": autograd_paths, "closed form, unpreconditioned": unpreconditioned}
            for route in ("closed form", "closed form, unpreconditioned", "closed form, autograd", "all L-BFGS"):
                name = f"emsa {label}, wd {wd:g}, {route}"
                out[name] = (wd, lambda m, rho=rho, closed=route != "all L-BFGS", wd=wd: pmp.nn.EMSA(
                    m, rho=rho, maximiser_iter=10, closed_form=closed, weight_decay=wd),
                    contexts.get(route, contextlib.nullcontext))
        for rho, label in ((0.03, "rho 0.03"), (None, "adaptive")):  # fewer L-BFGS iterations on the residual layers
            for iterations, route, context in ((5, "", contextlib.nullcontext), (5, ", unpreconditioned", unpreconditioned),
                                               (4, "", contextlib.nullcontext)):
                out[f"emsa {label}, wd {wd:g}, closed form, {iterations} iterations{route}"] = (
                    wd, lambda m, rho=rho, wd=wd, iterations=iterations: pmp.nn.EMSA(
                        m, rho=rho, maximiser_iter=iterations, weight_decay=wd), context)
    return out


def main(argv=None):
    parser = harness.parser(__doc__)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = harness.parse(parser, argv, quick=dict(rounds=2, batch=8))
    harness.pin_threads(1)
    try:
        from pmpsolve.studies.data import mnist5k  # the CNN study's packaged digits (an optional extra)
        data = mnist5k(seed=args.seed)
        x, y = data.train_images[:args.batch], data.train_labels[:args.batch]
    except ImportError:
        g = torch.Generator().manual_seed(args.seed)
        x, y = torch.rand(args.batch, 1, 28, 28, generator=g), torch.randint(0, 10, (args.batch,), generator=g)
    configs = configurations()
    runs = {}
    for name, (_, make, context) in configs.items():
        model = residual_cnn(seed=args.seed)
        runs[name] = (model, make(model), context)
    seconds = {name: [] for name in configs}
    calls = {name: [] for name in configs}
    for round_ in range(args.rounds):
        for name, (model, opt, context) in runs.items():
            count = [0]

            def closure(model=model, opt=opt, count=count):
                count[0] += 1
                opt.zero_grad()
                loss = cross_entropy(model(x), y)
                loss.backward()
                return loss

            with context():
                start = time.perf_counter()
                if isinstance(opt, torch.optim.Adam):
                    closure()
                    opt.step()
                else:
                    opt.step(closure)
                elapsed = time.perf_counter() - start
            if round_ > 0 or args.rounds == 1:  # the first round warms up
                seconds[name].append(elapsed)
                calls[name].append(count[0])
    adam = {0.0: statistics.median(seconds["adam"]), 1e-3: statistics.median(seconds["adam, wd 0.001"])}
    rows = {}
    print(f"batch {args.batch}, 1 thread, median of {max(args.rounds - 1, 1)} rounds\n")
    print(f"{'configuration':52s} {'step [ms]':>10s} {'x Adam':>7s} {'closure calls':>14s}")
    for name, (wd, _, _) in configs.items():
        step = statistics.median(seconds[name])
        rows[name] = {"step_s": step, "ratio_to_adam": step / adam[wd], "closure_calls": statistics.median(calls[name])}
        print(f"{name:52s} {1e3 * step:10.1f} {step / adam[wd]:7.1f} {rows[name]['closure_calls']:14.0f}")
    harness.write_json(args.out / "bench_closed_form.json",
                       {"batch": args.batch, "threads": 1, "rounds": args.rounds, "steps": rows})


if __name__ == "__main__":
    main()
