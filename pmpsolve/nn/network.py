"""The network as the update rules see it: a second sweep for the same rules (``pmpsolve.update.rules``).

An update rule reads three things from the continuous engine: the pointwise problem
(``pw.reducer.num_samples``, ``pw.problem.control_penalty``), the data of the current
iterate (``data.controls``, ``data.lengths`` and ``data.objective(pw, rho, eps)``, the
(augmented) Hamiltonian to maximise) and a maximiser (``maximiser.maximise(objective,
generator)``). For a network these are:

* ``LayerProblem``: B, the global batch size (the adaptive rho starts at rho0 / B, as it
  starts at rho0 / K for K samples), and the parameters' L1 / L0 cost;
* ``LayerIterate``: every maximised parameter concatenated into one row u [1, M] (length
  1: a layer is one time step), with the layer groups and their frozen ``LayerData``; its
  objective is ``LayerObjectives``, the groups' ``LayerHamiltonian`` s side by side;
* ``LayerMaximiser``: each group maximised as the rows of one objective, in closed form
  where the group's objective separates (``optim.separable_maximise``), else by the
  engine's ``HamiltonianMaximiser`` (projected L-BFGS, proximal gradient).

So ``pmp.nn.EMSA`` runs the same ``ExtendedMSA``, ``SQH``, ``BasicMSA`` and ``GradientStep``
objects as ``pmp.solve``: their proposals, acceptance tests and adaptation rules exist once.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Callable, List, NamedTuple, Optional, Sequence

import torch

from ..controls import Box, ControlSet, Reals
from ..update.maximisers import MaximiserResult
from .groups import ComponentPenalty, LayerGroup
from .hamiltonian import LayerData, LayerHamiltonian

__all__ = ["LayerProblem", "LayerIterate", "LayerObjectives", "LayerMaximiser"]


class LayerProblem:
    """What a rule reads of its problem: the global batch size B and the parameters' control cost.

    Args:
        batch: the global batch size B (over all ranks).
        objective_options: ``dict(weight_decay=..., reduce=..., world=...)``, the parts of every
            layer's objective that the rule does not set (rho and eps are the rule's).
        control_penalty: the L1 / L0 cost of the concatenated parameters (a ``ComponentPenalty``
            over [M]) or None; only ``GradientStep`` reads it.
    """

    def __init__(self, batch: int, objective_options: dict, control_penalty=None):
        self.reducer = SimpleNamespace(num_samples=batch)
        self.problem = SimpleNamespace(control_penalty=control_penalty)
        self.objective_options = objective_options


class LayerIterate(NamedTuple):
    """theta^k of every maximised layer as one row: what ``IntervalData`` is for a control mesh.

    controls: [1, M], the groups' rows [G_i, m_i] flattened and concatenated; lengths: ones [1];
    groups and data: the ``LayerGroup`` s and their frozen ``LayerData``.
    """

    controls: torch.Tensor
    lengths: torch.Tensor
    groups: Sequence[LayerGroup]
    data: Sequence[LayerData]

    @staticmethod
    def of(groups: Sequence[LayerGroup], data: Sequence[LayerData]) -> "LayerIterate":
        rows = [d.controls.reshape(-1) for d in data]
        controls = torch.cat(rows)[None] if rows else torch.zeros(1, 0)
        return LayerIterate(controls, torch.ones(1, dtype=controls.dtype, device=controls.device), groups, data)

    def split(self, u: torch.Tensor) -> List[torch.Tensor]:
        """u [1, M] -> the groups' rows [G_i, m_i]."""
        sizes = [d.controls.numel() for d in self.data]
        return [piece.reshape(d.controls.shape) for piece, d in zip(torch.split(u[0], sizes), self.data)]

    def join(self, rows: Sequence[torch.Tensor]) -> torch.Tensor:
        """The groups' rows -> u [1, M]."""
        return torch.cat([r.reshape(-1) for r in rows])[None]

    def objective(self, problem: LayerProblem, rho: float, eps: float = 0.0) -> "LayerObjectives":
        """The augmented Hamiltonian of every layer (``LayerHamiltonian``) with weights rho and eps."""
        o = problem.objective_options
        world = o["world"]
        # Parameter terms are added on every rank and then summed: each rank adds 1/R of them.
        return LayerObjectives(self, [LayerHamiltonian(g, d, rho, eps / world, o["weight_decay"] / world, o["reduce"])
                                      for g, d in zip(self.groups, self.data)])


