"""pmp.nn.OCNOpt: DDP over the layers (DDPNOpt), checked against Newton steps, K-FAC's definitions and
the DDP recursion written out sample by sample with autograd."""
import math

import pytest
import torch

import pmpsolve as pmp
from problems.moons import two_moons

from helpers import closure_for

F = torch.nn.functional


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def squared_closure(opt, model, x, y):
    def closure():
        opt.zero_grad()
        loss = 0.5 * ((model(x) - y) ** 2).sum(-1).mean()
        loss.backward()
        return loss
    return closure


@pytest.mark.parametrize("curvature", ["exact", "kfac"])
def test_without_feedback_one_linear_layer_takes_the_newton_step(curvature):
    """Squared loss on one Linear layer with residuals +-1: the outer-product value Hessian
    B V_x V_x^T is then the loss Hessian, so the step is Newton's (autograd's Hessian, solved)."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 1)).double()
    x = torch.randn(16, 3, generator=g, dtype=torch.float64)
    with torch.no_grad():
        y = model(x) + torch.where(torch.rand(16, 1, generator=g) < 0.5, -1.0, 1.0).double()
    theta0 = flat(model)

    def loss_of(theta):
        out = x @ theta[:3] + theta[3]
        return 0.5 * ((out - y[:, 0]) ** 2).mean()

    hessian = torch.autograd.functional.hessian(loss_of, theta0)
    theta = theta0.clone().requires_grad_()
    gradient = torch.autograd.grad(loss_of(theta), theta)[0]
    newton = theta0 - torch.linalg.solve(hessian, gradient)
    opt = pmp.nn.OCNOpt(model, damping=1e-14, curvature=curvature, feedback=False)
    opt.step(squared_closure(opt, model, x, y))
    assert torch.allclose(flat(model), newton, rtol=0, atol=1e-6)
    assert float(loss_of(flat(model))) < float(loss_of(theta0))


@pytest.mark.parametrize("curvature", ["exact", "kfac"])
def test_gauss_newton_without_feedback_on_one_linear_layer_takes_the_newton_step(curvature):
    """mse_loss on one Linear layer with two outputs and arbitrary residuals: the Gauss-Newton value Hessian
    is the loss Hessian there (and its Kronecker factors are exact), so the step is Newton's."""
    g = torch.Generator().manual_seed(4)
    torch.manual_seed(4)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2)).double()
    x = torch.randn(16, 3, generator=g, dtype=torch.float64)
    y = 3 * torch.randn(16, 2, generator=g, dtype=torch.float64)
    theta0 = flat(model)

    def loss_of(theta):
        return F.mse_loss(x @ theta[:6].reshape(2, 3).T + theta[6:], y)

    hessian = torch.autograd.functional.hessian(loss_of, theta0)
    theta = theta0.clone().requires_grad_()
    gradient = torch.autograd.grad(loss_of(theta), theta)[0]
    newton = theta0 - torch.linalg.solve(hessian, gradient)
    opt = pmp.nn.OCNOpt(model, damping=1e-14, curvature=curvature, feedback=False, value_hessian="gauss-newton",
                        loss="mse")

    def closure():
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        return loss
    opt.step(closure)
    assert torch.allclose(flat(model), newton, rtol=0, atol=1e-6)
    theta = flat(model).requires_grad_()
    assert float(torch.autograd.grad(loss_of(theta), theta)[0].norm()) < 1e-6  # least squares: one step solves it


