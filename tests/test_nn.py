"""pmp.nn: training networks by the maximum principle (paper Alg. 3), checked against autograd and torch.optim."""
import copy
import math

import pytest
import torch

import pmpsolve as pmp
from pmpsolve.nn.groups import LayerGroup, group_layers
from pmpsolve.nn.hamiltonian import LayerHamiltonian, layer_data
from problems.moons import two_moons

from helpers import closure_for, recorded

F = torch.nn.functional


def block(width, delta=0.5):
    return pmp.nn.Residual(torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.Tanh()), delta)


def small_net(width=6, blocks=3, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(2, width), torch.nn.Tanh(), *[block(width) for _ in range(blocks)],
                               torch.nn.Linear(width, 2)).to(dtype)


def data(n=64, seed=1, dtype=torch.float64):
    return two_moons(n, 0.1, torch.Generator().manual_seed(seed), dtype)


def test_costates_are_minus_the_loss_gradient_at_each_layer_output():
    model, (x, y) = small_net(), data()
    layers, records = recorded(model, x, y)
    # Independent computation: run the layers by hand and ask autograd for d loss / d x_(n+1).
    outputs, h = {}, x
    for n, module in enumerate(model):
        h = module(h)
        if n in layers:
            h.retain_grad()
            outputs[n] = h
    F.cross_entropy(h, y).backward()
    for n in layers:
        assert torch.allclose(records[n].costates, -outputs[n].grad, rtol=0, atol=1e-15)
        assert torch.equal(records[n].outputs, outputs[n].detach())


def test_hamiltonian_gradient_is_minus_the_loss_gradient_and_its_step_is_sgd():
    """Paper Prop. 2: theta + lr grad_theta H_n (rho = 0) is exactly an SGD step on the loss."""
    model, (x, y) = small_net(), data()
    reference = small_net()
    layers, records = recorded(model, x, y)
    groups = group_layers(layers, {n: r.inputs for n, r in records.items()}, {}, {})
    assert sorted(len(g.indices) for g in groups) == [1, 1, 3]  # the 3 residual blocks batch into one group
    lr = 0.3
    for g in groups:
        u = g.parameters()
        objective = LayerHamiltonian(g, layer_data(g, records, u, False))
        _, grad_H = objective.value_and_grad(u)
        backprop = torch.stack([torch.cat([dict(m.named_parameters())[k].grad.reshape(-1) for k in g.names])
                                for m in g.modules])
        assert torch.allclose(grad_H, -backprop, rtol=1e-12, atol=1e-15)
        g.assign(u + lr * grad_H)
    sgd = torch.optim.SGD(reference.parameters(), lr=lr)
    sgd.zero_grad()
    F.cross_entropy(reference(x), y).backward()
    sgd.step()
    for a, b in zip(model.parameters(), reference.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-14)


def test_batched_maximisation_equals_a_loop_over_layers():
    model, (x, y) = small_net(), data()
    layers, records = recorded(model, x, y)
    inputs = {n: r.inputs for n, r in records.items()}
    (group,) = [g for g in group_layers(layers, inputs, {}, {}) if g.rows == 3]
    u = group.parameters()
    rho = 0.05
    batched = LayerHamiltonian(group, layer_data(group, records, u, True), rho=rho, weight_decay=1e-3)
    maximiser = pmp.update.maximisers.HamiltonianMaximiser(group.controls, max_iter=10, method="lbfgs")
    together = maximiser.maximise(batched).controls
    for row, n in enumerate(group.indices):
        single = LayerGroup([n], [layers[n]], group.names, group.controls, None)
        objective = LayerHamiltonian(single, layer_data(single, records, u[row:row + 1], True), rho=rho,
                                     weight_decay=1e-3)
        alone = pmp.update.maximisers.HamiltonianMaximiser(single.controls, max_iter=10, method="lbfgs").maximise(objective)
        assert torch.allclose(alone.controls[0], together[row], rtol=0, atol=1e-12)
        # ... and the batched objective's value is the single layer's, written out by hand.
        theta = group.unflatten(together[row])
        xn, p = records[n].inputs, records[n].costates
        xin = xn.clone().requires_grad_(True)
        out = xin + 0.5 * torch.tanh(xin @ theta["module.0.weight"].T + theta["module.0.bias"])
        (grad_x,) = torch.autograd.grad((p * out).sum(), xin, create_graph=True)
        p_in = torch.autograd.grad((p * layers[n](xin)).sum(), xin)[0]
        by_hand = ((p * out).sum() - rho / 2 * ((records[n].outputs - out) ** 2).sum()
                   - rho / 2 * ((p_in - grad_x) ** 2).sum() - 0.5e-3 * (together[row] ** 2).sum())
        assert torch.allclose(batched(together)[row], by_hand.detach(), rtol=1e-12, atol=1e-15)


