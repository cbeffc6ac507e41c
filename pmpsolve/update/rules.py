"""Update rules: what an iteration does with the sweep's interval data (docs/theory.md, engine step 6).

Each rule is a small object, registered by name in ``RULES`` (``register_rule``); a method
object (``pmpsolve.methods``: ``pmp.EMSA(...)``, ..., ``pmp.Rule(name, **options)``) names it
and holds its options, and ``solve(method=...)`` builds it from that. A new algorithm is a new
class (in any module, also outside the package), not an edit of the solver. ``UpdateRule``
lists every member the solver uses.
"""
from __future__ import annotations

import math
from typing import ClassVar, Dict, Optional, Tuple, Type

import torch

from ..controls import ControlSet, Finite, UserSet
from .hamiltonian import IntervalData, IntervalHamiltonian
from .maximisers import HamiltonianMaximiser
from ..methods import EMSA, MSA, SQH as SQHMethod, Gradient, Method
from ..sweep.pointwise import PointwiseProblem

_ANDERSON_REGULARISATION = 1e-12  # relative Tikhonov term of the Anderson normal equations
# Relaxing a proximity weight (``_relaxed_maximise``): tenfold steps down; a weight within 5 % of the
# last rejected one counts as that one; 32 relaxations cover rho_max = 1e12 down to rho_min = 1e-8
# (20 tenfold steps) with room for the geometric steps towards a rejected weight.
_RELAX_SHRINK = 0.1
_SAME_WEIGHT = 1.05
_MAX_RELAXATIONS = 32

__all__ = ["UpdateRule", "BasicMSA", "ExtendedMSA", "GradientStep", "SQH", "RULES", "register_rule", "adapt_rho",
           "NoiseFloor", "NOISE_RTOLS"]

#: J's error in units of the sweeps' rtol: what a judge can measure of a change of J
NOISE_RTOLS = 10.0


class NoiseFloor:
    """What J is known to, for a judge: NOISE_RTOLS times the sweeps' rtol, relative to max(1, |J|).

    A predicted decrease below it cannot be measured, and demanding one stalls a rule next to a
    solution: DDP on Rayleigh at N = 10 (40 rejections in a row at a measure of 1.1 tol). There a step must only not raise J beyond the noise above the lowest J
    kept so far (not the last one: rises within the noise must not add up; Goddard at N = 200
    drifted up 3 times in a row and was judged divergent). ``rtol`` 0: every decrease is measurable
    (a rule used outside a ``Solver``, which sets its sweeps' rtol).

    DDP judges so; the first-order rules do not. SQH and the gradient step grow their step after every
    kept step (eps shrinks, lr doubles), and kept noise-level steps grew it until the iteration stopped
    converging (LQR at N = 100: SQH 40 iterations to the tolerance, not converged in 300 that way; the
    gradient step 60, not in 300). E-MSA (rho unchanged on such a step) got further on Bryson-Denham's
    stiff penalised problems (mesh 200: violation 1.5e-5 where it stalls at 1.2e-4, still not converged
    in 600 s), but spent its inner solves on noise-level steps elsewhere: Goddard's rocket took 2062
    iterations instead of 718. A rejected noise-level step there ends the inner solve ("stalled"), and the
    outer loop's next multipliers help more.
    """

    def __init__(self, rtol: float = 0.0):
        self.rtol = rtol
        self.lowest = math.inf

    def level(self, cost: float) -> float:
        return NOISE_RTOLS * self.rtol * max(1.0, abs(cost))

    def unmeasurable(self, predicted: float, cost: float) -> bool:
        """Whether a predicted decrease of J from ``cost`` is below the noise."""
        return self.rtol > 0 and predicted <= self.level(cost)

    def acceptable(self, old_cost: float, new_cost: float) -> bool:
        """A step of unmeasurable predicted decrease: J did not rise beyond the noise above the lowest kept."""
        return new_cost <= min(old_cost, self.lowest) + self.level(old_cost)

    def kept(self, old_cost: float, new_cost: float) -> None:
        """A step was kept: the lowest J so far."""
        self.lowest = min(self.lowest, old_cost, new_cost)


