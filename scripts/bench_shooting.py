"""The multiple-shooting forward sweep against the sequential one, in one process (docs/benchmarks.md).

Two tables:

1. One forward sweep (N = 200 by default), from the nodes of controls 0.01 away (what a trial sweep of
   an iteration starts from), shooting against sequential, over the number of samples K on
   ``lqr_samples`` (n = 2) and on the sine network (n = 5): where ``ShootingPolicy.max_batch``
   comes from.
2. Whole E-MSA solves (K = 1, N = 200) of the reference problems with the default policy and with
   shooting off: iterations, J, median milliseconds per iteration and per forward sweep.

One thread (the per-step overhead is what is measured); CPU seconds (``time.process_time``) for the
sweeps, wall seconds for the solves; medians of ``--repeats``.

    python scripts/bench_shooting.py            # -> results/bench/shooting.json (~5 minutes)
    python scripts/bench_shooting.py --step-only  # the lean dopri5 step against torchdiffeq's (-> shooting_step.json)
    python scripts/bench_shooting.py --compiled-step --lqr-samples 5  # one dopri5 step of a shooting batch,
        # eager vs torch.compile (-> shooting_compiled_step.json; the library's steps are not compiled)
"""
from __future__ import annotations

import argparse
import statistics

import torch

import harness
import pmpsolve as pmp
import problems
# Internals: one forward sweep alone, with the shooting policy forced on or off, which solve() never exposes.
from pmpsolve.sweep.mesh import make_mesh
from pmpsolve.sweep.pointwise import PointwiseProblem
from pmpsolve.sweep.shooting import ShootingPolicy
from pmpsolve.sweep.sweeps import Sweeper
from problems.sine import sine_data, sine_problem


def sweep_times(problem, mesh: int, repeats: int) -> dict:
    """Median CPU seconds of one forward sweep, sequential and by shooting from nearby nodes."""
    pw = PointwiseProblem(problem, torch.float64, "cpu")
    nodes = make_mesh(mesh, problem.horizon, torch.float64, "cpu")
    g = torch.Generator().manual_seed(0)
    u_start = 0.1 * torch.randn(mesh, problem.control_dim, generator=g, dtype=torch.float64)
    u = u_start + 0.01 * torch.randn(mesh, problem.control_dim, generator=g, dtype=torch.float64)
    sweeper = Sweeper(pw, nodes, rtol=1e-9, atol=1e-11)
    sweeper.forward_policy = ShootingPolicy(max_batch=10 ** 9)  # measure shooting beyond the policy's limit
    start = sweeper.forward(u_start)
    row = {}
    for name, kwargs in (("sequential", {}), ("shooting", {"start": start})):
        run = harness.timed(lambda: sweeper.forward(u, **kwargs), repeats=repeats, clock="cpu")
        fw = run.result
        row[name] = {"seconds": run.median, "evaluations": fw.evaluations, "strategy": fw.strategy,
                     "cost": float(fw.cost)}
    row["ratio"] = row["shooting"]["seconds"] / row["sequential"]["seconds"]
    row["cost_difference"] = abs(row["shooting"]["cost"] - row["sequential"]["cost"])
    return row


def solve_row(name: str, mesh: int, shooting: bool) -> dict:
    problem = problems.REFERENCE_PROBLEMS[name]()[0]
    solver = pmp.Solver(problem, mesh=mesh)
    if not shooting:
        solver.sweeper.forward_policy = ShootingPolicy(enabled=False)
    def solve():
        state = solver.init()
        while not state.done:
            state = solver.step(state)
        return solver.solution(state)

    seconds, _, solution = harness.clock(solve)
    records = solution.history[1:]
    sweeps = [r.forward_seconds / (1 + r.rejected) for r in records]
    return {"problem": name, "shooting": shooting, "iterations": len(records), "status": solution.status,
            "cost": solution.cost, "seconds": seconds,
            "ms_per_iteration": 1e3 * statistics.median(r.seconds for r in records),
            "ms_per_forward_sweep": 1e3 * statistics.median(sweeps),
            "forward_evaluations_per_iteration": statistics.median(r.forward_evals for r in records)}


