"""Where a trained beam model gains or loses against Psi_base: the test beams by width W.

Run from the repository root, with femeta importable (installed, or ``PYTHONPATH=.``)::

    .venv/bin/python benchmarks/elasticity_by_width.py RUN_DIR [--max-iterations M]

For the model of ``RUN_DIR`` and for Psi_base (fitted on the training beams of
the run's seed), per band of W: mean iterations (a failed IC(0) or an
unconverged solve counts as the cap), convergence ratio, the model's median
shift and its IC(0) failures. It also prints the model's mean with each task
whose IC(0) fails solved again at Psi_base's shift: what the failures cost.
"""

from __future__ import annotations

import argparse
from itertools import pairwise
from pathlib import Path

import numpy as np
import torch

from femeta.evaluation import IterationStats
from femeta.problems.base import TaskSet
from femeta.runs import load_run
from femeta.workflow import baseline_metasolver, load_metasolver

WIDTH_BANDS = (0.003, 0.01, 0.02, 0.05, 0.1, 0.3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--max-iterations", type=int, default=243)
    args = parser.parse_args()
    torch.set_num_threads(1)

    config, _ = load_run(args.run_dir, "elasticity")
    seed, tol = config["options"]["seed"], config["options"]["tol"]
    experiment, model = load_metasolver(args.run_dir, "elasticity")
    base = baseline_metasolver(experiment, "base", seed)
    tasks = experiment.tasks("test", seed)
    cap = args.max_iterations
    width = tasks["params"][:, 0].cpu().numpy()

    def solve(psi: torch.nn.Module, subset: TaskSet) -> tuple[IterationStats, np.ndarray]:
        result = experiment.solve(psi, subset, tol, cap)
        return IterationStats.from_result(result, tol, cap), result.factorization_failed.numpy()

    with torch.no_grad():
        alpha = model(tasks["features"])
        rows = {"model": solve(model, tasks), "Psi_base": solve(base, tasks)}
        (model_stats, failed), (base_stats, _) = rows["model"], rows["Psi_base"]
        counts, converged = model_stats.iterations.copy(), model_stats.converged.copy()
        if failed.any():  # a model without failures has nothing to solve again
            retried, _ = solve(base, tasks.subset(torch.from_numpy(failed.nonzero()[0])))
            counts[failed], converged[failed] = retried.iterations, retried.converged
    print(f"{args.run_dir}: {len(tasks)} test beams, tol {tol:g}, cap {cap}")
    print(f"Psi_base alpha {float(base(tasks['features'][:1])):.4g}")
    for name, (stats, name_failed) in rows.items():
        ratio = stats.convergence_ratio
        print(f"{name}: mean {stats.mean_iterations:.2f}, convergence {ratio:.3f}, "
              f"IC(0) failures {int(name_failed.sum())}")  # fmt: skip
    print(f"model, its failures solved again at Psi_base's shift: mean {counts.mean():.2f}, "
          f"convergence {converged.mean():.3f}")  # fmt: skip
    print(
        "W band          tasks  model mean / conv   Psi_base mean / conv   median alpha  failures"
    )
    for low, high in pairwise(WIDTH_BANDS):
        band = (width >= low) & (width < high)
        median_alpha = float(alpha[torch.from_numpy(band)].median())
        print(
            f"[{low:<5}, {high:<4})  {int(band.sum()):5d}  "
            f"{model_stats.iterations[band].mean():8.1f} / "
            f"{model_stats.converged[band].mean():.2f}     "
            f"{base_stats.iterations[band].mean():8.1f} / "
            f"{base_stats.converged[band].mean():.2f}        {median_alpha:8.3g}  "
            f"{int(failed[band].sum()):5d}"
        )


if __name__ == "__main__":
    main()
