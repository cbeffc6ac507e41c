"""``pmp.nn.Optimizer`` (``EMSA``, ``MSA``, ``SQH``): training a network by the maximum principle.

One ``step(closure)`` is one iteration of the paper's Alg. 3 on the closure's
(mini-)batch, driven by the same update-rule objects as ``pmp.solve`` (``pmpsolve.update.rules``):

1. the closure's forward pass records every layer's input x_n and output x_{n+1};
2. its ``loss.backward()`` gives the co-states p_{n+1} = -d loss / d x_{n+1} (hooks);
3. the rule proposes new parameters: every layer's (augmented) Hamiltonian
   (``hamiltonian.LayerHamiltonian``) maximised with x_n, p_{n+1} frozen, layers of equal
   shapes as the rows of one batched maximisation (``network.LayerIterate``: the layer data
   in the shape the rules read);
4. an adaptive rule (E-MSA with ``rho=None``, SQH, an adaptive gradient step) judges the
   proposal by J = loss + sum_n L_n at the new parameters (the closure runs again) and its
   Hamiltonian gain, exactly as in a control solve; a rejected proposal is redone from the
   same data with the rule's adapted weight;
5. the collaborators that are not the rule: parameters with a finite set (``controls={name:
   pmp.Finite(...)}``: binary, ternary weights) move by Li & Hao's closed form from a moving
   average of dH/dW (``discrete.FiniteWeights``); with ``adam_lr`` the remaining free
   parameters (batch norm) take one Adam step on -H_n (``AdamPath``); with a process group
   every sum over the batch is all-reduced (``BatchReduction``).

Where a layer's augmented Hamiltonian separates over its parameters (a ``Linear`` or ``Conv``
layer, rho = 0: SQH or MSA with eps or weight decay > 0) it is maximised in closed form: the
per-parameter quadratic's maximiser passed through the penalty's proximal map (hard
thresholding for L0, bSQH; soft for L1) and the box, checked by one exact evaluation
(``separable_maximise``). With rho > 0 the augmented Hamiltonian of such a layer is an exact concave
quadratic, maximised by solving it (``affine.affine_maximise``, docs/theory.md); other layers run L-BFGS,
on the hand-derived gradient of ``derived.DerivedHamiltonian`` for residual tanh layers and affine entries.
"""
from __future__ import annotations

import math
import numbers
import warnings
from types import SimpleNamespace
from typing import Callable, Dict, Mapping, Optional, Tuple, Union

import torch
from torch.func import vmap

from ..controls import Box, ControlSet, Finite, Reals
from ..errors import DivergenceError
from ..update.maximisers import HamiltonianMaximiser, ProjectedLBFGS
from ..methods import EMSA as EMSAMethod
from ..methods import Method, as_method
from ..penalties import ControlPenalty, prox_in_box
from ..update.rules import SQH as _SQHRule
from ..update.rules import BasicMSA, ExtendedMSA, GradientStep, UpdateRule
from ..update.stopping import Divergence
from .affine import QuadraticSums, affine_maximise, quadratic_sums
from .discrete import DiscreteRule, FiniteWeights, resolve_scales
from .groups import LayerGroup, group_layers
from .hamiltonian import LayerHamiltonian, layer_data
from .network import LayerIterate, LayerMaximiser, LayerProblem, row_penalty, row_set
from .recording import CostateRecorder
from .derived import derived_objective, has_derived_objective

__all__ = ["Optimizer", "EMSA", "MSA", "SQH", "BatchReduction", "AdamPath"]

#: the update rules of ``pmp.solve`` that train networks (the same classes)
METHODS = {"emsa": ExtendedMSA, "msa": BasicMSA, "sqh": _SQHRule, "gradient": GradientStep}
# Where a network's defaults differ from a control problem's: E-MSA's rho rule with high_ratio 0.75 (0.9 was
# measured on the reference problems, docs/benchmarks.md, section 5; on the CNN study's network, 7 seeds x 2
# epochs of shuffled batches, 0.75 took 1.15-1.19 trials a step against 1.28-1.31 with 0.5, 10 % less time, the
# same test accuracy: 0.917 against 0.914 on average) and no Anderson acceleration (its mixtures are of controls
# on a time mesh).
NETWORK_OPTIONS = {"emsa": {"anderson": 0, "high_ratio": 0.75}}

#: dropout and its variants: random in training mode
_DROPOUT = torch.nn.modules.dropout._DropoutNd


#: with the Kronecker-factored preconditioner (adaptive rho), an L-BFGS row stops when a step increased its
#: augmented Hamiltonian by at most this fraction of its increase so far (docs/networks.md)
KRONECKER_RTOL = 0.01


def _whole(label: str, value, low: int) -> int:
    """``value`` as an int >= low; refuses floats (2.7 is not silently 2) and bools."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"`{label}` must be a whole number >= {low}, got {value!r}")
    return int(value)


def _finite(label: str, value, low: float = 0.0) -> float:
    """``value`` as a finite float >= low (inf would write inf or NaN into the weights)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (math.isfinite(value) and value >= low):
        raise ValueError(f"`{label}` must be a finite number >= {low:g}, got {value!r}")
    return float(value)


class _Settings(dict):
    """A param group of a pmp.nn optimizer. It has no learning rate, and says so when asked for one
    (a torch.optim.lr_scheduler reads ``group["lr"]``)."""

    def __missing__(self, key):
        if key in ("lr", "initial_lr"):
            raise KeyError(
                f"pmp.nn optimizers have no learning rate {key!r}, so a torch.optim.lr_scheduler cannot drive them. "
                "E-MSA's step size is set by rho (a larger rho, smaller steps): leave rho=None (adaptive), or "
                "schedule a fixed rho yourself, e.g. `for g in opt.param_groups: g['rho'] = 0.03 * 0.5 ** epoch`")
        raise KeyError(key)