def test_rho_zero_is_basic_msa():
    (x, y) = data()
    results = []
    for make in (lambda m: pmp.nn.EMSA(m, rho=0.0, weight_decay=0.1), lambda m: pmp.nn.MSA(m, weight_decay=0.1)):
        model = small_net()
        opt = make(model)
        for _ in range(2):
            opt.step(closure_for(opt, model, x, y))
        results.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    assert torch.equal(results[0], results[1])
    assert not torch.equal(results[0], torch.cat([p.detach().reshape(-1) for p in small_net().parameters()]))


def test_a_layer_frozen_between_steps_keeps_its_parameters_and_a_new_batch_shape_regroups():
    """The optimizer reuses its grouping of the layers between steps; freezing a layer (requires_grad False)
    or a batch of another size must still be seen at the next step."""
    x, y = data(64)
    model = small_net()
    opt = pmp.nn.EMSA(model, rho=0.1, weight_decay=1e-3)
    opt.step(closure_for(opt, model, x, y))
    for p in model[2].parameters():
        p.requires_grad_(False)
    frozen = [p.detach().clone() for p in model[2].parameters()]
    others = [p.detach().clone() for p in model[3].parameters()]
    opt.step(closure_for(opt, model, x, y))
    assert all(torch.equal(p, q) for p, q in zip(model[2].parameters(), frozen))
    assert not all(torch.equal(p, q) for p, q in zip(model[3].parameters(), others))
    opt.step(closure_for(opt, model, x[:32], y[:32]))  # another batch size: the layers' inputs change shape
    assert all(torch.equal(p, q) for p, q in zip(model[2].parameters(), frozen))
    assert opt.last_step["accepted"] and math.isfinite(opt.last_step["J"])


def test_emsa_trains_two_moons_to_95_percent_with_default_options():
    """A problem the defaults were not tuned on: 512 points, full batch, 60 steps."""
    x, y = data(512, seed=1)
    x_test, y_test = data(512, seed=2)
    model = small_net(width=8, blocks=2, seed=0)
    opt = pmp.nn.EMSA(model)
    closure = closure_for(opt, model, x, y)
    losses = [float(opt.step(closure)) for _ in range(60)]
    with torch.no_grad():
        accuracy = float((model(x_test).argmax(1) == y_test).double().mean())
    assert accuracy >= 0.95, (accuracy, losses[-1])
    assert losses[-1] < 0.5 * losses[0]


def test_adaptive_steps_decrease_the_loss_and_float32_and_no_grad_evaluation_work():
    x, y = data(128, dtype=torch.float32)
    model = small_net(dtype=torch.float32)
    opt = pmp.nn.EMSA(model)
    closure = closure_for(opt, model, x, y)
    previous = math.inf
    for _ in range(5):
        with torch.no_grad():
            before = float(F.cross_entropy(model(x), y))  # evaluation between steps leaves no trace
        loss = float(opt.step(closure))
        assert loss == pytest.approx(before, rel=1e-6)
        assert loss <= previous
        if opt.last_step["accepted"]:
            assert opt.last_step["J_new"] < opt.last_step["J"]
        previous = loss
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_box_controls_and_l1_penalty_hold_exactly():
    x, y = data()
    model = small_net()
    controls = {"2.module.0.weight": pmp.Box(-0.05, 0.05)}
    penalties = {"0.weight": pmp.L1(0.05)}
    opt = pmp.nn.SQH(model, controls=controls, penalties=penalties)
    closure = closure_for(opt, model, x, y)
    for _ in range(4):
        opt.step(closure)
    w = model[2].module[0].weight
    assert float(w.abs().max()) <= 0.05
    assert int((model[0].weight == 0).sum()) > 0  # soft thresholding makes exact zeros


