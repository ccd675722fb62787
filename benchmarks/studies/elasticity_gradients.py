"""Per-task derivatives of the surrogate in log(alpha) for a (trained) beam meta-solver.

Run from the repository root, with femeta importable (installed, or ``PYTHONPATH=.``)::

    .venv/bin/python benchmarks/studies/elasticity_gradients.py RUN_OR_CHECKPOINT \\
        [--tasks 128] [--smooth H]

For the first ``--tasks`` training beams it takes the shifts the meta-solver
predicts (from a finished run directory, or the current weights of an
interrupted run's ``checkpoint.pt``), solves with ICCG to 1e-6 (cap N), and
prints the distribution of ``d L~ / d log(alpha)`` over the tasks whose IC(0)
succeeds, beside the pull of the ICF penalty (``-500`` per failed task). It
shows how far a few tasks dominate a batch's gradient. With ``--smooth H`` it
prints the same for the slope that ``femeta train --smooth H`` uses instead:
the central difference of the surrogate over ``alpha exp(+-H)``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import Tensor, nn

from femeta.losses import iteration_surrogate
from femeta.solvers.iccg import iccg
from femeta.workflow import build_experiment, load_metasolver, read_checkpoint


class _Shifts(nn.Module):
    """Given shifts, one per task, parametrised by their logarithms."""

    def __init__(self, alpha: Tensor):
        super().__init__()
        self.log_alpha = nn.Parameter(alpha.log())

    def forward(self, features: Tensor) -> Tensor:
        return self.log_alpha.exp()


def _report(name: str, grad: Tensor, ok: Tensor) -> None:
    quantiles = torch.tensor([0.0, 0.01, 0.1, 0.5, 0.9, 0.99, 1.0], dtype=torch.float64)
    values = torch.quantile(grad[ok], quantiles)
    print(f"{name} quantiles (0, 1, 10, 50, 90, 99, 100 %):")
    print("  " + ", ".join(f"{v:.3g}" for v in values.tolist()))
    top = grad[ok].abs().sort(descending=True).values
    share = float(top[:5].sum() / top.sum())
    print(f"sum over successful tasks: {float(grad[ok].sum()):.4g}; |largest 5| share {share:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="run directory or checkpoint.pt")
    parser.add_argument("--tasks", type=int, default=128)
    parser.add_argument("--tol", type=float, default=1e-6)
    parser.add_argument("--smooth", type=float, default=None, help="also the smoothed slope")
    args = parser.parse_args()
    torch.set_num_threads(1)

    if args.run.is_dir():
        experiment, metasolver = load_metasolver(args.run, "elasticity")
    else:
        options, trainer = read_checkpoint(args.run)
        experiment = build_experiment(options, "cpu")
        metasolver = experiment.metasolver("nn")
        metasolver.load_state_dict(trainer["model"])
    tasks = experiment.tasks("train", 0).subset(slice(0, args.tasks))
    with torch.no_grad():
        alpha = metasolver(tasks["features"])
    log_alpha = alpha.log().requires_grad_()
    cap = experiment.evaluation_cap
    A = experiment.matrices(tasks["A"])
    result = iccg(A, tasks["b"], log_alpha.exp(), tol=args.tol, max_iterations=cap)
    (grad,) = torch.autograd.grad(iteration_surrogate(result, args.tol).sum(), log_alpha)
    ok = ~result.factorization_failed
    print(f"{len(tasks)} training beams, tol {args.tol:g}, cap {cap}")
    print(f"IC(0) failed: {int((~ok).sum())}; ICF penalty pull: {-500 * int((~ok).sum())}")
    print("alpha quantiles 0/50/100%:", ", ".join(f"{v:.3g}" for v in alpha.quantile(
        torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)).tolist()))  # fmt: skip
    _report("d L~/d log(alpha)", grad, ok)
    if args.smooth is not None:
        shifts = _Shifts(alpha)
        objective = experiment.objective("surrogate", cap, args.tol, smooth=args.smooth)
        objective(shifts, tasks).sum().backward()
        _report(f"central difference over alpha exp(+-{args.smooth:g})", shifts.log_alpha.grad, ok)


if __name__ == "__main__":
    main()
