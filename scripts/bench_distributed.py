"""Seconds per iteration of a data-parallel control solve on 1 and R ranks, and the communication share.

``--problem sine`` (default): the sine network of the paper's Fig. 1 (``problems.sine``) with K
training samples, the sine study's E-MSA settings (rho 0.25, 10 L-BFGS iterations, the "good"
start, rtol 1e-6). ``--problem lqr``: the LQR from K initial states (``problems.lqr_samples``),
the default solve (E-MSA, closed-form maximisation, dopri5). On ``--mesh`` intervals for
``--iterations`` iterations (tol = 0 so that every run does the same number). Each configuration runs in fresh processes started here
(torch.multiprocessing, gloo on the CPU, one thread per rank): R = 1 is the plain one-process
solve, R > 1 splits x0 into R shards with ``process_group``. Reported per run (rank 0; the
slowest rank for the wall time): the median seconds per iteration, the whole solve's seconds,
its CPU seconds on the busiest rank (the work each rank does, whatever else runs on the machine),
the seconds spent inside all-reduces (which include waiting for the slower rank) and their share,
the all-reduces per iteration and the numbers they carried; then, after the solve, the latency of
one all-reduce of that size alone (after a barrier: no waiting for a slower rank, median of 200)
and the share of the solve it accounts for (latency x all-reduces / solve seconds): the cost of the
communication itself, while the time inside the solve's all-reduces includes waiting for the slower
rank. Writes results/bench/distributed.json and prints a table.

    python scripts/bench_distributed.py [--samples 10000 100000] [--ranks 1 2] [--mesh 20] [--iterations 3]
"""
from __future__ import annotations

import datetime
import os
import pickle
import socket
import statistics
import time
import warnings

import torch

import harness
import pmpsolve as pmp
from problems import lqr_samples
from problems.sine import sine_data, sine_initial_controls, sine_problem


def _rank(rank: int, world: int, port: int, K: int, mesh: int, iterations: int, queue, which: str = "sine") -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)  # one core per rank: R ranks use R cores
    warnings.simplefilter("ignore")
    try:
        group = None
        if world > 1:
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                    timeout=datetime.timedelta(seconds=1800))
            group = dist.group.WORLD
        if which == "sine":
            x, y = (t.chunk(world)[rank] for t in sine_data(K, seed=0))
            problem = sine_problem(x, y, reg=0.001, delta=5.0 / mesh, name="sine-train")
            options = dict(method=pmp.EMSA(rho=0.25), maximiser=pmp.Maximiser(iterations=10, perturb=0.005, seed=0),
                           ode=pmp.ODE(rtol=1e-6, atol=1e-8), init=sine_initial_controls("good", mesh, seed=0))
        else:
            full = lqr_samples(K)[0]
            problem = pmp.ControlProblem(full.dynamics, full.x0.chunk(world)[rank], full.horizon, full.controls,
                                         full.terminal_cost, full.running_cost, name=full.name)
            options = {}
        if group is not None:
            dist.barrier(group)  # start together
        seconds, cpu, sol = harness.clock(lambda: pmp.solve(
            problem, mesh=mesh, stop=pmp.Stop(max_iter=iterations, tol=0.0, stall_tol=0.0), process_group=group,
            **options))
        records = sol.history[1:]
        info = sol.settings.get("distributed") or {"all_reduces": 0, "numbers_reduced": 0, "all_reduce_seconds": 0.0}
        row = dict(rank=rank, seconds=seconds, cpu_seconds=cpu, iterations=len(records), cost=sol.cost,
                   per_iteration=statistics.median(r.seconds for r in records),
                   forward=statistics.median(r.forward_seconds for r in records),
                   backward=statistics.median(r.backward_seconds for r in records),
                   maximise=statistics.median(r.maximise_seconds for r in records),
                   all_reduces=info["all_reduces"], numbers=info["numbers_reduced"],
                   all_reduce_seconds=info["all_reduce_seconds"])
        if group is not None:
            # The all-reduce itself, without waiting for a slower rank: the same number of numbers per call
            # as the solve's average, after a barrier, median of 200.
            size = max(1, round(info["numbers_reduced"] / max(1, info["all_reduces"])))
            buffer, times = torch.zeros(size, dtype=torch.float64), []
            for _ in range(200):
                dist.barrier(group)
                t0 = time.perf_counter()
                dist.all_reduce(buffer, group=group)
                times.append(time.perf_counter() - t0)
            row["all_reduce_latency"] = statistics.median(times)
            dist.destroy_process_group()
        queue.put((rank, pickle.dumps(row)))
    except BaseException as err:  # noqa: BLE001 - reported by the parent
        queue.put((rank, f"{type(err).__name__}: {err}"))


