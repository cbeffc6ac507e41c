"""Where one E-MSA iteration on the sine network goes: time per part of ``Solver.step``.

The sine study's settings (problems/sine.py, reg 0.001, mesh 20, rho = 0.25 fixed, 10 L-BFGS
iterations, start perturbation 0.005, 3 Gauss points, dopri5 at rtol 1e-6 / atol 1e-8, "good"
start) at K samples, one thread. ``IterationRecord`` times three parts (forward_seconds,
backward_seconds, maximise_seconds; ``seconds`` is the whole iteration); this script also times,
by wrapping them for the run, the other three parts of ``Solver.step`` / ``Solver.measure``:
the interval data (``interval_data``), the optimality measure (``optimality``) and the gain
evaluation of the trial step (``IntervalHamiltonian.terms``); all six parts and the whole step are
timed by such wrappers (``Sweeper.forward``, ``Sweeper.backward``, ``rule.propose``,
``Solver.step``), and "other" is the step minus the six. Each part: wall seconds (``time.perf_counter``) and CPU seconds (``time.process_time``), the
median over the iterations after the first ``--skip`` (warm-up). Nothing in the library changes.

    python scripts/bench_iteration_parts.py [--samples 10000] [--iterations 6] [--label after]

Writes results/bench/iteration_parts.json: the runs of earlier labels in that file are kept
(run the script once on the code before a change with ``--label before``, once after), and the
table shows every label in it.
"""
from __future__ import annotations

import collections
import json
import statistics
import warnings

import harness
import pmpsolve as pmp
# Internals: the parts of Solver.step are timed by wrapping the module functions and methods it calls.
import pmpsolve.solver as solver_module
from pmpsolve.update.hamiltonian import IntervalHamiltonian
from problems.sine import sine, sine_initial_controls

PARTS = ("forward sweep", "backward sweep", "interval data", "optimality measure", "maximisation",
         "gain evaluation", "other", "iteration")


def run(samples: int, iterations: int) -> list:
    """One solve of ``iterations`` iterations; per iteration {part: [wall, cpu]}."""
    problem, _ = sine(samples, reg=0.001)
    solver = solver_module.Solver(problem, method=pmp.EMSA(rho=0.25), mesh=20, ode=pmp.ODE(rtol=1e-6, atol=1e-8),
                                  maximiser=pmp.Maximiser(iterations=10, perturb=0.005, seed=0, quadrature=3),
                                  stop=pmp.Stop(max_iter=iterations, tol=0.0))
    state = solver.init(sine_initial_controls("good", 20))
    calls = collections.defaultdict(list)
    clocked = harness.clocked
    restore = [clocked(solver_module.Sweeper, "forward", calls["forward sweep"]),
               clocked(solver_module.Sweeper, "backward", calls["backward sweep"]),
               clocked(solver_module, "interval_data", calls["interval data"]),
               clocked(solver_module, "optimality", calls["optimality measure"]),
               clocked(solver.rule, "propose", calls["maximisation"]),
               clocked(IntervalHamiltonian, "terms", calls["gain evaluation"]),
               clocked(solver_module.Solver, "step", calls["iteration"])]
    try:
        rows = []
        while not state.done:
            for sink in calls.values():
                sink.clear()
            state = solver.step(state)
            row = {part: [sum(w for w, _ in calls[part]), sum(c for _, c in calls[part])]
                   for part in PARTS if part != "other"}
            row["other"] = [row["iteration"][j] - sum(row[p][j] for p in row if p != "iteration") for j in (0, 1)]
            record = state.history[-1]  # the record's own timers, for comparison
            row["record"] = dict(seconds=record.seconds, forward_seconds=record.forward_seconds,
                                 backward_seconds=record.backward_seconds, maximise_seconds=record.maximise_seconds,
                                 cost=record.cost)
            rows.append(row)
        return rows
    finally:
        for undo in reversed(restore):
            undo()


def medians(rows: list, skip: int) -> dict:
    kept = rows[skip:] or rows
    return {part: {"wall": statistics.median(r[part][0] for r in kept),
                   "cpu": statistics.median(r[part][1] for r in kept)} for part in PARTS}


def table(runs: dict) -> str:
    labels = list(runs)
    head = "| part | " + " | ".join(f"{label}: wall s (CPU s) | {label}: share" for label in labels) + " |"
    lines = [head, "| --- |" + " --- | --- |" * len(labels)]
    for part in PARTS:
        cells = []
        for label in labels:
            m = runs[label]["median"]
            cells.append(f"{m[part]['wall']:.3f} ({m[part]['cpu']:.3f})")
            cells.append(f"{100 * m[part]['wall'] / m['iteration']['wall']:.1f} %")
        lines.append(f"| {part} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = harness.parser(__doc__)
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--iterations", type=int, default=6, help="iterations of the solve")
    parser.add_argument("--skip", type=int, default=1, help="first iterations left out of the medians")
    parser.add_argument("--label", default="current", help="name of this run in the JSON (e.g. before / after)")
    args = harness.parse(parser, argv, quick=dict(samples=20, iterations=2))
    harness.pin_threads(1)
    warnings.simplefilter("ignore", RuntimeWarning)  # the solve stops at max_iter, unconverged
    rows = run(args.samples, args.iterations)
    path = args.out / "iteration_parts.json"
    saved = json.loads(path.read_text()) if path.exists() else {}
    key = f"K={args.samples}"
    runs = saved.get("runs", {}).get(key, {})
    runs[args.label] = {"median": medians(rows, args.skip), "iterations": rows, "skip": args.skip}
    saved.setdefault("runs", {})[key] = runs
    saved["machine"] = harness.machine()
    harness.write_json(path, saved, quiet=True)
    print(f"sine network, K = {args.samples}, mesh 20, one thread; medians over iterations "
          f"{args.skip + 1}-{len(rows)}")
    print(table(runs))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
