"""Closed-form maximisation against the iterative maximisers, on the same interval data.

For each problem: one forward and one backward sweep at a fixed control, then the
interval objective (E-MSA, rho = 1) is maximised by the closed form and by the
iterative maximiser the library would otherwise use (projected L-BFGS; proximal
gradient with an L1 cost), several times each. Prints and saves median seconds,
their ratio and the largest difference between the maximisers' controls.

    python scripts/bench_maximisers.py [--mesh 200] [--repeats 7] [--out results/bench]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from pmpsolve.hamiltonian import IntervalHamiltonian, interval_data
from pmpsolve.maximisers import HamiltonianMaximiser
from pmpsolve.mesh import make_mesh
from pmpsolve.pointwise import PointwiseProblem
from pmpsolve.sweeps import Sweeper
from problems import REFERENCE_PROBLEMS, double_integrator


def median_seconds(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mesh", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rho", type=float, default=1.0)
    parser.add_argument("--out", type=Path, default=Path("results/bench"))
    args = parser.parse_args(argv)
    problems = {name: make() for name, make in REFERENCE_PROBLEMS.items()}
    problems["double-integrator-L1"] = double_integrator(penalty="L1")
    rows = []
    print(f"{'problem':22s} {'closed form [ms]':>16s} {'iterative [ms]':>15s} {'which':>18s} {'ratio':>7s} {'max |du|':>9s}")
    for name, (problem, _) in problems.items():
        dtype = torch.float64
        pw = PointwiseProblem(problem, dtype, "cpu")
        nodes = make_mesh(args.mesh, problem.horizon, dtype, "cpu")
        low, high = problem.controls.bounds(dtype, "cpu")
        u = torch.clamp(torch.full((args.mesh, problem.control_dim), 0.1, dtype=dtype), low, high)
        sweeper = Sweeper(pw, nodes)
        fw = sweeper.forward(u)
        data = interval_data(pw, u, fw, sweeper.backward(u, fw), 3)
        objective = IntervalHamiltonian(pw, data, args.rho)
        iterative = "proximal" if problem.control_penalty is not None else "lbfgs"
        closed = HamiltonianMaximiser(problem.controls, method="closed-form")
        other = HamiltonianMaximiser(problem.controls, method=iterative, max_iter=50)
        t_closed, r_closed = median_seconds(lambda: closed.maximise(objective), args.repeats)
        t_other, r_other = median_seconds(lambda: other.maximise(objective), args.repeats)
        diff = float((r_closed.controls - r_other.controls).abs().max())
        rows.append(dict(problem=name, mesh=args.mesh, rho=args.rho, closed_form_seconds=t_closed,
                         iterative=iterative, iterative_seconds=t_other, ratio=t_closed / t_other,
                         max_control_difference=diff,
                         objective_gain_closed=float(r_closed.value.sum() - objective(u).detach().sum()),
                         objective_gain_iterative=float(r_other.value.sum() - objective(u).detach().sum())))
        print(f"{name:22s} {1e3 * t_closed:16.2f} {1e3 * t_other:15.2f} {iterative:>18s} {t_closed / t_other:7.3f} {diff:9.1e}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "maximisers.json").write_text(json.dumps({"rows": rows}, indent=2))
    print(f"wrote {args.out / 'maximisers.json'}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
