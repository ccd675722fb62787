"""Evaluate the best weights so far of an interrupted (or still running) training run.

Run from the repository root, with femeta importable (installed, or ``PYTHONPATH=.``)::

    .venv/bin/python benchmarks/evaluate_checkpoint.py runs/NAME/checkpoint.pt [--max-iterations M]

``femeta evaluate`` reads finished run directories only; this reads the
``checkpoint.pt`` that training keeps while it runs (the weights best on the
validation set so far) and prints the same JSON summary on the test tasks,
plus the epoch reached and the epoch of those weights.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from femeta.workflow import build_experiment, evaluate_metasolver, read_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--tol", type=float, default=None, help="default: the training tolerance")
    parser.add_argument("--max-iterations", type=int, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)

    options, trainer = read_checkpoint(args.checkpoint)
    experiment = build_experiment(options, "cpu")
    metasolver = experiment.metasolver("nn")
    metasolver.load_state_dict(trainer["best_state"])
    metasolver.eval()
    tol = options.tol if args.tol is None else args.tol
    stats = evaluate_metasolver(experiment, metasolver, tol, options.seed, args.max_iterations)
    summary = {
        "problem": options.problem,
        "checkpoint": str(args.checkpoint),
        "epochs_done": trainer["epoch"],
        "best_epoch": trainer["best_epoch"],
        "best_validation_loss": trainer["best_validation_loss"],
    }
    print(json.dumps(summary | stats.summary()))


if __name__ == "__main__":
    main()
