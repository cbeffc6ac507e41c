"""A linear-quadratic regulator: the one problem with an exact answer

x1' = x2, x2' = -x1 + u, J = 1/2 int_0^5 (x1^2 + x2^2 + u^2) dt, x0 = (0, 1), u free.
The optimum J* = 0.673999 comes from the Riccati equation. The control is smooth, so the
piecewise-constant controls of the mesh approach it at second order in the mesh width.
"""
from pathlib import Path

import pmpsolve as pmp
from problems import lqr


def main(out: Path, quick: bool = False):
    problem, J_star = lqr()
    sol = pmp.solve(problem, mesh=10 if quick else 200)      # E-MSA, the default method
    sol.plot(out / "lqr.png")                                 # control, states, co-states
    result = (f"J = {sol.cost:.6f} on {sol.controls.shape[0]} intervals ({sol.iterations} iterations, "
              f"converged = {sol.converged}), against J* = {J_star} (Riccati): {sol.cost - J_star:+.1e}.")
    return result, ["lqr.png"]


if __name__ == "__main__":
    print(main(Path(__file__).parent)[0])
