"""Learn Jacobi initial guesses for 1D Poisson tasks and compare with the zero guess.

Run: python examples/poisson_initial_guess.py [--epochs 300]
"""

from __future__ import annotations

import argparse

from femeta.experiments import get_experiment
from femeta.workflow import TrainOptions, evaluate_metasolver, train_metasolver


def main(epochs: int = 300, p: float = 0.01, tol: float = 1e-6) -> dict[str, float]:
    options = TrainOptions(loss="surrogate", tol=tol, p=p, epochs=epochs)
    experiment, learned, result = train_metasolver(options)
    baseline = get_experiment("poisson1d", p=p).metasolver("base")
    means = {
        "base": evaluate_metasolver(experiment, baseline, tol).mean_iterations,
        "learned": evaluate_metasolver(experiment, learned, tol).mean_iterations,
    }
    print(f"mean Jacobi iterations to {tol:g} on 1000 test tasks (p = {p}):")
    print(f"  zero initial guess (Psi_base): {means['base']:.2f}")
    print(f"  learned, {epochs} epochs (best epoch {result.best_epoch}): {means['learned']:.2f}")
    return means


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--p", type=float, default=0.01)
    args = parser.parse_args()
    main(args.epochs, args.p)