def _ggn_recursion(model, x, y, damping, lr):
    """Linear-Tanh-Linear, cross-entropy: the Gauss-Newton DDP step written with torch.func.jacrev.

    Per-sample Jacobians J_t [B, C, m] of the logits w.r.t. each layer's parameters, the loss Hessian
    H_i = (diag(p_i) - p_i p_i^T) / B, the blocks sum_i J_t^T H_i J_t, k_2 from the gradient, the value gradient
    at the logits after the last layer's step g_i + H_i J_2 k_2, k_0 from it. Returns the two blocks, k_2,
    theta_0 + lr k_0 and a function dx -> the last layer's feedback gain from the logits' change under dx."""
    first, last = model[0], model[2]
    p0 = {n: p.detach() for n, p in first.named_parameters()}
    p2 = {n: p.detach() for n, p in last.named_parameters()}
    fc = torch.func.functional_call
    logits_of_0 = lambda params: last(torch.tanh(fc(first, params, (x,))))
    x2 = torch.tanh(first(x)).detach()
    logits_of_2 = lambda params: fc(last, params, (x2,))

    def jacobian(f, params):  # [B, C, m]: sample i's logits depend on the parameters only through sample i
        jac = torch.func.jacrev(f)(params)
        return torch.cat([jac[n].reshape(x.shape[0], -1, jac[n][0, 0].numel()) for n in params], -1)

    J0, J2 = jacobian(logits_of_0, p0), jacobian(logits_of_2, p2)
    logits = logits_of_2(p2)
    prob = torch.softmax(logits, -1)
    B = x.shape[0]
    H = (torch.diag_embed(prob) - prob[:, :, None] * prob[:, None, :]) / B
    g = (prob - F.one_hot(y, prob.shape[1]).to(prob.dtype)) / B  # d mean cross-entropy / d logits
    block0 = torch.einsum("bcm,bcd,bdn->mn", J0, H, J0).detach()
    block2 = torch.einsum("bcm,bcd,bdn->mn", J2, H, J2).detach()
    eye = lambda m: damping * torch.eye(m.shape[0], dtype=m.dtype)
    k2 = -torch.linalg.solve(block2 + eye(block2), torch.einsum("bcm,bc->m", J2, g))
    value = g + torch.einsum("bcd,bdm,m->bc", H, J2, k2)  # V_x' at the logits after the last step
    k0 = -torch.linalg.solve(block0 + eye(block0), torch.einsum("bcm,bc->m", J0, value))
    theta0 = torch.cat([v.reshape(-1) for v in p0.values()]) + lr * k0

    def gain(dz):  # -Q_thetatheta^-1 sum_i J_2^T H_i dz_i, dz_i the logits' change caused by dx_i
        return -torch.linalg.solve(block2 + eye(block2), torch.einsum("bcm,bcd,bd->m", J2, H, dz))
    return block0, block2, k2, theta0, gain


def test_gauss_newton_blocks_are_j_h_j_and_the_step_is_the_ggn_ddp_step():
    """Linear-Tanh-Linear, cross-entropy, exact curvature, no feedback: each entry's Gauss-Newton block is
    J^T H J (torch.func.jacrev), and the first entry's step uses the value gradient after the last one's."""
    torch.manual_seed(5)
    B, lr, damping = 6, 0.8, 0.05
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Tanh(), torch.nn.Linear(3, 3)).double()
    x, y = torch.randn(B, 2, dtype=torch.float64), torch.randint(0, 3, (B,))
    block0, block2, k2, theta0, _ = _ggn_recursion(model, x, y, damping, lr)
    theta2 = flat(model[2]) + lr * k2
    opt = pmp.nn.OCNOpt(model, lr=lr, damping=damping, curvature="exact", feedback=False,
                        value_hessian="gauss-newton", loss="cross_entropy")
    opt.step(closure_for(opt, model, x, y))
    assert torch.allclose(flat(model[0]), theta0, rtol=0, atol=1e-12)
    assert torch.allclose(flat(model[2]), theta2, rtol=0, atol=1e-12)
    assert float(block0.norm()) > 1e-3 and float(block2.norm()) > 1e-3
    assert opt.last_step["value_shift"][2] > 0  # V_x moved: the first step is not the plain GGN step


def test_exact_curvature_step_is_the_damped_outer_product_newton_step():
    """One entry, cross-entropy: theta - (B sum_i q_i q_i^T + lambda I)^-1 sum_i q_i, q_i from a loop over samples."""
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2)).double()
    x, y = torch.randn(10, 3, dtype=torch.float64), torch.randint(0, 2, (10,))
    params = list(model.parameters())
    q = []
    for i in range(10):  # q_i: the gradient of sample i's share of the batch-mean loss
        grads = torch.autograd.grad(F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]) / 10, params)
        q.append(torch.cat([g.reshape(-1) for g in grads]))
    q = torch.stack(q)
    damping = 0.05
    expected = flat(model) - torch.linalg.solve(10 * q.T @ q + damping * torch.eye(q.shape[1], dtype=q.dtype),
                                                q.sum(0))
    opt = pmp.nn.OCNOpt(model, damping=damping, curvature="exact", feedback=False)
    opt.step(closure_for(opt, model, x, y))
    assert torch.allclose(flat(model), expected, rtol=0, atol=1e-12)


