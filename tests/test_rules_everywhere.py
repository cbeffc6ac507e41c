"""Every update rule through both sweeps: a control problem (``pmp.solve``) and a network (``pmp.nn.Optimizer``).

The rules of ``pmpsolve.update.rules`` are the one home of each algorithm: the network optimizer runs the same rule
objects on layer data (``pmpsolve.nn.network``). One parametrised suite, as optax runs one over every optimizer:
the same rule class on both sides, a descent where the rule promises one, and for the gradient rule the step
that paper Prop. 2 says it is (torch.optim.SGD on the network, the exact gradient of J on the control problem).
"""
import pytest
import torch

import pmpsolve as pmp
from pmpsolve.update.rules import RULES
from problems import lqr

from test_nn import data, small_net

F = torch.nn.functional

RULE_CASES = {
    "emsa adaptive": pmp.EMSA(),
    "emsa fixed rho": pmp.EMSA(rho=5.0),  # large enough for LQR (Theorem 2; 1 and 2 diverge)
    "msa": pmp.MSA(),
    "sqh": pmp.SQH(),
    "gradient adaptive": pmp.Gradient(lr=0.5),
    "gradient fixed": pmp.Gradient(lr=0.05, adaptive=False),
}


@pytest.fixture(scope="module")
def moons():
    return data(96)


@pytest.mark.parametrize("name", list(RULE_CASES))
def test_every_rule_on_a_control_problem(name):
    method = RULE_CASES[name]
    problem, _ = lqr()
    stop = pmp.Stop(max_iter=15)
    if method.name == "msa":  # basic MSA diverges on this LQR (paper Sec. 3.1): an error with the best iterate
        with pytest.raises(pmp.DivergenceError, match="'msa' diverged") as info:
            pmp.solve(problem, method, mesh=20, stop=stop)
        assert info.value.best_cost <= info.value.history[0].cost
        return
    sol = pmp.solve(problem, method, mesh=20, stop=stop)
    assert sol.history[-1].cost < sol.history[0].cost
    assert sol.settings["method"] == method.name


@pytest.mark.parametrize("name", list(RULE_CASES))
def test_every_rule_on_a_network(name, moons):
    method = RULE_CASES[name]
    x, y = moons
    model = small_net()
    wd = 1e-2 if method.name == "msa" else 0.0  # basic MSA's Hamiltonian is linear in a Linear layer's weights
    opt = pmp.nn.Optimizer(model, method, weight_decay=wd)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    J = []
    for _ in range(3):
        opt.step(closure)
        J.append(opt.last_step["J"])
    assert type(opt._rule) is RULES[method.name] is method.rule  # the control solver's rule class, not a copy
    assert all(torch.isfinite(p).all() for p in model.parameters())
    if opt._rule.adaptive:  # kept steps only: J never rises on a full batch
        assert J[2] <= J[1] <= J[0]


def test_the_gradient_rule_on_a_network_is_sgd(moons):
    """Paper Prop. 2: grad_theta H_n = -d loss / d theta_n, so the soft step is torch.optim.SGD's step."""
    x, y = moons
    ours, reference = small_net(), small_net()
    opt = pmp.nn.Optimizer(ours, pmp.Gradient(lr=0.1, adaptive=False), weight_decay=1e-3)
    sgd = torch.optim.SGD(reference.parameters(), lr=0.1, weight_decay=1e-3)
    for model, o in ((ours, opt), (reference, sgd)):
        for _ in range(3):
            def closure(model=model, o=o):
                o.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                return loss
            o.step(closure)
    for p, q in zip(ours.parameters(), reference.parameters()):
        assert torch.allclose(p, q, rtol=0, atol=1e-13)