def step_rows(names, mesh: int, repeats: int) -> list:
    """CPU ms per E-MSA iteration (medians over the iterations, then over ``repeats``) with the lean dopri5
    step of ``pmpsolve.sweep.ode`` and with torchdiffeq's own step (the same wrapper, ``_weights`` off),
    solves alternating in this process."""
    from pmpsolve.sweep import ode  # internals: the comparison swaps ode's dopri5 step class for torchdiffeq's

    lean = ode._SOLVERS["dopri5"]
    weights, ode._weights = ode._weights, (lambda solver: None)
    torchdiffeqs = ode._checked(ode.SOLVERS["dopri5"])
    ode._weights = weights
    rows = []
    try:
        for name in names:
            runs = {"lean": [], "torchdiffeq": []}
            for _ in range(repeats):
                for label, cls in (("torchdiffeq", torchdiffeqs), ("lean", lean)):
                    ode._SOLVERS["dopri5"] = cls
                    solver = pmp.Solver(problems.REFERENCE_PROBLEMS[name]()[0], mesh=mesh)
                    state, cpu = solver.init(), []
                    while not state.done:
                        _, seconds, state = harness.clock(lambda: solver.step(state))
                        cpu.append(seconds)
                    solution = solver.solution(state)
                    runs[label].append((1e3 * statistics.median(cpu), len(solution.history) - 1, solution.cost))
            row = {"problem": name}
            for label, r in runs.items():
                row[label] = {"cpu_ms_per_iteration": statistics.median(x[0] for x in r), "iterations": r[0][1],
                              "cost": r[0][2]}
            row["ratio"] = row["lean"]["cpu_ms_per_iteration"] / row["torchdiffeq"]["cpu_ms_per_iteration"]
            rows.append(row)
            print(f"| {name} | {row['torchdiffeq']['cpu_ms_per_iteration']:.1f} ({row['torchdiffeq']['iterations']}) | "
                  f"{row['lean']['cpu_ms_per_iteration']:.1f} ({row['lean']['iterations']}) | {row['ratio']:.2f} | "
                  f"{row['lean']['cost']:.8f} |", flush=True)
    finally:
        ode._SOLVERS["dopri5"] = lean
    return rows


def compiled_step_rows(cases, mesh: int, repeats: int, backend: str = "inductor") -> list:
    """One dopri5 step over a multiple-shooting batch [N, 1 + n, K, n + 1] (the nominal start, n perturbed
    copies, the running cost as a last component) written as one pure function of tensors, with the user's
    f and L (``PointwiseProblem.with_controls``), eager against ``torch.compile`` (``backend``) in this
    process: CPU microseconds per step (median of ``repeats`` blocks of 200 calls), the wall time of the
    first compiled call minus an eager one ("compile"), and the largest difference of the outputs. What
    compiling a whole solver step would give and cost; the library's steps are not compiled
    (docs/benchmarks.md, section 6)."""
    from pmpsolve.sweep import ode  # internals: dopri5's tableau, to write one step as a pure function

    tableau = ode._weights(ode.SOLVERS["dopri5"])
    rows = []
    for name, problem in cases:
        torch._dynamo.reset()
        pw = PointwiseProblem(problem, torch.float64, "cpu")
        K, n = pw.num_samples, pw.state_dim
        grid = make_mesh(mesh, problem.horizon, torch.float64, "cpu")
        h = (grid[1:] - grid[:-1]).view(mesh, 1, 1, 1)
        u = torch.full((mesh, problem.control_dim), 0.1, dtype=torch.float64)
        evaluate, reads_time = pw.with_controls(u, torch.Size((mesh, 1 + n, K, n)))
        if reads_time or not pw.has_running_cost:
            continue  # the shooting right-hand side of the cases measured (f and L, no time)
        t0 = grid[0]

        def rhs(y):
            f, L = evaluate(t0, y[..., :n])
            return h * torch.cat([f, L.unsqueeze(-1)], dim=-1)

        def combine(y0, k, w, dt):  # ode._combine's sums, with dt a tensor (its in-place axpys need a number)
            total = None
            for wj, kj in zip(w, k):
                if wj != 0:
                    total = kj * (wj * dt) if total is None else total + kj * (wj * dt)
            return total if y0 is None else y0 + total

        def step(y0, f0, dt, rtol, atol):  # y1, f1, error ratio (per-interval RMS, worst interval), midpoint
            k = [f0]
            for beta in tableau.beta:
                yi = combine(y0, k, beta, dt)
                k.append(rhs(yi))
            error = combine(None, k, tableau.c_error, dt)
            ratio = (error / (torch.maximum(y0.abs(), yi.abs()) * rtol + atol)).reshape(mesh, 1 + n, -1)[:, 0]
            return yi, k[-1], ratio.pow(2).mean(-1).sqrt().amax(), combine(y0, k, tableau.mid, dt)

        y = torch.cat([pw.x0.expand(mesh, 1 + n, K, n), torch.zeros(mesh, 1 + n, K, 1, dtype=torch.float64)], -1)
        args = (y, rhs(y), torch.tensor(0.25, dtype=torch.float64), torch.tensor(1e-9, dtype=torch.float64),
                torch.tensor(1e-11, dtype=torch.float64))

        def per_call(fn):  # CPU microseconds per call: medians of blocks of 200 calls, after one call
            block = harness.timed(lambda: [fn(*args) for _ in range(200)], repeats=repeats, clock="cpu")
            return 1e6 * block.median / 200

        eager = per_call(step)
        # wall time: inductor compiles in g++ subprocesses
        eager_call, _, eager_once = harness.clock(lambda: step(*args))
        compiled = torch.compile(step, backend=backend, dynamic=False)
        first_call, _, compiled_once = harness.clock(lambda: compiled(*args))
        compile_seconds = first_call - eager_call
        fast = per_call(compiled)
        difference = max(float((a - b).abs().max()) for a, b in zip(eager_once, compiled_once))
        row = {"problem": name, "samples": K, "batch": list(y.shape), "eager_us": eager, "compiled_us": fast,
               "speedup": eager / fast, "compile_seconds": compile_seconds, "max_difference": difference}
        rows.append(row)
        print(f"| {name} | {K} | {list(y.shape)} | {eager:.0f} | {fast:.0f} | {row['speedup']:.1f} | "
              f"{compile_seconds:.1f} | {difference:.1e} |", flush=True)
    return rows


