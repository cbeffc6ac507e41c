"""Methods and options as objects: each checks itself; objects, names and the deprecated flat keywords
give bit-identical solves; the memory of an iteration is estimated and checked before the first sweep."""
import dataclasses
import inspect
import pathlib
import subprocess
import sys
import warnings

import pytest
import torch

import pmpsolve as pmp
import pmpsolve.sweep.memory as memory
from pmpsolve.update.rules import RULES
from problems import REFERENCE_PROBLEMS, catalyst_mixing


def lqr():
    return REFERENCE_PROBLEMS["lqr"]()[0]


def same(a, b):
    return (a.cost == b.cost and a.iterations == b.iterations and torch.equal(a.controls, b.controls)
            and [r.cost for r in a.history] == [r.cost for r in b.history])


@pytest.mark.parametrize("make, error, message", [
    (lambda: pmp.EMSA(rho=-1.0), ValueError, r"pmp.EMSA: `rho` must be a finite number >= 0 or None \(adaptive\), got -1.0"),
    (lambda: pmp.EMSA(rho=float("inf")), ValueError, r"pmp.EMSA: `rho` must be a finite number >= 0 or None \(adaptive\), got inf"),
    (lambda: pmp.EMSA(rho="big"), TypeError, r"pmp.EMSA: `rho` must be a number or None, got 'big'"),
    (lambda: pmp.EMSA(shrink=2.0), ValueError, r"0 < shrink <= 1 <= grow, got shrink=2.0"),
    (lambda: pmp.EMSA(rho_min=1.0, rho_max=0.5), ValueError, r"rho_min <= rho_max"),
    (lambda: pmp.EMSA(anderson=2.5), ValueError, r"'anderson' must be an int >= 0 \(0: off\), got 2.5"),
    (lambda: pmp.EMSA(anderson_reset="sometimes"), ValueError, r"'anderson_reset' must be 'rho', 'grow' or 'never'"),
    (lambda: pmp.EMSA(floor_decay=2.0), ValueError, r"'floor_decay' must be None or in \(0, 1\], got 2.0"),
    (lambda: pmp.SQH(eps0=0.0), ValueError, r"pmp.SQH: sqh option 'eps0' must be > 0, got 0.0"),
    (lambda: pmp.SQH(zeta=0.9, sigma=0.5), ValueError, r"0 < zeta <= 1 < sigma, got zeta=0.9, sigma=0.5"),
    (lambda: pmp.SQH(kappa=-1.0), ValueError, r"'eta' and 'kappa' must be >= 0"),
    (lambda: pmp.Gradient(lr=0.0), ValueError, r"pmp.Gradient: gradient option 'lr' must be a finite number > 0, got 0.0"),
    (lambda: pmp.Gradient(adaptive="yes"), TypeError, r"`adaptive` must be True or False, got 'yes'"),
    (lambda: pmp.MSA(rho=1.0), TypeError, r"unexpected keyword argument 'rho'"),
    (lambda: pmp.Rule("newton"), ValueError, r"unknown `method` 'newton'; choose one of \['ddp', 'emsa'"),
    (lambda: pmp.Rule("gradient", stepsize=0.1), ValueError, r"unknown option\(s\) \['stepsize'\].*lr"),
    (lambda: pmp.ODE("rk45"), ValueError, r"pmp.ODE: unknown `method` 'rk45'; choose a torchdiffeq method"),
    (lambda: pmp.ODE(rtol=0.0), ValueError, r"`rtol` and `atol` must be > 0 or None \(by dtype\), got rtol=0.0"),
    (lambda: pmp.ODE(options=[("step_size", 0.1)]), TypeError, r"`options` must be a dict"),
    (lambda: pmp.Maximiser(kind="newton"), ValueError, r"unknown maximiser `kind` 'newton'; choose one of 'auto'"),
    (lambda: pmp.Maximiser(iterations=0), ValueError, r"`iterations` must be an int >= 1, got 0"),
    (lambda: pmp.Maximiser(perturb=-0.1), ValueError, r"`perturb` must be >= 0 \(a half-width\), got -0.1"),
    (lambda: pmp.Maximiser(seed=1.5), TypeError, r"`seed` must be an int or None, got 1.5"),
    (lambda: pmp.Maximiser(quadrature=11), ValueError, r"`quadrature` must be an int from 1 to 10"),
    (lambda: pmp.Stop(max_iter=-1), ValueError, r"pmp.Stop: `max_iter` must be an int >= 0, got -1"),
    (lambda: pmp.Stop(tol=-1e-3), ValueError, r"`tol` must be a number >= 0, got -0.001"),
    (lambda: pmp.Stop(stall_tol="small"), ValueError, r"`stall_tol` must be a number >= 0, got 'small'"),
])
def test_objects_check_themselves_on_construction(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_objects_are_frozen_and_know_their_rules():
    for name, method in (("emsa", pmp.EMSA()), ("msa", pmp.MSA()), ("sqh", pmp.SQH()), ("gradient", pmp.Gradient())):
        assert method.name == name and method.rule is RULES[name]
        # the rule's defaults are the object's fields: every option and its default is written once
        assert method.rule.defaults == method.options() == type(method).defaults()
    assert pmp.Rule("sqh", eps0=2.0).rule is RULES["sqh"] and pmp.Rule("sqh", eps0=2.0).options() == {"eps0": 2.0}
    for record in (pmp.EMSA(), pmp.ODE(), pmp.Maximiser(), pmp.Stop(), pmp.Rule("msa")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            record.rho = 1.0


def test_solve_has_one_signature_with_at_most_12_parameters():
    parameters = inspect.signature(pmp.solve).parameters
    assert len(parameters) <= 12
    assert not any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    assert list(parameters)[:2] == ["problem", "method"]
    assert set(inspect.signature(pmp.Solver).parameters) < set(parameters)


def test_unknown_keywords_are_refused_with_their_home():
    problem = lqr()
    with pytest.raises(TypeError, match="solve\\(\\) got an unexpected keyword argument 'learning_rate'$"):
        pmp.solve(problem, learning_rate=0.1)
    with pytest.raises(TypeError, match=r"'eps0'; it is set as method=pmp.SQH\(eps0=...\)"):
        pmp.solve(problem, eps0=0.1)
    with pytest.raises(TypeError, match=r"'kind'; it is set as maximiser=pmp.Maximiser\(kind=...\)"):
        pmp.solve(problem, kind="lbfgs")
    with pytest.raises(TypeError, match=r"Solver\(\) got an unexpected keyword argument 'init'"):
        pmp.Solver(problem, init=0.0)
    with pytest.raises(TypeError, match=r"`stop` must be a pmp.Stop\(...\) or None, got 5"):
        pmp.solve(problem, stop=5)
    with pytest.raises(TypeError, match=r"`method` must be a method object such as pmp.EMSA\(\)"):
        pmp.solve(problem, method=pmp.ODE())


def test_objects_names_and_old_keywords_give_the_same_solve():
    problem = lqr()
    cases = [
        (dict(method=pmp.EMSA(), mesh=20), dict(method="emsa", mesh=20), dict(mesh=20, max_iter=200)),
        (dict(method=pmp.EMSA(rho=20.0), mesh=20, stop=pmp.Stop(max_iter=4)), None,
         dict(rho=20.0, mesh=20, max_iter=4)),
        (dict(method=pmp.SQH(eps0=3.0), mesh=20, maximiser=pmp.Maximiser(kind="lbfgs", perturb=0.01, seed=3),
              stop=pmp.Stop(max_iter=5, tol=0.0)), None,
         dict(method="sqh", options={"eps0": 3.0}, mesh=20, maximiser="lbfgs", perturb=0.01, seed=3, max_iter=5,
              tol=0.0)),
        (dict(method=pmp.Gradient(lr=0.1, adaptive=False), mesh=20, stop=pmp.Stop(max_iter=3),
              ode=pmp.ODE("rk4", options={"step_size": 0.05})), None,
         dict(method="gradient", options={"lr": 0.1, "adaptive": False}, mesh=20, max_iter=3, ode_method="rk4",
              ode_options={"step_size": 0.05})),
        (dict(method=pmp.MSA(), mesh=20, stop=pmp.Stop(max_iter=1)),
         dict(method="msa", mesh=20, stop=pmp.Stop(max_iter=1)), dict(method="msa", mesh=20, max_iter=1)),
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # max_iter reached
        for objects, names, old in cases:
            reference = pmp.solve(problem, **objects)
            if names is not None:
                assert same(reference, pmp.solve(problem, **names))
            with pytest.warns(DeprecationWarning, match="deprecated and will be removed in the next release; use"):
                legacy = pmp.solve(problem, **old)
            assert same(reference, legacy)
            assert legacy.settings == {**reference.settings, "maximisers_used": legacy.settings["maximisers_used"]}


def test_old_keywords_are_translated_once_and_not_mixed():
    problem = lqr()
    with pytest.warns(DeprecationWarning, match=r"max_iter -> stop=pmp.Stop\(max_iter=...\)"):
        with pytest.raises(TypeError, match="`stop` was given as an object and as the old keyword"):
            pmp.solve(problem, stop=pmp.Stop(), max_iter=3)
    with pytest.warns(DeprecationWarning):
        with pytest.raises(ValueError, match="`rho` is an option of method='emsa', not of method='sqh'"):
            pmp.solve(problem, method="sqh", rho=1.0)
    with pytest.warns(DeprecationWarning):
        with pytest.raises(TypeError, match="were given as old keywords with the method object"):
            pmp.solve(problem, method=pmp.EMSA(), rho=1.0)
    with pytest.warns(DeprecationWarning, match=r"Solver\(\): the keyword\(s\) max_iter"):
        solver = pmp.Solver(problem, mesh=5, max_iter=3)
    assert solver.stopping.max_iter == 3


def test_settings_record_every_option_as_plain_values():
    sol = pmp.solve(lqr(), pmp.EMSA(anderson=3), mesh=10, ode=pmp.ODE(rtol=1e-8), maximiser=pmp.Maximiser(seed=1))
    s = sol.settings
    assert s["method"] == "emsa" and s["rho"] is None and s["options"]["anderson"] == 3
    assert s["rtol"] == 1e-8 and s["seed"] == 1 and s["ode_options"] == {} and s["max_iter"] == 200
    import json

    json.dumps({k: v for k, v in s.items()})  # JSON-friendly


def test_finite_sets_relax_round_and_polish_unless_given_controls():
    problem, _ = catalyst_mixing("binary")
    default = pmp.solve(problem, mesh=20)
    explicit = pmp.solve(problem, mesh=20, init=pmp.RelaxAndRound())
    assert same(default, explicit) and default.relaxed_cost == explicit.relaxed_cost is not None
    assert default.settings["finite"] == "relax-round-polish"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        plain = pmp.solve(problem, mesh=20, init=0.0)
        with pytest.warns(DeprecationWarning, match="finite"):
            legacy = pmp.solve(problem, mesh=20, finite="plain")
    assert same(plain, legacy) and plain.relaxed_cost is None
    with pytest.raises(TypeError, match=r"init=pmp.RelaxAndRound\(\)` needs a pmp.Finite control set"):
        pmp.solve(lqr(), mesh=5, init=pmp.RelaxAndRound())


# ---------------------------------------------------------------- memory of an iteration
def test_a_mesh_that_does_not_fit_is_refused_before_the_first_sweep(monkeypatch):
    monkeypatch.setattr(memory, "available_memory", lambda device: 2 * 10**9)
    calls = []
    problem = pmp.ControlProblem(lambda t, x, u: calls.append(1) or u.clone(), torch.tensor([1.0]), 1.0, pmp.Reals(1),
                                 terminal_cost=lambda x: x[..., 0] ** 2)
    pmp.Solver(problem, mesh=2)  # checks the problem's functions (a few calls), sweeps nothing
    checks = len(calls)
    calls.clear()
    with pytest.raises(pmp.IterationMemoryError,
                       match=r"one iteration at mesh N = 10000000 intervals with K = 1 samples \(n = 1 states, "
                             r"m = 1 controls, 3 Gauss points, float64\) needs about 96 GB, more than the 2 GB "
                             r"available \(MemAvailable\); a mesh of at most about 1\d{5} intervals fits"):
        pmp.solve(problem, mesh=10**7)
    assert len(calls) <= checks  # nothing was integrated
    assert issubclass(pmp.IterationMemoryError, MemoryError)
    mesh = torch.linspace(0.0, 1.0, 150_001)  # node times: checked once the mesh is made
    with pytest.warns(RuntimeWarning, match=r"N = 150000 intervals .* more than half of the 2 GB available"):
        pmp.Solver(problem, mesh=mesh)  # the constructor checks; nothing is swept


def test_the_estimate_grows_with_every_size_and_follows_its_formula():
    base = dict(N=1000, K=10, n=2, m=1, quadrature=3, dtype=torch.float64)
    b0 = memory.iteration_bytes(**base)
    assert b0 == 1000 * (memory.PER_INTERVAL + memory.PER_NUMBER * 10 * 3 * 4 * 8)
    for key, larger in (("N", 2000), ("K", 20), ("n", 3), ("m", 2), ("quadrature", 5)):
        assert memory.iteration_bytes(**{**base, key: larger}) > b0, key
    assert memory.iteration_bytes(**{**base, "dtype": torch.float32}) < b0
    assert memory.iteration_bytes(**{**base, "N": 2000}) == 2 * b0


def test_the_estimate_is_within_a_factor_3_of_a_measured_iteration():
    """Anonymous resident memory (RssAnon: the process's own allocations, which other processes' memory
    pressure does not evict without swap, unlike the peak RSS that counts the shared libraries' pages)
    of one iteration at mesh 6000, polled in a fresh process. Counts bytes, not time: a busy machine
    does not move it."""
    if not pathlib.Path("/proc/self/status").exists():
        pytest.skip("needs /proc (Linux)")
    code = """
import threading, time, warnings, torch
import pmpsolve as pmp
from problems import REFERENCE_PROBLEMS

def anon():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("RssAnon:"))

problem = REFERENCE_PROBLEMS["lqr"]()[0]
pmp.solve(problem, mesh=10, stop=pmp.Stop(max_iter=1))  # first-call costs (lazy imports, caches) are not the mesh's
before, peak, done = anon(), [0], threading.Event()

def poll():
    while not done.is_set():
        peak[0] = max(peak[0], anon())
        time.sleep(0.002)

thread = threading.Thread(target=poll)
thread.start()
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    pmp.solve(problem, mesh=6000, stop=pmp.Stop(max_iter=1))
done.set()
thread.join()
print(peak[0] - before)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         cwd=str(pathlib.Path(__file__).resolve().parents[1]))
    assert out.returncode == 0, out.stderr
    measured = int(out.stdout.split()[-1])
    estimate = memory.iteration_bytes(6000, 1, 2, 1, 3, torch.float64)
    assert estimate / 3 <= measured <= 3 * estimate, (measured, estimate)


def test_progress_shows_the_first_sweeps(capsys):
    pmp.solve(lqr(), mesh=10, stop=pmp.Stop(max_iter=2), progress=True)
    err = capsys.readouterr().err
    assert "[emsa] forward sweep" in err and "[emsa] co-state sweep" in err
