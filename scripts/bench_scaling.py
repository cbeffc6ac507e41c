"""Seconds per iteration, split into forward sweep, backward sweep and maximisation, as the problem grows.

* mesh: van der Pol (K = 1, the default solve: E-MSA, closed-form maximisation)
  with N = 20 ... 2000 intervals;
* samples: the sine network (mesh 20, E-MSA with fixed rho and 10 L-BFGS iterations
  as in the study) with K = 100 ... 100000 samples.

Each point runs ``--iterations`` iterations and reports medians over them. The
growth exponent of each part is the slope of a least-squares line through the
log-log points (over the larger half of the sizes, where fixed overheads matter
least). Writes results/bench/scaling.json and scaling.png and prints a table.

    python scripts/bench_scaling.py [--meshes 20 50 200 500 2000] [--samples 100 1000 10000 100000] [--quadrature 3]
"""
from __future__ import annotations

import statistics
import warnings

import numpy as np

import harness
import pmpsolve as pmp
from problems import van_der_pol
from problems.sine import sine_data, sine_initial_controls, sine_problem

PARTS = ("forward_seconds", "backward_seconds", "maximise_seconds", "seconds")


def split(sol):
    records = sol.history[1:]
    return {part: statistics.median(getattr(r, part) for r in records) for part in PARTS} | {
        "forward_evals": statistics.median(r.forward_evals for r in records),
        "backward_evals": statistics.median(r.backward_evals for r in records),
        "maximisers": sol.settings.get("maximisers_used", {})}


def exponent(sizes, values):
    """Slope of log(value) against log(size) over the larger half of the points."""
    k = max(2, (len(sizes) + 1) // 2)
    x, y = np.log(np.asarray(sizes[-k:], float)), np.log(np.asarray(values[-k:], float))
    return float(np.polyfit(x, y, 1)[0])


def main(argv=None):
    parser = harness.parser(__doc__)
    parser.add_argument("--meshes", type=int, nargs="+", default=[20, 50, 200, 500, 2000])
    parser.add_argument("--samples", type=int, nargs="+", default=[100, 1000, 10000, 100000])
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--quadrature", type=int, default=3,
                        help="Gauss points per interval of the interval Hamiltonian (3: the default; 1: midpoint)")
    args = harness.parse(parser, argv, quick=dict(meshes=[10, 20], samples=[20, 40], iterations=1))
    results = {"machine": harness.machine(), "quadrature": args.quadrature, "mesh": [], "samples": []}
    problem, _ = van_der_pol()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for N in args.meshes:
            sol = pmp.solve(problem, method=pmp.EMSA(rho=1.0), mesh=N,
                            maximiser=pmp.Maximiser(quadrature=args.quadrature),
                            stop=pmp.Stop(max_iter=args.iterations, tol=0.0))
            results["mesh"].append(dict(size=N, **split(sol)))
            print("mesh", N, {k: round(v, 4) for k, v in results["mesh"][-1].items() if k in PARTS}, flush=True)
        for K in args.samples:
            train = sine_problem(*sine_data(K, seed=0), reg=0.001, delta=0.25, name="sine")
            init = sine_initial_controls("good", 20, seed=0)
            sol = pmp.solve(train, method=pmp.EMSA(rho=0.25), mesh=20, init=init, ode=pmp.ODE(rtol=1e-6, atol=1e-8),
                            maximiser=pmp.Maximiser(iterations=10, perturb=0.005, seed=0, quadrature=args.quadrature),
                            stop=pmp.Stop(max_iter=args.iterations, tol=0.0))
            results["samples"].append(dict(size=K, **split(sol)))
            print("samples", K, {k: round(v, 4) for k, v in results["samples"][-1].items() if k in PARTS}, flush=True)
    for axis in ("mesh", "samples"):
        rows = results[axis]
        sizes = [r["size"] for r in rows]
        results[f"{axis}_exponents"] = {part: exponent(sizes, [r[part] for r in rows]) for part in PARTS}
    harness.write_json(args.out / "scaling.json", results)
    plot(results, args.out / "scaling.png")
    for axis, label in (("mesh", "N (intervals)"), ("samples", "K (samples)")):
        print(f"\n| {label} | forward [s] | backward [s] | maximisation [s] | iteration [s] | max / sweeps |")
        print("| --- | --- | --- | --- | --- | --- |")
        for r in results[axis]:
            ratio = r["maximise_seconds"] / (r["forward_seconds"] + r["backward_seconds"])
            print(f"| {r['size']} | {r['forward_seconds']:.4f} | {r['backward_seconds']:.4f} | "
                  f"{r['maximise_seconds']:.4f} | {r['seconds']:.4f} | {ratio:.2f} |")
        e = results[f"{axis}_exponents"]
        print(f"| exponent | {e['forward_seconds']:.2f} | {e['backward_seconds']:.2f} | {e['maximise_seconds']:.2f} | "
              f"{e['seconds']:.2f} | |")
    print(f"\nwrote {args.out / 'scaling.png'}")


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    names = {"forward_seconds": "forward sweep", "backward_seconds": "backward sweep",
             "maximise_seconds": "maximisation", "seconds": "whole iteration"}
    for ax, axis, title in ((axes[0], "mesh", "van der Pol, K = 1: mesh N"),
                            (axes[1], "samples", "sine network, N = 20: samples K")):
        rows = results[axis]
        sizes = [r["size"] for r in rows]
        for part in PARTS:
            e = results[f"{axis}_exponents"][part]
            ax.loglog(sizes, [r[part] for r in rows], "o-", label=f"{names[part]} (slope {e:.2f})")
        ax.set_title(title)
        ax.set_xlabel(axis)
        ax.set_ylabel("seconds per iteration (median)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