def main(argv=None) -> dict:
    parser = harness.parser(None, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mesh", type=int, default=200)
    parser.add_argument("--lqr-samples", type=int, nargs="*", default=[1, 10, 30, 100])
    parser.add_argument("--sine-samples", type=int, nargs="*", default=[1, 3, 10, 30])
    parser.add_argument("--problems", nargs="*", default=list(problems.REFERENCE_PROBLEMS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--step-only", action="store_true",
                        help="only the lean dopri5 step against torchdiffeq's, E-MSA solves of --problems")
    parser.add_argument("--compiled-step", action="store_true",
                        help="only one dopri5 step of a shooting batch, eager against torch.compile, for --problems "
                             "and lqr_samples(K) for --lqr-samples K > 1")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend of --compiled-step")
    args = harness.parse(parser, argv, quick=dict(mesh=10, lqr_samples=[1], sine_samples=[1], problems=["lqr"],
                                                   repeats=1))
    harness.pin_threads(1)
    if args.compiled_step:
        print(f"One dopri5 step of a multiple-shooting batch, N = {args.mesh}: CPU us per step, medians of "
              f"{args.repeats} blocks of 200 calls")
        print("| problem | K | batch | eager us | compiled us | speed-up | compile s | max difference |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        cases = [(name, problems.REFERENCE_PROBLEMS[name]()[0]) for name in args.problems]
        cases += [("lqr_samples", problems.lqr_samples(K)[0]) for K in args.lqr_samples if K > 1]
        rows = compiled_step_rows(cases, args.mesh, args.repeats, args.backend)
        harness.write_json(args.out / "shooting_compiled_step.json",
                           {"mesh": args.mesh, "threads": 1, "rows": rows, "torch": torch.__version__}, indent=1)
        return {"compiled_steps": rows}
    if args.step_only:
        print(f"E-MSA, K = 1, N = {args.mesh}: CPU ms per iteration (iterations), torchdiffeq's dopri5 step "
              f"against the lean one, alternating in one process, medians of {args.repeats}")
        print("| problem | torchdiffeq step | lean step | ratio | J (lean) |")
        print("| --- | --- | --- | --- | --- |")
        rows = step_rows(args.problems, args.mesh, args.repeats)
        harness.write_json(args.out / "shooting_step.json",
                           {"mesh": args.mesh, "threads": 1, "rows": rows, "torch": torch.__version__}, indent=1)
        return {"steps": rows}
    sweeps = []
    print(f"One forward sweep, N = {args.mesh}: shooting from nodes of controls 0.01 away vs sequential "
          "(CPU ms, median)")
    print("| problem | K | K n (n + 1) | sequential ms (evals) | shooting ms (evals) | ratio | |J diff| |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    cases = [("lqr_samples", K, problems.lqr_samples(K)[0]) for K in args.lqr_samples]
    cases += [("sine", K, sine_problem(*sine_data(K))) for K in args.sine_samples]
    for name, K, problem in cases:
        row = {"problem": name, "samples": K, **sweep_times(problem, args.mesh, args.repeats)}
        n = problem.state_dim
        row["batch"] = K * n * (n + 1)
        sweeps.append(row)
        s, m = row["sequential"], row["shooting"]
        print(f"| {name} | {K} | {row['batch']} | {1e3 * s['seconds']:.1f} ({s['evaluations']}) | "
              f"{1e3 * m['seconds']:.1f} ({m['evaluations']}) | {row['ratio']:.2f} | {row['cost_difference']:.1e} |",
              flush=True)
    solves = []
    print(f"\nE-MSA solves, K = 1, N = {args.mesh} (wall ms, medians over iterations)")
    print("| problem | forward sweep | iterations | J | ms / iteration | ms / forward sweep | forward evals / it | s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in args.problems:
        for shooting in (True, False):
            r = solve_row(name, args.mesh, shooting)
            solves.append(r)
            print(f"| {name} | {'shooting' if shooting else 'sequential'} | {r['iterations']} ({r['status']}) | "
                  f"{r['cost']:.8f} | {r['ms_per_iteration']:.1f} | {r['ms_per_forward_sweep']:.1f} | "
                  f"{r['forward_evaluations_per_iteration']:.0f} | {r['seconds']:.2f} |", flush=True)
    result = {"mesh": args.mesh, "threads": 1, "sweeps": sweeps, "solves": solves,
              "torch": torch.__version__}
    harness.write_json(args.out / "shooting.json", result, indent=1)
    return result


if __name__ == "__main__":
    main()
