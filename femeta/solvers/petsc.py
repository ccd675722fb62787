"""ICCG(alpha) in PETSc (CG + ICC(0), one KSP per task) for systems that recur.

Training solves the same tasks every epoch, only at other shifts. :class:`PetscIccg`
keeps each system's CSR form, PETSc matrices and KSP between calls and finds them
again by content; a new shift replaces only the preconditioning matrix's values, so
PETSc redoes only the numeric factorization. It can spread a call's solves over
worker processes, which take parts of the queue as they finish. A solve does the
same arithmetic wherever it runs, so the results do not depend on ``workers``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import traceback
import weakref
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from femeta._fenics import import_dolfinx
from femeta.solvers.base import check_stopping
from femeta.solvers.iccg import IccgResult, _check_alpha, _check_inputs, _check_pattern
from femeta.solvers.sparse import SparseBatch

__all__ = ["PetscIccg", "default_icc", "petsc_iccg"]

# Variables through which a process finds its MPI launcher. A worker drops them, so
# that its MPI starts as a singleton instead of joining the parent's job.
_LAUNCHER_VARIABLES = ("PMI_", "PMIX_", "OMPI_", "HYDRA_", "HYDI_", "MPIR_")
# A worker: import this module from the parent's femeta and serve on the given socket.
_WORKER = (
    "import sys; sys.path.insert(0, sys.argv[1]); "
    "from femeta.solvers.petsc import _serve; _serve(int(sys.argv[2]))"
)
_CPU = torch.device("cpu")
# A generous bound on what a job adds to a part's message beside its arrays.
_JOB_BYTES = 512


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
    a failed factorization. For systems solved again and again, or over several
    processes, use :class:`PetscIccg`.
    """
    with PetscIccg() as engine:
        return engine(A, b, alpha, tol=tol, max_iterations=max_iterations, pattern=pattern)


