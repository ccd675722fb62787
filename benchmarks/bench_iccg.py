"""Throughput of femeta's ICCG(alpha) against PETSc KSP solves, on the paper's beams (N = 243).

Run from the repository root, with femeta importable (installed, or ``PYTHONPATH=.``)::

    .venv/bin/python benchmarks/bench_iccg.py --repeats 3
    .venv/bin/mpiexec -n 2 .venv/bin/python benchmarks/bench_iccg.py --repeats 3

Every variant solves the same clamped-beam tasks (the first ``--tasks`` of the
test split, IC(0) on the stored pattern as in training; femeta in batches of
``--batch``) with the same shift, tolerance and cap; the table shows the median
wall time of the repetitions and the solved tasks per second. The default shift
is Psi_base's, 10^-0.6. "iccg" is :func:`femeta.solvers.iccg.iccg` with its
compiled kernels and with ``method="torch"`` (sparse triangular solves);
``petsc_iccg`` is its PETSc reference (it records the residual history);
:class:`~femeta.solvers.petsc.PetscIccg`
does the same solves in batches of ``--batch`` with every system kept from a
first, untimed call (as in training, from the second epoch on); "PETSc bare"
solves on matrices built beforehand, without the residual history. Under
``mpiexec`` only PetscIccg runs, its tasks shared over the ranks (rank 0 prints).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from femeta._fenics import import_dolfinx
from femeta.problems.elasticity import ElasticBeam
from femeta.solvers.iccg import iccg
from femeta.solvers.petsc import PetscIccg, petsc_iccg
from femeta.solvers.sparse import SparseBatch

_FIELDS = ("iterations", "converged", "factorization_failed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=1000, help="test tasks to solve")
    parser.add_argument("--batch", type=int, default=128, help="tasks per torch solve")
    parser.add_argument("--alpha", type=float, default=10**-0.6, help="relative shift")
    parser.add_argument("--tol", type=float, default=1e-6)
    parser.add_argument("--max-iterations", type=int, default=243)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    tasks = ElasticBeam().split("test", args.seed).subset(slice(0, args.tasks))
    A, b = tasks["A"], tasks["b"]
    alpha = torch.full((len(tasks),), args.alpha, dtype=torch.float64)
    stop = {"tol": args.tol, "max_iterations": args.max_iterations}
    batches = [slice(start, start + args.batch) for start in range(0, len(tasks), args.batch)]

    def forward(method: str = "auto"):
        results = [iccg(A[part], b[part], alpha[part], **stop, method=method) for part in batches]
        return {name: torch.cat([getattr(r, name) for r in results]) for name in _FIELDS}

    def gradient():
        for part in batches:
            shift = alpha[part].clone().requires_grad_()
            iccg(A[part], b[part], shift, **stop).history.sum().backward()

    def kept(engine: PetscIccg) -> Callable[[], object]:
        def run():
            return [engine(A[part], b[part], alpha[part], **stop) for part in batches]

        run()  # untimed: every system is kept from here on
        return run

    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    engine = PetscIccg(comm)
    if comm.size > 1:
        seconds = statistics.median(_time(kept(engine)) for _ in range(args.repeats))
        if comm.rank == 0:
            print(f"PetscIccg, kept systems, {comm.size} ranks: {seconds:.3f} s, "
                  f"{len(tasks) / seconds:.1f} tasks/s (median of {args.repeats})")  # fmt: skip
        return
    bare = _bare_petsc(A, args.alpha, args.tol, args.max_iterations)
    variants: dict[str, Callable[[], object]] = {
        "iccg, compiled": forward,
        "iccg, compiled + d/dalpha": gradient,
        "iccg, method torch": lambda: forward("torch"),
        "petsc_iccg (reference)": lambda: petsc_iccg(A, b, args.alpha, **stop),
        "PetscIccg, kept systems": kept(engine),
        "PETSc bare KSP loop": lambda: bare(b),
    }
    print(
        f"{len(tasks)} test beams, batch {args.batch}, alpha = {args.alpha:.4g}, "
        f"tol = {args.tol}, m = {args.max_iterations}, torch threads = {args.threads}, "
        f"median of {args.repeats}"
    )
    reference = forward()
    petsc = petsc_iccg(A, b, args.alpha, **stop)
    print(
        f"mean iterations: femeta {reference['iterations'].double().mean():.2f}, "
        f"PETSc {petsc.iterations.double().mean():.2f}; converged: "
        f"{int(reference['converged'].sum())} / {int(petsc.converged.sum())}; ICF failures: "
        f"{int(reference['factorization_failed'].sum())} / {int(petsc.factorization_failed.sum())}"
    )
    print(f"{'variant':<28}{'seconds':>10}{'tasks/s':>10}")
    for name, run in variants.items():
        seconds = statistics.median(_time(run) for _ in range(args.repeats))
        print(f"{name:<28}{seconds:>10.3f}{len(tasks) / seconds:>10.1f}")
    engine.close()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"peak resident memory of the process: {peak:.2f} GiB")


def _time(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def _bare_petsc(A: SparseBatch, alpha: float, tol: float, max_iterations: int):
    """A KSP per task and solve, like ``petsc_iccg``'s, on PETSc matrices built before timing
    starts; the returned function gives each task's iteration count."""
    import_dolfinx()
    from mpi4py import MPI
    from petsc4py import PETSc

    n = A.shape[1]
    indptr = A.indptr.numpy().astype(PETSc.IntType)
    indices = A.indices.numpy().astype(PETSc.IntType)
    diagonal = np.repeat(np.arange(n), np.diff(indptr)) == indices

    def aij(values: np.ndarray):
        return PETSc.Mat().createAIJ((n, n), csr=(indptr, indices, values), comm=MPI.COMM_SELF)

    operators = []
    for values in A.values.numpy():
        shifted = values.copy()
        shifted[diagonal] += alpha * values[diagonal]
        operators.append((aij(values), aij(shifted)))

    def solve(b: torch.Tensor) -> list[int]:
        counts = []
        for task, (matrix, shifted) in enumerate(operators):
            ksp = PETSc.KSP().create(MPI.COMM_SELF)
            ksp.setOptionsPrefix(f"bench_iccg_{task}_")
            ksp.setOperators(matrix, shifted)
            ksp.setType(PETSc.KSP.Type.CG)
            ksp.setNormType(PETSc.KSP.NormType.UNPRECONDITIONED)
            ksp.setTolerances(rtol=tol, atol=0.0, max_it=max_iterations)
            pc = ksp.getPC()
            pc.setType(PETSc.PC.Type.ICC)
            pc.setFactorLevels(0)
            pc.setFactorOrdering(PETSc.Mat.OrderingType.NATURAL)
            pc.setFactorShift(PETSc.Mat.FactorShiftType.NONE, 0.0)
            x, rhs = matrix.createVecs()
            rhs.setArray(b[task].numpy())
            ksp.solve(rhs, x)
            counts.append(ksp.getIterationNumber())
            for item in (ksp, x, rhs):
                item.destroy()
        return counts

    return solve


if __name__ == "__main__":
    main()
