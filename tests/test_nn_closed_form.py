"""The exact maximiser of a Linear / Conv2d layer's augmented Hamiltonian (pmpsolve/nn/affine.py) against the
engine's L-BFGS run to convergence on the same objective, and a pmp.nn.EMSA step with it against the iterative path."""
import pytest
import torch

import pmpsolve as pmp
from helpers import closure_for, recorded
from pmpsolve.nn import affine
from pmpsolve.nn.affine import affine_maximise
from pmpsolve.nn.groups import group_layers
from pmpsolve.nn.hamiltonian import LayerHamiltonian, layer_data
from pmpsolve.update.maximisers import HamiltonianMaximiser


def _network(kind: str, bias: bool) -> torch.nn.Sequential:
    torch.manual_seed(0)
    if kind == "linear":
        return torch.nn.Sequential(torch.nn.Linear(5, 7, bias=bias), torch.nn.Tanh(), torch.nn.Linear(7, 3, bias=bias))
    if kind == "wide":  # more features than samples: the low-rank route of the Sylvester solve
        return torch.nn.Sequential(torch.nn.Linear(20, 12, bias=bias), torch.nn.Tanh(), torch.nn.Linear(12, 3, bias=bias))
    # a square kernel with padding 1, a rectangular one with padding (0, 1)
    return torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, padding=1, bias=bias), torch.nn.Tanh(),
                               torch.nn.Conv2d(3, 3, (3, 2), padding=(0, 1), bias=bias), torch.nn.Flatten(),
                               torch.nn.Linear(3 * 4 * 7, 3))


def _data(kind: str):
    g = torch.Generator().manual_seed(1)
    x = {"linear": lambda: torch.randn(16, 5, generator=g), "wide": lambda: torch.randn(8, 20, generator=g),
         "conv": lambda: torch.randn(6, 2, 6, 6, generator=g)}[kind]()
    return x, torch.randint(0, 3, (x.shape[0],), generator=g)


def _objectives(kind, bias, dtype, rho, wd):
    """(group, objective) of every parametrised layer of the network in ``dtype`` (the same weights and data)."""
    model = _network(kind, bias).to(dtype)
    x, y = _data(kind)
    layers, records = recorded(model, x.to(dtype), y)
    out = []
    for g in group_layers(layers, {n: r.inputs for n, r in records.items()}, {}, {}):
        if isinstance(g.template, torch.nn.Linear) and kind == "conv" and g.indices == [4]:
            continue  # the classifier: covered by the "linear" case
        out.append((g, LayerHamiltonian(g, layer_data(g, records, g.parameters(), True), rho=rho, weight_decay=wd)))
    return out


