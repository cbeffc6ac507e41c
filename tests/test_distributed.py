"""Data-parallel solves on torch.distributed (docs/distributed.md): 2 gloo processes on the CPU.

One spawn of 2 ranks runs every scenario (start-up costs ~7 s, paid once); each rank holds its
shard of the LQR-samples x0 (9 samples split 5 / 4) and the one-process reference solves the
concatenated x0 in the test process. Checked: every iteration's J, the cost and the controls
equal the reference, the ranks return bit-identical controls, and an error on one rank reaches
both ranks as the same error type well within the group's timeout.

The same spawn trains a small residual network (tests/test_nn.py's small_net, float64) with
``pmp.nn.EMSA(..., process_group=...)``: each rank's closure is the mean loss of its shard of
one batch (96 two-moons points split 40 / 56; or mini-batches of a DistributedSampler), and the
one-process reference trains on the concatenated batch. Checked: parameters after several steps
equal the reference up to the round-off that reordering the batch shows, the ranks' parameters are
bit-identical, and an exception in one rank's
closure reaches both ranks.
"""
import datetime
import pickle
import socket
import time
import traceback
import warnings

import pytest
import torch

import pmpsolve as pmp
from problems import lqr_samples
from test_nn import data as moons
from test_nn import small_net

try:
    import torch.distributed as dist

    GLOO = dist.is_available() and dist.is_gloo_available()
except ImportError:  # pragma: no cover - builds without torch.distributed
    GLOO = False

pytestmark = pytest.mark.skipif(not GLOO, reason="torch.distributed with the gloo backend is not available in this "
                                                 "PyTorch build")

WORLD = 2
SAMPLES = 9  # an uneven split: 5 and 4
TIMEOUT = 30  # seconds: the process group's collective timeout (a hang would end in its RuntimeError)
RK4 = dict(mesh=20, stop=pmp.Stop(max_iter=6, tol=0.0), ode=pmp.ODE("rk4", options={"step_size": 0.05}))
SCENARIOS = {
    # fixed steps: each sample's arithmetic is the same in one or two processes, only the sums' order differs
    "emsa rk4": (lambda: lqr_samples(SAMPLES)[0], RK4),
    # adaptive steps: each rank controls the error of its own samples (docs/distributed.md), tight tolerances
    "emsa dopri5": (lambda: lqr_samples(SAMPLES)[0],
                    dict(mesh=20, stop=pmp.Stop(max_iter=6, tol=0.0), ode=pmp.ODE(rtol=1e-12, atol=1e-14))),
    # a box and an L1 cost: proximal gradient (value_and_grad), the penalty counted once
    "box l1": (lambda: _box_l1(), dict(RK4, stop=pmp.Stop(max_iter=5, tol=0.0))),
}


NET_STEPS = 4
NET_SPLIT = 40  # rank 0 holds points [0, 40), rank 1 [40, 96): an uneven split of one batch of 96
NET_SCENARIOS = {
    "fixed rho": dict(rho=0.05, perturb=0.005),
    # the adaptive rule: its residual layers on the Kronecker-factored preconditioner, its Linear entries in
    # closed form (both from sums totalled over the ranks), and with L-BFGS on every layer
    "adaptive rho": dict(weight_decay=1e-3),
    "adaptive rho, all L-BFGS": dict(weight_decay=1e-3, closed_form=False),
    "fixed rho, weight decay (closed form)": dict(rho=0.05, weight_decay=1e-3, perturb=0.005),
    "sqh": dict(method="sqh", weight_decay=1e-3),
    # adam_lr: every parameter is free here, so the step is Adam on the all-reduced gradient
    "adam_lr": dict(rho=0.05, adam_lr=1e-2),
}
# Two ranks are not bit-identical to one process: one process sums the batch in one order, two ranks sum
# their shards and then add the two sums (gloo), so every Hamiltonian value and gradient differs in the last
# bits, and the steps' L-BFGS (10 iterations of a nearly flat objective, then the next step's data) amplify
# that by a factor that depends on the machine's kernels (1e-9 here, 1.7e-8 measured on another machine after
# 8 steps). What the comparison can promise is what a reordering of the same batch in one process shows: the
# same round-off through the same amplification. So the distributed parameters must lie within ROUNDOFF_FACTOR
# times the largest spread of one-process runs on reordered batches (measured: 0.9-2x of it on the scenarios
# below), never a fixed number; a real error (a wrong shard weight B_r / B) moves them by 1e-2.
ROUNDOFF_FACTOR = 20
ROUNDOFF_FLOOR = 1e-14  # below a few ulps of O(1) parameters a spread is no measure of the amplification
BINARY = {"2.module.0.weight": pmp.Finite([-1.0, 1.0], scale=None)}  # a binary-weight residual layer (Li & Hao)


