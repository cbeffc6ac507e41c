"""pmpsolve: optimal control and network training by Pontryagin's maximum principle.

Optimise-then-discretise: the state is integrated forward and the co-state
backward with adaptive torchdiffeq solvers, and the (augmented) Hamiltonian
is maximised on every mesh interval at once. See docs/guide.md.

    >>> import torch, pmpsolve as pmp
    >>> problem = pmp.ControlProblem(
    ...     dynamics=lambda t, x, u: torch.stack([x[..., 1], -x[..., 0] + u[..., 0]], -1),
    ...     x0=torch.tensor([0.0, 1.0]), horizon=5.0, controls=pmp.Reals(1),
    ...     running_cost=lambda t, x, u: 0.5 * ((x ** 2).sum(-1) + (u ** 2).sum(-1)))
    >>> sol = pmp.solve(problem, mesh=50)
    >>> round(sol.cost, 3)
    0.674
"""
from . import nn
from .constraints import AtMost, Equal, FreeTime
from .controls import Ball, Box, ControlSet, Finite, Reals, UserSet
from .errors import DivergenceError, NonFiniteError, SolveError, SweepBudgetError
from .sweep.memory import IterationMemoryError
from .update.maximisers import MaximisationData
from .penalties import L0, L1, ControlPenalty
from .problem import ControlProblem
from .update.rounding import sum_up_rounding
from .update.rules import RULES, UpdateRule, register_rule
from .sensitivity import cost, cost_gradient, optimality_of
from .solution import IterationRecord, Solution
from .methods import DDP, EMSA, MSA, SQH, Gradient, Method, Rule
from .options import ODE, Maximiser, Stop
from .update.relaxation import RelaxAndRound
from .solver import Solver, SolverState, solve

__all__ = [
    "ControlProblem", "Equal", "AtMost", "FreeTime", "ControlSet", "Reals", "Box", "Finite", "UserSet", "Ball", "L1", "L0", "ControlPenalty",
    "MaximisationData", "solve", "Solver", "SolverState", "Solution", "IterationRecord",
    "Method", "EMSA", "MSA", "SQH", "Gradient", "DDP", "Rule", "ODE", "Maximiser", "Stop", "RelaxAndRound",
    "SolveError", "NonFiniteError", "DivergenceError", "SweepBudgetError", "IterationMemoryError", "RULES", "UpdateRule", "register_rule",
    "cost", "cost_gradient", "optimality_of", "sum_up_rounding", "nn",
]
__version__ = "0.1.0"
