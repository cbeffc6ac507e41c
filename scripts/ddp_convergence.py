"""The optimality measure against the iteration: DDP (exact and Gauss-Newton curvature) and E-MSA.

On the reference problems (lqr, catalyst, van der Pol, Rayleigh) at one mesh, each solved by
``pmp.solve(problem, method=...)`` with its defaults; the measure is the engine's first-order
optimality of each iterate (``IterationRecord.optimality``, what ``converged`` rests on), recorded by
the solver. Quadratic convergence shows as a measure whose logarithm doubles per iteration near the
end; the script prints, per method and problem, the iterations, whether it converged, and the last
measures with their ratios log(m_{k+1}) / log(m_k) (about 2: quadratic).

    python scripts/ddp_convergence.py [--mesh 200] [--out docs/figures]

Writes OUT/ddp_convergence.json and OUT/ddp_convergence.png.
"""
from __future__ import annotations

import math
import warnings

import harness
import pmpsolve as pmp
from problems import REFERENCE_PROBLEMS

PROBLEMS = ["lqr", "catalyst", "vanderpol", "rayleigh"]
METHODS = {"ddp (exact)": pmp.DDP(), "ddp (gauss-newton)": pmp.DDP(hessian="gauss-newton"), "emsa": pmp.EMSA()}


def orders(measures):
    """log(m_{k+1}) / log(m_k) over the last iterations where both measures are below 1 (about 2: quadratic)."""
    out = []
    for a, b in zip(measures, measures[1:]):
        if 0 < b < a < 1:
            out.append(math.log(b) / math.log(a))
    return out[-3:]


def main(argv=None):
    parser = harness.parser(__doc__)
    parser.add_argument("problems", nargs="*", default=None)
    parser.add_argument("--mesh", type=int, default=200)
    args = harness.parse(parser, argv, quick=dict(mesh=20))
    harness.pin_threads(1)
    names = args.problems or (["lqr"] if args.quick else PROBLEMS)
    rows = []
    for name in names:
        problem, reference = REFERENCE_PROBLEMS[name]()
        for label, method in METHODS.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                sol = pmp.solve(problem, method=method, mesh=args.mesh, stop=pmp.Stop(max_iter=200))
            measures = [r.optimality for r in sol.history if r.optimality == r.optimality]
            row = dict(problem=name, method=label, iterations=sol.iterations, converged=bool(sol.converged),
                       status=sol.status, cost=sol.cost, reference=reference, optimality=measures,
                       rejected=sum(r.rejected for r in sol.history), orders=orders(measures))
            rows.append(row)
            tail = ", ".join(f"{m:.1e}" for m in measures[-4:])
            print(f"{name:10s} {label:20s} {sol.iterations:4d} it converged={sol.converged} "
                  f"rejected={row['rejected']:3d} last measures [{tail}] orders {[round(o, 2) for o in row['orders']]}",
                  flush=True)
    out = harness.write_json(args.out / "ddp_convergence.json",
                             {"machine": harness.machine(), "mesh": args.mesh, "rows": rows})
    plot(rows, args.out / "ddp_convergence.png", args.mesh)
    print(f"wrote {out} and {args.out / 'ddp_convergence.png'}")


def plot(rows, path, mesh):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["problem"] for r in rows))
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.2), squeeze=False)
    styles = {"ddp (exact)": "o-", "ddp (gauss-newton)": "s--", "emsa": ".:"}
    for ax, name in zip(axes[0], names):
        for r in rows:
            if r["problem"] == name:
                ax.semilogy(range(len(r["optimality"])), r["optimality"], styles.get(r["method"], "-"),
                            label=f"{r['method']} ({r['iterations']} it)", markersize=4)
        ax.axhline(1e-5, color="grey", linewidth=0.8, label="tol 1e-5 (times max(1, |J|) in the test)")
        ax.set_title(f"{name}, N = {mesh}")
        ax.set_xlabel("iteration")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("optimality measure")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
