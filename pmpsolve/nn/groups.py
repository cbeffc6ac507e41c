"""Layers of equal shape as the rows of one maximisation (DESIGN: Jacobi over layers).

With x_n and p_{n+1} frozen, the layers' Hamiltonians are independent, so layers
that compute the same function of (x, theta) with parameters of the same shapes
(e.g. the residual blocks of a network) are maximised together: their flattened
parameters are the rows u [G, m] of one objective, exactly as the mesh intervals
are the rows of the continuous engine's, and the engine's maximisers run on them
unchanged. A layer with buffers (batch norm) is a group of its own.
"""
from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional, Set, Tuple

import torch

from ..controls import Box, ControlSet, Finite, Reals
from ..penalties import ControlPenalty

__all__ = ["LayerGroup", "ComponentPenalty", "group_layers"]


class ComponentPenalty(ControlPenalty):
    """An L1 / L0 penalty whose weight differs per component (0 on parameters without a penalty).

    ``weight`` is a tensor [m] (or [G, m]: one row per layer of a group); ``value`` and ``prox``
    broadcast it, so the engine's proximal maximiser and closed-form thresholds use it as they use
    a scalar weight. ``factors`` [m] (or None) are the f of relative penalties (``pmp.L0(f,
    relative=True)``), 0 elsewhere: ``resolved`` turns them into weights at each step.
    """

    def __init__(self, kind: str, weight: torch.Tensor, factors: Optional[torch.Tensor] = None):
        super().__init__(0.0)
        self.name, self.weight = kind, weight
        self.factors = factors if factors is not None and bool((factors != 0).any()) else None

    def resolved(self, rows: torch.Tensor, sizes: List[int], proximity: float) -> "ComponentPenalty":
        """The penalty of rows [G, m] (one per layer) with its relative parts as weights [G, m].

        The weight's unit is what the bSQH step's proximity term -c (theta - theta^k)^2 charges for
        moving a weight of the parameter tensor's typical size to zero (c = ``proximity``): for L0
        the weight is f c mean(theta^2), so that the hard threshold |v| > sqrt(weight / c) is sqrt(f)
        times the tensor's root mean square (at a fixed point of the step, where the loss's gradient
        vanishes on the non-zero weights, at most 1/f of them are non-zero: Markov's inequality); for
        L1 it is 2 f c mean |theta|, so that soft thresholding shrinks by f times the mean magnitude.
        Both follow the weights' scale, not the loss's or the inputs'."""
        if self.factors is None:
            return self
        pieces = torch.split(rows.detach().to(torch.float64), sizes, dim=-1)
        if self.name == "L0":
            units = [proximity * (piece * piece).mean(-1, keepdim=True).expand_as(piece) for piece in pieces]
        else:
            units = [2.0 * proximity * piece.abs().mean(-1, keepdim=True).expand_as(piece) for piece in pieces]
        unit = torch.cat(units, dim=-1).cpu()
        return ComponentPenalty(self.name, self.weight + self.factors * unit)

    def value(self, u):
        w = self.weight.to(dtype=u.dtype, device=u.device)
        if self.name == "L1":
            return (w * u.abs()).sum(-1)
        return (w * (u != 0).to(u.dtype)).sum(-1)

    def prox(self, v, step):
        w = self.weight.to(dtype=v.dtype, device=v.device)
        if self.name == "L1":
            return torch.sign(v) * (v.abs() - w * step).clamp_min(0.0)
        return torch.where(v * v > 2 * w * step, v, torch.zeros_like(v))

    def __repr__(self):
        return f"ComponentPenalty({self.name}, {int((self.weight != 0).sum())} of {self.weight.numel()} components)"


class LayerGroup:
    """Layers ``indices`` of a Sequential computing the same function: their parameters as rows [G, m].

    Args:
        indices: positions of the layers in the Sequential.
        modules: the layers (``modules[0]`` is the template the functional calls use).
        names: the parameter names inside each layer (``module.named_parameters()``), in order.
        controls: the control set of a row (a Box / Reals of shape (m,)).
        penalty: the per-component penalty of a row, or None.
    """

    def __init__(self, indices: List[int], modules: List[torch.nn.Module], names: List[str],
                 controls: ControlSet, penalty: Optional[ControlPenalty]):
        self.indices, self.modules, self.names = indices, modules, names
        self.template = modules[0]
        params = dict(self.template.named_parameters())
        self.shapes = [params[name].shape for name in names]
        self.sizes = [math.prod(s) for s in self.shapes]
        self.controls, self.penalty = controls, penalty
        # Modules with buffers (batch norm) run alone, without vmap over rows.
        self.batched = not any(True for _ in self.template.buffers())

    @property
    def rows(self) -> int:
        return len(self.modules)

    def parameters(self) -> torch.Tensor:
        """The current parameters [G, m] (a detached copy)."""
        return torch.stack([torch.cat([dict(mod.named_parameters())[name].detach().reshape(-1) for name in self.names])
                            for mod in self.modules])

    def assign(self, u: torch.Tensor) -> None:
        """Write rows u [G, m] into the layers' parameters (in place, outside autograd)."""
        with torch.no_grad():
            for row, mod in zip(u, self.modules):
                params = dict(mod.named_parameters())
                for name, value in zip(self.names, self.unflatten(row).values()):
                    params[name].copy_(value)

    def unflatten(self, theta: torch.Tensor) -> Dict[str, torch.Tensor]:
        """One row theta [m] -> {name: tensor of the parameter's shape} (works under vmap)."""
        pieces = torch.split(theta, self.sizes, dim=-1)
        return {name: piece.reshape(shape) for name, piece, shape in zip(self.names, pieces, self.shapes)}

    def call(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """g(x, theta) for one row theta [m] and a batch x [B, ...] (works under vmap and grad).

        A layer with buffers runs on copies of them: a batch-norm layer in training mode
        would otherwise update its running statistics at every objective evaluation.
        """
        tensors = self.unflatten(theta)
        if not self.batched:
            tensors.update({name: b.clone() for name, b in self.template.named_buffers()})
        return torch.func.functional_call(self.template, tensors, (x,))

    def __repr__(self):
        return f"LayerGroup(layers={self.indices}, m={sum(self.sizes)}, {type(self.template).__name__})"


def _row_set(module: torch.nn.Module, names: List[str], prefix: str, controls: Mapping[str, ControlSet],
             penalties: Mapping[str, ControlPenalty]) -> Tuple[ControlSet, Optional[ControlPenalty]]:
    """The control set and penalty of one layer's flattened parameters, from the per-parameter options."""
    params = dict(module.named_parameters())
    lows, highs, weights, factors, kinds = [], [], [], [], set()
    for name in names:
        p = params[name]
        full = prefix + name
        s = controls.get(full)
        if s is None or isinstance(s, Reals):
            lo, hi = -math.inf, math.inf
        elif isinstance(s, Box):
            lo_t, hi_t = s.bounds(torch.float64, "cpu")
            if lo_t.numel() != 1:
                raise ValueError(f"pmp.nn: the Box for parameter {full!r} must have scalar bounds (it applies to "
                                 f"every weight), got shape {tuple(lo_t.shape)}")
            lo, hi = float(lo_t), float(hi_t)
        elif isinstance(s, Finite):
            # finite-set parameters are updated by the discrete-weight rule (discrete.py), never as rows here
            raise ValueError(f"pmp.nn: parameter {full!r} has a finite set {s!r} and cannot be a row of a "
                             "continuous maximisation; pass it in `exclude` of group_layers")
        else:
            raise TypeError(f"pmp.nn: parameter {full!r}: unsupported control set {s!r} (use pmp.Box or pmp.Reals)")
        lows.append(torch.full((p.numel(),), lo, dtype=torch.float64))
        highs.append(torch.full((p.numel(),), hi, dtype=torch.float64))
        pen = penalties.get(full)
        relative = pen is not None and getattr(pen, "relative", False)
        if pen is not None:
            kinds.add(pen.name)
        weights.append(torch.full((p.numel(),), pen.weight if pen is not None and not relative else 0.0,
                                  dtype=torch.float64))
        factors.append(torch.full((p.numel(),), pen.weight if relative else 0.0, dtype=torch.float64))
    if len(kinds) > 1:
        raise ValueError(f"pmp.nn: the parameters of one layer ({prefix.rstrip('.')}) may carry one kind of penalty, "
                         f"got {sorted(kinds)}")
    low, high = torch.cat(lows), torch.cat(highs)
    if bool(torch.isinf(low).all() and torch.isinf(high).all()):
        row_set: ControlSet = Reals(low.numel())
    else:
        row_set = Box(low, high)
    penalty = ComponentPenalty(kinds.pop(), torch.cat(weights), torch.cat(factors)) if kinds else None
    return row_set, penalty


def group_layers(layers: Mapping[int, torch.nn.Module], inputs: Mapping[int, torch.Tensor],
                 controls: Mapping[str, ControlSet], penalties: Mapping[str, ControlPenalty],
                 exclude: Set[str] = frozenset(), unbatched: Set[int] = frozenset(),
                 proximity: Optional[float] = None) -> List[LayerGroup]:
    """Group the layers (index -> module) that can be maximised as rows of one objective.

    Same function of (x, theta): same class, same ``repr`` (hyper-parameters), same parameter
    names, shapes and dtypes, same input shape, same per-parameter control sets and penalties.
    Parameters named in ``exclude`` (full names: the finite-set weights, updated by their own
    rule) are not rows; they enter the layer's function at their current values, so a layer
    with excluded parameters is a group of its own (the template is the layer itself). Layers in
    ``unbatched`` (modules ``torch.func.vmap`` has no batching rule for, e.g. a wrapped ``GRU``) are
    groups of their own too, evaluated without vmap. ``proximity``: SQH's proximity weight c of this
    step, which resolves relative penalties (``ComponentPenalty.resolved``); needed when there are any.
    """
    buckets: Dict[tuple, List[int]] = {}
    for n, module in layers.items():
        prefix = f"{n}."
        named = [(name, p) for name, p in module.named_parameters()
                 if p.requires_grad and prefix + name not in exclude]
        if not named:
            continue
        options = tuple((name, repr(controls.get(prefix + name)), repr(penalties.get(prefix + name)))
                        for name, _ in named)
        key = (type(module), repr(module), tuple((name, tuple(p.shape), p.dtype, str(p.device)) for name, p in named),
               tuple(inputs[n].shape), options)
        if (n in unbatched or any(True for _ in module.buffers())
                or any(prefix + name in exclude for name, _ in module.named_parameters())):
            key = key + (n,)  # layers with buffers or fixed (excluded) parameters are not batched
        buckets.setdefault(key, []).append(n)
    groups = []
    for indices in buckets.values():
        mods = [layers[n] for n in indices]
        prefix = f"{indices[0]}."
        names = [name for name, p in mods[0].named_parameters() if p.requires_grad and prefix + name not in exclude]
        row_set, penalty = _row_set(mods[0], names, f"{indices[0]}.", controls, penalties)
        group = LayerGroup(indices, mods, names, row_set, penalty)
        if penalty is not None and penalty.factors is not None:
            if proximity is None:
                raise ValueError(f"pmp.nn: the relative penalty of layer {indices[0]} needs SQH's proximity weight "
                                 "(relative penalties on float weights: pmp.nn.SQH only)")
            group.penalty = penalty.resolved(group.parameters(), group.sizes, proximity)
        if indices[0] in unbatched:
            group.batched = False
        groups.append(group)
    return groups
