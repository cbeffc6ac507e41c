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
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional

import pmpsolve as pmp
from pmpsolve.studies import cli
from pmpsolve.studies.reference import independent_cost

__all__ = ["run", "format_table", "main", "METHODS"]

METHODS = ("msa", "emsa", "sqh", "gradient")


def _row(name, reference, method, mesh, solve_fn) -> Dict:
    start = time.perf_counter()
    row = dict(problem=name, method=method, reference=reference, mesh=mesh)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            sol = cli.check_interrupted(solve_fn())
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
        out: Optional[Path] = None, previous: Optional[Dict] = None) -> List[Dict]:
    """One row per problem and method; with ``out``, ``out/results.json`` is rewritten (atomically)
    after every row. ``previous``: the results of an earlier run with the same settings
    (``--resume``), whose rows are taken over. Ctrl-C raises ``cli.Interrupted`` with the results
    so far in its ``results`` attribute (saved)."""
    from problems import CONTROL_SET_PROBLEMS, REFERENCE_PROBLEMS

    catalogue = {**REFERENCE_PROBLEMS, **CONTROL_SET_PROBLEMS}
    names = list(names or catalogue)
    methods = list(methods)
    for name in names:
        if name not in catalogue:
            raise ValueError(f"unknown problem {name!r}; choose from {sorted(catalogue)}")
    done = {(r["problem"], r["method"]): r for r in (previous or {}).get("rows", [])}
    rows: List[Dict] = []
    results = {**settings(names, methods, mesh=mesh, max_iter=max_iter), "rows": rows}

    def save():
        if out is not None:
            cli.write_json(out / "results.json", results)

    def add(name, reference, method, solve_fn):
        if (name, method) in done:
            rows.append(done[(name, method)])
            print(_format_row(rows[-1]) + " (loaded)", flush=True)
            return
        rows.append(_row(name, reference, method, mesh, solve_fn))
        save()
        print(_format_row(rows[-1]), flush=True)

    try:
        for name in names:
            problem, reference = catalogue[name]()
            for method in methods:
                add(name, reference, method, lambda: pmp.solve(problem, method=method, mesh=mesh,
                                                               stop=pmp.Stop(max_iter=max_iter)))
            if name == "catalyst-binary":
                relaxed, _ = catalogue["catalyst"]()

                def relax_round_polish():
                    sol = cli.check_interrupted(pmp.solve(relaxed, mesh=mesh, stop=pmp.Stop(max_iter=max_iter)))
                    rounded = pmp.sum_up_rounding(sol.controls, sol.mesh, problem.controls)
                    return pmp.solve(problem, method="sqh", mesh=mesh, init=rounded, stop=pmp.Stop(max_iter=max_iter))

                add(name, reference, "relax+round+sqh", relax_round_polish)
    except (KeyboardInterrupt, cli.Interrupted):
        if rows:
            save()
        raise cli.interruption(results) from None
    save()
    return rows


def settings(names: List[str], methods, *, mesh: int, max_iter: int) -> Dict:
    """What results.json records (at its top level); ``--resume`` takes over rows only when they are the same."""
    return {"problems": list(names), "methods": list(methods), "mesh": mesh, "max_iter": max_iter}


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
    from problems import CONTROL_SET_PROBLEMS, REFERENCE_PROBLEMS

    catalogue = [*REFERENCE_PROBLEMS, *CONTROL_SET_PROBLEMS]
    parser = argparse.ArgumentParser(prog="python -m pmpsolve reproduce controls",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("problems", nargs="*", type=cli.one_of(catalogue, "problem"),
                        help=f"problem names (default: all: {', '.join(catalogue)})")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--mesh", type=cli.positive_int, default=200, help="control intervals (default 200)")
    parser.add_argument("--max-iter", type=cli.positive_int, default=200, help="iteration limit (default 200)")
    parser.add_argument("--out", type=cli.writable_dir, default="results/controls",
                        help="output folder (results/controls)")
    cli.add_resume_option(parser)
    args = parser.parse_args(argv)
    names = args.problems or catalogue
    path = args.out / "results.json"
    previous = (cli.load_previous(parser, path, settings(names, args.methods, mesh=args.mesh,
                                                          max_iter=args.max_iter), key=None)
                if args.resume else None)
    try:
        rows = run(names, args.methods, mesh=args.mesh, max_iter=args.max_iter, out=args.out, previous=previous)
    except cli.Interrupted as stop:
        done = stop.results["rows"]
        if done:
            print()
            print(format_table(done))
        cli.exit_interrupted("controls", argv, len(done), path)
    print()
    print(format_table(rows))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
