"""Use a trained shift in a DOLFINx script: CG + ICC(0) on ``A + alpha diag(A)``, guarded.

Two or three lines in a script that already has a KSP::

    model = femeta.load("runs/beam")
    solver = femeta.fenics.configure(ksp, model, W=0.1, lambda_=1.25, mu=1.0, rho=1.0)
    report = solver.solve(b, x)          # instead of ksp.solve(b, x)

or :class:`LinearProblem` in place of ``dolfinx.fem.petsc.LinearProblem``.

The preconditioner is IC(0) of ``P = A + alpha diag(A)`` on the entries the
matrix stores, with shift type ``NONE`` (serial), or block Jacobi with that
IC(0) on each process's diagonal block (parallel). CG monitors the
unpreconditioned residual ``||b - A x||``, the quantity the model was trained
on; the KSP's tolerances and iteration limit stay the user's. The exception is
PETSc's default divergence test (``divtol`` 1e4), which is turned off: on
ill-conditioned systems (slender beams at 10^5 unknowns) the unpreconditioned
residual grows 10^4-fold before it falls, and CG with an SPD preconditioner
does not diverge; a ``divtol`` the user set is kept. Everything is set through
petsc4py on the KSP itself: the global options database is never touched.

The solve is guarded: if IC(0) breaks down (a zero or negative pivot), the
shift is multiplied by ``growth`` and the solve retried, up to ``retries``
times; if a solve still fails, or runs out of iterations, it is done again
with what PETSc does by default, ICC(0) of ``A`` with PETSc's default shift
(``POSITIVE_DEFINITE``). A solve the default would have made is never lost.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from femeta._fenics import import_dolfinx
from femeta.family_file import FamilyError, import_family, statistic_values
from femeta.model import Model

import_dolfinx()
import dolfinx.fem.petsc  # noqa: E402
import numpy as np  # noqa: E402
from mpi4py import MPI  # noqa: E402
from petsc4py import PETSc  # noqa: E402

__all__ = [
    "Attempt",
    "LinearProblem",
    "ShiftedICC",
    "SolveReport",
    "configure",
    "matrix_statistics",
    "reason_name",
    "set_icc",
]

logger = logging.getLogger("femeta")
# Reasons after which a larger shift is the cure: IC(0) met a zero or a negative pivot.
_BREAKDOWNS = ("DIVERGED_PCSETUP_FAILED", "DIVERGED_INDEFINITE_PC")
# The statistics of A computed here; others are a family file's own (its STATISTICS).
_BUILT_IN = ("norm_1", "norm_inf", "norm_fro", "diag_min", "diag_max")
_REASONS = {
    int(getattr(PETSc.KSP.ConvergedReason, name)): name
    for name in dir(PETSc.KSP.ConvergedReason)
    if name.isupper()
}


@dataclass(frozen=True)
class Attempt:
    """One KSP solve of a guarded solve.

    Attributes:
        alpha: The relative shift of IC(0), or ``None`` for PETSc's default ICC.
        reason: PETSc's converged reason, by name (e.g. ``"CONVERGED_RTOL"``).
        iterations: CG iterations of this solve.
        seconds: Its wall time (preconditioner set-up included).
    """

    alpha: float | None
    reason: str
    iterations: int
    seconds: float

    @property
    def converged(self) -> bool:
        return self.reason.startswith("CONVERGED")


@dataclass(frozen=True)
class SolveReport:
    """What a guarded solve did: its attempts, in order; the last one gave ``x``."""

    attempts: tuple[Attempt, ...]

    @property
    def converged(self) -> bool:
        return self.attempts[-1].converged

    @property
    def iterations(self) -> int:
        """Iterations of the solve that gave ``x``."""
        return self.attempts[-1].iterations

    @property
    def total_iterations(self) -> int:
        """Iterations of all attempts."""
        return sum(attempt.iterations for attempt in self.attempts)

    @property
    def seconds(self) -> float:
        return sum(attempt.seconds for attempt in self.attempts)

    @property
    def alpha(self) -> float | None:
        """The shift that gave ``x`` (``None``: PETSc's default ICC)."""
        return self.attempts[-1].alpha

    @property
    def fell_back(self) -> bool:
        """Whether ``x`` comes from PETSc's default instead of a learned shift."""
        return self.attempts[-1].alpha is None

    def __str__(self) -> str:
        def shift(alpha: float | None) -> str:
            return "PETSc's default shift" if alpha is None else f"alpha = {alpha:.4g}"

        last = self.attempts[-1]
        line = f"{shift(last.alpha)}: {last.reason} after {last.iterations} iterations"
        if len(self.attempts) > 1:
            earlier = "; ".join(
                f"{shift(a.alpha)}: {a.reason} after {a.iterations}" for a in self.attempts[:-1]
            )
            line += f" (before: {earlier})"
        return line


def reason_name(code: int) -> str:
    """The name of a KSP converged reason (e.g. ``"CONVERGED_RTOL"``)."""
    return _REASONS.get(int(code), str(code))


class ShiftedICC:
    """A KSP set up as CG + ICC(0) on ``A + alpha diag(A)``, with a guarded :meth:`solve`.

    Other attributes are the KSP's (``solver.getIterationNumber()`` and so on),
    so it can stand in for the KSP. Build it with :func:`configure`.

    Args:
        ksp: A KSP whose operators are set; its type must be CG or unset.
        alpha: The relative shift, a positive finite number, the same on every process.
        retries: How many larger shifts to try after IC(0) breaks down.
        growth: The factor by which each retry enlarges the shift.
    """

    def __init__(self, ksp: PETSc.KSP, alpha: float, *, retries: int = 3, growth: float = 10.0):
        _check_is_ksp(ksp)
        _collective(ksp.comm, lambda: _check_ksp(ksp))
        _collective(ksp.comm, lambda: _check_guard(alpha, retries, growth))
        self.ksp = ksp
        self.alpha = float(ksp.comm.tompi4py().bcast(float(alpha), root=0))
        self.retries, self.growth = retries, growth
        self.report: SolveReport | None = None
        self._A, _ = ksp.getOperators()
        self._P: PETSc.Mat | None = None
        ksp.setType(PETSc.KSP.Type.CG)
        ksp.setNormType(PETSc.KSP.NormType.UNPRECONDITIONED)
        if ksp.getTolerances()[2] == _default_divtol():
            ksp.setTolerances(divtol=PETSc.UNLIMITED)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.ksp, name)

    def solve(self, b: PETSc.Vec, x: PETSc.Vec) -> SolveReport:
        """Solve ``A x = b`` with the learned shift, retrying and falling back as needed.

        ``A`` is the KSP's operator now (its values may change between solves, as
        when a problem is reassembled, or another matrix may have been set). A
        nonzero initial guess (``ksp.setInitialGuessNonzero(True)``) is restored
        before every attempt. The report is also kept as :attr:`report`
        and logged in one line (logger ``"femeta"``, by the first process).
        """
        A, _ = self.ksp.getOperators()
        if A.handle != self._A.handle:  # the caller set another matrix since the last solve
            self._A = A
            self.destroy()
        guess = x.copy() if self.ksp.getInitialGuessNonzero() else None
        attempts: list[Attempt] = []
        alpha = self.alpha
        for _ in range(self.retries + 1):
            attempts.append(self._attempt(b, x, guess, alpha))
            if attempts[-1].converged or attempts[-1].reason not in _BREAKDOWNS:
                break
            alpha *= self.growth
        if not attempts[-1].converged:
            attempts.append(self._attempt(b, x, guess, None))
        if guess is not None:
            guess.destroy()
        self.report = SolveReport(tuple(attempts))
        if self.ksp.comm.getRank() == 0:
            level = logging.INFO if len(attempts) == 1 else logging.WARNING
            logger.log(level, "femeta ICCG: %s", self.report)
        return self.report

    def _attempt(
        self, b: PETSc.Vec, x: PETSc.Vec, guess: PETSc.Vec | None, alpha: float | None
    ) -> Attempt:
        start = time.perf_counter()
        if alpha is None:
            self.ksp.setOperators(self._A, self._A)
            set_icc(self.ksp, default_shift=True)
        else:
            self.ksp.setOperators(self._A, self.shifted_matrix(alpha))
            set_icc(self.ksp, default_shift=False)
        if guess is not None:
            guess.copy(x)
        self.ksp.solve(b, x)
        reason = int(self.ksp.getConvergedReason())
        return Attempt(
            alpha,
            reason_name(reason),
            self.ksp.getIterationNumber(),
            time.perf_counter() - start,
        )

    def shifted_matrix(self, alpha: float) -> PETSc.Mat:
        """``P = A + alpha diag(A)`` on the entries ``A`` stores, explicit zeros included."""
        if self._P is None:
            self._P = self._A.duplicate(copy=True)
        else:
            self._A.copy(self._P, structure=PETSc.Mat.Structure.SAME_NONZERO_PATTERN)
        diagonal = self._A.getDiagonal()
        shifted = diagonal.copy()
        # d + alpha d, rounded as femeta's solvers round it ((1 + alpha) d differs in the
        # last bit, which moves CG by a few iterations on ill-conditioned systems).
        shifted.scale(alpha)
        shifted.axpy(1.0, diagonal)
        self._P.setDiagonal(shifted, addv=PETSc.InsertMode.INSERT_VALUES)
        shifted.destroy()
        diagonal.destroy()
        return self._P

    def destroy(self) -> None:
        """Free the preconditioning matrix (the KSP stays the caller's)."""
        if self._P is not None:
            self._P.destroy()
            self._P = None


