"""Where femeta's work runs under ``mpiexec``: the communicator and collective steps.

Every rank runs the same program (SPMD). Work that can be shared (assembling a
dataset's tasks, PETSc solves) is split over the ranks and gathered again, so
every rank holds the same results; files are written by rank 0. A step that
fails on some rank raises the same error on every rank (:func:`collective`),
so that no rank waits for one that has given up.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from typing import Any

__all__ = ["Comm", "collective", "launcher_place", "merged", "on_root", "share_cores", "world"]

#: An mpi4py communicator, or the serial stand-in of :func:`world`.
Comm = Any


class _Serial:
    """One process without mpi4py: the few collective calls femeta makes, trivially."""

    rank = 0
    size = 1

    def allgather(self, value: Any) -> list[Any]:
        return [value]

    def bcast(self, value: Any, root: int = 0) -> Any:
        return value

    def Barrier(self) -> None:
        return None


def launcher_place() -> tuple[int, int]:
    """This process's rank and the number of ranks when started by mpiexec (MPICH,
    Open MPI or PMIx), else ``(0, 1)``."""
    for rank, size in (("PMI_RANK", "PMI_SIZE"), ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
                       ("PMIX_RANK", "PMIX_SIZE")):  # fmt: skip
        if rank in os.environ:
            return int(os.environ[rank]), int(os.environ.get(size, "1"))
    return 0, 1


def world() -> Comm:
    """``MPI.COMM_WORLD`` under ``mpiexec``; else a serial stand-in that makes no MPI call
    (a process forked from one, e.g. by a process pool, must not call MPI)."""
    if launcher_place()[1] == 1:
        return _Serial()
    from mpi4py import MPI

    return MPI.COMM_WORLD


def share_cores(ranks: int) -> None:
    """Give torch this process's share of the cores when ``ranks`` processes run here."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(max(1, (cores or 1) // ranks))


def collective[T](comm: Comm, step: Callable[[], T]) -> T:
    """``step()`` on every rank of ``comm``; an error on any rank is raised on all of them.

    The first failing rank's exception is raised everywhere (as itself where it can be
    sent, else as a :class:`RuntimeError` with its message).
    """
    error: BaseException | None = None
    result = None
    try:
        result = step()
    except Exception as err:
        error = err
    if comm.size == 1:
        if error is not None:
            raise error
        return result  # type: ignore[return-value]
    errors = comm.allgather(None if error is None else _portable(error))
    failed = next(((rank, e) for rank, e in enumerate(errors) if e is not None), None)
    if failed is None:
        return result  # type: ignore[return-value]
    rank, shared = failed
    if error is not None and rank == comm.rank:
        raise error
    raise shared


def on_root[T](comm: Comm, step: Callable[[], T]) -> T | None:
    """``step()`` on rank 0 only (e.g. writing a file); an error there is raised on every rank.

    Returns what rank 0's step returned on rank 0, ``None`` elsewhere.
    """
    return collective(comm, step if comm.rank == 0 else lambda: None)


def merged[T](comm: Comm, part: dict[int, T]) -> dict[int, T]:
    """Every rank's ``part`` (items keyed by task) in one dictionary, on every rank."""
    if comm.size == 1:
        return part
    return {key: value for piece in comm.allgather(part) for key, value in piece.items()}


def _portable(error: Exception) -> Exception:
    """``error`` if it survives pickling, else a :class:`RuntimeError` with its message."""
    try:
        copy = pickle.loads(pickle.dumps(error))
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")
    return copy if str(copy) == str(error) else RuntimeError(f"{type(error).__name__}: {error}")
