"""ICCG(alpha) in PETSc (CG + ICC(0), one KSP per task) for systems that recur.

Training solves the same tasks every epoch, only at other shifts. :class:`PetscIccg`
keeps each system's PETSc matrices and KSP between calls and finds them again by
content; a new shift replaces only the preconditioning matrix's values, so PETSc
redoes only the numeric factorization. Under ``mpiexec`` it shares each call's
tasks over the ranks of a communicator (mpi4py), and every rank gets every result.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from femeta._fenics import import_dolfinx
from femeta.parallel import collective, merged
from femeta.solvers.base import check_stopping
from femeta.solvers.iccg import IccgResult, _check_alpha, _check_inputs, _check_pattern
from femeta.solvers.sparse import SparseBatch

__all__ = ["PetscIccg", "default_icc", "petsc_iccg"]

_CPU = torch.device("cpu")


def petsc_iccg(
    A: Tensor | SparseBatch,
    b: Tensor,
    alpha: Tensor | float,
    *,
    tol: float | None,
    max_iterations: int,
    pattern: Tensor | None = None,
) -> IccgResult:
    """:func:`~femeta.solvers.iccg.iccg`'s solve done by PETSc (CG + ICC(0)), one KSP per task.

    ``P = A + alpha diag(A)`` on the nonzero pattern of ``A`` (the stored entries of a
    :class:`~femeta.solvers.sparse.SparseBatch`, or ``pattern`` with explicit zeros)
    is the preconditioning matrix (``ksp.setOperators(A, P)``), with natural
    ordering, shift type ``NONE``, the unpreconditioned norm, ``rtol = tol``,
    ``atol = 0`` and a zero initial guess. PETSc flags only a zero pivot; a
    negative one surfaces in CG as an indefinite preconditioner, so both count as
    a failed factorization. For systems solved again and again, or over MPI ranks,
    use :class:`PetscIccg`.
    """
    with PetscIccg() as engine:
        return engine(A, b, alpha, tol=tol, max_iterations=max_iterations, pattern=pattern)


class PetscIccg:
    """CG + ICC(0) solves in PETSc, the same as :func:`petsc_iccg`, shared over MPI ranks.

    Call it like :func:`petsc_iccg`, or with several shifts through :meth:`many`.
    Each task's system (matrix, preconditioning matrix and KSP) is kept, the
    ``capacity`` most recently used ones, and found again in later calls by the
    digest of its CSR form, so a changed matrix is never mistaken for a kept one.

    With a communicator of several ranks (``comm``, e.g. ``MPI.COMM_WORLD`` under
    ``mpiexec``), every rank makes the same calls with the same systems; each
    system is solved by one rank (the ``k``-th system seen, by rank ``k mod size``,
    which keeps it), and every rank returns all the results. The shifts used are
    rank 0's. A solve is serial PETSc arithmetic wherever it runs, so the results
    do not depend on the number of ranks.
    """

    def __init__(self, comm: Any = None, *, capacity: int = 4096) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be an integer >= 1, got {capacity!r}")
        import_dolfinx()
        from mpi4py import MPI

        self.comm = MPI.COMM_SELF if comm is None else comm
        self.capacity = capacity
        self._keys: OrderedDict[bytes, int] = OrderedDict()
        self._next_key = 0
        self._solver = _Solver()
        self._closed = False

    def __enter__(self) -> PetscIccg:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Free the kept systems; the engine cannot solve afterwards."""
        self._closed = True
        self._solver.forget(list(self._solver.keys()))
        self._keys.clear()

    @property
    def cached(self) -> int:
        """How many systems are kept (over all ranks)."""
        return len(self._keys)

    def __call__(
        self, A: Tensor | SparseBatch, b: Tensor, alpha: Tensor | float, *, tol: float | None,
        max_iterations: int, pattern: Tensor | None = None,
    ) -> IccgResult:  # fmt: skip
        return self.many(A, b, [alpha], tol=tol, max_iterations=max_iterations, pattern=pattern)[0]

    def many(
        self, A: Tensor | SparseBatch, b: Tensor, alphas: Sequence[Tensor | float], *,
        tol: float | None,
        max_iterations: int, pattern: Tensor | None = None,
    ) -> list[IccgResult]:  # fmt: skip
        """The results of the same systems at each of ``alphas``, solved in one round.

        ``pattern`` is the sparsity pattern that ICC(0) keeps for dense ``A``, as for
        :func:`~femeta.solvers.iccg.iccg` (default: the nonzeros of ``A``); a
        :class:`~femeta.solvers.sparse.SparseBatch` keeps its stored entries.
        Collective over the engine's communicator.
        """
        if self._closed:
            raise RuntimeError("this PetscIccg is closed; create a new one to solve again")
        check_stopping(tol, max_iterations)
        if isinstance(alphas, Tensor | float | int):
            raise TypeError(
                "alphas must be a list of shifts, each a scalar or a tensor of shape (batch,); "
                "for one shift, call the engine itself"
            )
        if len(alphas) == 0:
            raise ValueError("alphas is empty; give at least one shift")
        if isinstance(A, SparseBatch) and pattern is not None:
            raise ValueError("a SparseBatch carries its pattern; pass pattern only with dense A")
        A, b, first, _ = _check_inputs(A, b, alphas[0], None, _CPU, torch.float64)
        others = [_check_alpha(alpha, len(b), _CPU, torch.float64) for alpha in alphas[1:]]
        rhs = b.numpy()
        shifts = self.comm.bcast(torch.stack([first, *others], dim=1).numpy(), root=0)
        from petsc4py import PETSc

        csr_of = _csr_forms(A, pattern, PETSc.IntType)
        forms = [csr_of(task) for task in range(len(rhs))]
        keys = [self._key(form) for form in forms]
        mine = [task for task, key in enumerate(keys) if key % self.comm.size == self.comm.rank]

        def solve_mine() -> dict[int, list[tuple[np.ndarray, int, np.ndarray, int]]]:
            jobs = [(keys[task], forms[task], rhs[task], shifts[task]) for task in mine]
            return dict(zip(mine, self._solver.solve(jobs, tol, max_iterations), strict=True))

        outcomes = merged(self.comm, collective(self.comm, solve_mine))
        forget = []
        while len(self._keys) > self.capacity:
            forget.append(self._keys.popitem(last=False)[1])
        self._solver.forget(forget)
        return [
            _assemble([outcomes[task][k] for task in range(len(rhs))], rhs, tol, max_iterations)
            for k in range(len(alphas))
        ]

    def _key(self, csr: tuple[np.ndarray, np.ndarray, np.ndarray]) -> int:
        """The key of the system ``csr``: its kept key, or a new one."""
        digest = hashlib.blake2b(digest_size=20)
        for array in csr:
            digest.update(np.ascontiguousarray(array).view(np.uint8))
        name = digest.digest()
        if name not in self._keys:
            self._keys[name] = self._next_key
            self._next_key += 1
        self._keys.move_to_end(name)
        return self._keys[name]


