"""torch.compile on this CPU build: the user's right-hand sides and the maximiser objective, measured.

Measurement only: the library is not changed; the compiled functions are swapped in around
each measurement and put back. For each problem (the reference problems at K = 1, mesh 200,
and the sine network at K = 1000, mesh 20):

(a) forward sweep: ``Sweeper.forward(u)`` with the user's f (and L) as given, and with them
    wrapped in ``torch.compile`` (backend aot_eager = tracing without code generation;
    inductor default, inductor dynamic=True, inductor mode="reduce-overhead");
(b) E-MSA interval objective (rho = 1): one ``IntervalHamiltonian.value_and_grad`` and one full
    maximisation (``HamiltonianMaximiser(method="lbfgs")``) with ``IntervalHamiltonian.smooth``
    as is and compiled (the class attribute is patched, since ``value_and_grad`` builds a new
    object per block); also ``value_and_grad`` at rho = 0 on the same data (no grad_x H inside
    ``smooth``, hence no double backward: what compiling would give without the co-state term);
(c) host syncs of one ProjectedLBFGS maximisation: ``Tensor.__bool__``, ``__int__``,
    ``__float__``, ``item`` and ``tolist`` are wrapped by counters for its duration (on CPU a
    "sync" is a tensor value read by Python to take a branch: on a GPU each one waits for the
    device), attributed to file:line of the caller.

For each compiled variant: compile time (the first call, minus one eager call), median steady
seconds over ``--repeats``, speed-up (eager median / compiled median), the largest difference
to the eager result, dynamo's graph / graph-break / recompile counts and every failure with its
exception message (``torch._dynamo.explain`` for the graph breaks of f and of ``smooth``). The
script exits 0 whatever fails.

    python scripts/bench_compile.py [--mesh 200] [--repeats 5] [--out results/bench]
"""
from __future__ import annotations

import collections
import contextlib
import copy
import json
import os
import sys
import traceback
import warnings

import torch

import harness
from harness import dynamo_counts, fresh_dynamo
# Internals: torch.compile is tried on the library's own parts (sweep, interval objective), swapped in place.
from pmpsolve.update.hamiltonian import IntervalHamiltonian, interval_data
from pmpsolve.update.maximisers import HamiltonianMaximiser
from pmpsolve.sweep.mesh import make_mesh
from pmpsolve.sweep.pointwise import PointwiseProblem
from pmpsolve.sweep.sweeps import Sweeper
from problems import REFERENCE_PROBLEMS
from problems.sine import sine, sine_initial_controls

#: name -> torch.compile keyword arguments
VARIANTS = {
    "aot_eager": dict(backend="aot_eager", dynamic=False),
    "inductor": dict(backend="inductor", dynamic=False),
    "inductor-dynamic": dict(backend="inductor", dynamic=True),
    "inductor-reduce-overhead": dict(backend="inductor", mode="reduce-overhead", dynamic=False),
}
short = harness.error_message


def compiler_available() -> dict:
    """Whether torch.compile exists and inductor finds a C++ compiler."""
    info = {"torch": torch.__version__, "compile": hasattr(torch, "compile")}
    try:
        from torch._inductor import cpp_builder
        info["cxx"] = str(cpp_builder.get_cpp_compiler())
    except Exception as err:  # noqa: BLE001 - recorded
        info["cxx"] = None
        info["cxx_error"] = short(err)
    return info


def explain(fn, *args) -> dict:
    """torch._dynamo.explain: graphs, graph breaks and their reasons (first few)."""
    fresh_dynamo()
    try:
        out = torch._dynamo.explain(fn)(*args)
        reasons = [f"{getattr(b, 'reason', b)}"[:300] for b in out.break_reasons[:6]]
        return {"graphs": out.graph_count, "graph_breaks": out.graph_break_count, "ops": out.op_count,
                "break_reasons": reasons}
    except Exception as err:  # noqa: BLE001 - recorded
        return {"error": short(err)}
    finally:
        fresh_dynamo()


def measure(run, eager_seconds, eager_result, compare, repeats) -> dict:
    """First call (compile) and steady repeats of ``run``; every failure recorded."""
    fresh_dynamo()
    row = {"ok": False}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            first_seconds, _, first = harness.clock(run)
            steady = harness.timed(run, repeats=repeats, warmup=0)  # the first call above compiled
            result, median = steady.result, steady.median
            row.update(ok=True, first_call_seconds=first_seconds,
                       compile_seconds=max(first_seconds - eager_seconds, 0.0), median_seconds=median,
                       speedup=eager_seconds / median, max_difference=compare(eager_result, result),
                       first_difference=compare(eager_result, first))
        except Exception as err:  # noqa: BLE001 - a failure is a result here
            row["error"] = short(err)
            row["where"] = "".join(traceback.format_exception(type(err), err, err.__traceback__)[-3:])[-800:]
    row["dynamo"] = dynamo_counts()
    row["warnings"] = sorted({str(w.message)[:200] for w in caught})[:5]
    fresh_dynamo()
    return row


