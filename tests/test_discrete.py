"""Discrete weights (Li & Hao's closed form) and L0 by bSQH in pmp.nn, checked by enumeration and by hand."""
import itertools
import math

import pytest
import torch

import pmpsolve as pmp
from pmpsolve.nn.discrete import finite_argmax, preference_order, project_scaled, threshold_rho
from pmpsolve.nn.groups import group_layers
from pmpsolve.nn.hamiltonian import LayerHamiltonian, layer_data
from pmpsolve.nn.recording import CostateRecorder

from helpers import closure_for, recorded

F = torch.nn.functional
BINARY, TERNARY = [-1.0, 1.0], [-1.0, 0.0, 1.0]


def tiny(seed=0, dtype=torch.float64, width=2):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(2, width, bias=False), torch.nn.Tanh(),
                               torch.nn.Linear(width, 3)).to(dtype)


def data(n=40, seed=1, dtype=torch.float64, features=2, classes=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g, dtype=dtype)
    return x, torch.randint(0, classes, (n,), generator=g)


def layer0_objective(model, x, y):
    """The plain Hamiltonian of layer 0 (its weight as the row) at the model's current parameters."""
    layers, records = recorded(model, x, y)
    (group,) = [g for g in group_layers(layers, {n: r.inputs for n, r in records.items()}, {}, {}) if g.indices == [0]]
    u = group.parameters()
    return LayerHamiltonian(group, layer_data(group, records, u, False)), u


def test_the_average_starts_from_dH_dW_which_is_minus_the_loss_gradient():
    """With a = 0, M is the batch's dH/dW: the LayerHamiltonian gradient, i.e. -d loss/dW (Prop. 2)."""
    model, (x, y) = tiny(), data()
    opt = pmp.nn.MSA(model, controls={"0.weight": pmp.Finite(BINARY)}, discrete=pmp.nn.DiscreteRule(average=0.0),
                     adam_lr=1e-3)
    objective, u = layer0_objective(model, x, y)
    _, grad_H = objective.value_and_grad(u)
    opt.step(closure_for(opt, model, x, y))
    (bucket,) = opt._finite.buckets
    assert torch.allclose(bucket.average, grad_H[0], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("values,penalty", [(BINARY, None), (TERNARY, None), (TERNARY, 0.01), ([-1.0, 0.0, 0.5, 2.0], 0.02)])
def test_closed_form_equals_enumeration_of_the_layer_hamiltonian(values, penalty):
    """Layer 0 is affine in W, so with a = 0 the rule maximises exactly
    H_0(W) - (rho_k / delta) |W - W^k|^2 - lambda |W|_0: compare with all |V|^4 weight matrices."""
    rho = 0.3
    for seed in range(3):
        model, (x, y) = tiny(seed), data(seed=seed + 5)
        controls = {"0.weight": pmp.Finite(values)}
        penalties = {"0.weight": pmp.L0(penalty)} if penalty else {}
        opt = pmp.nn.MSA(model, controls=controls, penalties=penalties, adam_lr=1e-3,
                         discrete=pmp.nn.DiscreteRule(rho=rho, average=0.0))
        objective, u0 = layer0_objective(model, x, y)  # at the weights projected into V
        _, M = objective.value_and_grad(u0)
        M, w = M[0], u0[0]
        wrong = w != torch.where(M >= 0, 1.0, -1.0)
        rho_k = rho * (M.abs()[wrong].max() if bool(wrong.any()) else torch.zeros(()))
        v = torch.tensor(values, dtype=torch.float64)
        gap = float(torch.sort(v).values.diff().min())
        grid = torch.tensor(list(itertools.product(values, repeat=4)), dtype=torch.float64)  # [C, 4]
        scores = objective.candidates(grid[:, None, :])[:, 0] - (rho_k / gap) * ((grid - w) ** 2).sum(-1)
        if penalty:
            scores = scores - penalty * (grid != 0).sum(-1)
        best = grid[scores.argmax()]
        assert int((scores >= scores.max() - 1e-12).sum()) == 1  # no ties in this data
        opt.step(closure_for(opt, model, x, y))
        assert torch.equal(model[0].weight.detach().reshape(-1), best)


def test_binary_and_ternary_rules_are_li_and_haos():
    g = torch.Generator().manual_seed(0)
    n = 1000
    M = torch.randn(n, generator=g, dtype=torch.float64)
    segments = torch.zeros(n, dtype=torch.long)
    lam = 0.05
    # binary: flip to sgn(M) exactly where |M| > rho_k
    w = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).double()
    rho_k = threshold_rho(M, w, segments, 1, 0.5)
    new = finite_argmax(M, w, rho_k, torch.tensor(BINARY), torch.zeros(n, dtype=torch.float64), None, 0.0, 2.0)
    assert torch.equal(new, torch.where(M.abs() > rho_k, torch.sign(M), w))
    # ternary with lambda: +1 where M > rho_k (1 - 2w) + lambda, -1 where M < -rho_k (1 + 2w) - lambda, else 0
    w = torch.randint(-1, 2, (n,), generator=g).double()
    rho_k = threshold_rho(M, w, segments, 1, 0.25)
    new = finite_argmax(M, w, rho_k, torch.tensor(TERNARY), torch.full((n,), lam, dtype=torch.float64), "L1", 0.0, 1.0)
    expected = torch.zeros(n, dtype=torch.float64)
    expected[M > rho_k * (1 - 2 * w) + lam] = 1.0
    expected[M < -rho_k * (1 + 2 * w) - lam] = -1.0
    assert torch.equal(new, expected)


