"""PetscIccg and default_icc: kept systems, MPI ranks, and the same results either way.

Every test runs serially and on every rank under ``mpiexec -n 2``.
"""

from __future__ import annotations

from dataclasses import fields

import numpy as np
import pytest
import torch
from test_iccg import KERSHAW, growing_residual, random_spd

from femeta._fenics import has_dolfinx
from femeta.solvers.iccg import IccgResult

pytestmark = [
    pytest.mark.dolfinx,
    pytest.mark.mpi,
    pytest.mark.skipif(not has_dolfinx(), reason="needs DOLFINx and petsc4py"),
]


def systems(batch: int = 7, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grid Laplacians, one with Kershaw's matrix in its corner (IC(0) fails below a shift)."""
    A, b = random_spd(batch, seed=seed)
    A[0] = torch.eye(A.shape[1], dtype=torch.float64)
    A[0, :4, :4] = KERSHAW
    alpha = torch.logspace(-4, -1, batch, dtype=torch.float64)
    return A, b, alpha


def fresh(A: torch.Tensor, b: torch.Tensor, alpha: torch.Tensor) -> IccgResult:
    """The engine's results from KSPs made here, one per task: nothing kept or shared."""
    from mpi4py import MPI
    from petsc4py import PETSc

    from femeta.solvers.petsc import _assemble

    outcomes = []
    for dense, rhs, shift in zip(A.numpy(), b.numpy(), alpha.tolist(), strict=True):
        n = len(rhs)
        shifted = dense + shift * np.diag(np.diag(dense))
        matrix, preconditioning = (
            PETSc.Mat().createAIJ((n, n), csr=_csr(values), comm=MPI.COMM_SELF)
            for values in (dense, shifted)
        )
        ksp = PETSc.KSP().create(MPI.COMM_SELF)
        ksp.setOperators(matrix, preconditioning)
        ksp.setType("cg")
        ksp.setNormType(PETSc.KSP.NormType.UNPRECONDITIONED)
        ksp.setTolerances(rtol=1e-10, atol=0.0, max_it=40)
        ksp.setConvergenceHistory(length=41)
        pc = ksp.getPC()
        pc.setType("icc")
        pc.setFactorLevels(0)
        pc.setFactorOrdering("natural")
        pc.setFactorShift(PETSc.Mat.FactorShiftType.NONE, 0.0)
        x, right = matrix.createVecs()
        right.setArray(rhs)
        ksp.solve(right, x)
        outcomes.append(
            (
                x.getArray().copy(),
                ksp.getIterationNumber(),
                np.array(ksp.getConvergenceHistory()),
                int(ksp.getConvergedReason()),
            )
        )
        for item in (ksp, x, right, matrix, preconditioning):
            item.destroy()
    return _assemble(outcomes, b.numpy(), 1e-10, 40)


def _csr(dense: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from petsc4py import PETSc

    rows, columns = np.nonzero(dense)
    indptr = np.searchsorted(rows, np.arange(len(dense) + 1))
    return indptr.astype(PETSc.IntType), columns.astype(PETSc.IntType), dense[rows, columns]


def assert_identical(result: IccgResult, expected: IccgResult) -> None:
    for field in fields(IccgResult):
        assert torch.equal(getattr(result, field.name), getattr(expected, field.name)), field.name


def world():
    from mpi4py import MPI

    return MPI.COMM_WORLD


def test_shared_and_kept_systems_give_the_same_results():
    """On every rank, whichever rank solved a task (serially, the one rank)."""
    from femeta.solvers.petsc import PetscIccg

    A, b, alpha = systems()
    expected = fresh(A, b, alpha)
    assert bool(expected.factorization_failed[0]) and not bool(
        expected.factorization_failed[1:].any()
    )
    assert bool(expected.converged[1:].all())
    with PetscIccg(world()) as engine:
        for _ in range(2):  # the second call finds every system kept
            assert_identical(engine(A, b, alpha, tol=1e-10, max_iterations=40), expected)
            assert engine.cached == len(b)
        # Each rank keeps the systems it solves, and only those.
        kept = world().allgather(len(engine._solver.keys()))
        assert sum(kept) == len(b) and max(kept) - min(kept) <= 1
        # Another order and other shifts: the kept systems are found by content.
        order = torch.randperm(len(b), generator=torch.Generator().manual_seed(1))
        assert_identical(
            engine(A[order], b[order], 2 * alpha[order], tol=1e-10, max_iterations=40),
            fresh(A[order], b[order], 2 * alpha[order]),
        )


def test_several_shifts_in_one_round_equal_a_fresh_engine_at_each():
    """Although each rank keeps one KSP per system: task 0's IC(0) fails at the first
    shift, succeeds at the second, fails again."""
    from femeta.solvers.petsc import PetscIccg

    A, b, alpha = systems(batch=40)
    shifts = [alpha, torch.full_like(alpha, 0.5), alpha]
    expected = [fresh(A, b, shift) for shift in shifts]
    assert [bool(result.factorization_failed[0]) for result in expected] == [True, False, True]
    with PetscIccg(world()) as engine:
        for _ in range(2):  # new systems, then kept ones
            results = engine.many(A, b, shifts, tol=1e-10, max_iterations=40)
            for result, reference in zip(results, expected, strict=True):
                assert_identical(result, reference)
        assert_identical(engine(A, b, alpha, tol=1e-10, max_iterations=40), expected[0])
        with pytest.raises(ValueError, match="alphas is empty"):
            engine.many(A, b, [], tol=1e-10, max_iterations=40)
        with pytest.raises(TypeError, match="alphas must be a list of shifts"):
            engine.many(A, b, alpha, tol=1e-10, max_iterations=40)
        with pytest.raises(ValueError, match="alpha must be positive"):
            engine.many(A, b, [alpha, -alpha], tol=1e-10, max_iterations=40)


def test_the_shifts_are_rank_0_s():
    """A rank whose shifts differ in the last bit still solves at rank 0's."""
    from femeta.solvers.petsc import PetscIccg

    A, b, alpha = systems()
    mine = alpha * (1 + 1e-15 * world().rank)
    with PetscIccg(world()) as engine:
        assert_identical(engine(A, b, mine, tol=1e-10, max_iterations=40), fresh(A, b, alpha))


@pytest.mark.parametrize("change", ["value", "new entry"])
def test_a_changed_matrix_is_not_taken_for_a_kept_one(change):
    """Same right-hand side and diagonal, one off-diagonal pair changed: solved anew."""
    from femeta.solvers.petsc import PetscIccg

    A, b, alpha = systems()
    changed = A.clone()
    row, column = (0, 1) if change == "value" else (0, 20)
    assert (A[3, row, column] == 0) == (change == "new entry")
    changed[3, row, column] = changed[3, column, row] = 0.5 * A[3, 0, 1]
    expected = fresh(changed, b, alpha)
    with PetscIccg(world()) as engine:
        engine(A, b, alpha, tol=1e-10, max_iterations=40)
        result = engine(changed, b, alpha, tol=1e-10, max_iterations=40)
    assert_identical(result, expected)
    assert not torch.equal(result.history[3], fresh(A, b, alpha).history[3])  # it matters


def test_a_kept_system_with_another_pattern_is_solved_anew():
    """The same values on a pattern with explicit zeros: another ICC(0), not the kept one."""
    from femeta.solvers.petsc import PetscIccg

    A, b, alpha = systems()
    wider = (A != 0) | (A != 0).double().matrix_power(2).bool()
    with PetscIccg(world()) as engine:
        plain = engine(A, b, alpha, tol=1e-10, max_iterations=40)
        result = engine(A, b, alpha, tol=1e-10, max_iterations=40, pattern=wider)
        again = engine(A, b, alpha, tol=1e-10, max_iterations=40)
    with PetscIccg() as engine:
        expected = engine(A, b, alpha, tol=1e-10, max_iterations=40, pattern=wider)
    assert_identical(result, expected)
    assert_identical(again, plain)
    assert bool((result.iterations < plain.iterations).all())  # more fill: a better IC


def test_capacity_bounds_the_kept_systems():
    from femeta.solvers.petsc import PetscIccg

    A, b, alpha = systems()
    other_A, other_b, _ = systems(seed=1)
    with PetscIccg(world(), capacity=3) as engine:
        for matrices, rhs in ((A, b), (other_A, other_b), (A, b)):
            result = engine(matrices, rhs, alpha, tol=1e-10, max_iterations=40)
            assert engine.cached == 3
            assert_identical(result, fresh(matrices, rhs, alpha))
        assert sum(world().allgather(len(engine._solver.keys()))) == 3


def test_an_error_on_one_rank_is_raised_on_every_rank(monkeypatch):
    """No rank waits for results that another will never send."""
    from femeta.solvers import petsc

    A, b, alpha = systems()
    original = petsc._aij
    last = world().size - 1

    def matrix(csr):
        if world().rank == last:
            raise RuntimeError("PETSc error on the last rank")
        return original(csr)

    monkeypatch.setattr(petsc, "_aij", matrix)
    with petsc.PetscIccg(world()) as engine, pytest.raises(RuntimeError, match="the last rank"):
        engine(A, b, alpha, tol=1e-10, max_iterations=40)
    with pytest.raises(RuntimeError, match="the last rank"):
        petsc.default_icc(A, b, tol=1e-10, max_iterations=40, comm=world())


def test_bad_use_gets_a_clear_error():
    from femeta.solvers.petsc import PetscIccg

    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="capacity must be an integer >= 1"):
            PetscIccg(capacity=bad)
    A, b, alpha = systems()
    engine = PetscIccg(world())
    engine.close()
    with pytest.raises(RuntimeError, match="closed"):
        engine(A, b, alpha, tol=1e-10, max_iterations=40)


def test_default_icc_shifts_only_where_ic0_of_a_breaks_down():
    """PETSc's default shift (POSITIVE_DEFINITE) leaves IC(0) of A alone where it succeeds."""
    from femeta.solvers.petsc import PetscIccg, default_icc

    A, b, _ = systems()
    default = default_icc(A, b, tol=1e-10, max_iterations=40, comm=world())
    with PetscIccg() as engine:  # A + 1e-30 diag(A) rounds to A: IC(0) of A, shift type NONE
        unshifted = engine(A, b, 1e-30, tol=1e-10, max_iterations=40)
    assert bool(unshifted.factorization_failed[0]) and not bool(
        unshifted.factorization_failed[1:].any()
    )
    assert not bool(default.factorization_failed.any()) and bool(default.converged.all())
    for name in ("x", "iterations", "converged"):
        assert torch.equal(getattr(default, name)[1:], getattr(unshifted, name)[1:]), name
    width = default.history.shape[1]  # zero-padded after each solve, to the longest
    assert torch.equal(default.history[1:], unshifted.history[1:, :width])
    with pytest.raises(ValueError, match="pattern must hold every stored entry"):
        default_icc(A, b, tol=1e-10, max_iterations=40, pattern=torch.eye(A.shape[1]) > 0)


def test_like_femeta_s_iccg_the_engine_has_no_divergence_test():
    """A residual that grows 10^4-fold before it falls is not a divergence (PETSc's default
    divtol would stop the solve there, and the loss would count fewer iterations)."""
    from femeta.solvers.iccg import iccg
    from femeta.solvers.petsc import PetscIccg

    A, b = growing_residual()
    reference = iccg(A, b, 1.0, tol=1e-8, max_iterations=400)
    assert bool(reference.converged.all()) and float(reference.history.max()) > 1e4
    with PetscIccg() as engine:
        result = engine(A, b, 1.0, tol=1e-8, max_iterations=400)
    assert bool(result.converged.all())
    assert torch.equal(result.iterations, reference.iterations)