def _csr_forms(
    A: Tensor | SparseBatch, pattern: Tensor | None, index_type: Any
) -> Callable[[int], tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Each task's ``A`` in CSR form (PETSc's index type) on the entries ICC(0) keeps:
    a :class:`SparseBatch`'s stored ones, or dense ``A``'s ``pattern`` (default: its
    nonzeros), explicit zeros included."""
    if isinstance(A, SparseBatch):
        indptr, indices = A.indptr.numpy().astype(index_type), A.indices.numpy().astype(index_type)
        values = A.values.numpy()
        return lambda task: (indptr, indices, values[task])
    kept = _check_pattern(pattern, A)
    dense = A.numpy()
    masks = dense != 0 if kept is None else kept.numpy()
    n = dense.shape[1]

    def csr_of(task: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rows, columns = np.nonzero(masks[task])
        indptr = np.searchsorted(rows, np.arange(n + 1)).astype(index_type)
        return indptr, columns.astype(index_type), dense[task][rows, columns]

    return csr_of


def _assemble(
    outcomes: list[tuple[np.ndarray, int, np.ndarray, int]],
    rhs: np.ndarray,
    tol: float | None,
    max_iterations: int,
) -> IccgResult:
    """The :class:`IccgResult` of per-task ``(x, iterations, residual norms, reason)``."""
    from petsc4py import PETSc

    reasons = PETSc.KSP.ConvergedReason
    failures = {reasons.DIVERGED_PCSETUP_FAILED, reasons.DIVERGED_INDEFINITE_PC}
    batch, n = rhs.shape
    history = np.zeros((batch, max_iterations + 1))
    x = np.zeros((batch, n))
    iterations = np.zeros(batch, dtype=np.int64)
    converged = np.zeros(batch, dtype=bool)
    failed = np.zeros(batch, dtype=bool)
    scales = np.linalg.norm(rhs, axis=1)
    for task, (solution, count, norms, reason) in enumerate(outcomes):
        if reason in failures:
            failed[task] = True
            iterations[task] = max_iterations
            history[task] = 1.0
        else:
            iterations[task] = count
            converged[task] = tol is not None and reason > 0
            history[task, : len(norms)] = norms / scales[task]
            x[task] = solution
    longest = int(iterations.max(initial=0)) + 1
    return IccgResult(
        torch.from_numpy(x),
        torch.from_numpy(iterations),
        torch.from_numpy(history[:, :longest]).contiguous(),
        torch.from_numpy(converged),
        torch.from_numpy(failed),
    )


class _Solver:
    """The KSP solves of one process, with a KSP kept for each system it has been given.

    A kept KSP solves at a new shift after its preconditioning matrix's values are
    replaced in place: PETSc then redoes only the numeric factorization, and the
    results are those of a KSP made anew.
    """

    def __init__(self) -> None:
        self._systems: dict[int, _Kept] = {}

    def keys(self) -> list[int]:
        return list(self._systems)

    def forget(self, keys: Iterable[int]) -> None:
        for key in keys:
            kept = self._systems.pop(key, None)
            if kept is not None:
                kept.destroy()

    def solve(
        self, jobs: list[tuple[int, Any, np.ndarray, np.ndarray]], tol: float | None,
        max_iterations: int,
    ) -> list[list[tuple[np.ndarray, int, np.ndarray, int]]]:  # fmt: skip
        """``(x, iterations, residual norms, reason)`` at each shift of each
        ``(key, csr, rhs, alphas)``; a key given before keeps its system.

        ``P = A + alpha diag(A)`` on the stored entries of ``A`` (explicit zeros
        included) is the preconditioning matrix, with natural ordering, shift type
        ``NONE``, the unpreconditioned norm, ``rtol = tol``, ``atol = 0`` and a zero initial
        guess. Options are set through the API under a per-KSP prefix; the global
        options database is never touched.
        """
        outcomes = []
        for key, csr, rhs, alphas in jobs:
            if key not in self._systems:
                self._systems[key] = _Kept(key, csr)
            kept = self._systems[key]
            outcomes.append([kept.solve(rhs, alpha, tol, max_iterations) for alpha in alphas])
        return outcomes


class _Kept:
    """One system's matrix, preconditioning matrix, KSP and vectors."""

    def __init__(self, key: int, csr: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
        from petsc4py import PETSc

        indptr, indices, data = csr
        self.csr = (indptr, indices, data.copy())
        n = len(indptr) - 1
        self.on_diagonal = np.repeat(np.arange(n), np.diff(indptr)) == indices
        self.matrix = _aij(csr)
        self.preconditioning = _aij(csr)
        self.ksp = _cg_icc(f"femeta_iccg_{key}_", self.matrix, self.preconditioning)
        pc = self.ksp.getPC()
        pc.setFactorLevels(0)
        pc.setFactorOrdering(PETSc.Mat.OrderingType.NATURAL)
        pc.setFactorShift(PETSc.Mat.FactorShiftType.NONE, 0.0)
        self.solution, self.right = self.matrix.createVecs()

    def solve(
        self, rhs: np.ndarray, alpha: float, tol: float | None, max_iterations: int
    ) -> tuple[np.ndarray, int, np.ndarray, int]:
        indptr, indices, data = self.csr
        shifted = data.copy()
        shifted[self.on_diagonal] += alpha * data[self.on_diagonal]
        self.preconditioning.setValuesCSR(indptr, indices, shifted)
        self.preconditioning.assemble()
        self.ksp.setTolerances(rtol=0.0 if tol is None else tol, atol=0.0, max_it=max_iterations)
        self.ksp.setConvergenceHistory(length=max_iterations + 1, reset=True)
        self.right.setArray(rhs)
        self.ksp.solve(self.right, self.solution)
        return (
            self.solution.getArray().copy(),
            self.ksp.getIterationNumber(),
            np.array(self.ksp.getConvergenceHistory()),
            int(self.ksp.getConvergedReason()),
        )

    def destroy(self) -> None:
        for item in (self.ksp, self.solution, self.right, self.preconditioning, self.matrix):
            item.destroy()


def _aij(csr: tuple[np.ndarray, np.ndarray, np.ndarray]) -> Any:
    """A serial PETSc AIJ matrix that stores exactly the entries of ``csr`` (zeros too)."""
    from mpi4py import MPI
    from petsc4py import PETSc

    n = len(csr[0]) - 1
    return PETSc.Mat().createAIJ((n, n), csr=csr, comm=MPI.COMM_SELF)


def _cg_icc(prefix: str, matrix: Any, preconditioning: Any) -> Any:
    """A serial KSP: CG on the unpreconditioned residual, ICC of ``preconditioning``.

    Options are set through the API under ``prefix``; the global options database
    is never touched. There is no divergence test, as in femeta's torch solvers: on
    slender beams the residual grows 10^4-fold before it falls, and a solve that
    stopped there would look shorter to the loss than one that ran to the cap.
    """
    from mpi4py import MPI
    from petsc4py import PETSc

    ksp = PETSc.KSP().create(MPI.COMM_SELF)
    ksp.setOptionsPrefix(prefix)
    ksp.setOperators(matrix, preconditioning)
    ksp.setType(PETSc.KSP.Type.CG)
    ksp.setNormType(PETSc.KSP.NormType.UNPRECONDITIONED)
    ksp.setTolerances(divtol=PETSc.UNLIMITED)
    ksp.getPC().setType(PETSc.PC.Type.ICC)
    return ksp


def default_icc(
    A: Tensor | SparseBatch, b: Tensor, *, tol: float | None, max_iterations: int,
    pattern: Tensor | None = None, comm: Any = None,
) -> IccgResult:  # fmt: skip
    """CG + PETSc's ICC(0) of ``A`` with PETSc's default shift, one KSP per task.

    What a FEniCS script gets from ``-ksp_type cg -pc_type icc``: ICC's levels,
    ordering and shift type are left at PETSc's defaults (shift type
    ``POSITIVE_DEFINITE``, which shifts the diagonal only as far as a breakdown
    needs), on ``A`` itself. The rest is as in :class:`PetscIccg`: ``A`` stores the
    entries of ``pattern`` (explicit zeros included; default: the nonzeros of
    ``A``) or of its :class:`~femeta.solvers.sparse.SparseBatch`, the
    unpreconditioned norm, ``rtol = tol``, ``atol = 0`` and a zero initial guess.
    ``factorization_failed`` flags a breakdown that the shift did not prevent.
    With ``comm`` (collective), task ``k`` is solved on rank ``k mod size`` and every
    rank gets every result.
    """
    check_stopping(tol, max_iterations)
    if isinstance(A, SparseBatch) and pattern is not None:
        raise ValueError("a SparseBatch carries its pattern; pass pattern only with dense A")
    A, b, _, _ = _check_inputs(A, b, 1.0, None, _CPU, torch.float64)
    rhs = b.numpy()
    import_dolfinx()
    from mpi4py import MPI
    from petsc4py import PETSc

    comm = MPI.COMM_SELF if comm is None else comm
    csr_of = _csr_forms(A, pattern, PETSc.IntType)

    def solve(task: int) -> tuple[np.ndarray, int, np.ndarray, int]:
        matrix = _aij(csr_of(task))
        ksp = _cg_icc(f"femeta_default_icc_{task}_", matrix, matrix)
        ksp.setTolerances(rtol=0.0 if tol is None else tol, atol=0.0, max_it=max_iterations)
        ksp.setConvergenceHistory(length=max_iterations + 1, reset=True)
        solution, right = matrix.createVecs()
        right.setArray(rhs[task])
        ksp.solve(right, solution)
        outcome = (
            solution.getArray().copy(),
            ksp.getIterationNumber(),
            np.array(ksp.getConvergenceHistory()),
            int(ksp.getConvergedReason()),
        )
        for item in (ksp, solution, right, matrix):
            item.destroy()
        return outcome

    mine = range(comm.rank, len(rhs), comm.size)
    outcomes = merged(comm, collective(comm, lambda: {task: solve(task) for task in mine}))
    return _assemble([outcomes[task] for task in range(len(rhs))], rhs, tol, max_iterations)
