"""Initial guesses for the Jacobi method on 1D Poisson tasks (§2.2.1, §3.1.2, Table 3)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from femeta.experiments.base import Experiment, Option, TrainDefaults
from femeta.metasolvers import (
    EigenbasisGuess,
    ScaledMLP,
    ZeroGuess,
    pca_whitening,
    zero_output_layer,
)
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
    #: The best known set-up (docs/results.md, Table 3): Adam (betas 0.9, 0.999), batch 64,
    #: lr 3e-3 decayed to 0 along a cosine over 700 epochs, and the moving average of the
    #: weights (0.99 per step), validated every 5 epochs; the network of
    #: :meth:`training_metasolver`; the surrogate's gain 0.25, under which the iterations
    #: long before the tolerance still count a little less than 1 and so take part in the
    #: gradient (with gain 1 the last few iterations alone give it).
    recommended_train: ClassVar[TrainDefaults] = TrainDefaults(
        epochs=700, batch_size=64, lr=3e-3, m=25, schedule="cosine", betas=(0.9, 0.999),
        ema=0.99, validate_every=5, gain=0.25,
    )  # fmt: skip
    #: SiLU(z + c) - c of the recommended network's hidden units (:class:`ScaledMLP`).
    activation_shift: ClassVar[float] = 20.0

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

    def training_metasolver(self, train_tasks: TaskSet, paper: bool) -> nn.Module:
        """Psi_nn as trained: the paper's network, or (without ``paper``) the recommended one.

        The recommended network starts at the zero guess (Psi_base: output layer
        zeroed) and trains between the PCA whitening of the training ``f`` and,
        per output, the spread over the training tasks of the exact solution's
        coefficient in the eigenbasis: the low modes' coefficients are orders of
        magnitude larger than the high ones', which Adam's equal steps would
        otherwise leave untrained. Its hidden units compute ``SiLU(z + 20) - 20``,
        nearly the identity: the solution map is linear, and Jacobi needs the
        slowly damped modes of the guess to about 1e-5, a precision the network
        reaches from SiLU's nearly linear range and not from its curved one near 0.
        All of it is folded into the plain network after training.
        """
        guess = self.metasolver("nn")
        if paper:
            return guess
        features, solutions = train_tasks["f"], train_tasks["solution"]
        basis = self.problem.eigenvectors.to(solutions)
        coefficients = torch.linalg.solve(basis, solutions.T).T
        guess.network = ScaledMLP(
            zero_output_layer(guess.network),
            pca_whitening(features),
            coefficients.std(dim=0).clamp_min(1e-8),
            self.activation_shift,
        )
        return guess

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
