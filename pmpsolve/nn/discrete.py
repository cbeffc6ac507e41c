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
           "project_scaled", "RowLayout", "scaled_argmax", "resolve_scales", "DEFAULT_SPARSITY", "in_the_set"]

#: f of the default sparsity weight of a set with 0 whose scale is not None (no penalty given):
#: lambda = f * (mean |M| of the tensor) * (one step of a weight), docs/discrete.md, "Scale-free lambda"
DEFAULT_SPARSITY = 2.0

#: layers that divide out any per-channel scale of the layer before them
NORMALISATION = (torch.nn.modules.batchnorm._NormBase, torch.nn.LayerNorm, torch.nn.GroupNorm)


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
        coherence: for scaled sets (``pmp.Finite(values, scale=...)``), the exponent e of the scale step's
            proximity factor k^e for a row of k non-zero weights. A move of the row's scale alpha moves the
            outputs of all k weights together: measured on the layer's output it pays k times what k separate
            moves pay when every product v_j x_j has one sign (e = 1, coherent), about as much when their signs
            are random and cancel (e = 0). The default 0.5, the geometric mean of the two bounds, trained
            faster than 1 on every network measured and did not diverge where 0 did (docs/discrete.md).

    Example: binary weights in a layer trained by MSA (docs/discrete.md).
        >>> import torch, pmpsolve as pmp
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3, bias=False), torch.nn.Tanh())
        >>> opt = pmp.nn.MSA(model, controls={"0.weight": pmp.Finite([-1.0, 1.0], scale=None)},
        ...                  discrete=pmp.nn.DiscreteRule(rho=0.5, average=0.999, decay=0.95))
        >>> sorted(set(model[0].weight.flatten().tolist()))   # put into the set when built
        [-1.0, 1.0]
    """

    rho: Optional[float] = None
    average: float = 0.999
    decay: float = 0.95
    decay_every: Optional[int] = None
    init: str = "scaled"
    coherence: float = 0.5

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
        if not (isinstance(self.coherence, (int, float)) and 0.0 <= float(self.coherence) <= 1.0):
            raise ValueError(f"DiscreteRule: `coherence` (the exponent e of the scale step's k^e) must be in [0, 1], "
                             f"got {self.coherence!r}")
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


class RowLayout:
    """Where the weights of a bucket sit in the rows of a scale: row r has one alpha_r.

    For parameter tensors of shapes ``shapes`` (flattened, concatenated: [n] weights), scale
    "channel" makes every slice along dim 0 a row, "tensor" every tensor; ``row_of``/``col_of``
    [n] place the weights in a padded matrix [R, L] (L the longest row), ``lengths`` [R] the rows'
    lengths, ``row_tensor`` [R] the tensor of each row.
    """

    def __init__(self, shapes: Sequence[torch.Size], scale: str, device=None):
        rows, cols, lengths, tensors = [], [], [], []
        first = 0
        for i, shape in enumerate(shapes):
            numel = math.prod(shape)
            count = int(shape[0]) if scale == "channel" else 1
            length = numel // max(count, 1)
            t = torch.arange(numel, device=device)
            rows.append(first + t // length)
            cols.append(t % length)
            lengths += [length] * count
            tensors += [i] * count
            first += count
        self.row_of, self.col_of = torch.cat(rows), torch.cat(cols)
        self.lengths = torch.tensor(lengths, device=device)
        self.row_tensor = torch.tensor(tensors, device=device)
        self.rows, self.width = first, max(lengths)

    def padded(self, x: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """[n] -> [R, L], ``fill`` where a row is shorter than L."""
        out = torch.full((self.rows, self.width), fill, dtype=x.dtype, device=x.device)
        out[self.row_of, self.col_of] = x
        return out

    def per_weight(self, row_values: torch.Tensor) -> torch.Tensor:
        """[R] -> [n]: every weight gets its row's value."""
        return row_values[self.row_of]


