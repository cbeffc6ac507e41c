"""The sine-approximation study of the paper (Sec. 5, Fig. 1a and 1b): E-MSA against SGD, Adagrad, Adam, OCNOpt.

Every method starts from the same initial weights on the same model
(problems/sine.py): the continuous-time network dX/dt = tanh(W_t X + b_t) on
R^5 with controls piecewise constant on 20 intervals (delta = 0.25), solved
by the same adaptive forward sweep. E-MSA is ``pmpsolve.solve(method="emsa")``
with a fixed rho, 10 L-BFGS iterations per maximisation and the reference
code's start perturbation U(-0.005, 0.005); the baselines are torch.optim
steps with gradients back-propagated through that forward sweep
(``pmpsolve.baselines``). OCNOpt (``pmp.nn.OCNOpt``, DDP over the layers, dense
Gauss-Newton blocks of the 30 parameters of each interval, the Gauss-Newton value Hessian of the
squared loss, damping 3) trains the same network
written as 20 layers, each the flow of its interval by fixed-step RK4
(``problems.sine.sine_network``); its train and test losses are evaluated on its
controls with the same adaptive sweep as the others'. Losses are recorded at every
iteration, starting with the initial loss; the test loss is evaluated outside the
timed part.
"""
from __future__ import annotations

import argparse
import math
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional

import torch

import pmpsolve as pmp
from pmpsolve import baselines
from pmpsolve.studies import cli
from pmpsolve.sweep.mesh import make_mesh
from pmpsolve.sweep.pointwise import PointwiseProblem
from pmpsolve.sweep.sweeps import Sweeper

__all__ = ["CONFIGS", "study_settings", "run_study", "main"]

#: Settings of the three sizes. "default" is what ``make reproduce`` runs (< 5 minutes on 2 cores).
CONFIGS = {
    "quick": dict(train=200, test=200, iterations=8),
    "default": dict(train=1000, test=1000, iterations=50),
    "full": dict(train=1000, test=1000, iterations=500),
}
LEARNING_RATES = {"sgd": 0.1, "adagrad": 0.1, "adam": 0.005}  # the reference code's (the torch.optim baselines)
OCNOPT_LR = 1.0  # pmp.nn.OCNOpt's default, the DDP step
OCNOPT_VALUE_HESSIAN = "gauss-newton"  # the loss Hessian propagated back (the outer product: docs/sine.md)
# Levenberg-Marquardt damping of the Gauss-Newton blocks; measured on the --quick data (8 steps, lr 1): 0.3 (the
# default) 22 / 2.8 (good / zero init), 1: 0.76 / 0.73, 3: 0.33 / 0.32, 10: 0.39 / 0.32, 30: 0.80 / 0.71
OCNOPT_DAMPING = 3.0
TUNE_GRID = [1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0]
RHO_GRID = [0.01, 0.1, 1.0, 10.0]
MESH = 20


def _loss_evaluator(problem, dtype, device, rtol, atol):
    """J for controls [20, 30] on ``problem`` with one reusable forward sweeper."""
    pw = PointwiseProblem(problem, dtype, device)
    sweeper = Sweeper(pw, make_mesh(MESH, problem.horizon, dtype, device), rtol=rtol, atol=atol)
    return lambda u: float(sweeper.forward(u.to(dtype=dtype, device=device), samples=False).cost)


def _run_emsa(train, test_loss, init, *, iterations, rho, seed, dtype, device, rtol, atol, progress, quadrature=3,
              group=None):
    record = {"iteration": [], "train_loss": [], "test_loss": [], "wall_time": []}
    excluded = [0.0]

    def callback(rec, u):
        t0 = time.perf_counter()
        record["iteration"].append(rec.iteration)
        record["train_loss"].append(rec.cost)
        record["test_loss"].append(test_loss(u))
        record["wall_time"].append(rec.elapsed - excluded[0])
        excluded[0] += time.perf_counter() - t0

    init_loss = test_loss(init)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        # The reference code's per-layer rho penalises |x_{n+1} - g_n(x_n, theta)|^2 = delta^2 |Xdot - f|^2 on a
        # layer whose Hamiltonian is delta * H: in the continuous scaling that is rho * delta (docs/sine.md).
        sol = pmp.solve(train, method=pmp.EMSA(rho=rho * train.horizon / MESH), mesh=MESH, init=init, dtype=dtype,
                        device=device, callback=callback, progress=progress, process_group=group,
                        ode=pmp.ODE(rtol=rtol, atol=atol),
                        maximiser=pmp.Maximiser(iterations=10, perturb=0.005, seed=seed, quadrature=quadrature),
                        stop=pmp.Stop(max_iter=iterations, tol=0.0))
    cli.check_interrupted(sol)  # a solve stopped by Ctrl-C returns its best controls: not a complete run
    del start
    first = sol.history[0]
    for key, value in (("iteration", 0), ("train_loss", first.cost), ("test_loss", init_loss),
                       ("wall_time", first.elapsed)):
        record[key].insert(0, value)
    return record