class UpdateRule:
    """Base class of update rules: the protocol between a rule and the solver loop.

    The solver (``pmpsolve.Solver.step``) uses exactly these members:

    * ``rule = Rule(pw, controls, maximiser, generator, options)``: the same constructor for
      every rule. ``pw``: the PointwiseProblem (f, L, Phi and H at many points); ``controls``:
      the control set; ``maximiser``: the solve's HamiltonianMaximiser (``self._maximise``
      uses it); ``generator``: the solve's random generator (None without a seed);
      ``options``: a dict checked against ``defaults`` (unknown keys are refused), and by
      the rule's method object (``method_type``, e.g. ``pmp.EMSA``) when it has one.
    * ``begin(sweeper, forward, backward)``: called once per iteration, before the first
      ``propose``, with the Sweeper and the two sweeps of u^k, for a rule that needs more than the
      interval data (DDP: the nodes, the co-state and the ODE solver for its forward pass).
    * ``propose(data) -> u [N, m]``: new controls from the interval data of the current
      iterate u^k (``IntervalData``). After a rejection it is called again with the same data.
    * ``predicted_nodes() -> [N + 1, K, n] | None``: the rule's own prediction of the last proposal's
      trajectory at the nodes, where the trial sweep starts its multiple shooting (default None: the
      sweep predicts it from the current one).
    * ``judge(old_cost, new_cost, gain) -> bool``: keep the proposal? ``new_cost`` is J of
      the proposal re-simulated (inf when its sweep was abandoned), ``gain`` its Hamiltonian
      gain mu_k over u^k (None for a rule whose ``judges_gain`` is False). A rule adapts its own
      parameters here.
    * ``judges_gain`` (class attribute, default True): ``judge`` reads ``gain``. False (DDP, which
      judges by its own predicted decrease): the solver computes the gain of the kept proposal only,
      for the record, not of every trial.
    * ``adaptive`` (class attribute): the rule rejects proposals; the solver may abandon a
      trial sweep that costs far more than the current one (a rejection) and ends the solve as
      "stalled" after ``max_rejections`` proposals in a row.
    * ``detect_cycles``: the solver raises DivergenceError when J stops improving but keeps
      changing (basic MSA only: a fixed-rho E-MSA run on a network may spike and recover).
    * ``evaluations``: objective evaluations of all maximisations so far (recorded).
    * ``parameters() -> dict``: the current parameters (rho, lr, eps), recorded every iteration.
    * ``converged() -> str | None``: the rule's own stopping rule after a kept step (a reason
      to stop, reported as "stalled": ``converged`` is decided by the optimality measure only).

    Subclasses set ``name`` and ``defaults`` and implement ``propose`` (and ``judge`` if they
    reject). Example, a damped basic MSA registered from outside the package:

        >>> import pmpsolve as pmp
        >>> @pmp.register_rule
        ... class DampedMSA(pmp.UpdateRule):
        ...     name, defaults = "damped-msa", {"weight": 0.5}
        ...     def propose(self, data):
        ...         target = self._maximise(data, rho=0.0)
        ...         return data.controls + self.options["weight"] * (target - data.controls)
    """

    name: ClassVar[str] = ""
    defaults: ClassVar[Dict[str, object]] = {}
    #: the method object of a built-in rule (``pmpsolve.methods``): its fields are ``defaults``
    #: and its constructor checks the options
    method_type: ClassVar[Optional[Type[Method]]] = None
    adaptive: bool = False
    #: ``judge`` reads the trial's Hamiltonian gain (False: the solver passes None and computes it for the
    #: record of the kept proposal only)
    judges_gain: bool = True
    #: proposals rejected in a row before the solver stops ("stalled")
    max_rejections: int = 12
    detect_cycles: bool = False

    def __init__(self, pw: PointwiseProblem, controls: ControlSet, maximiser: HamiltonianMaximiser,
                 generator: Optional[torch.Generator], options: Optional[dict] = None):
        options = dict(options or {})
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            known = ", ".join(sorted(self.defaults)) or "none"
            raise ValueError(f"method {self.name!r} got unknown option(s) {unknown}; its options are: {known}")
        self.options = {**self.defaults, **options}
        if self.method_type is not None:
            self.method_type(**self.options)  # checks the values (one home: pmpsolve.methods)
        self.pw, self.controls, self.maximiser, self.generator = pw, controls, maximiser, generator
        self.evaluations = 0  # objective evaluations of all maximisations so far
        #: what J is known to (the Solver sets its sweeps' rtol): the judges' acceptance of noise-level steps
        self.noise = NoiseFloor()

    def begin(self, sweeper, forward, backward) -> None:
        """A new iteration starts from the sweeps of u^k (default: nothing to do)."""

    def propose(self, data: IntervalData) -> torch.Tensor:
        raise NotImplementedError

    def predicted_nodes(self) -> Optional[torch.Tensor]:
        """The last proposal's trajectory at the nodes as the rule predicts it, or None (default)."""
        return None

    def judge(self, old_cost: float, new_cost: float, gain: Optional[float]) -> bool:
        """Keep the proposal? Default: always (the paper's plain algorithms)."""
        return True

    def parameters(self) -> Dict[str, float]:
        """The rule's current parameters, recorded in the history."""
        return {}

    def converged(self) -> Optional[str]:
        """A reason to stop after the step just kept, or None (rule-specific stopping tests)."""
        return None

    def state(self) -> Dict[str, object]:
        """The rule's adapted numbers (rho, eps, lr and their bookkeeping): what a checkpoint must keep."""
        return {k: v for k, v in vars(self).items() if isinstance(v, (bool, int, float, str, type(None)))}

    def load_state(self, state: Dict[str, object]) -> None:
        for key, value in state.items():
            setattr(self, key, value)

    def _maximise(self, data: IntervalData, rho: float, eps: float = 0.0) -> torch.Tensor:
        objective = data.objective(self.pw, rho, eps)
        result = self.maximiser.maximise(objective, self.generator)
        self.evaluations += result.evaluations
        return result.controls

    def _relaxed_maximise(self, data: IntervalData, weight: float, aggressive: Optional[float], floor: float,
                          maximise) -> Tuple[torch.Tensor, float, bool]:
        """Maximise with proximity weight ``weight`` (rho or eps); if that returns u^k itself, relax it.

        On a finite set every change of a control costs a fixed amount of the proximity
        term, so a large weight freezes all of them and growing it after a rejection
        cannot give the smaller step a continuous set would. So when the maximiser
        returns u^k: move the weight geometrically halfway towards ``aggressive`` (the
        last weight whose step was rejected), then, or when there is none, tenfold down,
        until some control changes or the weight reaches ``floor``. Returns the controls,
        the weight used and whether u^k is a fixed point at the floor (the maximum
        condition holds, up to the floor's proximity term).
        """
        u = maximise(weight)
        for _ in range(_MAX_RELAXATIONS):
            if not torch.equal(u, data.controls):
                return u, weight, False
            if aggressive is not None and weight > _SAME_WEIGHT * aggressive:
                weight = math.sqrt(weight * aggressive)
            else:
                # Nothing between the rejected weight and this one changes a control (J can be flat
                # along the rejected step, e.g. a switch that needs two intervals to move together):
                # look below it.
                if weight <= floor:
                    return u, weight, True
                weight = max(_RELAX_SHRINK * weight, floor)
            u = maximise(weight)
        return u, weight, False


