"""The one place that sums over samples (docs/theory.md, scaling convention; docs/distributed.md).

The K samples of a problem share one control; their sweeps never talk to each other,
and everything the iteration needs from them is a sum (the Hamiltonian, its feasibility
penalties, the co-state's 1/K) or a mean (J). Every such reduction goes through a
``SampleReducer``, so that running the samples in several processes changes one class:
``DistributedSampleReducer``, whose ``totals`` all-reduce across ranks (one fused buffer
per evaluation) and whose ``num_samples`` is the global K. In one process
(``SampleReducer``) it is the identity.

Two kinds of numbers, in a distributed solve:

* *parts*: ``sum_states``, ``sum_costs`` and ``mean_costs`` sum over the samples this
  process holds (``mean_costs`` divides by the global K, so that its gradient is the
  co-state's 1/K). They stay differentiable and never communicate.
* *totals*: ``totals(*parts)`` adds the parts of all ranks, in one ``all_reduce``.
  Terms that are not sums over samples (the control penalty, the SQH proximity term)
  are added by the rank that ``keeps_shared_terms`` (rank 0), or after the total.

Errors: a rank that fails while computing its parts (a non-finite sweep, a sweep
budget, any exception) still joins the collective, with a status flag set in the same
buffer; every rank then raises the same error (that of the lowest failing rank), so a
failure never leaves the other ranks waiting (``ErrorGuard``; ``agree`` for a sweep
with nothing to sum). A rank that dies outright is caught by the group's timeout.

Shapes: the sample axis of a state or co-state is dim -2 ([..., K, n]); of a per-sample
cost it is dim -1 ([..., K]).
"""
from __future__ import annotations

import json
import pickle
import secrets
import time
import zlib
from typing import Optional, Tuple

import torch

__all__ = ["SampleReducer", "DistributedSampleReducer", "ErrorGuard", "distributed_reducer", "refuse_user_set"]


class ErrorGuard:
    """``with reducer.guard() as guard:`` around the computation of a rank's parts.

    In one process it does nothing (exceptions propagate as they are). In a distributed
    solve it keeps an ``Exception`` in ``guard.error`` instead of raising it, so that the
    rank still reaches the next ``totals(..., error=guard.error)`` and every rank raises it.
    """

    def __init__(self, swallow: bool):
        self.swallow, self.error = swallow, None

    def __enter__(self) -> "ErrorGuard":
        return self

    def __exit__(self, kind, error, traceback) -> bool:
        if self.swallow and isinstance(error, Exception):
            self.error = error
            return True
        return False


class SampleReducer:
    """Sums and means over the samples held in this process (all of them, here).

    Args:
        num_samples: K, the number of samples of the problem (the global count: the
            divisor of every mean, also where a process holds only some of them).
    """

    #: whether totals communicate (False: one process, every total is the identity)
    distributed = False
    #: whether this process adds the terms that are not sums over samples (penalty, SQH term)
    keeps_shared_terms = True
    rank, world_size = 0, 1

    def __init__(self, num_samples: int):
        self.num_samples = int(num_samples)

    def sum_states(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over samples and state components of [..., K, n] -> [...] (the concatenated state)."""
        return x.sum(dim=(-1, -2))

    def sum_costs(self, c: torch.Tensor) -> torch.Tensor:
        """Sum of per-sample costs [..., K] -> [...]."""
        return c.sum(dim=-1)

    def mean_costs(self, c: torch.Tensor) -> torch.Tensor:
        """Mean of per-sample costs [K] -> 0-d, over all K samples."""
        return c.mean()

    def total(self, value: torch.Tensor) -> torch.Tensor:
        """A sum over this process's samples made global: the identity in one process (the hook where
        a multi-process reducer all-reduces, one fused buffer per evaluation)."""
        return value

    def totals(self, *parts: torch.Tensor, error: Optional[BaseException] = None) -> Tuple[torch.Tensor, ...]:
        """Several parts made global at once (one fused collective across ranks); raises ``error``
        (this process failed computing them) or the error of another rank. Identity here."""
        if error is not None:
            raise error
        return parts

    def agree(self, error: Optional[BaseException] = None) -> None:
        """Every rank raises the same error if any rank failed (a status-only collective); here:
        raise ``error`` if given."""
        if error is not None:
            raise error

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` holds on some rank (e.g. a callback asking to stop)."""
        return bool(flag)

    def guard(self) -> ErrorGuard:
        """An ``ErrorGuard`` for the computation of parts (does nothing in one process)."""
        return ErrorGuard(self.distributed)


