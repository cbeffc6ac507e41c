"""Weights in a finite set (binary {-1, +1}, ternary {-1, 0, +1}, any ``pmp.Finite``): Li & Hao's discrete-weight MSA.

Li & Hao (ICML 2018, "An optimal control approach to deep learning and applications to
discrete-weight neural networks") maximise the Hamiltonian of a layer whose weights W
take values in a finite set in closed form, weight by weight. For a layer that is
affine in W (``Linear``, ``Conv``; activations and batch norm as separate entries of the
Sequential) the Hamiltonian is H(W) = M . W + const with M = dH/dW = -d loss/dW (paper
Prop. 2: the gradient the closure's backward pass already computed), so it separates
over the weights. Their rule, for every weight w with current value w^k:

    M <- a M + (1 - a) dH/dW                      moving average over the mini-batches
    rho_k = rho * max |M_j| over the weights j with w_j != sgn(M_j)   (per parameter tensor;
                                                   sgn(0) = +1, an empty set gives 0)
    w <- argmax_{v in V}  M v - (rho_k / delta) (v - w^k)^2 - L(v)

where delta is the smallest gap between adjacent values of V and L(v) the parameter's
cost (``penalties``: lambda |v|_0 or lambda |v|_1; ``weight_decay``/2 v^2). With delta
in the proximity term a move to an adjacent value pays rho_k per unit of |M|: for
V = {-1, +1} (delta = 2) the rule is Li & Hao's binary one, flip to sgn(M) exactly
where |M| > rho_k; for V = {-1, 0, +1} (delta = 1) it is their ternary one, w = +1 where
M > rho_k (1 - 2 w^k) + lambda, w = -1 where M < -rho_k (1 + 2 w^k) - lambda, else 0.

Ties (measure zero unless M = 0): the current value is kept when it attains the maximum;
otherwise the value of smallest |v| wins, then the larger one (sgn(0) = +1).

The average's rate a decays as a <- 1 - (1 - a) d (Li & Hao: once per epoch; here every
``decay_every`` steps, or when ``EMSA.decay_average()`` is called).

Everything is one set of tensor operations over the weights of all parameters that share
a value set (concatenated): no Python loop over weights or layers in the rule.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..controls import Finite
from ..penalties import ControlPenalty

__all__ = ["DiscreteRule", "FiniteWeights", "preference_order", "threshold_rho", "finite_argmax",
           "project_scaled"]


@dataclass(frozen=True)
class DiscreteRule:
    """Options of the discrete-weight rule (Li & Hao; their notebooks' settings as defaults).

    Args:
        rho: the threshold fraction: rho_k = rho * max |M| over the weights whose sign disagrees
            with sgn(M). None: 0.5 for a set without 0 (binary), 0.25 for a set with 0 (ternary),
            the reference notebooks' values.
        average: the initial rate a of the moving average M <- a M + (1 - a) dH/dW (a0 = 0.999
            in the notebooks; 0 uses the current batch's dH/dW alone).
        decay: d in a <- 1 - (1 - a) d (0.95 in the notebooks; 1 keeps a fixed).
        decay_every: apply the decay every this many steps; None (default): only when
            ``opt.decay_average()`` is called (the reference: once per epoch).
        init: how the weights are put into the set when the optimizer is built, if not already
            in it: "scaled" (default): the nearest value to w / std(w) per parameter tensor
            (binary: sgn(w); ternary: about 30 % zeros from PyTorch's uniform initialisation);
            "keep": raise if a weight is not in the set.

    Example: binary weights in a layer trained by MSA (docs/discrete.md).
        >>> import torch, pmpsolve as pmp
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3, bias=False), torch.nn.Tanh())
        >>> opt = pmp.nn.MSA(model, controls={"0.weight": pmp.Finite([-1.0, 1.0])},
        ...                  discrete=pmp.nn.DiscreteRule(rho=0.5, average=0.999, decay=0.95))
        >>> sorted(set(model[0].weight.flatten().tolist()))   # put into the set when built
        [-1.0, 1.0]
    """

    rho: Optional[float] = None
    average: float = 0.999
    decay: float = 0.95
    decay_every: Optional[int] = None
    init: str = "scaled"

    def __post_init__(self):
        if self.rho is not None and not (math.isfinite(float(self.rho)) and float(self.rho) >= 0):
            raise ValueError(f"DiscreteRule: `rho` must be a number >= 0 or None, got {self.rho!r}")
        if not 0.0 <= float(self.average) < 1.0:
            raise ValueError(f"DiscreteRule: `average` (the moving-average rate a) must be in [0, 1), got "
                             f"{self.average!r}")
        if not 0.0 <= float(self.decay) <= 1.0:
            raise ValueError(f"DiscreteRule: `decay` (d in a <- 1 - (1 - a) d) must be in [0, 1], got {self.decay!r}")
        if self.decay_every is not None and int(self.decay_every) < 1:
            raise ValueError(f"DiscreteRule: `decay_every` must be >= 1 or None, got {self.decay_every!r}")
        if self.init not in ("scaled", "keep"):
            raise ValueError(f"DiscreteRule: `init` must be 'scaled' or 'keep', got {self.init!r}")


def preference_order(values: torch.Tensor) -> torch.Tensor:
    """The admissible values [V] ordered for tie-breaking: smallest |v| first, then the larger (sgn(0) = +1)."""
    v = values.reshape(-1)
    # sort by (|v|, -v): two stable sorts
    order = torch.argsort(-v, stable=True)
    v = v[order]
    return v[torch.argsort(v.abs(), stable=True)]


def smallest_gap(values: torch.Tensor) -> float:
    """delta: the smallest gap between adjacent admissible values (1 for a single value)."""
    v = torch.sort(values.reshape(-1)).values
    return float((v[1:] - v[:-1]).min()) if v.numel() > 1 else 1.0


def signum(x: torch.Tensor) -> torch.Tensor:
    """sgn(x) with sgn(0) = +1 (Li & Hao's convention), elementwise."""
    return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))


