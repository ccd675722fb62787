"""Initial guesses for the Jacobi method on 1D Poisson tasks (§2.2.1, §3.1.2, Table 3)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from femeta.experiments.base import Experiment, Option, TrainDefaults
from femeta.metasolvers import EigenbasisGuess, ZeroGuess
from femeta.problems.base import TaskSet
from femeta.problems.poisson1d import Poisson1D
from femeta.solvers import SolverResult, jacobi

__all__ = ["P", "Poisson1DJacobi"]

#: The weight of the hard distribution P1 (Poisson1D checks that it is a probability).
P = Option(
    "p",
    float,
    "weight of the hard distribution P1.",
    default=0.0,
    evaluate="weight of P1 in the test tasks.",
)


@dataclass
class Poisson1DJacobi(Experiment):
    """Initial guesses for the Jacobi method on 1D Poisson tasks (§2.2.1, §3.1.2, Table 3).

    The error measure is the relative error to the exact solution, as in the paper.
    Tasks, matrix and meta-solvers live on ``device``; sampling is done on the CPU,
    so the tasks are the same on every device.
    """

    name: ClassVar[str] = "poisson1d"
    solver_name: ClassVar[str] = "jacobi"
    label: ClassVar[str] = "the poisson1d initial guess"
    predicts: ClassVar[str] = "initial guess (coefficients in the eigenvector basis)"
    features: ClassVar[str] = "f, the source vector at the N grid points, not normalised"
    default_tol: ClassVar[float] = 1e-6
    #: Cap for evaluation: high enough that every Table 3 configuration converges.
    evaluation_cap: ClassVar[int] = 10_000
    #: Cap of the surrogate's Phi_{eps,m} during training when none is given.
    surrogate_cap: ClassVar[int] = 1000
    options: ClassVar[tuple[Option, ...]] = (P,)
    #: Appendix C.1: Adam (betas 0.999), lr 0.01 cut by 5 on a 100-epoch plateau; L_25.
    train_defaults: ClassVar[TrainDefaults] = TrainDefaults(
        epochs=2500, batch_size=256, lr=0.01, m=25, schedule="plateau"
    )

    n: int = 16
    p: float = P.default
    device: torch.device = field(default=torch.device("cpu"), repr=False)
    problem: Poisson1D = field(init=False, repr=False)
    matrix: Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.device = torch.device(self.device)
        self.check_params()
        self.problem = Poisson1D(self.n, self.p)
        self.matrix = self.problem.matrix().to(self.device)

    def params(self) -> dict[str, Any]:
        return {"n": self.n, "p": self.p}

    def tasks(self, split: str, seed: int) -> TaskSet:
        return self.problem.split(split, seed).to(self.device)

    def metasolver(self, kind: str, train_tasks: TaskSet | None = None) -> nn.Module:
        """``base`` (Psi_base, the zero guess) or ``nn`` (Psi_nn of Appendix C.1).

        Neither needs the training tasks; ``train_tasks`` is accepted and unused.
        """
        if kind == "base":
            return ZeroGuess(self.n).to(self.device)
        if kind == "nn":
            guess = EigenbasisGuess(self.problem.eigenvectors, hidden=(15, 15), activation="silu")
            return guess.to(self.device)
        raise ValueError(f"unknown meta-solver {kind!r} for {self.name}; expected 'base' or 'nn'")

    def model_spec(self, train_tasks: TaskSet) -> dict[str, Any]:
        """How :mod:`femeta.model` applies the trained network (saved with it)."""
        return {"network": "EigenbasisGuess", "features": ["f"]}

    def solve(
        self, metasolver: nn.Module, tasks: TaskSet, tol: float | None, max_iterations: int
    ) -> SolverResult:
        """Phi(tau; Psi(tau)): Jacobi from the meta-solver's initial guess."""
        x0 = metasolver(tasks["f"])
        return jacobi(
            self.matrix,
            tasks["f"],
            x0,
            tol=tol,
            max_iterations=max_iterations,
            reference=tasks["solution"],
        )
