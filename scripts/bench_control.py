"""pmpsolve against direct multiple shooting with CasADi + IPOPT on the reference problems.

Both solve the same piecewise-constant control problem on the same uniform mesh
(N intervals). CasADi: direct multiple shooting, RK4 with ``--rk4-steps`` steps
per interval (running cost as an extra state), IPOPT with its defaults (tol
1e-8), the state and control starts pmpsolve also uses (x0 repeated, u = 0 or
the middle of the box). pmpsolve: ``solve(problem, mesh=N)`` (E-MSA, the
default), SQH and DDP (``method="ddp"``); for each, the wall time until J first comes within
``--target`` (default 1e-4) relative error of the reference value (measured
with the solver's callback; the whole solve when it never does) and the time
of the whole solve, and (``ratio_to_emsa``) each method's time to the target over
E-MSA's: the repeats of the methods are interleaved (one solve of each per round), and the
ratio is the median over the rounds of the ratio within a round (``ratios_to_emsa_all``: all
of them), which a disturbance of a shared machine moves less than a ratio of medians. Every final cost is re-checked by the same independent
integrator (scipy DOP853, interval by interval). Repeats: medians.

Besides the reference problems, ``lqr-samples-K`` (default K = 100; any K can be
named): the LQR from K initial states sharing one control, with its exact optimum
(``problems.lqr_samples``), the many-samples case PMP training is built for.

    pip install -e .[bench]          # CasADi (with IPOPT), an optional extra
    python scripts/bench_control.py [lqr vanderpol lqr-samples-300 ...] [--mesh 200] [--repeats 3] [--out results/bench]

Writes results/bench/control.json (a list of rows: problem, reference, and for
each solver cost, rel_error, seconds) and prints a table.

``--group constrained``: the constrained and free-time problems of
``problems.constrained`` (bryson-denham, zermelo, brachistochrone, goddard,
min-time-double-integrator). CasADi: the same direct multiple shooting (RK4 with
``--rk4-steps`` steps per interval, running cost as an extra state), a free final
time by scaling time to [0, 1] with T a decision variable in the problem's
``pmp.FreeTime`` bounds, terminal equalities as constraints, path constraints as
bounds on the state nodes; IPOPT with its defaults (``--ipopt-tol`` to change the
tolerance) from the start pmpsolve uses (states x0, controls 0 or the middle of
the box, T at the FreeTime guess); its seconds are those of the IPOPT call alone
(the building of the NLP is stored apart). pmpsolve: ``solve(problem, method, mesh=N)``
for each of ``--methods`` (default: emsa ddp), one row each; ``--max-iter`` sets ``pmp.Stop(max_iter=...)``, ``--timeout``
stops a solve by its callback after that many seconds), each problem in its own
try (a failure is recorded, not raised). Compared: T for minimum time, h(tf) = -J
for goddard, J for bryson-denham, against the published value and CasADi's.

    python scripts/bench_control.py --group constrained [goddard zermelo ...] [--mesh 200] [--repeats 3]

Writes results/bench/constrained.json and prints a table.
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


# ------------------------------------------------------------------ the constrained group (--group constrained)
#: What is compared on each constrained problem: "T" (sol.horizon), "h(tf)" (-sol.cost) or "J" (sol.cost).
CONSTRAINED_VALUES = {"bryson-denham": "J", "zermelo": "T", "brachistochrone": "T", "goddard": "h(tf)",
                      "min-time-double-integrator": "T"}


def constrained_problems():
    """``problems.constrained.CONSTRAINED_PROBLEMS`` (imported only by this group)."""
    from problems.constrained import CONSTRAINED_PROBLEMS
    return CONSTRAINED_PROBLEMS


def constrained_casadi_model(name, problem):
    """The CasADi side of a constrained problem as a dict: ``rhs(x, u)``, ``running(x, u)`` or None,
    ``terminal(x)`` or None, ``final(x)`` (= 0 at T) or None, ``x_low``/``x_high`` (bounds on every
    state node but the first, the path constraints); x0, the FreeTime (or the fixed T) and the
    control box are read from the pmpsolve ``problem``, so both solve the same problem."""
    inf = ca.inf
    if name == "bryson-denham":
        l = 1 / 9  # problems.constrained.bryson_denham()'s default
        model = dict(rhs=lambda x, u: ca.vertcat(x[1], u), running=lambda x, u: 0.5 * u ** 2, terminal=None,
                     final=lambda x: ca.vertcat(x[0], x[1] + 1), x_low=[-inf, -inf], x_high=[l, inf])
    elif name == "zermelo":
        model = dict(rhs=lambda x, u: ca.vertcat(ca.cos(u) - x[1], ca.sin(u)), running=lambda x, u: 1,
                     terminal=None, final=lambda x: x)
    elif name == "brachistochrone":
        g = 9.80665
        model = dict(rhs=lambda x, u: ca.vertcat(x[2] * ca.sin(u), -x[2] * ca.cos(u), g * ca.cos(u)),
                     running=lambda x, u: 1, terminal=None, final=lambda x: ca.vertcat(x[0] - 10, x[1] - 5))
    elif name == "goddard":
        c = 0.5

        def rhs(x, u):
            h, v, m = x[0], x[1], x[2]
            drag = 310 * v ** 2 * ca.exp(-500 * (h - 1))
            return ca.vertcat(v, (u - drag) / m - 1 / h ** 2, -u / c)

        model = dict(rhs=rhs, running=None, terminal=lambda x: -x[0], final=lambda x: x[2] - 0.6,
                     x_low=[1.0, 0.0, -inf], x_high=[inf, inf, inf])
    elif name == "min-time-double-integrator":
        model = dict(rhs=lambda x, u: ca.vertcat(x[1], u), running=lambda x, u: 1, terminal=None,
                     final=lambda x: x)
    else:
        raise KeyError(name)
    x0 = problem.x0.reshape(-1).tolist()
    model.setdefault("x_low", [-inf] * len(x0))
    model.setdefault("x_high", [inf] * len(x0))
    controls = problem.controls
    if isinstance(controls, pmp.Box):
        low, high = float(controls.low.reshape(-1)[0]), float(controls.high.reshape(-1)[0])
    else:  # pmp.Reals(1)
        low, high = -inf, inf
    free = problem.free_time
    T = (free.guess, free.low, free.high) if free is not None else float(problem.horizon)
    model.update(x0=x0, u_low=low, u_high=high, T=T)
    return model


def solve_casadi_constrained(name, problem, N, rk4_steps, repeats, ipopt_tol=None):
    """Direct multiple shooting of a constrained problem: the NLP built once, the IPOPT call timed
    ``repeats`` times from the same start. Returns a dict (value, cost, horizon, seconds, ...)."""
    M = constrained_casadi_model(name, problem)
    x0 = M["x0"]
    n = len(x0)
    free = isinstance(M["T"], tuple)

    def build():
        x, u, T = ca.SX.sym("x", n + 1), ca.SX.sym("u"), ca.SX.sym("T")
        running = M["running"](x[:n], u) if M["running"] is not None else 0
        f = ca.Function("f", [x, u, T], [T * ca.vertcat(M["rhs"](x[:n], u), running)])  # d/ds, s = t / T
        h = 1.0 / N / rk4_steps
        z = x
        for _ in range(rk4_steps):  # RK4 inside the interval
            k1 = f(z, u, T)
            k2 = f(z + h / 2 * k1, u, T)
            k3 = f(z + h / 2 * k2, u, T)
            k4 = f(z + h * k3, u, T)
            z = z + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        step = ca.Function("step", [x, u, T], [z])
        X = ca.MX.sym("X", n + 1, N + 1)
        U = ca.MX.sym("U", 1, N)
        Tv = ca.MX.sym("T") if free else M["T"]
        ends = step.map(N)(X[:, :N], U, Tv)  # T is broadcast to the N intervals
        g = [ca.vec(ends - X[:, 1:])]
        if M["final"] is not None:
            g.append(M["final"](X[:n, N]))
        cost = X[n, N] + (M["terminal"](X[:n, N]) if M["terminal"] is not None else 0)
        low = np.tile(np.r_[M["x_low"], -np.inf][:, None], (1, N + 1))
        high = np.tile(np.r_[M["x_high"], np.inf][:, None], (1, N + 1))
        low[:, 0] = high[:, 0] = np.r_[x0, 0.0]  # the initial state is fixed
        lbw, ubw = [low.ravel("F"), np.full(N, M["u_low"])], [high.ravel("F"), np.full(N, M["u_high"])]
        u_start = 0.0 if M["u_low"] <= 0 <= M["u_high"] else 0.5 * (M["u_low"] + M["u_high"])
        w0 = [np.tile(np.r_[x0, 0.0], N + 1), np.full(N, u_start)]
        w = [X, U]
        if free:
            w.append(Tv)
            lbw.append([M["T"][1]])
            ubw.append([M["T"][2]])
            w0.append([M["T"][0]])
        options = {"ipopt.print_level": 0, "print_time": False, "ipopt.sb": "yes"}
        if ipopt_tol is not None:
            options["ipopt.tol"] = ipopt_tol
        solver = ca.nlpsol("ms", "ipopt", {"x": ca.veccat(*w), "f": cost, "g": ca.veccat(*g)}, options)
        return solver, dict(x0=np.concatenate(w0), lbx=np.concatenate(lbw), ubx=np.concatenate(ubw), lbg=0, ubg=0)

    build_seconds, _, (solver, start) = harness.clock(build)
    run = harness.timed(lambda: solver(**start), repeats=repeats, warmup=0)
    stats = solver.stats()
    if not stats["success"]:
        warnings.warn(f"IPOPT on {name}: {stats['return_status']}")
    w = np.asarray(run.result["x"]).ravel()
    cost = float(run.result["f"])
    horizon = float(w[-1]) if free else float(M["T"])
    value = {"J": cost, "T": horizon, "h(tf)": -cost}[CONSTRAINED_VALUES[name]]
    return dict(value=value, cost=cost, horizon=horizon, seconds=run.median, seconds_all=run.times,
                build_seconds=build_seconds, status=stats["return_status"], success=bool(stats["success"]),
                ipopt_iterations=stats["iter_count"], max_gap=float(np.max(np.abs(np.asarray(run.result["g"])))),
                rk4_steps=rk4_steps, ipopt_tol=ipopt_tol if ipopt_tol is not None else 1e-8)


def solve_pmpsolve_constrained(name, problem, N, repeats, max_iter=None, timeout=None, method="emsa"):
    """``pmp.solve(problem, method, mesh=N)`` ``repeats`` times; a dict of the last solve
    (value, cost, horizon, violation, converged, status, iterations) and the median seconds, or of
    the error (the first failure ends the repeats)."""
    stop = pmp.Stop(max_iter=max_iter) if max_iter is not None else None
    seconds, sol, error = [], None, None
    for _ in range(repeats):
        start = time.perf_counter()
        watch = None
        if timeout is not None:
            def watch(record, controls, start=start):
                return time.perf_counter() - start > timeout
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                sol = pmp.solve(problem, method, mesh=N, stop=stop, callback=watch)
        except Exception as err:  # noqa: BLE001 - a failure is a result
            seconds.append(time.perf_counter() - start)
            error = harness.error_message(err)
            break
        seconds.append(time.perf_counter() - start)
    out = dict(method=method, seconds=statistics.median(seconds), seconds_all=seconds, max_iter=max_iter,
               timeout=timeout)
    if error is not None:
        out["error"] = error
    if sol is not None and error is None:
        value = {"J": sol.cost, "T": sol.horizon, "h(tf)": -sol.cost}[CONSTRAINED_VALUES[name]]
        out.update(value=float(value), cost=float(sol.cost), horizon=float(sol.horizon),
                   violation=float(sol.violation), converged=bool(sol.converged), status=sol.status,
                   iterations=int(sol.iterations))
    return out


def _fmt(x, fmt):
    return "-" if x is None else format(x, fmt)


def _relative(value, reference):
    return None if value is None or reference is None else (value - reference) / abs(reference)


def main_constrained(args):
    problems = constrained_problems()
    from problems.constrained import CASADI_N200
    names = args.problems or list(problems)
    unknown = [n for n in names if n not in problems]
    if unknown:
        raise SystemExit(f"unknown constrained problem(s) {unknown}; choose from {list(problems)}")
    harness.pin_threads(1)
    machine = harness.machine()
    # One small untimed solve per method first: torch's one-time lazy imports (sympy, about 0.3-0.45 s, at the
    # first torch.autograd.grad with grad_outputs in a process) stay out of the timed solves, as the CasADi
    # side's NLP build stays out of IPOPT's timing.
    warm, _ = problems["min-time-double-integrator"]()
    for method in args.methods:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pmp.solve(warm, method, mesh=8, stop=pmp.Stop(max_iter=2))
    rows = []
    out = args.out / "constrained.json"
    for name in names:
        problem, published = problems[name]()
        try:
            c = solve_casadi_constrained(name, problem, args.mesh, args.rk4_steps, args.repeats, args.ipopt_tol)
            c["rel_error_published"] = _relative(c["value"], published)
            c["rel_error_n200"] = _relative(c["value"], CASADI_N200.get(name)) if args.mesh == 200 else None
        except Exception as err:  # noqa: BLE001 - recorded, the pmpsolve side still runs
            c = dict(error=harness.error_message(err))
        print(f"{name}: CasADi {CONSTRAINED_VALUES[name]} = {c.get('value', float('nan')):.8f} in "
              f"{c.get('seconds', float('nan')):.3f} s ({c.get('status', c.get('error'))}, T = "
              f"{c.get('horizon', float('nan')):.8f}; N = 200 reference {CASADI_N200.get(name)}, relative "
              f"difference {_fmt(c.get('rel_error_n200'), '.1e')})", flush=True)
        for method in args.methods:  # one row per problem and method, the CasADi side shared
            row = dict(problem=name, method=method, quantity=CONSTRAINED_VALUES[name], published=published,
                       mesh=args.mesh, casadi_n200=CASADI_N200.get(name), casadi=c)
            p = solve_pmpsolve_constrained(name, problem, args.mesh, args.repeats, args.max_iter, args.timeout,
                                           method)
            p["rel_error_published"] = _relative(p.get("value"), published)
            p["rel_error_casadi"] = _relative(p.get("value"), c.get("value"))
            if "seconds" in c:
                p["ratio"] = p["seconds"] / c["seconds"]
            row["pmpsolve"] = p
            if "error" in p:
                print(f"{name} [{method}]: pmpsolve failed after {p['seconds']:.1f} s: {p['error']}", flush=True)
            else:
                print(f"{name} [{method}]: pmpsolve {row['quantity']} = {p['value']:.8f} in {p['seconds']:.2f} s "
                      f"({p['status']}, {p['iterations']} it, violation {p['violation']:.2e}, converged "
                      f"{p['converged']})", flush=True)
            rows.append(row)
            # Written after every solve, so that a long run keeps what it has measured.
            harness.write_json(out, {"machine": machine, "rows": rows}, quiet=True)
    print()
    print(format_constrained_table(rows))
    print(f"\nwrote {out}")
    return rows


def format_constrained_table(rows):
    num = _fmt
    lines = ["| problem | quantity | published | CasADi | CasADi s | method | pmpsolve | rel. err. vs published | "
             "rel. err. vs CasADi | violation | converged (status, it) | pmpsolve s | ratio |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        c, p = r["casadi"], r["pmpsolve"]
        if "error" in p:
            pm = f"error: {p['error'][:80]}"
            rest = f"- | - | - | - | {p['seconds']:.2f} | - |"
        else:
            pm = f"{p['value']:.8f}"
            rest = (f"{abs(p['rel_error_published']):.1e} | {num(p['rel_error_casadi'] and abs(p['rel_error_casadi']), '.1e')} | "
                    f"{p['violation']:.1e} | {p['converged']} ({p['status']}, {p['iterations']}) | {p['seconds']:.2f} | "
                    f"{num(p.get('ratio'), '.3g')} |")
        lines.append(f"| {r['problem']} | {r['quantity']} | {r['published']:.8g} | {num(c.get('value'), '.8f')} | "
                     f"{num(c.get('seconds'), '.3f')} | {r.get('method', 'emsa')} | {pm} | {rest}")
    return "\n".join(lines)


def main(argv=None):
    parser = harness.parser(__doc__)
    parser.add_argument("problems", nargs="*", default=None,
                        help=f"default: {' '.join(PROBLEMS)} (--quick: lqr); with --group constrained: "
                             "bryson-denham zermelo brachistochrone goddard min-time-double-integrator")
    parser.add_argument("--group", choices=["reference", "constrained"], default="reference",
                        help="reference (default): the reference problems -> control.json; constrained: the "
                             "constrained and free-time problems of problems.constrained -> constrained.json")
    parser.add_argument("--mesh", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rk4-steps", type=int, default=4)
    parser.add_argument("--target", type=float, default=1e-4)
    parser.add_argument("--methods", nargs="+", default=None,
                        help="default: emsa sqh ddp; with --group constrained: emsa ddp (--quick: emsa)")
    parser.add_argument("--max-iter", type=int, default=None,
                        help="constrained group: pmp.Stop(max_iter=...) for pmpsolve (default: its own)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="constrained group: stop a pmpsolve solve (by its callback) after this many seconds")
    parser.add_argument("--ipopt-tol", type=float, default=None,
                        help="constrained group: IPOPT's tol (default: IPOPT's own, 1e-8)")
    args = harness.parse(parser, argv, quick=dict(mesh=20, repeats=1, methods=["emsa"]))
    if ca is None:
        sys.exit("bench_control.py needs CasADi: pip install -e '.[bench]'  (or: pip install casadi)")
    if args.methods is None:
        args.methods = ["emsa", "ddp"] if args.group == "constrained" else ["emsa", "sqh", "ddp"]
    if args.group == "constrained":
        if args.quick and not args.problems:
            args.problems = ["min-time-double-integrator"]
        return main_constrained(args)
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
        # The methods' repeats interleaved (A B A B ..., not A A A B B B): a disturbance of the shared machine
        # then falls on all methods alike, and each round gives one ratio of their times to the target.
        rounds = [{method: solve_pmpsolve(problem, reference, args.mesh, method, args.target)
                   for method in args.methods} for _ in range(args.repeats)]
        for method in args.methods:
            runs = [r[method] for r in rounds]
            sol = runs[-1][0]
            to_target = [r[1] for r in runs]
            cost = independent_cost(problem, sol.controls, sol.mesh)
            row[f"pmpsolve-{method}"] = dict(
                cost=cost, rel_error=(cost - reference) / abs(reference), iterations=sol.iterations,
                converged=bool(sol.converged), status=sol.status, optimality=float(sol.optimality),
                seconds=statistics.median(r[2] for r in runs),
                seconds_to_target=None if None in to_target else statistics.median(to_target),
                seconds_all=[r[2] for r in runs], seconds_to_target_all=to_target)
        timed = {m: row[f"pmpsolve-{m}"]["seconds_to_target"] for m in args.methods}
        timed = {m: t for m, t in timed.items() if t is not None}
        if timed:
            fastest = min(timed, key=timed.get)
            row["fastest"] = fastest
            row["ratio_to_target"] = timed[fastest] / row["casadi"]["seconds"]
            if "emsa" in timed:
                # each method's time to the target over E-MSA's in the same round, the median over the rounds
                # (the spread: ratios_to_emsa_all)
                ratios = {m: [r[m][1] / r["emsa"][1] for r in rounds] for m in timed}
                row["ratio_to_emsa"] = {m: statistics.median(v) for m, v in ratios.items()}
                row["ratios_to_emsa_all"] = ratios
        rows.append(row)
        print(f"{name}: " + json.dumps({k: (round(v['seconds'], 3) if isinstance(v, dict) and "seconds" in v else v)
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