class BasicMSA(UpdateRule):
    """Basic MSA (paper Alg. 1): u_n <- argmax int_{I_n} H dt. Can diverge (Sec. 3.1); no safeguard."""

    name, method_type = "msa", MSA
    detect_cycles = True

    def propose(self, data):
        return self._maximise(data, 0.0)


class ExtendedMSA(UpdateRule):
    """Extended MSA (paper Alg. 2): maximise the augmented Hamiltonian of eq. (7).

    With a fixed ``rho`` every step is taken, exactly as Alg. 2 (Theorem 2: J
    decreases for rho large enough).

    With ``rho=None`` (the default of ``pmp.EMSA``) two safeguards make it converge
    without tuning (rho starts at ``rho0`` / K for K samples):

    * adaptive rho: a step is kept only if J decreases by at least ``eta`` times
      the Hamiltonian gain mu_k (Theorem 2's bound with D = eta), otherwise
      rho <- ``grow`` * rho and the maximisation is redone from the same sweep;
      after a kept plain step rho changes as in ``adapt_rho`` (shrinks only when
      the decrease is above ``high_ratio`` of mu_k); ``floor_decay`` (a number in
      (0, 1], default None: off) keeps rho from shrinking back below one shrink above
      the last rejected rho, that floor decaying by that factor per kept step;
    * Anderson acceleration (memory ``anderson``; 0 turns it off): E-MSA is a
      fixed-point iteration u <- g(u) that converges only linearly; the
      Anderson mixture of the last steps is tried first and kept under the same
      decrease test, else the plain E-MSA step g(u^k) is tried. rho is adapted
      on plain steps only, and the Anderson memory restarts when rho changes
      (the map g depends on rho; ``anderson_reset``: "rho" (default), "grow"
      (only when rho grows) or "never"). ``anderson_screen`` (default 0.0;
      None: off): the mixture is not swept unless its Hamiltonian gain over
      u^k is at least that fraction of the plain step's (a mixture with no
      predicted decrease was never kept in the measurements, and its trial
      sweep is saved).
    """

    name, method_type = "emsa", EMSA
    # high_ratio 0.9 and anderson_screen 0.0: 210 forward sweeps on the four reference problems at mesh 200
    # against 391 with 0.5 and None (docs/benchmarks.md, section 5).
    defaults = EMSA.defaults()

    def __init__(self, pw, controls, maximiser, generator, options=None):
        super().__init__(pw, controls, maximiser, generator, options)
        o = self.options
        rho = o["rho"]
        self.adaptive = rho is None
        # The feasibility penalties are sums over the K samples while H is their mean, so rho acts
        # K-fold: the adaptive rule starts at rho0 / K (measured on lqr_samples: 10 iterations for
        # K = 1, 100 and 1000 this way, against 10, 14 and 25 starting at rho0).
        self.rho = float(o["rho0"]) / pw.reducer.num_samples if rho is None else float(rho)
        self._memory = int(o["anderson"]) if self.adaptive else 0
        self._history = []  # (u_i, g(u_i)) of recent iterates, same rho
        self._stage = None  # what the pending proposal is: "anderson" or "plain"
        self._current = None  # (u^k, g(u^k)) of this iteration
        self._aggressive = None  # the last rho whose plain step was rejected at this iteration
        self._fixed = False  # u^k maximises the augmented Hamiltonian for rho -> rho_min
        self._plain_gain = 0.0  # Hamiltonian gain of the plain step at this iteration
        self._floor = 0.0  # rho does not shrink below this (floor_decay: one shrink above the last rejected rho)

    def propose(self, data):
        if self._stage is None or self._stage == "plain":
            # A new iteration, or the plain step was rejected (rho has grown): maximise.
            if self.adaptive:
                new, rho, self._fixed = self._relaxed_maximise(
                    data, self.rho, self._aggressive, float(self.options["rho_min"]),
                    lambda r: self._maximise(data, r))
                if rho != self.rho:
                    self._reset(rho)  # the fixed-point map depends on rho
                    self.rho = rho
            else:
                new = self._maximise(data, self.rho)
            self._current = (data.controls, new)
            if self._fixed:
                self._stage = "plain"
                return new
            if self._stage is None and self._memory and self._history:
                mixed = anderson_mixture(self._history, self._current, data.lengths, self.controls)
                if mixed is not None:
                    # The plain step's Hamiltonian gain: the decrease an accepted Anderson step must match.
                    H = IntervalHamiltonian(self.pw, data, 0.0)
                    plain = H.terms(new, create_graph=False).hamiltonian
                    self._plain_gain = float((plain.detach() - data.hamiltonian).sum())
                    screen = self.options["anderson_screen"]
                    if screen is not None:
                        mixed_gain = float((H.terms(mixed, create_graph=False).hamiltonian.detach()
                                            - data.hamiltonian).sum())
                        if mixed_gain < float(screen) * max(self._plain_gain, 0.0):
                            mixed = None
                if mixed is not None:
                    self._stage = "anderson"
                    return mixed
        self._stage = "plain"
        return self._current[1]

    def judge(self, old_cost, new_cost, gain):
        if not self.adaptive:
            return True
        if self._fixed:  # nothing to change: keep u^k and let converged() stop
            return True
        o = self.options
        accept = new_cost <= old_cost - float(o["eta"]) * max(gain, 0.0) and new_cost < old_cost
        if self._stage == "anderson":
            # A mixture that barely moves J (it can land next to u^k when the memory is stale) must
            # not pass for progress: it must decrease J by low_ratio of the plain step's gain.
            accept = accept and old_cost - new_cost >= float(o["low_ratio"]) * max(self._plain_gain, 0.0)
            if accept:
                self._remember()
            return accept
        # Trust-region style: compare the actual decrease of J with the Hamiltonian gain
        # (its first-order prediction, Lemma 1); keep rho while the two agree.
        self._aggressive = None if accept else self.rho
        rho = adapt_rho(self.rho, accept, old_cost - new_cost, gain, o)
        decay = o["floor_decay"]
        if decay is not None:
            if not accept:
                self._floor = max(self._floor, self.rho / float(o["shrink"]))
            elif rho < self.rho:
                rho = max(rho, min(self._floor, self.rho))
            if accept:
                self._floor *= float(decay)
        if rho != self.rho:
            self._reset(rho)
            self.rho = rho
        if accept:
            self._remember()
        return accept

    def _reset(self, rho):
        when = self.options["anderson_reset"]
        if when == "rho" or (when == "grow" and rho > self.rho):
            self._history = []

    def _remember(self):
        self._history = (self._history + [self._current])[-self._memory:] if self._memory else []
        self._stage = None

    def converged(self):
        if self._fixed:
            return ("the maximisation returns u^k even for rho = rho_min: the maximum condition holds "
                    "(no control can raise the Hamiltonian)")
        return None

    def parameters(self):
        return {"rho": self.rho}