class LayerObjectives:
    """The layers' objectives side by side, as one row [1, M]: what a rule asks of an objective
    (``gradient``, ``penalty_value``, ``rho``, ``eps``, ``data``). The maximisation itself runs
    per group (``LayerMaximiser``)."""

    def __init__(self, iterate: LayerIterate, objectives: List[LayerHamiltonian]):
        self.data, self.objectives = iterate, objectives
        self.rho = objectives[0].rho if objectives else 0.0
        self.eps = objectives[0].eps if objectives else 0.0
        self.penalty = None

    def gradient(self, u: torch.Tensor) -> torch.Tensor:
        """grad_theta of the smooth part [1, M]; at theta^k with rho = eps = 0 it is -d loss / d theta (Prop. 2)."""
        return self.data.join([o.value_and_grad(r)[1] for o, r in zip(self.objectives, self.data.split(u))])

    def penalty_value(self, u: torch.Tensor) -> torch.Tensor:
        """The layers' L1 / L0 cost at u [1, M] -> [1]."""
        total = u.new_zeros(1)
        for o, r in zip(self.objectives, self.data.split(u)):
            total = total + o.penalty_value(r).sum()
        return total

    def hamiltonian_gains(self, u: torch.Tensor,
                          plain_gradients: Optional[Sequence[Optional[torch.Tensor]]] = None) -> List[float]:
        """The plain Hamiltonian's gain of every group from theta^k to u (its first-order decrease of J).
        ``plain_gradients``: per group, J'p of a group affine in its rows, or None (``hamiltonian_gain``)."""
        plain = plain_gradients if plain_gradients is not None else [None] * len(self.objectives)
        return [float(o.hamiltonian_gain(r, j).sum()) for o, r, j in zip(self.objectives, self.data.split(u), plain)]


class LayerMaximiser:
    """``HamiltonianMaximiser.maximise`` for layer objectives: every group by ``maximise_group``.

    Args:
        maximise_group: ``(group, objective, generator) -> rows [G, m]``, the optimizer's per-group
            maximisation (closed form where it separates, else the engine's maximisers).
    """

    def __init__(self, maximise_group: Callable):
        self.maximise_group = maximise_group

    def maximise(self, objective: LayerObjectives, generator: Optional[torch.Generator] = None) -> MaximiserResult:
        iterate = objective.data
        rows = [self.maximise_group(g, o, generator) for g, o in zip(iterate.groups, objective.objectives)]
        u = iterate.join(rows)
        return MaximiserResult(u, u.new_zeros(1), 1, len(rows))


def row_set(groups: Sequence[LayerGroup], dtype, device) -> ControlSet:
    """The control set of the concatenated row [M]: the groups' boxes side by side (Reals when unbounded)."""
    lows, highs = [], []
    for g in groups:
        low, high = g.controls.bounds(dtype, device)
        m = sum(g.sizes)
        lows.append(low.expand(m).repeat(g.rows))
        highs.append(high.expand(m).repeat(g.rows))
    low = torch.cat(lows) if lows else torch.zeros(0, dtype=dtype, device=device)
    high = torch.cat(highs) if highs else torch.zeros(0, dtype=dtype, device=device)
    if bool(torch.isinf(low).all() and torch.isinf(high).all()):
        return Reals(low.numel())
    return Box(low, high)


def row_penalty(groups: Sequence[LayerGroup]) -> Optional[ComponentPenalty]:
    """The L1 / L0 cost of the concatenated row (None without one, or with both kinds in one network)."""
    kinds = {g.penalty.name for g in groups if g.penalty is not None}
    if len(kinds) != 1:
        return None
    kind = kinds.pop()
    weights = [(g.penalty.weight.expand(g.rows, -1) if g.penalty is not None and g.penalty.name == kind
                else torch.zeros(g.rows, sum(g.sizes), dtype=torch.float64)).reshape(-1) for g in groups]
    return ComponentPenalty(kind, torch.cat(weights))