@pytest.mark.parametrize("kind", ["linear", "wide", "conv", "conv-lags"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rho,wd", [(0.5, 0.0), (0.05, 1e-3), (0.5, 1e-2)])
def test_closed_form_is_the_converged_lbfgs_maximiser(kind, bias, rho, wd, monkeypatch):
    """float64: the closed form's step equals converged L-BFGS's and its value is at least as high; float32 (the
    same weights and data): its step equals the float64 maximiser's to the float32 rounding of the batch sums.
    A Linear without weight decay is left to L-BFGS (None). "conv-lags": every convolution's co-state Gram
    matrix from lag correlations (the route of large patches)."""
    if kind == "conv-lags":
        monkeypatch.setattr(affine, "MAX_PATCHES", 0)
        kind = "conv"
    if kind != "conv" and wd == 0:
        for g, objective in _objectives(kind, bias, torch.float64, rho, wd):
            assert affine_maximise(g, objective) is None
        return
    reference = []
    for g, objective in _objectives(kind, bias, torch.float64, rho, wd):
        u0 = objective.data.controls
        closed = affine_maximise(g, objective)
        assert closed is not None
        iterative = HamiltonianMaximiser(g.controls, max_iter=3000, method="lbfgs").maximise(objective).controls
        step = (iterative - u0).abs().max()
        assert step > 1e-3  # a real step, not a fixed point
        assert (closed - iterative).abs().max() <= 1e-4 * step
        assert float(objective(closed).sum()) >= float(objective(iterative).sum()) - 1e-12
        # and it is a stationary point of the exact objective
        _, gradient = objective.value_and_grad(closed)
        assert gradient.abs().max() <= 1e-9 * (1 + objective.value_and_grad(u0)[1].abs().max())
        reference.append(closed)
    for (g, objective), closed64 in zip(_objectives(kind, bias, torch.float32, rho, wd), reference):
        closed = affine_maximise(g, objective)
        assert closed is not None and closed.dtype == torch.float32
        u0 = objective.data.controls.double()
        assert (closed.double() - closed64).abs().max() <= 1e-3 * (closed64 - u0).abs().max()


@pytest.mark.parametrize("kernel,padding,size", [((3, 3), (1, 1), (6, 6)), ((3, 3), (0, 0), (7, 5)),
                                                 ((3, 5), (1, 2), (9, 8)), ((3, 3), (2, 2), (4, 4)),
                                                 ((5, 5), (2, 2), (8, 8)), ((3, 3), (1, 0), (3, 3))])
def test_the_lag_gram_is_the_patch_gram(kernel, padding, size):
    """The Gram matrix of im2col patches from lag correlations minus the ring of positions the padding drops equals
    the patches' own (float64; two groups of layers, two channel counts, paddings 0 ... k - 1, a 3 x 3 image), and
    so does the cross Gram of two images: the lags of both signs, without the symmetry a Gram matrix uses."""
    g = torch.Generator().manual_seed(3)
    a = torch.randn(2, 4, 3, *size, generator=g, dtype=torch.float64)
    b = torch.randn(2, 4, 2, *size, generator=g, dtype=torch.float64)
    X, Y = affine._patches(a, kernel, padding), affine._patches(b, kernel, padding)
    expected = affine._gram(X, X)
    t = a.transpose(0, 1)
    lags = affine._shifted_gram(t, t, kernel, padding)
    assert lags.shape == expected.shape
    assert (lags - expected).abs().max() <= 1e-12 * expected.abs().max()
    cross = affine._shifted_gram(t, b.transpose(0, 1), kernel, padding)
    assert (cross - affine._gram(X, Y)).abs().max() <= 1e-12 * expected.abs().max()
    assert (affine._patch_gram(a, kernel, padding) - expected).abs().max() == 0  # small: im2col itself


def test_a_box_that_binds_falls_back_and_a_loose_box_does_not():
    model = _network("linear", True).double()
    x, y = _data("linear")
    layers, records = recorded(model, x.double(), y)
    inputs = {n: r.inputs for n, r in records.items()}
    for bound, expect in ((10.0, True), (1e-3, False)):
        controls = {"2.weight": pmp.Box(-bound, bound), "2.bias": pmp.Box(-bound, bound)}
        (g,) = [g for g in group_layers(layers, inputs, controls, {}) if g.indices == [2]]
        objective = LayerHamiltonian(g, layer_data(g, records, g.parameters(), True), rho=0.05, weight_decay=1e-3)
        assert (affine_maximise(g, objective) is not None) == expect


def test_unsupported_layers_and_penalties_are_left_to_the_iterative_maximisers():
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, stride=2), torch.nn.Flatten(), torch.nn.Linear(12, 3)).double()
    x, y = _data("conv")
    layers, records = recorded(model, x.double(), y)
    inputs = {n: r.inputs for n, r in records.items()}
    groups = {g.indices[0]: g for g in group_layers(layers, inputs, {}, {"2.weight": pmp.L1(1e-3)})}
    for n in (0, 2):  # a strided convolution; an L1 penalty
        g = groups[n]
        objective = LayerHamiltonian(g, layer_data(g, records, g.parameters(), True), rho=0.05)
        assert affine_maximise(g, objective) is None


