"""The layers' augmented Hamiltonians: the engine's interval objective with layer data.

For layer n with frozen x_n, x_{n+1} = g_n(x_n, theta^k), p_{n+1} and
p_n = grad_x H_n(x_n, p_{n+1}, theta^k) (paper Alg. 3, discrete eq. (7)):

    Htilde_n(theta) = p_{n+1} . g_n(x_n, theta) - L_n(theta)
                      - rho/2 |x_{n+1} - g_n(x_n, theta)|^2
                      - rho/2 |p_n - grad_x H_n(x_n, p_{n+1}, theta)|^2
                      - eps |theta - theta^k|^2                      (SQH)

Sums run over the mini-batch, and p is the co-state of the batch-mean loss: the
convention of the paper's reference code (its rho 0.03 at batch 128 means this).
L_n(theta) = weight_decay/2 |theta|^2 plus the layer's ``penalties`` (pmp.L1 / L0,
handled exactly by the maximisers, as for control problems).

``LayerHamiltonian`` implements ``maximisers.IntervalObjective``: rows are the layers
of a ``LayerGroup`` (u [G, m], their flattened parameters), every lengths h_n = 1, and
one evaluation serves all rows through ``torch.func.vmap``. So the engine's maximisers
(projected L-BFGS, proximal gradient, ...) run on it unchanged.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
from torch.func import grad_and_value, vjp, vmap

from .groups import LayerGroup

__all__ = ["LayerData", "LayerHamiltonian", "layer_data"]


class LayerData(NamedTuple):
    """The frozen data of a group's G layers (what ``IntervalData`` is for mesh intervals).

    inputs x_n, outputs x_{n+1}, costates p_{n+1}, input_costates p_n: [G, B, ...] (None: not formed yet,
    ``with_input_costates`` forms it; zeros where no objective needs it);
    controls theta^k [G, m]; lengths: ones [G] (a layer is one time step: no interval length).
    """

    inputs: torch.Tensor
    outputs: torch.Tensor
    costates: torch.Tensor
    input_costates: Optional[torch.Tensor]
    controls: torch.Tensor
    lengths: torch.Tensor


class LayerHamiltonian:
    """Htilde of every layer in a group, to be maximised over theta [G, m]; see the module docstring.

    Args:
        group: the layers (``LayerGroup``).
        data: their frozen ``LayerData``.
        rho: the E-MSA weight of the feasibility terms (0: basic MSA, the costate term is skipped).
        eps: the SQH proximity weight.
        weight_decay: L_n(theta) = weight_decay/2 |theta|^2.
        reduce: None (one process) or the ``reduce.SampleReducer`` of a process group: sums over
            the batch are made global by its ``totals`` (one fused buffer per evaluation), and an
            exception while this rank computes its part is raised on every rank (``guard``).
    """

    def __init__(self, group: LayerGroup, data: LayerData, rho: float = 0.0, eps: float = 0.0,
                 weight_decay: float = 0.0, reduce=None):
        self.group, self.data = group, data
        self.rho, self.eps, self.weight_decay = float(rho), float(eps), float(weight_decay)
        self.penalty = group.penalty
        self._reduce = reduce
        self._last = None  # (u, values, gradients) of the last value_and_grad

    # -- one layer -------------------------------------------------------------------------
    def _layer(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.group.call(theta, x)

    def _row(self, theta, x, y, p, p_in, theta_k):
        """Htilde of one layer at theta [m] (a 0-d tensor); x, y, p, p_in: [B, ...]."""
        if self.rho > 0 and x.is_floating_point():
            out, pullback = vjp(lambda x_: self._layer(theta, x_), x)
            (grad_x,) = pullback(p)  # grad_x H_n(x_n, p_{n+1}, theta)
            feasibility = ((y - out) ** 2).sum() + ((p_in - grad_x) ** 2).sum()
        elif self.rho > 0:
            # integer input (token indices of an Embedding): x_n has no co-state, so the co-state
            # equation p_n = grad_x H_n is no constraint and only the state term remains
            out = self._layer(theta, x)
            feasibility = ((y - out) ** 2).sum()
        else:
            out = self._layer(theta, x)
            feasibility = out.new_zeros(())
        value = (p * out).sum() - 0.5 * self.rho * feasibility
        if self.weight_decay:
            value = value - 0.5 * self.weight_decay * (theta * theta).sum()
        if self.eps:
            value = value - self.eps * ((theta - theta_k) ** 2).sum()
        return value

    def _rows(self, fn, u: torch.Tensor, *extra):
        """Apply fn(theta, x, y, p, p_in, theta_k, *extra) to every row: vmap, or directly for an unbatched group."""
        d = self.data
        if d.input_costates is None and self.rho > 0 and d.inputs.is_floating_point():
            raise RuntimeError("pmp.nn: the augmented Hamiltonian needs the input co-states p_n; build the objective "
                               "with LayerHamiltonian.with_input_costates()")
        p_in = d.input_costates if d.input_costates is not None else d.inputs  # read only when rho > 0
        args = (u, d.inputs, d.outputs, d.costates, p_in, d.controls) + extra
        if self.group.batched:
            return vmap(fn)(*args)
        out = fn(*(a[0] for a in args))
        return tuple(o.unsqueeze(0) for o in out) if isinstance(out, tuple) else out.unsqueeze(0)

    # -- IntervalObjective -----------------------------------------------------------------
    def smooth(self, u: torch.Tensor) -> torch.Tensor:
        """Htilde of every row without the L1 / L0 penalty [G] (differentiable in u in one process)."""
        if self._reduce is None:
            return self._rows(self._row, u)
        values = None
        with self._reduce.guard() as guard:  # a failure here still joins the collective, then raises everywhere
            values = self._rows(self._row, u)
        if values is None:
            values = u.new_zeros(u.shape[:-1])
        return self._reduce.totals(values.detach(), error=guard.error)[0]

    def value_and_grad(self, u: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if self._last is not None and torch.equal(self._last[0], u):
            return self._last[1], self._last[2]

        def local():
            grads, values = self._rows(grad_and_value(self._row), u.detach())
            return torch.cat([values[:, None], grads], dim=1)

        fused = self._totalled(local, u.shape[:-1] + (u.shape[-1] + 1,), u)
        values, grads = fused[:, 0], fused[:, 1:]
        self._last = (u.detach().clone(), values.detach(), grads.detach())
        return self._last[1], self._last[2]

    def _totalled(self, local, shape, like: torch.Tensor) -> torch.Tensor:
        """``local()`` (this process's sums over its samples, a tensor of ``shape``), made a total over the
        process group in one fused buffer: an exception in ``local`` still joins the collective, then is
        raised on every rank. In one process ``local()`` itself."""
        if self._reduce is None:
            return local()
        fused = None
        with self._reduce.guard() as guard:
            fused = local()
        if fused is None:
            fused = like.new_zeros(shape)
        return self._reduce.totals(fused, error=guard.error)[0]

    def curvature(self, u: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """d' (-Hessian of ``smooth``) d per row [G], from a difference of gradients along d.

        The exact Hessian-vector product would differentiate the co-state term (itself a
        vector-Jacobian product) twice more: measured ~3x a gradient on a convolution. The
        difference quotient costs one gradient (the one at u is cached: L-BFGS asks for it
        first) and is exact for layers whose output is linear in theta (Linear, Conv2d
        entries), where the objective is quadratic; L-BFGS uses it only for its first step length.
        """
        u, d = u.detach(), d.detach()
        scale = d.abs().amax(-1, keepdim=True)  # [G, 1]
        size = 1e-3 * (1.0 + u.abs().amax(-1, keepdim=True))
        step = torch.where(scale > 0, size / torch.where(scale > 0, scale, torch.ones_like(scale)),
                           torch.zeros_like(scale))
        _, g0 = self.value_and_grad(u)
        _, g1 = self.value_and_grad(u + step * d)
        safe = torch.where(step > 0, step, torch.ones_like(step))
        return torch.where(step[:, 0] > 0, -(d * (g1 - g0)).sum(-1) / safe[:, 0], torch.zeros_like(step[:, 0]))

    def with_input_costates(self) -> "LayerHamiltonian":
        """This objective with p_n formed (itself when it has them): ``layer_data`` skips them for a group
        that the closed form solves without them (``affine.affine_maximise``)."""
        if self.data.input_costates is not None:
            return self
        d = self.data
        data = d._replace(input_costates=input_costates(self.group, d.inputs, d.costates, d.controls))
        return LayerHamiltonian(self.group, data, self.rho, self.eps, self.weight_decay, self._reduce)

    def penalty_value(self, u: torch.Tensor) -> torch.Tensor:
        if self.penalty is None:
            return u.new_zeros(u.shape[:-1])
        return self.penalty.value(u)

    def __call__(self, u: torch.Tensor) -> torch.Tensor:
        return self.smooth(u) - self.penalty_value(u)

    def candidates(self, U: torch.Tensor) -> torch.Tensor:
        """The total objective of C candidate rows U [C, G, m] -> [C, G] (detached)."""
        with torch.no_grad():
            return torch.stack([self(u) for u in U])

    def hamiltonian_gain(self, u: torch.Tensor, plain_gradient: Optional[torch.Tensor] = None) -> torch.Tensor:
        """H(u) - H(theta^k) of the plain Hamiltonian, every row [G]: one pass of the layer, at u.

        The recorded output x_{n+1} = g_n(x_n, theta^k) stands in for the pass at theta^k; a layer linear in
        its parameters (a Linear or convolution whose rows hold all of them) passes the step u - theta^k
        itself, g(x, u) - g(x, theta^k) = g(x, u - theta^k), with no difference of two nearly equal sums.
        ``plain_gradient``: for a layer affine in its rows, J'p [G, m], the gradient of p . g in theta (the
        same at every theta: ``affine.QuadraticSums.gradient``, a total over the ranks in a process group); the
        gain is then J'p . (u - theta^k), no pass.
        """
        d = self.data
        theta_k = d.controls
        linear = _linear_in_parameters(self.group)
        step = u - theta_k
        plain_change = None
        if plain_gradient is not None:
            plain_change = (plain_gradient * step.to(plain_gradient.dtype)).sum(1).to(u.dtype)

        def local():
            with torch.no_grad():
                if plain_change is not None:
                    # one process: the whole change here; a process group: a total already, added after
                    change = plain_change if self._reduce is None else torch.zeros_like(plain_change)
                else:
                    rows = step if linear else u
                    if rows.shape[0] > 1:
                        out = vmap(self.group.call)(rows, d.inputs)
                    else:  # one layer (an unbatched group has one): without vmap's overhead
                        out = self.group.call(rows[0], d.inputs[0]).unsqueeze(0)
                    if not linear:
                        out = out - d.outputs
                    change = (d.costates * out).flatten(1).sum(1)
                if self.weight_decay:
                    change = change - 0.5 * self.weight_decay * (step * (u + theta_k)).sum(1)
                return change

        change = self._totalled(local, u.shape[:-1], u)
        if plain_change is not None and self._reduce is not None:
            change = change + plain_change
        if self.penalty is not None:
            change = change - (self.penalty.value(u) - self.penalty.value(theta_k))
        return change


_LINEAR_ENTRIES = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


def _linear_in_parameters(group: LayerGroup) -> bool:
    """Whether g(x, theta) is linear in the group's rows: a Linear or convolution whose rows hold the weight
    and the bias it has (a fixed bias would make it affine)."""
    layer = group.template
    return type(layer) in _LINEAR_ENTRIES and group.names == (["weight"] if layer.bias is None else ["weight", "bias"])


def input_costates(group: LayerGroup, x: torch.Tensor, p: torch.Tensor, controls: torch.Tensor) -> torch.Tensor:
    """p_n = grad_x H_n(x_n, p_{n+1}, theta^k) [G, B, ...]: one batched vjp of the layers at theta^k."""
    if not x.is_floating_point():  # integer inputs (token indices) have no co-state
        return torch.zeros_like(x)

    def one(theta, x_, p_):
        _, pullback = vjp(lambda z: group.call(theta, z), x_)
        return pullback(p_)[0]

    with torch.no_grad():
        if group.batched:
            return vmap(one)(controls, x, p)
        return one(controls[0], x[0], p[0]).unsqueeze(0)


def layer_data(group: LayerGroup, records, controls: torch.Tensor,
               need_input_costates: Optional[bool]) -> LayerData:
    """Stack the records of a group's layers into ``LayerData``; p_n from one batched vjp at theta^k, or None
    (formed later by ``LayerHamiltonian.with_input_costates``) when ``need_input_costates`` is None."""
    def stacked(tensors):  # one layer: a view (nothing writes into the records), not a copy
        return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)

    x = stacked([records[n].inputs for n in group.indices])
    y = stacked([records[n].outputs for n in group.indices])
    p = stacked([records[n].costates for n in group.indices])
    lengths = torch.ones(group.rows, dtype=controls.dtype, device=controls.device)
    if need_input_costates is None:
        return LayerData(x, y, p, None, controls, lengths)
    if not need_input_costates:
        return LayerData(x, y, p, torch.zeros_like(x), controls, lengths)
    return LayerData(x, y, p, input_costates(group, x, p, controls), controls, lengths)