def adapt_rho(rho: float, accept: bool, decrease: float, gain: float, options: Dict[str, object]) -> float:
    """The adaptive E-MSA rho after a trial step (shared by ``ExtendedMSA`` and ``pmp.nn.EMSA``).

    Trust-region style: ``ratio`` = actual decrease of J / Hamiltonian gain (the gain is J's
    first-order predicted decrease, paper Lemma 1). rho grows by ``grow`` after a rejection or a
    ratio below ``low_ratio``, shrinks by ``shrink`` above ``high_ratio``, else stays; clamped to
    [``rho_min``, ``rho_max``]. ``options`` holds those keys (``ExtendedMSA.defaults``).
    """
    ratio = decrease / gain if gain > 0 else (1.0 if accept else 0.0)
    if not accept or ratio < float(options["low_ratio"]):
        factor = float(options["grow"])
    elif ratio > float(options["high_ratio"]):
        factor = float(options["shrink"])
    else:
        factor = 1.0
    return min(max(rho * factor, float(options["rho_min"])), float(options["rho_max"]))


def anderson_mixture(history, current, lengths, controls) -> Optional[torch.Tensor]:
    """Anderson (type II) mixture of the fixed-point steps u_i -> g_i, projected onto U.

    Residuals r_i = g_i - u_i are compared in L2(0, T) (weights sqrt(h_n)); the
    least-squares problem min |r_k - sum_j gamma_j (r_k - r_j)| is solved through its
    j x j normal equations (j <= memory), with a relative Tikhonov term 1e-12 trace/j
    for the nearly collinear residuals of a converging iteration, and the mixture
    g_k - sum_j gamma_j (g_k - g_j) is returned.

    Bit-reproducible on purpose: a LAPACK least-squares solve (``torch.linalg.lstsq``)
    varied at 1e-17 between identical calls, and the accept/reject decisions that follow
    amplified that into different solutions. The Gram matrix is a plain tensor reduction
    and the tiny system is solved once on the CPU in float64.
    """
    u_k, g_k = current
    w = lengths.sqrt()[:, None]
    r_k = ((g_k - u_k) * w).reshape(-1)
    dR = torch.stack([r_k - ((g - u) * w).reshape(-1) for u, g in history], dim=1)  # [N m, j]
    dG = torch.stack([g_k - g for _, g in history], dim=-1)  # [N, m, j]
    gram = (dR.unsqueeze(2) * dR.unsqueeze(1)).sum(0).to("cpu", torch.float64)  # [j, j]
    rhs = (dR * r_k.unsqueeze(1)).sum(0).to("cpu", torch.float64)  # [j]
    trace = float(gram.diagonal().sum())
    if not (math.isfinite(trace) and trace > 0.0):
        return None
    j = gram.shape[0]
    gram = gram + (_ANDERSON_REGULARISATION * trace / j) * torch.eye(j, dtype=torch.float64)
    gamma = torch.linalg.solve(gram, rhs)
    if not bool(torch.isfinite(gamma).all()):
        return None
    return controls.project(g_k - dG @ gamma.to(dtype=dG.dtype, device=dG.device))


