"""What a user would pick instead of the maximum principle for discrete or sparse weights.

* ``StraightThrough``: BinaryConnect-style training (Courbariaux et al. 2015) of weights in a
  finite set: real latent weights, the forward pass with their quantisation (nearest value of
  the set), the gradient with respect to the quantised weights applied to the latent ones
  (straight-through estimator), Adam, latent weights clipped to [min V, max V].
* ``MagnitudePruning``: Adam, then at step ``prune_at`` the smallest weights (by |w|, per
  parameter tensor) set to 0 to keep a fraction ``keep``, then fine-tuning with the zeros held.

Both are ``torch.optim.Optimizer`` s stepped with a closure (like ``pmp.nn.EMSA``) and report
``last_step["nonzero"]``, the fraction of non-zero weights of the parameters they restrict.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Mapping, Optional, Sequence

import torch

from ..controls import Finite
from .discrete import preference_order, project_scaled

__all__ = ["StraightThrough", "MagnitudePruning", "quantise"]


def quantise(w: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The nearest value of V to every entry of w (ties: smallest |v|, then the larger; sgn(0) = +1)."""
    v = preference_order(values).to(dtype=w.dtype, device=w.device)
    return v[(w.reshape(-1, 1) - v).abs().argmin(dim=1)].reshape(w.shape)


def _named(model: torch.nn.Module, names: Sequence[str], what: str) -> Dict[str, torch.nn.Parameter]:
    params = dict(model.named_parameters())
    unknown = sorted(set(names) - set(params))
    if unknown:
        raise ValueError(f"{what}: {unknown} are not parameters of the model; its parameters are e.g. "
                         f"{sorted(params)[:6]}")
    return {k: params[k] for k in names}


def _closure_loss(closure: Optional[Callable], what: str) -> torch.Tensor:
    if closure is None:
        raise TypeError(f"{what}.step needs a closure: def closure(): opt.zero_grad(); loss = ...; loss.backward(); "
                        "return loss")
    with torch.enable_grad():
        return closure()


class StraightThrough(torch.optim.Optimizer):
    """Straight-through training of the parameters ``controls={name: pmp.Finite(values)}``; Adam on the rest.

    The latent weights start at w / std(w) clipped to [min V, max V] (so the first quantised
    weights are the ones ``pmp.nn.EMSA`` starts from: ``discrete.project_scaled``). The model's
    parameters always hold the quantised weights (in the set, exactly).

    Args:
        model: any module.
        controls: {parameter name: pmp.Finite}.
        lr: Adam's learning rate (latent and other parameters).
        weight_decay: Adam's L2 term on the other parameters.

    Example:
        >>> import torch, pmpsolve as pmp
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3, bias=False), torch.nn.Tanh())
        >>> opt = pmp.nn.StraightThrough(model, controls={"0.weight": pmp.Finite([-1.0, 1.0])}, lr=1e-3)
        >>> sorted(set(model[0].weight.flatten().tolist()))
        [-1.0, 1.0]
    """

    def __init__(self, model: torch.nn.Module, controls: Mapping[str, Finite], lr: float = 1e-3,
                 weight_decay: float = 0.0):
        if not controls or not all(isinstance(s, Finite) for s in controls.values()):
            raise TypeError("StraightThrough: `controls` must map parameter names to pmp.Finite sets")
        scaled = sorted(k for k, s in controls.items() if s.scale in ("channel", "tensor"))
        if scaled:  # "auto" means the values themselves here: the baseline has no scale
            raise ValueError(f"StraightThrough: {scaled} have a scaled set; the baseline quantises to the values "
                             "themselves: use pmp.Finite(values) or pmp.Finite(values, scale=None)")
        if not (math.isfinite(float(lr)) and float(lr) > 0):
            raise ValueError(f"StraightThrough: `lr` must be > 0, got {lr!r}")
        self._params = _named(model, list(controls), "StraightThrough")
        self._values = {k: s.values.to(dtype=self._params[k].dtype, device=self._params[k].device)
                        for k, s in controls.items()}
        self._latent: Dict[str, torch.Tensor] = {}
        for k, p in self._params.items():
            v = self._values[k]
            w = p.detach()
            scale = w.std() if w.numel() > 1 else w.abs().reshape(())
            scale = scale if bool(torch.isfinite(scale) & (scale > 0)) else torch.ones_like(scale)
            inside = bool((w.reshape(-1, 1) == v).any(1).all())
            start = w.clone() if inside else (w / scale).clamp(float(v.min()), float(v.max()))
            self._latent[k] = start.requires_grad_(False)
            with torch.no_grad():
                p.copy_(w if inside else project_scaled(w, v))
        self._latent = {k: torch.nn.Parameter(t) for k, t in self._latent.items()}
        ids = {id(p) for p in self._params.values()}
        others = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
        groups = [{"params": list(self._latent.values()), "weight_decay": 0.0}]
        if others:
            groups.append({"params": others, "weight_decay": float(weight_decay)})
        self._adam = torch.optim.Adam(groups, lr=float(lr))
        super().__init__(list(self._latent.values()) + others, dict(lr=float(lr)))
        self.last_step: Dict[str, object] = {}

    def step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:  # type: ignore[override]
        loss = _closure_loss(closure, "StraightThrough")
        with torch.no_grad():
            for k, p in self._params.items():  # straight through: d loss / d latent := d loss / d quantised
                self._latent[k].grad = None if p.grad is None else p.grad.detach().clone()
        self._adam.step()
        nonzero, total = 0, 0
        with torch.no_grad():
            for k, p in self._params.items():
                v = self._values[k]
                self._latent[k].clamp_(float(v.min()), float(v.max()))
                p.copy_(quantise(self._latent[k], v))
                nonzero += int((p != 0).sum())
                total += p.numel()
        self.last_step = {"loss": float(loss.detach()), "nonzero": nonzero / max(total, 1)}
        return loss


