"""Time to target on the sine study: E-MSA against Adam, SGD and Adagrad, side by side in one process.

For each initialisation: every gradient method runs ``--iterations`` (500) iterations
with the reference code's learning rate; its final training loss is the target.
E-MSA (the study's settings: rho = 1 in the reference code's convention, 10 L-BFGS
iterations, start perturbation) then runs until its training loss first reaches
each target, or ``--emsa-iterations`` (500), once per ``--quadrature`` (Gauss points per
interval of the interval Hamiltonian: 3 is the study's setting, 1 the midpoint rule,
which makes every maximisation about 3x cheaper). Reported per baseline: its seconds for
the 500 iterations, E-MSA's seconds to reach the same loss, and their ratio
(E-MSA / baseline; <= 1 means E-MSA gets there first). One run each; the machine is
noisy, so read ratios, not seconds.

    python scripts/bench_sine.py [--inits good zero] [--iterations 500] [--out results/bench]

Writes results/bench/sine.json and prints a table.
"""
from __future__ import annotations

import warnings

import torch

import harness
import pmpsolve as pmp
from pmpsolve import baselines  # the gradient baselines of the study (SGD, Adagrad, Adam through the same sweep)
from pmpsolve.studies.sine import LEARNING_RATES, MESH  # the study's settings, so that the times are the study's
from problems.sine import sine_data, sine_initial_controls, sine_problem


def main(argv=None):
    parser = harness.parser(__doc__)
    parser.add_argument("--inits", nargs="+", default=["good", "zero"], choices=["good", "zero"])
    parser.add_argument("--iterations", type=int, default=500, help="iterations of each gradient method")
    parser.add_argument("--emsa-iterations", type=int, default=500)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--rho", type=float, default=1.0, help="reference-code convention (solve gets rho * delta)")
    parser.add_argument("--quadrature", type=int, nargs="+", default=[3, 1],
                        help="Gauss points per interval for E-MSA; one E-MSA run per value (default: 3 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")
    args = harness.parse(parser, argv, quick=dict(iterations=3, emsa_iterations=4, samples=16, inits=["good"],
                                                   quadrature=[1], no_progress=True))
    dtype, rtol, atol = torch.float64, 1e-6, 1e-8
    delta = 5.0 / MESH
    train = sine_problem(*sine_data(args.samples, seed=args.seed), reg=0.001, delta=delta, name="sine-train")
    rows = []
    for init_kind in args.inits:
        init = sine_initial_controls(init_kind, MESH, seed=args.seed, dtype=dtype)
        targets = {}
        for opt, lr in LEARNING_RATES.items():
            result = baselines.train(train, optimizer=opt, lr=lr, iterations=args.iterations, mesh=MESH, init=init,
                                     dtype=dtype, rtol=rtol, atol=atol, progress=not args.no_progress)
            targets[opt] = dict(lr=lr, loss=result.cost, seconds=result.history[-1].elapsed)
            print(f"{init_kind} {opt}: loss {result.cost:.5g} after {args.iterations} iterations, "
                  f"{targets[opt]['seconds']:.1f} s", flush=True)
        for quadrature in args.quadrature:
            rows.extend(time_to_targets(train, init, init_kind, targets, quadrature, args, delta, dtype, rtol, atol))
    harness.write_json(args.out / "sine.json", {"samples": args.samples, "rho": args.rho, "rows": rows})
    print()
    print("| init | baseline (lr) | target: its loss after "
          f"{args.iterations} it | its seconds | E-MSA quadrature | E-MSA reaches it at | E-MSA seconds | "
          "ratio E-MSA / baseline |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        at = "not reached" if r["emsa_iteration"] is None else f"iteration {r['emsa_iteration']}"
        secs = "-" if r["emsa_seconds"] is None else f"{r['emsa_seconds']:.1f}"
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
        print(f"| {r['init']} | {r['baseline']} ({r['lr']:g}) | {r['target_loss']:.4g} | {r['baseline_seconds']:.1f} | "
              f"{r['quadrature']} | {at} | {secs} | {ratio} |")


def time_to_targets(train, init, init_kind, targets, quadrature, args, delta, dtype, rtol, atol):
    """One E-MSA run, stopped once it has reached every baseline's final loss; a row per baseline."""
    reached = {opt: None for opt in targets}
    trace = []

    def watch(record, controls):
        trace.append((record.iteration, record.cost, record.elapsed))
        for opt, target in targets.items():
            if reached[opt] is None and record.cost <= target["loss"]:
                reached[opt] = dict(iteration=record.iteration, seconds=record.elapsed)
        return all(r is not None for r in reached.values())

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        pmp.solve(train, method=pmp.EMSA(rho=args.rho * delta), mesh=MESH, init=init, dtype=dtype, callback=watch,
                  progress=not args.no_progress, ode=pmp.ODE(rtol=rtol, atol=atol),
                  maximiser=pmp.Maximiser(iterations=10, perturb=0.005, seed=args.seed, quadrature=quadrature),
                  stop=pmp.Stop(max_iter=args.emsa_iterations, tol=0.0))
    rows = []
    for opt, target in targets.items():
        r = reached[opt]
        rows.append(dict(init=init_kind, baseline=opt, lr=target["lr"], iterations=args.iterations,
                         target_loss=target["loss"], baseline_seconds=target["seconds"], quadrature=quadrature,
                         emsa_iteration=None if r is None else r["iteration"],
                         emsa_seconds=None if r is None else r["seconds"],
                         ratio=None if r is None else r["seconds"] / target["seconds"]))
    rows[-1]["emsa_trace_last"] = trace[-1]
    print(f"{init_kind} E-MSA (quadrature {quadrature}): " + ", ".join(
        f"{row['baseline']} target at {row['emsa_seconds'] if row['emsa_seconds'] is None else round(row['emsa_seconds'], 1)} s"
        for row in rows), flush=True)
    return rows


if __name__ == "__main__":
    main()