def run(K: int, world: int, mesh: int, iterations: int, which: str = "sine") -> dict:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    processes = [ctx.Process(target=_rank, args=(r, world, port, K, mesh, iterations, queue, which)) for r in range(world)]
    for p in processes:
        p.start()
    got = dict(queue.get() for _ in range(world))
    for p in processes:
        p.join()
    rows = []
    for r in range(world):
        if not isinstance(got[r], bytes):
            raise RuntimeError(f"K = {K}, {world} ranks: rank {r} failed: {got[r]}")
        rows.append(pickle.loads(got[r]))
    head = rows[0]
    return dict(samples=K, ranks=world, mesh=mesh, iterations=head["iterations"], cost=head["cost"],
                seconds_per_iteration=head["per_iteration"], solve_seconds=max(r["seconds"] for r in rows),
                cpu_seconds_per_rank=max(r["cpu_seconds"] for r in rows),
                forward=head["forward"], backward=head["backward"], maximise=head["maximise"],
                all_reduce_seconds=head["all_reduce_seconds"],
                communication_share=head["all_reduce_seconds"] / head["seconds"],
                all_reduce_latency=head.get("all_reduce_latency", 0.0),
                transfer_share=head.get("all_reduce_latency", 0.0) * head["all_reduces"] / head["seconds"],
                all_reduces_per_iteration=head["all_reduces"] / max(1, head["iterations"]),
                numbers_per_iteration=head["numbers"] / max(1, head["iterations"]), per_rank=rows)


def main(argv=None) -> None:
    parser = harness.parser(__doc__)
    parser.add_argument("--samples", type=int, nargs="+", default=[10000])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--mesh", type=int, default=20)
    parser.add_argument("--problem", choices=["sine", "lqr"], default="sine")
    parser.add_argument("--iterations", type=int, default=3)
    args = harness.parse(parser, argv, quick=dict(samples=[40], ranks=[1, 2], mesh=10, iterations=1, problem="lqr"))
    results = {"machine": harness.machine(threads_per_rank=1, load_average_before=os.getloadavg()),
               "problem": ("sine network, the sine study's E-MSA settings" if args.problem == "sine" else
                           "lqr_samples(K), default solve (emsa, closed form, dopri5)"), "rows": []}
    print(f"{'K':>7} {'ranks':>5} {'s/iter':>8} {'solve s':>8} {'cpu s':>7} {'fwd':>6} {'bwd':>6} {'max':>6} "
          f"{'comm s':>7} {'share':>6} {'lat us':>7} {'xfer':>6} {'red/it':>6} {'nums/it':>8}  J")
    for K in args.samples:
        base = None
        for world in args.ranks:
            row = run(K, world, args.mesh, args.iterations, args.problem)
            results["rows"].append(row)
            base = row if world == 1 else base
            print(f"{K:>7} {world:>5} {row['seconds_per_iteration']:>8.3f} {row['solve_seconds']:>8.2f} "
                  f"{row['cpu_seconds_per_rank']:>7.2f} "
                  f"{row['forward']:>6.2f} {row['backward']:>6.2f} {row['maximise']:>6.2f} "
                  f"{row['all_reduce_seconds']:>7.3f} {row['communication_share']:>6.1%} "
                  f"{1e6 * row['all_reduce_latency']:>7.0f} {row['transfer_share']:>6.2%} "
                  f"{row['all_reduces_per_iteration']:>6.1f} {row['numbers_per_iteration']:>8.0f}  {row['cost']!r}",
                  flush=True)
            if base is not None and world > 1:
                row["speedup_per_iteration"] = base["seconds_per_iteration"] / row["seconds_per_iteration"]
    results["machine"]["load_average_after"] = os.getloadavg()
    harness.write_json(args.out / "distributed.json", results, quiet=True)
    print(f"load average before {results['machine']['load_average_before']}, after "
          f"{results['machine']['load_average_after']} ({os.cpu_count()} CPUs)")
    print(f"wrote {args.out / 'distributed.json'}")


if __name__ == "__main__":
    main()
