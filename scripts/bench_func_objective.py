"""The E-MSA objective (rho > 0) by torch.func, eager and compiled, against today's autograd path.

Measurement only: the library is not changed (docs/benchmarks.md, section 7). Compiling
``IntervalHamiltonian.smooth`` fails for rho > 0 (aot_autograd has no double backward); here the
co-state term is written without one: grad_x H by ``torch.func.grad`` over x inside a function of
u, and that function's value and u-gradient by ``torch.func.grad_and_value``, so the whole block
is one forward graph that ``torch.compile`` can trace. Generic: it calls the user's f and L through
``PointwiseProblem`` exactly as ``IntervalHamiltonian.smooth`` does (nothing sine-specific).

For each case (the sine network at K samples, mesh 20, "good" start, reg 0.001; the reference
problems at K = 1, mesh 200, u = 0.1; a toy problem whose f has a Python side effect), interval
data from one forward and one backward sweep, then ``value_and_grad`` at a trial control
(u^k + U(-0.05, 0.05), inside the bounds: at u^k itself the feasibility terms vanish), block by
block as ``IntervalHamiltonian.blocks`` cuts it:

* autograd: ``IntervalHamiltonian.value_and_grad`` (today's path, the reference);
* func eager: the torch.func block function, not compiled;
* aot_eager (``--variants``, not by default): traced by dynamo and aot_autograd, run by eager
  kernels (no code generation: whether the trace works, in seconds);
* inductor: that function in ``torch.compile(dynamic=False)`` (one graph per block shape: the last
  sample block is smaller), and ``dynamic=True``;
* inductor + decomposed bmm (``--decompose-bmm``): inductor's private post-grad pass that writes a
  small batched matrix product as a fused multiply-sum, enabled by patching a module constant of
  torch._inductor (not something a library could ship; the sine network's W x is a [3, K, 5] x
  [5, 5] bmm).

Every variant is timed in the same process: after its first call, ``--rounds`` pairs of one
autograd call and one call of the variant (wall and CPU seconds); medians, and the ratio of the
autograd median to the variant's over the same pairs. ``fullgraph=True``: a function dynamo
cannot put in one graph fails (with dynamo's message) instead of running eagerly. "compile" is
the first call minus the autograd median, in a fresh inductor cache directory (a cold compile;
the first compile of the process also pays inductor's start-up; ``--warm-cache``: the usual
directory). Also: max |difference| of values and gradients against autograd (absolute and
relative to the largest entry), whether every steady call returned the same bits as the first,
dynamo's graph and graph-break counts, failures with their message. One thread
(``torch.set_num_threads(1)``). ``--block-elements``: another block size for the compiled
variants only.

    python scripts/bench_func_objective.py [--samples 10000 100000] [--problems lqr vanderpol]
        [--rounds 5] [--decompose-bmm] [--block-elements 1048576] [--out results/bench]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import tempfile
import warnings

import torch

import harness
import pmpsolve as pmp
from harness import clock, dynamo_counts
# Internals: the interval objective of one maximisation, rewritten with torch.func and compiled, beside the library's.
from pmpsolve.update.hamiltonian import IntervalHamiltonian, interval_data
from pmpsolve.sweep.mesh import make_mesh
from pmpsolve.sweep.pointwise import PointwiseProblem
from pmpsolve.sweep.sweeps import Sweeper
from problems import REFERENCE_PROBLEMS
from problems.sine import sine, sine_initial_controls

def short(err: BaseException) -> str:
    return harness.error_message(err, 400)


# ------------------------------------------------------------------ the objective by torch.func
def func_block(pw: PointwiseProblem, rho: float):
    """(u [R, m], times [R, Q], weights [R, Q], X, P, f^k, -grad_x H^k [R, Q, Kb, n], lengths [R],
    u^k [R, m], eps) -> (grad_u [R, m], (sum, values [R])): the smooth E-MSA objective of one block
    (``IntervalHamiltonian.smooth``) and its u-gradient, with no double backward."""
    reducer = pw.reducer

    def objective(u, times, weights, X, P, state_slope, costate_slope, lengths, controls, eps):
        def hamiltonian_of_x(x):  # H summed over the samples, as PointwiseProblem.hamiltonian
            f = pw.dynamics(times, x, u)
            H = reducer.sum_states(P * f)
            if pw.has_running_cost:
                H = H - reducer.sum_costs(pw.running_cost(times, x, u)) / reducer.num_samples
            return H.sum(), (H, f)

        gx, (H, f) = torch.func.grad(hamiltonian_of_x, has_aux=True)(X)
        errors = reducer.sum_states((f - state_slope) ** 2) + reducer.sum_states((gx + costate_slope) ** 2)
        value = (weights * (H - 0.5 * rho * errors)).sum(-1)
        if eps:  # the SQH term, in the block of the first samples only (IntervalHamiltonian.restricted)
            value = value - eps * lengths * ((u - controls) ** 2).sum(-1)
        return value.sum(), value

    return torch.func.grad_and_value(objective, has_aux=True)


def blockwise(objective: IntervalHamiltonian, block_fn, block_elements=None):
    """u [N, m] -> (values [N], gradient [N, m]): ``block_fn`` over ``objective.blocks()`` (with
    ``block_elements`` per block when given, else the class's), summed as
    ``IntervalHamiltonian.value_and_grad`` sums its blocks."""
    if block_elements:
        objective.block_elements = block_elements  # this instance only, for the blocks below
    blocks = objective.blocks()
    objective.__dict__.pop("block_elements", None)

    def value_and_grad(u):
        values, grads = u.new_zeros(u.shape[0]), torch.zeros_like(u)
        for rows, samples in blocks:
            part = objective.restricted(rows, samples)
            d = part.data
            g, (_, v) = block_fn(u[rows].detach(), d.times, d.weights, d.states, d.costates, d.state_slope,
                                 d.costate_slope, d.lengths, d.controls, part.eps)
            values[rows] += v
            grads[rows] += g
        return values, grads
    return value_and_grad


class DecomposedBmm:
    """Inductor's post-grad pass that writes a bmm with a small batch as a multiply-sum, on the
    CPU for batches up to ``batch`` (private knobs of torch._inductor, patched for one variant)."""

    def __init__(self, batch: int = 64):
        self.batch = batch

    def __enter__(self):
        import torch._inductor.config as config
        import torch._inductor.fx_passes.decompose_mem_bound_mm as decompose
        self.saved = (config.post_grad_fusion_options, decompose.cpu_max_first_dimension_decomposition)
        config.post_grad_fusion_options = {**config.post_grad_fusion_options,
                                           "decompose_mm_pass": {"cpu_max_first_dimension_decomposition": self.batch}}
        decompose.cpu_max_first_dimension_decomposition = self.batch
        return self

    def __exit__(self, *exc):
        import torch._inductor.config as config
        import torch._inductor.fx_passes.decompose_mem_bound_mm as decompose
        config.post_grad_fusion_options, decompose.cpu_max_first_dimension_decomposition = self.saved


# ------------------------------------------------------------------------------------- cases
def side_effect_problem():
    """A toy problem (K = 1) whose f writes to a Python stream: vmap-compatible (the library's
    check passes), but dynamo cannot put the write in a graph."""
    sink = io.StringIO()

    def dynamics(t, x, u):
        print("f", file=sink)
        return torch.stack([x[..., 1], u[..., 0] - torch.sin(x[..., 0])], dim=-1)

    problem = pmp.ControlProblem(dynamics, torch.tensor([1.0, 0.0], dtype=torch.float64), 2.0, pmp.Reals(1),
                                 terminal_cost=lambda x: (x ** 2).sum(-1),
                                 running_cost=lambda t, x, u: (u ** 2).sum(-1) + torch.cos(t) * x[..., 0] ** 2,
                                 name="side-effect")
    return problem, None


def setup(problem, u, mesh_size, rho, *, rtol, atol, quadrature=3):
    pw = PointwiseProblem(problem, torch.float64, "cpu")
    nodes = make_mesh(mesh_size, problem.horizon, torch.float64, "cpu")
    sweeper = Sweeper(pw, nodes, rtol=rtol, atol=atol, quadrature=quadrature)
    forward = sweeper.forward(u)
    data = interval_data(pw, u, forward, sweeper.backward(u, forward), quadrature)
    return pw, IntervalHamiltonian(pw, data, rho)


def trial_point(problem, u, seed=1):
    g = torch.Generator().manual_seed(seed)
    low, high = problem.controls.bounds(u.dtype, u.device)
    return torch.clamp(u + 0.05 * (2 * torch.rand(u.shape, generator=g, dtype=u.dtype) - 1), low, high)


# -------------------------------------------------------------------------------- measurement
def measure_case(pw, objective, u, rounds: int, decompose_bmm: bool, block_elements=None, only=None) -> dict:
    """Each variant after a fresh dynamo (its compile in the first call), then ``rounds`` pairs
    (autograd call, variant call): the ratio compares calls made under the same load. Variants are
    not interleaved with each other: torch.func's wrappers share one code object, so dynamo would
    keep their compiled entries in one cache and guard them against each other."""
    fn = func_block(pw, objective.rho)
    compiled = lambda **options: blockwise(objective, torch.compile(fn, fullgraph=True, **options),  # noqa: E731
                                           block_elements)
    variants = {"autograd": ((lambda: objective.value_and_grad), None),
                "func eager": ((lambda: blockwise(objective, fn)), None),
                "aot_eager": ((lambda: compiled(backend="aot_eager", dynamic=False)), None),
                "inductor": ((lambda: compiled(dynamic=False)), None),
                "inductor dynamic": ((lambda: compiled(dynamic=True)), None)}
    if decompose_bmm:
        variants["inductor + decomposed bmm"] = ((lambda: compiled(dynamic=False)), DecomposedBmm)
    only = only or [name for name in variants if name != "aot_eager"]
    variants = {name: v for name, v in variants.items() if name in only or name == "autograd"}
    base = harness.timed(lambda: objective.value_and_grad(u), repeats=2, warmup=2)  # after eager torch's warm-up
    reference, eager_seconds = base.result, base.median
    rows = {}
    for name, (make, context) in variants.items():
        harness.fresh_dynamo()
        row = rows[name] = {"ok": False, "wall": [], "cpu": [], "autograd_wall": [], "autograd_cpu": []}
        results = []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                with context() if context else contextlib.nullcontext():
                    runner = make()
                    wall, _, first = clock(lambda: runner(u))
                    row.update(first_call_seconds=wall, compile_seconds=max(wall - eager_seconds, 0.0))
                    graphs = dynamo_counts()["unique_graphs"]
                    for _ in range(rounds):
                        wall, cpu, _ = clock(lambda: objective.value_and_grad(u))
                        row["autograd_wall"].append(wall)
                        row["autograd_cpu"].append(cpu)
                        wall, cpu, result = clock(lambda: runner(u))
                        row["wall"].append(wall)
                        row["cpu"].append(cpu)
                        results.append(result)
                row.update(ok=True, recompiled_in_steady_calls=dynamo_counts()["unique_graphs"] - graphs)
            except Exception as err:  # noqa: BLE001 - a failure is a result here
                row["error"] = short(err)
        row["dynamo"] = dynamo_counts()
        row["warnings"] = sorted({str(w.message)[:200] for w in caught})[:3]
        if not row["ok"]:
            continue
        v, g = results[0]
        row["bit_identical_repeats"] = all(torch.equal(v, a) and torch.equal(g, b) for a, b in results)
        row["bit_identical_first_call"] = torch.equal(first[0], v) and torch.equal(first[1], g)
        dv, dg = (v - reference[0]).abs().max(), (g - reference[1]).abs().max()
        median = statistics.median
        row.update(median_wall=median(row["wall"]), median_cpu=median(row["cpu"]),
                   autograd_median_wall=median(row["autograd_wall"]), autograd_median_cpu=median(row["autograd_cpu"]),
                   max_diff_value=float(dv), max_diff_grad=float(dg),
                   rel_diff_value=float(dv / reference[0].abs().max().clamp_min(1e-300)),
                   rel_diff_grad=float(dg / reference[1].abs().max().clamp_min(1e-300)))
        row["speedup_wall"] = row["autograd_median_wall"] / row["median_wall"]
        row["speedup_cpu"] = row["autograd_median_cpu"] / row["median_cpu"]
    torch._dynamo.reset()
    return rows


def print_case(label, rows):
    print(f"\n{label}")
    for name, r in rows.items():
        if not r["ok"]:
            print(f"  {name:26s} FAILED {r['error'][:200]}")
            continue
        line = (f"  {name:26s} {1e3 * r['median_wall']:9.2f} ms wall ({1e3 * r['median_cpu']:9.2f} CPU), "
                f"autograd {1e3 * r['autograd_median_wall']:9.2f}: x{r['speedup_wall']:.2f} "
                f"(CPU x{r['speedup_cpu']:.2f})")
        if name != "autograd":
            line += (f"  first call {r['first_call_seconds']:.2f} s  |dv| {r['max_diff_value']:.1e} "
                     f"|dg| {r['max_diff_grad']:.1e} (rel {r['rel_diff_grad']:.1e})"
                     f"  same bits {r['bit_identical_repeats'] and r['bit_identical_first_call']}"
                     f"  graphs {r['dynamo']['unique_graphs']} breaks {r['dynamo']['graph_breaks']}"
                     f" recompiled {r['recompiled_in_steady_calls']}")
        print(line, flush=True)


def main(argv=None):
    parser = harness.parser(__doc__)
    parser.add_argument("--samples", type=int, nargs="*", default=[10_000, 100_000], help="sine network K")
    parser.add_argument("--problems", nargs="*", default=["lqr", "vanderpol"], help="reference problems (K = 1)")
    parser.add_argument("--side-effect", action=argparse.BooleanOptionalAction, default=True,
                        help="also the toy problem whose f has a Python side effect")
    parser.add_argument("--rho", type=float, default=0.25)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--decompose-bmm", action="store_true", help="also inductor with decomposed bmm")
    parser.add_argument("--block-elements", type=int, default=None,
                        help="elements per block of the compiled variants (default: IntervalHamiltonian's, 2^17)")
    parser.add_argument("--variants", nargs="*", default=None,
                        help="only these variants (and autograd); default: all but aot_eager")
    parser.add_argument("--warm-cache", action="store_true", help="inductor's usual cache directory (else a fresh one)")
    parser.add_argument("--name", default="func_objective", help="JSON file name (without .json)")
    args = harness.parse(parser, argv, quick=dict(samples=[40], problems=["lqr"], rounds=1,
                                                   variants=["func eager", "aot_eager"]))
    args.argv = sys.argv[1:] if argv is None else list(argv)
    harness.pin_threads(1)
    from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir

    with tempfile.TemporaryDirectory(prefix="inductor-cold-") as cold, \
            contextlib.nullcontext() if args.warm_cache else temporary_cache_dir(cold):
        return run(args)


def run(args) -> int:
    cases = []
    for K in args.samples:
        problem, _ = sine(K, reg=0.001)
        cases.append((f"sine K={K}", problem, sine_initial_controls("good", 20), 20, (1e-6, 1e-8)))
    named = {**REFERENCE_PROBLEMS, "side-effect": side_effect_problem}
    for name in args.problems + (["side-effect"] if args.side_effect else []):
        problem, _ = named[name]()
        low, high = problem.controls.bounds(torch.float64, "cpu")
        u = torch.clamp(torch.full((200, problem.control_dim), 0.1, dtype=torch.float64), low, high)
        cases.append((name, problem, u, 200, (1e-9, 1e-11)))
    out = {"machine": harness.machine(inductor_cache="warm" if args.warm_cache else "cold"),
           "argv": args.argv, "rho": args.rho,
           "block_elements": args.block_elements or IntervalHamiltonian.block_elements, "cases": {}}
    for label, problem, u, mesh_size, (rtol, atol) in cases:
        pw, objective = setup(problem, u, mesh_size, args.rho, rtol=rtol, atol=atol)
        rows = measure_case(pw, objective, trial_point(problem, u), args.rounds, args.decompose_bmm,
                            args.block_elements, args.variants)
        blocks = len(objective.blocks())
        if args.block_elements:  # the compiled variants' blocks
            objective.block_elements = args.block_elements
            blocks = f"{blocks} (compiled: {len(objective.blocks())})"
            del objective.block_elements
        out["cases"][label] = {"samples": pw.num_samples, "mesh": mesh_size, "blocks": blocks, "variants": rows}
        print_case(f"{label} (K = {pw.num_samples}, mesh {mesh_size}, {blocks} blocks, "
                   f"rho {args.rho}; medians of {args.rounds} (autograd, variant) pairs)", rows)
    harness.write_json(args.out / f"{args.name}.json", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
