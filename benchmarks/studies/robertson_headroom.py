"""How much a per-task relaxation factor can cut Newton-SOR iterations on Robertson steps.

Run from the repository root, with femeta importable (installed, or ``PYTHONPATH=.``)::

    .venv/bin/python benchmarks/studies/robertson_headroom.py [--every 10] [--model RUN_DIR]

On 1 in ``every`` test tasks, drawn at random (tolerance 1e-9, cap 10^4, one thread), for
each initial guess (``y_n``, and the guess of the model in ``RUN_DIR`` when
given) it solves once per factor ``r`` of a grid over ``[1, 2]`` and prints:

- the spread of the iterations at ``r = 1`` (Psi_base's factor on this
  machine, found by ``femeta evaluate robertson --baseline base``): how much
  of the mean the slowest tasks carry;
- the mean of the per-task best ``r`` of the grid: a lower bound for any
  meta-solver that predicts ``r`` only from that initial guess (e.g. Psi_relax
  from ``y_n``), up to the grid's spacing;
- for a model, its own mean with its own ``r``, for comparison;
- the mean at ``r = 1`` from guesses a relative ``delta`` away from the
  solution (each component of the backward Euler root times ``1 + delta``,
  ``1 - delta``, ``1 + delta``): how close a guess must be to save most of
  the iterations.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn

from femeta.experiments import get_experiment
from femeta.metasolvers import PreviousStep
from femeta.problems.robertson import solve_step
from femeta.workflow import load_metasolver

TOL, CAP = 1e-9, 10_000
GRID = [1 + 0.05 * step for step in range(21)]
DELTAS = (1e-2, 1e-4, 1e-7, 1e-10)


class FixedFactor(nn.Module):
    """Another meta-solver's initial guess with a constant relaxation factor."""

    def __init__(self, guess: nn.Module, relaxation: float):
        super().__init__()
        self.guess, self.relaxation = guess, relaxation

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y0, r = self.guess(features)
        return y0, torch.full_like(r, self.relaxation)


class NearSolution(nn.Module):
    """A guess a relative ``delta`` away from the step's root, with ``r = 1``."""

    def __init__(self, delta: float):
        super().__init__()
        self.delta = delta

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        root = solve_step(features[:, :3], features[:, 3], features[:, 4:7])
        signs = torch.tensor([1.0, -1.0, 1.0], dtype=root.dtype)
        return root * (1 + self.delta * signs), torch.ones_like(root[:, 0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--every", type=int, default=10, help="use 1 in k test tasks")
    parser.add_argument("--model", type=Path, help="a trained robertson run directory")
    args = parser.parse_args()
    if args.every < 1:
        parser.error(f"--every must be a positive integer, got {args.every}")
    torch.set_num_threads(1)
    start = time.perf_counter()

    experiment = get_experiment("robertson")
    guesses: dict[str, nn.Module] = {"y_n": PreviousStep(1.0)}
    if args.model is not None:
        experiment, model = load_metasolver(args.model, "robertson")
        guesses[f"the guess of {args.model}"] = model
    tasks = experiment.tasks("test", 0)
    # A random sample: a regular stride would pick the same steps of every parameter set.
    chosen = torch.randperm(len(tasks), generator=torch.Generator().manual_seed(0))
    tasks = tasks.subset(chosen[: len(tasks) // args.every].sort().values)
    print(f"{len(tasks)} test tasks (1 in {args.every}, at random), tol {TOL:g}, cap {CAP}")

    for name, guess in guesses.items():
        counts = torch.stack(
            [
                torch.from_numpy(
                    experiment.stats(FixedFactor(guess, r), tasks, TOL, CAP).iterations
                )
                for r in GRID
            ]
        ).double()
        at_one = counts[0]
        best, where = counts.min(dim=0)
        print(f"\ninitial guess: {name}")
        quantiles = torch.quantile(
            at_one, torch.tensor([0.5, 0.9, 0.99, 0.999], dtype=at_one.dtype)
        )
        slow = at_one > 100
        print(
            f"  r = 1: mean {at_one.mean():.2f}; median / 90% / 99% / 99.9% "
            + " / ".join(f"{q:.0f}" for q in quantiles)
            + f"; tasks above 100 iterations: {int(slow.sum())} "
            f"({float(slow.double().mean()):.2%}), carrying "
            f"{float(at_one[slow].sum() / at_one.sum()):.1%} of all iterations"
        )
        means = " ".join(f"{float(row.mean()):.2f}" for row in counts)
        print(f"  mean per r on the grid {GRID[0]:.2f}..{GRID[-1]:.2f}: {means}")
        print(
            f"  per-task best r: mean {best.mean():.2f} ({float(best.mean() / at_one.mean()):.1%} "
            f"of r = 1), median best r {GRID[int(where.median())]:.2f}, tasks whose best r is "
            f"1: {float((where == 0).double().mean()):.1%}, "
            f"largest best r {GRID[int(where.max())]:.2f}"
        )
        if name != "y_n":
            own = experiment.stats(guess, tasks, TOL, CAP)
            print(f"  the model with its own r: mean {own.mean_iterations:.2f}")
    print("\nguesses near the root, r = 1:")
    for delta in DELTAS:
        near = experiment.stats(NearSolution(delta), tasks, TOL, CAP)
        print(f"  relative distance {delta:g}: mean {near.mean_iterations:.2f}")
    print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