def test_zero_is_handled_explicitly():
    # sgn(0) = +1: a weight -1 with M = 0 disagrees and sets the threshold; weight +1 with M = 0 agrees
    M = torch.tensor([0.0, 0.0, 3.0])
    assert torch.equal(threshold_rho(M, torch.tensor([-1.0, 1.0, 1.0]), torch.zeros(3, dtype=torch.long), 1, 1.0),
                       torch.zeros(3))
    assert torch.equal(threshold_rho(torch.tensor([0.0, -2.0]), torch.tensor([1.0, 1.0]),
                                     torch.zeros(2, dtype=torch.long), 1, 0.5), torch.full((2,), 1.0))
    # binary projection of exact zeros: +1; ternary ties at |w/std| = 1/2 go to 0
    assert torch.equal(project_scaled(torch.zeros(4), torch.tensor(BINARY)), torch.ones(4))
    assert preference_order(torch.tensor(TERNARY)).tolist() == [0.0, 1.0, -1.0]
    # M = 0 and rho_k = 0: every value of {-1, +1} ties, the current one is kept
    w = torch.tensor([-1.0, 1.0])
    assert torch.equal(finite_argmax(torch.zeros(2), w, torch.zeros(2), torch.tensor(BINARY), torch.zeros(2), None,
                                     0.0, 2.0), w)


def convnet(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.Tanh(),
                               torch.nn.AvgPool2d(2), torch.nn.Flatten(),
                               torch.nn.Linear(4 * 4 * 4, 16, bias=False), torch.nn.BatchNorm1d(16), torch.nn.Tanh(),
                               torch.nn.Linear(16, 3))


@pytest.mark.parametrize("values", [BINARY, TERNARY])
@pytest.mark.parametrize("adam_lr", [None, 1e-2])
def test_weights_stay_in_the_set_on_linear_and_conv_layers(values, adam_lr):
    model = convnet()
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(32, 1, 8, 8, generator=g), torch.randint(0, 3, (32,), generator=g)
    names = ["0.weight", "5.weight", "8.weight"]
    opt = pmp.nn.SQH(model, controls={k: pmp.Finite(values) for k in names}, adam_lr=adam_lr, maximiser_iter=3,
                     discrete=pmp.nn.DiscreteRule(average=0.5))
    float_before = {k: p.detach().clone() for k, p in model.named_parameters() if k not in names}
    closure = closure_for(opt, model, x, y)
    losses = [float(opt.step(closure)) for _ in range(6)]
    params = dict(model.named_parameters())
    v = torch.tensor(values)
    for k in names:
        w = params[k].detach()
        inside = int((w.reshape(-1, 1) == v).any(1).sum())
        assert inside == w.numel(), (k, inside, w.numel())
    assert opt.last_step["finite"]["changed"] >= 0 and 0 < opt.last_step["nonzero"] <= 1
    # the float parameters (conv and last biases, batch norm) moved by their own route
    assert all(not torch.equal(float_before[k], params[k].detach()) for k in float_before)
    assert all(math.isfinite(loss) for loss in losses)


def test_decay_schedule():
    model, (x, y) = tiny(), data()
    opt = pmp.nn.MSA(model, controls={"0.weight": pmp.Finite(BINARY)}, adam_lr=1e-3,
                     discrete=pmp.nn.DiscreteRule(average=0.9, decay=0.5, decay_every=2))
    closure = closure_for(opt, model, x, y)
    for _ in range(4):
        opt.step(closure)
    assert opt._finite.rate == pytest.approx(1 - 0.1 * 0.5 ** 2)
    assert opt.decay_average() == pytest.approx(1 - 0.1 * 0.5 ** 3)
    with pytest.raises(ValueError, match="average"):
        pmp.nn.DiscreteRule(average=1.0)


