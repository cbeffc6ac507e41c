"""What a solve returns: controls, re-simulated cost, trajectories, history; save/load."""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Union

import torch

from .controls import ControlSet, control_set_from_dict
from .sweep.trajectory import HermiteTrajectory

__all__ = ["IterationRecord", "Solution"]


class IterationRecord(NamedTuple):
    """One iteration of a solve (iteration 0 is the initial control).

    cost: J(u^k), re-simulated by the forward sweep.
    hamiltonian_gain: mu_k = int [H(u^k) - H(u^{k-1})] dt on the sweep of u^{k-1} (paper Sec. 3.3).
    state_error, costate_error: the feasibility errors of Lemma 1,
        int |f(u^k) - f(u^{k-1})|^2 dt and int |grad_x H(u^k) - grad_x H(u^{k-1})|^2 dt.
    control_change: max_n |u^k_n - u^{k-1}_n| (inf-norm).
    rejected: proposals rejected in this iteration before one was kept (adaptive rules).
    parameters: the rule's parameters used for the kept step (e.g. rho, lr).
    seconds: wall time of the iteration; elapsed: since the start of the solve.
    forward_evals, backward_evals: right-hand-side evaluations of the sweeps of this iteration.
    maximiser_evals: objective evaluations of the maximisation(s).
    forward_seconds, backward_seconds, maximise_seconds: the split of ``seconds``.
    optimality: the first-order optimality measure of u^k (``pmpsolve.update.optimality``; NaN where
        it was not measured: the solve stopped before the next co-state sweep).

    Example: ``sol.history[k]`` is iteration k.
        >>> import torch, pmpsolve as pmp
        >>> problem = pmp.ControlProblem(lambda t, x, u: u.clone(), torch.tensor([1.0]), 1.0, pmp.Reals(1),
        ...                              terminal_cost=lambda x: 2.5 * x[..., 0] ** 2,
        ...                              running_cost=lambda t, x, u: 0.5 * (u ** 2).sum(-1))
        >>> sol = pmp.solve(problem, mesh=10)
        >>> first, last = sol.history[0], sol.history[-1]
        >>> first.iteration, round(first.cost, 6), last.iteration == sol.iterations, round(last.cost, 6)
        (0, 2.5, True, 0.416667)
    """

    iteration: int
    cost: float
    hamiltonian_gain: float = 0.0
    state_error: float = 0.0
    costate_error: float = 0.0
    control_change: float = 0.0
    rejected: int = 0
    parameters: Dict[str, float] = {}
    seconds: float = 0.0
    elapsed: float = 0.0
    forward_evals: int = 0
    backward_evals: int = 0
    maximiser_evals: int = 0
    forward_seconds: float = 0.0
    backward_seconds: float = 0.0
    maximise_seconds: float = 0.0
    optimality: float = math.nan