class GradientStep(UpdateRule):
    """The soft maximisation step of paper eq. (12): u_n <- P_U(u_n + lr * grad_u H_n).

    Here grad_u H_n is the interval mean (1/h_n) int_{I_n} grad_u H dt, i.e. minus the
    L2(0, T) gradient of J, so ``lr`` does not depend on the mesh (Prop. 2: this is
    gradient descent). With ``adaptive=True`` (default) a step is kept only if
    J decreases by ``c`` times the predicted decrease (Armijo), then lr <- 2 lr,
    else lr <- lr / 2; with ``adaptive=False`` every step is taken.
    """

    name, method_type = "gradient", Gradient
    defaults = Gradient.defaults()

    def __init__(self, pw, controls, maximiser, generator, options=None):
        super().__init__(pw, controls, maximiser, generator, options)
        penalty = pw.problem.control_penalty
        if isinstance(controls, (Finite, UserSet)) or (penalty is not None and penalty.name == "L0"):
            what = f"the control set {controls!r}" if penalty is None or penalty.name != "L0" else "an L0 control cost"
            raise ValueError(
                f"method='gradient' has no step for {what}: a gradient needs a continuous control set and a smooth "
                "(or L1) cost. The maximum principle does not: use method='emsa', 'sqh' or 'msa'")
        self.lr = float(self.options["lr"])
        self.adaptive = bool(self.options["adaptive"])
        self._predicted = 0.0

    def propose(self, data):
        objective = data.objective(self.pw, 0.0)
        grad_H = objective.gradient(data.controls)  # [N, m] = -dJ/du of the smooth part
        self.evaluations += 1
        ascent = grad_H / data.lengths[:, None]  # interval means: minus the L2 gradient of J
        new = data.controls + self.lr * ascent
        penalty = self.pw.problem.control_penalty
        if penalty is not None:  # L1: the proximal step (soft thresholding)
            new = penalty.prox(new, torch.full_like(new, self.lr))
        new = self.controls.project(new)
        # Predicted decrease of J to first order: int grad_u H . (u_new - u) dt (+ the change of the penalty).
        self._predicted = float((grad_H * (new - data.controls)).sum()
                                - (objective.penalty_value(new) - objective.penalty_value(data.controls)).sum())
        return new

    def judge(self, old_cost, new_cost, gain):
        if not self.adaptive:
            return True
        accept = new_cost <= old_cost - float(self.options["c"]) * max(self._predicted, 0.0) and new_cost < old_cost
        self.lr = self.lr * 2.0 if accept else self.lr * 0.5
        return accept

    def parameters(self):
        return {"lr": self.lr}