class MagnitudePruning(torch.optim.Optimizer):
    """Adam; at step ``prune_at`` keep the largest ``keep`` fraction of each named parameter (by |w|), zero the
    rest, and fine-tune with those zeros held (their gradient and value masked after every step).

    Args:
        model: any module.
        names: the parameters to prune (e.g. the weights of the linear and conv layers).
        keep: the fraction of non-zero weights kept in each of them, in (0, 1].
        prune_at: the step (1, 2, ...) after which the pruning happens (e.g. half the training).
        lr, weight_decay: Adam's.

    Example: keep 20 % of the weights after 3 steps.
        >>> import torch, pmpsolve as pmp
        >>> torch.manual_seed(0)   # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = torch.nn.Sequential(torch.nn.Linear(10, 10))
        >>> x, y = torch.randn(16, 10), torch.randn(16, 10)
        >>> opt = pmp.nn.MagnitudePruning(model, ["0.weight"], keep=0.2, prune_at=3, lr=1e-2)
        >>> def closure():                                  # as for pmp.nn.EMSA
        ...     opt.zero_grad()
        ...     loss = torch.nn.functional.mse_loss(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> for _ in range(5):
        ...     loss = opt.step(closure)
        >>> int((model[0].weight != 0).sum())               # of 100
        20
    """

    def __init__(self, model: torch.nn.Module, names: Sequence[str], keep: float = 0.2, prune_at: int = 1,
                 lr: float = 1e-3, weight_decay: float = 0.0):
        if not 0 < float(keep) <= 1:
            raise ValueError(f"MagnitudePruning: `keep` must be in (0, 1], got {keep!r}")
        if int(prune_at) < 0:
            raise ValueError(f"MagnitudePruning: `prune_at` must be >= 0, got {prune_at!r}")
        self._params = _named(model, list(names), "MagnitudePruning")
        self.keep, self.prune_at = float(keep), int(prune_at)
        params = [p for p in model.parameters() if p.requires_grad]
        self._adam = torch.optim.Adam(params, lr=float(lr), weight_decay=float(weight_decay))
        super().__init__(params, dict(lr=float(lr)))
        self._masks: Optional[Dict[str, torch.Tensor]] = None
        self.steps = 0
        self.last_step: Dict[str, object] = {}
        if self.prune_at == 0:
            self._prune()

    def _prune(self) -> None:
        masks = {}
        with torch.no_grad():
            for k, p in self._params.items():
                count = max(1, int(round(self.keep * p.numel())))
                cut = p.detach().abs().reshape(-1).kthvalue(p.numel() - count + 1).values if count < p.numel() else None
                mask = torch.ones_like(p, dtype=torch.bool) if cut is None else p.detach().abs() >= cut
                # ties at the cut: keep exactly `count` (the first ones in memory order)
                if int(mask.sum()) > count:
                    flat = mask.reshape(-1)
                    flat[flat.nonzero().reshape(-1)[count:]] = False
                masks[k] = mask
                p.mul_(mask)
        self._masks = masks

    def step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:  # type: ignore[override]
        loss = _closure_loss(closure, "MagnitudePruning")
        if self._masks is not None:
            for k, p in self._params.items():
                if p.grad is not None:
                    p.grad.mul_(self._masks[k])
        self._adam.step()
        self.steps += 1
        if self._masks is None and self.steps >= self.prune_at:
            self._prune()
        if self._masks is not None:
            with torch.no_grad():
                for k, p in self._params.items():
                    p.mul_(self._masks[k])  # Adam's momentum would move the zeros otherwise
        nonzero = sum(int((p != 0).sum()) for p in self._params.values())
        total = sum(p.numel() for p in self._params.values())
        self.last_step = {"loss": float(loss.detach()), "nonzero": nonzero / max(total, 1),
                          "pruned": self._masks is not None}
        return loss
