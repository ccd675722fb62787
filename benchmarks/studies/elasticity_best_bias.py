"""How much of Psi_best's lead on the beams is the luck of rounding.

A beam's ICCG iteration count depends only on W and lambda/mu: scaling A by a
constant changes nothing in exact arithmetic (the shift is relative, the
tolerance too). On the slender, ill-conditioned beams, rounding alone still
moves CG by several iterations, and Psi_best, the minimum over 31 shifts per
task, picks the luckiest. This script finds Psi_best's shift per test task,
then solves the same tasks again at those shifts, as they are and with A
scaled by each of ``--scales`` (equivalent copies whose entries round
differently). Those solves give what the per-task best shift achieves without
the selection on rounding. Each ``--model`` is solved on the same copies, at
the shifts it predicts for the beams (a model reads a beam's features, not the
scaled matrix: the copy is the same beam), so the two compare on rounding
neither was selected on.

Run: python benchmarks/studies/elasticity_best_bias.py [--cap 243] [--scales 7 ...]
[--model RUN_DIR ...] [--threads 1] [--ic-pattern stored|values]
(default pattern: femeta's, ``stored``)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from femeta.evaluation import IterationStats
from femeta.experiments import get_experiment
from femeta.runs import RunError
from femeta.solvers.iccg import iccg
from femeta.solvers.sparse import SparseBatch
from femeta.workflow import load_metasolver


def counts(
    A: torch.Tensor, b: torch.Tensor, alpha, tol: float, cap: int, pattern: torch.Tensor | None
) -> IterationStats:
    """Iterations per task; a failed IC(0) or an unconverged solve counts as ``cap``."""
    result = iccg(A, b, alpha, tol=tol, max_iterations=cap, pattern=pattern)
    return IterationStats.from_result(result, tol, cap)


def _cell(stats: IterationStats) -> str:
    return f"{stats.mean_iterations:7.2f} / {stats.convergence_ratio:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cap", type=int, default=243)
    parser.add_argument("--tol", type=float, default=1e-6)
    parser.add_argument("--scales", type=float, nargs="+", default=[7.0])
    parser.add_argument("--model", type=Path, action="append", default=[])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--ic-pattern", default=None, help="default: femeta's")
    args = parser.parse_args()
    if not all(0 < scale < float("inf") for scale in args.scales):
        parser.error(f"--scales must be positive and finite, got {args.scales}")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    given = {} if args.ic_pattern is None else {"ic_pattern": args.ic_pattern}
    experiment = get_experiment("elasticity", **given)
    pattern = None  # the matrices carry the pattern: a sparse batch, or dense for 'values'
    tasks = experiment.tasks("test", 0)
    A, b = experiment.matrices(tasks["A"]), tasks["b"]
    models = {}
    for run in args.model:  # before the long grid solves, so that a wrong run fails first
        try:
            model_experiment, model = load_metasolver(run, "elasticity")
        except RunError as err:
            parser.error(str(err))
        theirs = {k: v for k, v in model_experiment.params().items() if k != "inputs"}
        ours = {k: v for k, v in experiment.params().items() if k != "inputs"}
        if theirs != ours:
            parser.error(
                f"{run} was trained on other beams or another IC(0) pattern ({theirs}); "
                f"this comparison uses {ours} (--ic-pattern sets the pattern)"
            )
        with torch.no_grad():
            models[str(run)] = model(model_experiment.tasks("test", 0)["features"])
    grid = experiment.alpha_grid
    runs = [counts(A, b, alpha, args.tol, args.cap, pattern) for alpha in grid.tolist()]
    table = torch.stack([torch.from_numpy(run.iterations) for run in runs])
    best = table.min(dim=0)
    chosen = grid[best.indices]  # the first minimum: ties go to the smaller shift
    converged = np.stack([run.converged for run in runs]).any(axis=0)
    best_stats = IterationStats(best.values.numpy(), converged, args.tol, args.cap)
    shifts = {"Psi_best's shifts": chosen}
    base = experiment.base_shift(experiment.tasks("train", 0))
    shifts["Psi_base"] = torch.full_like(chosen, base)
    shifts |= models
    print(f"{len(tasks)} test beams, tol {args.tol:g}, cap {args.cap}, "
          f"IC(0) pattern {experiment.ic_pattern!r}, Psi_base alpha {base:.3g}")  # fmt: skip
    print(f"Psi_best (min over {len(grid)} shifts): {_cell(best_stats)}  (mean / convergence)")
    scales = [1.0, *args.scales]
    width = max(len(name) for name in shifts)
    print(f"{'A scaled by':<{width}}" + "".join(f"  {s:>16g}" for s in scales))
    ratios = {}
    for name, alpha in shifts.items():
        scaled = [
            A.with_values(s * A.values) if isinstance(A, SparseBatch) else s * A for s in scales
        ]
        solved = [counts(S, b, alpha, args.tol, args.cap, pattern) for S in scaled]
        ratios[name] = np.array([stats.convergence_ratio for stats in solved])
        print(f"{name:<{width}}" + "".join(f"  {_cell(stats):>16}" for stats in solved))
    reference = ratios["Psi_best's shifts"]
    for run in args.model:
        gap = ratios[str(run)] - reference
        print(f"{run}: convergence minus Psi_best's shifts', per copy: "
              + " ".join(f"{g:+.3f}" for g in gap) + f"; median {np.median(gap):+.3f}")  # fmt: skip
    print(f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
