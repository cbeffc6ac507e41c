"""Differential dynamic programming over the mesh intervals: the update rule ``"ddp"`` (``pmp.DDP``).

The piecewise-constant problem is a discrete-time one (``pmpsolve.sweep.flows``):

    x_{n+1} = F_n(x_n, u_n),   J = w sum_k [ Phi(x_N^k) + sum_n l_n(x_n^k, u_n) ],   w = 1/K,

the K samples one concatenated state x = (x^1, ..., x^K) of dimension D = K n that shares u_n.
An iteration (Tassa, Erez and Todorov 2012, sec. II; Tassa, Mansard and Todorov 2014 for boxes):

1. Expansion. Around the sweep of u^k, the deviations delta x, delta u of the second-order
   expansion of J obey the linearised dynamics delta x_{n+1} = A_n delta x_n + B_n delta u_n. Written
   with the discrete co-state lam_n = dJ/dx_n of the iterate (the engine's, lam = -P at the nodes),
   the linear terms collapse onto the gradient G_n = dJ/du_n the engine already computes (the
   interval Hamiltonian's, ``IntervalHamiltonian.gradient``): the expansion is

       sum_n [ G_n' du_n + 1/2 (dx_n, du_n)' H_n (dx_n, du_n) ] + 1/2 dx_N' w Phi_xx dx_N,

   H_n the Hessian of w l_n + lam_{n+1} . F_n in (x_n, u_n) (``hessian="exact"``: Newton's
   curvature, Pantoja's stagewise Newton; ``"gauss-newton"``: the lam . F_xx term dropped, iLQR).
   So the fixed points are exactly the engine's first-order points, whatever the accuracy of the
   curvature (A, B, H from one RK4 step per interval, ``flows.interval_derivatives``).
2. Backward pass, n = N-1 .. 0, from s_N = 0, V_N = w Phi_xx (Z_n = [A_n | B_n]):

       Q = H_n + Z_n' V Z_n,   q = Z_n' s + (0, G_n),
       k_n = -(Q_uu + mu h_n I)^-1 q_u,  K_n = -(Q_uu + mu h_n I)^-1 Q_ux   (boxes: ``boxqp``),
       V <- W' Q W,  s <- W' (q + Q w),  W = [I; K_n], w = (0, k_n),

   the predicted change of J for a step alpha being alpha sum k'q_u + alpha^2/2 sum k'Q_uu k.
   mu h_n: the regularisation scaled like Q_uu (an integral over the interval), so that mu does not
   depend on the mesh.
3. Forward pass: u_n = P_U(u_n + alpha k_n + K_n (x_n^new - x_n)) along the new trajectory
   x^new_{n+1} = F_n(x^new_n, u_n). Sequential by nature; here it starts from the linear prediction
   of the closed loop (the closed-loop transitions A_n + B_n K_n chained by the associative scan;
   exact on a linear-quadratic problem), which ``forward_solves`` (default 1) Newton steps on the
   node defects at most correct (multiple shooting with the feedback law inside the intervals), so
   that the feedback acts on the nonlinear trajectory; ``forward_solves=0`` keeps the prediction
   (Newton's method with a line search). The defects are those of the model's maps (the RK4 steps of
   step 1, all intervals in one batch) offset by what they miss the iterate's swept nodes by,
   F_n(x, u) + (x_{n+1} - F_n(x_n, u_n)): the iterate is their fixed point, the model gives the change
   of the trajectory, at a fraction of the cost of an adaptive solve of all intervals (which gave the
   same iterations on the reference problems). The same maps give the nodes of the proposal's own
   trajectory by Newton with forward-difference Jacobians (``DDP._trajectory``), where the solver's
   sweep of it starts its multiple shooting (``predicted_nodes``).

The solver (``Solver.step``) sweeps the proposal and asks ``judge``: a step is kept when J decreases
by at least ``c`` times the predicted decrease; otherwise alpha shrinks to the minimiser of the
parabola through the predicted slope and the measured change (within [0.1, ``shrink``] alpha), and
below ``alpha_min`` mu grows and the backward pass is redone (Tassa et al. 2012, sec. II.F). After a
kept full step mu shrinks, unless J decreased by less than a quarter of the prediction: then it grows,
as a trust region's radius shrinks (Nocedal and Wright, Alg. 4.1; ``_POOR_RATIO``). The
first iteration tries the Gauss-Newton curvature; where an iteration's curvature leaves a Q_uu
indefinite or singular, it takes the other one before mu grows (``DDP.propose``).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from ..controls import Box, Reals
from ..methods import DDP as DDPMethod
from ..sweep.flows import interval_derivatives, rk4_maps
from ..sweep.scan import affine_prefix_scan
from .riccati import riccati_loop
from .rules import UpdateRule, register_rule

__all__ = ["DDP", "Gains", "backward_pass", "MAX_CONCATENATED_STATE"]

#: The value function of the K samples couples them through the shared control: V_xx is [K n, K n]
#: per node. Above this K n the iteration's memory and time (K^2 and K^3) are refused.
MAX_CONCATENATED_STATE = 1024
#: The forward pass's Newton on the node defects (``forward_solves`` solves at most) is done when every
#: defect is within the solver's local error tolerance or this fraction of the largest change of the nodes.
#: (Solving the defects to the tolerance, 8 solves at most, took 1.3-1.8x the time of one at N = 200.)
_ROLLOUT_RELATIVE = 1e-3
#: A kept full step whose actual decrease of J is below this fraction of the predicted one grows mu instead
#: of shrinking it: the trust-region ratio rule (Nocedal and Wright, Alg. 4.1: the radius shrinks when
#: actual / predicted < 1/4), with mu standing for the inverse radius. On catalyst mixing's singular arc,
#: where Q_uu is nearly zero, full Newton steps are kept with a poor ratio and the next one overshoots.
_POOR_RATIO = 0.25
#: mu's growth at least after a failed line search
_LINE_SEARCH_GROWTH = 10.0
#: alpha's smallest factor after a rejection (the interpolated line search, ``DDP._shorter``)
_MIN_SHORTENING = 0.1
#: kept steps in a row whose predicted decrease is below J's noise and that do not lower the lowest J kept:
#: DDP can no longer improve J measurably (it stops "stalled"). On Goddard's rocket DDP alternated between two
#: controls whose J differs by 6e-9, under the noise level 1e-8, and spent inner solves at their iteration cap
NOISE_PATIENCE = 5
#: The closed-loop chain of the forward pass by the scan up to this concatenated state, else sequentially.
_SCAN_STATE = 16
#: Newton steps on the model's maps for the start values of the proposal's sweep (``DDP._trajectory``), and
#: the defect (in units of the sweeps' local error tolerance) at which they stop
_MODEL_NEWTON = 8
_MODEL_ACCEPT = 1.0


class Gains(NamedTuple):
    """The backward pass's result: k [N, m], K [N, m, D], the predicted change of J per unit alpha
    (``linear``: sum k'q_u) and per alpha^2 (``quadratic``: 1/2 sum k'Q_uu k), and ``deficiency``: 0
    when every regularised Q_uu was positive definite (on the free set of a box), else the largest
    shift of mu (in Q_uu / h_n) that would have made one so. ``value``: V_0 [D, D], the Hessian of the
    model's minimum over the control changes in the initial state's change (the value function at the
    first node)."""

    k: torch.Tensor
    K: torch.Tensor
    linear: float
    quadratic: float
    deficiency: float
    value: Optional[torch.Tensor] = None

    @property
    def positive(self) -> bool:
        return self.deficiency == 0.0


def _concatenated(A: torch.Tensor, B: torch.Tensor, H: torch.Tensor):
    """The per-sample blocks as the concatenated state's: Z = [A | B] [N, D, D + m] (A block-diagonal)
    and H [N, D + m, D + m] (the samples' x-blocks on the diagonal, their u-blocks summed)."""
    N, K, n, m = B.shape[0], B.shape[1], B.shape[2], B.shape[3]
    D = K * n
    eye = torch.eye(K, dtype=A.dtype, device=A.device)
    A_cat = torch.einsum("kj,nkab->nkajb", eye, A).reshape(N, D, D)
    Z = torch.cat([A_cat, B.reshape(N, D, m)], dim=-1)
    Hxx, Hxu, Huu = H[..., :n, :n], H[..., :n, n:], H[..., n:, n:]
    H_cat = H.new_zeros(N, D + m, D + m)
    H_cat[:, :D, :D] = torch.einsum("kj,nkab->nkajb", eye, Hxx).reshape(N, D, D)
    H_cat[:, :D, D:] = Hxu.reshape(N, D, m)
    H_cat[:, D:, :D] = Hxu.reshape(N, D, m).transpose(-1, -2)
    H_cat[:, D:, D:] = Huu.sum(1)
    return Z, H_cat


def backward_pass(Z: torch.Tensor, H: torch.Tensor, G: torch.Tensor, terminal: torch.Tensor, lengths: torch.Tensor,
                  mu: float, lower: Optional[torch.Tensor] = None, upper: Optional[torch.Tensor] = None,
                  start: Optional[torch.Tensor] = None) -> Gains:
    """The gains of the expansion (module, step 2). Z [N, D, D + m], H [N, D + m, D + m], G [N, m],
    terminal V_N [D, D], lengths h_n [N], mu >= 0; ``lower``/``upper`` [N, m]: the box of the control
    change (None: unconstrained); ``start`` [N, m]: the box QPs' starting points (the last k).

    The regularised Q_uu is used throughout, in V too: V is then the value of the proximal model whose
    minimiser the gains are (for mu = 0, the plain expansion's).
    """
    boxed = lower is not None
    if not boxed:
        lower = upper = G.new_zeros(0)
    if start is None:
        start = torch.zeros_like(G)
    ks, Ks, qus, Quus, deficiency, V0 = riccati_loop()(Z, H, G, terminal, lengths, float(mu), boxed, lower, upper,
                                                       start)
    linear = float((ks * qus).sum())
    quadratic = float(0.5 * torch.einsum("ni,nij,nj->", ks, Quus, ks))
    return Gains(ks, Ks, linear, quadratic, float(deficiency), V0)


@register_rule
class DDP(UpdateRule):
    """Differential dynamic programming (see the module); options: ``pmp.DDP``."""

    name, method_type = "ddp", DDPMethod
    defaults = DDPMethod.defaults()
    adaptive = True
    judges_gain = False  # judge compares J's change with the expansion's prediction, not the Hamiltonian gain
    # alpha shrinks 2-5 times from 1 to alpha_min = 0.03 (by 0.1-0.5 each), then mu grows tenfold: 40
    # proposals leave room for at least 6 such rounds (mu x 1e6)
    max_rejections = 40

    def __init__(self, pw, controls, maximiser, generator, options=None):
        super().__init__(pw, controls, maximiser, generator, options)
        penalty = pw.problem.control_penalty
        if not isinstance(controls, (Reals, Box)) or penalty is not None:
            what = (f"the control set {controls!r}" if penalty is None else f"an {penalty.name} control cost")
            raise ValueError(
                f"method='ddp' has no step for {what}: DDP needs controls in pmp.Reals or pmp.Box and smooth costs "
                "(a second-order expansion in u). The maximum principle does not: use method='emsa', 'sqh' or 'msa'")
        if pw.reducer.distributed:
            raise ValueError("method='ddp' does not run with a process_group: its value function couples the "
                             "samples through the shared control (a [K n, K n] matrix per node); use method='emsa'")
        D = pw.num_samples * pw.state_dim
        if D > MAX_CONCATENATED_STATE:
            raise ValueError(
                f"method='ddp' with K = {pw.num_samples} samples of state dimension {pw.state_dim}: its value function "
                f"is a [K n, K n] = [{D}, {D}] matrix per mesh node (the samples share the control), more than "
                f"{MAX_CONCATENATED_STATE}; use method='emsa', whose iteration is linear in K")
        o = self.options
        self.mu, self._delta = float(o["mu0"]), 1.0
        self.alpha = 1.0
        self._sweeps = None  # (sweeper, forward, backward) of the current iterate
        self._model = None  # (Z, H, G, terminal, nodes): the expansion around the current iterate
        self._gains: Optional[Gains] = None
        self._last_k = None  # the box QPs' starting points
        self._expected = 0.0
        self._iteration = 0  # the solver's iterations so far (``begin``)
        self._gauss_newton = self._switched = False  # this iteration's curvature; switched from the other
        self._trial_change, self._noise = math.inf, 0.0  # the last trial's change of J, the judge's noise level
        self._noise_steps = 0  # kept noise-level steps in a row without a new lowest J (NOISE_PATIENCE)
        self._nodes = None  # the forward pass's nodes of the last proposal
        self._value = None  # V_0 of the last backward pass with the exact curvature (``value_hessian``)
        self._model_error = None  # the swept nodes less the model's maps at the iterate [N, D]
        bounds = controls.bounds(pw.dtype, pw.device)
        self._box = bounds if isinstance(controls, Box) else None

    # ------------------------------------------------------------------ the solver's protocol
    def begin(self, sweeper, forward, backward) -> None:
        self._sweeps = (sweeper, forward, backward)
        self._model, self._gains, self.alpha = None, None, 1.0
        self._iteration += 1

    def propose(self, data):
        if self._sweeps is None:
            raise RuntimeError("the DDP rule needs the solver's sweeps (UpdateRule.begin) before propose")
        exact = self.options["hessian"] == "exact"
        if self._model is None:
            # The exact curvature weights the dynamics' second derivatives by the co-state of the iterate, at
            # the first iteration the co-state of the initial guess: that iteration tries the Gauss-Newton
            # curvature first (van der Pol at N = 200 from u = 0: J 15.0 -> 5.4 against 13.8 with the exact
            # one; 5 iterations instead of 8, measured with forward_solves=0).
            self._gauss_newton = exact and self._iteration == 1
            self._switched = False
            if self._gauss_newton and self.mu == 0.0 and self._no_gauss_newton_curvature():
                # its Q_uu would be zero, singular: the switch below, without the expansion and pass
                self._gauss_newton, self._switched = False, True
            self._model = self._expand(data, exact=not self._gauss_newton)
        elif self._shorter(self.alpha) >= float(self.options["alpha_min"]):
            self.alpha = self._shorter(self.alpha)  # the last step was rejected
        else:  # the line search failed: more regularisation, a new backward pass
            # tenfold at least: as mu grows the step turns into a short gradient step with little
            # feedback (k -> -G / (mu h), K -> 0), a descent direction whatever the curvature model's
            # error; Tassa's doubling Delta took 4 failed searches (40 proposals) to get near one on
            # Rayleigh at N = 10, where one RK4 step per interval of h = 0.25 is a poor model
            self._increase_mu(floor=_LINE_SEARCH_GROWTH * self.mu)
            self._gains, self.alpha = None, 1.0
        while self._gains is None:
            gains = self._backward(data.controls)
            if gains.positive or self.mu >= float(self.options["mu_max"]):
                self._gains = gains
            elif exact and not self._switched:
                # This curvature leaves a Q_uu indefinite (or singular): the iteration takes the other one
                # before mu grows. The exact one can be indefinite far from a solution (the co-state's weight
                # on the dynamics' second derivatives), the Gauss-Newton one is positive semi-definite where
                # L and Phi are convex but can lack curvature in u (catalyst mixing: none). (Rayleigh at
                # N = 200, forward_solves=0: 4 iterations instead of 7, where mu from the exact curvature's
                # deficiency started at 28 and shrank over 5 iterations.)
                self._gauss_newton, self._switched = not self._gauss_newton, True
                self._model = self._expand(data, exact=not self._gauss_newton)
            else:
                self._increase_mu(gains.deficiency)
        gains = self._gains
        if exact and not self._gauss_newton:
            self._value = gains.value
        self._expected = -(self.alpha * gains.linear + self.alpha ** 2 * gains.quadratic)
        return self._rollout(data.controls, gains, self.alpha)

    def predicted_nodes(self):
        return self._nodes

    def judge(self, old_cost, new_cost, gain):
        decrease = old_cost - new_cost
        # a predicted decrease below J's noise cannot be measured: J must only not rise beyond it (NoiseFloor)
        self._noise = self.noise.level(old_cost)
        if self.noise.unmeasurable(self._expected, old_cost):
            accept = self.noise.acceptable(old_cost, new_cost)
        else:
            accept = new_cost < old_cost and decrease >= float(self.options["c"]) * self._expected
        self._trial_change = new_cost - old_cost
        if accept:
            unmeasurable = self.noise.unmeasurable(self._expected, old_cost)
            lower = new_cost < self.noise.lowest
            self._noise_steps = self._noise_steps + 1 if unmeasurable and not lower else 0
            self.noise.kept(old_cost, new_cost)
            # A full step: the expansion is trusted, mu shrinks, unless J decreased by less than
            # _POOR_RATIO of the prediction (measurably): then mu grows (the trust-region ratio rule).
            # A step the line search had to cut well short (alpha < shrink^2): the expansion overshoots
            # (e.g. on a singular arc, where Q_uu is nearly zero and the Newton step runs into the box),
            # mu grows for the next one.
            if self.alpha == 1.0:
                if self.noise.unmeasurable(self._expected, old_cost) or decrease >= _POOR_RATIO * self._expected:
                    self._decrease_mu()
                else:
                    self._increase_mu()
            elif self.alpha < float(self.options["shrink"]) ** 2:
                self._increase_mu()
            self._last_k = self._gains.k
        return accept

    def converged(self):
        if self._noise_steps >= NOISE_PATIENCE:
            return (f"{self._noise_steps} kept steps in a row predicted decreases of J below its noise "
                    f"({self._noise:.2g}) and none lowered J: DDP cannot improve J measurably from here")
        return None

    def parameters(self):
        return {"mu": self.mu, "alpha": self.alpha}

    def value_hessian(self) -> Optional[torch.Tensor]:
        """V_0 [K n, K n]: the Hessian of J, minimised over the controls, in the initial state (the samples'
        states concatenated), from the last backward pass with the exact curvature; None before one. (The
        Gauss-Newton curvature drops the co-state's weight on the dynamics' second derivatives, which couple
        a static state such as a scaled final time to the others.) The outer loop's steps in the static
        variables (``constrained.outer``) take their curvature from it."""
        return self._value

    def _shorter(self, alpha: float) -> float:
        """The next alpha after the step alpha was rejected: the minimiser of the parabola through J's
        slope at 0 (the predicted sum k'q_u, exact to first order) and the change of J measured at alpha,
        kept within [0.1, shrink] alpha (Nocedal and Wright, sec. 3.5); ``shrink`` alpha when that
        change is not finite or within the noise. (On catalyst mixing, whose singular arc makes full
        steps overshoot into the box, halving took 2-4 rejected sweeps for one kept step.)"""
        shrink = float(self.options["shrink"])
        slope, change = alpha * self._gains.linear, self._trial_change
        if not (math.isfinite(change) and slope < 0 and self._expected > self._noise):
            return shrink * alpha
        curvature = change - slope  # the measured change's part beyond the linear one, c alpha^2
        if curvature <= 0:
            return shrink * alpha
        return alpha * min(shrink, max(_MIN_SHORTENING, -slope / (2.0 * curvature)))

    # ------------------------------------------------------------------ the iteration's parts
    def _expand(self, data, exact: bool = True):
        """The expansion around u^k (module, step 1): Z, H (concatenated), G, V_N, the nodes."""
        sweeper, forward, backward = self._sweeps
        pw, mesh = self.pw, sweeper.mesh
        nodes = forward.states.values  # [N + 1, K, n]
        exact = exact and self.options["hessian"] == "exact"
        multipliers = -backward.costates.values[1:] if exact else None
        steps = int(self.options["model_steps"])
        derivatives = interval_derivatives(pw, mesh, nodes, data.controls, multipliers, steps=steps)
        self.evaluations += 4 * steps  # the RK4 stages, over all intervals at once
        Z, H = _concatenated(derivatives.A, derivatives.B, derivatives.hessian)
        # the model's maps miss the swept nodes by their error: x_{n+1} - F_n(x_n, u_n) [N, D]
        self._model_error = (nodes[1:] - derivatives.ends).reshape(nodes.shape[0] - 1, -1)
        G = -data.objective(pw, 0.0).gradient(data.controls)  # dJ/du_n [N, m] (interval Hamiltonian, Prop. 2)
        self.evaluations += 1
        return Z, H, G, self._terminal(nodes[-1]), nodes

    def _no_gauss_newton_curvature(self) -> bool:
        """Whether the Gauss-Newton expansion is zero: no running cost and Phi linear (catalyst mixing)."""
        return not self.pw.has_running_cost and not bool(self._terminal(self._sweeps[1].states.values[-1]).any())

    def _terminal(self, x: torch.Tensor) -> torch.Tensor:
        """V_N = w Phi_xx, block-diagonal over the samples [D, D] (n reverse passes over the gradient)."""
        K, n = x.shape
        V = x.new_zeros(K, n, K, n)
        if self.pw.problem.terminal_cost is not None:
            y = x.detach().requires_grad_(True)
            with torch.enable_grad():
                (g,) = torch.autograd.grad(self.pw.terminal_cost(y).sum(), y, create_graph=True)
                if g.requires_grad:  # else Phi is linear: no curvature
                    rows = [torch.autograd.grad(g[:, i].sum(), y, retain_graph=True, allow_unused=True,
                                                materialize_grads=True)[0] for i in range(n)]
                    hessian = torch.stack(rows, dim=1)  # [K, n, n]
                    V[range(K), :, range(K), :] = hessian.detach() / self.pw.reducer.num_samples
        return V.reshape(K * n, K * n)

    def _backward(self, u: torch.Tensor) -> Gains:
        Z, H, G, terminal, _ = self._model
        sweeper = self._sweeps[0]
        mesh = sweeper.mesh
        lower = upper = None
        if self._box is not None:
            low, high = self._box
            lower, upper = low - u, high - u
        start = self._last_k if self._last_k is not None and self._last_k.shape == u.shape else None
        return backward_pass(Z, H, G, terminal, mesh[1:] - mesh[:-1], self.mu, lower, upper, start)

    def _rollout(self, u: torch.Tensor, gains: Gains, alpha: float) -> torch.Tensor:
        """The forward pass (module, step 3): the controls of the closed loop with step alpha."""
        sweeper = self._sweeps[0]
        Z, _, _, _, nodes = self._model
        N, K, n = nodes.shape[0] - 1, nodes.shape[1], nodes.shape[2]
        D = K * n
        A, B = Z[..., :D], Z[..., D:]
        closed = A + B @ gains.K  # [N, D, D]
        reference = nodes.reshape(N + 1, D)

        def controls(S):  # the feedback law at the node states S [N + 1, D]
            v = u + alpha * gains.k + torch.einsum("nmd,nd->nm", gains.K, S[:-1] - reference[:-1])
            return self.controls.project(v)

        # The closed loop's linear prediction (exact for linear dynamics without active bounds).
        drift = torch.einsum("ndm,nm->nd", B, alpha * gains.k)
        S = torch.cat([reference[:1], reference[1:] + _chain(closed, drift)])
        change = (S - reference).abs().amax()
        ode = sweeper.ode
        steps = int(self.options["model_steps"])
        with torch.no_grad():
            for _ in range(int(self.options["forward_solves"])):
                v = controls(S)
                self.evaluations += 4 * steps
                ends = rk4_maps(self.pw, sweeper.mesh, S[:-1].reshape(N, K, n), v, steps)[0].reshape(N, D)
                ends = ends + self._model_error
                defect = ends - S[1:]
                tolerance = ode.atol + ode.rtol * torch.maximum(ends.abs(), S[1:].abs())
                # The nodes set the feedback only: a defect small against the step's change of the trajectory
                # changes the controls by a fraction of the step (near a solution, where steps are small,
                # the linear prediction is that accurate already).
                size = float((defect.abs() / torch.maximum(tolerance, _ROLLOUT_RELATIVE * change)).amax())
                if size <= 1.0 or size != size or size == float("inf"):  # accurate enough, or not finite
                    break
                S = torch.cat([S[:1], S[1:] + _chain(closed, defect)])
            v = controls(S).detach()
            S = S.reshape(N + 1, K, n)
            # the solver's sweep of v starts from these nodes where it runs by multiple shooting
            shooting = sweeper.forward_policy.applies(self.pw, ode, differentiable=False)
            self._nodes = (self._trajectory(S, v, steps) if shooting else S).detach()
        return v

    def _trajectory(self, S: torch.Tensor, v: torch.Tensor, steps: int) -> torch.Tensor:
        """Start values [N + 1, K, n] for the solver's sweep of the proposal v: its trajectory on the model's
        maps (``steps`` RK4 steps per interval) by Newton on the node defects from S, the Jacobians by
        forward differences as the multiple-shooting sweep takes them (``shooting.py``). The sweep then
        starts within the model's error of its own trajectory (at N = 200 about the tolerance: one or two
        integrations, against two to seven from S) at a fraction of an integration's cost per step here.
        The nodes with the smallest defect are returned (a step that does not contract ends it)."""
        sweeper = self._sweeps[0]
        ode, mesh = sweeper.ode, sweeper.mesh
        N, K, n = S.shape[0] - 1, S.shape[1], S.shape[2]
        eps = torch.finfo(S.dtype).eps ** 0.5
        component = torch.arange(n, device=S.device)
        error = self._model_error.reshape(N, K, n)
        best, smallest = S, math.inf
        for _ in range(_MODEL_NEWTON):
            starts = S[:-1].unsqueeze(1).repeat(1, 1 + n, 1, 1)  # [N, 1 + n, K, n]: nominal and bumped
            offset = eps * S[:-1].abs().clamp_min(1.0)
            bumped = S[:-1] + offset
            starts[:, 1 + component, :, component] = bumped.permute(2, 0, 1)
            self.evaluations += 4 * steps
            ends = rk4_maps(self.pw, mesh, starts, v, steps)[0] + error.unsqueeze(1)
            defect = ends[:, 0] - S[1:]
            tolerance = ode.atol + ode.rtol * torch.maximum(ends[:, 0].abs(), S[1:].abs())
            size = float((defect.abs() / tolerance).amax())
            if not size < smallest:  # not finite, or no contraction: the best so far
                break
            best, smallest = S, size
            if size <= _MODEL_ACCEPT:
                break
            # Phi[j][:, a, i] = d F_a / d S_i [N, K, n, n]
            Phi = (ends[:, 1:] - ends[:, :1]).permute(0, 2, 3, 1) / (bumped - S[:-1]).unsqueeze(-2)
            _, delta = affine_prefix_scan(Phi, defect)
            S = torch.cat([S[:1], S[1:] + delta])
        return best

    # ------------------------------------------------------------------ regularisation (Tassa et al. 2012)
    def _increase_mu(self, deficiency: float = 0.0, floor: float = 0.0):
        """Tassa et al. 2012's growth; after a Q_uu that was not positive definite, at least twice the shift
        that one would have needed (the pass is redone from the end: 1-2 passes instead of the ~10 doublings
        from mu_min measured on Rayleigh's first iteration)."""
        factor = float(self.options["mu_factor"])
        self._delta = max(factor, self._delta * factor)
        mu = max(float(self.options["mu_min"]), self.mu * self._delta, self.mu + 2.0 * deficiency, floor)
        self.mu = min(mu, float(self.options["mu_max"]))

    def _decrease_mu(self):
        factor = float(self.options["mu_factor"])
        self._delta = min(1.0 / factor, self._delta / factor)
        self.mu = self.mu * self._delta if self.mu * self._delta > float(self.options["mu_min"]) else 0.0


def _chain(M: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """y_{n+1} = M_n y_n + b_n from y_0 = 0: y_1 .. y_N [N, D] (the associative scan for a small D, else
    one small product per interval)."""
    if M.shape[-1] <= _SCAN_STATE:
        return affine_prefix_scan(M, b)[1]
    y, out = b.new_zeros(b.shape[1:]), []
    for n in range(M.shape[0]):
        y = M[n] @ y + b[n]
        out.append(y)
    return torch.stack(out)
