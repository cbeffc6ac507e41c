"""pmp.nn optimizers never fail silently: bad input is refused with a message that says what to change, a
stall or a divergence is reported, unusual layers either work or are named, and a run resumed from a
checkpoint continues bit for bit (docs/networks.md, troubleshooting)."""
import io
import math
import warnings

import pytest
import torch

import pmpsolve as pmp
from pmpsolve.nn.hamiltonian import LayerHamiltonian

from test_nn import data, small_net

F = torch.nn.functional


def train(model, opt, x, y, steps, loss=None):
    """``steps`` optimizer steps on (x, y); the losses the steps returned."""
    losses = []
    for _ in range(steps):
        def closure():
            opt.zero_grad()
            value = (loss or F.cross_entropy)(model(x), y)
            value.backward()
            return value
        losses.append(float(opt.step(closure).detach()))
    return losses


def optimizer(model, **options):
    """pmp.nn.EMSA, SQH or MSA by ``method`` (default E-MSA)."""
    kind = {"emsa": pmp.nn.EMSA, "sqh": pmp.nn.SQH, "msa": pmp.nn.MSA}[options.pop("method", "emsa")]
    return kind(model, **options)


def parameters(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


# -- shared weights -------------------------------------------------------------------------------------


def test_a_weight_reached_from_two_entries_is_refused():
    shared = torch.nn.Linear(4, 4)
    twice = torch.nn.Sequential(pmp.nn.Residual(torch.nn.Sequential(shared, torch.nn.Tanh())),
                                pmp.nn.Residual(torch.nn.Sequential(shared, torch.nn.Tanh())), torch.nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"shared between entries.*'0.module.0.weight', '1.module.0.weight'"):
        pmp.nn.EMSA(twice)
    a, b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    b.weight = a.weight  # a tie
    with pytest.raises(ValueError, match=r"shared between entries.*\['0.weight', '2.weight'\]"):
        pmp.nn.SQH(torch.nn.Sequential(a, torch.nn.Tanh(), b, torch.nn.Tanh(), torch.nn.Linear(4, 2)))
    # a weight used twice inside one entry is one layer's control: allowed
    inner = torch.nn.Linear(4, 4)
    pmp.nn.EMSA(torch.nn.Sequential(torch.nn.Sequential(inner, torch.nn.Tanh(), inner), torch.nn.Linear(4, 2)))


# -- resuming -------------------------------------------------------------------------------------------

BINARY = {"2.module.0.weight": pmp.Finite([-1.0, 1.0])}
RESUMED = {
    "emsa adaptive, perturb": dict(perturb=0.005),
    "emsa fixed rho, perturb": dict(rho=0.05, perturb=0.005),
    "sqh, weight decay": dict(method="sqh", weight_decay=1e-3),
    "msa, finite + adam_lr": dict(method="msa", controls=BINARY, adam_lr=1e-2,
                                  discrete=pmp.nn.DiscreteRule(average=0.9, decay=0.5, decay_every=2)),
    "emsa, finite, l0": dict(rho=0.05, controls={"2.module.0.weight": pmp.Finite([-1.0, 0.0, 1.0])},
                             penalties={"2.module.0.weight": pmp.L0(1e-3)}, perturb=0.005),
}


@pytest.mark.parametrize("name", list(RESUMED))
def test_a_run_resumed_from_a_checkpoint_continues_bit_for_bit(name):
    options = RESUMED[name]
    x, y = data(48)
    batches = [(x[:24], y[:24]), (x[24:], y[24:])]

    def run(model, opt, steps):
        for k in range(steps):
            train(model, opt, *batches[k % 2], 1)

    model = small_net()
    opt = optimizer(model, **options)
    run(model, opt, 3)
    saved = io.BytesIO()  # a checkpoint as users write one: through torch.save
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, saved)
    run(model, opt, 3)
    uninterrupted = parameters(model)

    saved.seek(0)
    checkpoint = torch.load(saved, weights_only=False)
    resumed_model = small_net(seed=1)  # other initial weights: everything must come from the checkpoint
    resumed_model.load_state_dict(checkpoint["model"])
    resumed = optimizer(resumed_model, **options)
    resumed.load_state_dict(checkpoint["opt"])
    run(resumed_model, resumed, 3)
    assert torch.equal(parameters(resumed_model), uninterrupted)
    assert resumed.param_groups[0]["current_rho"] == opt.param_groups[0]["current_rho"]


def test_a_state_dict_of_other_options_is_refused():
    opt = pmp.nn.EMSA(small_net(), controls=BINARY)
    with pytest.raises(ValueError, match="finite-set controls or adam_lr differ"):
        pmp.nn.EMSA(small_net()).load_state_dict(opt.state_dict())
    state = opt.state_dict()
    del state["pmpsolve"]
    with pytest.raises(ValueError, match="no 'pmpsolve' entry"):
        opt.load_state_dict(state)


# -- stalls and divergence ------------------------------------------------------------------------------


