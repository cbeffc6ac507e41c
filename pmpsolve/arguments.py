"""Arguments a solve shares with the gradient baselines, checked and normalised once, at the door."""
from __future__ import annotations

import torch

from .problem import ControlProblem

__all__ = ["initial_controls", "outside_level", "progress_bar", "resolve_device"]


def initial_controls(init, problem: ControlProblem, N: int, m: int, dtype, device) -> torch.Tensor:
    """``init`` of ``solve`` as controls [N, m] in the control set (default: the set's default point)."""
    controls = problem.controls
    if init is None:
        return controls.default_point(dtype, device).expand(N, m).clone()
    try:
        u = torch.as_tensor(init, dtype=dtype).to(device)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"solve: `init` must be a tensor [N, m] = [{N}, {m}], [m] or a number, "
                        f"got {type(init).__name__}") from None
    if u.ndim == 0:
        u = u.expand(N, m)
    elif u.ndim == 1 and u.shape[0] == m:
        u = u.expand(N, m)
    if tuple(u.shape) != (N, m):
        raise ValueError(f"solve: `init` has shape {tuple(u.shape)}; expected [N, m] = [{N}, {m}] "
                         f"(N mesh intervals, m controls), [m] or a number")
    inside = controls.contains(u)
    if not bool(inside.all()):
        n = int((~inside).nonzero()[0])
        raise ValueError(f"solve: `init` lies outside the control set {controls!r} on interval {n} "
                         f"(value {u[n].tolist()}); project it first, e.g. problem.controls.project(init)")
    return u.clone()


def progress_bar(progress: bool, total: int, name: str, method: str):
    """A tqdm bar (None when ``progress`` is False)."""
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"{name} [{method}]", leave=False)


def resolve_device(device) -> torch.device:
    """``device`` as a torch.device, refusing one this machine does not have."""
    try:
        device = torch.device("cpu" if device is None else device)
    except (RuntimeError, TypeError):
        raise ValueError(f"solve: `device` must be a torch device such as 'cpu' or 'cuda', got {device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"solve: `device` {str(device)!r} was requested but CUDA is not available on this machine "
                         "(torch.cuda.is_available() is False); use device='cpu'")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"solve: `device` {str(device)!r} does not exist: this machine has "
                         f"{torch.cuda.device_count()} CUDA device(s)")
    return device


def outside_level() -> int:
    """The ``stacklevel`` of a warning raised by the caller that names the first frame outside pmpsolve."""
    import os
    import sys

    package = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package + os.sep):
        frame, level = frame.f_back, level + 1
    return level