def _step_network() -> torch.nn.Sequential:
    """A convolution and a classifier: both solved in closed form with weight decay."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3, padding=1), torch.nn.Tanh(), torch.nn.AvgPool2d(2),
                               torch.nn.Flatten(), torch.nn.Linear(3 * 3 * 3, 4)).double()


def _step_batch():
    g = torch.Generator().manual_seed(2)
    return torch.randn(20, 1, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 4, (20,), generator=g)


@pytest.mark.parametrize("rho", [0.03, None])
def test_an_emsa_step_in_closed_form_equals_the_converged_iterative_step(rho):
    """A whole pmp.nn.EMSA step on a network of Linear and Conv2d entries: the closed form gives the parameters
    of the iterative path with L-BFGS run to convergence (fixed and adaptive rho: the same trials accepted)."""
    net, (x, y) = _step_network, _step_batch()
    fast, slow, start = net(), net(), net()
    opt_fast = pmp.nn.EMSA(fast, rho=rho, weight_decay=1e-3)
    opt_slow = pmp.nn.EMSA(slow, rho=rho, weight_decay=1e-3, closed_form=False, maximiser_iter=3000)
    opt_fast.step(closure_for(opt_fast, fast, x, y))
    opt_slow.step(closure_for(opt_slow, slow, x, y))
    assert set(opt_fast.last_step["routes"].values()) == {"quadratic"}
    assert set(opt_slow.last_step["routes"].values()) == {"lbfgs"}
    assert opt_fast.last_step["trials"] == opt_slow.last_step["trials"]
    for a, b, a0 in zip(fast.parameters(), slow.parameters(), start.parameters()):
        # L-BFGS stops at its gradient tolerance: agreement to 1e-5 of the parameters' change
        assert (a - b).abs().max() <= 1e-5 * (a - a0).abs().max()
    with pytest.raises(TypeError, match="closed_form"):
        pmp.nn.EMSA(net(), closed_form=1)



@pytest.mark.parametrize("kind", ["linear", "wide", "conv", "conv-lags"])
@pytest.mark.parametrize("bias", [True, False])
def test_the_sums_gradient_is_the_plain_hamiltonians_and_gives_its_gain(kind, bias, monkeypatch):
    """``QuadraticSums.gradient`` is J'p, the gradient of p . g in theta (autograd's, float64), and the gain
    J'p . d it gives equals the gain from a pass of the layer; the sums do not depend on rho (the adaptive
    rules' trials reuse them)."""
    if kind == "conv-lags":
        monkeypatch.setattr(affine, "MAX_PATCHES", 0)
        kind = "conv"
    for (g, objective), (_, other) in zip(_objectives(kind, bias, torch.float64, 0.5, 1e-3),
                                          _objectives(kind, bias, torch.float64, 0.05, 1e-3)):
        sums = affine.quadratic_sums(g, objective)
        u0 = objective.data.controls
        plain = LayerHamiltonian(g, objective.data)  # rho = 0, no weight decay: p . g alone
        _, autograd = plain.value_and_grad(u0 + 0.3)  # at another theta: the same (g is affine in theta)
        assert torch.allclose(sums.gradient, autograd, rtol=1e-12, atol=1e-12)
        for a, b in zip(sums, affine.quadratic_sums(g, other)):
            assert a is None and b is None or (torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b)
        u = u0 + 0.1 * torch.randn(u0.shape, generator=torch.Generator().manual_seed(2), dtype=u0.dtype)
        decayed = LayerHamiltonian(g, objective.data, weight_decay=1e-3)
        assert torch.allclose(decayed.hamiltonian_gain(u, sums.gradient), decayed.hamiltonian_gain(u),
                              rtol=1e-10, atol=1e-13)