class SQH(UpdateRule):
    """Sequential quadratic Hamiltonian method (SQH; Breitenbach and Borzi; bSQH for networks).

    Maximise the Hamiltonian minus eps |u - u^k|^2 (integrated over each interval).
    Keep the step if J(u^{k+1}) - J(u^k) <= -eta |u^{k+1} - u^k|^2_{L2}, then
    eps <- zeta eps; otherwise eps <- sigma eps and maximise again from the same
    sweep. Stop when |u^{k+1} - u^k|^2_{L2} < kappa.
    """

    name, method_type = "sqh", SQHMethod
    defaults = SQHMethod.defaults()
    adaptive = True
    # eps grows by sigma = 1.5 per rejection: 50 rejections span a factor 1.5^50 = 6e8 (12 would
    # span only 130, too little to reach the small steps a singular arc needs).
    max_rejections = 50

    def __init__(self, pw, controls, maximiser, generator, options=None):
        super().__init__(pw, controls, maximiser, generator, options)
        o = self.options
        self.eps = float(o["eps0"])
        self._step = 0.0
        self._aggressive = None  # the last eps whose step was rejected at this iteration

    def propose(self, data):
        new, self.eps, _ = self._relaxed_maximise(data, self.eps, self._aggressive, float(self.options["eps_min"]),
                                                  lambda e: self._maximise(data, 0.0, e))
        self._step = float((data.lengths * ((new - data.controls) ** 2).sum(-1)).sum())  # |du|^2 in L2(0, T)
        return new

    def judge(self, old_cost, new_cost, gain):
        o = self.options
        accept = new_cost - old_cost <= -float(o["eta"]) * self._step and new_cost <= old_cost
        factor = float(o["zeta"]) if accept else float(o["sigma"])
        self._aggressive = None if accept else self.eps
        self.eps = min(max(self.eps * factor, float(o["eps_min"])), float(o["eps_max"]))
        return accept

    def converged(self):
        if self._step < float(self.options["kappa"]):
            return f"|u^(k+1) - u^k|^2 = {self._step:.3g} < kappa = {self.options['kappa']:g} (SQH stopping rule)"
        return None

    def parameters(self):
        return {"eps": self.eps}


RULES: Dict[str, Type[UpdateRule]] = {}
"""The update rules by name, the names ``solve(method=...)`` accepts; ``register_rule`` adds one.

Example:
    >>> import pmpsolve as pmp
    >>> pmp.RULES["emsa"].__name__, pmp.RULES["sqh"].__name__
    ('ExtendedMSA', 'SQH')
"""


def register_rule(rule: Type[UpdateRule]) -> Type[UpdateRule]:
    """Make ``rule`` available as ``solve(..., method=rule.name)`` or ``method=pmp.Rule(rule.name, **options)``.

    Example: see ``UpdateRule`` for a rule of one's own; the built-in rules are registered so.
        >>> import pmpsolve as pmp
        >>> pmp.register_rule(pmp.RULES["msa"]) is pmp.RULES["msa"]
        True
    """
    RULES[rule.name] = rule
    return rule


for _rule in (BasicMSA, ExtendedMSA, GradientStep, SQH):
    register_rule(_rule)

from .ddp import DDP  # noqa: E402,F401 - registers "ddp" (the module builds on UpdateRule)
