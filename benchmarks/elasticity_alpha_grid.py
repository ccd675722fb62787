"""Psi_base and Psi_best of Table 2 on the clamped-beam family, measured with PETSc.

Psi_base is one alpha for every task: the smallest value on the grid for which
IC(0) of A + alpha diag(A) succeeds on every training task. Psi_best is the
per-task brute force: the grid value with the fewest ICCG iterations (a failed
factorization or an unconverged solve counts as the cap M). Both are evaluated
on test tasks with PETSc's CG + ICC(0) (``petsc_iccg``, the reference the torch
solver is tested against).

Run: python benchmarks/elasticity_alpha_grid.py [--tasks 1000] [--cap 243]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from femeta.problems.elasticity import ElasticBeam
from femeta.solvers.iccg import petsc_iccg


def iterations_on_grid(tasks, grid, tol, cap) -> tuple[np.ndarray, np.ndarray]:
    """Iterations (failures and non-convergence count as ``cap``) and failure flags, (grid, B)."""
    counts, failed = [], []
    for alpha in grid:
        result = petsc_iccg(tasks["A"], tasks["b"], float(alpha), tol=tol, max_iterations=cap)
        ok = result.converged.numpy() & ~result.factorization_failed.numpy()
        counts.append(np.where(ok, result.iterations.numpy(), cap))
        failed.append(result.factorization_failed.numpy())
    return np.array(counts), np.array(failed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=1000, help="test (and training) tasks used")
    parser.add_argument("--cap", type=int, default=243, help="iteration cap M (the paper: N)")
    parser.add_argument("--tol", type=float, default=1e-6)
    parser.add_argument("--points", type=int, default=31, help="log grid of alpha in [1e-5, 10]")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    beam = ElasticBeam()
    train = beam.split("train", args.seed).subset(slice(0, args.tasks))
    test = beam.split("test", args.seed).subset(slice(0, args.tasks))
    grid = np.logspace(-5, 1, args.points)

    _, train_failed = iterations_on_grid(train, grid, args.tol, args.cap)
    safe = np.flatnonzero(~train_failed.any(axis=1))
    if safe.size == 0:
        raise SystemExit("no alpha on the grid avoids every IC(0) failure on the training tasks")
    alpha_base = grid[safe[0]]

    counts, failed = iterations_on_grid(test, grid, args.tol, args.cap)
    base = counts[safe[0]]
    best = counts.min(axis=0)
    best_alpha = grid[counts.argmin(axis=0)]
    print(f"{len(test)} test tasks, tol {args.tol:g}, cap M = {args.cap}, "
          f"{args.points}-point log grid of alpha in [1e-5, 10]")  # fmt: skip
    print(f"Psi_base: alpha = {alpha_base:.3g}: mean {base.mean():.2f} iterations, "
          f"convergence {np.mean(base < args.cap):.3f}")  # fmt: skip
    solved = best < args.cap
    print(f"Psi_best: mean {best.mean():.2f} iterations, convergence {solved.mean():.3f}, "
          f"median best alpha where it converges {np.median(best_alpha[solved]):.3g}")  # fmt: skip
    print(f"tasks whose IC(0) fails at the smallest alpha: {failed[0].mean():.3f}")
    print(f"wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