# --------------------------------------------------------------------------- (a) forward sweep
def compiled_problem(problem, options):
    """A shallow copy of ``problem`` whose f and L are wrapped in torch.compile (the user's functions untouched)."""
    other = copy.copy(problem)
    other.dynamics = torch.compile(problem.dynamics, **options)
    if problem.running_cost is not None:
        other.running_cost = torch.compile(problem.running_cost, **options)
    return other


def bench_forward(pw, sweeper, u, variants, repeats):
    def run():
        return sweeper.forward(u)

    cost = lambda a, b: abs(float(a.cost) - float(b.cost))  # noqa: E731
    steady = harness.timed(run, repeats=repeats)  # after a warm-up (allocator, first-call costs of eager torch)
    eager, eager_seconds = steady.result, steady.median
    rows = {"eager": {"ok": True, "median_seconds": eager_seconds, "evaluations": eager.evaluations,
                      "cost": float(eager.cost)}}
    original = pw.problem
    for name in variants:
        pw.problem = compiled_problem(original, VARIANTS[name])
        try:
            rows[name] = measure(run, eager_seconds, eager, cost, repeats)
        finally:
            pw.problem = original
    K, n, m = pw.num_samples, pw.state_dim, pw.control_dim
    t = torch.zeros((), dtype=pw.dtype)
    rows["explain_dynamics"] = explain(original.dynamics, t, pw.x0, u[0].expand(K, m))
    return rows


# ------------------------------------------------------------------ (b) objective and maximiser
@contextlib.contextmanager
def compiled_smooth(options):
    original = IntervalHamiltonian.smooth
    IntervalHamiltonian.smooth = torch.compile(original, **options)
    try:
        yield
    finally:
        IntervalHamiltonian.smooth = original


def bench_objective(pw, problem, objective, u, variants, repeats, max_iter):
    maximiser = HamiltonianMaximiser(problem.controls, method="lbfgs", max_iter=max_iter)
    tasks = {
        "value_and_grad": (lambda: objective.value_and_grad(u),
                           lambda a, b: max(float((a[0] - b[0]).abs().max()), float((a[1] - b[1]).abs().max()))),
        "maximise_lbfgs": (lambda: maximiser.maximise(objective),
                           lambda a, b: float((a.controls - b.controls).abs().max())),
    }
    if objective.rho:  # the same data at rho = 0: no grad_x H inside smooth, so no double backward
        plain = IntervalHamiltonian(pw, objective.data, 0.0)
        tasks["value_and_grad_rho0"] = (lambda: plain.value_and_grad(u), tasks["value_and_grad"][1])
    rows = {}
    for task, (run, compare) in tasks.items():
        steady = harness.timed(run, repeats=repeats)
        eager, eager_seconds = steady.result, steady.median
        rows[task] = {"eager": {"ok": True, "median_seconds": eager_seconds}}
        if task == "maximise_lbfgs":
            rows[task]["eager"].update(iterations=eager.iterations, evaluations=eager.evaluations)
        for name in variants:
            with compiled_smooth(VARIANTS[name]):
                rows[task][name] = measure(run, eager_seconds, eager, compare, repeats)
    rows["explain_smooth"] = explain(lambda v: objective.smooth(v), u.detach().clone().requires_grad_(True))
    return rows


# ------------------------------------------------------------------------------- (c) host syncs
SYNC_METHODS = ("__bool__", "__int__", "__float__", "item", "tolist")


@contextlib.contextmanager
def count_syncs():
    """Counts Tensor.__bool__ / __int__ / __float__ / item / tolist calls by method and by caller file:line."""
    by_method, by_site = collections.Counter(), collections.Counter()
    saved = {name: getattr(torch.Tensor, name) for name in SYNC_METHODS}

    def wrap(name, method):
        def counted(self, *args, **kwargs):
            caller = sys._getframe(1)
            by_method[name] += 1
            by_site[f"{os.path.relpath(caller.f_code.co_filename)}:{caller.f_lineno}"] += 1
            return method(self, *args, **kwargs)
        return counted

    for name, method in saved.items():
        setattr(torch.Tensor, name, wrap(name, method))
    try:
        yield by_method, by_site
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


