"""The first epochs of a training run, with the state of Adam's second moment after each.

Run from the repository root, with femeta importable (installed, or ``PYTHONPATH=.``)::

    .venv/bin/python benchmarks/training_state.py --stop 2 --revision 38d6a03 \\
        '{"problem": "robertson", "head": "relax", "lr": 5e-5, "epochs": 60}'

The JSON holds :class:`femeta.workflow.TrainOptions`; the run is that training,
stopped after ``--stop`` epochs (the schedule is the full run's). After each
epoch it prints the record and, for Adam's running mean of squared gradients,
how many entries are not finite (those weights no longer move) and the
largest. ``--revision`` runs the trainer and the Newton-SOR solver of an
earlier git revision instead of this checkout's (the rest is this checkout's).
One thread.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import femeta.experiments
import femeta.workflow
from femeta.training import EpochRecord
from femeta.workflow import TrainOptions

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _revision import load_revision


class _Stop(Exception):
    pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("options", help="TrainOptions as JSON")
    parser.add_argument("--stop", type=int, default=2, help="epochs to run")
    parser.add_argument("--revision", help="use the trainer and newton_sor of this revision")
    args = parser.parse_args()
    if args.stop < 1:
        parser.error(f"--stop must be >= 1, got {args.stop}")
    try:
        options = TrainOptions(**json.loads(args.options))
    except (ValueError, TypeError) as err:  # bad JSON, an unknown option or a bad value
        parser.error(f"bad options {args.options!r}: {err}")
    torch.set_num_threads(1)
    base_train = femeta.workflow.train
    if args.revision is not None:
        base_train = load_revision(args.revision, "femeta/training.py").train
        solver = load_revision(args.revision, "femeta/solvers/newton_sor.py")
        femeta.experiments.newton_sor = solver.newton_sor
    start = time.perf_counter()

    def on_epoch(record: EpochRecord) -> None:
        print(
            f"epoch {record.epoch}: train loss {record.train_loss:.6g}, validation loss "
            f"{record.validation_loss:.6g}, steps skipped {record.skipped_steps}",
            flush=True,
        )

    def checkpoint(state: dict[str, Any]) -> None:
        moments = [entry["exp_avg_sq"] for entry in state["optimizer"]["state"].values()]
        infinite = [int((~torch.isfinite(moment)).sum()) for moment in moments]
        largest = max(float(moment.nan_to_num(0, 0, 0).max()) for moment in moments)
        total = sum(moment.numel() for moment in moments)
        print(
            f"  second moments not finite: {sum(infinite)} of {total} (per parameter tensor: "
            f"{infinite}); largest finite {largest:.3g}",
            flush=True,
        )
        if state["epoch"] >= args.stop:
            raise _Stop

    def train(*positional: Any) -> Any:
        # train(metasolver, objective, train, validation, config, on_epoch, checkpoint,
        #       checkpoint_seconds, resume, monitor): every epoch goes to our checkpoint.
        return base_train(*positional[:6], checkpoint, 0.0, *positional[8:])

    femeta.workflow.train = train
    with tempfile.TemporaryDirectory() as out, contextlib.suppress(_Stop):
        femeta.workflow._train(options, Path(out), on_epoch, 0.0, None, False, "cpu")
    print(f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