def _train_net(x, y, group, steps=NET_STEPS, batches=None, **options):
    """small_net's parameters after ``steps`` E-MSA steps on (x, y) (or one step per (x, y) in ``batches``)."""
    model = small_net()
    kind = {"emsa": pmp.nn.EMSA, "sqh": pmp.nn.SQH, "msa": pmp.nn.MSA}[options.pop("method", "emsa")]
    opt = kind(model, process_group=group, **options)
    for xb, yb in batches if batches is not None else [(x, y)] * steps:
        def closure(xb=xb, yb=yb):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(xb), yb)
            loss.backward()
            return loss
        opt.step(closure)
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _reordered(batches, split: int):
    """The same (x, y) batches in two other orders: the second shard's points (from ``split`` on) first, and
    reversed."""
    swapped = [(torch.cat([x[split:], x[:split]]), torch.cat([y[split:], y[:split]])) for x, y in batches]
    return [swapped, [(x.flip(0), y.flip(0)) for x, y in batches]]


def _within_roundoff(two: torch.Tensor, batches, split: int = NET_SPLIT, **options) -> None:
    """Assert the ranks' parameters equal one process's on ``batches`` up to reduction-order round-off, as
    measured by reordering the batches in one process (see ROUNDOFF_FACTOR)."""
    one = _train_net(None, None, None, batches=batches, **options)
    spread = max(float((_train_net(None, None, None, batches=b, **options) - one).abs().max())
                 for b in _reordered(batches, split))
    difference = float((two - one).abs().max())
    bound = max(ROUNDOFF_FACTOR * spread, ROUNDOFF_FLOOR)
    assert difference <= bound, (f"2 ranks differ from 1 process by {difference:.3g}; reordering the batch in one "
                                 f"process moves the parameters by {spread:.3g} (bound {bound:.3g})")
    assert (one - _train_net(None, None, None, batches=[])).abs().max() > 1e-2  # the steps moved them


def _sampler_batches(rank: int, world: int, epochs: int = 2, batch: int = 24):
    """Rank ``rank``'s mini-batches of 2 epochs of a shuffling DistributedSampler over the 96 points."""
    from torch.utils.data import DataLoader, TensorDataset
    from torch.utils.data.distributed import DistributedSampler

    dataset = TensorDataset(*moons(96))
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=0)
    loader = DataLoader(dataset, batch_size=batch, sampler=sampler)
    out = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        out.extend(loader)
    return out


def _network_results(rank: int, world: int, group) -> dict:
    x, y = moons(96)
    part = slice(0, NET_SPLIT) if rank == 0 else slice(NET_SPLIT, None)
    results = {name: _train_net(x[part], y[part], group, **options) for name, options in NET_SCENARIOS.items()}
    results["binary"] = _train_net(x[part], y[part], group, rho=0.05, perturb=0.005, controls=BINARY)
    results["sampler"] = _train_net(None, None, group, batches=_sampler_batches(rank, world), rho=0.05, perturb=0.005)
    model = small_net()
    opt = pmp.nn.EMSA(model, process_group=group)

    def failing():  # rank 1's closure raises: both ranks must raise it, neither wait for the other
        if rank == 1:
            raise RankOneError("closure refused on rank 1")
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x[part]), y[part])
        loss.backward()
        return loss

    start = time.perf_counter()
    try:
        opt.step(failing)
        results["closure error"] = ("no error", "", time.perf_counter() - start)
    except Exception as err:  # noqa: BLE001 - which error reached this rank
        results["closure error"] = (type(err).__name__, str(err), time.perf_counter() - start)
    return results


