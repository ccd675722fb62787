"""Where the shift of ICCG matters on a family file's test tasks, and where IC(0) breaks down.

Run from the repository root, with femeta importable::

    .venv/bin/python benchmarks/studies/family_shift_map.py \
        --family examples/anisotropic_poisson.py:make

For each of the 31 shifts 1e-5..10 of Psi_best's grid it solves every test task with ICCG
(femeta's compiled solver, CG to ``--tol`` on ||b - Ax|| / ||b||, cap 10 N) and prints the
mean iterations at that one shift (a failed IC(0) counts as the cap) and how many tasks fail;
then Psi_best (the fewest iterations per task over the grid) and, for each task on which
IC(0) breaks down at the smallest shift, its parameters and the smallest shift that works.
"""

from __future__ import annotations

import argparse
import time

import torch

from femeta.problems.base import split_size_and_seed
from femeta.problems.family import UserFamily, load_family
from femeta.solvers.iccg import iccg

GRID = torch.logspace(-5, 1, 31, dtype=torch.float64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", required=True, help="FILE.py:FUNCTION")
    parser.add_argument("--seed", type=int, default=0, help="the seed of femeta train/evaluate")
    parser.add_argument("--tol", type=float, default=1e-6)
    args = parser.parse_args()
    start = time.perf_counter()
    family = UserFamily(load_family(args.family))
    tasks = family.sample(*split_size_and_seed("test", args.seed, family.splits))
    cap = 10 * family.n
    counts = []
    print(f"{len(tasks)} test tasks, N = {family.n}; shift: mean iterations, tasks failing")
    for alpha in GRID.tolist():
        result = iccg(tasks["A"], tasks["b"], alpha, tol=args.tol, max_iterations=cap)
        counts.append(torch.where(result.converged, result.iterations, cap))
        failing = int((~result.converged).sum())
        print(f"  {alpha:9.3g}: {counts[-1].double().mean():9.2f}  {failing}")
    table = torch.stack(counts, dim=1)
    print(f"Psi_best: {table.min(dim=1).values.double().mean():.2f}")
    names = family.param_names
    for task in torch.nonzero(table[:, 0] == cap).flatten().tolist():
        works = int(torch.nonzero(table[task] < cap).flatten()[0])
        shown = ", ".join(f"{n} {v:.3g}" for n, v in zip(names, tasks["params"][task].tolist(),
                                                          strict=True))  # fmt: skip
        print(f"  fails at {GRID[0]:.0e}: {shown}; works from {GRID[works]:.2g}")
    print(f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
