"""A batch of sparse matrices that share one sparsity pattern.

A family of problems assembled on one mesh gives matrices with the same stored
entries and other values. :class:`SparseBatch` keeps the pattern once (CSR,
sorted columns, diagonal stored) and the values of every matrix as one
``(B, nnz)`` tensor, so memory is ``O(B nnz)`` and the solvers can walk the
pattern once for the whole batch. Entries stored as zeros stay in the pattern,
as PETSc keeps them.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch
from torch import Tensor

from femeta.solvers.base import check_finite

__all__ = ["SparseBatch"]


@dataclass(frozen=True, eq=False)
class SparseBatch:
    """``B`` square matrices in CSR form with one shared pattern.

    Attributes:
        indptr: Row starts, ``(N + 1,)`` int64.
        indices: Column of each stored entry, ``(nnz,)`` int64, sorted within a row.
        values: The entries of every matrix, ``(B, nnz)``.
    """

    indptr: Tensor
    indices: Tensor
    values: Tensor

    def __post_init__(self) -> None:
        indptr, indices, values = self.indptr, self.indices, self.values
        if indptr.dim() != 1 or indices.dim() != 1 or values.dim() != 2:
            raise ValueError(
                "a SparseBatch needs indptr (N + 1,), indices (nnz,) and values (B, nnz); got "
                f"{tuple(indptr.shape)}, {tuple(indices.shape)} and {tuple(values.shape)}"
            )
        if values.shape[1] != indices.shape[0] or int(indptr[-1]) != indices.shape[0]:
            raise ValueError(
                f"values hold {values.shape[1]} entries per matrix and indices "
                f"{indices.shape[0]}, indptr ends at {int(indptr[-1])}; they must agree"
            )
        n = indptr.shape[0] - 1
        counts = indptr.diff()
        if bool((counts < 0).any()) or (
            indices.numel() and not (int(indices.min()) >= 0 and int(indices.max()) < n)
        ):
            raise ValueError(f"indptr must not decrease and indices must lie in [0, {n})")

    @classmethod
    def from_csr(
        cls, indptr: Any, indices: Any, values: Any, *, dtype: torch.dtype = torch.float64
    ) -> SparseBatch:
        """From CSR arrays (numpy or torch); ``values`` is ``(nnz,)`` or ``(B, nnz)``.

        Columns are sorted within each row, as PETSc and scipy give them after
        ``sort_indices``; unsorted rows are sorted here.
        """
        indptr = torch.as_tensor(np.asarray(indptr), dtype=torch.int64)
        indices = torch.as_tensor(np.asarray(indices), dtype=torch.int64)
        values = torch.as_tensor(values, dtype=dtype)
        if values.dim() == 1:
            values = values[None]
        rows = torch.repeat_interleave(torch.arange(indptr.shape[0] - 1), indptr.diff())
        order = torch.argsort(rows * (indptr.shape[0] - 1) + indices, stable=True)
        if not bool((order == torch.arange(order.shape[0])).all()):
            indices, values = indices[order], values[:, order]
        return cls(indptr, indices, values.contiguous())

    @classmethod
    def from_petsc(cls, matrices: Sequence[Any]) -> SparseBatch:
        """From serial PETSc AIJ matrices with the same stored pattern (e.g. one mesh)."""
        if not matrices:
            raise ValueError("pass at least one matrix")
        indptr, indices, first = matrices[0].getValuesCSR()
        values = np.empty((len(matrices), first.shape[0]))
        values[0] = first
        for position, matrix in enumerate(matrices[1:], start=1):
            other_ptr, other_indices, data = matrix.getValuesCSR()
            if not (np.array_equal(other_ptr, indptr) and np.array_equal(other_indices, indices)):
                raise ValueError(
                    f"matrix {position} stores other entries than matrix 0; a batch shares one "
                    "pattern (assemble every matrix on the same mesh and function space)"
                )
            values[position] = data
        return cls.from_csr(indptr, indices, values)

    @classmethod
    def from_dense(cls, A: Tensor, pattern: Tensor | None = None) -> SparseBatch:
        """From dense ``(B, N, N)`` matrices, storing ``pattern`` (default: every nonzero).

        ``pattern`` is boolean ``(N, N)`` or ``(B, N, N)``; the batch stores the
        union over the tasks, and the diagonal.
        """
        if A.dim() != 3 or A.shape[1] != A.shape[2]:
            raise ValueError(f"A must have shape (B, N, N), got {tuple(A.shape)}")
        kept = (A != 0).any(dim=0) if pattern is None else pattern.reshape(-1, *A.shape[1:]).any(0)
        kept = kept.to(A.device) | torch.eye(A.shape[1], dtype=torch.bool, device=A.device)
        rows, cols = torch.nonzero(kept, as_tuple=True)  # row by row: the CSR order
        indptr = torch.zeros(A.shape[1] + 1, dtype=torch.int64, device=A.device)
        indptr[1:] = torch.bincount(rows, minlength=A.shape[1]).cumsum(0)
        return cls(indptr, cols, A[:, rows, cols].contiguous())

    @property
    def shape(self) -> tuple[int, int, int]:
        n = self.indptr.shape[0] - 1
        return (self.values.shape[0], n, n)

    @property
    def nnz(self) -> int:
        return self.indices.shape[0]

    def __len__(self) -> int:
        return self.values.shape[0]

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> SparseBatch:
        """The same batch on ``device`` with values of ``dtype``."""
        values = self.values.to(device=device, dtype=dtype)
        if values is self.values:
            return self
        return SparseBatch(self.indptr.to(values.device), self.indices.to(values.device), values)

    def __getitem__(self, index: Any) -> SparseBatch:
        """The matrices at ``index`` (an int, slice, boolean mask or index tensor)."""
        values = self.values[index]
        return self.with_values(values if values.dim() == 2 else values[None])

    def with_values(self, values: Tensor) -> SparseBatch:
        """Other matrices ``(B', nnz)`` on this pattern, sharing what was derived from it."""
        batch = SparseBatch(self.indptr, self.indices, values)
        for name in ("csr", "lower"):  # pattern-only; the block-diagonal form holds values
            if name in self.__dict__:
                batch.__dict__[name] = self.__dict__[name]
        return batch

    def transposition(self) -> Tensor:
        """Where each entry's mirror is stored: ``values[:, p]`` holds the transposes.

        Raises:
            ValueError: The pattern is not symmetric.
        """
        n = self.shape[1]
        rows = self.rows()
        key = rows * n + self.indices  # sorted: CSR with sorted columns
        mirror = self.indices * n + rows
        position = torch.searchsorted(key, mirror).clamp_max(max(self.nnz - 1, 0))
        if not bool(torch.equal(key[position], mirror)):
            raise ValueError("the pattern is not symmetric; a transpose needs other entries")
        return position

    def norms(self) -> Tensor:
        """The 1-, infinity- and Frobenius norms of each matrix, ``(B, 3)``."""
        magnitude = self.values.abs()
        columns = magnitude.new_zeros(self.shape[:2]).index_add_(1, self.indices, magnitude)
        rows = magnitude.new_zeros(self.shape[:2]).index_add_(1, self.rows(), magnitude)
        frobenius = self.values.square().sum(dim=1).sqrt()
        return torch.stack([columns.amax(dim=1), rows.amax(dim=1), frobenius], dim=1)

    def rows(self) -> Tensor:
        """The row of each stored entry, ``(nnz,)``."""
        return torch.repeat_interleave(
            torch.arange(self.shape[1], device=self.indptr.device), self.indptr.diff()
        )

    def diagonal(self) -> Tensor:
        """The diagonals, ``(B, N)``; zero where the pattern holds no diagonal entry."""
        rows = self.rows()
        on = rows == self.indices
        out = self.values.new_zeros(self.shape[:2])
        out[:, rows[on]] = self.values[:, on]
        return out

    def coupled(self) -> Tensor:
        """Whether each row has a nonzero entry off the diagonal, ``(B, N)`` (a Dirichlet
        row that assembly replaced by the identity has none)."""
        rows = self.rows()
        off = (self.values[:, rows != self.indices] != 0).to(self.values.dtype)
        counts = off.new_zeros(self.shape[:2]).index_add_(1, rows[rows != self.indices], off)
        return counts > 0

    def to_dense(self) -> Tensor:
        """The matrices as a dense ``(B, N, N)`` tensor (small systems only)."""
        out = self.values.new_zeros(self.shape)
        out[:, self.rows(), self.indices] = self.values
        return out

    def matvec(self, x: Tensor) -> Tensor:
        """``A_t x_t`` for every task; ``x`` is ``(B, N)``, or ``(B, N, k)`` for ``k`` vectors
        per task. Differentiable in ``x``."""
        if x.dim() == 2:  # a matrix-vector product, twice as fast as a one-column product
            return torch.mv(self.block_diagonal, x.reshape(-1)).reshape(x.shape)
        return (self.block_diagonal @ x.reshape(-1, x.shape[-1])).reshape(x.shape)

    @cached_property
    def block_diagonal(self) -> Tensor:
        """The batch as one block-diagonal torch CSR matrix: one sparse kernel serves all."""
        batch, n = self.shape[:2]
        count = self.nnz
        offsets = torch.arange(batch, device=self.device)[:, None]
        crow = torch.cat(
            [
                (self.indptr[:-1] + count * offsets).reshape(-1),
                self.indptr.new_full((1,), batch * count),
            ]
        )
        col = (self.indices + n * offsets).reshape(-1)
        if batch * max(count, n) < 2**31:  # 32-bit indices: the product runs 1.5-2x faster
            crow, col = crow.int(), col.int()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta", UserWarning)
            warnings.filterwarnings("ignore", "Sparse invariant checks are implicitly", UserWarning)
            return torch.sparse_csr_tensor(
                crow,
                col,
                self.values.reshape(-1),
                size=(batch * n, batch * n),
                check_invariants=False,
            )

    @cached_property
    def csr(self) -> tuple[np.ndarray, np.ndarray]:
        """``indptr`` and ``indices`` as numpy arrays, 32-bit where they fit."""
        index = np.int32 if self.nnz < 2**31 else np.int64
        return self.indptr.cpu().numpy().astype(index), self.indices.cpu().numpy().astype(index)

    @cached_property
    def lower(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The lower triangle as the ICCG kernels read it: row starts, columns, sources.

        Row ``i`` holds its entries left of the diagonal, then the diagonal;
        ``sources`` gives where each sits in ``values``. Computed once per batch.
        """
        indptr = self.indptr.cpu().numpy()
        indices = self.indices.cpu().numpy()
        n = indptr.shape[0] - 1
        rows = np.repeat(np.arange(n), np.diff(indptr))
        if not np.array_equal(np.unique(rows[rows == indices]), np.arange(n)):
            raise ValueError("the pattern does not store every diagonal entry; IC(0) needs them")
        sources = np.nonzero(indices <= rows)[0]  # sorted columns: the diagonal ends a row
        starts = np.zeros(n + 1, dtype=np.int64)
        starts[1:] = np.cumsum(np.bincount(rows[sources], minlength=n))
        index = np.int32 if self.nnz < 2**31 else np.int64  # less to read in every iteration
        return starts.astype(index), indices[sources].astype(index), sources.astype(index)

    def check_finite(self, name: str = "A") -> None:
        check_finite(name, self.values)