class RankOneError(Exception):
    """A user's exception, raised on rank 1 only."""


def _box_l1() -> pmp.ControlProblem:
    p = lqr_samples(SAMPLES)[0]
    return pmp.ControlProblem(p.dynamics, p.x0, p.horizon, pmp.Box(-0.3, 0.3), p.terminal_cost, p.running_cost,
                              control_penalty=pmp.L1(0.05), name="lqr box l1")


def shard(problem: pmp.ControlProblem, rank: int, world: int, **changes) -> pmp.ControlProblem:
    """This rank's part of the samples of ``problem`` (x0 rows split as torch.chunk does)."""
    p = dict(dynamics=problem.dynamics, x0=problem.x0.chunk(world)[rank], horizon=problem.horizon,
             controls=problem.controls, terminal_cost=problem.terminal_cost, running_cost=problem.running_cost,
             control_penalty=problem.control_penalty, name=problem.name)
    p.update(changes)
    return pmp.ControlProblem(**p)


def _error_scenarios(rank: int, group):
    """name -> a call that must raise the same error on both ranks (each fails on rank 1 only)."""
    base = lqr_samples(SAMPLES)[0]

    def nan_dynamics(t, x, u):  # rank 1's states stop being finite after t = 2.5: NonFiniteError in a sweep
        f = base.dynamics(t, x, u)
        return torch.where(t > 2.5, f * float("nan"), f) if rank == 1 else f

    def raising_terminal(x):  # rank 1 raises where the co-state sweep differentiates Phi
        if rank == 1 and torch.is_grad_enabled() and x.requires_grad:
            raise RankOneError("terminal cost refused on rank 1")
        return 0.0 * x.sum(-1)

    def objective_failure():  # an exception inside an objective evaluation (optimality, maximisation) on rank 1
        from pmpsolve.update.hamiltonian import IntervalHamiltonian

        smooth = IntervalHamiltonian.smooth

        def failing(self, u):
            if rank == 1:
                raise ValueError("smooth refused on rank 1")
            return smooth(self, u)

        IntervalHamiltonian.smooth = failing
        try:
            pmp.solve(shard(base, rank, WORLD), process_group=group, **RK4)
        finally:
            IntervalHamiltonian.smooth = smooth

    return {
        "non-finite sweep": lambda: pmp.solve(shard(base, rank, WORLD, dynamics=nan_dynamics), process_group=group,
                                              **RK4),
        "exception in the co-state sweep": lambda: pmp.solve(
            shard(base, rank, WORLD, terminal_cost=raising_terminal), process_group=group, **RK4),
        "exception in the interval objective": objective_failure,
        "different meshes": lambda: pmp.solve(shard(base, rank, WORLD), process_group=group,
                                              **dict(RK4, mesh=20 + rank)),
    }