def bench_syncs(problem, objective, max_iter):
    maximiser = HamiltonianMaximiser(problem.controls, method="lbfgs", max_iter=max_iter)
    with count_syncs() as (by_method, by_site):
        result = maximiser.maximise(objective)
    library = {site: n for site, n in by_site.items() if "pmpsolve" in site}
    return {"total": sum(by_method.values()), "by_method": dict(by_method),
            "by_site": dict(by_site.most_common(12)), "in_pmpsolve": sum(library.values()),
            "iterations": result.iterations, "evaluations": result.evaluations,
            "per_iteration": sum(by_method.values()) / max(result.iterations, 1)}


# ---------------------------------------------------------------------------------------- main
def setup(problem, u, mesh_size, rho):
    dtype = torch.float64
    pw = PointwiseProblem(problem, dtype, "cpu")
    nodes = make_mesh(mesh_size, problem.horizon, dtype, "cpu")
    sweeper = Sweeper(pw, nodes)
    fw = sweeper.forward(u)
    data = interval_data(pw, u, fw, sweeper.backward(u, fw), 3)
    return pw, sweeper, IntervalHamiltonian(pw, data, rho)


def fmt(row):
    if not row.get("ok"):
        return "FAILED"
    if "speedup" not in row:
        return f"{1e3 * row['median_seconds']:.1f} ms"
    return (f"{1e3 * row['median_seconds']:.1f} ms x{row['speedup']:.2f} "
            f"(compile {row['compile_seconds']:.1f} s)")


def main(argv=None):
    parser = harness.parser(__doc__)
    parser.add_argument("--problems", nargs="*", default=list(REFERENCE_PROBLEMS))
    parser.add_argument("--mesh", type=int, default=200)
    parser.add_argument("--sine-samples", type=int, default=1000, help="0: skip the sine network")
    parser.add_argument("--sine-mesh", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-iter", type=int, default=50, help="L-BFGS iterations of one maximisation")
    parser.add_argument("--rho", type=float, default=1.0)
    parser.add_argument("--forward-variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--objective-variants", nargs="*", default=["aot_eager", "inductor"], choices=list(VARIANTS))
    args = harness.parse(parser, argv, quick=dict(problems=["lqr"], mesh=10, sine_samples=0, repeats=1, max_iter=5,
                                                   forward_variants=["aot_eager"], objective_variants=["aot_eager"]))
    harness.pin_threads(1)
    info = compiler_available()
    print(f"torch {info['torch']}, torch.compile: {info['compile']}, C++ compiler for inductor: {info['cxx']}")
    cases = []
    for name in args.problems:
        problem, _ = REFERENCE_PROBLEMS[name]()
        low, high = problem.controls.bounds(torch.float64, "cpu")
        u = torch.clamp(torch.full((args.mesh, problem.control_dim), 0.1, dtype=torch.float64), low, high)
        cases.append((name, problem, u, args.mesh))
    if args.sine_samples:
        problem, _ = sine(args.sine_samples)
        cases.append((f"sine-K{args.sine_samples}", problem, sine_initial_controls("good", args.sine_mesh),
                      args.sine_mesh))
    rows = []
    if not info["compile"]:
        print("torch.compile is not available in this torch")
    for name, problem, u, mesh_size in cases if info["compile"] else ():
        pw, sweeper, objective = setup(problem, u, mesh_size, args.rho)
        row = {"problem": name, "mesh": mesh_size, "samples": pw.num_samples, "rho": args.rho,
               "forward": bench_forward(pw, sweeper, u, args.forward_variants, args.repeats)}
        row.update(bench_objective(pw, problem, objective, u, args.objective_variants, args.repeats, args.max_iter))
        row["host_syncs"] = bench_syncs(problem, objective, args.max_iter)
        rows.append(row)
        print(f"\n{name} (K = {pw.num_samples}, mesh {mesh_size})")
        for part in ("forward", "value_and_grad", "maximise_lbfgs", "value_and_grad_rho0"):
            for variant, r in row.get(part, {}).items():
                if variant.startswith("explain"):
                    continue
                line = f"  {part:15s} {variant:26s} {fmt(r)}"
                if r.get("ok") and "max_difference" in r:
                    line += f"  |diff| {r['max_difference']:.1e}"
                if not r.get("ok"):
                    line += "  " + r["error"].splitlines()[0][:150]
                print(line)
        e = row["forward"]["explain_dynamics"]
        print(f"  explain f: {e}")
        e = row["explain_smooth"]
        print(f"  explain smooth: {json.dumps(e)[:400]}")
        s = row["host_syncs"]
        print(f"  host syncs in one lbfgs maximisation: {s['total']} ({s['per_iteration']:.1f}/iteration, "
              f"{s['iterations']} iterations, {s['evaluations']} evaluations) by method {s['by_method']}")
        for site, n in s["by_site"].items():
            print(f"      {n:5d}  {site}")
    harness.write_json(args.out / "compile.json", {"environment": info, "variants": VARIANTS,
                                                   "argv": sys.argv[1:] if argv is None else list(argv), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