@dataclass(frozen=True)
class _System:
    """One task's ``A`` in CSR form (PETSc's index type), known to solvers by ``key``.

    The CSR form stores the entries of a ``kept`` mask (the nonzeros, or a given
    pattern with explicit zeros), which ICC(0) keeps.
    """

    key: int
    indptr: np.ndarray
    indices: np.ndarray
    data: np.ndarray
    # Where ``data`` sits in the flattened dense matrix, to check a cached system
    # (``None`` for a system given in CSR form).
    positions: np.ndarray | None

    @classmethod
    def from_dense(cls, key: int, dense: np.ndarray, kept: np.ndarray, index_type: Any) -> _System:
        n = dense.shape[0]
        rows, columns = np.nonzero(kept)
        return cls(
            key,
            np.searchsorted(rows, np.arange(n + 1)).astype(index_type),
            columns.astype(index_type),
            dense[rows, columns],
            rows * n + columns,
        )

    @classmethod
    def from_csr(
        cls, key: int, indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, index_type: Any
    ) -> _System:
        return cls(key, indptr.astype(index_type), indices.astype(index_type), data.copy(), None)

    @property
    def csr(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.indptr, self.indices, self.data

    def matches(self, dense: np.ndarray, kept: np.ndarray) -> bool:
        """Whether ``dense``, stored on the mask ``kept``, is this very matrix."""
        return (
            self.positions is not None
            and np.count_nonzero(kept) == self.data.size
            and bool(kept.reshape(-1)[self.positions].all())
            and np.array_equal(dense.reshape(-1)[self.positions], self.data)
        )

    def matches_csr(self, indptr: np.ndarray, indices: np.ndarray, data: np.ndarray) -> bool:
        """Whether the CSR matrix ``(indptr, indices, data)`` is this very matrix."""
        return (
            self.positions is None
            and np.array_equal(indptr, self.indptr)
            and np.array_equal(indices, self.indices)
            and np.array_equal(data, self.data)
        )


class PetscIccg:
    """CG + ICC(0) solves in PETSc, the same as :func:`petsc_iccg`.

    Call it like :func:`petsc_iccg`, or with several shifts
    through :meth:`many`. Each task's system is kept (the ``capacity`` most
    recently used ones) and recognised in later calls by its right-hand side and
    diagonal, then checked entry by entry, so a changed matrix is never mistaken
    for a kept one. With ``workers > 1``, that many processes share each call's
    tasks (this one and ``workers - 1`` others, started on the first call); each
    keeps the systems it has been sent. :meth:`close`
    stops them; so does leaving a ``with`` block, the end of the program, or an
    error during a call (the engine is closed then).
    """

    def __init__(self, workers: int = 1, *, capacity: int = 4096) -> None:
        for name, value in (("workers", workers), ("capacity", capacity)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        self.workers = workers
        self.capacity = capacity
        self._systems: OrderedDict[bytes, _System] = OrderedDict()
        self._next_key = 0
        self._forget: list[int] = []
        self._local = _Solver()
        self._children: list[_Child] = []
        self._closed = False
        self._finalizer = weakref.finalize(self, _stop_children, self._children)

    def __enter__(self) -> PetscIccg:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the worker processes; the engine cannot solve afterwards."""
        self._closed = True
        self._finalizer()

    @property
    def cached(self) -> int:
        """How many systems are kept."""
        return len(self._systems)

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

        Each system is looked up once, and the processes share all the solves.
        ``pattern`` is the sparsity pattern that ICC(0) keeps for dense ``A``, as for
        :func:`~femeta.solvers.iccg.iccg` (default: the nonzeros of ``A``); a
        :class:`~femeta.solvers.sparse.SparseBatch` keeps its stored entries.
        """
        if self._closed:
            raise RuntimeError(
                "this PetscIccg is closed (by close() or by an error in an earlier call); "
                "create a new one to solve again"
            )
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
        shifts = torch.stack([first, *others], dim=1).numpy()
        import_dolfinx()
        from petsc4py import PETSc

        if isinstance(A, SparseBatch):
            indptr, indices, values = A.indptr.numpy(), A.indices.numpy(), A.values.numpy()
            diagonal = A.diagonal().numpy()

            def system_of(task: int) -> _System:
                return self._find_csr(
                    indptr, indices, values[task], diagonal[task], rhs[task], PETSc.IntType
                )
        else:
            kept = _check_pattern(pattern, A)
            dense = A.numpy()
            masks = dense != 0 if kept is None else kept.numpy()

            def system_of(task: int) -> _System:
                return self._find(dense[task], masks[task], rhs[task], PETSc.IntType)

        self._start()
        forget, self._forget = self._forget, []
        self._local.forget(forget)
        for child in self._children:
            child.forget(forget)
        batch = rhs.shape[0]
        tasks = deque(range(batch))
        outcomes: dict[int, list[tuple[np.ndarray, int, np.ndarray, int]]] = {}

        def feed(child: _Child) -> None:
            """Send ``child`` parts of the queue's front until it holds two: smaller parts
            as the queue runs out. While it holds one, a part stays within ``child.room``
            (so it has no new systems): the busy worker may be blocked writing its
            answer, and this process, blocked writing to it, would never read that answer.
            """
            while tasks and len(child.pending) < 2:
                size = -(-len(tasks) // (4 * self.workers))
                part, jobs, load = [], [], 8 * len(child.dropped)
                while tasks and len(part) < size:
                    task = tasks[0]
                    system = system_of(task)
                    new = system.key not in child.known
                    load += _JOB_BYTES + rhs[task].nbytes + shifts[task].nbytes
                    if child.pending and (new or load > child.room):
                        break
                    tasks.popleft()
                    child.known.add(system.key)
                    part.append(task)
                    jobs.append((system.key, system.csr if new else None, rhs[task], shifts[task]))
                if not part:
                    return
                child.send(part, (tol, max_iterations, jobs))

        try:
            # Each worker holds up to two parts, so that it need not wait for the next;
            # this process solves one task at a time from the other end of the queue.
            while tasks:
                for child in self._children:
                    while child.pending and child.ready():
                        outcomes.update(child.receive())
                    feed(child)
                if tasks:
                    task = tasks.pop()
                    system = system_of(task)
                    job = (system.key, system.csr, rhs[task], shifts[task])
                    (outcomes[task],) = self._local.solve([job], tol, max_iterations)
            for child in self._children:
                while child.pending:
                    outcomes.update(child.receive())
            while len(self._systems) > self.capacity:
                self._forget.append(self._systems.popitem(last=False)[1].key)
        except BaseException:
            self.close()  # a worker may still owe its reply: no later call may read it
            raise
        return [
            _assemble([outcomes[task][k] for task in range(batch)], rhs, tol, max_iterations)
            for k in range(len(alphas))
        ]

    def _start(self) -> None:
        while len(self._children) < self.workers - 1:
            self._children.append(_Child())

    def _find(
        self, dense: np.ndarray, kept: np.ndarray, rhs: np.ndarray, index_type: Any
    ) -> _System:
        """The kept system of one task, made (and kept) where there is none or it differs.

        Systems beyond ``capacity`` are dropped by the caller once the call's are found.
        """
        name = rhs.tobytes() + np.diagonal(dense).tobytes()
        system = self._systems.get(name)
        if system is None or not system.matches(dense, kept):
            if system is not None:
                self._forget.append(system.key)
            system = _System.from_dense(self._next_key, dense, kept, index_type)
            self._next_key += 1
            self._systems[name] = system
        self._systems.move_to_end(name)
        return system

    def _find_csr(
        self, indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, diagonal: np.ndarray,
        rhs: np.ndarray, index_type: Any,
    ) -> _System:  # fmt: skip
        """:meth:`_find` for a matrix in CSR form."""
        name = rhs.tobytes() + diagonal.tobytes()
        system = self._systems.get(name)
        if system is None or not system.matches_csr(indptr, indices, data):
            if system is not None:
                self._forget.append(system.key)
            system = _System.from_csr(self._next_key, indptr, indices, data, index_type)
            self._next_key += 1
            self._systems[name] = system
        self._systems.move_to_end(name)
        return system


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

    def forget(self, keys: list[int]) -> None:
        for key in keys:
            kept = self._systems.pop(key, None)
            if kept is not None:
                kept.destroy()

    def solve(
        self, jobs: list[tuple[int, Any, np.ndarray, np.ndarray]], tol: float | None,
        max_iterations: int,
    ) -> list[list[tuple[np.ndarray, int, np.ndarray, int]]]:  # fmt: skip
        """``(x, iterations, residual norms, reason)`` at each shift of each
        ``(key, csr, rhs, alphas)``; ``csr`` may be ``None`` for a system given before.

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

        indptr, indices, _ = self.csr = csr
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
    is never touched.
    """
    from mpi4py import MPI
    from petsc4py import PETSc

    ksp = PETSc.KSP().create(MPI.COMM_SELF)
    ksp.setOptionsPrefix(prefix)
    ksp.setOperators(matrix, preconditioning)
    ksp.setType(PETSc.KSP.Type.CG)
    ksp.setNormType(PETSc.KSP.NormType.UNPRECONDITIONED)
    ksp.getPC().setType(PETSc.PC.Type.ICC)
    return ksp


def default_icc(
    A: Tensor | SparseBatch, b: Tensor, *, tol: float | None, max_iterations: int,
    pattern: Tensor | None = None,
) -> IccgResult:  # fmt: skip
    """CG + PETSc's ICC(0) of ``A`` with PETSc's default shift, one KSP per task, serial.

    What a FEniCS script gets from ``-ksp_type cg -pc_type icc``: ICC's levels,
    ordering and shift type are left at PETSc's defaults (shift type
    ``POSITIVE_DEFINITE``, which shifts the diagonal only as far as a breakdown
    needs), on ``A`` itself. The rest is as in :class:`PetscIccg`: ``A`` stores the
    entries of ``pattern`` (explicit zeros included; default: the nonzeros of
    ``A``) or of its :class:`~femeta.solvers.sparse.SparseBatch`, the
    unpreconditioned norm, ``rtol = tol``, ``atol = 0`` and a zero initial guess.
    ``factorization_failed`` flags a breakdown that the shift did not prevent.
    """
    check_stopping(tol, max_iterations)
    if isinstance(A, SparseBatch) and pattern is not None:
        raise ValueError("a SparseBatch carries its pattern; pass pattern only with dense A")
    A, b, _, _ = _check_inputs(A, b, 1.0, None, _CPU, torch.float64)
    rhs = b.numpy()
    import_dolfinx()
    from petsc4py import PETSc

    if isinstance(A, SparseBatch):
        indptr, indices = A.indptr.numpy(), A.indices.numpy()

        def system_of(task: int) -> _System:
            return _System.from_csr(task, indptr, indices, A.values[task].numpy(), PETSc.IntType)
    else:
        kept = _check_pattern(pattern, A)
        dense = A.numpy()
        masks = dense != 0 if kept is None else kept.numpy()

        def system_of(task: int) -> _System:
            return _System.from_dense(task, dense[task], masks[task], PETSc.IntType)

    outcomes = []
    for task in range(len(rhs)):
        matrix = _aij(system_of(task).csr)
        ksp = _cg_icc(f"femeta_default_icc_{task}_", matrix, matrix)
        ksp.setTolerances(rtol=0.0 if tol is None else tol, atol=0.0, max_it=max_iterations)
        ksp.setConvergenceHistory(length=max_iterations + 1, reset=True)
        solution, right = matrix.createVecs()
        right.setArray(rhs[task])
        ksp.solve(right, solution)
        outcomes.append((
            solution.getArray().copy(),
            ksp.getIterationNumber(),
            np.array(ksp.getConvergenceHistory()),
            int(ksp.getConvergedReason()),
        ))  # fmt: skip
        for item in (ksp, solution, right, matrix):
            item.destroy()
    return _assemble(outcomes, rhs, tol, max_iterations)


class _Child:
    """A worker process and the systems it has been sent."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair()
        # A part sent while the worker is busy stays under a quarter of the buffer.
        self.room = ours.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) // 4
        environment = {
            name: value
            for name, value in os.environ.items()
            if not name.startswith(_LAUNCHER_VARIABLES)
        }
        package_root = str(Path(__file__).resolve().parents[2])
        with theirs:
            self.process = subprocess.Popen(
                [sys.executable, "-c", _WORKER, package_root, str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                env=environment,
            )
        self.connection = Connection(ours.detach())
        self.known: set[int] = set()
        # The tasks of each part sent and not yet answered, oldest first.
        self.pending: deque[list[int]] = deque()
        # Keys dropped here and not yet sent to the worker.
        self.dropped: list[int] = []

    def forget(self, keys: list[int]) -> None:
        """Drop ``keys``; the worker drops them with the next part it is sent."""
        self.known.difference_update(keys)
        self.dropped.extend(keys)

    def send(self, part: list[int], message: tuple[Any, ...]) -> None:
        """Send the jobs of the tasks ``part``, with the keys to drop first."""
        forget, self.dropped = self.dropped, []
        try:
            self.connection.send((forget, *message))
        except OSError as err:
            raise self._died() from err
        self.pending.append(part)

    def ready(self) -> bool:
        """Whether the answer to the oldest part has arrived."""
        try:
            return self.connection.poll()
        except (EOFError, OSError) as err:
            raise self._died() from err

    def receive(self) -> dict[int, Any]:
        """The outcomes of the oldest part, by task."""
        try:
            status, payload = self.connection.recv()
        except (EOFError, OSError) as err:
            raise self._died() from err
        if status == "error":
            raise RuntimeError(f"a PETSc worker process failed:\n{payload}")
        return dict(zip(self.pending.popleft(), payload, strict=True))

    def _died(self) -> RuntimeError:
        try:
            code = self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:  # it hung up but did not exit
            self.process.kill()
            code = self.process.wait()
        return RuntimeError(
            f"a PETSc worker process (pid {self.process.pid}) exited with code {code}; "
            "its solves are lost. Check its error output above, or pass workers=1"
        )

    def stop(self) -> None:
        self.connection.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _stop_children(children: list[_Child]) -> None:
    while children:
        children.pop().stop()


def _serve(descriptor: int) -> None:
    """A worker's loop: solve each message's jobs until the parent hangs up.

    Ctrl-C reaches the whole process group; the parent handles it and hangs up.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import_dolfinx()
    connection = Connection(descriptor)
    solver = _Solver()
    while True:
        try:
            forget, tol, max_iterations, jobs = connection.recv()
        except (EOFError, OSError):
            return
        try:
            solver.forget(forget)
            reply = ("ok", solver.solve(jobs, tol, max_iterations))
        except Exception:
            reply = ("error", traceback.format_exc())
        try:
            connection.send(reply)
        except OSError:  # the parent stopped waiting for this reply
            return
