"""Train the beam's Psi_nn with another weight gamma of the ICF penalty than the paper's 500.

Run from the repository root, with femeta importable (installed, or ``PYTHONPATH=.``)::

    .venv/bin/python benchmarks/elasticity_gamma.py 2000 --m 2430 --out runs/NAME

An experiment, not a femeta option: the training is ``femeta train elasticity
--smooth 0.25 --engine petsc --workers 2 --epochs 200 --select loss --no-monitor
--m M`` with ``ElasticityIccg.gamma`` set for this process. The run directory's
``config.json`` does not record gamma, so the script writes it to ``gamma.json``
beside it. Evaluate with ``femeta evaluate elasticity --model runs/NAME``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from femeta.experiments import ElasticityIccg
from femeta.workflow import TrainOptions, train_metasolver


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gamma", type=float, help="weight of the ICF penalty (the paper: 500)")
    parser.add_argument("--m", type=int, default=243, help="training cap (243 = N)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if not args.gamma > 0:
        parser.error(f"gamma must be positive, got {args.gamma}")
    torch.set_num_threads(1)
    ElasticityIccg.gamma = args.gamma
    options = TrainOptions(
        problem="elasticity", smooth=0.25, engine="petsc", workers=args.workers, m=args.m,
        epochs=200,
    )  # fmt: skip
    _, _, result = train_metasolver(options, out=args.out)
    (args.out / "gamma.json").write_text(json.dumps({"gamma": args.gamma}) + "\n")
    loss = result.best_validation_loss
    print(f"saved {args.out}: gamma {args.gamma:g}, kept epoch {result.best_epoch} "
          f"(validation loss {loss:.3f})")  # fmt: skip


if __name__ == "__main__":
    main()