def _check_entries(model: torch.nn.Sequential) -> None:
    """Every entry its own module, and no parameter reached from two entries (shared or tied weights)."""
    seen = set()
    for n, module in enumerate(model):
        if id(module) in seen:
            raise ValueError(f"pmp.nn: entry {n} of the Sequential is a module that appears twice; every layer "
                             "must be its own module (shared weights are not a layer-wise control)")
        seen.add(id(module))
    owners: Dict[int, list] = {}  # parameter -> the entries that reach it
    for n, module in enumerate(model):
        for name, p in module.named_parameters():
            owners.setdefault(id(p), []).append(f"{n}.{name}")
    shared = [names for names in owners.values() if len({name.split(".")[0] for name in names}) > 1]
    if shared:
        raise ValueError(
            f"pmp.nn: parameter(s) shared between entries of the Sequential: {shared}. Each entry's parameters are "
            "the control of one layer, maximised on their own (Jacobi over layers), so a weight reached from "
            "two entries would be written twice. Give each layer its own parameters, or put the layers that "
            "share a weight into one entry (one module)")


def _check_parameter_options(model, controls, penalties) -> Tuple[dict, dict]:
    """``controls`` and ``penalties`` as dicts of known trainable parameter names and supported sets/costs."""
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
    return controls, penalties


class BatchReduction:
    """Sums over the batch across the ranks of a process group (identity in one process).

    One all-reduce of a fused buffer per sum, carrying an error flag: an exception on one rank (in its
    closure, say) is kept until the next all-reduce and then raised on every rank (``reduce.ErrorGuard``).
    """

    def __init__(self, process_group=None):
        self.group, self.reducer = process_group, None
        if process_group is not None:
            import torch.distributed as dist
            if not dist.is_available() or not dist.is_initialized():
                raise RuntimeError("process_group given but torch.distributed is not initialised: call "
                                   "torch.distributed.init_process_group first (or launch with torchrun)")
            from ..sweep.reduce import DistributedSampleReducer, _check_group
            _check_group(process_group)
            self.reducer = DistributedSampleReducer(process_group, 1, 1)

    def guard(self):
        """``with reduction.guard() as guard:`` keeps this rank's exception in ``guard.error`` (a process group),
        lets it propagate in one process."""
        from ..sweep.reduce import ErrorGuard
        return ErrorGuard(self.reducer is not None)

    @property
    def world(self) -> int:
        if self.group is None:
            return 1
        import torch.distributed as dist
        return dist.get_world_size(self.group)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        return self.reducer.totals(t)[0].clone()

    def mean_loss(self, loss: Optional[torch.Tensor], batch: int,
                  error: Optional[BaseException] = None) -> Tuple[float, int]:
        """The batch-mean loss over all ranks (weighted by each rank's batch size) and the global batch
        size, in one all-reduce; ``error`` (this rank's closure failed) is raised on every rank."""
        if self.group is None:
            if error is not None:
                raise error
            return float(loss.detach().reshape(())), batch
        if error is None:
            loss = loss.detach().reshape(())
            buf = torch.stack([loss * batch, torch.as_tensor(float(batch), dtype=loss.dtype, device=loss.device)])
        else:
            buf = torch.zeros(2, dtype=torch.float64, device=self.reducer._device())
        buf = self.reducer.totals(buf, error=error)[0]
        return float(buf[0] / buf[1]), int(buf[1])


class AdamPath:
    """``adam_lr``: the free parameters (no control set, no penalty: biases, batch norm) take one Adam step
    on -H_n per step instead of a maximisation (the discrete-weight reference code's treatment of its
    batch-norm parameters). With x, p frozen, grad(-H_n) is the closure's loss gradient (paper Prop. 2),
    read right after the first closure call (trial closures overwrite ``.grad``)."""

    def __init__(self, params, lr: float, weight_decay: float):
        self.adam = torch.optim.Adam(list(params), lr=lr, weight_decay=weight_decay)
        self._grads = None

    def params(self):
        return [p for group in self.adam.param_groups for p in group["params"]]

    def keep_gradients(self) -> None:
        self._grads = [None if p.grad is None else p.grad.detach().clone() for p in self.params()]

    def step(self, reduction: BatchReduction, scale: float) -> None:
        for p, g in zip(self.params(), self._grads):
            if g is None:
                p.grad = None
            else:  # the gradient of the global batch mean: this rank's scaled share, all-reduced
                p.grad = g if reduction.group is None else reduction.all_reduce(g * scale)
        self.adam.step()


