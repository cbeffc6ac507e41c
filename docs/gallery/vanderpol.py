"""Van der Pol oscillator with a bounded control

x1' = (1 - x2^2) x1 - x2 + u, x2' = x1, J = int_0^5 (x1^2 + x2^2 + u^2) dt, x0 = (0, 1),
u in [-0.3, 1]. The published optimum is J* = 2.867260. The maximum principle gives
u = p1 / 2 (the maximiser of p1 u - u^2) clipped to the box: both bounds are active, the
lower one for a moment at the start and the upper one around t = 1, where the co-state p1
rises above 2.
"""
from pathlib import Path

import pmpsolve as pmp
from problems import van_der_pol


def main(out: Path, quick: bool = False):
    problem, J_star = van_der_pol()
    sol = pmp.solve(problem, mesh=10 if quick else 200)
    sol.plot(out / "vanderpol.png")
    u, mesh = sol.controls[:, 0], sol.mesh
    width = mesh[1:] - mesh[:-1]
    lower, upper = (float((width * (abs(u - bound) < 1e-6)).sum()) for bound in (-0.3, 1.0))
    result = (f"J = {sol.cost:.6f} on {u.numel()} intervals ({sol.iterations} iterations), against the "
              f"published J* = {J_star}: {sol.cost - J_star:+.1e}. The control is on its lower bound "
              f"for {lower:.2f} and on its upper bound for {upper:.2f} of the 5 time units.")
    return result, ["vanderpol.png"]


if __name__ == "__main__":
    print(main(Path(__file__).parent)[0])