def _worker(rank: int, world: int, port: int, queue) -> None:
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=TIMEOUT))
        group, results = dist.group.WORLD, {}
        for name, (make, kw) in SCENARIOS.items():
            sol = pmp.solve(shard(make(), rank, world), process_group=group, **kw)
            results[name] = dict(controls=sol.controls, costs=[r.cost for r in sol.history], cost=sol.cost,
                                 status=sol.status, distributed=sol.settings["distributed"])
        u = torch.linspace(-0.5, 0.5, 20, dtype=torch.float64)[:, None]
        results["cost_gradient"] = pmp.cost_gradient(shard(lqr_samples(SAMPLES)[0], rank, world), u,
                                                     process_group=group)
        for name, call in _error_scenarios(rank, group).items():
            start = time.perf_counter()
            try:
                call()
                results[name] = ("no error", "", time.perf_counter() - start)
            except Exception as err:  # noqa: BLE001 - the point: which error reached this rank
                results[name] = (type(err).__name__, str(err), time.perf_counter() - start)
        results["networks"] = _network_results(rank, world, group)
        dist.destroy_process_group()
        # plain pickle: the tensors travel as bytes, not as shared memory the exiting worker would take along
        queue.put((rank, pickle.dumps(results)))
    except BaseException:  # noqa: BLE001 - report it to the test instead of dying silently
        queue.put((rank, traceback.format_exc()))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks():
    """Per rank (index = rank): the results of every scenario of one 2-process run."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    processes = [ctx.Process(target=_worker, args=(r, WORLD, port, queue), daemon=True) for r in range(WORLD)]
    for p in processes:
        p.start()
    try:
        got = dict(queue.get(timeout=240) for _ in range(WORLD))
    finally:
        for p in processes:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    for rank, result in got.items():
        assert isinstance(result, bytes), f"rank {rank} failed:\n{result}"
    return [pickle.loads(got[r]) for r in range(WORLD)]


@pytest.fixture(scope="module")
def references():
    """The one-process solves of the concatenated x0, and of the same samples in reversed order."""
    with warnings.catch_warnings():  # tol = 0: "did not converge" is expected
        warnings.simplefilter("ignore", RuntimeWarning)
        return {name: (pmp.solve(make(), **kw), pmp.solve(_reversed_samples(make()), **kw))
                for name, (make, kw) in SCENARIOS.items()}


def _reversed_samples(problem: pmp.ControlProblem) -> pmp.ControlProblem:
    return pmp.ControlProblem(problem.dynamics, problem.x0.flip(0), problem.horizon, problem.controls,
                              problem.terminal_cost, problem.running_cost, control_penalty=problem.control_penalty,
                              name=problem.name)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_two_ranks_equal_one_process(ranks, references, name):
    ref, reordered = references[name]
    if "dopri5" in name:
        # adaptive steps: each rank controls the error of its own samples, so the ranks take other steps than
        # one process; the difference is the ODE tolerance (rtol 1e-12) through 6 iterations (measured 1e-12)
        tol_cost = tol_controls = 1e-9
    else:
        # fixed steps: only the order of the sums over samples differs, so the ranks may differ from one
        # process as much as the same samples in another order do (ROUNDOFF_FACTOR: see the networks' scenarios)
        spread_cost = max(abs(a.cost - b.cost) for a, b in zip(reordered.history, ref.history))
        spread_controls = float((reordered.controls - ref.controls).abs().max())
        tol_cost = max(ROUNDOFF_FACTOR * spread_cost, 1e-13)
        tol_controls = max(ROUNDOFF_FACTOR * spread_controls, 1e-13)
    for result in (r[name] for r in ranks):
        assert len(result["costs"]) == len(ref.history) >= 4  # several iterations, the same number
        for k, (a, b) in enumerate(zip(result["costs"], [r.cost for r in ref.history])):
            assert abs(a - b) <= tol_cost * max(1.0, abs(b)), f"iteration {k}: J = {a!r} on 2 ranks, {b!r} in one process"
        assert abs(result["cost"] - ref.cost) <= tol_cost * max(1.0, abs(ref.cost))
        assert torch.allclose(result["controls"], ref.controls, rtol=0, atol=tol_controls)
        assert result["status"] == ref.status
        info = result["distributed"]
        assert (info["ranks"], info["samples"]) == (WORLD, SAMPLES) and info["all_reduces"] > 0
    # every rank returns the same controls, bit for bit, and saw the same J at every iteration
    assert torch.equal(ranks[0][name]["controls"], ranks[1][name]["controls"])
    assert ranks[0][name]["costs"] == ranks[1][name]["costs"]
    assert [r[name]["distributed"]["local_samples"] for r in ranks] == [5, 4]


def test_cost_gradient_over_ranks(ranks):
    u = torch.linspace(-0.5, 0.5, 20, dtype=torch.float64)[:, None]
    J, grad = pmp.cost_gradient(lqr_samples(SAMPLES)[0], u)
    # adaptive steps at the default rtol 1e-9, chosen per rank: J and its gradient agree to the ODE tolerance
    # (measured 1e-11 relative for J, 3e-10 for the gradient), not to round-off
    for result in ranks:
        J_r, grad_r = result["cost_gradient"]
        assert abs(J_r - J) <= 1e-9 * abs(J)
        assert torch.allclose(grad_r, grad, rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("name, error", [("non-finite sweep", "NonFiniteError"),
                                         ("exception in the co-state sweep", "RankOneError"),
                                         ("exception in the interval objective", "ValueError"),
                                         ("different meshes", "ValueError")])
def test_an_error_on_one_rank_reaches_every_rank(ranks, name, error):
    outcomes = [r[name] for r in ranks]
    for rank, (kind, message, seconds) in enumerate(outcomes):
        assert kind == error, f"rank {rank}: {kind}: {message}"
        assert seconds < TIMEOUT / 2, f"rank {rank} took {seconds:.1f} s: it waited for a collective"
    assert outcomes[0][1] == outcomes[1][1]  # the same error, message included
    if name == "different meshes":
        assert "disagree on the mesh intervals N" in outcomes[0][1]


def test_process_group_without_init_is_a_clear_error():
    if dist.is_initialized():  # pragma: no cover - the suite never initialises one in this process
        pytest.skip("a process group is initialised in this process")
    with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
        pmp.solve(lqr_samples(4)[0], mesh=4, process_group=object(), stop=pmp.Stop(max_iter=1))


# -- networks: pmp.nn.EMSA(process_group=...) ----------------------------------------------------------


@pytest.mark.parametrize("name", list(NET_SCENARIOS))
def test_network_two_ranks_equal_one_process(ranks, name):
    two = [r["networks"][name] for r in ranks]
    assert torch.equal(two[0], two[1])  # every rank holds the same parameters, bit for bit
    _within_roundoff(two[0], [moons(96)] * NET_STEPS, **NET_SCENARIOS[name])


def test_network_binary_weights_ranks_identical(ranks):
    """A pmp.Finite layer (binary weights, the moving average of dH/dW all-reduced): equal to one process up
    to round-off (measured 1.3e-9, with a reordering spread of 1.3e-9). With perturb = 0 the continuous layers' L-BFGS starts exactly at theta^k and
    takes another branch on a rounding difference at step 2 (1e-2; docs/distributed.md)."""
    two = [r["networks"]["binary"] for r in ranks]
    assert torch.equal(two[0], two[1])
    binary = small_net()[2].module[0].weight.numel()
    start = sum(p.numel() for p in list(small_net().parameters())[:2])
    assert set(two[0][start:start + binary].tolist()) <= {-1.0, 1.0}  # the binary layer's weights are in the set
    _within_roundoff(two[0], [moons(96)] * NET_STEPS, rho=0.05, perturb=0.005, controls=BINARY)


def test_network_distributed_sampler(ranks):
    """Each rank steps on its DistributedSampler mini-batch (8 steps); one process on the union of both
    ranks' batches, equal up to round-off (measured 1.9e-9 against a reordering spread of 2.8e-9)."""
    two = [r["networks"]["sampler"] for r in ranks]
    assert torch.equal(two[0], two[1])
    parts = [_sampler_batches(r, WORLD) for r in range(WORLD)]
    union = [(torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]])) for a, b in zip(*parts)]
    _within_roundoff(two[0], union, split=len(parts[0][0][0]), rho=0.05, perturb=0.005)


def test_network_closure_error_reaches_every_rank(ranks):
    outcomes = [r["networks"]["closure error"] for r in ranks]
    for rank, (kind, message, seconds) in enumerate(outcomes):
        assert kind == "RankOneError", f"rank {rank}: {kind}: {message}"
        assert seconds < TIMEOUT / 2
    assert outcomes[0][1] == outcomes[1][1] == "closure refused on rank 1"
