"""E-MSA iteration counts: the default adaptive E-MSA against variants of its rho rule and Anderson step.

Solves the four reference problems (``problems.REFERENCE_PROBLEMS``) at one mesh with the
default E-MSA and with each variant (``solve(..., options=...)``), and prints per problem and
variant: status, iterations, forward sweeps (one per trial step, kept or rejected), right-hand
side evaluations of the forward and backward sweeps, wall time (median of ``--repeats``), J and
its relative difference from J of "before" (high_ratio 0.5, no Anderson screen: the rule the
variants start from). Saves everything to ``OUT/iterations.json``.

    python scripts/bench_iterations.py [--mesh 200] [--repeats 1] [--variants default,no-reset]
                                       [--problems lqr,catalyst] [--out results/bench]
"""
from __future__ import annotations

import json
import statistics

import harness
import pmpsolve as pmp
from problems import REFERENCE_PROBLEMS

#: "before": high_ratio 0.5 and no Anderson screen, the reference of the relative numbers.
BEFORE = {"high_ratio": 0.5, "anderson_screen": None}

#: name -> pmp.EMSA options; each variant changes "before" (or the defaults).
VARIANTS = {
    "before": BEFORE,
    "default": {},
    "screen": {**BEFORE, "anderson_screen": 0.0},
    "high-0.9": {**BEFORE, "high_ratio": 0.9},
    "shrink-0.7": {**BEFORE, "shrink": 0.7},
    "grow-2": {**BEFORE, "grow": 2.0},
    "memory-10": {**BEFORE, "anderson": 10},
    "no-anderson": {**BEFORE, "anderson": 0},
    "reset-on-grow": {**BEFORE, "anderson_reset": "grow"},
    "no-reset": {**BEFORE, "anderson_reset": "never"},
    "no-reset+screen": {**BEFORE, "anderson_reset": "never", "anderson_screen": 0.0},
    "floor": {**BEFORE, "floor_decay": 0.9},
    "screen+high-0.9": {"anderson_screen": 0.0, "high_ratio": 0.9},  # = default
    "screen+high-0.9+grow-2": {"anderson_screen": 0.0, "high_ratio": 0.9, "grow": 2.0},
    "screen+shrink-0.7+grow-2": {**BEFORE, "anderson_screen": 0.0, "shrink": 0.7, "grow": 2.0},
    "screen+high-0.9+shrink-0.7": {"anderson_screen": 0.0, "high_ratio": 0.9, "shrink": 0.7},
}


def run(problem, options, mesh):
    seconds, _, sol = harness.clock(lambda: pmp.solve(problem, pmp.EMSA(**options), mesh=mesh))
    steps = sol.history[1:]
    return {
        "status": sol.status, "converged": sol.converged, "cost": sol.cost, "optimality": sol.optimality,
        "iterations": len(steps), "forward_sweeps": sum(1 + r.rejected for r in steps),
        "rejected": sum(r.rejected for r in steps),
        "forward_evals": sum(r.forward_evals for r in sol.history),
        "backward_evals": sum(r.backward_evals for r in steps), "seconds": seconds,
    }


def main(argv=None):
    parser = harness.parser(__doc__)
    parser.add_argument("--mesh", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=1, help="runs per cell; wall time is their median")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--problems", default=",".join(REFERENCE_PROBLEMS))
    args = harness.parse(parser, argv, quick=dict(mesh=10, variants="default", problems="lqr"))
    harness.pin_threads(1)
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    names = args.problems.split(",")
    path = args.out / "iterations.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    results = {}
    if "before" not in variants:  # the reference of every relative number: from the JSON at --out when it has this mesh
        variants = ["before"] + variants
        if previous.get("mesh") == args.mesh:
            results["before"] = {n: r for n, r in previous["results"].get("before", {}).items() if n in names}
    for name in names:
        problem = REFERENCE_PROBLEMS[name]()[0]
        for variant in variants:
            if name in results.get(variant, {}):
                continue
            # every count is deterministic; only the wall time is a median over the repeats
            runs = [run(problem, VARIANTS[variant], args.mesh) for _ in range(args.repeats)]
            row = dict(runs[0], seconds=statistics.median(r["seconds"] for r in runs))
            results.setdefault(variant, {})[name] = row
            print(f"  {variant} {name}: {row['status']} {row['iterations']} iterations, {row['forward_sweeps']} "
                  f"forward sweeps, {row['seconds']:.1f} s", flush=True)

    header = (f"{'variant':16s} {'problem':10s} {'status':>9s} {'iter':>5s} {'fwd sweeps':>10s} {'rej':>4s} "
              f"{'fwd RHS':>8s} {'bwd RHS':>8s} {'wall [s]':>8s} {'J':>16s} {'rel dJ':>8s}")
    print(header)
    for variant in variants:
        for name in names:
            r, ref = results[variant][name], results["before"][name]
            rel = abs(r["cost"] - ref["cost"]) / max(abs(ref["cost"]), 1e-300)
            r["relative_cost_difference"] = rel
            print(f"{variant:16s} {name:10s} {r['status']:>9s} {r['iterations']:5d} {r['forward_sweeps']:10d} "
                  f"{r['rejected']:4d} {r['forward_evals']:8d} {r['backward_evals']:8d} {r['seconds']:8.1f} "
                  f"{r['cost']:16.10g} {rel:8.1e}")
        total = {key: sum(results[variant][n][key] for n in names) for key in ("iterations", "forward_sweeps")}
        ref = {key: sum(results["before"][n][key] for n in names) for key in total}
        worst = max(results[variant][n]["forward_sweeps"] / results["before"][n]["forward_sweeps"] for n in names)
        print(f"{variant:16s} {'sum':10s} {'':>9s} {total['iterations']:5d} {total['forward_sweeps']:10d}   "
              f"({100 * (total['forward_sweeps'] / ref['forward_sweeps'] - 1):+.0f} % sweeps, worst problem "
              f"{100 * (worst - 1):+.0f} %)")
    previous.update({"mesh": args.mesh, "repeats": args.repeats, "variants": {v: VARIANTS[v] for v in variants},
                     "machine": harness.machine()})
    previous.setdefault("results", {}).update(results)
    harness.write_json(path, previous, indent=1)


if __name__ == "__main__":
    main()