def _run_baseline(train, test_loss, init, *, optimizer, lr, iterations, dtype, device, rtol, atol, progress):
    record = {"iteration": [], "train_loss": [], "test_loss": [], "wall_time": []}

    def callback(rec, u):
        record["iteration"].append(rec.iteration)
        record["train_loss"].append(rec.cost)
        record["test_loss"].append(test_loss(u))
        record["wall_time"].append(rec.elapsed)

    result = baselines.train(train, optimizer=optimizer, lr=lr, iterations=iterations, mesh=MESH, init=init,
                             dtype=dtype, device=device, rtol=rtol, atol=atol, callback=callback, progress=progress)
    cli.check_interrupted(result)
    return record


def _run_ocnopt(train, test_loss, init, *, lr, iterations, reg, data, dtype, device, progress, rtol, atol,
                value_hessian=OCNOPT_VALUE_HESSIAN, feedback=True, damping=OCNOPT_DAMPING):
    """``pmp.nn.OCNOpt`` (curvature="exact") on the network as 20 RK4 interval layers, full batch; the losses
    of its controls from the adaptive sweep (``train_loss`` J of the train problem, as the others record)."""
    from problems.sine import network_controls, sine_network

    from pmpsolve.arguments import progress_bar

    x, y = (t.to(dtype=dtype, device=device) for t in data)
    x0 = x[:, None].expand(-1, 5).contiguous()  # an expanded view makes every Linear call ~10x slower
    model = sine_network(init.to(dtype=dtype, device=device), readout=True)  # predictions [K, 1]
    train_loss = _loss_evaluator(train, dtype, device, rtol, atol)
    loss = "mse" if value_hessian == "gauss-newton" else None
    opt = pmp.nn.OCNOpt(model, lr=lr, curvature="exact", weight_decay=reg, feedback=feedback, damping=damping,
                        value_hessian=value_hessian, loss=loss)
    target = y[:, None]

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x0), target)
        loss.backward()
        return loss

    record = {"iteration": [], "train_loss": [], "test_loss": [], "wall_time": []}
    elapsed = 0.0
    bar = progress_bar(progress, iterations, "sine", "OCNOpt")
    # One thread: its tensors ([K, 5], 30 parameters a layer) are too small to share, and two threads that
    # wait for each other on a busy machine made a step 5-50x slower (measured: 0.5 s against 2-25 s, K = 200).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for it in range(iterations + 1):
            u = network_controls(model)
            record["iteration"].append(it)
            record["train_loss"].append(train_loss(u))
            record["test_loss"].append(test_loss(u))
            record["wall_time"].append(elapsed)
            if it == iterations or not math.isfinite(record["train_loss"][-1]):
                break
            start = time.perf_counter()
            opt.step(closure)
            elapsed += time.perf_counter() - start
            if bar is not None:
                bar.update(1)
    finally:
        torch.set_num_threads(threads)
        if bar is not None:
            bar.close()
    return record


def _tune_lr(train, test_loss, init, optimizer, iterations, *, reg=0.0, data=None, **kw):
    """The paper's coarse grid: the learning rate with the lowest final training loss (non-finite = worst)."""
    best = None
    for lr in TUNE_GRID:
        try:
            if optimizer == "ocnopt":
                rec = _run_ocnopt(train, test_loss, init, lr=lr, iterations=iterations, reg=reg, data=data, **kw)
            else:
                rec = _run_baseline(train, test_loss, init, optimizer=optimizer, lr=lr, iterations=iterations, **kw)
            final = rec["train_loss"][-1]
        except (pmp.SolveError, FloatingPointError, torch.linalg.LinAlgError):
            final = math.inf
        final = final if math.isfinite(final) else math.inf
        if best is None or final < best[1]:
            best = (lr, final)
    return best[0]


