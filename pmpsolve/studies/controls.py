"""Methods compared on the reference problems and on the control-set examples (docs/controls.md).

Every problem is solved by msa, emsa, sqh and gradient from the default start at
the same mesh; a row records J (re-simulated), its relative error against the
reference value, iterations, wall time, how the Hamiltonian was maximised, and
the solver's stopping message (or the error a method raised: basic MSA may
diverge or cycle; gradient has no step for a finite set or an L0 cost). J of
every solution is re-checked by the independent scipy integrator. For the binary
catalyst problem a further row shows the relax-round-polish route: the Box
relaxation solved by emsa, sum-up rounding, then sqh over {0, 1}.
"""
from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional

import pmpsolve as pmp
from pmpsolve.studies.reference import independent_cost

__all__ = ["run", "format_table", "main", "METHODS"]

METHODS = ("msa", "emsa", "sqh", "gradient")


def _row(name, reference, method, mesh, solve_fn) -> Dict:
    start = time.perf_counter()
    row = dict(problem=name, method=method, reference=reference, mesh=mesh)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            sol = solve_fn()
    except (pmp.SolveError, ValueError) as err:
        row.update(cost=None, rel_error=None, iterations=None, seconds=time.perf_counter() - start,
                   status=f"{type(err).__name__}: {str(err).splitlines()[0][:160]}")
        return row
    seconds = time.perf_counter() - start
    problem = sol.problem
    row.update(cost=sol.cost, rel_error=None if reference is None else (sol.cost - reference) / abs(reference),
               independent_cost=independent_cost(problem, sol.controls, sol.mesh), iterations=sol.iterations,
               seconds=seconds, converged=sol.converged, status=sol.message,
               maximisers=sol.settings.get("maximisers_used", {}))
    return row


def run(names: Optional[List[str]] = None, methods=METHODS, *, mesh: int = 200, max_iter: int = 200,
        out: Optional[Path] = None) -> List[Dict]:
    from problems import CONTROL_SET_PROBLEMS, REFERENCE_PROBLEMS

    catalogue = {**REFERENCE_PROBLEMS, **CONTROL_SET_PROBLEMS}
    names = names or list(catalogue)
    rows = []
    for name in names:
        if name not in catalogue:
            raise ValueError(f"unknown problem {name!r}; choose from {sorted(catalogue)}")
        problem, reference = catalogue[name]()
        for method in methods:
            rows.append(_row(name, reference, method, mesh,
                             lambda: pmp.solve(problem, method=method, mesh=mesh, max_iter=max_iter)))
            print(_format_row(rows[-1]), flush=True)
        if name == "catalyst-binary":
            relaxed, _ = catalogue["catalyst"]()

            def relax_round_polish():
                sol = pmp.solve(relaxed, mesh=mesh, max_iter=max_iter)
                rounded = pmp.sum_up_rounding(sol.controls, sol.mesh, problem.controls)
                return pmp.solve(problem, method="sqh", mesh=mesh, init=rounded, max_iter=max_iter)

            rows.append(_row(name, reference, "relax+round+sqh", mesh, relax_round_polish))
            print(_format_row(rows[-1]), flush=True)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps({"mesh": mesh, "max_iter": max_iter, "rows": rows}, indent=2))
    return rows


def _format_row(r: Dict) -> str:
    if r["cost"] is None:
        return f"| {r['problem']} | {r['method']} | - | - | - | {r['seconds']:.1f} | {r['status']} |"
    err = "-" if r["rel_error"] is None else f"{abs(r['rel_error']):.1e}"
    used = ", ".join(sorted(r.get("maximisers", {}))) or "-"
    status = "converged" if r.get("converged") else r["status"][:60]
    return (f"| {r['problem']} | {r['method']} | {r['cost']:.7f} | {err} | {r['iterations']} | {r['seconds']:.1f} | "
            f"{status}; {used} |")


def format_table(rows: List[Dict]) -> str:
    lines = ["| problem | method | J | rel. error | iterations | time [s] | outcome; maximiser |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    return "\n".join(lines + [_format_row(r) for r in rows])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="pmpsolve reproduce controls", description=__doc__.splitlines()[0])
    parser.add_argument("problems", nargs="*", help="problem names (default: all)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--mesh", type=int, default=200)
    parser.add_argument("--max-iter", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("results/controls"))
    args = parser.parse_args(argv)
    rows = run(args.problems or None, args.methods, mesh=args.mesh, max_iter=args.max_iter, out=args.out)
    print()
    print(format_table(rows))
    print(f"\nwrote {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