def _default_divtol() -> float:
    """PETSc's divergence tolerance of a KSP nobody set one on."""
    ksp = PETSc.KSP().create(PETSc.COMM_SELF)
    divtol = ksp.getTolerances()[2]
    ksp.destroy()
    return divtol


def set_icc(ksp: PETSc.KSP, *, default_shift: bool) -> None:
    """Make ``ksp``'s PC ICC(0), or block Jacobi with ICC(0) blocks in parallel.

    A fresh PC resets what an earlier set-up left; ``default_shift`` keeps
    PETSc's default shift type, else it is ``NONE``. The operators must be set.
    """
    pc = ksp.getPC()
    pc.setType(PETSc.PC.Type.NONE)
    if ksp.comm.getSize() == 1:
        pcs = [pc]
    else:
        pc.setType(PETSc.PC.Type.BJACOBI)
        ksp.setUp()
        pcs = [sub.getPC() for sub in pc.getBJacobiSubKSP()]
    for sub in pcs:
        sub.setType(PETSc.PC.Type.NONE)
        sub.setType(PETSc.PC.Type.ICC)
        sub.setFactorLevels(0)
        if not default_shift:
            sub.setFactorShift(PETSc.Mat.FactorShiftType.NONE, 0.0)


def configure(
    ksp: PETSc.KSP,
    model: Model | float,
    *,
    retries: int = 3,
    growth: float = 10.0,
    extrapolate: bool = False,
    **params: Any,
) -> ShiftedICC:
    """Set ``ksp`` up for the shift ``model`` predicts from ``params`` (or a given shift).

    ``model`` is a loaded :class:`~femeta.model.Model` that predicts a shift,
    or the shift itself. A model that reads statistics of the matrix gets them
    from the KSP's operator (a family model's own from its family file, which
    must still be there). All processes use the first one's shift. ``extrapolate``
    lets the model predict outside its training ranges.

    Raises:
        ValueError: on every process alike, when the KSP, the model or the
            parameters do not fit (with what was wrong).
    """
    _check_is_ksp(ksp)
    _collective(ksp.comm, lambda: _check_ksp(ksp))
    if isinstance(model, Model):
        alpha = _collective(ksp.comm, lambda: _predict(model, ksp, params, extrapolate))
    else:
        if params:
            raise TypeError("parameters are for a model; a given shift takes none")
        alpha = model
    return ShiftedICC(ksp, alpha, retries=retries, growth=growth)


