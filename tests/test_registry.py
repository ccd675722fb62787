"""A new experiment is one class and one registry line: a toy one, trained through the CLI."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pytest
import torch
from torch import Tensor, nn

from femeta import cli
from femeta.experiments import EXPERIMENTS, Experiment, Option, TrainDefaults, register
from femeta.problems.base import TaskSet
from femeta.solvers import SolverResult, jacobi

SIZE = Option("size", int, "unknowns of the toy system.", default=6, minimum=2,
              evaluate="unknowns of the test systems.")  # fmt: skip
SPLITS = {"train": 64, "validation": 16, "test": 24}


class LinearGuess(nn.Module):
    """x0 = W b, starting at the zero guess."""

    def __init__(self, size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(size, size, dtype=torch.float64))

    def forward(self, b: Tensor) -> Tensor:
        return b @ self.weight.T


@dataclass
class ToyJacobi(Experiment):
    """Jacobi on ``tridiag(-1, 4, -1) x = b`` with a learned linear initial guess."""

    name: ClassVar[str] = "toy"
    solver_name: ClassVar[str] = "jacobi"
    label: ClassVar[str] = "the toy guess"
    predicts: ClassVar[str] = "initial guess"
    features: ClassVar[str] = "b"
    evaluation_cap: ClassVar[int] = 500
    surrogate_cap: ClassVar[int] = 100
    options: ClassVar[tuple[Option, ...]] = (SIZE,)
    train_defaults: ClassVar[TrainDefaults] = TrainDefaults(epochs=3, batch_size=16, lr=0.05, m=4)

    size: int = SIZE.default
    device: torch.device = field(default=torch.device("cpu"), repr=False)

    def __post_init__(self) -> None:
        self.check_params()
        self.matrix = 4 * torch.eye(self.size, dtype=torch.float64)
        self.matrix -= torch.diag(torch.ones(self.size - 1, dtype=torch.float64), 1)
        self.matrix -= torch.diag(torch.ones(self.size - 1, dtype=torch.float64), -1)

    def tasks(self, split: str, seed: int) -> TaskSet:
        offset = list(SPLITS).index(split)
        generator = torch.Generator().manual_seed(1000 * seed + offset)
        b = torch.randn(SPLITS[split], self.size, generator=generator, dtype=torch.float64)
        solution = torch.linalg.solve(self.matrix, b.T).T
        return TaskSet({"b": b, "solution": solution})

    def metasolver(self, kind: str, train_tasks: TaskSet | None = None) -> nn.Module:
        return LinearGuess(self.size)  # "base" (the zero guess) and "nn" start alike

    def model_spec(self, train_tasks: TaskSet) -> dict[str, Any]:
        return {"network": "LinearGuess", "features": ["b"]}

    def solve(
        self, metasolver: nn.Module, tasks: TaskSet, tol: float | None, max_iterations: int
    ) -> SolverResult:
        return jacobi(self.matrix, tasks["b"], metasolver(tasks["b"]), tol=tol,
                      max_iterations=max_iterations, reference=tasks["solution"])  # fmt: skip


@pytest.fixture
def toy():
    register(ToyJacobi)  # the one line a new experiment needs
    yield
    del EXPERIMENTS[ToyJacobi.name]
    cli.declare_problem_options()


def run(capsys, *args: Any) -> str:
    """``femeta ARGS`` in this process; its standard output."""
    with pytest.raises(SystemExit) as stopped:
        cli.main([str(arg) for arg in args])
    captured = capsys.readouterr()
    assert stopped.value.code == 0, captured.err
    return captured.out


def test_a_registered_experiment_trains_and_evaluates_through_the_cli(toy, tmp_path, capsys):
    out = tmp_path / "run"
    said = run(capsys, "train", "toy", "--size", 5, "--loss", "m", "--out", out)
    assert said.startswith(f"saved {out}: kept epoch")
    config = json.loads((out / "config.json").read_text())
    assert (config["problem"], config["problem_params"]) == ("toy", {"size": 5})
    assert config["options"]["epochs"] == 3 and config["options"]["m"] == 4
    history = json.loads((out / "history.json").read_text())
    assert len(history) == 3 and history[-1]["train_loss"] < history[0]["train_loss"]

    model = json.loads(run(capsys, "evaluate", "toy", "--model", out, "--json"))
    base = json.loads(run(capsys, "evaluate", "toy", "--baseline", "base", "--size", 5, "--json"))
    assert model["n_tasks"] == base["n_tasks"] == SPLITS["test"]
    assert model["convergence_ratio"] == 1.0
    # Trained on L_4, the guess starts the solves closer: fewer iterations than from zero.
    assert model["mean_iterations"] < base["mean_iterations"]
    assert "--size" in run(capsys, "train", "--help")


def test_a_registered_experiments_options_are_checked(toy, tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        cli.main(["train", "toy", "--size", "1", "--out", str(tmp_path / "x")])
    assert stopped.value.code == 2 and "size must be an integer >= 2" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stopped:
        cli.main(["train", "poisson1d", "--size", "4", "--out", str(tmp_path / "y")])
    assert stopped.value.code == 2 and "--size applies to the toy guess only" in (
        capsys.readouterr().err
    )
