"""Experiments: which problem, solver, meta-solver and losses go together.

An experiment is the glue of the paper's framework: it turns a task set into
solver calls and builds the objective the trainer minimises. ``EXPERIMENTS``
maps a problem name (as used on the command line) to its experiment class.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from functools import partial
from types import MappingProxyType
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from femeta._io import write_atomic
from femeta.evaluation import IterationStats
from femeta.losses import error_after_m, icf_penalty, iteration_surrogate
from femeta.metasolvers import (
    ConstantShift,
    EigenbasisGuess,
    NewtonSorNet,
    PetscDefaultShift,
    PreviousStep,
    ShiftGrid,
    ShiftNet,
    ZeroGuess,
)
from femeta.problems.base import TaskSet
from femeta.problems.elasticity import ElasticBeam, default_cache_dir
from femeta.problems.poisson1d import Poisson1D
from femeta.problems.robertson import RATE_RANGES, Robertson, backward_euler_system
from femeta.runs import tasks_digest
from femeta.solvers import SolverResult, jacobi
from femeta.solvers.iccg import IccgResult, iccg
from femeta.solvers.newton_sor import NonlinearSystem, newton_sor
from femeta.solvers.petsc import PetscIccg, default_icc
from femeta.training import Objective, TrainConfig

__all__ = [
    "EXPERIMENTS",
    "TRAIN_DEFAULTS",
    "ElasticityIccg",
    "Experiment",
    "Poisson1DJacobi",
    "RobertsonNewtonSor",
    "available_cores",
    "get_experiment",
    "resolve_device",
]

# A solve's result and its per-task loss.
_Solved = tuple[IccgResult, Tensor]
# Solves ``A x = b`` at each of several shifts: (A, b, alphas, tol, max_iterations).
_ShiftsSolver = Callable[[Tensor, Tensor, list[Tensor], float | None, int], list[IccgResult]]
#: The sparsity patterns that the beams' IC(0) can keep (:class:`ElasticityIccg`).
IC_PATTERNS = ("values", "stored")
#: The options of ``femeta train`` whose default an experiment picks: :meth:`recommended_options`
#: gives the best known values, :attr:`paper_options` the paper's. ``smooth`` is the step of the
#: smoothed derivative (0: the exact derivative), ``engine`` and ``workers`` run the training
#: solves, ``inputs`` is what Psi_nn sees; ``None`` where an option does not apply.
TRAIN_DEFAULTS = ("smooth", "engine", "workers", "inputs")
#: The paper's settings of :data:`TRAIN_DEFAULTS` where no option but the engine applies.
_TORCH_ONLY: Mapping[str, Any] = MappingProxyType({"engine": "torch", "workers": 1})
#: What Psi_nn of the beams sees (``ElasticityIccg.inputs``), described.
BEAM_INPUTS = {
    "paper": "W, lambda, mu, rho, ||A||_1, ||A||_inf, ||A||_F (log, standardised)",
    "invariant": "W, lambda/mu (log, standardised): all that ICCG(alpha) depends on",
}


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
    default_tol: ClassVar[float] = 1e-6
    #: Cap for evaluation: high enough that every Table 3 configuration converges.
    evaluation_cap: ClassVar[int] = 10_000
    #: Cap of the surrogate's Phi_{eps,m} during training when none is given.
    surrogate_cap: ClassVar[int] = 1000
    #: What ``femeta evaluate --baseline`` takes: Psi_base, the zero guess.
    baselines: ClassVar[tuple[str, ...]] = ("base",)
    #: What solves ``stats`` can run on (``femeta evaluate --engine``).
    engines: ClassVar[tuple[str, ...]] = ("torch",)
    #: The paper's training settings (Table 3), which are also the best known here.
    paper_options: ClassVar[Mapping[str, Any]] = _TORCH_ONLY

    n: int = 16
    p: float = 0.0
    device: torch.device = field(default=torch.device("cpu"), repr=False)
    problem: Poisson1D = field(init=False, repr=False)
    matrix: Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.device = torch.device(self.device)
        self.problem = Poisson1D(self.n, self.p)
        self.matrix = self.problem.matrix().to(self.device)

    @classmethod
    def recommended_options(cls, given: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
        """The paper's settings (:attr:`paper_options`): no better ones are known here."""
        return dict(cls.paper_options)

    def params(self) -> dict[str, Any]:
        """What identifies the task space (saved with a model)."""
        return {"n": self.n, "p": self.p}

    def tasks(self, split: str, seed: int) -> TaskSet:
        return self.problem.split(split, seed).to(self.device)

    def default_m(self, loss: str) -> int:
        """``m`` when none is given: 25 for L_m, :attr:`surrogate_cap` for the surrogate."""
        return 25 if loss == "m" else self.surrogate_cap

    def train_config(self, epochs: int | None, batch_size: int | None, lr: float | None,
                     seed: int) -> TrainConfig:  # fmt: skip
        """Appendix C.1: Adam (betas 0.999), lr 0.01 cut by 5 on a 100-epoch plateau."""
        return TrainConfig(
            epochs=2500 if epochs is None else epochs,
            batch_size=256 if batch_size is None else batch_size,
            lr=0.01 if lr is None else lr,
            seed=seed,
        )

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

    @torch.no_grad()
    def stats(
        self, metasolver: nn.Module, tasks: TaskSet, tol: float, max_iterations: int
    ) -> IterationStats:
        """L_eps per task: iterations of Phi_{tol, max_iterations} (unconverged: the cap)."""
        result = self.solve(metasolver, tasks, tol, max_iterations)
        return IterationStats.from_result(result, tol, max_iterations)

    def objective(
        self,
        loss: str,
        m: int,
        tol: float | None,
        gain: float = 1.0,
        clip: float | None = None,
        smooth: float | None = None,
        engine: str = "torch",
        workers: int = 1,
        gamma: float | None = None,
    ) -> Objective:
        """L_m after exactly ``m`` iterations, or the surrogate with Phi_{tol,m}."""
        _elasticity_only(clip, smooth, engine, workers, gamma)
        if loss == "m":
            return lambda psi, tasks: error_after_m(self.solve(psi, tasks, None, m))
        if loss == "surrogate":
            if tol is None:
                raise ValueError("the surrogate loss needs a training tolerance (--tol)")
            return lambda psi, tasks: iteration_surrogate(self.solve(psi, tasks, tol, m), tol, gain)
        raise ValueError(f"unknown loss {loss!r}; expected 'm' or 'surrogate'")


@dataclass
class ElasticityIccg:
    """The diagonal shift of ICCG on clamped-beam tasks (§4.2, Table 2, Appendix C.3).

    The error measure is the relative residual. A task whose IC(0) fails counts
    as the cap and is not iterated; in training it costs ``gamma * (-log alpha)``
    instead of the solve loss (``1_success L + gamma 1_fail L_ICF``).

    IC(0) keeps the entries DOLFINx's matrix stores (``ic_pattern="stored"``), as
    PETSc's ICC does in a FEniCS script. With ``"values"`` it keeps each ``A``'s
    nonzeros, and which of those entries cancelled exactly and which to rounding noise
    then moves the shift at which IC(0) fails, on slender beams by up to 1.4 decades.

    Psi_nn sees only ``W`` and ``lambda / mu`` (``inputs="invariant"``, the
    default) or the paper's seven features (``"paper"``): ``A`` is linear
    in ``(lambda, mu)`` and ``b`` in ``rho``, and a shift relative to ``diag(A)`` and
    a relative residual make IC(0) and CG's iterations blind to the scale of
    either, so the best shift is a function of those two numbers alone. With the
    paper's features the network can also tell apart beams that are the same
    problem, and learns the training beams' failure shifts by heart.
    """

    name: ClassVar[str] = "elasticity"
    solver_name: ClassVar[str] = "iccg"
    predicts: ClassVar[str] = "alpha, the diagonal shift of IC(0) relative to diag(A)"
    default_tol: ClassVar[float] = 1e-6
    #: The ICF penalty weight of §4.2.
    gamma: ClassVar[float] = 500.0
    #: The log grid of Psi_best and Psi_base: 31 shifts from 1e-5 to 10.
    alpha_grid: ClassVar[Tensor] = torch.logspace(-5, 1, 31, dtype=torch.float64)
    #: What ``femeta evaluate --baseline`` takes: Psi_base (one shift), Psi_best (per-beam
    #: grid search) and PETSc's ICC with its default shift (what a FEniCS script has).
    baselines: ClassVar[tuple[str, ...]] = ("base", "best", "petsc")
    #: What solves :meth:`stats` can run on (``femeta evaluate --engine``).
    engines: ClassVar[tuple[str, ...]] = ("torch", "petsc")
    #: The paper's training settings: its exact derivative in torch, its seven inputs.
    paper_options: ClassVar[Mapping[str, Any]] = MappingProxyType(
        {"smooth": 0.0, "engine": "torch", "workers": 1, "inputs": "paper"}
    )
    #: The step of the smoothed derivative in log alpha that trains best (docs/results.md).
    recommended_smooth: ClassVar[float] = 0.25

    cells: tuple[int, int, int] = (8, 2, 2)
    #: What IC(0) keeps: ``"stored"``, the entries DOLFINx's matrix stores (the
    #: default); ``"values"``, the nonzeros of each task's ``A`` (what runs saved
    #: without the key used).
    ic_pattern: str = "stored"
    #: Psi_nn's inputs: ``"invariant"`` (W and lambda/mu; the default) or
    #: ``"paper"`` (the seven features; what runs saved without the key used).
    inputs: str = "invariant"
    device: torch.device = field(default=torch.device("cpu"), repr=False)
    problem: ElasticBeam = field(init=False, repr=False)
    _pattern: Tensor | None = field(default=None, init=False, repr=False, compare=False)
    # One PETSc engine per worker count, shared by the objective and the monitor.
    _engines: dict[int, _ShiftsSolver] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        self.device = torch.device(self.device)
        self.cells = tuple(self.cells)
        if self.ic_pattern not in IC_PATTERNS:
            raise ValueError(
                f"unknown ic_pattern {self.ic_pattern!r}; expected one of {list(IC_PATTERNS)}"
            )
        if self.inputs not in BEAM_INPUTS:
            raise ValueError(f"unknown inputs {self.inputs!r}; expected one of {list(BEAM_INPUTS)}")
        self.problem = ElasticBeam(self.cells)

    @property
    def features(self) -> str:
        """What Psi_nn sees."""
        return BEAM_INPUTS[self.inputs]

    @property
    def pattern(self) -> Tensor | None:
        """IC(0)'s sparsity pattern for :func:`iccg` (``None``: each ``A``'s nonzeros)."""
        if self.ic_pattern == "stored" and self._pattern is None:
            self._pattern = self.problem.stored_pattern().to(self.device)
        return self._pattern

    @property
    def evaluation_cap(self) -> int:
        """The paper's cap ``M = N`` (a failed or unconverged solve counts as ``M``)."""
        return self.problem.n

    @property
    def surrogate_cap(self) -> int:
        return self.problem.n

    @classmethod
    def recommended_options(cls, given: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
        """The best known settings, for the options of :data:`TRAIN_DEFAULTS` not ``given``.

        The smoothed derivative (:attr:`recommended_smooth`; the exact one with a
        ``clip``), solved with PETSc on every core when training on the CPU (a
        CUDA device keeps the torch solves), and the invariant inputs. An option
        given is kept, and the others follow it: an exact derivative (``smooth=0``)
        trains in torch, ``engine="torch"`` on one process.
        """
        smooth = given.get("smooth")
        if smooth is None:
            smooth = 0.0 if given.get("clip") is not None else cls.recommended_smooth
        engine = given.get("engine")
        if engine is None:
            engine = "petsc" if smooth > 0 and torch.device(device).type == "cpu" else "torch"
        workers = given.get("workers")
        if workers is None:
            workers = available_cores() if engine == "petsc" else 1
        inputs = "invariant" if given.get("inputs") is None else given["inputs"]
        return {"smooth": smooth, "engine": engine, "workers": workers, "inputs": inputs}

    def params(self) -> dict[str, Any]:
        return {"cells": list(self.cells), "ic_pattern": self.ic_pattern, "inputs": self.inputs}

    def tasks(self, split: str, seed: int) -> TaskSet:
        return self.problem.split(split, seed).to(self.device)

    def default_m(self, loss: str) -> int:
        """``m`` when none is given: 125 (Table 2's best) for L_m, ``N`` for the surrogate."""
        return 125 if loss == "m" else self.surrogate_cap

    def train_config(self, epochs: int | None, batch_size: int | None, lr: float | None,
                     seed: int) -> TrainConfig:  # fmt: skip
        """Appendix C.3: Adam, batch 128, lr 1e-3 cut by 5 at 1/2 and 3/4 of 200 epochs."""
        return _paper_steps(epochs, 128 if batch_size is None else batch_size,
                            1e-3 if lr is None else lr, seed)  # fmt: skip

    def metasolver(self, kind: str, train_tasks: TaskSet | None = None) -> nn.Module:
        """``base`` (constant alpha), ``best`` (per-task grid search), ``petsc`` (PETSc's
        default ICC shift, no alpha) or ``nn`` (the MLP).

        ``base`` is fitted on ``train_tasks`` (:meth:`base_shift`) and ``nn``
        standardises its inputs with their features; without them ``nn`` starts
        unstandardised (for loading saved weights) and ``base`` cannot be built.
        """
        if kind == "base":
            if train_tasks is None:
                raise ValueError("Psi_base is fitted on the training tasks; pass train_tasks")
            return ConstantShift(self.base_shift(train_tasks)).to(self.device)
        if kind == "best":
            return ShiftGrid(self.alpha_grid).to(self.device)
        if kind == "petsc":
            return PetscDefaultShift()
        if kind == "nn":
            names = ElasticBeam.feature_names
            network = ShiftNet(len(names), (128, 128), projection=self._projection())
            if train_tasks is not None:
                network.fit_inputs(train_tasks["features"])
            return network.to(self.device)
        raise ValueError(
            f"unknown meta-solver {kind!r} for {self.name}; expected 'base', 'best', 'petsc' "
            "or 'nn'"
        )

    def _projection(self) -> Tensor | None:
        """What Psi_nn reads of the log features: log W and log lambda - log mu, or all."""
        if self.inputs == "paper":
            return None
        names = ElasticBeam.feature_names
        projection = torch.zeros(2, len(names), dtype=torch.float64)
        projection[0, names.index("W")] = 1.0
        projection[1, names.index("lambda")] = 1.0
        projection[1, names.index("mu")] = -1.0
        return projection

    def model_spec(self, train_tasks: TaskSet) -> dict[str, Any]:
        """How :mod:`femeta.model` applies the trained network, and Psi_base's shift."""
        projection = self._projection()
        material = self.problem.material_range
        return {
            "network": "ShiftNet",
            "features": list(ElasticBeam.feature_names),
            "projection": None if projection is None else projection.tolist(),
            "ranges": {
                "W": self.problem.width_range,
                "lambda": material,
                "mu": material,
                "rho": material,
            },
            "base_alpha": self.base_shift(train_tasks),
        }

    def base_shift(self, tasks: TaskSet) -> float:
        """The smallest grid shift at and above which IC(0) succeeds on every task.

        The grid is scanned downwards and stops at the first shift that fails a task.
        The result is cached on disk, keyed by the tasks and the pattern: the scan
        factorizes every task a dozen times (minutes on a CPU).
        """
        digest = tasks_digest(tasks["A"], tasks["b"], self.alpha_grid)[:24]
        path = default_cache_dir() / f"elasticity-base-{self.ic_pattern}-{digest}.json"
        if path.is_file():
            return float(json.loads(path.read_text())["alpha"])
        chosen = None
        for alpha in self.alpha_grid.flip(0).tolist():
            result = iccg(
                tasks["A"], tasks["b"], alpha, tol=None, max_iterations=0, pattern=self.pattern
            )
            if bool(result.factorization_failed.any()):
                break
            chosen = alpha
        if chosen is None:
            raise ValueError(f"IC(0) fails on some task even at alpha = {self.alpha_grid[-1]:g}")
        write_atomic(path, json.dumps({"alpha": chosen, "ic_pattern": self.ic_pattern}).encode())
        return chosen

    def solve(
        self, metasolver: nn.Module, tasks: TaskSet, tol: float | None, max_iterations: int
    ) -> IccgResult:
        """Phi(tau; Psi(tau)): ICCG with the meta-solver's shift, from a zero guess.

        :class:`PetscDefaultShift` solves with PETSc's ICC of ``A`` and its default shift
        instead, on the same pattern (on the CPU; the result comes back to this device).
        """
        if isinstance(metasolver, ShiftGrid):
            torch_shifts = partial(_torch_shifts, pattern=self.pattern)
            return self._best(metasolver.grid, tasks, tol, max_iterations, torch_shifts, 1)
        if isinstance(metasolver, PetscDefaultShift):
            pattern = None if self.pattern is None else self.pattern.cpu()
            result = default_icc(
                tasks["A"].cpu(), tasks["b"].cpu(), tol=tol, max_iterations=max_iterations,
                pattern=pattern,
            )  # fmt: skip
            return IccgResult(*(getattr(result, f.name).to(self.device) for f in fields(result)))
        alpha = metasolver(tasks["features"])
        return iccg(
            tasks["A"], tasks["b"], alpha, tol=tol, max_iterations=max_iterations,
            pattern=self.pattern,
        )  # fmt: skip

    def _best(
        self, grid: Tensor, tasks: TaskSet, tol: float | None, cap: int,
        solve_shifts: _ShiftsSolver, per_round: int,
    ) -> IccgResult:  # fmt: skip
        """Psi_best: per task, the grid shift's solve with the fewest iterations.

        ``solve_shifts`` solves ``per_round`` shifts of the grid at a time. Ties go
        to the smaller shift. The solves are kept, not repeated: on ill-conditioned
        beams a repeat in another batch can round differently.
        """
        if tol is None:
            raise ValueError("Psi_best minimises iterations to a tolerance; give one")
        shifts = [
            torch.full((len(tasks),), alpha, dtype=torch.float64, device=self.device)
            for alpha in grid.tolist()
        ]
        results = (
            result
            for start in range(0, len(shifts), per_round)
            for result in solve_shifts(
                tasks["A"], tasks["b"], shifts[start : start + per_round], tol, cap
            )
        )
        best: list[Tensor] = []
        best_counts = torch.empty(0)
        for result in results:
            counts = torch.where(result.converged, result.iterations, cap + 1)
            parts = [getattr(result, f.name) for f in fields(result)]
            parts[2] = nn.functional.pad(parts[2], (0, cap + 1 - parts[2].shape[1]))  # history
            if not best:
                best, best_counts = parts, counts
                continue
            better = counts < best_counts
            best_counts = torch.where(better, counts, best_counts)
            best = [
                torch.where(better.view(-1, *[1] * (new.dim() - 1)), new, old)
                for new, old in zip(parts, best, strict=True)
            ]
        longest = int(best[1].max()) + 1
        best[2] = best[2][:, :longest].contiguous()
        return IccgResult(*best)

    @torch.no_grad()
    def stats(
        self, metasolver: nn.Module, tasks: TaskSet, tol: float, max_iterations: int,
        engine: str = "torch", workers: int = 1,
    ) -> IterationStats:  # fmt: skip
        """L_eps per task: iterations of Phi_{tol, max_iterations} (unconverged: the cap).

        ``engine="petsc"`` solves a meta-solver's shifts with :class:`PetscIccg` over
        ``workers`` processes, as training does with that engine; Psi_best's grid
        goes there in one round (PETSc's default shift has its own solve either way).
        """
        if engine not in ("torch", "petsc"):
            raise ValueError(f"unknown engine {engine!r}; expected 'torch' or 'petsc'")
        if engine == "petsc" and isinstance(metasolver, ShiftGrid):
            solve = self._petsc_solver(workers)
            grid = metasolver.grid
            result = self._best(grid, tasks, tol, max_iterations, solve, len(grid))
        elif engine == "petsc" and not isinstance(metasolver, PetscDefaultShift):
            alpha = metasolver(tasks["features"])
            solve = self._petsc_solver(workers)
            (result,) = solve(tasks["A"], tasks["b"], [alpha], tol, max_iterations)
        else:
            result = self.solve(metasolver, tasks, tol, max_iterations)
        return IterationStats.from_result(result, tol, max_iterations)

    def _petsc_solver(self, workers: int) -> _ShiftsSolver:
        """The :class:`PetscIccg` of ``workers`` processes, its results on this device."""
        if workers in self._engines:
            return self._engines[workers]
        engine = PetscIccg(workers)

        def solve(
            A: Tensor, b: Tensor, alphas: list[Tensor], tol: float | None, max_iterations: int
        ) -> list[IccgResult]:
            pattern = None if self.pattern is None else self.pattern.cpu()
            results = engine.many(
                A.cpu(), b.cpu(), [alpha.detach().cpu() for alpha in alphas], tol=tol,
                max_iterations=max_iterations, pattern=pattern,
            )  # fmt: skip
            return [
                IccgResult(*(getattr(result, f.name).to(self.device) for f in fields(result)))
                for result in results
            ]

        self._engines[workers] = solve
        return solve

    def objective(
        self,
        loss: str,
        m: int,
        tol: float | None,
        gain: float = 1.0,
        clip: float | None = None,
        smooth: float | None = None,
        engine: str = "torch",
        workers: int = 1,
        gamma: float | None = None,
    ) -> Objective:
        """``1_success L + gamma 1_fail L_ICF`` with L_m (relative residual) or the surrogate.

        ``gamma`` weighs the ICF penalty (``None``: the paper's :attr:`gamma`, 500).

        ``clip`` and ``smooth`` (``None`` or 0: the paper's exact derivative) are not the
        paper's; both change only the derivative of the solve
        loss in ``log alpha``, never its value or the penalty's derivative. The exact
        derivative of CG's late residuals in alpha is heavy-tailed on these beams: a
        few tasks carry most of a batch's gradient (see docs/results.md, Table 2).

        - ``clip``: each task's derivative is clipped to ``[-clip, clip]``.
        - ``smooth``: each task's derivative is the central difference of the solve
          loss between ``alpha e^-smooth`` and ``alpha e^smooth`` (one-sided where
          IC(0) fails at one end, zero at both), i.e. the slope of the loss on the
          scale of ``smooth`` instead of at ``alpha`` itself. The solves run
          without a tangent, three per task.

        ``engine`` runs those solves: ``"torch"`` (:func:`iccg`) or, with ``smooth``
        only, ``"petsc"`` (:class:`PetscIccg`, one KSP per task, faster on a CPU), over
        ``workers`` processes; the results do not depend on ``workers``.
        """
        if loss not in ("m", "surrogate"):
            raise ValueError(f"unknown loss {loss!r}; expected 'm' or 'surrogate'")
        if loss == "surrogate" and tol is None:
            raise ValueError("the surrogate loss needs a training tolerance (--tol)")
        if smooth == 0 and not isinstance(smooth, bool):
            smooth = None  # a step of 0: the exact derivative
        for name, option in (("clip", clip), ("smooth", smooth)):
            if option is not None and not option > 0:
                raise ValueError(f"{name} must be positive, got {option!r}")
        if smooth is not None and not math.isfinite(smooth):
            raise ValueError(f"smooth must be positive and finite, got {smooth!r}")
        if clip is not None and smooth is not None:
            raise ValueError("give clip or smooth, not both: each replaces the exact derivative")
        if engine not in ("torch", "petsc"):
            raise ValueError(f"unknown engine {engine!r}; expected 'torch' or 'petsc'")
        if engine == "petsc" and smooth is None:
            raise ValueError(
                "--engine petsc needs --smooth: PETSc's solves carry no derivative in alpha, "
                "and only the smoothed slope does without one"
            )
        if engine == "torch" and workers != 1:
            raise ValueError("--workers applies to --engine petsc only")
        gamma = self.gamma if gamma is None else _check_gamma(gamma)
        if engine == "torch":
            solver = partial(_torch_shifts, pattern=self.pattern)
        else:
            solver = self._petsc_solver(workers)
        stop_tol = None if loss == "m" else tol

        def solve_losses_at(tasks: TaskSet, shifts: list[Tensor]) -> list[_Solved]:
            results = solver(tasks["A"], tasks["b"], shifts, stop_tol, m)
            if loss == "m":
                return [(result, error_after_m(result, squared=False)) for result in results]
            return [(result, iteration_surrogate(result, tol, gain)) for result in results]

        def value(psi: nn.Module, tasks: TaskSet) -> Tensor:
            alpha = psi(tasks["features"])
            if smooth is not None:
                at = partial(solve_losses_at, tasks)
                result, solve_loss = _smoothed(at, alpha, smooth)
            else:
                shift = alpha if clip is None else _ClipLogDerivative.apply(alpha, clip)
                ((result, solve_loss),) = solve_losses_at(tasks, [shift])
            penalty = gamma * icf_penalty(alpha)
            return torch.where(result.factorization_failed, penalty, solve_loss)

        return value


@dataclass
class RobertsonNewtonSor:
    """Relaxation factor and initial guess of Newton-SOR on Robertson steps (§4.1, Table 1).

    The error measure is the absolute residual ``||g_n(y)||``; the paper's
    tolerance is 1e-9 and its test cap ``10^4``. ``head`` picks the meta-solver
    trained as Psi_nn: ``ini``, ``relax`` or ``both``. ``sets`` is the number of
    parameter sets (the paper: 10,000), split 1/4 train, 1/4 validation, 1/2
    test; each set gives 100 tasks. ``guess_init`` is the network's
    (:class:`~femeta.metasolvers.NewtonSorNet`): ``zero`` (ours) or ``default``.
    """

    name: ClassVar[str] = "robertson"
    solver_name: ClassVar[str] = "newton-sor"
    features: ClassVar[str] = "log c1, c2, c3, h_n, y_n (standardised)"
    default_tol: ClassVar[float] = 1e-9
    evaluation_cap: ClassVar[int] = 10_000
    surrogate_cap: ClassVar[int] = 2000
    #: The relaxation factors Psi_base's search tries first (then 0.01 around the best).
    coarse_grid: ClassVar[tuple[float, ...]] = tuple(1 + k / 20 for k in range(20))
    #: Tasks per solve when evaluating: the history of a long tail stays small.
    evaluation_chunk: ClassVar[int] = 4096
    #: What ``femeta evaluate --baseline`` takes: Psi_base, ``y_n`` and ``r_base``.
    baselines: ClassVar[tuple[str, ...]] = ("base",)
    #: What solves ``stats`` can run on (``femeta evaluate --engine``).
    engines: ClassVar[tuple[str, ...]] = ("torch",)
    #: The paper's training settings (Table 1), which are also the best known here.
    paper_options: ClassVar[Mapping[str, Any]] = _TORCH_ONLY

    head: str = "both"
    sets: int = 10_000
    guess_init: str = "zero"
    device: torch.device = field(default=torch.device("cpu"), repr=False)
    problem: Robertson = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.device = torch.device(self.device)
        if self.head not in NewtonSorNet.heads:
            heads = list(NewtonSorNet.heads)
            raise ValueError(f"unknown head {self.head!r} for robertson; expected one of {heads}")
        if self.guess_init not in NewtonSorNet.guess_inits:
            choices = list(NewtonSorNet.guess_inits)
            raise ValueError(f"unknown guess_init {self.guess_init!r}; expected one of {choices}")
        if isinstance(self.sets, bool) or not isinstance(self.sets, int) or self.sets < 4:
            raise ValueError(f"sets must be an integer >= 4, got {self.sets!r}")
        quarter = self.sets // 4
        sizes = {"train": quarter, "validation": quarter, "test": self.sets - 2 * quarter}
        self.problem = Robertson(split_sizes=sizes)

    @property
    def predicts(self) -> str:
        return {
            "ini": "initial guess y0 (r = r_base)",
            "relax": "relaxation factor r (y0 = y_n)",
            "both": "initial guess y0 and relaxation factor r",
        }[self.head]

    @classmethod
    def recommended_options(cls, given: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
        """The paper's settings (:attr:`paper_options`): no better ones are known here."""
        return dict(cls.paper_options)

    def params(self) -> dict[str, Any]:
        return {"head": self.head, "sets": self.sets, "guess_init": self.guess_init}

    def tasks(self, split: str, seed: int) -> TaskSet:
        return self.problem.split(split, seed).to(self.device)

    def default_m(self, loss: str) -> int:
        """``m`` when none is given: 5 (Table 1a's best L_m) for L_m, 2000 for the surrogate."""
        return 5 if loss == "m" else self.surrogate_cap

    def train_config(self, epochs: int | None, batch_size: int | None, lr: float | None,
                     seed: int) -> TrainConfig:  # fmt: skip
        """Appendix C.2: Adam, batch 16384, lr 2e-5 cut by 5 at 1/2 and 3/4 of 200 epochs."""
        return _paper_steps(epochs, 16384 if batch_size is None else batch_size,
                            2e-5 if lr is None else lr, seed)  # fmt: skip

    def metasolver(self, kind: str, train_tasks: TaskSet | None = None) -> nn.Module:
        """``base`` (``y_n`` and ``r_base``) or ``nn`` (the ``head`` network).

        Both need ``r_base`` (:meth:`base_relaxation`, on ``train_tasks``) except
        ``nn`` with the ``relax`` or ``both`` head. Without ``train_tasks``,
        ``nn`` starts unstandardised and with ``r = 1``, for loading saved weights.
        """
        if kind == "base":
            if train_tasks is None:
                raise ValueError("Psi_base is fitted on the training tasks; pass train_tasks")
            return PreviousStep(self.base_relaxation(train_tasks)).to(self.device)
        if kind == "nn":
            relaxation = 1.0
            if train_tasks is not None and self.head == "ini":
                relaxation = self.base_relaxation(train_tasks)
            network = NewtonSorNet(self.head, relaxation, guess_init=self.guess_init)
            if train_tasks is not None:
                network.fit_inputs(train_tasks["features"])
            return network.to(self.device)
        raise ValueError(f"unknown meta-solver {kind!r} for {self.name}; expected 'base' or 'nn'")

    def model_spec(self, train_tasks: TaskSet) -> dict[str, Any]:
        """How :mod:`femeta.model` applies the trained network (saved with it)."""
        names = list(Robertson.feature_names)
        return {"network": "NewtonSorNet", "features": names, "head": self.head,
                "ranges": dict(zip(names[:3], RATE_RANGES, strict=False))}  # fmt: skip

    def base_relaxation(self, tasks: TaskSet) -> float:
        """r_base: the factor with the fewest mean iterations to 1e-9 (cap 10^4) on ``tasks``.

        A brute-force search in ``[1, 2)``: :attr:`coarse_grid` in steps of 0.05,
        stopped once the mean exceeds twice the best so far, then steps of 0.01
        around the best.
        The result is cached on disk, keyed by the tasks, so it runs once per dataset.
        """
        key = tasks_digest(tasks["c"], tasks["h"], tasks["y_prev"])[:24]
        path = default_cache_dir() / f"robertson-rbase-{key}.json"
        if path.is_file():
            return float(json.loads(path.read_text())["r_base"])
        means: dict[float, float] = {}

        def mean(r: float) -> float:
            if r not in means:
                stats = self.stats(PreviousStep(r), tasks, self.default_tol, self.evaluation_cap)
                means[r] = stats.mean_iterations
            return means[r]

        for r in self.coarse_grid:
            if mean(r) > 2 * min(means.values()):
                break
        best = min(means, key=means.get)
        for r in (round(best + k / 100, 2) for k in range(-4, 5)):
            if 1 <= r < 2:  # the paper's range of r
                mean(r)
        best = min(means, key=means.get)
        record = {"r_base": best, "mean_iterations": means, "tol": self.default_tol,
                  "cap": self.evaluation_cap}  # fmt: skip
        write_atomic(path, json.dumps(record, indent=1).encode())
        return best

    @staticmethod
    def _system(tasks: TaskSet) -> NonlinearSystem:
        """``g_n`` and its Jacobian for the running instances ``rows`` of ``tasks``."""
        selected: dict[str, Any] = {"rows": None}

        def system(y: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
            if selected["rows"] is not rows:  # the solver passes a new tensor when one stops
                selected.update(rows=rows, c=tasks["c"][rows], h=tasks["h"][rows],
                                y_prev=tasks["y_prev"][rows])  # fmt: skip
            return backward_euler_system(selected["c"], selected["h"], selected["y_prev"], y)

        return system

    def solve(
        self, metasolver: nn.Module, tasks: TaskSet, tol: float | None, max_iterations: int
    ) -> SolverResult:
        """Phi(tau; Psi(tau)): Newton-SOR from the meta-solver's guess and factor."""
        y0, relaxation = metasolver(tasks["features"])
        return newton_sor(
            self._system(tasks), y0, relaxation, tol=tol, max_iterations=max_iterations
        )

    @torch.no_grad()
    def stats(
        self, metasolver: nn.Module, tasks: TaskSet, tol: float, max_iterations: int
    ) -> IterationStats:
        """L_eps per task, solved :attr:`evaluation_chunk` tasks at a time."""
        parts = []
        for start in range(0, len(tasks), self.evaluation_chunk):
            chunk = tasks.subset(slice(start, start + self.evaluation_chunk))
            result = self.solve(metasolver, chunk, tol, max_iterations)
            parts.append(IterationStats.from_result(result, tol, max_iterations))
        return IterationStats.concatenate(parts)

    def objective(
        self,
        loss: str,
        m: int,
        tol: float | None,
        gain: float = 1.0,
        clip: float | None = None,
        smooth: float | None = None,
        engine: str = "torch",
        workers: int = 1,
        gamma: float | None = None,
    ) -> Objective:
        """L_m (``||g||`` after ``m`` iterations) or the surrogate with Phi_{tol,m}."""
        _elasticity_only(clip, smooth, engine, workers, gamma)
        if loss == "m":
            return lambda psi, tasks: error_after_m(self.solve(psi, tasks, None, m), squared=False)
        if loss == "surrogate":
            if tol is None:
                raise ValueError("the surrogate loss needs a training tolerance (--tol)")
            return lambda psi, tasks: iteration_surrogate(self.solve(psi, tasks, tol, m), tol, gain)
        raise ValueError(f"unknown loss {loss!r}; expected 'm' or 'surrogate'")


class _ClipLogDerivative(torch.autograd.Function):
    """Identity on ``alpha``; clips each ``d loss / d log alpha`` to ``[-limit, limit]``."""

    @staticmethod
    def forward(ctx, alpha: Tensor, limit: float) -> Tensor:
        ctx.save_for_backward(alpha)
        ctx.limit = limit
        return alpha.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (alpha,) = ctx.saved_tensors
        return (grad * alpha).clamp(-ctx.limit, ctx.limit) / alpha, None


def _torch_shifts(
    A: Tensor, b: Tensor, alphas: list[Tensor], tol: float | None, max_iterations: int,
    pattern: Tensor | None,
) -> list[IccgResult]:  # fmt: skip
    return [
        iccg(A, b, alpha, tol=tol, max_iterations=max_iterations, pattern=pattern)
        for alpha in alphas
    ]


def _smoothed(
    solve_losses_at: Callable[[list[Tensor]], list[_Solved]], alpha: Tensor, step: float
) -> _Solved:
    """The solve loss at ``alpha``, with the central difference in ``log alpha`` as its slope.

    The three shifts are solved in one round; without a gradient to compute
    (validation), only the solve at ``alpha`` runs.
    """
    differentiable = alpha.requires_grad and torch.is_grad_enabled()
    with torch.no_grad():
        if not differentiable:
            return solve_losses_at([alpha.detach()])[0]
        ends = [alpha.detach() * math.exp(sign * step) for sign in (1, -1)]
        (result, centre), *solved_ends = solve_losses_at([alpha.detach(), *ends])
        slope_ends = []
        for end, end_loss in solved_ends:
            ok = ~end.factorization_failed
            slope_ends.append((torch.where(ok, end_loss, centre), ok.to(centre.dtype)))
        (upper, upper_ok), (lower, lower_ok) = slope_ends
        span = step * (upper_ok + lower_ok)
        slope = torch.where(span > 0, (upper - lower) / span.clamp_min(step), 0.0)
    log_alpha = torch.log(alpha)
    return result, centre + slope * (log_alpha - log_alpha.detach())


def _check_gamma(gamma: float) -> float:
    if (
        isinstance(gamma, bool)
        or not isinstance(gamma, int | float)
        or not (gamma > 0 and math.isfinite(gamma))
    ):
        raise ValueError(f"gamma must be a positive finite number, got {gamma!r}")
    return float(gamma)


def _elasticity_only(
    clip: float | None, smooth: float | None, engine: str, workers: int, gamma: float | None
) -> None:
    for name, option in (("clip", clip), ("smooth", smooth), ("gamma", gamma)):
        if option is not None:
            raise ValueError(f"--{name} applies to the elasticity shift only")
    if engine != "torch":
        raise ValueError(f"--engine {engine} applies to the elasticity shift only")
    if workers != 1:
        raise ValueError("--workers applies to the elasticity shift with --engine petsc only")


def _paper_steps(epochs: int | None, batch_size: int, lr: float, seed: int) -> TrainConfig:
    """Adam (betas 0.9, 0.999), ``epochs`` (default 200), lr cut by 5 at 1/2 and 3/4 of them."""
    epochs = 200 if epochs is None else epochs
    return TrainConfig(
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        betas=(0.9, 0.999),
        schedule="steps",
        milestones=tuple(sorted({epochs // 2, 3 * epochs // 4} - {0})),
        seed=seed,
    )


Experiment = Poisson1DJacobi | ElasticityIccg | RobertsonNewtonSor

EXPERIMENTS: dict[str, Callable[..., Experiment]] = {
    "poisson1d": Poisson1DJacobi,
    "elasticity": ElasticityIccg,
    "robertson": RobertsonNewtonSor,
}


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity where the system tells it)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


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


def get_experiment(name: str, **params: Any) -> Experiment:
    """The experiment registered under ``name``, built with ``params``."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown problem {name!r}; expected one of {sorted(EXPERIMENTS)}")
    factory = EXPERIMENTS[name]
    allowed = {f.name for f in fields(factory) if f.init}
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise ValueError(
            f"{name} takes no option {', '.join(unknown)}; its options: {sorted(allowed)}"
        )
    return factory(**params)