def study_settings(*, size: str = "default", iterations: Optional[int] = None,
                   emsa_iterations: Optional[int] = None, seed: int = 0, device=None, rho: float = 1.0,
                   tune: bool = False, reg: float = 0.001, dtype=torch.float64, rtol: float = 1e-6,
                   atol: float = 1e-8, quadrature: int = 3) -> Dict:
    """The settings a results file records under "config"; ``--resume`` loads runs only when they are the same.

    (Which initialisations and methods ran is not a setting: runs are matched by both.)
    """
    config = dict(CONFIGS[size])
    if iterations is not None:
        config["iterations"] = iterations
    config["emsa_iterations"] = config["iterations"] if emsa_iterations is None else emsa_iterations
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    config.update(seed=seed, rho=rho, mesh=MESH, delta=5.0 / MESH, maximiser="L-BFGS, 10 iterations",
                  perturb=0.005, quadrature=quadrature, reg=reg, dtype=str(dtype), device=str(device), rtol=rtol,
                  atol=atol, tuned=tune, size=size, ode_method="dopri5",
                  baseline_gradients="back-propagation through the same adaptive dopri5 forward sweep")
    return config


def run_study(*, size: str = "default", iterations: Optional[int] = None, emsa_iterations: Optional[int] = None,
              seed: int = 0, device=None, rho: float = 1.0, tune: bool = False, reg: float = 0.001,
              dtype=torch.float64, rtol: float = 1e-6, atol: float = 1e-8, progress: bool = True,
              inits=("good", "zero"), methods=("emsa", "sgd", "adagrad", "adam", "ocnopt"), quadrature: int = 3,
              results_path: Optional[Path] = None, previous: Optional[Dict] = None, group=None) -> Dict:
    """Run every method from each initialisation; return the results dictionary (see ``main``).

    ``group``: a torch.distributed process group (``--distributed``): E-MSA solves with each rank
    holding its shard of the training samples (``solve(process_group=...)``, the same controls on
    every rank); the gradient baselines back-propagate through one differentiable sweep, which
    does not take a group, so they run on rank 0 alone on all the samples.

    With ``results_path`` the results are written there (atomically) after every run,
    so a study stopped at any moment keeps its complete runs. ``previous``: results
    of an earlier call with the same settings (``main --resume``); its complete runs
    (and tuned rates) are taken over instead of being run again. Ctrl-C raises
    ``cli.Interrupted`` with the results so far in its ``results`` attribute (saved).
    """
    from problems.sine import sine_data, sine_initial_controls, sine_problem

    started = time.perf_counter()
    config = study_settings(size=size, iterations=iterations, emsa_iterations=emsa_iterations, seed=seed,
                            device=device, rho=rho, tune=tune, reg=reg, dtype=dtype, rtol=rtol, atol=atol,
                            quadrature=quadrature)
    device = torch.device(config["device"])
    delta = 5.0 / MESH
    previous_config = (previous or {}).get("config", {})
    earlier_seconds = float(previous_config.get("total_seconds", 0.0) or 0.0)
    done = {(r["init"], r["method"]): r for r in (previous or {}).get("runs", [])}
    learning_rates = {init: dict(LEARNING_RATES, ocnopt=OCNOPT_LR) for init in inits}
    rhos = {init: rho for init in inits}
    tuned_inits: List[str] = []
    if tune:  # rates tuned before the interruption are kept: tuning them again would give the same values
        for init_kind in previous_config.get("tuned_inits", []):
            if init_kind in learning_rates:
                learning_rates[init_kind].update(previous_config["learning_rates"][init_kind])
                rhos[init_kind] = previous_config["rhos"][init_kind]
                tuned_inits.append(init_kind)
    config.update(learning_rates=learning_rates, rhos=rhos, tuned_inits=tuned_inits)
    runs: List[Dict] = []
    results = {"config": config, "runs": runs}

    def save():
        config["total_seconds"] = earlier_seconds + time.perf_counter() - started
        if results_path is not None:
            cli.write_json(results_path, results)

    loaded = 0
    try:
        train_data = sine_data(config["train"], seed=seed)
        train = sine_problem(*train_data, reg=reg, delta=delta, name="sine-train")
        shard = train
        if group is not None:  # this rank's samples; J stays the mean over all of them (global K)
            import torch.distributed as dist

            rank, world = dist.get_rank(group), dist.get_world_size(group)
            x, y = (t.chunk(world)[rank] for t in sine_data(config["train"], seed=seed))
            shard = sine_problem(x, y, reg=reg, delta=delta, name="sine-train")
        test = sine_problem(*sine_data(config["test"], seed=seed + 1), reg=reg, delta=delta, name="sine-test")
        test_loss = _loss_evaluator(test, dtype, device, rtol, atol)
        common = dict(dtype=dtype, device=device, rtol=rtol, atol=atol, progress=progress)
        for init_kind in inits:
            init = sine_initial_controls(init_kind, MESH, seed=seed, dtype=dtype).to(device)
            missing = [m for m in methods if (init_kind, m) not in done]
            if tune and missing and init_kind not in tuned_inits:
                short = max(5, config["iterations"] // 5)
                for opt in ("sgd", "adagrad", "adam", "ocnopt"):
                    if opt in methods:
                        learning_rates[init_kind][opt] = _tune_lr(train, test_loss, init, opt, short, reg=reg,
                                                                  data=train_data, **common)
                rhos[init_kind] = min(RHO_GRID, key=lambda r: _run_emsa(
                    shard, test_loss, init, iterations=max(3, config["emsa_iterations"] // 5), rho=r, seed=seed,
                    **common)["train_loss"][-1])
                tuned_inits.append(init_kind)
                save()
            for method in methods:
                setting = {"rho": rhos[init_kind]} if method == "emsa" else {"lr": learning_rates[init_kind][method]}
                if method == "ocnopt":  # runs of another OCNOpt form are not taken over by --resume
                    setting.update(value_hessian=OCNOPT_VALUE_HESSIAN, damping=OCNOPT_DAMPING)
                earlier = done.get((init_kind, method))
                if earlier is not None and all(earlier.get(k) == v for k, v in setting.items()):
                    runs.append(earlier)
                    loaded += 1
                    continue
                start = time.perf_counter()
                if method == "emsa":
                    rec = _run_emsa(shard, test_loss, init, iterations=config["emsa_iterations"],
                                    rho=rhos[init_kind], seed=seed, quadrature=quadrature, group=group, **common)
                elif group is not None and dist.get_rank(group) != 0:
                    continue  # the baselines run on rank 0 (see the docstring)
                elif method == "ocnopt":
                    rec = _run_ocnopt(train, test_loss, init, lr=setting["lr"], iterations=config["iterations"],
                                      reg=reg, data=train_data, value_hessian=setting["value_hessian"],
                                      damping=setting["damping"], **common)
                else:
                    rec = _run_baseline(train, test_loss, init, optimizer=method, lr=setting["lr"],
                                        iterations=config["iterations"], **common)
                runs.append(dict(method=method, init=init_kind, **setting, **rec,
                                 total_seconds=time.perf_counter() - start))
                save()
    except (KeyboardInterrupt, cli.Interrupted):
        if runs:
            save()
        raise cli.interruption(results, loaded=loaded) from None
    save()
    results["loaded_runs"] = loaded
    return results


TABLE_ITERATIONS = (0, 1, 5, 10, 20, 50)


def format_table(results: Dict) -> str:
    lines = []
    head = (f"{'init':5s} {'method':8s} {'setting':12s} " + " ".join(f"{'it ' + str(i):>9s}" for i in TABLE_ITERATIONS)
            + f" {'last':>16s} {'time[s]':>8s} {'test(last)':>10s}")
    lines += [head, "-" * len(head)]
    for run in results["runs"]:
        setting = f"rho={run['rho']:g}" if "rho" in run else f"lr={run['lr']:g}"
        cells = []
        for i in TABLE_ITERATIONS:
            cells.append(f"{run['train_loss'][i]:9.4g}" if i < len(run["train_loss"]) else f"{'-':>9s}")
        last = f"{run['train_loss'][-1]:.4g} @{run['iteration'][-1]}"
        lines.append(f"{run['init']:5s} {run['method']:8s} {setting:12s} " + " ".join(cells)
                     + f" {last:>16s} {run['wall_time'][-1]:8.1f} {run['test_loss'][-1]:10.4g}")
    return "\n".join(lines)


def plot(results: Dict, out: Path) -> List[Path]:
    """Train and test loss against iteration and against wall-clock time, one figure per initialisation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for init in dict.fromkeys(r["init"] for r in results["runs"]):
        runs = [r for r in results["runs"] if r["init"] == init]
        for xkey, xlabel, name in (("iteration", "iteration", "iterations"), ("wall_time", "wall-clock time [s]", "time")):
            fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
            for ax, key, title in ((axes[0], "train_loss", "train"), (axes[1], "test_loss", "test")):
                for i, run in enumerate(runs):
                    label = {"emsa": "E-MSA", "sgd": "SGD", "adagrad": "Adagrad", "adam": "Adam",
                             "ocnopt": "OCNOpt"}.get(run["method"], run["method"])
                    label += f" (rho={run['rho']:g})" if "rho" in run else f" (lr={run['lr']:g})"
                    ax.plot(run[xkey], run[key], color=f"C{i}", label=label, marker="o" if run["method"] == "emsa"
                            else None, markersize=3)
                ax.set_yscale("log")
                ax.set_xlabel(xlabel)
                ax.set_title(f"{title} loss, {init} initialisation")
                ax.grid(alpha=0.3, which="both")
            axes[0].set_ylabel("loss (mean squared error)")
            axes[0].legend(fontsize="small")
            fig.tight_layout()
            path = out / f"sine_{init}_{name}.png"
            fig.savefig(path, dpi=120)
            plt.close(fig)
            paths.append(path)
    return paths


def main(argv=None) -> Dict:
    parser = argparse.ArgumentParser(prog="python -m pmpsolve reproduce sine", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=cli.writable_dir, default="results/sine",
                        help="output folder (results/sine)")
    parser.add_argument("--iterations", type=cli.positive_int, default=None,
                        help="iterations of every method (default 50; --quick 8, --full 500)")
    parser.add_argument("--emsa-iterations", type=cli.positive_int, default=None,
                        help="iterations of E-MSA (default: --iterations)")
    parser.add_argument("--seed", type=cli.nonnegative_int, default=0)
    parser.add_argument("--device", type=cli.device, default=None,
                        help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--rho", type=cli.nonnegative_float, default=1.0,
                        help="E-MSA rho in the reference code's per-layer convention (default 1.0); "
                             "pmpsolve.solve gets rho * delta")
    parser.add_argument("--reg", type=cli.nonnegative_float, default=0.001,
                        help="L2 weight per layer, reg |theta_n|^2 / 2 (the reference code's 0.001; 0: off)")
    parser.add_argument("--quadrature", type=cli.int_range(1, 10), default=3,
                        help="Gauss points per interval for E-MSA's interval Hamiltonian, 1 to 10 (default 3; "
                             "1, the midpoint rule, makes each maximisation ~3x cheaper, docs/benchmarks.md)")
    parser.add_argument("--tune", action="store_true", help="pick learning rates and rho on a coarse log grid")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_const", dest="size", const="quick", help="a smoke-test size")
    size.add_argument("--full", action="store_const", dest="size", const="full", help="the paper's size")
    parser.add_argument("--distributed", action="store_true",
                        help="data-parallel E-MSA under torchrun (torchrun --nproc_per_node=2 -m pmpsolve reproduce "
                             "sine --distributed): each rank holds its shard of the training samples; the "
                             "baselines run on rank 0 (docs/distributed.md)")
    parser.add_argument("--no-progress", action="store_true")
    cli.add_resume_option(parser)
    args = parser.parse_args(argv)
    group, rank = None, 0
    if args.distributed:
        if args.resume or args.tune:
            parser.error("--resume and --tune are not supported with --distributed")
        group, rank, _, cuda = cli.init_distributed()
        if cuda is not None and args.device is None:
            args.device = cuda
    options = dict(size=args.size or "default", iterations=args.iterations, emsa_iterations=args.emsa_iterations,
                   seed=args.seed, device=args.device, rho=args.rho, tune=args.tune, reg=args.reg,
                   quadrature=args.quadrature)
    path = args.out / "results.json"
    previous = cli.load_previous(parser, path, study_settings(**options), key="config") if args.resume else None
    if rank != 0:  # the other ranks take part in E-MSA's solves; rank 0 reports and writes
        run_study(progress=False, results_path=None, group=group, **options)
        return {}
    return cli.run_and_report(
        "sine", argv, path, args.out,
        lambda: run_study(progress=not args.no_progress, results_path=path, previous=previous, group=group,
                          **options),
        lambda results, out: (plot(results, out), format_table(results)))


if __name__ == "__main__":
    main()