class LinearProblem(dolfinx.fem.petsc.LinearProblem):
    """``dolfinx.fem.petsc.LinearProblem`` solved by CG + ICC(0) at a model's shift.

    Takes ``model`` and its ``params`` beside the parent's arguments (the
    options prefix defaults to ``"femeta_"``); :meth:`solve` assembles as the
    parent does and solves with :meth:`ShiftedICC.solve`, whose report is
    :attr:`report`. ``petsc_options`` may set tolerances, not the KSP or PC type.
    """

    def __init__(
        self,
        a: Any,
        L: Any,
        *,
        model: Model | float,
        params: Mapping[str, Any] | None = None,
        petsc_options_prefix: str = "femeta_",
        **kwargs: Any,
    ) -> None:
        super().__init__(a, L, petsc_options_prefix=petsc_options_prefix, **kwargs)
        if "ksp_type" not in (kwargs.get("petsc_options") or {}):
            # DOLFINx's setFromOptions() made it GMRES, PETSc's default; any other type is refused.
            self._solver.setType(PETSc.KSP.Type.CG)
        if isinstance(model, Model) and model.needs_matrix:  # it reads the norms of A
            self.A.zeroEntries()
            dolfinx.fem.petsc.assemble_matrix(self.A, self.a, bcs=self.bcs)
            self.A.assemble()
        self._guard = configure(self._solver, model, **dict(params or {}))

    @property
    def solver(self) -> Any:
        """The KSP, behind the guard once it is configured (``solver.solve`` is guarded)."""
        return self.__dict__.get("_guard") or self._solver

    @property
    def report(self) -> SolveReport | None:
        """What the last :meth:`solve` did (``None`` before the first)."""
        return self._guard.report