def threshold_rho(M: torch.Tensor, w: torch.Tensor, segments: torch.Tensor, count: int, rho: float) -> torch.Tensor:
    """rho_k per weight [n]: rho * max |M| over the weights of the same segment with w != sgn(M).

    M, w: [n] (flattened weights of ``count`` parameter tensors); segments: [n] long, the
    tensor each weight belongs to. A segment without such a weight gets rho_k = 0.
    """
    wrong = w != signum(M)
    magnitude = torch.where(wrong, M.abs(), torch.zeros_like(M))
    largest = torch.zeros(count, dtype=M.dtype, device=M.device).scatter_reduce(
        0, segments, magnitude, reduce="amax", include_self=True)
    return rho * largest[segments]


def finite_argmax(M: torch.Tensor, w: torch.Tensor, rho_k: torch.Tensor, values: torch.Tensor,
                  penalty_weight: torch.Tensor, penalty_kind: Optional[str], weight_decay: float,
                  gap: float) -> torch.Tensor:
    """argmax_{v in V} M v - (rho_k / gap) (v - w)^2 - lambda pen(v) - weight_decay/2 v^2, per weight.

    M, w, rho_k, penalty_weight (lambda): [n]; values: [V] (any order); penalty_kind: "L0",
    "L1" or None. Returns [n], every entry a value of V. The current w is kept when it
    attains the maximum; other ties go to the value of smallest |v|, then the larger.
    """
    v = preference_order(values).to(dtype=M.dtype, device=M.device)  # [V]
    r = rho_k / gap
    lam = penalty_weight.to(M.dtype)
    # M x - r (x - w)^2 = (M + 2 r w) x - r x^2 - r w^2; the last term is the same for every x: dropped.
    slope = M + 2 * r * w

    def score(x: torch.Tensor) -> torch.Tensor:  # x: a 0-d candidate or [n]; the same arithmetic for both
        out = slope * x - r * (x * x)
        if weight_decay:
            out = out - (0.5 * weight_decay) * (x * x)
        if penalty_kind == "L0":
            out = out - lam * (x != 0).to(M.dtype)
        elif penalty_kind == "L1":
            out = out - lam * x.abs()
        return out

    # a loop over the |V| candidate values (not over weights): [n] tensor ops, strict > keeps the
    # first maximiser in preference order
    best_value, best = score(v[0]), v[0].expand_as(w)
    for j in range(1, v.numel()):
        s_j = score(v[j])
        better = s_j > best_value
        best_value = torch.where(better, s_j, best_value)
        best = torch.where(better, v[j], best)
    return torch.where(score(w) >= best_value, w, best)


