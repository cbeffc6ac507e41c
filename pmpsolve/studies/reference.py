"""The reference problems of docs/theory.md solved by the default ``solve``, as a table.

For every problem: J of the returned controls, its relative error against the
published J*, J re-checked by an independent integrator (scipy's DOP853 at
tight tolerances, integrating interval by interval), iterations, wall time and
the per-iteration split between forward sweep, backward sweep and maximisation.
"""
from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
from scipy.integrate import solve_ivp

import pmpsolve as pmp
from pmpsolve.studies import cli

__all__ = ["independent_cost", "run", "main"]


def independent_cost(problem: pmp.ControlProblem, controls: torch.Tensor, mesh: torch.Tensor,
                     rtol: float = 1e-12, atol: float = 1e-13) -> float:
    """J of piecewise-constant ``controls`` [N, m] by scipy's DOP853, interval by interval.

    Shares nothing with the engine's sweeps but the user's functions (called on
    float64 CPU tensors); each interval is a separate solve, so no step crosses a
    control jump.
    """
    K, n = problem.num_samples, problem.state_dim
    u_all = controls.detach().cpu().double()
    nodes = mesh.detach().cpu().double().numpy()
    has_L = problem.running_cost is not None

    def rhs_for(u_n):
        u_k = u_n.expand(K, -1)

        def rhs(t, z):
            tt = torch.tensor(t, dtype=torch.float64)
            x = torch.as_tensor(z[: K * n]).reshape(K, n)
            with torch.no_grad():
                dx = problem.dynamics(tt, x, u_k).reshape(-1).numpy()
                if not has_L:
                    return dx
                return np.concatenate([dx, problem.running_cost(tt, x, u_k).numpy()])

        return rhs

    z = problem.initial_state(torch.float64, "cpu").reshape(-1).numpy()
    z = np.concatenate([z, np.zeros(K)]) if has_L else z
    for i in range(len(nodes) - 1):
        sol = solve_ivp(rhs_for(u_all[i]), (nodes[i], nodes[i + 1]), z, method="DOP853", rtol=rtol, atol=atol)
        if not sol.success:
            raise RuntimeError(f"independent integration failed on interval {i}: {sol.message}")
        z = sol.y[:, -1]
    x_T = torch.as_tensor(z[: K * n]).reshape(K, n)
    terminal = problem.terminal_cost(x_T).numpy() if problem.terminal_cost is not None else np.zeros(K)
    running = z[K * n:] if has_L else np.zeros(K)
    penalty = 0.0
    if problem.control_penalty is not None:  # int c |u|_1 (or |u|_0) dt of the piecewise-constant control
        penalty = float((torch.as_tensor(np.diff(nodes)) * problem.control_penalty.value(u_all)).sum())
    return float(np.mean(terminal + running)) + penalty


def run(names: Optional[List[str]] = None, *, mesh: int = 200, method: str = "emsa", out: Optional[Path] = None,
        progress: bool = True, previous: Optional[Dict] = None) -> List[Dict]:
    """One row per problem; with ``out``, a figure per problem and ``out/results.json``, rewritten
    (atomically) after every problem. ``previous``: the results of an earlier run with the same
    settings (``--resume``), whose rows are taken over. Ctrl-C raises ``cli.Interrupted`` with the
    results so far in its ``results`` attribute (saved)."""
    from problems import REFERENCE_PROBLEMS

    names = list(names or REFERENCE_PROBLEMS)
    for name in names:
        if name not in REFERENCE_PROBLEMS:
            raise ValueError(f"unknown problem {name!r}; choose from {sorted(REFERENCE_PROBLEMS)}")
    done = {r["problem"]: r for r in (previous or {}).get("rows", [])}
    rows: List[Dict] = []
    results = {"settings": settings(names, mesh=mesh, method=method), "rows": rows}

    def save():
        if out is not None:
            cli.write_json(out / "results.json", results)

    try:
        for name in names:
            if name in done:
                rows.append(done[name])
                continue
            problem, reference = REFERENCE_PROBLEMS[name]()
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                sol = cli.check_interrupted(pmp.solve(problem, method=method, mesh=mesh, progress=progress))
            seconds = time.perf_counter() - start
            checked = independent_cost(problem, sol.controls, sol.mesh)
            its = sol.history[1:]
            mean = lambda key: float(np.mean([getattr(r, key) for r in its])) if its else 0.0  # noqa: E731
            row = dict(problem=name, reference=reference, cost=sol.cost,
                       rel_error=(sol.cost - reference) / abs(reference), independent_cost=checked,
                       independent_rel_diff=(checked - sol.cost) / abs(reference), iterations=sol.iterations,
                       converged=sol.converged, seconds=seconds, forward_seconds=mean("forward_seconds"),
                       backward_seconds=mean("backward_seconds"), maximise_seconds=mean("maximise_seconds"),
                       forward_evals=mean("forward_evals"), backward_evals=mean("backward_evals"), mesh=mesh,
                       method=method)
            if out is not None:
                out.mkdir(parents=True, exist_ok=True)
                sol.plot(out / f"{name}.png")
                import matplotlib.pyplot as plt

                plt.close("all")
            rows.append(row)
            save()
    except (KeyboardInterrupt, cli.Interrupted):
        if rows:
            save()
        raise cli.interruption(results) from None
    save()
    return rows


def settings(names: List[str], *, mesh: int, method: str) -> Dict:
    """What results.json records under "settings"; ``--resume`` takes over rows only when they are the same."""
    return {"problems": list(names), "mesh": mesh, "method": method}


def format_table(rows: List[Dict]) -> str:
    head = (f"{'problem':10s} {'J':>13s} {'J*':>11s} {'rel.err':>9s} {'J (scipy)':>13s} {'iters':>5s} "
            f"{'time[s]':>8s} {'fwd/it':>7s} {'bwd/it':>7s} {'max/it':>7s}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['problem']:10s} {r['cost']:13.8f} {r['reference']:11.7f} {r['rel_error']:9.2e} "
                     f"{r['independent_cost']:13.8f} {r['iterations']:5d} {r['seconds']:8.1f} "
                     f"{r['forward_seconds']:7.3f} {r['backward_seconds']:7.3f} {r['maximise_seconds']:7.3f}")
    return "\n".join(lines)


def main(argv=None) -> None:
    from problems import REFERENCE_PROBLEMS

    parser = argparse.ArgumentParser(prog="python -m pmpsolve reproduce reference",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("problems", nargs="*", type=cli.one_of(REFERENCE_PROBLEMS, "problem"),
                        help=f"problem names (default: all four: {', '.join(REFERENCE_PROBLEMS)})")
    parser.add_argument("--mesh", type=cli.positive_int, default=200, help="control intervals (default 200)")
    parser.add_argument("--method", default="emsa", choices=sorted(pmp.RULES))
    parser.add_argument("--out", type=cli.writable_dir, default="results/reference",
                        help="output folder (results/reference)")
    cli.add_resume_option(parser)
    args = parser.parse_args(argv)
    names = args.problems or list(REFERENCE_PROBLEMS)
    path = args.out / "results.json"
    previous = (cli.load_previous(parser, path, settings(names, mesh=args.mesh, method=args.method))
                if args.resume else None)
    try:
        rows = run(names, mesh=args.mesh, method=args.method, out=args.out, previous=previous)
    except cli.Interrupted as stop:
        done = stop.results["rows"]
        if done:
            print(format_table(done))
        cli.exit_interrupted("reference", argv, len(done), path)
    print(format_table(rows))
    print(f"\nwrote {path} and one figure per problem")


if __name__ == "__main__":
    main()