def test_l0_by_sqh_is_hard_thresholding_and_decreases_the_augmented_objective():
    """bSQH: Linear layers separate at rho = 0, maximised in closed form (hard thresholding);
    every accepted step decreases J = loss + lambda |W|_0, checked by hand."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).double()
    x, y = data(128, features=8)
    lam = 2e-3
    penalties = {"0.weight": pmp.L0(lam), "2.weight": pmp.L0(lam)}
    opt = pmp.nn.SQH(model, penalties=penalties)
    closure = closure_for(opt, model, x, y)
    accepted = 0
    for _ in range(15):
        opt.step(closure)
        info = opt.last_step
        assert set(info["routes"].values()) == {"closed-form"}
        if info["accepted"]:
            accepted += 1
            with torch.no_grad():
                J = float(F.cross_entropy(model(x), y)) + lam * sum(int((model[i].weight != 0).sum()) for i in (0, 2))
            assert J == pytest.approx(info["J_new"], rel=1e-12)
            assert info["J_new"] < info["J"]
    assert accepted >= 10
    total = model[0].weight.numel() + model[2].weight.numel()
    nonzero = (int((model[0].weight != 0).sum()) + int((model[2].weight != 0).sum())) / total
    assert opt.last_step["nonzero"] == pytest.approx(nonzero) and nonzero < 0.9


def test_separable_closed_form_beats_the_proximal_maximiser():
    """On a Linear layer at rho = 0 the closed form is the exact maximiser: no iterative maximiser does better."""
    from pmpsolve.nn.optim import separable_maximise
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)).double()
    x, y = data(64, features=3, classes=2)
    layers = {0: model[0], 2: model[2]}
    rec = CostateRecorder(layers)
    with rec.recording():
        F.cross_entropy(model(x), y).backward()
    records = rec.records([0, 2])
    (group,) = group_layers({0: model[0]}, {0: records[0].inputs}, {}, {"0.weight": pmp.L0(0.01)})
    u = group.parameters()
    objective = LayerHamiltonian(group, layer_data(group, records, u, False), eps=0.5, weight_decay=1e-3)
    exact = separable_maximise(group, objective)
    assert exact is not None
    iterative = pmp.update.maximisers.ProximalGradient(max_iter=200).maximise(objective, group.controls).controls
    assert float(objective(exact)) >= float(objective(iterative)) - 1e-12
    # ... and it refuses a layer that is not affine in its parameters
    tanh_layer = pmp.nn.Residual(torch.nn.Sequential(torch.nn.Linear(5, 5), torch.nn.Tanh()), 0.5).double()
    xs = torch.randn(16, 5, dtype=torch.float64)
    (g2,) = group_layers({0: tanh_layer}, {0: xs}, {}, {})
    rec2 = CostateRecorder({0: tanh_layer})
    with rec2.recording():
        tanh_layer(xs).pow(2).sum().backward()
    obj2 = LayerHamiltonian(g2, layer_data(g2, rec2.records([0]), g2.parameters(), False), eps=0.5)
    assert separable_maximise(g2, obj2) is None


@pytest.mark.parametrize("values", [BINARY, TERNARY])
def test_straight_through_baseline_keeps_weights_in_the_set_and_learns(values):
    model = convnet(1)
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(64, 1, 8, 8, generator=g), torch.randint(0, 3, (64,), generator=g)
    names = ["0.weight", "5.weight", "8.weight"]
    opt = pmp.nn.StraightThrough(model, {k: pmp.Finite(values) for k in names}, lr=1e-2)
    closure = closure_for(opt, model, x, y)
    losses = [float(opt.step(closure)) for _ in range(30)]
    params = dict(model.named_parameters())
    for k in names:
        assert bool((params[k].detach().reshape(-1, 1) == torch.tensor(values)).any(1).all())
    assert losses[-1] < losses[0]


def test_magnitude_pruning_keeps_the_fraction_and_holds_the_zeros():
    model, (x, y) = tiny(width=10), data(64)
    opt = pmp.nn.MagnitudePruning(model, ["0.weight", "2.weight"], keep=0.3, prune_at=3, lr=1e-2)
    closure = closure_for(opt, model, x, y)
    for _ in range(3):
        opt.step(closure)
    zeros = {k: (p.detach() == 0) for k, p in model.named_parameters() if k.endswith("weight")}
    assert opt.last_step["pruned"]
    for _ in range(5):
        opt.step(closure)
    for k, p in model.named_parameters():
        if k.endswith("weight"):
            assert int((p != 0).sum()) == round(0.3 * p.numel())
            assert torch.equal(p.detach() == 0, zeros[k])