class Optimizer(torch.optim.Optimizer):
    """Train a ``torch.nn.Sequential`` by the maximum principle with an update rule of ``pmp.solve``.

    The entries of the Sequential are the layers x_{n+1} = g_n(x_n, theta_n); entries
    without parameters (activations, pooling, flatten) are layers with nothing to maximise.
    ``EMSA``, ``MSA`` and ``SQH`` are this class with the method fixed.

    Args:
        model: a ``torch.nn.Sequential`` (its entries may be any modules, e.g.
            ``pmp.nn.Residual``); each entry runs once per forward pass.
        method: the update rule, the method objects of ``pmp.solve``: ``pmp.EMSA(rho=None, ...)``
            (default: extended MSA, adaptive rho), ``pmp.MSA()`` (basic MSA, rho = 0, paper Alg. 1),
            ``pmp.SQH(...)`` (sequential quadratic Hamiltonian: eps |theta - theta^k|^2 with
            adaptive eps) or ``pmp.Gradient(lr=...)`` (the soft step: gradient descent on the loss,
            paper Prop. 2), or their names. Options not set on the method object take the network's:
            E-MSA without Anderson acceleration and with ``high_ratio=0.75``.
        maximiser_iter: iterations of each layer maximisation (L-BFGS; 10 in the reference code). Under the
            adaptive rule a residual tanh layer's preconditioned L-BFGS usually stops after about 3, when a
            step adds less than 1 % of its increase so far (docs/networks.md, "Speed").
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
        weight_decay: L_n(theta) = weight_decay/2 |theta|^2 for every parameter (the reference
            code's ``reg``). Put parameter costs here or in ``penalties``, not in the closure's
            loss: the Hamiltonian sees the loss only through the layers' outputs.
        seed: seed of the generator of the ``perturb`` noise.
        max_trials: proposals per step with an adaptive rule before the step gives up
            (parameters unchanged, the rule's weight grown).
        discrete: the ``pmp.nn.DiscreteRule`` of the finite-set parameters (threshold rho, moving
            average rate and its decay schedule); default ``DiscreteRule()``.
        adam_lr: None (default): every parameter without a finite set is maximised as above. A
            number: the parameters without a control set and without a penalty (biases, batch
            norm) take one Adam step of this learning rate on -H_n instead (``AdamPath``), with
            ``weight_decay`` as Adam's L2 term; no second closure call.
        closed_form: True (default): a ``Linear`` or ``Conv2d`` entry (stride 1), whose augmented
            Hamiltonian is an exact concave quadratic in its parameters, is maximised by solving that
            quadratic (``affine.affine_maximise``; unbounded or inside its box, no L1 / L0 penalty, a Linear
            only with ``weight_decay`` > 0; in a process group from batch sums totalled over the ranks);
            False: by L-BFGS like every other layer (``maximiser_iter`` iterations).

    Example: the gradient rule, which is gradient descent on the loss (paper Prop. 2).
        >>> import torch, pmpsolve as pmp
        >>> torch.manual_seed(0)   # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> x, y = torch.randn(32, 2), torch.randint(0, 2, (32,))
        >>> opt = pmp.nn.Optimizer(model, pmp.Gradient(lr=0.1, adaptive=False))
        >>> def closure():                          # the closure torch.optim.LBFGS takes
        ...     opt.zero_grad()
        ...     loss = torch.nn.functional.cross_entropy(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> losses = [float(opt.step(closure).detach()) for _ in range(5)]
        >>> losses[-1] < losses[0]
        True
    """

    def __init__(self, model: torch.nn.Module, method: Union[str, Method] = "emsa", *, maximiser_iter: int = 10, perturb: float = 0.0, controls: Optional[Mapping[str, ControlSet]] = None,
                 penalties: Optional[Mapping[str, ControlPenalty]] = None, process_group=None,
                 weight_decay: float = 0.0, seed: int = 0, max_trials: int = 10,
                 discrete: Optional[DiscreteRule] = None, adam_lr: Optional[float] = None,
                 closed_form: bool = True):
        if not isinstance(model, torch.nn.Sequential):
            raise TypeError(
                f"pmp.nn.{type(self).__name__} trains a torch.nn.Sequential whose entries are the layers "
                f"x_(n+1) = g_n(x_n, theta_n), got {type(model).__name__}. Write the model as "
                "torch.nn.Sequential(layer_0, ..., layer_(N-1)) (pmp.nn.Residual for residual layers)")
        try:
            method = as_method(method)
        except (TypeError, ValueError) as err:
            raise type(err)(str(err).replace("solve:", f"pmp.nn.{type(self).__name__}:")) from None
        if method.name not in METHODS:
            raise ValueError(f"pmp.nn.{type(self).__name__}: method {method.name!r} is not one of the rules that train "
                             f"networks: {', '.join(map(repr, METHODS))} (pmp.EMSA(), pmp.MSA(), pmp.SQH(), "
                             "pmp.Gradient())")
        rule_class, options = method.rule, method.options()
        # options the caller did not set take the network's defaults (NETWORK_OPTIONS)
        for key, value in NETWORK_OPTIONS.get(method.name, {}).items():
            if key not in method.given():
                options[key] = value
        rho = options.get("rho")
        if rho is not None:
            options["rho"] = rho = _finite("rho", rho)
        if method.name == "emsa" and options["anderson"] != 0:
            raise ValueError("pmp.nn: E-MSA's Anderson acceleration mixes controls on a time mesh; on a network "
                             "it is off (pmp.EMSA(anderson=0))")
        maximiser_iter = _whole("maximiser_iter", maximiser_iter, 1)
        perturb = _finite("perturb", perturb)
        weight_decay = _finite("weight_decay", weight_decay)
        max_trials = _whole("max_trials", max_trials, 1)
        seed = _whole("seed", seed, 0)
        if discrete is not None and not isinstance(discrete, DiscreteRule):
            raise TypeError(f"`discrete` must be a pmp.nn.DiscreteRule, got {type(discrete).__name__}")
        if not isinstance(closed_form, bool):
            raise TypeError(f"`closed_form` must be True or False, got {closed_form!r}")
        if adam_lr is not None and not (isinstance(adam_lr, numbers.Real) and math.isfinite(adam_lr) and adam_lr > 0):
            raise ValueError(f"`adam_lr` must be a finite number > 0 or None, got {adam_lr!r}")
        _check_entries(model)
        self._layers: Dict[int, torch.nn.Module] = {
            n: module for n, module in enumerate(model) if any(p.requires_grad for p in module.parameters())}
        if not self._layers:
            raise ValueError("pmp.nn: the model has no trainable parameters")
        controls, penalties = _check_parameter_options(model, controls, penalties)
        self._controls, self._penalties = controls, penalties
        self._reduction = BatchReduction(process_group)
        self.method, self._rule_class, self._rule_options = method.name, rule_class, options
        relative = sorted(k for k, pen in penalties.items()
                          if getattr(pen, "relative", False) and not isinstance(controls.get(k), Finite))
        if relative and method.name != "sqh":
            raise ValueError(f"pmp.nn: the relative penalty of {relative[0]!r} is measured in SQH's proximity weight "
                             "(pmp.nn.SQH) or, on pmp.Finite weights, by the discrete-weight rule; with "
                             f"{method.name!r} give the absolute weight, e.g. pmp.{penalties[relative[0]].name}(1e-4)")
        self._rule = None  # built at the first step, when the batch size is known (rho starts at rho0 / B)
        self._pending_rule_state = None  # a checkpoint's rule state, applied when the rule is built
        defaults = dict(rho=rho, maximiser_iter=maximiser_iter, perturb=perturb, weight_decay=weight_decay,
                        max_trials=max_trials, current_rho=0.0 if method.name == "msa" else rho, current_eps=None)
        params = [p for module in self._layers.values() for p in module.parameters() if p.requires_grad]
        super().__init__(params, defaults)
        self._recorder = CostateRecorder(self._layers)
        named = dict(model.named_parameters())
        self._named = named
        self._model = model
        self._forward_only_trials = True  # until a closure fails without its parameters' gradients
        finite = {k: v for k, v in controls.items() if isinstance(v, Finite)}
        self._finite: Optional[FiniteWeights] = None
        if finite:
            self._finite = FiniteWeights({k: named[k] for k in finite}, resolve_scales(model, finite), penalties,
                                         discrete or DiscreteRule())
        self._finite_names = frozenset(finite)
        free = {k: p for k, p in named.items() if p.requires_grad and k not in controls and k not in penalties}
        self._adam: Optional[AdamPath] = None
        self._exclude = self._finite_names
        if adam_lr is not None and free:
            self._adam = AdamPath(free.values(), float(adam_lr), weight_decay)
            self._exclude = self._finite_names | frozenset(free)
        self._closed_form = closed_form
        self._refused: set = set()  # groups (their layer indices) whose objective did not separate
        self._checked: set = set()  # groups whose exact quadratic (affine.affine_maximise) passed its check
        self._routes: Dict[tuple, str] = {}  # how each group was maximised in the last step
        self._sums: Dict[tuple, Optional[QuadraticSums]] = {}  # the closed form's batch sums of this step
        self._vmap_checked: set = set()  # groups (their layer indices) tried once under torch.func.vmap
        self._unbatched: set = set()  # layers vmap has no batching rule for (e.g. a wrapped GRU): run alone
        self._grouping = None  # (what the grouping read, the groups): ``_group_layers``
        # dropout modules (entry index, module): random in training mode
        self._dropouts = [(n, module) for n, entry in enumerate(model) for module in entry.modules()
                          if isinstance(module, _DROPOUT)]
        self._generator = torch.Generator().manual_seed(seed)
        self._steps = 0
        # basic MSA's divergence test (the control solver's ``stopping.Divergence``): J at the first step,
        # the rises in a row, and the best parameters seen
        self._divergence = {"first": None, "rises": 0, "best_cost": math.inf, "best": None}
        self.param_groups = [_Settings(g) for g in self.param_groups]
        self._built = True
        #: what the last step did: loss, J before/after, trials, rho/eps, gain, accepted
        self.last_step: Dict[str, object] = {}

    # -- torch.optim.Optimizer -------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        """Refused after construction: the optimizer maximises the Hamiltonians of its model's layers."""
        if getattr(self, "_built", False):
            raise ValueError(
                f"pmp.nn.{type(self).__name__} trains the layers of the Sequential it was built with; it cannot take "
                "another param group (its parameters would never be updated). Build the optimizer on a Sequential "
                "that holds every layer to train, or train the other parameters with their own optimizer")
        super().add_param_group(param_group)

    def state_dict(self) -> dict:
        """Everything the next step depends on: torch's param groups, the update rule's adapted state (rho,
        eps, lr), the generator of ``perturb``, the finite-set rule's moving averages, rate and step count,
        the inner Adam of ``adam_lr``, the divergence test's record and which layers took which route.
        ``load_state_dict`` of it on a new optimizer of the same model continues bit for bit."""
        state = super().state_dict()
        d = self._divergence
        state["pmpsolve"] = {
            "steps": self._steps,
            "rule": self._rule.state() if self._rule is not None else self._pending_rule_state,
            "generator": self._generator.get_state(),
            "refused": sorted(self._refused), "vmap_checked": sorted(self._vmap_checked),
            "unbatched": sorted(self._unbatched),
            "finite": None if self._finite is None else self._finite.state_dict(),
            "adam": None if self._adam is None else self._adam.adam.state_dict(),
            "divergence": {**d, "best": None if d["best"] is None else {k: v.clone() for k, v in d["best"].items()}},
        }
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("pmpsolve", None)
        if extra is None:
            raise ValueError(f"pmp.nn.{type(self).__name__}.load_state_dict: the state dict has no 'pmpsolve' entry; "
                             "pass the dict returned by this optimizer's state_dict()")
        if (extra["finite"] is None) != (self._finite is None) or (extra["adam"] is None) != (self._adam is None):
            raise ValueError(f"pmp.nn.{type(self).__name__}.load_state_dict: the state dict comes from an optimizer "
                             "with other options (finite-set controls or adam_lr differ)")
        super().load_state_dict(state_dict)
        self.param_groups = [_Settings(g) for g in self.param_groups]
        self._steps = int(extra["steps"])
        self._pending_rule_state = extra["rule"]
        if self._rule is not None and extra["rule"] is not None:
            self._rule.load_state(extra["rule"])
        self._generator.set_state(extra["generator"])
        self._refused = {tuple(k) for k in extra["refused"]}
        self._vmap_checked = {tuple(k) for k in extra["vmap_checked"]}
        self._unbatched = set(extra["unbatched"])
        self._grouping = None
        if self._finite is not None:
            self._finite.load_state_dict(extra["finite"])
        if self._adam is not None:
            self._adam.adam.load_state_dict(extra["adam"])
        d = dict(extra["divergence"])
        d["best"] = None if d["best"] is None else {k: v.clone() for k, v in d["best"].items()}
        self._divergence = d

    def decay_average(self) -> Optional[float]:
        """Decay the finite-set rule's moving-average rate, a <- 1 - (1 - a) d (call once per epoch,
        as the reference does); returns the new a (None without finite-set parameters)."""
        return None if self._finite is None else self._finite.decay()

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

    # -- the iteration ---------------------------------------------------------------------
    def step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:  # type: ignore[override]
        """One iteration of the rule on the closure's batch; returns the loss before the step (as LBFGS does)."""
        if closure is None:
            raise TypeError(f"pmp.nn.{type(self).__name__}.step needs a closure (like torch.optim.LBFGS): "
                            "def closure(): opt.zero_grad(); loss = loss_fn(model(x), y); loss.backward(); "
                            "return loss")
        settings = self.param_groups[0]
        fixed_rho = self.method == "emsa" and settings["rho"] is not None
        if fixed_rho:  # a fixed rho, read at every step: the user may schedule it
            settings["rho"] = settings["current_rho"] = _finite("rho", settings["rho"])
        reduction = self._reduction
        loss, batch = None, 0
        with reduction.guard() as guard:
            with self._recorder.recording():
                loss = self._evaluate(closure)
            records = self._recorder.records(list(self._layers))
            batch = self._check_records(records)
        loss_value, global_batch = reduction.mean_loss(loss, batch, guard.error)
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"pmp.nn: the closure's loss is {loss_value}; nothing to maximise")
        self._check_costates(records, loss_value)
        inputs = {n: r.inputs for n, r in records.items()}
        proximity = self._proximity()
        groups = self._group_layers(inputs, records, proximity)
        # no layer to maximise (every parameter finite-set or under adam_lr): no rule
        rule = self._rule_for(global_batch, groups) if groups else None
        if fixed_rho and rule is not None:
            rule.rho = settings["rho"]
        self._check_stochastic_layers(rule is not None and rule.adaptive)
        scale = batch / global_batch
        if reduction.group is not None and global_batch != batch:
            # Each rank's p is the co-state of its own shard mean; of the global mean it is B_r / B of that.
            records = {n: r._replace(costates=r.costates * scale) for n, r in records.items()}
        finite_grads = None
        if self._finite is not None:
            # dH/dW = -d loss/dW (Prop. 2), read now: trial closures below overwrite .grad
            finite_grads = self._finite.gradients(scale)
            if reduction.group is not None:
                finite_grads = [reduction.all_reduce(g) for g in finite_grads]
        if self._adam is not None:
            self._adam.keep_gradients()
        self._sums = {}  # formed at this step's first trial
        old = [g.parameters() for g in groups]
        datas = [layer_data(g, records, u, self._input_costates(g)) for g, u in zip(groups, old)]
        iterate = LayerIterate.of(groups, datas)
        J0 = loss_value + self._parameter_cost(groups, old)
        self._steps += 1
        self._track_divergence(J0, groups)
        info = {"loss": loss_value, "J": J0, "trials": 0, "accepted": not groups}
        for trial in range(1, (settings["max_trials"] if groups else 0) + 1):
            new = iterate.split(rule.propose(iterate))
            for g, u in zip(groups, new):
                g.assign(u)
            info.update(trials=trial, rho=float(getattr(rule, "rho", 0.0)), eps=float(getattr(rule, "eps", 0.0)),
                        routes=dict(self._routes))
            if not rule.adaptive:
                info["accepted"] = True
                break
            # J'p of the closed form's groups: their gains without a pass of the layer
            plain = [getattr(self._sums.get(tuple(g.indices)), "gradient", None) for g in groups]
            gains = iterate.objective(self._layer_problem, 0.0).hamiltonian_gains(iterate.join(new), plain)
            bad = [g for g, value in zip(groups, gains) if not math.isfinite(value)]
            if bad:
                for g, u in zip(groups, old):
                    g.assign(u)
                raise FloatingPointError(f"pmp.nn: the Hamiltonian gain of {_layers(bad[0])} is not finite at step "
                                         f"{self._steps}; the parameters are left as they were")
            gain = sum(gains)
            trial_loss = None
            with reduction.guard() as guard:
                trial_loss = self._trial_loss(closure)
            try:
                J1 = reduction.mean_loss(trial_loss, batch, guard.error)[0] + self._parameter_cost(groups, new)
            except Exception:
                for g, u in zip(groups, old):  # the closure failed (on some rank): parameters as before the step
                    g.assign(u)
                raise
            info.update(gain=gain, J_new=J1)
            accept = rule.judge(J0, J1, gain)  # the rule's own acceptance test and adaptation (pmpsolve.update.rules)
            self._warn_at_ceiling(rule)
            if accept:
                info["accepted"] = True
                break
            for g, u in zip(groups, old):
                g.assign(u)
        if rule is not None and self.method == "emsa":
            settings["current_rho"] = rule.rho
        elif rule is not None and self.method == "sqh":
            settings["current_eps"] = rule.eps
        if self._adam is not None:
            self._adam.step(reduction, scale)  # Adam on -H_n of the free parameters, same data
        if self._finite is not None:
            info["finite"] = self._finite.step(finite_grads, settings["weight_decay"])
        sparse = [g for g in groups if g.penalty is not None]
        if sparse or self._finite is not None:
            info["nonzero"] = self.nonzero_fraction()
        self.last_step = info
        return loss

    # -- parts of a step -------------------------------------------------------------------
    def _rule_for(self, global_batch: int, groups) -> UpdateRule:
        """The update rule, built at the first step on the network's ``LayerProblem``."""
        if self._rule is None:
            settings = self.param_groups[0]
            reduction = self._reduction
            self._layer_problem = LayerProblem(
                global_batch, dict(weight_decay=settings["weight_decay"], reduce=reduction.reducer,
                                   world=reduction.world), row_penalty(groups))
            dtype = next(iter(self._named.values())).dtype
            device = next(iter(self._named.values())).device
            self._rule = self._rule_class(self._layer_problem, row_set(groups, dtype, device),
                                          LayerMaximiser(self._maximise_group), self._generator, self._rule_options)
            if self._pending_rule_state is not None:
                self._rule.load_state(self._pending_rule_state)
        return self._rule

    def _group_layers(self, inputs: Mapping[int, torch.Tensor], records, proximity: Optional[float]):
        """``group_layers`` of this step's inputs. The grouping reads nothing else that changes between steps but
        the inputs' shapes, which parameters are trainable and the layers vmap refused, so the last step's groups
        are reused while those stay the same (rebuilding them, with each module's repr, cost about 1 % of an
        E-MSA step), except with relative penalties, resolved at the current parameters and proximity."""
        key = (tuple((n, tuple(x.shape), x.dtype, x.device) for n, x in inputs.items()),
               tuple(p.requires_grad for p in self._named.values()), frozenset(self._unbatched), proximity)
        if self._grouping is not None and self._grouping[0] == key:
            return self._grouping[1]
        groups = group_layers(self._layers, inputs, self._controls, self._penalties, self._exclude, self._unbatched,
                              proximity)
        if self._batchable(groups, records):
            groups = group_layers(self._layers, inputs, self._controls, self._penalties, self._exclude,
                                  self._unbatched, proximity)
        relative = any(getattr(pen, "relative", False) for pen in self._penalties.values())
        self._grouping = None if relative else (key, groups)
        return groups

    def _proximity(self) -> Optional[float]:
        """SQH's proximity weight c = eps + weight_decay / 2 at the start of this step (the unit of relative
        penalties on float weights, ``ComponentPenalty.resolved``); None for the other methods."""
        if self.method != "sqh":
            return None
        eps = self._rule.eps if self._rule is not None else float(self._rule_options["eps0"])
        return eps + 0.5 * self.param_groups[0]["weight_decay"]

    def _input_costates(self, g: LayerGroup) -> Optional[bool]:
        """Whether E-MSA's objective needs p_n (True / False), or None: not now, the group's closed form
        (checked at an earlier step) does without them, or its hand-derived objective forms them itself
        (``derived.DerivedHamiltonian``, cheaper than the vjp); formed only where needed."""
        if self.method != "emsa":
            return False
        if self._closed_form and tuple(g.indices) in self._checked:
            return None
        return None if has_derived_objective(g) else True

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

    def _maximise_group(self, g: LayerGroup, objective: LayerHamiltonian,
                        generator: Optional[torch.Generator]) -> torch.Tensor:
        """The group's new rows: the separable closed form where it holds, else the engine's maximiser."""
        settings = self.param_groups[0]
        key = tuple(g.indices)
        try:
            if objective.rho == 0 and key not in self._refused:
                u = separable_maximise(g, objective)
                if u is not None:
                    self._routes[key] = "closed-form"
                    return u
                self._refused.add(key)
            if self._closed_form and objective.rho > 0:
                if key not in self._sums:  # once a step: the trials of an adaptive rule change rho only
                    self._sums[key] = quadratic_sums(g, objective)
                sums = self._sums[key]
                u = None if sums is None else affine_maximise(g, objective, check=key not in self._checked, sums=sums)
                if u is not None:
                    self._checked.add(key)
                    self._routes[key] = "quadratic"
                    return u
            self._routes[key] = "lbfgs" if objective.penalty is None else "proximal"
            # the exact gradient without autograd (it forms p_n by hand), else autograd's on p_n from a vjp
            # An adaptive rho guards every step with its decrease test, so the residual layers' Hamiltonians are
            # maximised (Kronecker-factored preconditioner: its first steps take nearly all of the increase, and a
            # row stops once a step adds little more); at a fixed rho the step length is what 10 iterations of
            # diagonally preconditioned L-BFGS reach, as in the reference code (docs/networks.md)
            adaptive = self._rule is not None and self._rule.adaptive
            objective = (derived_objective(g, objective, "kronecker" if adaptive else "diagonal")
                         or objective.with_input_costates())
            if adaptive and getattr(objective, "preconditioner", None) is not None:
                maximiser = ProjectedLBFGS(max_iter=settings["maximiser_iter"], perturb=settings["perturb"],
                                           rtol=KRONECKER_RTOL, newton_start=True)
                u = maximiser.maximise(objective, g.controls, generator).controls
            else:
                maximiser = HamiltonianMaximiser(g.controls, max_iter=settings["maximiser_iter"],
                                                 perturb=settings["perturb"], method="lbfgs")
                u = maximiser.maximise(objective, generator).controls
        except RuntimeError as err:
            raise RuntimeError(f"pmp.nn: maximising the Hamiltonian of {_layers(g)} failed: {err}. A layer must be "
                               "a function of its input that torch.func can differentiate twice (grad of a vjp) "
                               "(docs/networks.md, supported layers)") from err
        if not bool(torch.isfinite(u).all()):
            raise FloatingPointError(f"pmp.nn: the maximisation of {_layers(g)} returned non-finite parameters at "
                                     f"step {self._steps} (rho = {objective.rho:g}, eps = {objective.eps:g}); the "
                                     "parameters are left as they were")
        return u

    def _evaluate(self, closure: Callable) -> torch.Tensor:
        with torch.enable_grad():
            loss = closure()
        if not isinstance(loss, torch.Tensor):
            raise TypeError(f"the closure must return the loss tensor, got {type(loss).__name__}")
        if loss.numel() != 1:
            raise ValueError(f"the closure must return the scalar loss (the mean over the batch), got a tensor of shape "
                             f"{tuple(loss.shape)}; reduce it, e.g. loss_fn(model(x), y).mean() (or reduction='mean')")
        return loss

    def _trial_loss(self, closure: Callable) -> torch.Tensor:
        """The closure's loss at trial parameters, for the decrease test: its forward pass only.

        The test reads the loss and nothing else, so the parameters stop requiring gradients while the closure
        runs and a zero term anchors the model's output to autograd: ``loss.backward()`` then stops at the
        output instead of running the whole backward pass (about half a closure call saved per trial). The
        forward arithmetic is the same. The gradients stay those of theta^k (the step's start). A closure that
        fails this way (e.g. it asks autograd for the parameters' gradients itself) is run again in full, and
        in full from then on.
        """
        if not self._forward_only_trials:
            return self._evaluate(closure)
        params = [p for p in self._named.values() if p.requires_grad]
        grads = [p.grad for p in params]

        def anchor(module, inputs, output):
            if not (isinstance(output, torch.Tensor) and output.is_floating_point()):
                return output
            zero = torch.zeros((), dtype=output.dtype, device=output.device, requires_grad=True)
            return output + 0 * zero

        handle = self._model.register_forward_hook(anchor)
        for p in params:
            p.requires_grad_(False)
        try:
            return self._evaluate(closure)
        except RuntimeError:
            self._forward_only_trials = False
        finally:
            handle.remove()
            for p, g in zip(params, grads):
                p.requires_grad_(True)
                p.grad = g
        try:
            return self._evaluate(closure)
        finally:
            for p, g in zip(params, grads):
                p.grad = g

    def _check_stochastic_layers(self, adaptive: bool) -> None:
        """Dropout in training mode inside a layer makes its Hamiltonian random: refused. As an entry of its
        own it changes the batch's data between the closure calls that the decrease test compares: warned."""
        for n, module in self._dropouts:
            if not (module.training and module.p > 0):
                continue
            if n in self._layers:
                raise ValueError(
                    f"pmp.nn: entry {n} ({type(self._layers[n]).__name__}) contains {type(module).__name__} in "
                    "training mode: its Hamiltonian would be a different random function at every evaluation. Put "
                    "the dropout between layers (an entry of the Sequential on its own), or call model.eval() "
                    "(docs/networks.md, troubleshooting)")
            if adaptive:
                warnings.warn(
                    f"pmp.nn.{type(self).__name__}: entry {n} is {type(module).__name__} in training mode, so every "
                    "closure call draws another mask and the decrease test compares J on different networks; rho "
                    "may then grow until training stops. Call model.eval(), re-seed torch inside the closure (the "
                    "same mask for every call on a batch), or use a fixed rho (docs/networks.md, troubleshooting)",
                    RuntimeWarning, stacklevel=3)

    def _check_records(self, records) -> int:
        """The batch size B, after checking that every layer keeps the batch as its first dimension."""
        first = next(iter(records))
        x0 = records[first].inputs
        if x0.ndim == 0:
            raise ValueError(f"pmp.nn: layer {first} got a 0-d input; the input must be a batch [B, ...]")
        batch = int(x0.shape[0])
        for n, r in records.items():
            if r.outputs.ndim == 0 or r.inputs.shape[0] != batch or r.outputs.shape[0] != batch:
                raise ValueError(
                    f"pmp.nn: layer {n} ({type(self._layers[n]).__name__}) maps an input of shape "
                    f"{tuple(r.inputs.shape)} to {tuple(r.outputs.shape)}, but the network's input has {batch} rows: "
                    "every layer must keep the batch as its first dimension. An unbatched sample? pass x.unsqueeze(0)")
        if x0.ndim == 1 and x0.is_floating_point() and isinstance(self._layers[first], AFFINE_LAYERS):
            raise ValueError(f"pmp.nn: layer {first} ({type(self._layers[first]).__name__}) got a 1-D input of shape "
                             f"{tuple(x0.shape)}: an unbatched sample. Pass a batch [B, features], e.g. x.unsqueeze(0)")
        return batch

    def _check_costates(self, records, loss_value: float) -> None:
        # a finite sum means finite entries (NaN and inf propagate); only a non-finite sum, which a finite
        # overflow can also give, is decided entry by entry: one pass over each co-state instead of three
        if bool(torch.isfinite(torch.stack([r.costates.sum() for r in records.values()])).all()):
            return
        finite = torch.stack([torch.isfinite(r.costates).all() for r in records.values()])
        if not bool(finite.all()):
            bad = [n for n, ok in zip(records, finite.tolist()) if not ok]
            raise FloatingPointError(
                f"pmp.nn: the co-state p_(n+1) = -d loss / d x_(n+1) of layer(s) {bad} is not finite (NaN or inf) "
                f"although the loss is finite ({loss_value:.6g}): the backward pass produced non-finite gradients "
                "there (e.g. sqrt or log at 0, an overflow in a later layer); nothing to maximise")

    def _batchable(self, groups, records) -> bool:
        """Run every group not seen before once under torch.func.vmap; the layers of a group vmap has no
        batching rule for (e.g. a GRU wrapped tensor -> tensor) are run alone, without vmap, from then on.
        True if the groups must be rebuilt."""
        rebuild = False
        for g in groups:
            key = tuple(g.indices)
            if not g.batched or key in self._vmap_checked:
                continue
            self._vmap_checked.add(key)
            x = torch.stack([records[n].inputs for n in g.indices])
            try:
                with torch.no_grad():
                    vmap(g.call)(g.parameters(), x)
            except RuntimeError:
                self._unbatched.update(g.indices)
                rebuild = True
        return rebuild

    def _track_divergence(self, J: float, groups) -> None:
        """Basic MSA has no safeguard and can diverge (paper Sec. 3.1): the control solver's ``Divergence`` test.
        On mini-batches J is noisy, so a step counts as a rise only when J exceeds the first step's J by more than
        max(|J_first|, 1) (J more than doubled); ``Divergence``'s patience of such rises in a row raises
        DivergenceError carrying the parameters of the lowest J seen."""
        if self.method != "msa" or not groups:
            return
        d = self._divergence
        if d["first"] is None:
            d["first"] = J
        if J < d["best_cost"]:
            d["best_cost"] = J
            d["best"] = {name: p.detach().clone() for name, p in self._named.items()}
        d["rises"] = d["rises"] + 1 if J > d["first"] + max(abs(d["first"]), 1.0) else 0
        state = SimpleNamespace(rises=d["rises"], cost=J, iteration=self._steps,
                                history=[SimpleNamespace(cost=d["first"])])
        try:
            Divergence("msa")(state)
        except DivergenceError as err:
            raise err.attach(d["best"], d["best_cost"], []) from None

    def _warn_at_ceiling(self, rule: UpdateRule) -> None:
        """rho (E-MSA) or eps (SQH) at the rule's ceiling ``rho_max`` / ``eps_max``: every trial was rejected."""
        for name in ("rho", "eps"):
            ceiling = rule.options.get(f"{name}_max")
            value = getattr(rule, name, None)
            if ceiling is None or value is None or value < float(ceiling):
                continue
            warnings.warn(
                f"pmp.nn.{type(self).__name__}: {name} reached its ceiling {float(ceiling):g} at step {self._steps}: no "
                "trial step decreased J, so training has stopped moving. Usual causes: a closure that is not the same "
                "function on every call (dropout in training mode: call model.eval() or re-seed torch inside the "
                "closure; data augmentation inside the closure), a non-finite loss part, or a loss the layers do not "
                "reach; or use a fixed rho, e.g. pmp.nn.EMSA(model, rho=0.03) (docs/networks.md, troubleshooting)",
                RuntimeWarning, stacklevel=3)


