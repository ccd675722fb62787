"""A finite set of tasks tau, stored as tensors with a common leading axis."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from femeta.parallel import Comm, collective
from femeta.solvers.sparse import SparseBatch

__all__ = [
    "TaskSet",
    "assemble_shared",
    "default_cache_dir",
    "petsc_system",
    "split_size_and_seed",
    "stored_pattern",
]


class TaskSet:
    """Named tensors describing ``len(self)`` tasks, one row per task.

    ``tasks["f"]`` returns a field; :meth:`subset` selects tasks. A field may also
    be a batch that indexes and moves like a tensor along its first axis (e.g. a
    :class:`~femeta.solvers.sparse.SparseBatch` of matrices).
    """

    def __init__(self, fields: Mapping[str, Tensor]):
        if not fields:
            raise ValueError("a TaskSet needs at least one field")
        rows = {name: value.shape[0] for name, value in fields.items()}
        if len(set(rows.values())) != 1:
            raise ValueError(f"all fields of a TaskSet need the same number of rows, got {rows}")
        self.fields = dict(fields)
        self._size = next(iter(rows.values()))

    def __getitem__(self, name: str) -> Tensor:
        return self.fields[name]

    def __len__(self) -> int:
        return self._size

    def subset(self, index: Tensor | slice) -> TaskSet:
        """The tasks at ``index`` (a slice, an index tensor or a boolean mask)."""
        return TaskSet({name: value[index] for name, value in self.fields.items()})

    def to(self, device: torch.device | str) -> TaskSet:
        """A copy on ``device``."""
        return TaskSet({name: value.to(device) for name, value in self.fields.items()})


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/femeta``, or ``~/.cache/femeta`` when that is unset."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "femeta"


def split_size_and_seed(name: str, seed: int, sizes: Mapping[str, int]) -> tuple[int, int]:
    """How many tasks the split ``name`` has and the seed to draw them with.

    Each split gets its own seed, derived from ``seed`` and the split's position
    in ``sizes``, so the splits are disjoint draws and each is reproducible.
    """
    if name not in sizes:
        raise ValueError(f"unknown split {name!r}; expected one of {sorted(sizes)}")
    offset = list(sizes).index(name)
    child = np.random.SeedSequence([int(seed), offset]).generate_state(1)[0]
    return sizes[name], int(child)


def stored_pattern(matrix: Any, n: int) -> tuple[SparseBatch, Tensor]:
    """The entries a serial DOLFINx ``la.MatrixCSR`` stores for its ``n`` owned rows, as an
    empty :class:`~femeta.solvers.sparse.SparseBatch` with sorted columns, and the order
    that maps the matrix's data onto that pattern (``data[:nnz][order]``)."""
    indptr, indices = matrix.indptr, matrix.indices
    nnz = int(indptr[n])
    order = torch.from_numpy(
        np.lexsort((indices[:nnz], np.repeat(np.arange(n), np.diff(indptr)[:n])))
    )
    pattern = SparseBatch(
        torch.from_numpy(indptr[: n + 1].astype(np.int64)),
        torch.from_numpy(indices[:nnz].astype(np.int64))[order],
        torch.zeros(0, nnz, dtype=torch.float64),
    )
    return pattern, order


def assemble_shared(
    assemble: Callable[[Tensor], tuple[SparseBatch, Tensor]], params: Tensor, comm: Comm
) -> tuple[SparseBatch, Tensor]:
    """``assemble(params)`` shared over the ranks of ``comm``: task ``k`` assembled on rank
    ``k mod size``, every matrix and right-hand side then sent to all ranks."""
    if comm.size == 1:
        return assemble(params)
    mine = list(range(comm.rank, len(params), comm.size))
    A, b = collective(comm, lambda: assemble(params[mine]))
    values = torch.empty(len(params), A.values.shape[1], dtype=torch.float64)
    rhs = torch.empty(len(params), b.shape[1], dtype=torch.float64)
    values[mine], rhs[mine] = A.values, b
    for task in range(len(params)):
        for row in (values[task], rhs[task]):
            comm.Bcast(row.numpy(), root=task % comm.size)
    return A.with_values(values), rhs


def petsc_system(bilinear: Any, linear: Any, bcs: list[Any]) -> tuple[Any, Any]:
    """``A`` and ``b`` of compiled forms as a DOLFINx script assembles them: PETSc AIJ with
    the Dirichlet rows and columns made identity, the conditions lifted into ``b``."""
    from dolfinx.fem import petsc
    from petsc4py import PETSc

    A = petsc.assemble_matrix(bilinear, bcs=bcs)
    A.assemble()
    b = petsc.assemble_vector(linear)
    petsc.apply_lifting(b, [bilinear], bcs=[bcs])
    b.ghostUpdate(addv=PETSc.InsertMode.ADD, mode=PETSc.ScatterMode.REVERSE)
    petsc.set_bc(b, bcs)
    return A, b