def _predict(model: Model, ksp: PETSc.KSP, params: Mapping[str, Any], extrapolate: bool) -> float:
    if model.predicts != "alpha":
        raise ValueError(
            f"the model in {model.run_dir} predicts {model.predicts} for {model.problem!r}, "
            "not a shift of IC(0); load a model trained with ICCG (e.g. elasticity)"
        )
    params = dict(params)
    if model.needs_matrix:
        A, _ = ksp.getOperators()
        params |= matrix_statistics(A, model.statistics, model.family)
    return model.predict(extrapolate=extrapolate, **params)


def matrix_statistics(
    A: PETSc.Mat, names: tuple[str, ...], family: str | None = None
) -> dict[str, float]:
    """The statistics of ``A`` a model reads (:attr:`~femeta.model.Model.statistics`).

    ``norm_1``, ``norm_inf``, ``norm_fro``: PETSc's norms; ``diag_min``, ``diag_max``:
    the range of ``|A_ii|`` over the rows with a nonzero off the diagonal (a Dirichlet
    row, which assembly makes an identity row, has none). Any other name is one of the
    ``STATISTICS`` of the family file ``family`` (``FILE.py:FUNCTION``, a model's
    :attr:`~femeta.model.Model.family`), computed by its function. Collective on
    ``A``'s communicator: every process gets the same numbers.

    Raises:
        ValueError: A name is neither built in nor declared by the family file, or a
            statistic of the file fails (:class:`~femeta.family_file.FamilyError`).
    """
    norms = {
        "norm_1": PETSc.NormType.NORM_1,
        "norm_inf": PETSc.NormType.NORM_INFINITY,
        "norm_fro": PETSc.NormType.FROBENIUS,
    }
    values = {name: A.norm(norms[name]) for name in names if name in norms}
    if {"diag_min", "diag_max"} & set(names):
        values |= _diagonal_range(A)
    own = [name for name in names if name not in _BUILT_IN]
    if own:
        values |= _family_statistics(A, own, family)
    return {name: values[name] for name in names}


