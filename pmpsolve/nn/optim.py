"""``pmp.nn.EMSA``: training a network by the maximum principle, as a ``torch.optim.Optimizer``.

One ``step(closure)`` is one iteration of the paper's Alg. 3 on the closure's
(mini-)batch:

1. the closure's forward pass records every layer's input x_n and output x_{n+1};
2. its ``loss.backward()`` gives the co-states p_{n+1} = -d loss / d x_{n+1} (hooks);
3. every layer's augmented Hamiltonian (``hamiltonian.LayerHamiltonian``) is maximised
   with x_n, p_{n+1} frozen, layers of equal shapes as the rows of one batched
   maximisation, by the control-problem engine's maximisers (``HamiltonianMaximiser``);
4. with an adaptive rule (``rho=None``, or ``method="sqh"``) the closure is evaluated
   again at the new parameters and the step is kept only if J = loss + sum_n L_n
   decreased enough; otherwise the weight grows and step 3 is redone from the same data;
5. parameters with a finite set (``controls={name: pmp.Finite(...)}``: binary, ternary
   weights) are updated by Li & Hao's closed form from a moving average of dH/dW
   (``discrete.py``), every step, from the same frozen data (no decrease test: the
   reference's rule has none; its safeguard is the threshold rho_k).

Where the augmented Hamiltonian of a layer separates over its parameters (a ``Linear``
or ``Conv`` layer, rho = 0: ``method="sqh"`` or ``"msa"``, with eps or weight decay > 0)
the layer is maximised in closed form: the per-parameter quadratic's maximiser passed
through the penalty's proximal map (hard thresholding for L0, bSQH; soft for L1) and
the box, checked by one exact evaluation (``separable_maximise``).
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Mapping, Optional, Tuple

import torch

from ..controls import Box, ControlSet, Finite, Reals
from ..maximisers import HamiltonianMaximiser
from ..penalties import ControlPenalty, prox_in_box
from ..rules import SQH as _SQHRule
from ..rules import ExtendedMSA as _EMSARule
from ..rules import adapt_rho
from .discrete import DiscreteRule, FiniteWeights
from .groups import LayerGroup, group_layers
from .hamiltonian import LayerHamiltonian, layer_data
from .recording import CostateRecorder

# The rho rule of the network optimiser: high_ratio 0.5, as measured on networks; the continuous-time
# default (0.9) was measured on the reference problems only (docs/benchmarks.md, section 5).
_NETWORK_RHO_RULE = {"high_ratio": 0.5}

__all__ = ["EMSA", "MSA", "SQH"]

METHODS = ("emsa", "msa", "sqh")


class EMSA(torch.optim.Optimizer):
    """Train a ``torch.nn.Sequential`` by the (extended) method of successive approximations.

    The entries of the Sequential are the layers x_{n+1} = g_n(x_n, theta_n); entries
    without parameters (activations, pooling, flatten) are layers with nothing to maximise.

    Args:
        model: a ``torch.nn.Sequential`` (its entries may be any modules, e.g.
            ``pmp.nn.Residual``); each entry runs once per forward pass.
        rho: the E-MSA weight of paper eq. (7). None (default): adaptive, starting at
            1/B for batch size B and adapted by the decrease test (the closure runs again
            for every trial step). A number: the paper's fixed rho, every step taken, one
            closure call per step. Convention (the reference code's): p from the batch-mean
            loss, the feasibility terms summed over the batch.
        maximiser_iter: iterations of each layer maximisation (L-BFGS; 10 in the reference code).
        perturb: half-width a of U(-a, a) noise added to the maximisation's start (the
            reference code uses 0.005; needed to leave a symmetric start such as all zeros).
        controls: ``{parameter name: pmp.Box(low, high) | pmp.Reals() | pmp.Finite(values)}``
            (names as in ``model.named_parameters()``); default: unrestricted. A ``Finite`` set
            (e.g. ``pmp.Finite([-1., 1.])`` binary, ``[-1., 0., 1.]`` ternary; its ``shape`` is
            ignored, every weight takes one of the values) puts the parameter under Li & Hao's
            discrete-weight rule (see ``discrete``); the weights are put into the set when the
            optimizer is built (``DiscreteRule.init``).
        penalties: ``{parameter name: pmp.L1(c) | pmp.L0(c)}``: c |theta|_1 or c |theta|_0
            added to the loss, handled exactly (soft / hard thresholding; on a finite-set
            parameter c is the sparsity weight lambda of the ternary rule).
        process_group: a ``torch.distributed`` group: each rank's closure is the mean loss of
            its shard of the batch; sums over samples are all-reduced, parameters stay
            identical on every rank. None: one process.
        method: "emsa" (default), "msa" (basic MSA: rho = 0, paper Alg. 1) or "sqh" (the
            sequential quadratic Hamiltonian method: eps |theta - theta^k|^2 with adaptive eps).
        weight_decay: L_n(theta) = weight_decay/2 |theta|^2 for every parameter (the reference
            code's ``reg``). Put parameter costs here or in ``penalties``, not in the closure's
            loss: the Hamiltonian sees the loss only through the layers' outputs.
        seed: seed of the generator of the ``perturb`` noise.
        max_trials: maximisations per step with an adaptive rule before the step gives up
            (parameters unchanged, the weight grown).
        discrete: the ``pmp.nn.DiscreteRule`` of the finite-set parameters (threshold rho, moving
            average rate and its decay schedule); default ``DiscreteRule()``.
        adam_lr: None (default): every parameter without a finite set is maximised as above. A
            number: the parameters without a control set and without a penalty (biases, batch
            norm) take one Adam step of this learning rate on -H_n instead (the discrete-
            weight reference code's treatment of its batch-norm parameters, lr 1e-3). With x, p
            frozen, grad(-H_n) is the closure's loss gradient (paper Prop. 2), so this is Adam on
            those parameters, with ``weight_decay`` as Adam's L2 term; no second closure call.

    Example (full batch; the closure is the one ``torch.optim.LBFGS`` takes):

        >>> import torch, pmpsolve as pmp
        >>> torch.manual_seed(0) and None
        >>> x = torch.randn(64, 2); y = (x[:, 0] * x[:, 1] > 0).long()
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(),
        ...     pmp.nn.Residual(torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh()), 0.5),
        ...     torch.nn.Linear(16, 2))
        >>> opt = pmp.nn.EMSA(model)
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = torch.nn.functional.cross_entropy(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> first = float(opt.step(closure))
        >>> for _ in range(20):
        ...     last = float(opt.step(closure))
        >>> last < first
        True
    """

    def __init__(self, model: torch.nn.Module, rho: Optional[float] = None, maximiser_iter: int = 10,
                 perturb: float = 0.0, controls: Optional[Mapping[str, ControlSet]] = None,
                 penalties: Optional[Mapping[str, ControlPenalty]] = None, process_group=None, *,
                 method: str = "emsa", weight_decay: float = 0.0, seed: int = 0, max_trials: int = 10,
                 discrete: Optional[DiscreteRule] = None, adam_lr: Optional[float] = None):
        if not isinstance(model, torch.nn.Sequential):
            raise TypeError(
                f"pmp.nn.{type(self).__name__} trains a torch.nn.Sequential whose entries are the layers "
                f"x_(n+1) = g_n(x_n, theta_n), got {type(model).__name__}. Write the model as "
                "torch.nn.Sequential(layer_0, ..., layer_(N-1)) (pmp.nn.Residual for residual layers)")
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {', '.join(map(repr, METHODS))}")
        if rho is not None:
            try:
                rho = float(rho)
            except (TypeError, ValueError):
                raise TypeError(f"`rho` must be a number >= 0 or None (adaptive), got {rho!r}") from None
            if not (math.isfinite(rho) and rho >= 0):
                raise ValueError(f"`rho` must be a finite number >= 0 or None (adaptive), got {rho!r}")
        if int(maximiser_iter) < 1:
            raise ValueError(f"`maximiser_iter` must be >= 1, got {maximiser_iter!r}")
        if not (float(perturb) >= 0):
            raise ValueError(f"`perturb` must be >= 0 (a half-width), got {perturb!r}")
        if not (float(weight_decay) >= 0):
            raise ValueError(f"`weight_decay` must be >= 0, got {weight_decay!r}")
        if int(max_trials) < 1:
            raise ValueError(f"`max_trials` must be >= 1, got {max_trials!r}")
        if discrete is not None and not isinstance(discrete, DiscreteRule):
            raise TypeError(f"`discrete` must be a pmp.nn.DiscreteRule, got {type(discrete).__name__}")
        if adam_lr is not None and not (math.isfinite(float(adam_lr)) and float(adam_lr) > 0):
            raise ValueError(f"`adam_lr` must be a number > 0 or None, got {adam_lr!r}")
        seen = set()
        for n, module in enumerate(model):
            if id(module) in seen:
                raise ValueError(f"pmp.nn: entry {n} of the Sequential is a module that appears twice; every layer "
                                 "must be its own module (shared weights are not a layer-wise control)")
            seen.add(id(module))
        self._layers: Dict[int, torch.nn.Module] = {
            n: module for n, module in enumerate(model) if any(p.requires_grad for p in module.parameters())}
        if not self._layers:
            raise ValueError("pmp.nn: the model has no trainable parameters")
        names = {name for name, p in model.named_parameters() if p.requires_grad}
        controls, penalties = dict(controls or {}), dict(penalties or {})
        for what, table, kind in (("controls", controls, ControlSet), ("penalties", penalties, ControlPenalty)):
            unknown = sorted(set(table) - names)
            if unknown:
                raise ValueError(f"pmp.nn: {what} names {unknown}, not trainable parameters of the model; "
                                 f"its parameters are e.g. {sorted(names)[:6]}")
            bad = {k: v for k, v in table.items() if not isinstance(v, kind)}
            if bad:
                raise TypeError(f"pmp.nn: {what} values must be {kind.__name__} objects "
                                f"({'pmp.Box / pmp.Reals / pmp.Finite' if kind is ControlSet else 'pmp.L1 / pmp.L0'}), "
                                f"got {bad}")
        unsupported = {k: v for k, v in controls.items() if not isinstance(v, (Box, Reals, Finite))}
        if unsupported:
            raise TypeError(f"pmp.nn: unsupported control set(s) {unsupported}: a network parameter takes "
                            "pmp.Box, pmp.Reals or pmp.Finite")
        if process_group is not None:
            import torch.distributed as dist
            if not dist.is_available() or not dist.is_initialized():
                raise RuntimeError("process_group given but torch.distributed is not initialised: call "
                                   "torch.distributed.init_process_group first (or launch with torchrun)")
        self._controls, self._penalties = controls, penalties
        self._group = process_group
        # The reducer of the group: all-reduces (one fused buffer, with an error flag) and the error
        # guard that turns an exception on one rank into the same exception on every rank.
        self._reducer = None
        if process_group is not None:
            from ..reduce import DistributedSampleReducer, _check_group
            _check_group(process_group)
            self._reducer = DistributedSampleReducer(process_group, 1, 1)
        self.method = method
        defaults = dict(rho=rho, maximiser_iter=int(maximiser_iter), perturb=float(perturb),
                        weight_decay=float(weight_decay), max_trials=int(max_trials),
                        current_rho=None if method == "msa" else rho, current_eps=None)
        params = [p for module in self._layers.values() for p in module.parameters() if p.requires_grad]
        super().__init__(params, defaults)
        if method == "msa":
            self.param_groups[0]["current_rho"] = 0.0
        self._recorder = CostateRecorder(self._layers)
        named = dict(model.named_parameters())
        self._named = named
        finite = {k: v for k, v in controls.items() if isinstance(v, Finite)}
        self._finite: Optional[FiniteWeights] = None
        if finite:
            self._finite = FiniteWeights({k: named[k] for k in finite}, finite, penalties, discrete or DiscreteRule())
        self._finite_names = frozenset(finite)
        free = {k: p for k, p in named.items() if p.requires_grad and k not in controls and k not in penalties}
        self._adam = None
        self._exclude = self._finite_names
        if adam_lr is not None and free:
            self._adam = torch.optim.Adam(list(free.values()), lr=float(adam_lr), weight_decay=float(weight_decay))
            self._exclude = self._finite_names | frozenset(free)
        self._refused: set = set()  # groups (their layer indices) whose objective did not separate
        self._routes: Dict[tuple, str] = {}  # how each group was maximised in the last step
        self._generator = torch.Generator().manual_seed(int(seed))
        #: what the last step did: loss, J before/after, trials, rho/eps, gain, accepted
        self.last_step: Dict[str, object] = {}

    # -- helpers ---------------------------------------------------------------------------
    def _guard(self):
        """``with self._guard() as guard:``: keeps an exception of this rank in ``guard.error`` (a process
        group; see ``reduce.ErrorGuard``), lets it propagate in one process."""
        from ..reduce import ErrorGuard
        return ErrorGuard(self._reducer is not None)

    def _world(self) -> int:
        if self._group is None:
            return 1
        import torch.distributed as dist
        return dist.get_world_size(self._group)

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        return self._reducer.totals(t)[0].clone()

    def _global_loss(self, loss: Optional[torch.Tensor], batch: int,
                     error: Optional[BaseException] = None) -> Tuple[float, int]:
        """The batch-mean loss over all ranks (weighted by each rank's batch size) and the global batch
        size, in one all-reduce; ``error`` (this rank's closure failed) is raised on every rank."""
        if self._group is None:
            if error is not None:
                raise error
            return float(loss.detach().reshape(())), batch
        if error is None:
            loss = loss.detach().reshape(())
            buf = torch.stack([loss * batch, torch.as_tensor(float(batch), dtype=loss.dtype, device=loss.device)])
        else:
            buf = torch.zeros(2, dtype=torch.float64, device=self._reducer._device())
        buf = self._reducer.totals(buf, error=error)[0]
        return float(buf[0] / buf[1]), int(buf[1])

    def _parameter_cost(self, groups, rows) -> float:
        """sum_n L_n(theta_n): weight decay and penalties (identical on every rank)."""
        wd = self.param_groups[0]["weight_decay"]
        total = 0.0
        for group, u in zip(groups, rows):
            if wd:
                total += float(0.5 * wd * (u * u).sum())
            if group.penalty is not None:
                total += float(group.penalty.value(u).sum())
        return total

    def decay_average(self) -> Optional[float]:
        """Decay the finite-set rule's moving-average rate, a <- 1 - (1 - a) d (call once per epoch,
        as the reference does); returns the new a (None without finite-set parameters)."""
        return None if self._finite is None else self._finite.decay()

    def _maximise_group(self, g: LayerGroup, objective: LayerHamiltonian, settings) -> torch.Tensor:
        """The group's new rows: the separable closed form where it holds, else the engine's maximiser."""
        key = tuple(g.indices)
        if objective.rho == 0 and key not in self._refused:
            u = separable_maximise(g, objective)
            if u is not None:
                self._routes[key] = "closed-form"
                return u
            self._refused.add(key)
        self._routes[key] = "lbfgs" if objective.penalty is None else "proximal"
        maximiser = HamiltonianMaximiser(g.controls, max_iter=settings["maximiser_iter"],
                                         perturb=settings["perturb"], method="lbfgs")
        return maximiser.maximise(objective, self._generator).controls

    def _evaluate(self, closure: Callable) -> torch.Tensor:
        with torch.enable_grad():
            loss = closure()
        if not isinstance(loss, torch.Tensor):
            raise TypeError(f"the closure must return the loss tensor, got {type(loss).__name__}")
        return loss

    # -- the iteration ---------------------------------------------------------------------
    def step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:  # type: ignore[override]
        """One MSA iteration on the closure's batch; returns the loss before the step (as LBFGS does)."""
        if closure is None:
            raise TypeError(f"pmp.nn.{type(self).__name__}.step needs a closure (like torch.optim.LBFGS): "
                            "def closure(): opt.zero_grad(); loss = loss_fn(model(x), y); loss.backward(); "
                            "return loss")
        settings = self.param_groups[0]
        loss, batch = None, 0
        # With a process group an exception on one rank (in its closure, say) is kept until the next
        # all-reduce, which carries an error flag: then every rank raises it, none waits for the others.
        with self._guard() as guard:
            with self._recorder.recording():
                loss = self._evaluate(closure)
            records = self._recorder.records(list(self._layers))
            first = records[next(iter(self._layers))]
            batch = int(first.inputs.shape[0]) if first.inputs.ndim else 1
        loss_value, global_batch = self._global_loss(loss, batch, guard.error)
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"pmp.nn: the closure's loss is {loss_value}; nothing to maximise")
        world = self._world()
        groups = group_layers(self._layers, {n: r.inputs for n, r in records.items()}, self._controls,
                              self._penalties, self._exclude)
        scale = batch / global_batch
        if self._group is not None and global_batch != batch:
            # Each rank's p is the co-state of its own shard mean; of the global mean it is B_r / B of that.
            records = {n: r._replace(costates=r.costates * scale) for n, r in records.items()}
        finite_grads = None
        if self._finite is not None:
            # dH/dW = -d loss/dW (Prop. 2), read now: trial closures below overwrite .grad
            finite_grads = self._finite.gradients(scale)
            if self._group is not None:
                finite_grads = [self._all_reduce(g) for g in finite_grads]
        adam_grads = None
        if self._adam is not None:  # grad(-H_n) = d loss / d theta (Prop. 2), kept: trial closures overwrite .grad
            adam_grads = [None if p.grad is None else p.grad.detach().clone()
                          for grp in self._adam.param_groups for p in grp["params"]]
        old = [g.parameters() for g in groups]
        adaptive_rho = self.method == "emsa" and settings["rho"] is None
        if adaptive_rho and settings["current_rho"] is None:
            # rho acts on sums over the batch while p is the co-state of the batch mean: start at 1/B.
            settings["current_rho"] = float(_EMSARule.defaults["rho0"]) / global_batch
        if self.method == "sqh" and settings["current_eps"] is None:
            settings["current_eps"] = float(_SQHRule.defaults["eps0"])
        rho = settings["current_rho"] or 0.0
        need_p_in = self.method == "emsa"
        datas = [layer_data(g, records, u, need_p_in) for g, u in zip(groups, old)]
        reduce = self._reducer
        # Parameter terms are added on every rank and then summed: each rank adds 1/R of them.
        wd = settings["weight_decay"] / world
        J0 = loss_value + self._parameter_cost(groups, old)
        adaptive = adaptive_rho or self.method == "sqh"
        info = {"loss": loss_value, "J": J0, "trials": 0, "accepted": not groups}
        for trial in range(1, (settings["max_trials"] if groups else 0) + 1):
            eps = settings["current_eps"] or 0.0
            objectives = [LayerHamiltonian(g, d, rho, eps / world, wd, reduce) for g, d in zip(groups, datas)]
            new = [self._maximise_group(g, objective, settings) for g, objective in zip(groups, objectives)]
            for g, u in zip(groups, new):
                g.assign(u)
            info.update(trials=trial, rho=rho, eps=eps, routes=dict(self._routes))
            if not adaptive:
                info["accepted"] = True
                break
            gain = sum(float((o.hamiltonian(u) - o.hamiltonian(u0)).sum()) for o, u, u0 in zip(objectives, new, old))
            trial_loss = None
            with self._guard() as guard:
                trial_loss = self._evaluate(closure)
            try:
                J1 = self._global_loss(trial_loss, batch, guard.error)[0] + self._parameter_cost(groups, new)
            except Exception:
                for g, u in zip(groups, old):  # the closure failed (on some rank): parameters as before the step
                    g.assign(u)
                raise
            info.update(gain=gain, J_new=J1)
            if self.method == "emsa":
                o = {**_EMSARule.defaults, **_NETWORK_RHO_RULE}
                accept = J1 <= J0 - float(o["eta"]) * max(gain, 0.0) and J1 < J0
                rho = adapt_rho(rho, accept, J0 - J1, gain, o)
                settings["current_rho"] = rho
            else:
                o = _SQHRule.defaults
                step = sum(float(((u - u0) ** 2).sum()) for u, u0 in zip(new, old))
                accept = J1 - J0 <= -float(o["eta"]) * step and J1 <= J0
                factor = float(o["zeta"]) if accept else float(o["sigma"])
                settings["current_eps"] = min(max(eps * factor, float(o["eps_min"])), float(o["eps_max"]))
            if accept:
                info["accepted"] = True
                break
            for g, u in zip(groups, old):
                g.assign(u)
        if self._adam is not None:
            for p, g in zip((p for grp in self._adam.param_groups for p in grp["params"]), adam_grads):
                p.grad = None if g is None or self._group is None else self._all_reduce(g * scale)
                if g is not None and self._group is None:
                    p.grad = g
            self._adam.step()  # Adam on -H_n of the free parameters (the reference's batch norm), same data
        if self._finite is not None:
            info["finite"] = self._finite.step(finite_grads, settings["weight_decay"])
        sparse = [g for g in groups if g.penalty is not None]
        if sparse or self._finite is not None:
            info["nonzero"] = self.nonzero_fraction()
        self.last_step = info
        return loss

    def nonzero_fraction(self) -> float:
        """The fraction of non-zero weights among the parameters with a penalty or a finite set."""
        names = set(self._penalties) | set(self._finite_names)
        if not names:
            return 1.0
        count, total = 0, 0
        for name, p in self._named.items():
            if name in names:
                count += int((p.detach() != 0).sum())
                total += p.numel()
        return count / max(total, 1)


class MSA(EMSA):
    """Basic MSA (paper Alg. 1) for networks: ``EMSA(model, method="msa")``, rho = 0, no safeguard.

    Basic MSA maximises the plain Hamiltonian; a layer whose Hamiltonian is linear in its
    parameters is unbounded without a bound (``controls``) or ``weight_decay``.
    """

    def __init__(self, model: torch.nn.Module, **kwargs):
        kwargs.pop("method", None)
        super().__init__(model, **kwargs, method="msa")


class SQH(EMSA):
    """The sequential quadratic Hamiltonian method for networks (bSQH's adaptive eps): ``EMSA(model, method="sqh")``."""

    def __init__(self, model: torch.nn.Module, **kwargs):
        kwargs.pop("method", None)
        super().__init__(model, **kwargs, method="sqh")


#: layers whose output is affine in their parameters: their Hamiltonian p . g(x, theta) is linear in theta
AFFINE_LAYERS = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


def separable_maximise(group: LayerGroup, objective: LayerHamiltonian) -> Optional[torch.Tensor]:
    """The exact maximiser [G, m] of a separable augmented Hamiltonian, or None where it does not separate.

    With rho = 0 and a layer affine in theta, Htilde(theta) = H(theta^k) + g . d - c |d|^2
    - wd/2 ... is, per parameter, the concave quadratic -c (theta - v)^2 with
    c = eps + weight_decay / 2 and v = theta^k + g / (2 c) (g: the gradient at theta^k), minus
    the penalty: its maximiser is prox_{penalty / (2c)}(v) in the box, i.e. hard
    thresholding |v| > sqrt(lambda / c) for L0 (Hofmann & Borzi's bSQH step), soft for L1.
    One exact evaluation checks the prediction (a layer that is not affine is refused).
    """
    if not isinstance(group.template, AFFINE_LAYERS) or objective.rho != 0:
        return None
    c = objective.eps + 0.5 * objective.weight_decay
    if not c > 0:
        return None  # linear objective: unbounded without a box, no closed form here
    u0 = objective.data.controls
    value0, g = objective.value_and_grad(u0)
    v = u0 + g / (2 * c)
    low, high = group.controls.bounds(u0.dtype, u0.device)
    step = torch.full_like(v, 1.0 / (2 * c))
    u = prox_in_box(objective.penalty, v, step, low.expand_as(v), high.expand_as(v))
    d = u - u0
    predicted = value0 + (g * d - c * d * d).sum(-1) - objective.penalty_value(u)
    exact = objective(u).detach()
    tol = 1e3 * torch.finfo(u0.dtype).eps * (value0.abs() + (g * d).abs().sum(-1) + c * (d * d).sum(-1) + 1.0)
    if not bool(((exact - predicted).abs() <= tol).all()):
        return None
    return u