def test_non_finite_costates_under_a_finite_loss_name_the_layers():
    model, (x, y) = small_net(), data()
    opt = pmp.nn.EMSA(model)

    def closure():
        opt.zero_grad()
        out = model(x)
        out.register_hook(lambda g: g * float("nan"))  # NaN from the loss's gradient on, the loss itself finite
        loss = F.cross_entropy(out, y)
        loss.backward()
        return loss

    before = parameters(model)
    with pytest.raises(FloatingPointError, match=r"co-state .* of layer\(s\) \[0, 2, 3, 4\] is not finite"):
        opt.step(closure)
    assert torch.equal(parameters(model), before)


def test_a_non_finite_hamiltonian_gain_names_the_layer(monkeypatch):
    model, (x, y) = small_net(), data()
    opt = pmp.nn.EMSA(model)
    plain = LayerHamiltonian.hamiltonian_gain
    monkeypatch.setattr(LayerHamiltonian, "hamiltonian_gain",
                        lambda self, u, *rest: plain(self, u, *rest) * (float("nan") if self.group.indices == [5] else 1.0))
    before = parameters(model)
    with pytest.raises(FloatingPointError, match=r"Hamiltonian gain of layer 5 \(Linear\) is not finite"):
        train(model, opt, x, y, 1)
    assert torch.equal(parameters(model), before)  # left as they were


def test_rho_at_its_ceiling_is_reported():
    """A closure whose loss rises on every trial (as a random one can): every trial is rejected."""
    model, (x, y) = small_net(), data()
    opt = pmp.nn.EMSA(model, maximiser_iter=2)  # cheap trials: every one is rejected anyway
    calls = []

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y) + len(calls)
        calls.append(1)
        loss.backward()
        return loss

    with pytest.warns(RuntimeWarning, match=r"rho reached its ceiling 1e\+12 .* model.eval\(\)"):
        for _ in range(4):
            opt.step(closure)
    assert opt.last_step["accepted"] is False


def test_dropout_in_training_mode():
    x, y = data()
    inside = torch.nn.Sequential(torch.nn.Sequential(torch.nn.Linear(2, 6), torch.nn.Dropout(0.2)), torch.nn.Tanh(),
                                 torch.nn.Linear(6, 2)).double()
    with pytest.raises(ValueError, match=r"entry 0 \(Sequential\) contains Dropout in training mode.*model.eval\(\)"):
        train(inside, pmp.nn.EMSA(inside), x, y, 1)
    inside.eval()  # deterministic: trains
    train(inside, pmp.nn.EMSA(inside), x, y, 1)

    between = torch.nn.Sequential(torch.nn.Linear(2, 6), torch.nn.Tanh(), torch.nn.Dropout(0.5),
                                  torch.nn.Linear(6, 2)).double()
    with pytest.warns(RuntimeWarning, match="entry 2 is Dropout in training mode"):
        train(between, pmp.nn.EMSA(between), x, y, 1)
    with warnings.catch_warnings():  # a fixed rho takes every step: no decrease test to mislead
        warnings.simplefilter("error")
        train(between, pmp.nn.EMSA(between, rho=0.05), x, y, 1)


def test_basic_msa_divergence_raises_with_the_best_parameters():
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    y = (x[:, 0] > 0).long()
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    opt = pmp.nn.MSA(model, weight_decay=1e-3)
    with pytest.raises(pmp.DivergenceError, match="'msa' diverged") as info:
        train(model, opt, x, y, 20)
    err = info.value

    def J():
        with torch.no_grad():
            return float(F.cross_entropy(model(x), y)) + 0.5e-3 * float(sum((p * p).sum() for p in model.parameters()))

    diverged = J()
    model.load_state_dict(err.best_controls)
    assert math.isclose(J(), err.best_cost, rel_tol=1e-6)  # float32
    assert diverged > 2 * err.best_cost


# -- layers that used to end in raw torch errors -----------------------------------------------------------


def test_a_non_scalar_loss_is_refused():
    model, (x, y) = small_net(), data()
    opt = pmp.nn.EMSA(model)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y, reduction="none")
        loss.sum().backward()
        return loss

    with pytest.raises(ValueError, match=r"scalar loss .* shape \(64,\)"):
        opt.step(closure)


@pytest.mark.parametrize("options", [dict(), dict(rho=0.05), dict(method="sqh")])
def test_an_embedding_with_integer_input_trains(options):
    """An integer-input first layer has no co-state: its augmented Hamiltonian keeps the state term only."""
    torch.manual_seed(0)
    tokens = torch.randint(0, 10, (64,))
    y = (tokens % 2).long()
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    losses = train(model, optimizer(model, **options), tokens, y, 6)
    assert losses[-1] < losses[0]