@dataclass
class Solution:
    """The result of ``pmpsolve.solve``.

    Attributes:
        cost: J of ``controls``, re-simulated (never the optimiser's own estimate).
        controls: [N, m]; row n is the control on [mesh[n], mesh[n + 1]).
        mesh: [N + 1] node times.
        history: one IterationRecord per iteration, starting with iteration 0.
        converged: True only when ``controls`` are first-order optimal: ``optimality`` <=
            tol * max(1, min(|J|, |J(u^0)|)) (see ``pmp.Stop``'s ``tol`` and docs/guide.md).
        message: why the solve stopped, with the optimality measure.
        method: the update rule used.
        optimality: the first-order optimality measure of ``controls`` (NaN if not measured).
        status: "converged", "max_iter", "stalled" (no further decrease found), "unbounded" (J fell
            far below J(u^0): the problem looks unbounded below), "callback" or
            "interrupted" (KeyboardInterrupt: the best controls so far are returned); with
            constraints also "infeasible" (the least-violation controls), "max_rounds" (the
            outer loop's round limit) and "stalled" for rounds that no longer gain (docs/theory.md).
        relaxed_cost: for a finite control set solved by relaxation (the default), J of the
            relaxed problem over the convex hull: a lower bound when that solve is globally optimal.
        horizon: T, the fixed final time or the optimal one (``pmp.FreeTime``).
        parameters: the optimal static parameters [q], or None.
        violation: the largest violation of any constraint, at the nodes and between them
            (0 when there are none).
        multipliers: None without constraints; else a dict: "terminal" [K, cT] (the terminal
            constraints' multipliers nu, in their order; per sample), "path" [K, M, cP] (the
            path multiplier functions mu(t) >= 0 on the grid "path_times" [M]), "path_end" [K, cP]
            (their atoms eta >= 0 at T: the multipliers of the path constraints' end values).
        rounds: the outer loop's rounds (``pmpsolve.constrained.outer.Round``), empty without one.

    Example: x' = u, x(0) = 1, J = 5/2 x(1)^2 + 1/2 int u^2, whose optimal control is u = -5/6.
        >>> import torch, pmpsolve as pmp
        >>> problem = pmp.ControlProblem(lambda t, x, u: u.clone(), torch.tensor([1.0]), 1.0, pmp.Reals(1),
        ...                              terminal_cost=lambda x: 2.5 * x[..., 0] ** 2,
        ...                              running_cost=lambda t, x, u: 0.5 * (u ** 2).sum(-1))
        >>> sol = pmp.solve(problem, mesh=10)
        >>> round(sol.cost, 6), sol.status, tuple(sol.controls.shape), tuple(sol.mesh.shape)
        (0.416667, 'converged', (10, 1), (11,))
        >>> sol.state(torch.tensor([0.0, 1.0])).shape          # X(t): [*t.shape, n]
        torch.Size([2, 1])
        >>> round(float(sol.control(torch.tensor(0.5))[0]), 4)  # u(t): [*t.shape, m]
        -0.8333
    """

    cost: float
    controls: torch.Tensor
    mesh: torch.Tensor
    history: List[IterationRecord]
    converged: bool
    message: str
    method: str
    states_trajectory: HermiteTrajectory
    costates_trajectory: Optional[HermiteTrajectory]
    control_set: ControlSet
    single_sample: bool = True
    problem_name: str = "problem"
    settings: Dict[str, object] = field(default_factory=dict)
    problem: object = None  # the ControlProblem (not saved)
    optimality: float = math.nan
    status: str = ""
    relaxed_cost: Optional[float] = None
    horizon: Optional[float] = None
    parameters: Optional[torch.Tensor] = None
    violation: float = 0.0
    multipliers: Optional[Dict[str, torch.Tensor]] = None
    rounds: List[object] = field(default_factory=list)

    def __post_init__(self):
        if self.horizon is None:
            self.horizon = float(self.mesh[-1])

    # -------------------------------------------------------------- queries
    @property
    def iterations(self) -> int:
        """Number of iterations performed (not counting iteration 0)."""
        return len(self.history) - 1

    def control(self, t) -> torch.Tensor:
        """u(t), piecewise constant -> [*t.shape, m]; t in [0, T] (at T, the control of the last interval)."""
        from .sweep.mesh import interval_index

        return self.controls[interval_index(self.mesh, self._times(t))]

    def state(self, t) -> torch.Tensor:
        """X(t) by cubic Hermite interpolation between mesh nodes -> [*t.shape, n] ([*t.shape, K, n] for K samples)."""
        return self._squeeze(self.states_trajectory(self._times(t)))

    def costate(self, t) -> torch.Tensor:
        """P(t) of the returned controls (same shapes as ``state``). In the paper's scaling P_T = -grad_{X_T} J."""
        if self.costates_trajectory is None:
            raise ValueError("this solution has no co-state trajectory")
        return self._squeeze(self.costates_trajectory(self._times(t)))

    def _times(self, t):
        """``t`` as a tensor on the mesh's dtype and device, checked to be times in [0, T]."""
        T = float(self.mesh[-1])
        try:
            t = torch.as_tensor(t, dtype=self.mesh.dtype, device=self.mesh.device)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"times `t` must be a number or a tensor of numbers in [0, T] = [0, {T:g}], "
                            f"got {type(t).__name__}") from None
        nan = torch.isnan(t)
        if bool(nan.any()):
            where = "" if t.ndim == 0 else f" at index {tuple(nan.nonzero()[0].tolist())}"
            raise ValueError(f"times `t` must be numbers in [0, T] = [0, {T:g}], got NaN{where}; NaN is not a time")
        if bool(((t < 0) | (t > T * (1 + 1e-12))).any()):
            raise ValueError(f"times must lie in [0, T] = [0, {T:g}], got values in "
                             f"[{float(t.min()):g}, {float(t.max()):g}]; clamp them with t.clamp(0, {T:g})")
        return t

    def _squeeze(self, y):
        return y.squeeze(-2) if self.single_sample else y

    def history_dict(self) -> Dict[str, list]:
        """The history as columns (JSON-friendly)."""
        columns = {name: [getattr(r, name) for r in self.history] for name in IterationRecord._fields}
        return columns

    def __repr__(self):
        return (f"Solution(method={self.method!r}, cost={self.cost:.10g}, iterations={self.iterations}, "
                f"converged={self.converged}, optimality={self.optimality:.3g}, status={self.status!r}, N={self.controls.shape[0]}, m={self.controls.shape[1]}, "
                f"message={self.message!r})")

    # ------------------------------------------------------------- plotting
    def plot(self, path: Union[str, Path, None] = None, *, samples: int = 5, points_per_interval: int = 8):
        """Controls, states and co-states against time (matplotlib). Saves to ``path`` if given.

        Returns the matplotlib Figure.
        """
        from .plotting import plot_solution

        return plot_solution(self, path, samples=samples, points_per_interval=points_per_interval)

    # ---------------------------------------------------------- save / load
    def save(self, path: Union[str, Path]) -> None:
        """Save to a file readable by ``Solution.load`` (torch format, tensors on the CPU)."""
        data = {
            "format": _FORMAT,
            "cost": self.cost, "controls": self.controls.detach().cpu(), "mesh": self.mesh.detach().cpu(),
            "history": [r._asdict() for r in self.history], "converged": self.converged,
            "message": self.message, "method": self.method, "control_set": self.control_set.to_dict(),
            "single_sample": self.single_sample, "problem_name": self.problem_name,
            "optimality": self.optimality, "status": self.status, "relaxed_cost": self.relaxed_cost,
            "horizon": self.horizon, "violation": self.violation,
            "parameters": None if self.parameters is None else self.parameters.detach().cpu(),
            "multipliers": None if self.multipliers is None
            else {k: v.detach().cpu() for k, v in self.multipliers.items()},
            "rounds": [dict(r._asdict()) for r in self.rounds],
            "settings": _plain(self.settings),
            "states": [x.detach().cpu() for x in self.states_trajectory.fields()],
            "costates": None if self.costates_trajectory is None
            else [x.detach().cpu() for x in self.costates_trajectory.fields()],
        }
        torch.save(data, Path(path))

    @classmethod
    def load(cls, path: Union[str, Path], *, device=None) -> "Solution":
        """Load a Solution saved with ``save`` (its ``problem`` is None: functions are not saved).

        Raises FileNotFoundError if there is no such file and ValueError if the file is not one
        written by ``Solution.save``.
        """
        path = Path(path)
        expected = f"expected a file written by Solution.save (a torch file holding a dict with format {_FORMAT!r})"
        if not path.exists():
            raise FileNotFoundError(f"Solution.load: there is no file {str(path)!r}; {expected}")
        if path.is_dir():
            raise ValueError(f"Solution.load: {str(path)!r} is a directory; {expected}")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # torch's notes on the pickle protocol of foreign files
                data = torch.load(path, map_location=device or "cpu", weights_only=True)
        except Exception as error:  # torch.load fails on foreign files in many ways (unpickling, zip, EOF, key)
            raise ValueError(
                f"Solution.load: {str(path)!r} is not a saved pmpsolve Solution: it is {_describe_file(path)} that "
                f"torch.load(weights_only=True) cannot read ({type(error).__name__}); {expected}"
            ) from None
        if not isinstance(data, dict):
            shape = f" of shape {tuple(data.shape)}" if isinstance(data, torch.Tensor) else ""
            raise ValueError(f"Solution.load: {str(path)!r} holds a {type(data).__name__}{shape}, "
                             f"not a saved pmpsolve Solution; {expected}")
        if data.get("format") != _FORMAT:
            found = (f"format {data['format']!r}, which this version cannot read" if "format" in data
                     else f"no 'format' entry (keys: {sorted(map(str, data))[:10]})")
            raise ValueError(f"Solution.load: {str(path)!r} holds a dict with {found}; {expected}")
        try:
            mesh = data["mesh"]
            states = HermiteTrajectory(mesh, *data["states"])
            costates = None if data["costates"] is None else HermiteTrajectory(mesh, *data["costates"])
            return cls(cost=data["cost"], controls=data["controls"], mesh=mesh,
                       history=[IterationRecord(**r) for r in data["history"]], converged=data["converged"],
                       message=data["message"], method=data["method"], states_trajectory=states,
                       costates_trajectory=costates, control_set=control_set_from_dict(data["control_set"]),
                       single_sample=data["single_sample"], problem_name=data["problem_name"],
                       settings=data["settings"], optimality=data.get("optimality", math.nan),
                       status=data.get("status", ""), relaxed_cost=data.get("relaxed_cost"),
                       horizon=data.get("horizon"), violation=data.get("violation", 0.0),
                       parameters=data.get("parameters"), multipliers=data.get("multipliers"),
                       rounds=data.get("rounds", []))
        except KeyError as error:
            raise ValueError(f"Solution.load: {str(path)!r} has the Solution format but lacks the entry "
                             f"{error.args[0]!r}; the file is damaged or was not written by Solution.save") from None


_FORMAT = "pmpsolve.Solution/1"


def _describe_file(path: Path) -> str:
    """'an empty file', 'a text file beginning ...' or 'a binary file of N bytes' (for error messages)."""
    with open(path, "rb") as f:
        head = f.read(64)
    if not head:
        return "an empty file"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and all(c.isprintable() or c in "\t\r\n" for c in text):
        return f"a text file beginning {text.splitlines()[0][:40]!r}"
    return f"a binary file of {path.stat().st_size} bytes"


def _plain(value):
    """Settings as plain Python values (so that a weights-only load can read them)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    return str(value)