def _patches(x, kernel, padding):
    """Input patches [B, P, C k k] by explicit slicing (positions row by row), the definition of KFC's A."""
    xp = F.pad(x, (padding,) * 4)
    rows = []
    for i in range(xp.shape[2] - kernel + 1):
        for j in range(xp.shape[3] - kernel + 1):
            rows.append(xp[:, :, i:i + kernel, j:j + kernel].reshape(x.shape[0], -1))
    return torch.stack(rows, 1)


def test_kfac_factors_of_a_convolution_and_a_linear_layer_match_their_definitions():
    torch.manual_seed(2)
    B = 3
    conv = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, padding=1), torch.nn.Flatten()).double()
    x = torch.randn(B, 2, 4, 4, dtype=torch.float64)
    y = torch.randint(0, 48, (B,))
    out = conv[0](x)
    out.retain_grad()
    F.cross_entropy(conv[1](out), y).backward()
    a = _patches(x, 3, 1)
    a = torch.cat([a, torch.ones(B, a.shape[1], 1, dtype=a.dtype)], -1)  # the bias column
    d = out.grad.reshape(B, 3, -1).transpose(1, 2)  # [B, P, out]
    P = a.shape[1]
    A = sum(a[b, p, :, None] * a[b, p, None, :] for b in range(B) for p in range(P)) / B
    G = sum(d[b, p, :, None] * d[b, p, None, :] for b in range(B) for p in range(P)) * B / P
    opt = pmp.nn.OCNOpt(conv, stat_decay=0.0, feedback=False)
    opt.step(closure_for(opt, conv, x, y))
    state = opt.state[conv[0].weight]
    assert torch.allclose(state["A"], A, rtol=1e-12, atol=1e-12)
    assert torch.allclose(state["G"], G, rtol=1e-12, atol=1e-14)

    # A Linear layer on [B, 5, 4] inputs: 5 positions per sample
    lin = torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.Flatten()).double()
    x = torch.randn(B, 5, 4, dtype=torch.float64)
    y = torch.randint(0, 10, (B,))
    out = lin[0](x)
    out.retain_grad()
    F.cross_entropy(lin[1](out), y).backward()
    a = torch.cat([x, torch.ones(B, 5, 1, dtype=x.dtype)], -1)
    A = torch.einsum("bpk,bpl->kl", a, a) / B
    G = torch.einsum("bpo,bpq->oq", out.grad, out.grad) * B / 5
    opt = pmp.nn.OCNOpt(lin, stat_decay=0.0)
    opt.step(closure_for(opt, lin, x, y))
    assert torch.allclose(opt.state[lin[0].weight]["A"], A, rtol=1e-12, atol=1e-12)
    assert torch.allclose(opt.state[lin[0].weight]["G"], G, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("padding, stride, bias", [(1, 1, True), (0, 1, False), ((1, 0), 1, True), (1, 2, True)])
def test_kfac_input_factor_of_a_wide_convolution_by_lag_correlations_matches_its_patches(padding, stride, bias):
    # 8 channels on 14 x 14 at batch 32: patches of 0.3-0.45M elements, where the input factor is formed from lag
    # correlations (pmpsolve.nn.affine._by_lags) rather than im2col; stride 2 takes the im2col path
    from pmpsolve.nn.affine import _by_lags
    torch.manual_seed(4)
    B = 32
    conv = torch.nn.Sequential(torch.nn.Conv2d(8, 3, 3, padding=padding, stride=stride, bias=bias),
                               torch.nn.Flatten()).double()
    x = torch.randn(B, 8, 14, 14, dtype=torch.float64)
    pad = (padding, padding) if isinstance(padding, int) else padding
    assert _by_lags(x.unsqueeze(0), (3, 3), pad)
    out_size = conv[0](x)[0].numel()
    y = torch.randint(0, out_size, (B,))
    U = F.unfold(x, 3, padding=pad, stride=stride).transpose(1, 2)  # [B, P, 72]
    if bias:
        U = torch.cat([U, torch.ones(B, U.shape[1], 1, dtype=U.dtype)], -1)
    A = torch.einsum("bpk,bpl->kl", U, U) / B
    opt = pmp.nn.OCNOpt(conv, stat_decay=0.0)
    opt.step(closure_for(opt, conv, x, y))
    assert torch.allclose(opt.state[conv[0].weight]["A"], A, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("value_hessian", ["outer", "gauss-newton"])
def test_the_feedback_step_follows_the_ddp_recursion_written_out_sample_by_sample(value_hessian):
    """Linear-Tanh-Linear, exact curvature: k_t, the per-sample value factors 1 + B q_i . k, and K dx with
    dx from the second forward pass, each computed here with autograd and loops over samples. Gauss-Newton:
    the recursion with torch.func.jacrev (``_ggn_recursion``) and K dx from the change of the logits that dx
    causes, read off the forward pass (the last layer is linear, so the difference is exact)."""
    torch.manual_seed(3)
    B, lr, damping = 8, 0.7, 0.1
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2)).double()
    x, y = torch.randn(B, 2, dtype=torch.float64), torch.randint(0, 2, (B,))
    first, last = model[0], model[2]
    h1 = first(x)
    h1.retain_grad()
    x2 = torch.tanh(h1)
    x2.retain_grad()
    logits = last(x2)
    logits.retain_grad()
    F.cross_entropy(logits, y).backward()

    def per_sample_q(layer, inputs, value_grads):
        rows = []
        for i in range(B):
            out = layer(inputs[i:i + 1])
            grads = torch.autograd.grad((value_grads[i:i + 1] * out).sum(), list(layer.parameters()))
            rows.append(torch.cat([g.reshape(-1) for g in grads]))
        return torch.stack(rows)

    def solve(q, rhs):
        return torch.linalg.solve(B * q.T @ q + damping * torch.eye(q.shape[1], dtype=q.dtype), rhs)

    if value_hessian == "gauss-newton":
        _, _, k2, theta0, feedback_gain = _ggn_recursion(model, x, y, damping, lr)
        W0, b0 = theta0[:6].reshape(3, 2), theta0[6:]
        dx = torch.tanh(x @ W0.T + b0) - x2.detach()
        with torch.no_grad():
            gain = feedback_gain(last(x2 + dx) - last(x2))
        theta2 = flat(last) + lr * (k2 + gain)
        opt = pmp.nn.OCNOpt(model, lr=lr, damping=damping, curvature="exact", value_hessian=value_hessian,
                            loss="cross_entropy")
        opt.step(closure_for(opt, model, x, y))
        assert torch.allclose(flat(first), theta0, rtol=0, atol=1e-12)
        assert torch.allclose(flat(last), theta2, rtol=0, atol=1e-12)
        assert opt.last_step["feedback_norm"][2] == pytest.approx(float(gain.norm()), rel=1e-9)
        assert opt.last_step["feedback_norm"][2] > 1e-3
        return
    q2 = per_sample_q(last, x2.detach(), logits.grad)  # the last entry: V_x' = d loss / d logits
    k2 = -solve(q2, q2.sum(0))
    factor = 1 + B * q2 @ k2  # V_x^i = r_i (1 + B q_i . k)
    q0 = per_sample_q(first, x, factor[:, None] * h1.grad)
    k0 = -solve(q0, q0.sum(0))
    theta0 = torch.cat([p.detach().reshape(-1) for p in first.parameters()]) + lr * k0
    W0, b0 = theta0[:6].reshape(3, 2), theta0[6:]
    dx = torch.tanh(x @ W0.T + b0) - x2.detach()
    jacobian = torch.autograd.functional.jacobian(lambda z: last(z), x2.detach()[:1])[0, :, 0, :]  # f_x = W
    s = torch.stack([logits.grad[i] @ (jacobian @ dx[i]) for i in range(B)])  # r_i . dx^i
    gain = -solve(q2, B * q2.T @ s)
    theta2 = torch.cat([p.detach().reshape(-1) for p in last.parameters()]) + lr * (k2 + gain)

    opt = pmp.nn.OCNOpt(model, lr=lr, damping=damping, curvature="exact")
    opt.step(closure_for(opt, model, x, y))
    assert torch.allclose(flat(first), theta0, rtol=0, atol=1e-12)
    assert torch.allclose(flat(last), theta2, rtol=0, atol=1e-12)
    assert opt.last_step["feedback_norm"][2] == pytest.approx(float(gain.norm()), rel=1e-9)
    assert opt.last_step["feedback_norm"][2] > 1e-3  # the feedback did move the last layer