def test_a_layer_without_a_vmap_batching_rule_trains_on_its_own():
    class GRUStep(torch.nn.Module):  # a GRU as a tensor -> tensor layer: vmap has no batching rule for it
        def __init__(self):
            super().__init__()
            self.gru = torch.nn.GRU(2, 6, batch_first=True)

        def forward(self, x):
            return self.gru(x.unsqueeze(1))[0].squeeze(1)

    torch.manual_seed(0)
    model = torch.nn.Sequential(GRUStep(), torch.nn.Linear(6, 2)).double()
    x, y = data()
    opt = pmp.nn.EMSA(model)
    losses = train(model, opt, x, y, 5)
    assert losses[-1] < losses[0]
    assert opt.state_dict()["pmpsolve"]["unbatched"] == [0]


# -- accepted but wrong -----------------------------------------------------------------------------------


@pytest.mark.parametrize("options, message", [
    (dict(weight_decay=math.inf), "`weight_decay` must be a finite number >= 0, got inf"),
    (dict(perturb=math.inf), "`perturb` must be a finite number >= 0, got inf"),
    (dict(rho=math.inf), "`rho` must be a finite number >= 0 or None (adaptive), got inf"),
    (dict(maximiser_iter=2.7), "`maximiser_iter` must be a whole number >= 1, got 2.7"),
    (dict(max_trials=0), "`max_trials` must be a whole number >= 1, got 0"),
    (dict(seed=1.5), "`seed` must be a whole number >= 0, got 1.5"),
    (dict(adam_lr=math.inf), "`adam_lr` must be a finite number > 0 or None, got inf"),
])
def test_bad_numbers_are_refused(options, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        pmp.nn.EMSA(small_net(), **options)


def test_msa_refuses_a_rho():
    with pytest.raises(ValueError, match=r"basic MSA, rho = 0.*pmp.nn.EMSA\(model, rho=0.1\)"):
        pmp.nn.MSA(small_net(), rho=0.1)


def test_an_unbatched_input_is_refused():
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2)).double()
    x, _ = data()
    with pytest.raises(ValueError, match=r"layer 0 \(Linear\) maps an input of shape \(2,\) to \(3,\).*unsqueeze"):
        train(model, pmp.nn.EMSA(model), x[0], None, 1, loss=lambda out, _: (out ** 2).sum())
    square = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Tanh(), torch.nn.Linear(2, 2)).double()
    with pytest.raises(ValueError, match=r"1-D input of shape \(2,\): an unbatched sample"):
        train(square, pmp.nn.EMSA(square), x[0], None, 1, loss=lambda out, _: (out ** 2).sum())


def test_another_param_group_is_refused():
    model = small_net()
    opt = pmp.nn.EMSA(model)
    with pytest.raises(ValueError, match="cannot take another param group"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3))]})


def test_a_learning_rate_scheduler_gets_a_clear_error_and_rho_can_be_scheduled():
    model, (x, y) = small_net(), data()
    opt = pmp.nn.EMSA(model, rho=0.1)
    with pytest.raises(KeyError, match="no learning rate 'lr'.*g\\['rho'\\]"):
        torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    train(model, opt, x, y, 1)
    assert opt.last_step["rho"] == 0.1
    for group in opt.param_groups:
        group["rho"] = 0.4
    train(model, opt, x, y, 1)
    assert opt.last_step["rho"] == 0.4
    opt.param_groups[0]["rho"] = -1.0
    with pytest.raises(ValueError, match="`rho` must be a finite number >= 0"):
        train(model, opt, x, y, 1)


def test_a_trial_runs_the_closure_forward_only_with_the_losses_and_gradients_of_a_full_call():
    """The adaptive rule's trial closure runs without the parameters' backward pass: the loss it returns is the
    full closure's at the trial parameters, bit for bit, and the gradients after the step are those at theta^k."""
    model, (x, y) = small_net(), data()
    start = [p.detach().clone() for p in model.parameters()]
    opt = pmp.nn.EMSA(model)
    losses = train(model, opt, x, y, 1)
    assert opt.last_step["accepted"] and opt.last_step["trials"] == 1
    assert opt._forward_only_trials
    twin = small_net()
    assert F.cross_entropy(twin(x), y).item() == losses[0]
    F.cross_entropy(twin(x), y).backward()  # the gradient at theta^k, by a full pass
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p.grad, q.grad)
    with torch.no_grad():  # the loss at the step's parameters, by a full pass
        for q, p in zip(twin.parameters(), model.parameters()):
            q.copy_(p)
    assert F.cross_entropy(twin(x), y).item() == opt.last_step["J_new"]
    assert not all(torch.equal(p, p0) for p, p0 in zip(model.parameters(), start))


def test_a_closure_that_needs_the_parameters_gradients_runs_its_trials_in_full():
    """A closure that asks autograd for the parameters' gradients itself cannot run forward only: its trials fall
    back to the full call, and the step is the one a plain closure gives."""
    model, (x, y) = small_net(), data()
    twin = small_net()
    opt, opt_twin = pmp.nn.EMSA(model), pmp.nn.EMSA(twin)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        for p, g in zip(model.parameters(), torch.autograd.grad(loss, list(model.parameters()))):
            p.grad = g
        return loss

    for _ in range(2):
        opt.step(closure)
        train(twin, opt_twin, x, y, 1)
    assert not opt._forward_only_trials and opt_twin._forward_only_trials
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
