"""One system solved with a learned shift and with what a FEniCS user already has.

Each solver gets a KSP of its own (own options prefix; the global options
database is not touched), CG with the unpreconditioned residual, the same
``rtol`` and iteration cap, and a zero initial guess. Wall times are measured
between barriers, preconditioner set-up included, so they are the slowest
process's.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from femeta._fenics import import_dolfinx
from femeta.fenics import ShiftedICC, reason_name, set_icc

import_dolfinx()
from petsc4py import PETSc  # noqa: E402

__all__ = ["Outcome", "default_icc", "gamg", "rigid_body_modes", "shifted_icc"]


@dataclass(frozen=True)
class Outcome:
    """How one solver did: iterations and reason of the solve that gave ``x``."""

    name: str
    iterations: int
    converged: bool
    reason: str
    seconds: float
    alpha: float | None = None
    #: Every KSP solve it took (a guarded shift may retry or fall back).
    attempts: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def shifted_icc(
    name: str, A: PETSc.Mat, b: PETSc.Vec, alpha: float, rtol: float, max_iterations: int
) -> Outcome:
    """CG + ICC(0) of ``A + alpha diag(A)``, guarded (:class:`~femeta.fenics.ShiftedICC`)."""
    ksp = _ksp(name, A, rtol, max_iterations)
    solver = ShiftedICC(ksp, alpha)
    x = A.createVecRight()
    start = _now(A)
    report = solver.solve(b, x)
    seconds = _now(A) - start
    solver.destroy()
    ksp.destroy()
    x.destroy()
    return Outcome(
        name,
        report.iterations,
        report.converged,
        report.attempts[-1].reason,
        seconds,
        report.alpha,
        [asdict(attempt) for attempt in report.attempts],
    )


def default_icc(A: PETSc.Mat, b: PETSc.Vec, rtol: float, max_iterations: int) -> Outcome:
    """CG + PETSc's ICC(0) of ``A`` with its default shift (block Jacobi in parallel)."""
    ksp = _ksp("petsc_icc", A, rtol, max_iterations)
    set_icc(ksp, default_shift=True)
    return _run("petsc_icc", ksp, A, b)


def gamg(
    A: PETSc.Mat, b: PETSc.Vec, rtol: float, max_iterations: int, near_nullspace: Any = None
) -> Outcome:
    """CG + PETSc's GAMG, with ``near_nullspace`` when given (e.g. :func:`rigid_body_modes`;
    GAMG's default, the constants, suits scalar problems)."""
    if near_nullspace is not None:
        A.setNearNullSpace(near_nullspace)
    ksp = _ksp("gamg", A, rtol, max_iterations)
    ksp.getPC().setType(PETSc.PC.Type.GAMG)
    return _run("gamg", ksp, A, b)


def rigid_body_modes(space: Any) -> PETSc.NullSpace:
    """The six rigid-body modes of a 3D vector P1 space, orthonormalised, for GAMG."""
    index_map, bs = space.dofmap.index_map, space.dofmap.index_map_bs
    owned = index_map.size_local
    points = space.tabulate_dof_coordinates()[:owned]
    x, y, z = points[:, 0], points[:, 1], points[:, 2]
    modes = []
    for k in range(6):
        vector = PETSc.Vec().createMPI((owned * bs, None), bsize=bs, comm=space.mesh.comm)
        values = vector.getArray()
        values[:] = 0.0
        if k < 3:
            values[k::3] = 1.0
        else:
            i, j = [(0, 1), (1, 2), (2, 0)][k - 3]
            coordinates = (x, y, z)
            values[i::3] = -coordinates[j]
            values[j::3] = coordinates[i]
        modes.append(vector)
    for k, vector in enumerate(modes):  # modified Gram-Schmidt
        for previous in modes[:k]:
            vector.axpy(-previous.dot(vector), previous)
        vector.normalize()
    return PETSc.NullSpace().create(vectors=modes, comm=space.mesh.comm)


def _ksp(name: str, A: PETSc.Mat, rtol: float, max_iterations: int) -> PETSc.KSP:
    ksp = PETSc.KSP().create(A.comm)
    ksp.setOptionsPrefix(f"femeta_compare_{name}_")
    ksp.setOperators(A)
    ksp.setType(PETSc.KSP.Type.CG)
    ksp.setNormType(PETSc.KSP.NormType.UNPRECONDITIONED)
    # No divergence test: on ill-conditioned systems (slender beams) the unpreconditioned
    # residual of CG or of GAMG's first iterates grows 10^4-fold before it falls, which
    # PETSc's default divtol takes for divergence. NaN and breakdowns still stop a solve.
    ksp.setTolerances(rtol=rtol, atol=0.0, divtol=PETSc.UNLIMITED, max_it=max_iterations)
    return ksp


def _run(name: str, ksp: PETSc.KSP, A: PETSc.Mat, b: PETSc.Vec) -> Outcome:
    x = A.createVecRight()
    start = _now(A)
    ksp.solve(b, x)
    seconds = _now(A) - start
    reason = int(ksp.getConvergedReason())
    outcome = Outcome(name, ksp.getIterationNumber(), reason > 0, reason_name(reason), seconds)
    ksp.destroy()
    x.destroy()
    return outcome


def _now(A: PETSc.Mat) -> float:
    A.comm.tompi4py().Barrier()
    return time.perf_counter()