class EMSA(Optimizer):
    """Train a ``torch.nn.Sequential`` by the extended method of successive approximations (paper Alg. 2/3).

    ``pmp.nn.Optimizer(model, pmp.EMSA(rho=rho), ...)``; the other arguments are ``Optimizer``'s.

    Args:
        rho: the E-MSA weight of paper eq. (7). None (default): adaptive, starting at 1/B for
            batch size B and adapted by the decrease test (the closure runs again for every trial
            step; ``rules.ExtendedMSA``). A number: the paper's fixed rho, every step taken, one
            closure call per step (read from ``param_groups[0]["rho"]`` at every step, so it can be
            scheduled). Convention (the reference code's): p from the batch-mean loss, the
            feasibility terms summed over the batch.

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
                 penalties: Optional[Mapping[str, ControlPenalty]] = None, process_group=None, **options):
        _fixed_method(type(self).__name__, "emsa", options)
        super().__init__(model, EMSAMethod(rho=rho), maximiser_iter=maximiser_iter, perturb=perturb,
                         controls=controls, penalties=penalties, process_group=process_group, **options)


class MSA(Optimizer):
    """Basic MSA (paper Alg. 1) for networks: ``pmp.nn.Optimizer(model, pmp.MSA())``, rho = 0, no safeguard.

    Basic MSA maximises the plain Hamiltonian; a layer whose Hamiltonian is linear in its
    parameters is unbounded without a bound (``controls``) or ``weight_decay``. It can diverge
    (paper Sec. 3.1): J above twice its first value on 3 steps in a row raises DivergenceError.

    Example:
        >>> import torch, pmpsolve as pmp
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> opt = pmp.nn.MSA(model, weight_decay=1e-2)   # used as pmp.nn.EMSA: opt.step(closure)
    """

    def __init__(self, model: torch.nn.Module, **options):
        _fixed_method(type(self).__name__, "msa", options)
        super().__init__(model, "msa", **options)


class SQH(Optimizer):
    """The sequential quadratic Hamiltonian method for networks (bSQH's adaptive eps):
    ``pmp.nn.Optimizer(model, pmp.SQH())``.

    Example:
        >>> import torch, pmpsolve as pmp
        >>> torch.manual_seed(0)   # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> x, y = torch.randn(32, 2), torch.randint(0, 2, (32,))
        >>> opt = pmp.nn.SQH(model)
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = torch.nn.functional.cross_entropy(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> losses = [float(opt.step(closure).detach()) for _ in range(5)]
        >>> losses[-1] <= losses[0]
        True
    """

    def __init__(self, model: torch.nn.Module, **options):
        _fixed_method(type(self).__name__, "sqh", options)
        super().__init__(model, "sqh", **options)


def _fixed_method(cls: str, method: str, options: dict) -> None:
    """``pmp.nn.EMSA`` is E-MSA: a ``method`` other than its own, or a rho where the method has none, is refused."""
    other = options.pop("method", method)
    if other != method:
        raise ValueError(f"pmp.nn.{cls} runs method {method!r}, not {other!r}: use pmp.nn.Optimizer(model, {other!r}) "
                         f"(or pmp.nn.{ {'emsa': 'EMSA', 'msa': 'MSA', 'sqh': 'SQH'}.get(other, 'Optimizer') })")
    if method != "emsa" and options.get("rho") is not None:
        what = "basic MSA, rho = 0 (paper Alg. 1)" if method == "msa" else "SQH, whose proximity weight is eps"
        raise ValueError(f"pmp.nn.{cls} is {what}; got rho={options['rho']!r}. For the augmented Hamiltonian use "
                         f"pmp.nn.EMSA(model, rho={options['rho']!r})")
    options.pop("rho", None)


def _layers(group: LayerGroup) -> str:
    """``layer 3 (Linear)`` or ``layers [2, 3, 4] (Residual)``: a group named for an error message."""
    kind = type(group.template).__name__
    if len(group.indices) == 1:
        return f"layer {group.indices[0]} ({kind})"
    return f"layers {group.indices} ({kind})"


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
