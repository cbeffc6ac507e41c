"""Method objects: which update rule a solve runs, with that rule's options.

``pmp.solve(problem, method=pmp.EMSA(rho=2.0))``, as diffrax takes a solver object.
Each object is a frozen record of one rule's parameters, checked on construction;
it holds nothing about how the continuous problem is integrated or maximised (that is
``pmp.ODE`` / ``pmp.Maximiser``), so the same objects can drive other loops over the
same rules. The strings ``"emsa"``, ``"msa"``, ``"sqh"``, ``"gradient"`` and ``"ddp"`` are
shortcuts for the default objects; a rule registered with ``register_rule`` is named
by ``pmp.Rule(name, **options)``.

Each object knows its rule class (``.rule``, in ``pmpsolve.update.rules``); the rule's
``defaults`` are the object's field defaults, so every option and its default is
written once, here.
"""
from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, Optional, Type, Union

__all__ = ["Method", "EMSA", "MSA", "SQH", "Gradient", "DDP", "Rule", "METHODS", "as_method"]


def _real(owner: str, label: str, value, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or value != value:
        what = "a number or None" if allow_none else "a number"
        raise TypeError(f"{owner}: `{label}` must be {what}, got {value!r}")


def _check(owner: str, condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(f"{owner}: {message}")


class Method:
    """Base of the method objects: ``name`` (the rule's registered name), ``rule`` (its class)
    and ``options()`` (the dict the rule is built with).

    Example:
        >>> import pmpsolve as pmp
        >>> method = pmp.SQH(eps0=10.0)
        >>> isinstance(method, pmp.Method), method.name, method.rule.__name__, method.options()["eps0"]
        (True, 'sqh', 'SQH', 10.0)
    """

    name: ClassVar[str] = ""
    _rule_class: ClassVar[str] = ""

    def __new__(cls, *args, **kwargs):
        method = super().__new__(cls)
        # the options the caller set (positionally or by name): a context with defaults of its own (a network's,
        # pmp.nn) changes only the others, so pmp.EMSA(high_ratio=0.9) means 0.9 there too
        names = [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else []
        object.__setattr__(method, "_given", frozenset(names[:len(args)]) | frozenset(kwargs))
        return method

    def given(self) -> frozenset:
        """The names of the options the caller set; the others are at their defaults."""
        return getattr(self, "_given", frozenset())

    @property
    def rule(self) -> Type:
        """The update rule class this method runs (``pmpsolve.update.rules``)."""
        from .update import rules

        return getattr(rules, self._rule_class)

    def options(self) -> Dict[str, Any]:
        """The rule's options: every field, by name."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def defaults(cls) -> Dict[str, Any]:
        """The options' defaults (the rule class's ``defaults``)."""
        return {f.name: f.default for f in dataclasses.fields(cls)}

    def settings(self) -> dict:
        """What ``Solution.settings`` records: the name, ``rho`` (None but for E-MSA) and every option."""
        options = self.options()
        return {"method": self.name, "rho": options.pop("rho", None), "options": options}


@dataclass(frozen=True)
class EMSA(Method):
    """Extended MSA (paper Alg. 2): maximise the augmented Hamiltonian of eq. (7).

    Args:
        rho: the penalty weight of eq. (7). A number >= 0: fixed, every step taken (Alg. 2;
            Theorem 2: J decreases for rho large enough). None (default): adaptive, a step
            is kept only when J decreases (the options below; ``rules.ExtendedMSA``).
        rho0: the adaptive rho starts at rho0 / K for K samples (default 1).
        shrink, grow: rho's factors after a step with a good ratio of actual to predicted
            decrease, and after a rejection or a poor ratio (0 < shrink <= 1 <= grow;
            defaults 0.5 and 4).
        eta: a step is kept only when J decreases by at least eta times its Hamiltonian gain
            (default 1e-4).
        rho_min, rho_max: the adaptive rho stays in [rho_min, rho_max] (1e-8, 1e12).
        anderson: Anderson acceleration memory (default 5; 0 turns it off).
        low_ratio, high_ratio: rho grows below ``low_ratio`` of the predicted decrease and
            shrinks above ``high_ratio`` (0.1, 0.9); an Anderson step must also reach
            ``low_ratio`` of the plain step's gain.
        anderson_reset: when the Anderson memory restarts: "rho" (whenever rho changes;
            default), "grow" (only when it grows) or "never".
        anderson_screen: a mixture is swept only if its Hamiltonian gain is at least this
            fraction of the plain step's (default 0.0; None: always swept).
        floor_decay: None (default: off) or a factor in (0, 1]: rho does not shrink below one
            shrink above the last rejected rho, that floor decaying by this factor per kept step.

    Example:
        >>> import pmpsolve as pmp
        >>> pmp.EMSA(rho=2.0).rho, pmp.EMSA().rule.__name__
        (2.0, 'ExtendedMSA')
    """

    name: ClassVar[str] = "emsa"
    _rule_class: ClassVar[str] = "ExtendedMSA"

    rho: Optional[float] = None
    rho0: float = 1.0
    shrink: float = 0.5
    grow: float = 4.0
    eta: float = 1e-4
    rho_min: float = 1e-8
    rho_max: float = 1e12
    anderson: int = 5
    low_ratio: float = 0.1
    high_ratio: float = 0.9
    anderson_reset: str = "rho"
    anderson_screen: Optional[float] = 0.0
    floor_decay: Optional[float] = None

    def __post_init__(self):
        owner = "pmp.EMSA"
        _real(owner, "rho", self.rho, allow_none=True)
        _check(owner, self.rho is None or (self.rho >= 0 and self.rho != float("inf")),
               f"`rho` must be a finite number >= 0 or None (adaptive), got {self.rho!r}")
        for key in ("rho0", "shrink", "grow", "eta", "rho_min", "rho_max", "low_ratio", "high_ratio"):
            _real(owner, key, getattr(self, key))
        for key in ("rho0", "rho_min", "rho_max"):
            _check(owner, getattr(self, key) > 0, f"emsa option {key!r} must be > 0, got {getattr(self, key)!r}")
        _check(owner, self.rho_min <= self.rho_max,
               f"emsa options need rho_min <= rho_max, got rho_min={self.rho_min}, rho_max={self.rho_max}")
        _check(owner, 0 < self.shrink <= 1 <= self.grow,
               f"emsa options need 0 < shrink <= 1 <= grow, got shrink={self.shrink}, grow={self.grow}")
        _check(owner, self.eta >= 0, f"emsa option 'eta' must be >= 0, got {self.eta!r}")
        _check(owner, not isinstance(self.anderson, bool) and isinstance(self.anderson, numbers.Integral)
               and self.anderson >= 0, f"emsa option 'anderson' must be an int >= 0 (0: off), got {self.anderson!r}")
        _check(owner, self.anderson_reset in ("rho", "grow", "never"),
               f"emsa option 'anderson_reset' must be 'rho', 'grow' or 'never', got {self.anderson_reset!r}")
        _real(owner, "anderson_screen", self.anderson_screen, allow_none=True)
        _real(owner, "floor_decay", self.floor_decay, allow_none=True)
        _check(owner, self.floor_decay is None or 0 < self.floor_decay <= 1,
               f"emsa option 'floor_decay' must be None or in (0, 1], got {self.floor_decay!r}")


@dataclass(frozen=True)
class MSA(Method):
    """Basic MSA (paper Alg. 1): u_n <- argmax of the interval Hamiltonian. No options and no
    safeguard: it can diverge (Sec. 3.1), and a solve then raises DivergenceError.

    Example:
        >>> import pmpsolve as pmp
        >>> pmp.MSA().name
        'msa'
    """

    name: ClassVar[str] = "msa"
    _rule_class: ClassVar[str] = "BasicMSA"


@dataclass(frozen=True)
class SQH(Method):
    """Sequential quadratic Hamiltonian method (Breitenbach and Borzi; ``rules.SQH``).

    Maximise the Hamiltonian minus eps |u - u^k|^2; keep the step if
    J(u^{k+1}) - J(u^k) <= -eta |u^{k+1} - u^k|^2 (L2), then eps <- zeta eps, else
    eps <- sigma eps and maximise again.

    Args:
        eps0: the first eps (default 1).
        eta: the sufficient decrease factor (default 1e-9).
        zeta, sigma: eps's factors after a kept and a rejected step (0 < zeta <= 1 < sigma;
            defaults 0.9 and 1.5).
        kappa: stop when |u^{k+1} - u^k|^2 < kappa (default 1e-14).
        eps_min, eps_max: eps stays in [eps_min, eps_max] (1e-10, 1e12).

    Example:
        >>> import pmpsolve as pmp
        >>> pmp.SQH(eps0=10.0).sigma
        1.5
    """

    name: ClassVar[str] = "sqh"
    _rule_class: ClassVar[str] = "SQH"

    eps0: float = 1.0
    eta: float = 1e-9
    zeta: float = 0.9
    sigma: float = 1.5
    kappa: float = 1e-14
    eps_min: float = 1e-10
    eps_max: float = 1e12

    def __post_init__(self):
        owner = "pmp.SQH"
        for f in dataclasses.fields(self):
            _real(owner, f.name, getattr(self, f.name))
        for key in ("eps0", "eps_min", "eps_max"):
            _check(owner, getattr(self, key) > 0, f"sqh option {key!r} must be > 0, got {getattr(self, key)!r}")
        _check(owner, self.eps_min <= self.eps_max,
               f"sqh options need eps_min <= eps_max, got eps_min={self.eps_min}, eps_max={self.eps_max}")
        _check(owner, 0 < self.zeta <= 1 < self.sigma,
               f"sqh options need 0 < zeta <= 1 < sigma, got zeta={self.zeta}, sigma={self.sigma}")
        _check(owner, self.eta >= 0 and self.kappa >= 0,
               f"sqh options 'eta' and 'kappa' must be >= 0, got eta={self.eta}, kappa={self.kappa}")


@dataclass(frozen=True)
class Gradient(Method):
    """The soft maximisation step of paper eq. (12), u <- P_U(u + lr grad_u H): gradient
    descent on J in L2(0, T) (Prop. 2; ``rules.GradientStep``). Needs a continuous control
    set and a smooth (or L1) control cost.

    Args:
        lr: the step size (default 1; it does not depend on the mesh).
        adaptive: True (default): a step is kept only if J decreases by ``c`` times its
            predicted decrease (Armijo), then lr <- 2 lr, else lr <- lr / 2. False: every
            step is taken with the same lr.
        c: the Armijo factor (default 1e-4).

    Example:
        >>> import pmpsolve as pmp
        >>> pmp.Gradient(lr=0.5, adaptive=False)
        Gradient(lr=0.5, adaptive=False, c=0.0001)
    """

    name: ClassVar[str] = "gradient"
    _rule_class: ClassVar[str] = "GradientStep"

    lr: float = 1.0
    adaptive: bool = True
    c: float = 1e-4

    def __post_init__(self):
        owner = "pmp.Gradient"
        _real(owner, "lr", self.lr)
        _check(owner, 0 < self.lr < float("inf"), f"gradient option 'lr' must be a finite number > 0, got {self.lr!r}")
        if not isinstance(self.adaptive, bool):
            raise TypeError(f"{owner}: `adaptive` must be True or False, got {self.adaptive!r}")
        _real(owner, "c", self.c)
        _check(owner, self.c >= 0, f"gradient option 'c' must be >= 0, got {self.c!r}")


@dataclass(frozen=True)
class DDP(Method):
    """Differential dynamic programming over the mesh intervals (``pmpsolve.update.ddp``).

    The intervals are a discrete-time system x_{n+1} = F_n(x_n, u_n) (the flow over the interval
    with u_n held). Each iteration expands J to second order around u^k, solves the expansion by a
    backward pass (gains k_n, K_n) and applies u_n + alpha k_n + K_n (x_n^new - x_n) along the new
    trajectory, alpha from a line search; Q_uu is regularised by mu (Levenberg-Marquardt, adapted as
    in Tassa, Erez and Todorov 2012); boxes by the box-constrained QP of Tassa, Mansard and Todorov
    2014. Controls in ``pmp.Reals`` or ``pmp.Box``, smooth costs; ``converged`` means what it means
    for every method (the engine's first-order optimality measure).

    Args:
        hessian: "exact" (default): the second derivatives of the dynamics are kept, weighted by the
            co-state (Newton's curvature); the first iteration tries the Gauss-Newton one (the co-state of
            the initial guess weights the exact one), and an iteration whose curvature leaves a Q_uu
            indefinite or singular takes the other one before mu grows; "gauss-newton": dropped (iLQR).
        mu0: the first regularisation (default 0: the plain Newton step; on a linear-quadratic
            problem the first step is then the Riccati solution).
        mu_min, mu_max: a mu below mu_min becomes 0, a growing one starts there; mu stays below mu_max
            (1e-3, 1e10; mu is in units of Q_uu / h_n, i.e. of L_uu).
        mu_factor: mu's growth factor Delta_0 > 1 (default 2).
        shrink: alpha's largest factor after a rejected step (0 < shrink < 1; default 0.5): the next
            alpha minimises the parabola through the predicted slope of J and its measured change,
            within [0.1, shrink] times the rejected one.
        alpha_min: below this alpha the line search gives up, mu grows (tenfold at least) and the
            backward pass is redone (default 0.03: 6 step sizes from 1).
        c: a step is kept when J decreases by at least c times the decrease the expansion predicts
            (default 1e-4).
        forward_solves: Newton steps of the forward pass on the closed loop's node defects, from its
            linear prediction, all intervals at once on the model's maps (the RK4 steps of
            ``model_steps``, offset by their error at the iterate; default 1). 0: the linear prediction
            alone, so that the feedback acts on the linearised trajectory and DDP is Newton's method
            with a line search (measured at N = 200, when the steps were adaptive solves of all
            intervals: the same iterations on Rayleigh and van der Pol, 13 instead of 15 on catalyst
            mixing, 0.6-1.3x the time to 1e-4 of 1; but inside the constrained loop on Goddard's rocket
            no convergence in 3000 iterations, against 77 with 1: docs/guide.md, section 2b).
        model_steps: classical Runge-Kutta steps per interval of the maps whose derivatives make the
            expansion's curvature (default 1: 2e-6 relative on the reference problems at N = 200; the
            gradient, and with it the solution, is the engine's whatever this is).

    Example:
        >>> import pmpsolve as pmp
        >>> pmp.DDP().hessian, pmp.DDP(hessian="gauss-newton").rule.__name__
        ('exact', 'DDP')
    """

    name: ClassVar[str] = "ddp"
    _rule_class: ClassVar[str] = "DDP"

    hessian: str = "exact"
    mu0: float = 0.0
    mu_min: float = 1e-3
    mu_max: float = 1e10
    mu_factor: float = 2.0
    shrink: float = 0.5
    alpha_min: float = 0.03
    c: float = 1e-4
    forward_solves: int = 1
    model_steps: int = 1

    def __post_init__(self):
        owner = "pmp.DDP"
        _check(owner, not isinstance(self.forward_solves, bool) and isinstance(self.forward_solves, numbers.Integral)
               and self.forward_solves >= 0,
               f"ddp option 'forward_solves' must be an int >= 0, got {self.forward_solves!r}")
        _check(owner, not isinstance(self.model_steps, bool) and isinstance(self.model_steps, numbers.Integral)
               and self.model_steps >= 1, f"ddp option 'model_steps' must be an int >= 1, got {self.model_steps!r}")
        _check(owner, self.hessian in ("exact", "gauss-newton"),
               f"`hessian` must be 'exact' or 'gauss-newton', got {self.hessian!r}")
        for key in ("mu0", "mu_min", "mu_max", "mu_factor", "shrink", "alpha_min", "c"):
            _real(owner, key, getattr(self, key))
        _check(owner, 0 <= self.mu0 < float("inf"), f"ddp option 'mu0' must be a finite number >= 0, got {self.mu0!r}")
        _check(owner, 0 < self.mu_min <= self.mu_max,
               f"ddp options need 0 < mu_min <= mu_max, got mu_min={self.mu_min}, mu_max={self.mu_max}")
        _check(owner, self.mu_factor > 1, f"ddp option 'mu_factor' must be > 1, got {self.mu_factor!r}")
        _check(owner, 0 < self.shrink < 1, f"ddp option 'shrink' must be in (0, 1), got {self.shrink!r}")
        _check(owner, 0 < self.alpha_min <= 1, f"ddp option 'alpha_min' must be in (0, 1], got {self.alpha_min!r}")
        _check(owner, 0 <= self.c < 1, f"ddp option 'c' must be in [0, 1), got {self.c!r}")


class Rule(Method):
    """A rule registered with ``pmp.register_rule``, by its name, with its options.

    ``pmp.solve(problem, method=pmp.Rule("damped-msa", weight=0.2))`` runs the rule
    ``docs/architecture.md`` registers. Unknown options are refused against the rule's ``defaults``.

    Example:
        >>> import pmpsolve as pmp
        >>> pmp.Rule("sqh", eps0=10.0).options()["eps0"]
        10.0
    """

    def __init__(self, name: str, **options):
        from .update.rules import RULES

        if name not in RULES:
            raise ValueError(f"pmp.Rule: unknown `method` {name!r}; choose one of {sorted(RULES)} "
                             "(a new rule is registered with pmp.register_rule)")
        rule = RULES[name]
        unknown = sorted(set(options) - set(rule.defaults))
        if unknown:
            known = ", ".join(sorted(rule.defaults)) or "none"
            raise ValueError(f"method {name!r} got unknown option(s) {unknown}; its options are: {known}")
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_options", dict(options))

    def __setattr__(self, key, value):
        raise dataclasses.FrozenInstanceError(f"cannot assign to field {key!r}")

    @property
    def name(self) -> str:  # type: ignore[override]
        return self._name

    @property
    def rule(self) -> Type:
        from .update.rules import RULES

        return RULES[self._name]

    def options(self) -> Dict[str, Any]:
        return dict(self._options)

    def __eq__(self, other):
        return isinstance(other, Rule) and (self._name, self._options) == (other._name, other._options)

    __hash__ = None

    def __repr__(self):
        return f"Rule({', '.join([repr(self._name)] + [f'{k}={v!r}' for k, v in self._options.items()])})"


#: The built-in methods by name: what the strings passed as ``method=`` mean.
METHODS: Dict[str, Type[Method]] = {cls.name: cls for cls in (EMSA, MSA, SQH, Gradient, DDP)}


def as_method(method: Union[str, Method]) -> Method:
    """``method=`` of ``solve`` as a Method object: a string is the default object of that name."""
    if isinstance(method, Method):
        return method
    if isinstance(method, str):
        if method in METHODS:
            return METHODS[method]()
        return Rule(method)
    raise TypeError(f"solve: `method` must be a method object such as pmp.EMSA() or its name "
                    f"('emsa', 'msa', 'sqh', 'gradient', 'ddp'), got {type(method).__name__}")
