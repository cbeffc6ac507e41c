"""What the reproduction studies share on the command line: option checks, atomic results, --resume, Ctrl-C.

* ``positive_int``, ``nonnegative_int``, ``positive_float``, ``nonnegative_float``,
  ``writable_dir``, ``device`` and ``one_of`` are argparse ``type=`` functions: a bad
  value is refused by argparse (exit code 2, ``argument --mesh: expected ...``)
  before any run starts.
* ``write_json`` writes a results file atomically (a temporary file in the same
  folder, then ``os.replace``), so the file on disk is valid JSON at any moment.
* ``load_previous`` reads the results file for ``--resume`` and refuses (argparse
  error) when it was written with other settings.
* ``Interrupted`` is raised by a study when Ctrl-C (KeyboardInterrupt) or a solve
  that returned ``status == "interrupted"`` stops it; ``exit_interrupted`` prints
  the one-line resume command and exits with code 130.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

__all__ = ["positive_int", "nonnegative_int", "positive_float", "nonnegative_float", "writable_dir", "device",
           "one_of", "write_json", "load_previous", "Interrupted", "check_interrupted", "resume_command",
           "exit_interrupted", "add_resume_option", "run_and_report", "init_distributed", "average_gradients"]

INTERRUPT_EXIT_CODE = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


def _int(value: str, what: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}") from None


def positive_int(value: str) -> int:
    """An integer >= 1 (a count: iterations, mesh intervals, samples)."""
    number = _int(value, "a whole number >= 1")
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value!r}")
    return number


def nonnegative_int(value: str) -> int:
    """An integer >= 0 (a seed)."""
    number = _int(value, "a whole number >= 0")
    if number < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {value!r}")
    return number


def _float(value: str, what: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}") from None
    if not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}")
    return number


def positive_float(value: str) -> float:
    """A finite number > 0."""
    number = _float(value, "a number > 0")
    if number <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {value!r}")
    return number


def nonnegative_float(value: str) -> float:
    """A finite number >= 0."""
    number = _float(value, "a number >= 0")
    if number < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value!r}")
    return number


def int_range(low: int, high: int) -> Callable[[str], int]:
    """An integer from ``low`` to ``high``."""

    def check(value: str) -> int:
        what = f"a whole number from {low} to {high}"
        number = _int(value, what)
        if not low <= number <= high:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}")
        return number

    check.__name__ = f"int_from_{low}_to_{high}"
    return check


def writable_dir(value: str) -> Path:
    """A folder that exists and can be written, or that can be created (its nearest existing parent is writable).

    Nothing is created here but a probe file, removed at once: whether a folder can
    be written is only known by writing (permission bits say nothing for root, on
    read-only mounts, ...).
    """
    path = Path(value).expanduser()
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"expected a folder, got {value!r}, which is a file")
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise argparse.ArgumentTypeError(
            f"expected a folder that can be created, got {value!r}: {str(existing)!r} is a file")
    try:
        handle, probe = tempfile.mkstemp(prefix=".pmpsolve-write-test-", dir=existing)
        os.close(handle)
        os.remove(probe)
    except OSError as err:
        where = "" if existing == path else f" (its parent {str(existing)!r} cannot be written)"
        raise argparse.ArgumentTypeError(
            f"expected a folder that can be written, got {value!r}{where}: {err.strerror or err}") from None
    return path


def device(value: str) -> str:
    """``cpu``, ``cuda`` or ``cuda:N``, refused when CUDA (or that GPU) is not available."""
    import torch

    try:
        dev = torch.device(value)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {value!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"got {value!r}, but CUDA is not available on this machine; use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(
                f"got {value!r}, but this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {value!r}")
    return value


def one_of(choices: Iterable[str], what: str) -> Callable[[str], str]:
    """A name from ``choices`` (for positional name lists, where argparse's ``choices`` and ``nargs='*'`` mix badly)."""
    names = list(choices)

    def check(value: str) -> str:
        if value not in names:
            raise argparse.ArgumentTypeError(f"unknown {what} {value!r}; choose from {', '.join(names)}")
        return value

    check.__name__ = what
    return check


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` atomically: a temporary file in the same folder, then os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as f:
            json.dump(data, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise


def _plain(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists, ...), to compare settings."""
    return json.loads(json.dumps(value))


def load_previous(parser: argparse.ArgumentParser, path: Path, settings: Dict,
                  key: Optional[str] = "settings") -> Optional[Dict]:
    """The results in ``path`` for --resume, or None when there is no such file.

    Refuses through ``parser.error`` (exit code 2, before any run) when the file
    cannot be read or was written with settings other than ``settings`` (compared
    as JSON, on the keys of ``settings``; ``key`` is where the file keeps them, None: at its top level).
    """
    path = Path(path)
    if not path.exists():
        return None
    advice = f"use another --out, or drop --resume (or delete {path}) to start again"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        parser.error(f"--resume: cannot read {path} ({err}); {advice}")
    recorded = (data if key is None else data.get(key)) if isinstance(data, dict) else None
    if not isinstance(recorded, dict):
        parser.error(f"--resume: {path} records no settings (written by an older version?); {advice}")
    wanted = _plain(settings)
    differ = [k for k in wanted if recorded.get(k, "<missing>") != wanted[k]]
    if differ:
        detail = ", ".join(f"{k} = {recorded.get(k, '<missing>')!r} there, {wanted[k]!r} now" for k in differ[:4])
        more = f" and {len(differ) - 4} more" if len(differ) > 4 else ""
        parser.error(f"--resume: {path} was written with other settings ({detail}{more}); {advice}")
    return data


class Interrupted(Exception):
    """A study stopped by Ctrl-C; the complete runs are saved."""


def interruption(results: Any, **attributes: Any) -> Interrupted:
    """The Interrupted a study raises once it has saved its complete runs: it carries ``results``
    (and any other ``attributes``) to the code that prints the table and the resume command."""
    error = Interrupted("the study was interrupted")
    error.results = results
    for name, value in attributes.items():
        setattr(error, name, value)
    return error


def check_interrupted(result: Any) -> Any:
    """``result`` unless it is a solve that reports it was interrupted (``status == "interrupted"``)."""
    if getattr(result, "status", None) == "interrupted":
        raise Interrupted("the solve was interrupted")
    return result


def add_resume_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--resume", action="store_true",
                        help="continue where an interrupted run stopped: runs already complete in OUT/results.json "
                             "(with the same settings) are loaded, not re-run")


def resume_command(study: str, argv: Optional[List[str]]) -> str:
    """The command that resumes ``python -m pmpsolve reproduce STUDY ARGV``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "--resume" not in args:
        args.append("--resume")
    return shlex.join(["python", "-m", "pmpsolve", "reproduce", study, *args])


def exit_interrupted(study: str, argv: Optional[List[str]], done: int, path: Path) -> None:
    """Print how to resume and exit with code 130 (no traceback)."""
    saved = f"{done} complete run(s) saved in {path}" if done else "no run was complete"
    print(f"\ninterrupted: {saved}; resume with: {resume_command(study, argv)}", file=sys.stderr, flush=True)
    raise SystemExit(INTERRUPT_EXIT_CODE)


def run_and_report(study: str, argv: Optional[List[str]], path: Path, out: Path, run: Callable[[], Dict],
                   write_outputs: Callable[[Dict, Path], Tuple[List[Path], str]],
                   partial: Callable[[Dict], bool] = lambda results: bool(results["runs"])) -> Dict:
    """The end every study's ``main`` shares: ``run()``, then its figures and table (``write_outputs``
    returns the figure paths and the table) and where they went. Stopped by Ctrl-C: the complete runs
    are already saved; their outputs are written when ``partial(results)`` says there is something to
    show, and the process exits with the resume command (code 130)."""
    try:
        results = run()
    except Interrupted as stop:
        done = sum(1 for r in stop.results["runs"] if r.get("complete", True))
        try:
            if partial(stop.results):
                print(write_outputs(stop.results, out)[1])
        except KeyboardInterrupt:
            pass
        exit_interrupted(study, argv, done, path)
    figures, table = write_outputs(results, out)
    print(table)
    loaded = results.pop("loaded_runs", 0)
    note = f"; {loaded} run(s) loaded from the earlier results" if loaded else ""
    print(f"\nwrote {path} and {len(figures)} figure(s) in {out} ({results['config']['total_seconds']:.0f} s{note})")
    return results


def init_distributed(timeout_seconds: float = 600.0):
    """``--distributed``: the process group of a ``torchrun`` launch (docs/distributed.md, Networks).

    Reads torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK) and
    initialises ``torch.distributed`` with NCCL when CUDA is present (each rank on the GPU
    LOCAL_RANK), else gloo on the CPU. Returns (group, rank, world size, device or None).
    """
    import datetime

    import torch
    import torch.distributed as dist

    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise SystemExit(f"--distributed: {', '.join(missing)} not set; launch with torchrun, e.g. "
                         "torchrun --nproc_per_node=2 -m pmpsolve reproduce cnn --distributed")
    device = None
    backend = "gloo"
    if torch.cuda.is_available():
        backend = "nccl"
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method="env://",
                                timeout=datetime.timedelta(seconds=timeout_seconds))
    return dist.group.WORLD, dist.get_rank(), dist.get_world_size(), device


def average_gradients(parameters, group, weight: float) -> None:
    """A baseline's step on every rank's shard: grad <- sum over ranks of weight_r * grad_r (weight_r =
    B_r / B, so that it is the gradient of the global batch mean), in one all-reduce of a flat buffer."""
    import torch
    import torch.distributed as dist

    params = [p for p in parameters if p.grad is not None]
    if not params:
        return
    flat = torch.cat([p.grad.detach().reshape(-1) * weight for p in params])
    dist.all_reduce(flat, group=group)
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
        offset += p.numel()
