"""A double integrator with a fuel cost: bang-off-bang

x1' = x2, x2' = u, x0 = (0, 0), u in [-1, 1], T = 3; minimise
J = -x1(T) + x2(T)^2 / 2 + int_0^T 0.5 |u| dt: drive a cart as far as possible, arrive
slowly, and pay for the fuel. The maximum principle gives u = 1 while the switching
function p2(t) is above c = 0.5, u = 0 while |p2| <= c and u = -1 below -c: full thrust
until t = 1.5, coasting until t = 2.5, braking to the end. The optimum is known in closed
form (problems.double_integrator_optimum): J* = -1.75. The switches fall on mesh nodes
when the number of intervals is a multiple of 6, and then the discretised optimum is J*
itself. The L1 cost is maximised in closed form (soft thresholding); the second figure
shows the switching function against the thresholds +-c.
"""
from pathlib import Path

import matplotlib.pyplot as plt
import torch

import pmpsolve as pmp
from problems import double_integrator


def main(out: Path, quick: bool = False):
    problem, J_star = double_integrator(penalty="L1", weight=0.5)
    sol = pmp.solve(problem, mesh=6 if quick else 96)
    sol.plot(out / "double_integrator.png")

    t = torch.linspace(0, 3, 301, dtype=torch.float64)
    p2 = sol.costate(t)[:, 1]
    fig, ax = plt.subplots(figsize=(7, 2.6))
    ax.plot(t, p2, label="switching function p2(t)")
    ax.stairs(sol.controls[:, 0], sol.mesh, baseline=None, label="u(t)")
    for level in (0.5, -0.5):
        ax.axhline(level, color="gray", linestyle="--", linewidth=0.8)
    ax.set_xlabel("t")
    ax.legend(loc="best", fontsize="small")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "double_integrator_switching.png", dpi=120)

    u, mesh = sol.controls[:, 0].round(decimals=6), sol.mesh
    switches = [f"{float(mesh[n + 1]):.2f}" for n in range(u.numel() - 1) if u[n + 1] != u[n]]
    result = (f"J = {sol.cost:.6f} on {u.numel()} intervals ({sol.iterations} iterations), against the "
              f"closed-form J* = {J_star:.6f}: {sol.cost - J_star:+.1e}; the control switches at "
              f"t = {', '.join(switches)}.")
    return result, ["double_integrator.png", "double_integrator_switching.png"]


if __name__ == "__main__":
    print(main(Path(__file__).parent)[0])