def small_net(width=8, blocks=2, seed=0):
    torch.manual_seed(seed)
    block = lambda: pmp.nn.Residual(torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.Tanh()), 0.5)
    return torch.nn.Sequential(torch.nn.Linear(2, width), torch.nn.Tanh(), *[block() for _ in range(blocks)],
                               torch.nn.Linear(width, 2)).double()


def test_ocnopt_trains_two_moons_to_95_percent_with_default_options():
    """The problem pmp.nn.EMSA's defaults are checked on: 512 points, full batch, 60 steps."""
    x, y = two_moons(512, 0.1, torch.Generator().manual_seed(1))
    x_test, y_test = two_moons(512, 0.1, torch.Generator().manual_seed(2))
    model = small_net()
    opt = pmp.nn.OCNOpt(model)
    closure = closure_for(opt, model, x, y)
    losses = [float(opt.step(closure).detach()) for _ in range(60)]
    with torch.no_grad():
        accuracy = float((model(x_test).argmax(1) == y_test).double().mean())
    assert accuracy >= 0.95, (accuracy, losses[-1])
    assert losses[-1] < 0.1 * losses[0]


def test_state_dict_round_trip_continues_bit_for_bit():
    x, y = two_moons(64, 0.1, torch.Generator().manual_seed(1))

    def make(model):
        return pmp.nn.OCNOpt(model, curvature_every=2)

    straight = small_net()
    opt = make(straight)
    for _ in range(3):
        opt.step(closure_for(opt, straight, x, y))
    first = small_net()
    opt = make(first)
    for _ in range(2):
        opt.step(closure_for(opt, first, x, y))
    saved = {"model": first.state_dict(), "opt": opt.state_dict()}
    resumed = small_net(seed=5)
    opt = make(resumed)
    resumed.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    opt.step(closure_for(opt, resumed, x, y))
    assert torch.equal(flat(resumed), flat(straight))