class DistributedSampleReducer(SampleReducer):
    """The samples split across the ranks of a ``torch.distributed`` process group.

    Built by ``distributed_reducer`` (which checks that the ranks agree on the problem and
    finds the global K). ``num_samples`` is the global K; ``local_samples`` this rank's K_r.
    Collectives use the group's own timeout (``init_process_group(timeout=...)`` or
    ``new_group(timeout=...)``). ``collectives``, ``numbers`` and ``seconds`` count the
    all-reduces of this solve, the numbers they carried and the wall time spent in them.
    """

    distributed = True

    def __init__(self, group, num_samples: int, local_samples: int):
        import torch.distributed as dist

        super().__init__(num_samples)
        self.group, self.local_samples = group, int(local_samples)
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        self.keeps_shared_terms = self.rank == 0
        self.collectives, self.numbers, self.seconds = 0, 0, 0.0

    def mean_costs(self, c: torch.Tensor) -> torch.Tensor:
        """This rank's part of the mean, sum_{i in rank} c_i / K (differentiable: the co-state's 1/K)."""
        return c.sum() / self.num_samples

    def total(self, value: torch.Tensor) -> torch.Tensor:
        return self.totals(value)[0]

    def totals(self, *parts: torch.Tensor, error: Optional[BaseException] = None) -> Tuple[torch.Tensor, ...]:
        import torch.distributed as dist

        if not parts:
            raise ValueError("totals needs at least one tensor (use agree() for a status alone)")
        like = parts[0]
        # One buffer: every part flattened, then the status flag (1 where this rank failed). Float sums of
        # 0/1 are exact, so every rank reads the same flag and takes the same branch.
        buffer = torch.cat([p.detach().reshape(-1).to(like.dtype) for p in parts]
                           + [like.new_full((1,), 0.0 if error is None else 1.0)])
        start = time.perf_counter()
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=self.group)
        failed = bool(buffer[-1] != 0)  # the host sync that also ends the collective on a GPU
        self.seconds += time.perf_counter() - start
        self.collectives += 1
        self.numbers += buffer.numel()
        if failed:
            self._raise_agreed(error)
        out, offset = [], 0
        for p in parts:
            out.append(buffer[offset:offset + p.numel()].view(p.shape))
            offset += p.numel()
        return tuple(out)

    def agree(self, error: Optional[BaseException] = None) -> None:
        import torch.distributed as dist

        flag = torch.tensor([0.0 if error is None else 1.0], dtype=torch.float64, device=self._device())
        start = time.perf_counter()
        dist.all_reduce(flag, op=dist.ReduceOp.SUM, group=self.group)
        failed = bool(flag[0] != 0)
        self.seconds += time.perf_counter() - start
        self.collectives += 1
        self.numbers += 1
        if failed:
            self._raise_agreed(error)

    def any(self, flag: bool) -> bool:
        import torch.distributed as dist

        value = torch.tensor([1.0 if flag else 0.0], dtype=torch.float64, device=self._device())
        dist.all_reduce(value, op=dist.ReduceOp.SUM, group=self.group)
        self.collectives += 1
        return bool(value[0] != 0)

    def statistics(self) -> dict:
        """What this solve's communication cost (recorded in ``Solution.settings["distributed"]``)."""
        return {"ranks": self.world_size, "rank": self.rank, "samples": self.num_samples,
                "local_samples": self.local_samples, "all_reduces": self.collectives,
                "numbers_reduced": self.numbers, "all_reduce_seconds": self.seconds}

    def _device(self) -> torch.device:
        import torch.distributed as dist

        # NCCL reduces CUDA tensors only (its rank's current device); gloo CPU tensors.
        if dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _raise_agreed(self, error: Optional[BaseException]):
        """Some rank failed: every rank raises the error of the lowest failing rank (its own
        exception there, an unpickled copy elsewhere). The messages travel once, on failure only."""
        import torch.distributed as dist

        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, None if error is None else _payload(error), group=self.group)
        origin = next(r for r, p in enumerate(gathered) if p is not None)
        if origin == self.rank:
            raise error
        remote = _rebuild(gathered[origin])
        remote.add_note(f"(raised on rank {origin} of {self.world_size} of a distributed pmpsolve solve; "
                        f"every rank raises it)")
        if error is not None:
            raise remote from error
        raise remote


def _payload(error: BaseException) -> tuple:
    try:
        data = pickle.dumps(error)
    except Exception:  # noqa: BLE001 - an exception with unpicklable attributes travels as text
        data = None
    return type(error).__name__, str(error), data


def _rebuild(payload: tuple) -> BaseException:
    name, message, data = payload
    if data is not None:
        try:
            error = pickle.loads(data)
            if isinstance(error, BaseException):
                return error
        except Exception:  # noqa: BLE001 - e.g. a class this rank cannot import
            pass
    return RuntimeError(f"{name}: {message}")


