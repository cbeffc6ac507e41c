"""Figures of a Solution: controls, states and co-states against time."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch


def plot_solution(sol, path: Optional[Union[str, Path]] = None, *, samples: int = 5, points_per_interval: int = 8):
    """Three panels sharing the time axis: u(t) (steps), X(t) and P(t) (Hermite interpolants).

    With K > 1 samples only the first ``samples`` trajectories are drawn.
    """
    import matplotlib.pyplot as plt

    mesh = sol.mesh.detach().cpu()
    N = mesh.numel() - 1
    frac = torch.linspace(0, 1, points_per_interval + 1, dtype=mesh.dtype)[:-1]
    t = torch.cat([(mesh[:-1, None] + (mesh[1:] - mesh[:-1])[:, None] * frac).reshape(-1), mesh[-1:]])
    X = sol.states_trajectory(t.to(sol.mesh.device)).detach().cpu()  # [P, K, n]
    panels = [("control u(t)", "u", None), ("state X(t)", "x", X)]  # (axis label, legend letter, values)
    if sol.costates_trajectory is not None:
        panels.append(("co-state P(t)", "p", sol.costates_trajectory(t.to(sol.mesh.device)).detach().cpu()))
    fig, axes = plt.subplots(len(panels), 1, sharex=True, figsize=(7, 2.4 * len(panels)), squeeze=False)
    axes = axes[:, 0]
    u = sol.controls.detach().cpu()
    for j in range(u.shape[1]):
        # baseline=None: steps only, not closed down to 0 at both ends
        axes[0].stairs(u[:, j].numpy(), mesh.numpy(), baseline=None, color=f"C{j % 10}",
                       label=f"u{j + 1}" if u.shape[1] <= 10 else None)
    for ax, (label, letter, Y) in zip(axes, panels):
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if Y is None:
            continue
        K, n = Y.shape[1], Y.shape[2]
        for i in range(min(K, samples)):
            for j in range(n):
                ax.plot(t.numpy(), Y[:, i, j].numpy(), color=f"C{j % 10}", alpha=1.0 if K == 1 else 0.5,
                        label=f"{letter}{j + 1}" if i == 0 and n <= 10 else None)
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize="small")
    axes[-1].set_xlabel("t")
    title = f"{sol.problem_name}: {sol.method}, J = {sol.cost:.8g}, N = {N}"
    K = X.shape[1]
    if K > 1:
        title += f", {min(K, samples)} of {K} samples"
    axes[0].set_title(title)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig
