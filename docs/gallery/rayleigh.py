"""The Rayleigh problem: an electric circuit with a tunnel diode

x1' = x2, x2' = -x1 + (1.4 - 0.14 x2^2) x2 + 4 u, J = int_0^2.5 (x1^2 + u^2) dt,
x0 = (-5, -5), u free (Maurer and Augustin). The published optimum is J* = 29.3761. The
control is unconstrained, so the maximum principle gives u = 2 p2 (the maximiser of
p2 4 u - u^2): the control and the second co-state have the same shape.
"""
from pathlib import Path

import pmpsolve as pmp
from problems import rayleigh


def main(out: Path, quick: bool = False):
    problem, J_star = rayleigh()
    sol = pmp.solve(problem, mesh=10 if quick else 200)
    sol.plot(out / "rayleigh.png")
    result = (f"J = {sol.cost:.5f} on {sol.controls.shape[0]} intervals ({sol.iterations} iterations), "
              f"against the published J* = {J_star}: {sol.cost - J_star:+.1e}.")
    return result, ["rayleigh.png"]


if __name__ == "__main__":
    print(main(Path(__file__).parent)[0])