def quantise_rows(z: torch.Tensor, curvature: torch.Tensor, lam0: torch.Tensor, shift: torch.Tensor,
                  layout: RowLayout, has_zero: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """argmax over beta > 0, s in {-1, 0, +1}^n (0 only if ``has_zero``) of, per row,
    -c |beta s - z|^2 - lam1 beta |s|_1 - lam0 |s|_0 (c = ``curvature`` [R] > 0, shift = lam1 / (2 c) [R]).

    For a fixed support S of k weights the best signs are sgn(z) and the best beta is
    (sum_S |z| - k shift) / k, worth c (sum_S |z| - k shift)^2 / k - lam0 k against the zero row;
    for a fixed k the best S holds the k largest |z|. So one sort of |z| per row, a cumulative
    sum and an argmax over k (ties: the smaller k) give the exact maximiser (ternary weight
    networks' scale, with the proximity and the penalties of the rule). Without 0 in the set,
    k = the row's length. Returns (beta [R] (0 for an empty support), support [n] bool).
    """
    magnitude = layout.padded(z.abs())  # [R, L], padding 0 sorts after the row's own zeros (stable)
    ordered, order = torch.sort(magnitude, dim=1, descending=True, stable=True)
    k = torch.arange(1, layout.width + 1, device=z.device, dtype=z.dtype)  # [L]
    excess = (torch.cumsum(ordered, dim=1) - k * shift[:, None]).clamp_min(0.0)  # [R, L]
    value = curvature[:, None] * excess * excess / k - lam0[:, None] * k
    valid = k[None, :] <= layout.lengths[:, None].to(z.dtype)
    value = torch.where(valid, value, torch.full_like(value, -math.inf))
    if has_zero:  # k = 0 (the zero row, worth 0) comes first: ties go to the sparser row
        value = torch.cat([torch.zeros_like(value[:, :1]), value], dim=1)
        count = value.argmax(dim=1)  # [R], the first maximiser
    else:
        count = layout.lengths.clone()
    taken = count.clamp_min(1) - 1
    beta = torch.where(count > 0, excess.gather(1, taken[:, None])[:, 0] / count.clamp_min(1).to(z.dtype),
                       torch.zeros_like(curvature))
    inside = torch.arange(layout.width, device=z.device)[None, :] < count[:, None]  # [R, L] in sorted order
    support = torch.zeros_like(inside).scatter(1, order, inside)[layout.row_of, layout.col_of]
    return beta, support


def scaled_argmax(M: torch.Tensor, G: torch.Tensor, w: torch.Tensor, alpha: torch.Tensor, rho_k: torch.Tensor,
                  rho_alpha: torch.Tensor, values: torch.Tensor, lam: torch.Tensor, penalty_kind: Optional[str],
                  weight_decay: float, layout: RowLayout, coherence: float = 0.5) -> Tuple[torch.Tensor, torch.Tensor]:
    """The scaled rule, W = alpha_r v with v in V = {-a, a} or {-a, 0, a}: Li & Hao's objective in W,

        sum_j  M_j W_j - (rho_k / (delta alpha_r^k)) (W_j - w_j)^2 - weight_decay/2 W_j^2 - lambda_r pen(W_j),

    (a move by one step delta alpha_r^k of the current scale pays rho_k per unit of |M|), maximised
    by one block step each: the values v with alpha held at alpha^k (exactly Li & Hao's rule on the
    unit weights v, lambda / alpha for L0), then alpha with v held, the maximiser of the same
    quadratic in alpha, in closed form, from the batch's dH/dW (``G``, the threshold ``rho_alpha`` =
    rho * max |G| over the row's tensor: over all its weights, since alpha moves them all)
    rather than the moving average: an average of the last ~1 / (1 - a) batches keeps pushing alpha
    the same way long after the loss has turned (measured: the scale of a last layer grew 1e5-fold in
    25 steps), while a value v, once moved, stops. The alpha step counts the proximity k^coherence times
    for a row of k non-zero weights (``DiscreteRule.coherence``). alpha is kept at or above alpha^k / 2.

    M, G, w, rho_k: [n]; alpha, rho_alpha, lam: [R]; penalty_kind "L0", "L1" or None. A row with
    curvature 0 (rho_alpha = 0 and no weight decay) is kept. Returns (W [n], alpha [R]).
    """
    a = values.abs().max().to(M.dtype)
    gap = smallest_gap(values)
    per = layout.per_weight
    unit = w / per(alpha * a)  # in {-1, 0, 1}
    lam_v = per(lam / alpha) if penalty_kind == "L0" else per(lam * a)  # lambda pen(alpha a v) / alpha
    v = finite_argmax(M, unit, rho_k, values / a, lam_v, penalty_kind, 0.0, gap / float(a))
    # alpha-step: maximise sum_j G_j beta v_j - c (beta v_j - w_j)^2 - lam1 beta |v_j|  (beta = alpha a)
    # (not rho_k: its max runs over the weights whose sign disagrees with M, few or none once the signs agree,
    # and a vanishing threshold let a last layer's alpha grow 100-fold within an epoch)
    proximity = rho_alpha / (gap * alpha)
    curvature = proximity + 0.5 * weight_decay
    frozen = ~(curvature > 0)
    total = torch.zeros_like(alpha)
    vv = total.index_add(0, layout.row_of, v * v)
    slope = total.index_add(0, layout.row_of, (G + 2 * per(proximity) * w) * v)
    if penalty_kind == "L1":
        slope = slope - lam * total.index_add(0, layout.row_of, v.abs())
    # alpha moves the outputs of all k weights of the row together: measured on the layer's output (Li & Hao's
    # error estimate, E-MSA's feasibility term) that move pays between 1 time (products v_j x_j of random signs
    # cancel) and k times (all of one sign) what k separate moves pay, hence the curvature c k^e |v|^2:
    # e = 0 (c |v|^2) diverged, e = 1 damped the scale of wide rows to a standstill (docs/discrete.md)
    k = vv.clamp_min(1) ** float(coherence)  # v in {-1, 0, 1}: |v|^2 = the support size
    safe = torch.where(frozen, torch.ones_like(curvature), curvature)
    # the same maximiser written as a step from beta^k, so that the k^e-fold curvature damps the step only
    beta = alpha * a + (slope - 2 * safe * alpha * a * vv) / (2 * safe * k * vv.clamp_min(1e-30))
    beta = torch.where(vv > 0, beta, alpha * a)
    new_alpha = torch.where(frozen, alpha, torch.maximum(beta / a, 0.5 * alpha))
    return torch.where(per(frozen), w, per(new_alpha * a) * v), new_alpha


def in_the_set(w: torch.Tensor, finite: Finite) -> torch.Tensor:
    """Whether each weight of w lies in the set, [w.shape] bool: w in V for scale None, else
    w / alpha in V with alpha = max |w| / max |V| over the weight's channel ("channel", dim 0) or
    tensor (a row of zeros is in the set)."""
    v = finite.values.to(dtype=w.dtype, device=w.device)
    if finite.scale not in ("channel", "tensor"):
        return (w.unsqueeze(-1) == v).any(-1)
    rows = w.reshape(w.shape[0] if finite.scale == "channel" and w.ndim else 1, -1)
    alpha = rows.abs().amax(dim=1, keepdim=True) / v.abs().max()
    unit = rows / torch.where(alpha > 0, alpha, torch.ones_like(alpha))
    return (unit.unsqueeze(-1) == v).any(-1).reshape(w.shape)


def resolve_scales(model: torch.nn.Module, sets: Dict[str, Finite]) -> Dict[str, Finite]:
    """The sets with ``scale="auto"`` resolved: "channel" for a weight of a layer that no normalisation
    layer follows (the next leaf module of the model), None where one follows (it divides out any
    scale) or where the values take no scale. Explicit scales are checked (not on a 0-d parameter)."""
    leaves = [name for name, m in model.named_modules() if not any(True for _ in m.children())]
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    out = {}
    for name, finite in sets.items():
        scale = finite.scale
        if scale in ("channel", "tensor") and params[name].ndim == 0:
            raise ValueError(f"pmp.nn: parameter {name!r} is a 0-d tensor (one number), it has no {scale} to scale; "
                             f"use pmp.Finite({finite.values.tolist()}, scale=None)")
        if scale == "auto":
            owner = name.rpartition(".")[0]
            after = leaves.index(owner) + 1 if owner in leaves else len(leaves)
            normalised = after < len(leaves) and isinstance(modules[leaves[after]], NORMALISATION)
            scale = "channel" if finite.scalable and params[name].ndim > 0 and not normalised else None
            resolved = Finite(finite.values.tolist(), shape=finite.shape, scale=scale)
            resolved.requested = "auto"
            finite = resolved
        out[name] = finite
    return out


def segment_mean(x: torch.Tensor, segments: torch.Tensor, count: int) -> torch.Tensor:
    """The mean of x [n] over each segment, [count]."""
    total = torch.zeros(count, dtype=x.dtype, device=x.device).index_add_(0, segments, x)
    size = torch.zeros(count, dtype=x.dtype, device=x.device).index_add_(0, segments, torch.ones_like(x))
    return total / size.clamp_min(1)


class _Bucket:
    """The parameters that share one value set, scale and penalty kind: flattened, concatenated."""

    def __init__(self, values: torch.Tensor, kind: Optional[str], relative: bool, scale: Optional[str]):
        self.values, self.kind, self.relative, self.scale = values, kind, relative, scale
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
        self.layout = None if self.scale is None else RowLayout([p.shape for p in self.params], self.scale, p0.device)
        self.alpha: Optional[torch.Tensor] = None  # [R] the rows' scales (W = alpha v), set by the initialisation

    def flat(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.params])

    def assign(self, w: torch.Tensor) -> None:
        with torch.no_grad():
            for p, piece in zip(self.params, torch.split(w, self.sizes)):
                p.copy_(piece.reshape(p.shape))

    def lambdas_now(self, M: torch.Tensor) -> torch.Tensor:
        """lambda per tensor [count]: the absolute weights, or f * mean |M| of the tensor (relative)."""
        weights = torch.tensor(self.lambdas, dtype=M.dtype, device=M.device)
        if not self.relative:
            return weights
        return weights * segment_mean(M.abs(), self.segments, len(self.params))

    def initial_scales(self) -> None:
        """alpha [R] and the weights in alpha V: a row already in the set keeps its weights (alpha = max |w| / a);
        any other is quantised (the closed form with z = w, no proximity, no penalty: ternary weight networks')."""
        w = self.flat()
        layout, v = self.layout, self.values.to(dtype=w.dtype, device=w.device)
        a = v.abs().max()
        top = torch.zeros(layout.rows, dtype=w.dtype, device=w.device).scatter_reduce(
            0, layout.row_of, w.abs(), reduce="amax", include_self=True)
        unit = w / layout.per_weight(torch.where(top > 0, top, torch.ones_like(top)))
        inside_w = (unit.unsqueeze(-1) == v / a).any(-1)
        inside = torch.ones(layout.rows, dtype=torch.bool, device=w.device).scatter_reduce(
            0, layout.row_of, inside_w, reduce="amin", include_self=True)
        ones = torch.ones(layout.rows, dtype=w.dtype, device=w.device)
        beta, support = quantise_rows(w, ones, ones * 0, ones * 0, layout, bool((v == 0).any()))
        projected = torch.where(support, layout.per_weight(beta) * signum(w), torch.zeros_like(w))
        fallback = beta[beta > 0].mean() if bool((beta > 0).any()) else torch.ones((), dtype=w.dtype, device=w.device)
        beta = torch.where(inside, top, torch.where(beta > 0, beta, fallback))
        self.alpha = torch.where(beta > 0, beta, fallback) / a
        self.assign(torch.where(layout.per_weight(inside), w, projected))
        return bool(inside.all())