def _family_statistics(A: PETSc.Mat, names: list[str], family: str | None) -> dict[str, float]:
    if family is None:
        raise ValueError(
            f"{names[0]!r} is not a statistic femeta computes ({list(_BUILT_IN)}); for one "
            "of a family file's STATISTICS pass family='FILE.py:FUNCTION'"
        )
    code = import_family(family)
    missing = [name for name in names if name not in code.statistics]
    if missing:
        raise FamilyError(
            f"{code.path} declares no statistic {missing[0]!r} in STATISTICS (it declares "
            f"{list(code.statistics)}); the model was trained with it"
        )
    return statistic_values(A, {name: code.statistics[name] for name in names}, code.path)


def _diagonal_range(A: PETSc.Mat) -> dict[str, float]:
    start, _ = A.getOwnershipRange()
    indptr, columns, entries = A.getValuesCSR()
    rows = np.repeat(np.arange(start, start + len(indptr) - 1), np.diff(indptr))
    off = (rows != columns) & (entries != 0)
    coupled = np.zeros(len(indptr) - 1, dtype=bool)
    coupled[rows[off] - start] = True
    diagonal = np.abs(A.getDiagonal().array)
    comm = A.comm.tompi4py()
    if not comm.allreduce(bool(coupled.any()), op=MPI.LOR):
        coupled[:] = True  # a diagonal matrix: every row counts
    chosen = diagonal[coupled]
    low = comm.allreduce(float(chosen.min()) if len(chosen) else np.inf, op=MPI.MIN)
    high = comm.allreduce(float(chosen.max()) if len(chosen) else 0.0, op=MPI.MAX)
    return {"diag_min": low, "diag_max": high}


def _check_is_ksp(ksp: Any) -> None:
    if not isinstance(ksp, PETSc.KSP):
        raise TypeError(f"expected a petsc4py KSP, got {type(ksp).__name__}")


def _check_ksp(ksp: PETSc.KSP) -> None:
    kind = ksp.getType()
    if kind not in (None, PETSc.KSP.Type.CG):
        raise ValueError(
            f"the KSP has type {kind!r}; a learned ICC shift is for CG on a symmetric "
            "positive definite A: set ksp.setType('cg') or leave the type unset"
        )
    try:
        A, _ = ksp.getOperators()
        rows, columns = A.getSize()
        kind = A.getType()
    except PETSc.Error:
        kind = None
    if kind is None:  # PETSc hands out an empty matrix when none was set
        raise ValueError("the KSP has no operator; call ksp.setOperators(A) first")
    if rows != columns:
        raise ValueError(f"A is {rows} x {columns}; ICCG needs a square matrix")
    if kind not in (PETSc.Mat.Type.SEQAIJ, PETSc.Mat.Type.MPIAIJ, PETSc.Mat.Type.AIJ):
        raise ValueError(
            f"A has type {kind!r}; ICC(0) of A + alpha diag(A) needs an AIJ matrix "
            "(DOLFINx's default; not a nest or block matrix)"
        )


def _check_guard(alpha: Any, retries: Any, growth: Any) -> None:
    if (
        isinstance(alpha, bool)
        or not isinstance(alpha, int | float)
        or not (math.isfinite(alpha) and alpha > 0)
    ):
        raise ValueError(f"the shift alpha must be a positive finite number, got {alpha!r}")
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ValueError(f"retries must be an integer >= 0, got {retries!r}")
    if not (isinstance(growth, int | float) and math.isfinite(growth) and growth > 1):
        raise ValueError(f"growth must be a finite number > 1, got {growth!r}")


def _collective[T](comm: Any, check: Callable[[], T]) -> T:
    """Run ``check`` on every process; if it fails on any, raise the same error on all.

    The first failing process's error type and message are raised everywhere, so
    no process goes on into a collective call that the others have left.
    """
    try:
        result, failure = check(), None
    except (TypeError, ValueError) as err:
        result, failure = None, (type(err).__name__, str(err))
    failures = comm.tompi4py().allgather(failure)
    first = next((item for item in failures if item is not None), None)
    if first is not None:
        kind, message = first
        raise (TypeError if kind == "TypeError" else ValueError)(message)
    return result
