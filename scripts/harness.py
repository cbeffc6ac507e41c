"""What every benchmark in scripts/ shares: timing, the machine, the command line and the JSON it writes.

* ``timed(fn, repeats=, warmup=, clock=, sync=)``: ``warmup`` untimed calls, then ``repeats`` timed
  ones; a :class:`Timing` with the median, every time and the last result. ``clock="wall"``
  (``time.perf_counter``) or ``"cpu"`` (``time.process_time``: the work of this process, whatever
  else runs on the machine); ``sync`` is called before each clock reading (``torch.cuda.synchronize``
  on a GPU).
* ``clock(fn)``: one call, its wall and CPU seconds and its result.
* ``clocked(owner, name, sink)``: wraps ``owner.name`` so that every call appends (wall, cpu) to
  ``sink``, for a benchmark that splits a method into the parts it calls; returns the undo.
* ``machine(**extra)``: the machine and software a number was measured on (CPU model and count,
  memory, load average, Python, torch and its threads, torchdiffeq, scipy, CasADi when installed),
  stored under ``"machine"`` in every JSON a benchmark writes; scripts/report.py prints it beside
  each table.
* ``parser(doc)`` / ``parse(parser, argv, quick=...)``: every benchmark takes ``--out DIR`` (default
  results/bench) and ``--quick``, which sets the defaults in ``quick`` (the tiny sizes the tests run:
  seconds, not minutes; the numbers mean nothing). Options given on the command line win.
* ``write_json(path, data)``: writes ``data`` with the machine added under ``"machine"`` when it
  has none, atomically (a run stopped half-way leaves the previous file whole), and prints the path.

Running ``python scripts/<bench>.py`` puts scripts/ first on ``sys.path``, so ``import harness``
works; importing it also puts the repository root there, for ``problems``.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `problems` lives at the top of the repository, beside `pmpsolve`

import torch  # noqa: E402

#: Where the benchmarks write their JSON and figures unless ``--out`` says otherwise.
DEFAULT_OUT = Path("results/bench")
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


@dataclass(frozen=True)
class Timing:
    """``median`` seconds over ``times`` (one entry a timed call) and the last call's ``result``."""

    median: float
    times: list = field(repr=False)
    result: Any = field(repr=False)


def timed(fn: Callable[[], Any], *, repeats: int, warmup: int = 1, clock: str = "wall",
          sync: Callable[[], None] | None = None) -> Timing:
    """Call ``fn`` ``warmup`` times untimed (allocator, first-call costs, tracing), then ``repeats``
    times, each timed alone; the median of those."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    now = CLOCKS[clock]
    result = None
    for _ in range(warmup):
        result = fn()
    if sync is not None:
        sync()
    times = []
    for _ in range(repeats):
        start = now()
        result = fn()
        if sync is not None:
            sync()
        times.append(now() - start)
    return Timing(statistics.median(times), times, result)


def clock(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """(wall seconds, CPU seconds, result) of one call of ``fn``."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, result


def clocked(owner: Any, name: str, sink: list) -> Callable[[], None]:
    """Replace ``owner.name`` by a wrapper that appends (wall, cpu) seconds of every call to ``sink``;
    returns a function that puts the original back."""
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            return original(*args, **kwargs)
        finally:
            sink.append((time.perf_counter() - wall, time.process_time() - cpu))

    setattr(owner, name, wrapper)
    return lambda: setattr(owner, name, original)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2 ** 20, 1)
    except OSError:
        pass
    return None


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001 - not installed, or no version: recorded as None
        return None


def machine(**extra) -> dict:
    """The machine and software of a measurement, as stored under ``"machine"`` in the JSON."""
    info = {
        "platform": platform.platform(), "processor": _cpu_model(), "cpus": os.cpu_count(),
        "memory_gb": _memory_gb(), "python": platform.python_version(), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "torchdiffeq": _version("torchdiffeq"), "scipy": _version("scipy"),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    casadi = _version("casadi")
    if casadi is not None:
        info["casadi"] = casadi
    if hasattr(os, "getloadavg"):
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    info.update(extra)
    return info


def parser(doc: str | None, **kwargs) -> argparse.ArgumentParser:
    """An argument parser with the options every benchmark shares: ``--out`` and ``--quick``."""
    kwargs.setdefault("description", doc.splitlines()[0] if doc else None)
    p = argparse.ArgumentParser(**kwargs)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"folder of the JSON (default {DEFAULT_OUT})")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes, seconds instead of minutes (what the tests run; the numbers mean nothing)")
    return p


def parse(p: argparse.ArgumentParser, argv=None, *, quick: dict | None = None) -> argparse.Namespace:
    """Parse ``argv``; with ``--quick``, the defaults in ``quick`` first (options given explicitly win)."""
    args = p.parse_args(argv)
    if args.quick and quick:
        p.set_defaults(**quick)
        args = p.parse_args(argv)
    return args


def pin_threads(threads: int = 1) -> None:
    """One thread by default: what the per-call overhead benchmarks measure, and what CasADi uses."""
    torch.set_num_threads(threads)


def write_json(path: Path, data: dict, *, indent: int = 2, quiet: bool = False) -> Path:
    """Write ``data`` (with ``"machine"`` added when missing) to ``path`` atomically; returns ``path``."""
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, dict) and "machine" not in data:
        data = {"machine": machine(), **data}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=indent, default=str))
    tmp.replace(path)
    if not quiet:
        print(f"wrote {path}")
    return path


# ------------------------------------------------- for the benchmarks of torch.compile (a failure is a result)
def error_message(err: BaseException, chars: int = 600) -> str:
    """``Type: message`` of an exception, cut at ``chars``: how a failed variant is recorded in the JSON."""
    text = f"{type(err).__name__}: {err}".strip()
    return text if len(text) <= chars else text[:chars] + " ..."


def fresh_dynamo() -> None:
    """Forget every compiled graph and zero dynamo's counters (inductor's on-disk cache stays)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()


def dynamo_counts() -> dict:
    """Dynamo's counters since the last ``fresh_dynamo()``: graphs, graph breaks (and the first
    reasons), recompiles."""
    from torch._dynamo.utils import counters

    stats = dict(counters["stats"])
    return {"unique_graphs": stats.get("unique_graphs", 0), "calls_captured": stats.get("calls_captured", 0),
            "graph_breaks": sum(counters["graph_break"].values()),
            "graph_break_reasons": [str(k)[:200] for k in list(counters["graph_break"])[:5]],
            "recompiles": sum(counters["recompiles"].values()) if "recompiles" in counters else None}
