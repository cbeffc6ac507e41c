"""The memory an iteration needs, estimated before the first sweep and checked against what is free.

An iteration holds, per mesh interval, the forward and co-state sweeps' samples at the
nodes and quadrature points ([N, q + 1, K, n] each, with their slopes), the interval
data and what the adaptive integrator keeps per step. Nothing of it is freed before the
iteration ends, so a mesh that does not fit makes the machine swap for minutes before
anything fails. ``Solver`` calls ``check_memory`` before the first sweep: an estimate above
the available memory is refused (``IterationMemoryError``), above half of it warned about.

The estimate, bytes = N * (PER_INTERVAL + PER_NUMBER * K (n + m) (q + 1) itemsize), was
calibrated against the peak resident memory (``resource.getrusage``, ru_maxrss, above the
peak after import) of one E-MSA iteration (``Stop(max_iter=1)``) on the CPU:

    problem (n, m)        K     N      dtype    measured   estimate
    lqr (2, 1)            1   2000    float64     26 MB      21 MB
    lqr (2, 1)            1   8000    float64     77 MB      83 MB
    lqr (2, 1)            1  32000    float64    248 MB     333 MB
    lqr (2, 1)            1   8000    float32     61 MB      74 MB
    van der Pol (2, 1)    1   8000    float64     72 MB      83 MB
    lqr_samples (2, 1)  100   2000    float64    724 MB     496 MB
    lqr_samples (2, 1) 1000   2000    float64   3378 MB    4816 MB

so it is within a factor 1.5 of the measurement at these sizes (the anonymous resident memory,
RssAnon, of lqr at N = 6000 and 24000: 47 and 172 MB, against 62 and 250 MB estimated; the
test suite checks a factor 3 at N = 6000). PER_INTERVAL is the
per-interval cost of the tensors the sweeps create per interval (Python and tensor
headers, the integrator's steps, which stop at every node); PER_NUMBER is about 25
copies of the sample arrays. On a GPU the same formula is compared with the free device
memory (``torch.cuda.mem_get_info``).
"""
from __future__ import annotations

import math
import warnings
from typing import Optional

import torch

from ..arguments import outside_level

__all__ = ["IterationMemoryError", "PER_INTERVAL", "PER_NUMBER", "available_memory", "check_memory",
           "iteration_bytes"]

PER_INTERVAL = 8_000  # bytes per mesh interval whatever K (calibrated, see the module)
PER_NUMBER = 25  # bytes per stored number, per byte of its dtype (calibrated, see the module)
WARN_FRACTION = 0.5  # warn when an iteration needs more than this fraction of the available memory


class IterationMemoryError(MemoryError):
    """One iteration of the solve would need more memory than is available (raised before the first sweep).

    Example:
        >>> import pmpsolve as pmp
        >>> issubclass(pmp.IterationMemoryError, MemoryError)
        True
    """


def iteration_bytes(N: int, K: int, n: int, m: int, quadrature: int, dtype: torch.dtype) -> float:
    """Estimated peak bytes of one iteration at N mesh intervals, K samples, n states, m controls."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return N * (PER_INTERVAL + PER_NUMBER * K * (n + m) * (quadrature + 1) * itemsize)


def available_memory(device: torch.device) -> Optional[int]:
    """Bytes free for this solve: MemAvailable of /proc/meminfo on the CPU (Linux), the free device
    memory on CUDA; None where it cannot be read (the check is then skipped)."""
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except (RuntimeError, AssertionError):
            return None
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the file counts kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def _size(num_bytes: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.3g} {unit}"
    return f"{num_bytes:.0f} bytes"


def check_memory(N: int, K: int, n: int, m: int, quadrature: int, dtype: torch.dtype, device) -> float:
    """Refuse (IterationMemoryError) or warn (RuntimeWarning) before a solve whose iteration would not
    fit; returns the estimate in bytes."""
    need = iteration_bytes(N, K, n, m, quadrature, dtype)
    free = available_memory(torch.device(device))
    if free is None or need <= WARN_FRACTION * free:
        return need
    where = "free on the device" if torch.device(device).type == "cuda" else "available (MemAvailable)"
    what = (f"one iteration at mesh N = {N} intervals with K = {K} samples (n = {n} states, m = {m} controls, "
            f"{quadrature} Gauss points, {str(dtype).replace('torch.', '')}) needs about {_size(need)}")
    per_interval = need / N
    fits = int(WARN_FRACTION * free // per_interval)
    if need > free:
        samples = math.floor((free / N - PER_INTERVAL) / (need / N - PER_INTERVAL) * K) if K > 1 else 0
        hint = f"a mesh of at most about {fits} intervals fits in half of it"
        if samples >= 1:
            hint += f", or at most about {samples} samples at this mesh"
        raise IterationMemoryError(f"solve: {what}, more than the {_size(free)} {where}; {hint} "
                                   "(pmpsolve.sweep.memory explains the estimate)")
    warnings.warn(f"solve: {what}, more than half of the {_size(free)} {where}; a mesh of at most about "
                  f"{fits} intervals keeps it below half", RuntimeWarning, stacklevel=outside_level())
    return need