def project_scaled(w: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The nearest value of V to w / std(w) (ties: smallest |v|, then the larger; sgn(0) = +1)."""
    scale = w.std() if w.numel() > 1 else w.abs().reshape(())
    scale = torch.where(torch.isfinite(scale) & (scale > 0), scale, torch.ones_like(scale))
    v = preference_order(values).to(dtype=w.dtype, device=w.device)
    return v[((w / scale).reshape(-1, 1) - v).abs().argmin(dim=1)].reshape(w.shape)


class _Bucket:
    """The parameters that share one value set (and penalty kind): flattened, concatenated."""

    def __init__(self, values: torch.Tensor, kind: Optional[str]):
        self.values, self.kind = values, kind
        self.names: List[str] = []
        self.params: List[torch.nn.Parameter] = []
        self.lambdas: List[float] = []

    def finish(self, rho: Optional[float]):
        p0 = self.params[0]
        sizes = [p.numel() for p in self.params]
        self.sizes = sizes
        self.segments = torch.repeat_interleave(torch.arange(len(sizes), device=p0.device),
                                                torch.tensor(sizes, device=p0.device))
        self.penalty_weight = torch.repeat_interleave(
            torch.tensor(self.lambdas, dtype=p0.dtype, device=p0.device), torch.tensor(sizes, device=p0.device))
        self.gap = smallest_gap(self.values)
        has_zero = bool((self.values == 0).any())
        self.rho = float(rho) if rho is not None else (0.25 if has_zero else 0.5)
        self.average: Optional[torch.Tensor] = None  # M [n], started on the first step

    def flat(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.params])

    def assign(self, w: torch.Tensor) -> None:
        with torch.no_grad():
            for p, piece in zip(self.params, torch.split(w, self.sizes)):
                p.copy_(piece.reshape(p.shape))


class FiniteWeights:
    """The state of the discrete-weight rule for the parameters with a ``pmp.Finite`` set.

    Args:
        params: {full name: parameter} of the parameters with a finite set.
        sets: {full name: pmp.Finite}.
        penalties: {full name: pmp.L0 | pmp.L1}, lambda of the rule (optional per parameter).
        rule: the ``DiscreteRule`` options.
    """

    def __init__(self, params: Dict[str, torch.nn.Parameter], sets: Dict[str, Finite],
                 penalties: Dict[str, ControlPenalty], rule: DiscreteRule):
        self.rule = rule
        self.rate = float(rule.average)
        self.steps = 0
        buckets: Dict[Tuple, _Bucket] = {}
        for name, p in params.items():
            values = sets[name].values
            pen = penalties.get(name)
            kind = pen.name if pen is not None else None
            key = (tuple(values.tolist()), kind, p.dtype, str(p.device))
            bucket = buckets.setdefault(key, _Bucket(values, kind))
            bucket.names.append(name)
            bucket.params.append(p)
            bucket.lambdas.append(pen.weight if pen is not None else 0.0)
        self.buckets = list(buckets.values())
        for b in self.buckets:
            b.finish(rule.rho)
        self._initialise()

    def _initialise(self) -> None:
        """Put every weight into its set (``rule.init``), so that the first forward pass is admissible."""
        for b in self.buckets:
            for name, p in zip(b.names, b.params):
                v = b.values.to(dtype=p.dtype, device=p.device)
                inside = (p.detach().reshape(-1, 1) == v).any(dim=1).all()
                if bool(inside):
                    continue
                if self.rule.init == "keep":
                    raise ValueError(f"pmp.nn: parameter {name!r} has weights outside its set {b.values.tolist()} "
                                     "and DiscreteRule(init='keep') was asked; use init='scaled' or set the weights")
                with torch.no_grad():
                    p.copy_(project_scaled(p.detach(), b.values))

    def names(self) -> List[str]:
        return [name for b in self.buckets for name in b.names]

    def gradients(self, scale: float = 1.0) -> List[torch.Tensor]:
        """dH/dW = -d loss/dW of every bucket [n] (Prop. 2), from the closure's backward pass."""
        out = []
        for b in self.buckets:
            missing = [name for name, p in zip(b.names, b.params) if p.grad is None]
            if missing:
                raise RuntimeError(f"pmp.nn: no gradient reached the finite-set parameter(s) {missing}: the closure "
                                   "must call loss.backward() on a loss that depends on them")
            out.append(-scale * torch.cat([p.grad.detach().reshape(-1) for p in b.params]))
        return out

    def step(self, gradients: Sequence[torch.Tensor], weight_decay: float = 0.0) -> Dict[str, float]:
        """One update of every finite-set weight from dH/dW (``gradients``, one [n] per bucket)."""
        changed, nonzero, total = 0, 0, 0
        a = self.rate
        for b, g in zip(self.buckets, gradients):
            if b.average is None:
                b.average = torch.zeros_like(g)
            b.average.mul_(a).add_(g, alpha=1.0 - a)  # M <- a M + (1 - a) dH/dW
            w = b.flat()
            rho_k = threshold_rho(b.average, w, b.segments, len(b.params), b.rho)
            new = finite_argmax(b.average, w, rho_k, b.values, b.penalty_weight, b.kind, weight_decay, b.gap)
            changed += int((new != w).sum())
            nonzero += int((new != 0).sum())
            total += new.numel()
            b.assign(new)
        self.steps += 1
        every = self.rule.decay_every
        if every is not None and self.steps % int(every) == 0:
            self.decay()
        return {"changed": changed, "nonzero": nonzero / max(total, 1), "average_rate": a}

    def state_dict(self) -> dict:
        """The rule's state: the moving average M of every bucket, the rate a and the step count."""
        return {"rate": self.rate, "steps": self.steps,
                "averages": [None if b.average is None else b.average.clone() for b in self.buckets]}

    def load_state_dict(self, state: dict) -> None:
        averages = state["averages"]
        if len(averages) != len(self.buckets):
            raise ValueError(f"the finite-set state has {len(averages)} value sets, this optimizer {len(self.buckets)}")
        self.rate, self.steps = float(state["rate"]), int(state["steps"])
        for b, average in zip(self.buckets, averages):
            b.average = None if average is None else average.clone()

    def decay(self) -> float:
        """a <- 1 - (1 - a) d (Li & Hao's schedule, once per epoch in the reference); returns the new a."""
        self.rate = min(max(1.0 - (1.0 - self.rate) * float(self.rule.decay), 0.0), 1.0)
        return self.rate
