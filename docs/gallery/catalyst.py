"""Catalyst mixing: a bang-singular-bang control

COPS problem 14 (catalyst mixing in a tubular reactor): x1' = u (10 x2 - x1),
x2' = u (x1 - 10 x2) - (1 - u) x2, x0 = (1, 0), u in [0, 1], T = 1; minimise
J = -1 + x1(1) + x2(1). The published optimum is J* = -0.0480556. The optimal control is
u = 1, then a singular arc near u = 0.22 on which the Hamiltonian does not depend on u
(the switching function, the co-state term that multiplies u, stays at zero), then u = 0:
a test of how a method handles singular arcs.
"""
from pathlib import Path

import pmpsolve as pmp
from problems import catalyst_mixing


def main(out: Path, quick: bool = False):
    problem, J_star = catalyst_mixing()
    sol = pmp.solve(problem, mesh=10 if quick else 200)
    sol.plot(out / "catalyst.png")
    u, mesh = sol.controls[:, 0], sol.mesh
    singular = (u > 0.01) & (u < 0.99)                        # neither bound: the singular arc
    arc = ""
    if singular.any():
        first, last = singular.nonzero()[[0, -1], 0].tolist()
        arc = (f" The control is at u = 1 until t = {float(mesh[first]):.2f}, on the singular arc "
               f"(median u = {float(u[singular].median()):.3f}) until t = {float(mesh[last + 1]):.2f}, then at u = 0.")
    result = (f"J = {sol.cost:.7f} on {u.numel()} intervals ({sol.iterations} iterations), "
              f"against the published J* = {J_star} (COPS): {sol.cost - J_star:+.1e}.{arc}")
    return result, ["catalyst.png"]


if __name__ == "__main__":
    print(main(Path(__file__).parent)[0])