class Twice(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 2)

    def forward(self, x):
        return self.lin(torch.tanh(self.lin(x)))


@pytest.mark.parametrize("build, options, error, words", [
    (lambda: torch.nn.Linear(2, 2), {}, TypeError, "Sequential"),
    (lambda: torch.nn.Sequential(torch.nn.Linear(2, 2)), {"lr": 0.0}, ValueError, "`lr`"),
    (lambda: torch.nn.Sequential(torch.nn.Linear(2, 2)), {"lr": -1.0}, ValueError, "`lr`"),
    (lambda: torch.nn.Sequential(torch.nn.Linear(2, 2)), {"damping": 0.0}, ValueError, "`damping`"),
    (lambda: torch.nn.Sequential(torch.nn.Linear(2, 2)), {"damping": -0.1}, ValueError, "`damping`"),
    (lambda: torch.nn.Sequential(torch.nn.Linear(2, 2)), {"damping": math.nan}, ValueError, "`damping`"),
    (lambda: torch.nn.Sequential(torch.nn.Linear(2, 2)), {"curvature": "diagonal"}, ValueError, "'kfac'"),
    (lambda: torch.nn.Sequential(torch.nn.Linear(2, 2)), {"feedback": "yes"}, TypeError, "`feedback`"),
    (lambda: torch.nn.Sequential(torch.nn.Linear(2, 2)), {"curvature_every": 0}, ValueError, "curvature_every"),
    (lambda: torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.LayerNorm(4)), {}, ValueError,
     "curvature='exact'"),
    (lambda: torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.BatchNorm1d(4)), {"curvature": "exact"},
     ValueError, "couples the samples"),
    (lambda: torch.nn.Sequential(torch.nn.Linear(2, 100), torch.nn.Linear(100, 100)), {"curvature": "exact"},
     ValueError, "curvature='kfac'"),
    (lambda: torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, groups=1, padding="same")), {}, ValueError, "padding"),
    (lambda: torch.nn.Sequential(torch.nn.Linear(2, 2)), {"value_hessian": "fisher"}, ValueError, "`value_hessian`"),
    (lambda: torch.nn.Sequential(torch.nn.Linear(2, 2)), {"value_hessian": "gauss-newton"}, ValueError, "`loss='mse'`"),
    (lambda: torch.nn.Sequential(torch.nn.Linear(2, 2)), {"value_hessian": "gauss-newton", "loss": "huber"},
     ValueError, "got loss='huber'"),
    (lambda: torch.nn.Sequential(torch.nn.Linear(2, 2)), {"loss": "mse"}, ValueError, "value_hessian='outer'"),
])
def test_bad_input_gets_a_clear_error(build, options, error, words):
    with pytest.raises(error, match=words.replace("(", r"\(").replace("'", "'")):
        pmp.nn.OCNOpt(build(), **options)


