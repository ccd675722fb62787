"""Experiments: which problem, solver, meta-solver and losses go together.

An experiment is the glue of the paper's framework: it turns a task set into
solver calls and builds the objective the trainer minimises. ``EXPERIMENTS``
maps a problem name (as used on the command line) to its experiment class.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from femeta.losses import error_after_m, iteration_surrogate
from femeta.metasolvers import EigenbasisGuess, ZeroGuess
from femeta.problems.base import TaskSet
from femeta.problems.poisson1d import Poisson1D
from femeta.solvers import SolverResult, jacobi
from femeta.training import Objective

__all__ = ["EXPERIMENTS", "Poisson1DJacobi", "get_experiment", "resolve_device"]


@dataclass
class Poisson1DJacobi:
    """Initial guesses for the Jacobi method on 1D Poisson tasks (§2.2.1, §3.1.2, Table 3).

    The error measure is the relative error to the exact solution, as in the paper.
    Tasks, matrix and meta-solvers live on ``device``; sampling is done on the CPU,
    so the tasks are the same on every device.
    """

    name: ClassVar[str] = "poisson1d"
    solver_name: ClassVar[str] = "jacobi"
    predicts: ClassVar[str] = "initial guess (coefficients in the eigenvector basis)"
    features: ClassVar[str] = "f, the source vector at the N grid points, not normalised"
    #: Cap for evaluation: high enough that every Table 3 configuration converges.
    evaluation_cap: ClassVar[int] = 10_000
    #: Cap of the surrogate's Phi_{eps,m} during training when none is given.
    surrogate_cap: ClassVar[int] = 1000

    n: int = 16
    p: float = 0.0
    device: torch.device = field(default=torch.device("cpu"), repr=False)
    problem: Poisson1D = field(init=False, repr=False)
    matrix: Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.device = torch.device(self.device)
        self.problem = Poisson1D(self.n, self.p)
        self.matrix = self.problem.matrix().to(self.device)

    def params(self) -> dict[str, Any]:
        """What identifies the task space (saved with a model)."""
        return {"n": self.n, "p": self.p}

    def tasks(self, split: str, seed: int) -> TaskSet:
        return self.problem.split(split, seed).to(self.device)

    def metasolver(self, kind: str) -> nn.Module:
        """``base`` (Psi_base, the zero guess) or ``nn`` (Psi_nn of Appendix C.1)."""
        if kind == "base":
            return ZeroGuess(self.n).to(self.device)
        if kind == "nn":
            guess = EigenbasisGuess(self.problem.eigenvectors, hidden=(15, 15), activation="silu")
            return guess.to(self.device)
        raise ValueError(f"unknown meta-solver {kind!r} for {self.name}; expected 'base' or 'nn'")

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

    def objective(self, loss: str, m: int, tol: float | None, gain: float = 1.0) -> Objective:
        """L_m after exactly ``m`` iterations, or the surrogate with Phi_{tol,m}."""
        if loss == "m":
            return lambda psi, tasks: error_after_m(self.solve(psi, tasks, None, m))
        if loss == "surrogate":
            if tol is None:
                raise ValueError("the surrogate loss needs a training tolerance (--tol)")
            return lambda psi, tasks: iteration_surrogate(self.solve(psi, tasks, tol, m), tol, gain)
        raise ValueError(f"unknown loss {loss!r}; expected 'm' or 'surrogate'")


EXPERIMENTS: dict[str, Callable[..., Poisson1DJacobi]] = {"poisson1d": Poisson1DJacobi}


def resolve_device(name: str | torch.device) -> torch.device:
    """``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``, checked."""
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"unknown device {name!r}; use auto, cpu or cuda") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but torch sees no CUDA GPU; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {name!r} is not supported; use auto, cpu or cuda")
    return device


def get_experiment(name: str, **params: Any) -> Poisson1DJacobi:
    """The experiment registered under ``name``, built with ``params``."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown problem {name!r}; expected one of {sorted(EXPERIMENTS)}")
    return EXPERIMENTS[name](**params)