class FiniteWeights:
    """The state of the discrete-weight rule for the parameters with a ``pmp.Finite`` set.

    Args:
        params: {full name: parameter} of the parameters with a finite set.
        sets: {full name: pmp.Finite} (scales resolved: ``resolve_scales``).
        penalties: {full name: pmp.L0 | pmp.L1}, lambda of the rule (optional per parameter). A set
            with 0 whose scale was asked for (not None) and without a penalty takes
            ``pmp.L0(DEFAULT_SPARSITY, relative=True)``.
        rule: the ``DiscreteRule`` options.
    """

    def __init__(self, params: Dict[str, torch.nn.Parameter], sets: Dict[str, Finite],
                 penalties: Dict[str, ControlPenalty], rule: DiscreteRule):
        from ..penalties import L0

        self.rule = rule
        self.rate = float(rule.average)
        self.steps = 0
        buckets: Dict[Tuple, _Bucket] = {}
        for name, p in params.items():
            finite = sets[name]
            values = finite.values
            scale = finite.scale if finite.scale in ("channel", "tensor") else None
            pen = penalties.get(name)
            if pen is None and getattr(finite, "requested", finite.scale) is not None and bool((values == 0).any()):
                pen = L0(DEFAULT_SPARSITY, relative=True)  # the scale-free default (docs/discrete.md)
            kind = pen.name if pen is not None else None
            relative = bool(getattr(pen, "relative", False))
            key = (tuple(values.tolist()), kind, relative, scale, p.dtype, str(p.device))
            bucket = buckets.setdefault(key, _Bucket(values, kind, relative, scale))
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
            if b.layout is not None:
                if self.rule.init == "keep":
                    inside = all(bool(in_the_set(p.detach(), Finite(b.values.tolist(), scale=b.scale)).all())
                                 for p in b.params)
                    if not inside:
                        raise ValueError(f"pmp.nn: parameter(s) {b.names} have weights outside its set alpha * "
                                         f"{b.values.tolist()} (scale {b.scale!r}) and DiscreteRule(init='keep') was "
                                         "asked; use init='scaled' or set the weights")
                b.initial_scales()
                continue
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
            M, w = b.average, b.flat()
            if b.layout is None:
                rho_k = threshold_rho(M, w, b.segments, len(b.params), b.rho)
                lam = b.penalty_weight
                if b.relative:  # lambda = f * mean |M| (L1), times one step delta of a weight (L0)
                    lam = (b.lambdas_now(M) * (b.gap if b.kind == "L0" else 1.0))[b.segments]
                new = finite_argmax(M, w, rho_k, b.values, lam, b.kind, weight_decay, b.gap)
            else:
                # "disagree" by sign: sgn(W) = sgn(v) (W = alpha v, alpha > 0)
                rho_k = threshold_rho(M, torch.sign(w), b.segments, len(b.params), b.rho)
                lam = b.lambdas_now(M)[b.layout.row_tensor]  # [R]
                if b.relative and b.kind == "L0":  # one step of a weight of row r: delta * alpha_r
                    lam = lam * b.gap * b.alpha
                largest = torch.zeros(len(b.params), dtype=g.dtype, device=g.device).scatter_reduce(
                    0, b.segments, g.abs(), reduce="amax", include_self=True)
                rho_alpha = b.rho * largest[b.layout.row_tensor]  # rho * max |dH/dW| of the row's tensor, this batch
                new, b.alpha = scaled_argmax(M, g, w, b.alpha, rho_k, rho_alpha, b.values, lam, b.kind, weight_decay,
                                             b.layout, self.rule.coherence)
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
        """The rule's state: the moving average M of every bucket, the scales alpha, the rate a and the step count."""
        return {"rate": self.rate, "steps": self.steps,
                "averages": [None if b.average is None else b.average.clone() for b in self.buckets],
                "scales": [None if b.alpha is None else b.alpha.clone() for b in self.buckets]}

    def load_state_dict(self, state: dict) -> None:
        averages = state["averages"]
        if len(averages) != len(self.buckets):
            raise ValueError(f"the finite-set state has {len(averages)} value sets, this optimizer {len(self.buckets)}")
        self.rate, self.steps = float(state["rate"]), int(state["steps"])
        for b, average, alpha in zip(self.buckets, averages, state.get("scales", [None] * len(averages))):
            b.average = None if average is None else average.clone()
            if alpha is not None:
                b.alpha = alpha.clone()

    def decay(self) -> float:
        """a <- 1 - (1 - a) d (Li & Hao's schedule, once per epoch in the reference); returns the new a."""
        self.rate = min(max(1.0 - (1.0 - self.rate) * float(self.rule.decay), 0.0), 1.0)
        return self.rate
