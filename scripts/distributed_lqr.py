"""A data-parallel control solve on torch.distributed: the LQR from K initial states sharing one control.

    torchrun --nproc_per_node=2 scripts/distributed_lqr.py [--samples 1000] [--mesh 100] [--max-iter 30]
    python scripts/distributed_lqr.py [same options]        # the same solve in one process, to compare

Every rank builds the whole sample set (``problems.lqr_samples``, seeded), keeps its rows of x0
(``torch.chunk``: rank r of R holds the r-th block) and calls ``pmp.solve(..., process_group=WORLD)``;
J is the mean over all K samples and every rank returns the same controls. Rank 0 prints J at every
iteration, the result, the exact optimum (Riccati) and what the all-reduces cost. Backend: NCCL
with one GPU per rank when CUDA is present (``--backend`` to force one), else gloo on the CPU.
See docs/distributed.md.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: `problems`
import pmpsolve as pmp  # noqa: E402
from problems import lqr_samples  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1000, help="K, all ranks together (default 1000)")
    parser.add_argument("--mesh", type=int, default=100, help="control intervals N (default 100)")
    parser.add_argument("--max-iter", type=int, default=30)
    parser.add_argument("--backend", choices=("auto", "gloo", "nccl"), default="auto")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds a collective may wait (default 300)")
    args = parser.parse_args(argv)

    distributed = "WORLD_SIZE" in os.environ  # set by torchrun
    rank, world, device, group = 0, 1, "cpu", None
    if distributed:
        import torch.distributed as dist

        backend = args.backend if args.backend != "auto" else ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":  # one GPU per rank
            local_rank = int(os.environ["LOCAL_RANK"])
            torch.cuda.set_device(local_rank)
            device = f"cuda:{local_rank}"
        # The timeout bounds every collective of the solve: a rank that dies cannot hang the others for longer.
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=args.timeout))
        rank, world, group = dist.get_rank(), dist.get_world_size(), dist.group.WORLD

    problem, exact = lqr_samples(args.samples)
    shard = problem.x0.chunk(world)[rank]  # [K_r, n]: this rank's samples
    mine = pmp.ControlProblem(problem.dynamics, shard, problem.horizon, problem.controls, problem.terminal_cost,
                              problem.running_cost, name=problem.name)

    def report(record, controls):
        if rank == 0:
            print(f"iteration {record.iteration:3d}  J = {record.cost!r}", flush=True)

    start = time.perf_counter()
    sol = pmp.solve(mine, mesh=args.mesh, device=device, process_group=group, callback=report,
                    stop=pmp.Stop(max_iter=args.max_iter))
    seconds = time.perf_counter() - start
    if rank == 0:
        print(f"{world} process(es), K = {args.samples} samples ({len(shard)} on rank 0), mesh {args.mesh}")
        print(f"J = {sol.cost!r}  iterations {sol.iterations}  status {sol.status}  ({seconds:.2f} s)")
        print(f"exact optimum of the continuous problem J* = {exact:.10f}")
        info = sol.settings.get("distributed")
        if info is not None:
            print(f"all-reduces: {info['all_reduces']} ({info['numbers_reduced']} numbers), "
                  f"{info['all_reduce_seconds']:.3f} s on rank 0")
    if distributed:
        import torch.distributed as dist

        dist.destroy_process_group()


if __name__ == "__main__":
    main()
