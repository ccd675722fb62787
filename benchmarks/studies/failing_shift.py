"""Where IC(0) starts to fail on the beams, with each ``--ic-pattern``.

Run from the repository root, with femeta importable (installed, or ``PYTHONPATH=.``)::

    .venv/bin/python benchmarks/studies/failing_shift.py [--split test]

For each pattern it prints the shift below which IC(0) fails (bisected in log alpha):
for two tasks that are the same beam (lambda and mu divided by 10), along a line of
widths at lambda / mu = 0.6, and, with ``--split``, how well a smooth function of
``(log W, log lambda/mu)`` fitted on the training beams predicts it on that split.
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch

from femeta.experiments import IC_PATTERNS, ElasticityIccg
from femeta.solvers.iccg import iccg


def failing_shift(A: torch.Tensor, pattern: torch.Tensor | None) -> np.ndarray:
    """Per task, log10 of the smallest shift (down to 1e-6) at which IC(0) succeeds."""
    low = torch.full((A.shape[0],), math.log(1e-6), dtype=torch.float64)
    high = torch.zeros(A.shape[0], dtype=torch.float64)
    b = torch.ones(A.shape[:2], dtype=torch.float64)
    for _ in range(30):
        middle = (low + high) / 2
        failed = iccg(A, b, middle.exp(), tol=None, max_iterations=0, pattern=pattern)
        low = torch.where(failed.factorization_failed, middle, low)
        high = torch.where(failed.factorization_failed, high, middle)
    return (high / math.log(10)).numpy()


def polynomial(x: np.ndarray, centre: np.ndarray, scale: np.ndarray, degree: int) -> np.ndarray:
    u, v = ((x - centre) / scale).T
    return np.stack([u**i * v**j for i in range(degree + 1) for j in range(degree + 1 - i)], 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", choices=["validation", "test"], default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    same = torch.tensor([[0.004, 0.6, 1.0, 1.0], [0.004, 0.06, 0.1, 1.0]], dtype=torch.float64)
    widths = torch.logspace(math.log10(0.003), math.log10(0.006), 30, dtype=torch.float64)
    ones = torch.ones_like(widths)
    line = torch.stack([widths, 0.6 * ones, ones, ones], dim=1)
    for name in IC_PATTERNS:
        experiment = ElasticityIccg(ic_pattern=name)
        beam, pattern = experiment.problem, None  # the matrices carry IC(0)'s pattern
        pair = failing_shift(experiment.matrices(beam.assemble(same)[0]), pattern)
        along = failing_shift(experiment.matrices(beam.assemble(line)[0]), pattern)
        jumps = int((np.abs(np.diff(along)) > 0.1).sum())
        print(f"{name}: the same beam twice fails below 10^{pair[0]:.3f} and 10^{pair[1]:.3f}")
        print(f"  W from 0.003 to 0.006 (30 points, lambda/mu 0.6): log10 shift from "
              f"{along.min():.2f} to {along.max():.2f}, {jumps} steps of more than 0.1 "
              f"between neighbours: {np.round(along, 2).tolist()}")  # fmt: skip
        if args.split is None:
            continue
        fitted = {}
        for split in ("train", args.split):
            tasks = experiment.tasks(split, 0)
            params = tasks["params"].numpy()
            x = np.stack([np.log(params[:, 0]), np.log(params[:, 1] / params[:, 2])], 1)
            fitted[split] = (x, failing_shift(experiment.matrices(tasks["A"]), pattern))
        x, y = fitted["train"]
        keep = y > -5.99  # beams that fail somewhere above 1e-6
        centre, scale = x.mean(0), x.std(0)
        for degree in (4, 8):
            coefficients, *_ = np.linalg.lstsq(
                polynomial(x[keep], centre, scale, degree), y[keep], rcond=None
            )
            x_test, y_test = fitted[args.split]
            mask = y_test > -5.99
            error = polynomial(x_test[mask], centre, scale, degree) @ coefficients - y_test[mask]
            print(f"  degree-{degree} fit on train, on {args.split} ({int(mask.sum())} beams): "
                  f"error in log10 shift: std {error.std():.3f}, "
                  f"95th percentile of |error| {np.quantile(np.abs(error), 0.95):.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
