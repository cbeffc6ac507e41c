"""pmpsolve against direct multiple shooting with CasADi + IPOPT on the reference problems.

Both solve the same piecewise-constant control problem on the same uniform mesh
(N intervals). CasADi: direct multiple shooting, RK4 with ``--rk4-steps`` steps
per interval (running cost as an extra state), IPOPT with its defaults (tol
1e-8), the state and control starts pmpsolve also uses (x0 repeated, u = 0 or
the middle of the box). pmpsolve: ``solve(problem, mesh=N)`` (E-MSA, the
default) and SQH; for each, the wall time until J first comes within
``--target`` (default 1e-4) relative error of the reference value (measured
with the solver's callback; the whole solve when it never does) and the time
of the whole solve. Every final cost is re-checked by the same independent
integrator (scipy DOP853, interval by interval). Repeats: medians.

Besides the reference problems, ``lqr-samples-K`` (default K = 100; any K can be
named): the LQR from K initial states sharing one control, with its exact optimum
(``problems.lqr_samples``), the many-samples case PMP training is built for.

    pip install -e .[bench]          # CasADi (with IPOPT), an optional extra
    python scripts/bench_control.py [lqr vanderpol lqr-samples-300 ...] [--mesh 200] [--repeats 3] [--out results/bench]

Writes results/bench/control.json (a list of rows: problem, reference, and for
each solver cost, rel_error, seconds) and prints a table.
"""
from __future__ import annotations

import json
import statistics
import sys
import time
import warnings

import numpy as np
import torch

import harness
import pmpsolve as pmp
from pmpsolve.studies.reference import independent_cost  # the scipy re-check the reference study uses (not a solver part)
from problems import REFERENCE_PROBLEMS, lqr_samples

try:
    import casadi as ca
except ImportError:  # the optional extra
    ca = None


#: The reference problems plus the LQR from K initial states sharing one control (exact optimum known):
#: the many-samples case that the maximum principle's batched sweeps are built for.
#: ``lqr-samples-K`` for any K can be named on the command line; 100 runs by default (at K = 1000
#: one CasADi solve took over 20 minutes here, most of it in IPOPT's Jacobian evaluations).
PROBLEMS = dict(REFERENCE_PROBLEMS)
DEFAULT_SAMPLES = (100,)
for _K in DEFAULT_SAMPLES:
    PROBLEMS[f"lqr-samples-{_K}"] = (lambda K: lambda: lqr_samples(K))(_K)


def make_problem(name):
    if name.startswith("lqr-samples-"):
        return lqr_samples(int(name.rsplit("-", 1)[1]))
    if name not in PROBLEMS:
        raise SystemExit(f"unknown problem {name!r}; choose from {sorted(PROBLEMS)} or lqr-samples-K")
    return PROBLEMS[name]()


def casadi_model(name):
    """(rhs(x, u) -> xdot, running(x, u) or None, terminal(x) or None, low, high, x0, T) in CasADi symbols.

    For K samples the state is the K x n states stacked (as IPOPT must see them) and the
    running cost their mean.
    """
    if name.startswith("lqr-samples-"):
        problem, _ = make_problem(name)
        x0 = problem.x0.reshape(-1).tolist()
        K = len(x0) // 2

        def rhs(x, u):
            return ca.vertcat(*[ca.vertcat(x[2 * i + 1], -x[2 * i] + u) for i in range(K)])

        def running(x, u):
            return 0.5 * (ca.sumsqr(x) / K + u ** 2)

        return rhs, running, None, -ca.inf, ca.inf, x0, 5.0
    if name == "lqr":
        return (lambda x, u: ca.vertcat(x[1], -x[0] + u), lambda x, u: 0.5 * (x[0] ** 2 + x[1] ** 2 + u ** 2), None,
                -ca.inf, ca.inf, [0.0, 1.0], 5.0)
    if name == "catalyst":
        return (lambda x, u: ca.vertcat(u * (10 * x[1] - x[0]), u * (x[0] - 10 * x[1]) - (1 - u) * x[1]), None,
                lambda x: -1 + x[0] + x[1], 0.0, 1.0, [1.0, 0.0], 1.0)
    if name == "vanderpol":
        return (lambda x, u: ca.vertcat((1 - x[1] ** 2) * x[0] - x[1] + u, x[0]),
                lambda x, u: x[0] ** 2 + x[1] ** 2 + u ** 2, None, -0.3, 1.0, [0.0, 1.0], 5.0)
    if name == "rayleigh":
        return (lambda x, u: ca.vertcat(x[1], -x[0] + (1.4 - 0.14 * x[1] ** 2) * x[1] + 4 * u),
                lambda x, u: x[0] ** 2 + u ** 2, None, -ca.inf, ca.inf, [-5.0, -5.0], 2.5)
    raise KeyError(name)


