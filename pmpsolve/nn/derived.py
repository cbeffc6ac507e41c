"""Augmented Hamiltonians whose gradient is derived by hand, without autograd (docs/theory.md).

For a ``Residual(Sequential(A, Tanh()), delta)`` entry, A a ``Linear`` or ``Conv2d`` (stride 1), the layer is
g(x, theta) = x + delta tanh(z), z = A_W x + b, and grad_x H = p + delta A_W' (s * p) with s = 1 - tanh(z)^2.
For a ``Linear`` or ``Conv2d`` entry itself (where L-BFGS maximises it: the closed form of ``affine`` does
not apply, e.g. a Linear without weight decay), g = z and grad_x H = A_W' p: the formulas below with
delta = 1, s = 1, no tanh and no skip connection.
The augmented Hamiltonian of ``hamiltonian.LayerHamiltonian`` (paper eq. (7), discrete form) is

    Htilde(theta) = p . g - rho/2 |e|^2 - rho/2 |r|^2 - wd/2 |theta|^2 - eps |theta - theta^k|^2,
    e = x_{n+1} - g,   r = p_n - grad_x H,

and its gradient, by the chain rule through tanh and its derivative (t = tanh(z), v = A_W r):

    dHtilde/dz  = delta s * (p + rho e) - 2 rho delta t * s * v * p     (affine entry: p + rho e)
    dHtilde/dW  = (dHtilde/dz) x'  +  rho delta (s * p) r'      (the weight gradients of A: inputs x and r)
    dHtilde/db  = sum of dHtilde/dz over the batch (and positions).

Autograd gets the same numbers by differentiating the co-state term (a vector-Jacobian product) once
more under ``torch.func.vmap``, about twice the arithmetic. Here one evaluation is a forward map, two
adjoint-side maps (A_W' a, A_W r) and two weight gradients for all rows of the group at once (a grouped
convolution, a batched matrix product). ``DerivedHamiltonian`` replaces only ``value_and_grad``, what
L-BFGS asks for, and adds the Kronecker-factored Gauss-Newton preconditioner of L-BFGS (residual entries);
everything else (values at trial points, gains) stays the autograd ``LayerHamiltonian``. In a process
group both are totals over the ranks, like the autograd objective's.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

from .affine import conv_weight_grad, input_gram
from .groups import LayerGroup
from .hamiltonian import LayerHamiltonian
from .layers import Residual

__all__ = ["DerivedHamiltonian", "derived_objective", "has_derived_objective", "PRECONDITIONINGS"]

#: the preconditioners of L-BFGS on residual entries
PRECONDITIONINGS = ("kronecker", "diagonal")


def _conv_supported(conv: torch.nn.Conv2d) -> bool:
    return (conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"
            and isinstance(conv.padding, tuple))


def _structure(group: LayerGroup) -> Optional[Tuple[torch.nn.Module, Optional[float], bool]]:
    """(the affine map A, delta (None: the affine entry itself), has bias), or None for other layers."""
    layer, prefix, delta = group.template, "", None
    if type(layer) is Residual:
        if type(layer.module) is not torch.nn.Sequential or len(layer.module) != 2:
            return None
        if type(layer.module[1]) is not torch.nn.Tanh:
            return None
        layer, prefix, delta = layer.module[0], "module.0.", layer.delta
    if not (type(layer) is torch.nn.Linear or (type(layer) is torch.nn.Conv2d and _conv_supported(layer))):
        return None
    if group.names == [prefix + "weight", prefix + "bias"]:
        return layer, delta, True
    if group.names == [prefix + "weight"] and layer.bias is None:
        return layer, delta, False
    return None  # a fixed (excluded) bias or weight: the autograd objective handles it


def _tanh_of_doubled_(z2: torch.Tensor) -> torch.Tensor:
    """tanh(z) in place from z2 = 2 z, as 2 sigmoid(2 z) - 1: the CPU build's tanh is not vectorised (on 100k
    float32 values 250 us against 72 us; the same 3x in float64), and L-BFGS evaluates it about 15 times a step.
    Its error is float32's rounding of a number of size 1 (at most 1.8e-7 against 3e-8 for torch.tanh). The
    caller forms 2 z by the affine map with doubled weights (exact: a power of two), a pass over z fewer."""
    return torch.sigmoid_(z2).mul_(2).sub_(1)


class DerivedHamiltonian(LayerHamiltonian):
    """``LayerHamiltonian`` of a residual tanh or affine group with the hand-derived ``value_and_grad`` (module doc).

    Rows u [G, m] are (weight, bias) flattened per layer; the frozen data are laid out once so that the G
    layers run as one grouped convolution ([B, G C, H, W]) or one batched matrix product ([G, N, K]).
    """

    #: precondition L-BFGS on residual entries (``preconditioning``: "kronecker" or "diagonal")
    precondition = True

    def __init__(self, objective: LayerHamiltonian, affine: torch.nn.Module, delta: Optional[float], bias: bool,
                 preconditioning: str = "kronecker"):
        super().__init__(objective.group, objective.data, objective.rho, objective.eps, objective.weight_decay,
                         objective._reduce)
        self.affine, self.bias = affine, bias
        self.residual, self.delta = delta is not None, 1.0 if delta is None else float(delta)
        d = self.data
        G = d.controls.shape[0]
        self._conv = isinstance(affine, torch.nn.Conv2d)
        if self._conv:
            def lay(t):  # [G, B, C, H, W] -> [B, G C, H, W]
                return t.transpose(0, 1).reshape(t.shape[1], G * t.shape[2], *t.shape[3:])

            def unlay(t):  # the inverse, a view
                return t.reshape(t.shape[0], G, -1, *t.shape[2:]).transpose(0, 1)
        else:
            def lay(t):  # [G, B, ..., K] -> [G, N, K]
                return t.reshape(G, -1, t.shape[-1])

            def unlay(t):
                return t.reshape(d.inputs.shape)
        self._x, self._y, self._p = (lay(t) for t in (d.inputs, d.outputs, d.costates))
        if self.residual:  # tanh(z) at theta^k, read by p_n, the preconditioner and L-BFGS's first evaluation
            with torch.no_grad():
                W, b = self._weights(d.controls)
                self._t_k = self._tanh_at(self._x, W, b)
        if d.input_costates is None:  # not formed yet (``layer_data``): p_n here, without the vjp
            self._p_in = self._input_costates()
            self.data = d._replace(input_costates=unlay(self._p_in))  # for the autograd methods (values)
        else:
            self._p_in = lay(d.input_costates)
        if self.residual:  # the terms that do not depend on theta, formed once for L-BFGS's evaluations
            with torch.no_grad():
                self._y_x, self._p_in_p = self._y - self._x, self._p_in - self._p  # e, r at tanh = 0
                self._xp = self._row_sums(self._x * self._p)  # the skip connection's p . x
        # ProjectedLBFGS's preconditioner (maximisers.IntervalObjective)
        if preconditioning not in PRECONDITIONINGS:
            raise ValueError(f"preconditioning must be one of {PRECONDITIONINGS}, got {preconditioning!r}")
        self.preconditioner = ((self._kronecker_blocks if preconditioning == "kronecker" else self._gauss_newton_diagonal)
                               if self.residual and self.precondition else None)
        self._parts = None  # (u, the terms of the values at u that its gradient reuses): ``trial_values``

    def _at_start(self, u: torch.Tensor) -> bool:
        """Whether u is theta^k of a residual entry. There the feasibility residuals e and r vanish by construction
        (x_{n+1} = g(x_n, theta^k), p_n = grad_x H(theta^k)), up to the rounding of recomputing them: the first
        evaluation skips them (an adjoint, a forward map and a weight gradient fewer) and the curvature is exact."""
        return self.residual and torch.equal(u, self.data.controls)

    def _input_costates(self) -> torch.Tensor:
        """p_n = grad_x H(x_n, p_{n+1}, theta^k) in the grouped layout: p + delta A_W' (s * p) (A_W' p for an
        affine entry), the numbers of ``hamiltonian.input_costates``'s vjp in a third of its time."""
        with torch.no_grad():
            W, _ = self._weights(self.data.controls)
            if not self.residual:
                return self._adjoint(self._p, W)
            t = self._t_k
            s = torch.addcmul(torch.ones((), dtype=t.dtype, device=t.device), t, t, value=-1)
            return torch.add(self._p, self._adjoint(s.mul_(self._p), W), alpha=self.delta)

    def _tanh(self, u: torch.Tensor, x: torch.Tensor, W: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
        """tanh(A_W x + b) at the rows u (read only: at theta^k it is the one formed at construction)."""
        if torch.equal(u, self.data.controls):
            return self._t_k
        return self._tanh_at(x, W, b)

    def _tanh_at(self, x: torch.Tensor, W: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
        return _tanh_of_doubled_(self._forward(x, W * 2, None if b is None else b * 2))

    # -- the affine map A_W of all rows at once, its adjoint in x and its weight gradient --------------
    def _weights(self, u: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        G = u.shape[0]
        n_w = self.affine.weight.numel()
        W = u[:, :n_w].reshape(G, *self.affine.weight.shape)
        b = u[:, n_w:] if self.bias else None
        if self._conv:
            return W.reshape(G * W.shape[1], *W.shape[2:]), None if b is None else b.reshape(-1)
        return W, b

    def _forward(self, x, W, b=None):
        if self._conv:
            return F.conv2d(x, W, b, padding=self.affine.padding, groups=self.data.controls.shape[0])
        z = x @ W.transpose(1, 2)
        return z if b is None else z + b[:, None, :]

    def _adjoint(self, a, W):
        """A_W' a: the transposed map (the gradient of a . A_W x in x)."""
        if self._conv:
            return F.conv_transpose2d(a, W, padding=self.affine.padding, groups=self.data.controls.shape[0])
        return a @ W

    def _weight_grad(self, x, a, W):
        """The gradient of a . A_W x in W: [G, *weight.shape]."""
        G = self.data.controls.shape[0]
        if self._conv:
            return conv_weight_grad(a, x, W, self.affine.padding, G).reshape(G, -1)
        return (a.transpose(1, 2) @ x).reshape(G, -1)

    def _row_sums(self, t: torch.Tensor) -> torch.Tensor:
        """Sum per row (layer) [G] of a tensor in the grouped layout."""
        G = self.data.controls.shape[0]
        if self._conv:
            return t.reshape(t.shape[0], G, -1).sum((0, 2))
        return t.reshape(G, -1).sum(1)

    def _bias_grad(self, dz: torch.Tensor) -> torch.Tensor:
        G = self.data.controls.shape[0]
        if self._conv:
            return dz.sum((0, 2, 3)).reshape(G, -1)
        return dz.sum(1)

    # -- IntervalObjective ----------------------------------------------------------------------------
    def value_and_grad(self, u: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if self._last is not None and torch.equal(self._last[0], u):
            return self._last[1], self._last[2]
        u = u.detach()
        fused = self._totalled(lambda: self._local_value_and_grad(u), u.shape[:-1] + (u.shape[-1] + 1,), u)
        values, grads = fused[:, 0], fused[:, 1:]
        self._last = (u.clone(), values, grads)
        return values, grads

    def trial_values(self, u: torch.Tensor) -> torch.Tensor:
        """The values of ``value_and_grad`` at u [G] without the gradient (an adjoint map and two weight gradients
        fewer): L-BFGS's line search tries its steps with them, and ``value_and_grad`` at the accepted step reuses
        what they computed."""
        u = u.detach()
        return self._totalled(lambda: self._regularised_values(u, self._local_terms(u)[1]), u.shape[:-1], u)

    def _local_terms(self, u: torch.Tensor) -> tuple:
        """(kind, this process's values at u [G] before the weight decay and SQH terms, the terms the gradient
        reuses), kept for the last u; kind: "start" (theta^k of a residual entry), "residual" or "affine"."""
        if self._parts is not None and torch.equal(self._parts[0], u):
            return self._parts[1]
        rho, delta = self.rho, self.delta
        with torch.no_grad():
            W, b = self._weights(u)
            x, y, p, p_in = self._x, self._y, self._p, self._p_in
            if self._at_start(u):  # e = r = 0: the plain Hamiltonian's
                t = self._t_k
                values = self._row_sums(p * t).mul_(delta).add_(self._xp)
                terms = ("start", values, W, t)
            elif self.residual:  # fused and in place where possible: L-BFGS evaluates this about 15 times a step
                t = self._tanh(u, x, W, b)
                s = torch.addcmul(torch.ones((), dtype=t.dtype, device=t.device), t, t, value=-1)  # 1 - t^2
                a = s * p
                e = torch.add(self._y_x, t, alpha=-delta)
                r = self._adjoint(a, W)
                r = torch.add(self._p_in_p, r, alpha=-delta, out=r)  # in the adjoint's buffer
                squares = (e * e).addcmul_(r, r).mul_(-0.5 * rho).addcmul_(p, t, value=delta)
                values = self._row_sums(squares) + self._xp
                terms = ("residual", values, W, t, s, a, e, r)
            else:
                z = self._forward(x, W, b)
                e = y - z
                r = p_in - self._adjoint(p, W)
                values = self._row_sums(p * z - 0.5 * rho * (e * e)) - 0.5 * rho * self._row_sums(r * r)
                terms = ("affine", values, W, e, r)
        self._parts = (u.clone(), terms)
        return terms

    def _local_value_and_grad(self, u: torch.Tensor) -> torch.Tensor:
        """[G, 1 + m]: this process's values and gradients (its samples; weight decay and eps are divided
        among the ranks by the caller)."""
        rho, delta = self.rho, self.delta
        kind, values, W, *rest = self._local_terms(u)
        x, p = self._x, self._p
        with torch.no_grad():
            if kind == "start":  # the plain Hamiltonian's
                (t,) = rest
                dz = torch.addcmul(torch.ones((), dtype=t.dtype, device=t.device), t, t, value=-1).mul_(p).mul_(delta)
                grads = [self._weight_grad(x, dz, W)] + ([self._bias_grad(dz)] if self.bias else [])
                return self._regularised(u, values, torch.cat(grads, dim=1))
            if kind == "residual":
                t, s, a, e, r = rest
                # dz / delta = s * (p + rho e - 2 rho t v p), v = A_W r, in the buffer of A_W r (-2 rho in the weights)
                dz = self._forward(r, W * (-2 * rho)).mul_(t).mul_(p).add_(p).add_(e, alpha=rho).mul_(s)
            else:
                e, r = rest
                a = p
                dz = p + rho * e
            # delta (1 for an affine entry) multiplies the sums, not the images
            grads = [(self._weight_grad(x, dz, W) + rho * self._weight_grad(r, a, W)).mul_(delta)]
            if self.bias:
                grads.append(self._bias_grad(dz).mul_(delta))
            return self._regularised(u, values, torch.cat(grads, dim=1))

    def curvature(self, u: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """d' (-Hessian) d per row [G] (L-BFGS's first step length). At theta^k of a residual entry, where e = r = 0,
        exactly, from three maps of the step (v = A_D x + b_D, z's change along d):

            -Htilde''[d, d] = -p . g'' + rho |g'|^2 + rho |r'|^2 + (wd + 2 eps) |d|^2,
            g' = delta s v,  g'' = -2 delta t s v^2,  r' = -delta (A_D' (s p) + A_W' (-2 t s v p)),

        in a third of the difference quotient's work (an evaluation of the value and gradient); elsewhere the
        difference quotient of ``LayerHamiltonian``."""
        u, d = u.detach(), d.detach()
        if not self._at_start(u):
            return super().curvature(u, d)
        rho, delta = self.rho, self.delta

        def local():
            with torch.no_grad():
                W, _ = self._weights(u)
                D, b_D = self._weights(d)
                t, p = self._t_k, self._p
                s = torch.addcmul(torch.ones((), dtype=t.dtype, device=t.device), t, t, value=-1)
                v = self._forward(self._x, D, b_D)
                tsv = (t * s).mul_(v)  # t s v: g'' = -2 delta t s v^2
                r_change = self._adjoint(s * p, D).add_(self._adjoint(tsv * p, W), alpha=-2)  # -r' / delta
                terms = (s * v).square_().mul_(rho * delta * delta).addcmul_(p, tsv * v, value=2 * delta)
                values = self._row_sums(terms) + (rho * delta * delta) * self._row_sums(r_change * r_change)
                return values + (self.weight_decay + 2 * self.eps) * (d * d).sum(1)

        return self._totalled(local, u.shape[:-1], u)

    def _regularised(self, u: torch.Tensor, values: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        """[G, 1 + m]: values [G] and gradients [G, m] with the weight decay and SQH terms."""
        values = self._regularised_values(u, values)
        if self.weight_decay:
            grads = grads - self.weight_decay * u
        if self.eps:
            grads = grads - 2 * self.eps * (u - self.data.controls)
        return torch.cat([values[:, None], grads], dim=1)

    def _regularised_values(self, u: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """values [G] with the weight decay and SQH terms."""
        if self.weight_decay:
            values = values - 0.5 * self.weight_decay * (u * u).sum(1)
        if self.eps:
            diff = u - self.data.controls
            values = values - self.eps * (diff * diff).sum(1)
        return values

    def _kronecker_blocks(self, u: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """``ProjectedLBFGS``'s preconditioner at theta^k: the inverse of a Kronecker-factored Gauss-Newton
        approximation of -Hessian (docs/theory.md). The Gauss-Newton matrix of the two feasibility terms (the
        factor s = tanh'(z) held fixed) is rho delta^2 (J_e' J_e + J_r' J_r); per output unit o its state part is
        the block sum s_o^2 x~ x~' over the batch and positions (x~ the input patch, then a 1 for the bias),
        approximated as sigma_o X~ with X~ = sum x~ x~' and sigma_o the mean of s_o^2 (K-FAC's factorisation),
        and its co-state part (which couples the units) by the mean a_o of its diagonal times the identity.
        With c = weight decay + 2 eps each block rho delta^2 (sigma_o X~ + a_o I) + c I is inverted in X~'s
        eigenbasis: one eigendecomposition per layer. The input patches of these layers are strongly
        correlated, which the Gauss-Newton diagonal missed (its steps were ~10x too long): on the CNN study's
        residual layers the first preconditioned step takes 97-100 % of the increase that L-BFGS reaches when
        run to convergence, where 10 diagonally preconditioned iterations took 45-70 %."""
        rho, delta = self.rho, self.delta
        G = u.shape[0]
        f64 = torch.float64
        O = self.affine.out_channels if self._conv else self.affine.out_features

        def local():
            with torch.no_grad():
                t = self._t_k  # tanh(z) at theta^k ([B, G O, H', W'] or [G, N, O])
                s2 = torch.addcmul(torch.ones((), dtype=t.dtype, device=t.device), t, t, value=-1).square_()
                a2 = s2 * self._p * self._p
                if self._conv:
                    # a weight (o, c, j)'s co-state curvature: a2_o summed over the positions where kernel offset j
                    # reaches into the image; its mean over (c, j) weighs each position by the fraction that do
                    k, pad = self.affine.kernel_size, self.affine.padding
                    ones = torch.ones((1, 1) + tuple(self.data.inputs.shape[-2:]), dtype=t.dtype, device=t.device)
                    reach = F.conv2d(ones, torch.ones((1, 1) + tuple(k), dtype=t.dtype, device=t.device),
                                     padding=pad) / (k[0] * k[1])  # [1, 1, H', W']
                    B = t.shape[0]
                    s2_sums = s2.reshape(B, G, O, -1).sum((0, 3), dtype=f64)
                    a2_sums = (a2 * reach).reshape(B, G, O, -1).sum((0, 3), dtype=f64)
                    count = B * t.shape[2] * t.shape[3]
                else:
                    s2_sums, a2_sums = s2.sum(1, dtype=f64), a2.sum(1, dtype=f64)
                    count = t.shape[1]
                X = input_gram(self.data.inputs, self.affine, self.bias)  # [G, M, M]
                # the count, and c: in a process group each rank holds 1 / world of the weight decay and eps
                scalars = torch.tensor([float(count), self.weight_decay + 2 * self.eps], dtype=f64, device=u.device)
                return torch.cat([X.flatten(1), s2_sums, a2_sums, scalars.expand(G, 2)], dim=1)

        M = (self.data.controls.shape[1] - (O if self.bias else 0)) // O + int(self.bias)
        fused = self._totalled(local, (G, M * M + 2 * O + 2), u.new_zeros((), dtype=f64))
        X = fused[:, :M * M].reshape(G, M, M)
        sigma = fused[:, M * M:M * M + O] / fused[:, -2:-1]  # [G, O]
        a_mean = fused[:, M * M + O:M * M + 2 * O]
        lam, U = torch.linalg.eigh(X)
        den = rho * delta * delta * (sigma[:, :, None] * lam.clamp_min(0)[:, None, :] + a_mean[:, :, None])
        den = den + fused[:, -1:, None]  # + c, [G, O, M]
        # a floor: a direction that nothing in the batch curves keeps a finite step
        den = torch.maximum(den, torch.finfo(f64).eps * den.flatten(1).amax(-1)[:, None, None])
        n_w = O * (M - int(self.bias))

        def solve(q: torch.Tensor) -> torch.Tensor:
            blocks = q[:, :n_w].reshape(G, O, -1)
            if self.bias:
                blocks = torch.cat([blocks, q[:, n_w:, None]], dim=2)
            out = ((blocks.to(f64) @ U) / den) @ U.transpose(1, 2)  # [G, O, M]
            parts = [out[:, :, :M - int(self.bias)].reshape(G, -1)]
            if self.bias:
                parts.append(out[:, :, -1])
            return torch.cat(parts, dim=1).to(q.dtype)

        return solve


    def _gauss_newton_diagonal(self, u: torch.Tensor) -> torch.Tensor:
        """``ProjectedLBFGS``'s diagonal preconditioner at u [G, m]: the Gauss-Newton diagonal D of
        -Hessian, rho delta^2 (s^2 . x^2 + a^2 . 1) per weight and rho delta^2 sum s^2 per bias (the squares of the
        derivatives of e and r in each parameter, s = tanh' held fixed), plus the weight decay and 2 eps. It
        rescales the biases (their entries 30-75x the weights' mean on the CNN study's residual layers) but not
        the coupling of weights over correlated inputs: 10 iterations take 55-70 % of the maximum increase there,
        which a fixed rho relies on (docs/networks.md: an exact maximiser makes its early steps erratic)."""
        rho, delta = self.rho, self.delta

        def local():
            with torch.no_grad():
                W, b = self._weights(u.detach())
                x, p = self._x, self._p
                t = self._tanh(u, x, W, b)
                s2 = (1 - t * t) ** 2
                a2 = s2 * p * p
                # the co-state part a2 . 1: its input is constant, so the batch is summed first
                ones = torch.ones_like(x[:1] if self._conv else x[:, :1])
                a2_sum = a2.sum(0, keepdim=True) if self._conv else a2.sum(1, keepdim=True)
                weights = self._weight_grad(x * x, s2, W) + self._weight_grad(ones, a2_sum, W)
                parts = [(rho * delta * delta) * weights]
                if self.bias:
                    parts.append((rho * delta * delta) * self._bias_grad(s2))
                return torch.cat(parts, dim=1) + (self.weight_decay + 2 * self.eps)

        D = self._totalled(local, u.shape, u)
        # a floor: a parameter that nothing in the batch touches keeps a finite step
        return torch.maximum(D, torch.finfo(D.dtype).eps * D.amax(-1, keepdim=True))  # per row, no host sync


def has_derived_objective(group: LayerGroup) -> bool:
    """Whether ``derived_objective`` can apply to the group (it also needs rho > 0 and floating inputs)."""
    return group.penalty is None and group.batched and _structure(group) is not None


def derived_objective(group: LayerGroup, objective: LayerHamiltonian,
                      preconditioning: str = "kronecker") -> Optional[DerivedHamiltonian]:
    """``DerivedHamiltonian`` for a residual tanh or affine group with rho > 0, else None (in a process group its
    sums are totals over the ranks, as the autograd objective's); ``preconditioning`` of its L-BFGS (residual
    entries): "kronecker" (``_kronecker_blocks``) or "diagonal" (``_gauss_newton_diagonal``)."""
    if objective.penalty is not None or not group.batched:
        return None
    if not (objective.rho > 0 and objective.data.inputs.is_floating_point()):
        return None
    structure = _structure(group)
    if structure is None:
        return None
    return DerivedHamiltonian(objective, *structure, preconditioning=preconditioning)
