"""Closed-form maximisation against the iterative maximisers, on the same interval data.

For each problem: one forward and one backward sweep at a fixed control, then the
interval objective (E-MSA, rho = 1) is maximised by the closed form and by the
iterative maximiser the library would otherwise use (projected L-BFGS; proximal
gradient with an L1 cost), several times each. Prints and saves median seconds,
their ratio and the largest difference between the maximisers' controls.

    python scripts/bench_maximisers.py [--mesh 200] [--repeats 7] [--out results/bench] [--quick]
"""
from __future__ import annotations

import torch

import harness
# Internals: one maximisation on fixed interval data, which the public solve() never exposes alone.
from pmpsolve.update.hamiltonian import IntervalHamiltonian, interval_data
from pmpsolve.update.maximisers import HamiltonianMaximiser
from pmpsolve.sweep.mesh import make_mesh
from pmpsolve.sweep.pointwise import PointwiseProblem
from pmpsolve.sweep.sweeps import Sweeper
from problems import REFERENCE_PROBLEMS, double_integrator


def main(argv=None):
    parser = harness.parser(__doc__)
    parser.add_argument("--mesh", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rho", type=float, default=1.0)
    args = harness.parse(parser, argv, quick=dict(mesh=20, repeats=1))
    harness.pin_threads(1)
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
        closed_run = harness.timed(lambda: closed.maximise(objective), repeats=args.repeats)
        other_run = harness.timed(lambda: other.maximise(objective), repeats=args.repeats)
        (t_closed, r_closed), (t_other, r_other) = ((r.median, r.result) for r in (closed_run, other_run))
        diff = float((r_closed.controls - r_other.controls).abs().max())
        rows.append(dict(problem=name, mesh=args.mesh, rho=args.rho, closed_form_seconds=t_closed,
                         iterative=iterative, iterative_seconds=t_other, ratio=t_closed / t_other,
                         max_control_difference=diff,
                         objective_gain_closed=float(r_closed.value.sum() - objective(u).detach().sum()),
                         objective_gain_iterative=float(r_other.value.sum() - objective(u).detach().sum())))
        print(f"{name:22s} {1e3 * t_closed:16.2f} {1e3 * t_other:15.2f} {iterative:>18s} {t_closed / t_other:7.3f} {diff:9.1e}")
    harness.write_json(args.out / "maximisers.json", {"rows": rows})


if __name__ == "__main__":
    main()