def solve_casadi(name, N, rk4_steps):
    """Direct multiple shooting, the NLP built and solved; returns the controls [N] as numpy."""
    rhs, running, terminal, low, high, x0, T = casadi_model(name)
    n = len(x0)
    x, u = ca.SX.sym("x", n + 1), ca.SX.sym("u")
    dot = ca.vertcat(rhs(x[:n], u), running(x[:n], u) if running is not None else 0)
    f = ca.Function("f", [x, u], [dot])
    h = T / N / rk4_steps
    z = x
    for _ in range(rk4_steps):  # RK4 inside the interval
        k1 = f(z, u)
        k2 = f(z + h / 2 * k1, u)
        k3 = f(z + h / 2 * k2, u)
        k4 = f(z + h * k3, u)
        z = z + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    step = ca.Function("step", [x, u], [z])
    X = ca.MX.sym("X", n + 1, N + 1)
    U = ca.MX.sym("U", 1, N)
    ends = step.map(N)(X[:, :N], U)
    gaps = ca.vec(ends - X[:, 1:])
    cost = X[n, N] + (terminal(X[:n, N]) if terminal is not None else 0)
    w = ca.veccat(X, U)
    lbx = np.concatenate([np.tile(np.r_[x0, 0.0][:, None], (1, N + 1)).ravel("F") * 0 - np.inf, np.full(N, low)])
    ubx = np.concatenate([np.full((n + 1) * (N + 1), np.inf), np.full(N, high)])
    lbx[: n + 1] = ubx[: n + 1] = np.r_[x0, 0.0]  # the initial state is fixed
    u_start = 0.0 if low <= 0 <= high else 0.5 * (low + high)
    w0 = np.concatenate([np.tile(np.r_[x0, 0.0], N + 1), np.full(N, u_start)])
    solver = ca.nlpsol("ms", "ipopt", {"x": w, "f": cost, "g": gaps},
                       {"ipopt.print_level": 0, "print_time": False, "ipopt.sb": "yes"})
    result = solver(x0=w0, lbx=lbx, ubx=ubx, lbg=0, ubg=0)
    if not solver.stats()["success"]:
        warnings.warn(f"IPOPT on {name}: {solver.stats()['return_status']}")
    return np.asarray(result["x"]).ravel()[-N:]


def solve_pmpsolve(problem, reference, N, method, target):
    """(solution, seconds to reach the target relative error or None, seconds of the whole solve)."""
    reached = [None]
    start = time.perf_counter()

    def watch(record, controls):
        if reached[0] is None and abs(record.cost - reference) <= target * abs(reference):
            reached[0] = time.perf_counter() - start
        return False

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        sol = pmp.solve(problem, method=method, mesh=N, callback=watch)
    return sol, reached[0], time.perf_counter() - start


def main(argv=None):
    parser = harness.parser(__doc__)
    parser.add_argument("problems", nargs="*", default=None, help=f"default: {' '.join(PROBLEMS)} (--quick: lqr)")
    parser.add_argument("--mesh", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rk4-steps", type=int, default=4)
    parser.add_argument("--target", type=float, default=1e-4)
    parser.add_argument("--methods", nargs="+", default=["emsa", "sqh"])
    args = harness.parse(parser, argv, quick=dict(mesh=20, repeats=1, methods=["emsa"]))
    if ca is None:
        sys.exit("bench_control.py needs CasADi: pip install -e '.[bench]'  (or: pip install casadi)")
    if args.quick and not args.problems:
        args.problems = ["lqr"]
    harness.pin_threads(1)
    machine = harness.machine()
    rows = []
    for name in args.problems or list(PROBLEMS):
        problem, reference = make_problem(name)
        row = dict(problem=name, reference=reference, mesh=args.mesh, target=args.target)
        # No warm-up: every repeat builds the NLP afresh, and its seconds include the building.
        casadi = harness.timed(lambda: solve_casadi(name, args.mesh, args.rk4_steps), repeats=args.repeats, warmup=0)
        times, controls = casadi.times, casadi.result
        mesh = torch.linspace(0, problem.horizon, args.mesh + 1, dtype=torch.float64)
        cost = independent_cost(problem, torch.as_tensor(controls)[:, None], mesh)
        row["casadi"] = dict(cost=cost, rel_error=(cost - reference) / abs(reference), seconds=casadi.median,
                             seconds_all=times, rk4_steps=args.rk4_steps)
        for method in args.methods:
            runs = [solve_pmpsolve(problem, reference, args.mesh, method, args.target) for _ in range(args.repeats)]
            sol = runs[-1][0]
            to_target = [r[1] for r in runs]
            cost = independent_cost(problem, sol.controls, sol.mesh)
            row[f"pmpsolve-{method}"] = dict(
                cost=cost, rel_error=(cost - reference) / abs(reference), iterations=sol.iterations,
                seconds=statistics.median(r[2] for r in runs),
                seconds_to_target=None if None in to_target else statistics.median(to_target),
                seconds_all=[r[2] for r in runs])
        timed = {m: row[f"pmpsolve-{m}"]["seconds_to_target"] for m in args.methods}
        timed = {m: t for m, t in timed.items() if t is not None}
        if timed:
            fastest = min(timed, key=timed.get)
            row["fastest"] = fastest
            row["ratio_to_target"] = timed[fastest] / row["casadi"]["seconds"]
        rows.append(row)
        print(f"{name}: " + json.dumps({k: (round(v['seconds'], 3) if isinstance(v, dict) else v)
                                        for k, v in row.items()}), flush=True)
        # Written after every problem, so that a long run keeps what it has measured.
        harness.write_json(args.out / "control.json", {"machine": machine, "rows": rows}, quiet=True)
    print()
    print(format_table(rows, args.methods))
    print(f"\nwrote {args.out / 'control.json'}")


def format_table(rows, methods):
    lines = ["| problem | solver | J (scipy re-check) | rel. error | seconds (median) | s to target | ratio to CasADi |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        c = r["casadi"]
        lines.append(f"| {r['problem']} | CasADi+IPOPT (RK4 x{c['rk4_steps']}) | {c['cost']:.8f} | {abs(c['rel_error']):.1e} | "
                     f"{c['seconds']:.3f} | - | 1 |")
        for m in methods:
            p = r[f"pmpsolve-{m}"]
            t = p["seconds_to_target"]
            ratio = "-" if t is None else f"{t / c['seconds']:.3g}"
            lines.append(f"| {r['problem']} | pmpsolve {m} ({p['iterations']} it) | {p['cost']:.8f} | "
                         f"{abs(p['rel_error']):.1e} | {p['seconds']:.2f} | {'-' if t is None else f'{t:.2f}'} | "
                         f"{ratio} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