def test_a_closed_form_that_falls_back_later_gets_its_input_costates(monkeypatch):
    """After its first (checked) step a closed-form group's data carries no p_n (not needed); when the closed form
    then refuses (a box that binds, say), L-BFGS runs on p_n formed then: the same step as with p_n formed eagerly."""
    from pmpsolve.nn import optim
    net, (x, y) = _step_network, _step_batch()
    lazy, eager = net(), net()
    opts = [pmp.nn.EMSA(m, rho=0.03, weight_decay=1e-3) for m in (lazy, eager)]
    for opt, model in zip(opts, (lazy, eager)):
        opt.step(closure_for(opt, model, x, y))
        assert set(opt.last_step["routes"].values()) == {"quadratic"}
    seen = []
    real_layer_data = optim.layer_data

    def spy(group, records, controls, need):
        data = real_layer_data(group, records, controls, need)
        seen.append(data.input_costates is None)
        return data
    monkeypatch.setattr(optim, "layer_data", spy)
    monkeypatch.setattr(optim, "affine_maximise", lambda group, objective, check=True, sums=None: None)
    opts[0].step(closure_for(opts[0], lazy, x, y))
    assert seen == [True, True]  # both groups solved in closed form before: p_n skipped
    monkeypatch.setattr(opts[1], "_input_costates", lambda group: True)
    opts[1].step(closure_for(opts[1], eager, x, y))
    assert set(opts[0].last_step["routes"].values()) == {"lbfgs"}
    for a, b in zip(lazy.parameters(), eager.parameters()):
        assert torch.equal(a, b)


class _TwoRanks:
    """A stand-in for a process group of two in one process: ``totals`` adds what the other rank's objective
    passed (``partner``'s last buffer); rank 1's ``totals`` returns its own parts and keeps them."""

    world_size = 2

    def __init__(self, partner=None):
        self.partner, self.last = partner, None

    def guard(self):
        from pmpsolve.sweep.reduce import ErrorGuard
        return ErrorGuard(False)

    def totals(self, *parts, error=None):
        if error is not None:
            raise error
        self.last = parts
        if self.partner is None:
            return parts
        return tuple(a + b for a, b in zip(parts, self.partner.last))


@pytest.mark.parametrize("kind", ["linear", "wide", "conv", "conv-lags"])
@pytest.mark.parametrize("bias", [True, False])
def test_sums_totalled_over_two_ranks_are_the_whole_batchs_and_give_its_step(kind, bias, monkeypatch):
    """The batch split in two shards, each an objective holding half the weight decay (as every rank of a
    process group does): the totalled sums equal the whole batch's in one process (for "wide" the Gram matrix of
    its samples, where one process keeps the samples), and the closed-form step from them is the whole batch's."""
    if kind == "conv-lags":
        monkeypatch.setattr(affine, "MAX_PATCHES", 0)
        kind = "conv"
    rho, wd = 0.05, 1e-3
    for g, whole in _objectives(kind, bias, torch.float64, rho, wd):
        d = whole.data
        k = d.inputs.shape[1] // 3  # uneven shards
        shards = [d._replace(inputs=d.inputs[:, s], outputs=d.outputs[:, s], costates=d.costates[:, s],
                             input_costates=d.input_costates[:, s]) for s in (slice(k, None), slice(0, k))]
        second = _TwoRanks()
        first = _TwoRanks(partner=second)
        affine.quadratic_sums(g, LayerHamiltonian(g, shards[0], rho=rho, weight_decay=wd / 2, reduce=second))
        sharded = LayerHamiltonian(g, shards[1], rho=rho, weight_decay=wd / 2, reduce=first)
        totals = affine.quadratic_sums(g, sharded)
        expected = affine.quadratic_sums(g, whole)
        inputs = expected.inputs
        if kind == "wide":  # one process keeps X itself [G, N, K]
            assert inputs.shape[1] < inputs.shape[2]
            inputs = inputs.transpose(1, 2) @ inputs
        assert totals.count == expected.count
        pairs = [(totals.gradient, expected.gradient), (totals.inputs, inputs), (totals.costates, expected.costates)]
        if bias and kind != "conv":
            pairs.append((totals.extra, expected.extra))
        for a, b in pairs:
            assert torch.allclose(a, b, rtol=1e-12, atol=1e-14 * float(b.abs().max()))
        step = affine._linear_step if kind != "conv" else affine._conv_step
        d_sharded = step(g, sharded, bias, totals)
        d_whole = step(g, whole, bias, expected)
        assert float(d_whole.abs().max()) > 1e-3
        assert torch.allclose(d_sharded, d_whole, rtol=1e-8, atol=1e-10 * float(d_whole.abs().max()))