#: Descriptor entries every rank must agree on (besides K_r, which is summed).
_DESCRIPTOR = ("state dimension n", "control dimension m", "mesh intervals N", "mesh checksum", "mesh moment",
               "dtype", "settings checksum", "seed")


def distributed_reducer(group, local_samples: int, state_dim: int, control_dim: int, mesh: torch.Tensor,
                        settings: dict, seed: Optional[int] = None) -> Tuple[DistributedSampleReducer, int]:
    """Check that the ranks of ``group`` solve the same problem and build their reducer.

    One ``all_gather`` of a small descriptor: K_r (summed into the global K), n, m, the mesh
    (N and two checksums of its nodes), the dtype and a checksum of ``settings`` (the solve's
    settings, device excluded). Different values on different ranks raise ValueError on every
    rank, naming the ranks and values. Returns the reducer and the seed every rank uses for
    its random draws: ``seed`` if given, else rank 0's fresh one (the same draws on every rank).

    Args:
        group: a ``torch.distributed`` ProcessGroup (``torch.distributed.group.WORLD`` for all).
        local_samples: K_r, the samples of this rank (the rows of its x0 [K_r, n]).
        mesh: the control mesh [N + 1] (the same on every rank).
    """
    dist = _check_group(group)
    device = (torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl"
              else torch.device("cpu"))
    nodes = mesh.detach().to("cpu", torch.float64)
    text = json.dumps({k: v for k, v in settings.items() if k != "device"}, sort_keys=True, default=str)
    own_seed = secrets.randbits(52) if seed is None else int(seed) % (1 << 52)
    descriptor = torch.tensor(
        [float(local_samples), float(state_dim), float(control_dim), float(nodes.numel() - 1), float(nodes.sum()),
         float((nodes * torch.arange(1, nodes.numel() + 1, dtype=torch.float64)).sum()),
         float(_DTYPE_CODES.get(mesh.dtype, 0)), float(zlib.crc32(text.encode())), float(own_seed)],
        dtype=torch.float64, device=device)
    world = dist.get_world_size(group)
    gathered = [torch.empty_like(descriptor) for _ in range(world)]
    dist.all_gather(gathered, descriptor, group=group)
    table = torch.stack(gathered).cpu()  # [R, 1 + len(_DESCRIPTOR)]
    for column, label in enumerate(_DESCRIPTOR[:-1], start=1):
        values = table[:, column]
        if not bool((values == values[0]).all()):
            shown = ", ".join(f"rank {r}: {_shown(label, float(v))}" for r, v in enumerate(values))
            raise ValueError(f"process_group: the ranks disagree on the {label} ({shown}); every rank must solve "
                             "the same problem (same n, m, mesh, dtype and solve settings) on its own shard of x0")
    counts = table[:, 0]
    if bool((counts < 1).any()):
        raise ValueError(f"process_group: every rank needs at least one sample, got K_r = {counts.tolist()}")
    reducer = DistributedSampleReducer(group, int(counts.sum()), local_samples)
    return reducer, int(table[0, -1]) if seed is None else int(seed)


_DTYPE_CODES = {torch.float64: 64, torch.float32: 32}


def _shown(label: str, value: float) -> str:
    if label == "dtype":
        return {64: "float64", 32: "float32"}.get(int(value), "other")
    return f"{value:.17g}" if "checksum" in label or "moment" in label else f"{int(value)}"


def _check_group(group):
    """torch.distributed, after checking that ``group`` can be used (clear errors otherwise)."""
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError("process_group: this PyTorch build has no torch.distributed (pip's CPU and CUDA "
                           "wheels have it)")
    if not dist.is_initialized():
        raise RuntimeError("process_group was given but torch.distributed is not initialised: call "
                           "torch.distributed.init_process_group(backend='gloo' or 'nccl', timeout=...) first, "
                           "e.g. under torchrun (docs/distributed.md)")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed ProcessGroup (e.g. torch.distributed.group.WORLD "
                        f"or torch.distributed.new_group(...)), got {type(group).__name__}")
    if dist.get_rank(group) < 0:
        raise ValueError("process_group: this process is not a member of the group it was given")
    return dist


def refuse_user_set(problem) -> None:
    """A UserSet's maximiser receives the interval data of this rank's samples only and could return
    different controls on different ranks: not supported in a distributed solve (a clear error)."""
    from ..controls import UserSet

    if isinstance(problem.controls, UserSet):
        raise ValueError("process_group: a UserSet is not supported in a distributed solve (its maximiser would see "
                         "only this rank's samples and could return different controls on different ranks); use a "
                         "Box, Reals, Finite or Ball, or solve in one process")
