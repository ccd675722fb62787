"""Variants of poisson1d's training recipe, and where each leaves Jacobi's iterations (Table 3).

Trains Psi_nn as ``femeta train poisson1d`` does (the recommended network and Adam
schedule, on the tasks of seed 0) with one thing changed, then prints the mean Jacobi
iterations from its guess on the 1000 test tasks at eps = 1e-6 (cap 10 000), for the easy
(P2) and hard (P1) tasks apart, and the relative error of the guess in each
eigenmode on the easy tasks (modes 1 and 16 are the ones Jacobi damps slowest).

- ``--shift C``: the hidden units compute SiLU(z + C) - C (0: plain SiLU);
- ``--batch-size``, ``--epochs``, ``--lr``: Adam's (``--epochs 0``: no Adam);
- ``--lbfgs-start N``: N full-batch L-BFGS iterations on the relative squared
  error of the guess (supervised, L_0) before Adam;
- ``--lbfgs-finetune N``: N full-batch L-BFGS iterations on the loss after Adam;
- ``--seed``: of the initial weights and the batches (the tasks stay seed 0's).

Run: python benchmarks/studies/poisson_recipe.py [--p 0.01] [--shift 20] [--batch-size 64]
[--epochs 700] [--lr 3e-3] [--loss surrogate|m] [--m 1000] [--gain 0.25] [--lbfgs-start 0]
[--lbfgs-finetune 0] [--seed 0]
"""

from __future__ import annotations

import argparse
import time

import torch

from femeta.experiments import get_experiment
from femeta.training import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--p", type=float, default=0.01)
    parser.add_argument("--shift", type=float, default=20.0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=700)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--loss", choices=("surrogate", "m"), default="surrogate")
    parser.add_argument("--m", type=int, default=1000, help="the solve's cap, or L_m's m")
    parser.add_argument("--eps", type=float, default=1e-6, help="the training tolerance")
    parser.add_argument("--gain", type=float, default=0.25, help="the surrogate's gain")
    parser.add_argument("--lbfgs-start", type=int, default=0)
    parser.add_argument("--lbfgs-finetune", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    experiment = get_experiment("poisson1d", p=args.p)
    splits = ("train", "validation", "test")
    train_tasks, validation, test = (experiment.tasks(split, 0) for split in splits)
    torch.manual_seed(args.seed)
    psi = experiment.training_metasolver(train_tasks, paper=False)
    psi.network.activation_shift = args.shift
    objective = experiment.objective(
        args.loss, args.m, args.eps if args.loss == "surrogate" else None, args.gain
    )

    def report(stage: str) -> None:
        with torch.no_grad():
            guess = psi(test["f"])
            result = experiment.solve(psi, test, 1e-6, 10_000)
        hard, iterations = test["hard"], result.iterations.double()
        basis = experiment.problem.eigenvectors
        error = torch.linalg.solve(basis, (guess - test["solution"]).T).T * basis.norm(dim=0)
        modes = (error / test["solution"].norm(dim=1, keepdim=True))[~hard].square().mean(0).sqrt()
        print(
            f"{stage}: {iterations.mean():.2f} iterations (easy {iterations[~hard].mean():.2f}, "
            f"hard {iterations[hard].mean():.1f}), {time.perf_counter() - start:.0f} s; "
            f"easy tasks' error by mode: {' '.join(f'{e:.0e}' for e in modes.tolist())}",
            flush=True,
        )

    if args.lbfgs_start:
        solution = train_tasks["solution"]

        def supervised() -> torch.Tensor:
            error = (psi(train_tasks["f"]) - solution).norm(dim=1) / solution.norm(dim=1)
            return error.square().mean()

        _lbfgs(psi, supervised, args.lbfgs_start)
        report(f"after {args.lbfgs_start} L-BFGS iterations on L_0")
    if args.epochs:
        config = experiment.train_config(
            args.epochs, args.batch_size, args.lr, args.seed, paper=False
        )
        train(psi, objective, train_tasks, validation, config)
        report(f"after {args.epochs} epochs of Adam on {args.loss}")
    if args.lbfgs_finetune:
        _lbfgs(psi, lambda: objective(psi, train_tasks).mean(), args.lbfgs_finetune)
        report(f"after {args.lbfgs_finetune} L-BFGS iterations on {args.loss}")


def _lbfgs(psi: torch.nn.Module, loss, iterations: int) -> None:
    """Full-batch L-BFGS (strong Wolfe line search) for ``iterations`` iterations."""
    psi.train()
    optimizer = torch.optim.LBFGS(
        psi.parameters(), max_iter=iterations, history_size=50, line_search_fn="strong_wolfe",
        tolerance_grad=0.0, tolerance_change=0.0,
    )  # fmt: skip

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        value = loss()
        value.backward()
        return value

    optimizer.step(closure)


if __name__ == "__main__":
    main()