def test_bad_input_gets_clear_errors():
    model = small_net()
    with pytest.raises(TypeError, match="Sequential"):
        pmp.nn.EMSA(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="not trainable parameters"):
        pmp.nn.EMSA(model, controls={"weight": pmp.Box(-1, 1)})
    with pytest.raises(ValueError, match="rho"):
        pmp.nn.EMSA(model, rho=-1.0)
    with pytest.raises(ValueError, match="method"):
        pmp.nn.EMSA(model, method="adam")
    shared = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="twice"):
        pmp.nn.EMSA(torch.nn.Sequential(shared, torch.nn.Tanh(), shared))
    opt = pmp.nn.EMSA(model)
    with pytest.raises(TypeError, match="closure"):
        opt.step()
    x, y = data()
    with pytest.raises(RuntimeError, match="backward"):
        opt.step(lambda: F.cross_entropy(model(x), y))
    with pytest.raises(ValueError, match="outside its set"):
        pmp.nn.EMSA(model, controls={"0.weight": pmp.Finite([-1.0, 1.0])}, discrete=pmp.nn.DiscreteRule(init="keep"))


def test_state_dict_round_trip_continues_the_adaptive_rho():
    x, y = data()
    model = small_net()
    opt = pmp.nn.EMSA(model)
    closure = closure_for(opt, model, x, y)
    for _ in range(3):
        opt.step(closure)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    opt.step(closure)
    after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    clone = small_net(seed=5)
    clone.load_state_dict(saved_model)
    opt2 = pmp.nn.EMSA(clone)
    opt2.load_state_dict(saved_opt)
    opt2.step(closure_for(opt2, clone, x, y))
    assert torch.equal(torch.cat([p.detach().reshape(-1) for p in clone.parameters()]), after)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_steps_match_the_cpu():
    x, y = data()
    results = []
    for device in ("cpu", "cuda"):
        model = small_net().to(device)
        opt = pmp.nn.EMSA(model, rho=0.05)
        for _ in range(2):
            opt.step(closure_for(opt, model, x.to(device), y.to(device)))
        results.append(torch.cat([p.detach().reshape(-1).cpu() for p in model.parameters()]))
    assert torch.allclose(results[0], results[1], rtol=1e-8, atol=1e-10)


def test_method_options_the_caller_sets_are_kept_on_a_network_and_the_others_take_its_defaults():
    """pmp.EMSA(high_ratio=0.9) means 0.9 on a network too, though 0.9 is the control problems' default; an
    option left unset takes the network's (0.75), and Anderson acceleration asked for explicitly is refused."""
    model = small_net()
    assert pmp.nn.Optimizer(model, pmp.EMSA(high_ratio=0.9))._rule_options["high_ratio"] == 0.9
    assert pmp.nn.Optimizer(model, pmp.EMSA(rho0=2.0))._rule_options["high_ratio"] == 0.75
    assert pmp.nn.EMSA(model)._rule_options["high_ratio"] == 0.75
    assert pmp.nn.Optimizer(model, "emsa")._rule_options["anderson"] == 0
    with pytest.raises(ValueError, match="Anderson acceleration"):
        pmp.nn.Optimizer(model, pmp.EMSA(anderson=5))
    assert pmp.EMSA(high_ratio=0.9) == pmp.EMSA()  # what was set does not change what the object is