def test_shared_weights_and_reused_layers_are_refused():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    b.weight = a.weight
    with pytest.raises(ValueError, match="shared"):
        pmp.nn.OCNOpt(torch.nn.Sequential(a, torch.nn.Tanh(), b))
    model = torch.nn.Sequential(Twice(), torch.nn.Linear(2, 2))
    opt = pmp.nn.OCNOpt(model)
    x, y = torch.randn(4, 2), torch.randint(0, 2, (4,))
    with pytest.raises(ValueError, match="ran 2 times"):
        opt.step(closure_for(opt, model, x, y))
    with pytest.raises(TypeError, match="closure"):
        opt.step(None)
    pmp.nn.OCNOpt(model, curvature="exact").step(closure_for(opt, model, x, y))  # the dense block takes it


@pytest.mark.parametrize("declared, loss_fn, words", [
    ("mse", lambda out, y: ((out - y) ** 2).sum(-1).mean(), "imply"),  # 2 x mse_loss on two outputs
    ("mse", lambda out, y: F.mse_loss(out, y) + 0.1 * out.abs().mean(), "imply"),
    ("cross_entropy", lambda out, y: F.mse_loss(out, y), "not \\(softmax - target\\) / B"),
    ("cross_entropy", lambda out, y: F.cross_entropy(out, y.argmax(-1), reduction="sum"), "off by"),
])
def test_gauss_newton_refuses_a_loss_other_than_the_one_named(declared, loss_fn, words):
    """The loss Hessian is known for mse_loss and cross_entropy (batch means): the closure's loss and gradient
    are checked against the named loss, and anything else is refused rather than given a wrong curvature."""
    torch.manual_seed(6)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    opt = pmp.nn.OCNOpt(model, value_hessian="gauss-newton", loss=declared)

    def closure():
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss
    before = flat(model)
    with pytest.raises(ValueError, match=words):
        opt.step(closure)
    assert torch.equal(flat(model), before)  # refused before any parameter moved


def test_gauss_newton_refuses_logits_that_are_not_a_matrix():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Unflatten(1, (2, 2)))
    opt = pmp.nn.OCNOpt(model, value_hessian="gauss-newton", loss="cross_entropy")
    x, y = torch.randn(5, 3), torch.randint(0, 2, (5, 2))
    with pytest.raises(ValueError, match=r"logits \[B, C\]"):
        opt.step(closure_for(opt, model, x, y))


def test_gauss_newton_kfac_trains_a_convolution_and_two_moons():
    """K-FAC with the Gauss-Newton G (batched backward of the loss-Hessian directions through a Conv2d),
    and the two-moons network of the default test to >= 95 % test accuracy, cross-entropy."""
    torch.manual_seed(7)
    conv = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.Linear(3 * 25, 3)).double()
    x, y = torch.randn(12, 1, 5, 5, dtype=torch.float64), torch.randint(0, 3, (12,))
    opt = pmp.nn.OCNOpt(conv, value_hessian="gauss-newton", loss="cross_entropy")
    closure = closure_for(opt, conv, x, y)
    losses = [float(opt.step(closure).detach()) for _ in range(5)]
    assert losses[-1] < 0.5 * losses[0]

    x, y = two_moons(512, 0.1, torch.Generator().manual_seed(1))
    x_test, y_test = two_moons(512, 0.1, torch.Generator().manual_seed(2))
    model = small_net()
    opt = pmp.nn.OCNOpt(model, value_hessian="gauss-newton", loss="cross_entropy")
    closure = closure_for(opt, model, x, y)
    for _ in range(60):
        opt.step(closure)
    with torch.no_grad():
        accuracy = float((model(x_test).argmax(1) == y_test).double().mean())
    assert accuracy >= 0.95, accuracy
