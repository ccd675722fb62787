"""The diagonal shift of ICCG on clamped-beam tasks (§4.2, Table 2, Appendix C.3)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from femeta.evaluation import IterationStats
from femeta.experiments.base import Option, ScriptSystem, TrainDefaults
from femeta.experiments.shift import (
    CLIP,
    GAMMA,
    SMOOTH,
    ShiftExperiment,
    ShiftsSolver,
)
from femeta.metasolvers import PetscDefaultShift, ShiftGrid, ShiftNet
from femeta.parallel import world
from femeta.problems.base import TaskSet
from femeta.problems.elasticity import ElasticBeam
from femeta.solvers.iccg import IccgResult
from femeta.solvers.petsc import PetscIccg
from femeta.solvers.sparse import SparseBatch

__all__ = ["BEAM_INPUTS", "IC_PATTERNS", "SPLITS", "ElasticityIccg"]

#: The sparsity patterns that the beams' IC(0) can keep (:class:`ElasticityIccg`).
IC_PATTERNS = ("values", "stored")
#: What Psi_nn of the beams sees (``ElasticityIccg.inputs``), described.
BEAM_INPUTS = {
    "paper": "W, lambda, mu, rho, ||A||_1, ||A||_inf, ||A||_F (log, standardised)",
    "invariant": "W, lambda/mu (log, standardised): all that ICCG(alpha) depends on",
}

CELLS = Option(
    "cells",
    int,
    "hexahedra along the beam's length and the two sides of its section: 8 2 2 is the "
    "paper's N = 243, 40 8 8 gives N = 9,963 and 80 16 16 N = 70,227. A model is trained "
    "for one mesh (docs/results.md: the best shift moves with the mesh).",
    default=(8, 2, 2),
    minimum=1,
    count=3,
    evaluate="the beams' cells (the model's by default: a shift learned on one mesh is not "
    "the best on another).",
)
SPLITS = Option(
    "splits",
    int,
    "tasks in the training, validation and test sets (beams: the paper's 1000 each, fewer "
    "keep large meshes affordable; a family: its file's SPLITS unless given).",
    default=(1000, 1000, 1000),
    shown="elasticity 1000 1000 1000; family the file's",
    minimum=1,
    count=3,
)
IC_PATTERN = Option(
    "ic_pattern",
    str,
    "the sparsity pattern IC(0) keeps: 'stored', the entries DOLFINx's matrix stores, as "
    "PETSc's ICC keeps them in a FEniCS script; 'values', the nonzeros of each A, where the "
    "shift at which IC(0) fails depends on which stored entries cancelled to exact zeros in "
    "the assembly (dense matrices: small meshes only).",
    default="stored",
    choices=IC_PATTERNS,
    evaluate="IC(0)'s sparsity pattern, 'values' or 'stored', as in train.",
)
INPUTS = Option(
    "inputs",
    str,
    "what the network sees: 'invariant', only W and lambda/mu, the two numbers ICCG(alpha) "
    "depends on (not in the paper); 'paper', its seven features, which let it learn the "
    "training beams by heart.",
    default="invariant",
    shown="invariant; --paper: paper",
    choices=tuple(BEAM_INPUTS),
)


@dataclass
class ElasticityIccg(ShiftExperiment):
    """The diagonal shift of ICCG on clamped-beam tasks (§4.2, Table 2, Appendix C.3).

    The losses, baselines and solves are :class:`ShiftExperiment`'s. IC(0) keeps
    the entries DOLFINx's matrix stores (``ic_pattern="stored"``), as PETSc's ICC
    does in a FEniCS script. With ``"values"`` it keeps each ``A``'s
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
    label: ClassVar[str] = "the elasticity shift"
    scriptable: ClassVar[bool] = True
    default_tol: ClassVar[float] = 1e-6
    #: What solves :meth:`stats` can run on (``femeta evaluate --engine``).
    engines: ClassVar[tuple[str, ...]] = ("torch", "petsc")
    #: The paper's training settings: its exact derivative in torch, its seven inputs.
    paper_options: ClassVar[Mapping[str, Any]] = MappingProxyType(
        {"smooth": 0.0, "engine": "torch", "inputs": "paper"}
    )
    options: ClassVar[tuple[Option, ...]] = (CELLS, SPLITS, IC_PATTERN, INPUTS, CLIP, SMOOTH, GAMMA)
    #: Runs saved without these keys used each ``A``'s nonzeros and the paper's features.
    saved_defaults: ClassVar[Mapping[str, Any]] = MappingProxyType(
        {"ic_pattern": "values", "inputs": "paper"}
    )
    #: Appendix C.3: Adam, batch 128, lr 1e-3 cut by 5 at 1/2 and 3/4 of 200 epochs;
    #: L_125 (Table 2's best).
    train_defaults: ClassVar[TrainDefaults] = TrainDefaults(
        epochs=200, batch_size=128, lr=1e-3, m=125
    )

    cells: tuple[int, int, int] = CELLS.default
    #: Tasks in the training, validation and test splits.
    splits: tuple[int, int, int] = SPLITS.default
    #: What IC(0) keeps: ``"stored"``, the entries DOLFINx's matrix stores (the
    #: default); ``"values"``, the nonzeros of each task's ``A`` (what runs saved
    #: without the key used).
    ic_pattern: str = IC_PATTERN.default
    #: Psi_nn's inputs: ``"invariant"`` (W and lambda/mu; the default) or
    #: ``"paper"`` (the seven features; what runs saved without the key used).
    inputs: str = INPUTS.default
    device: torch.device = field(default=torch.device("cpu"), repr=False)
    problem: ElasticBeam = field(init=False, repr=False)
    # The PETSc engine (over the ranks of the MPI world), shared by the objective and the
    # monitor; made on first use.
    _engine: ShiftsSolver | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.device = torch.device(self.device)
        self.cells = tuple(self.cells)
        self.splits = tuple(self.splits)
        self.check_params()
        self.problem = ElasticBeam(self.cells, splits=self.splits)

    @property
    def features(self) -> str:
        """What Psi_nn sees."""
        return BEAM_INPUTS[self.inputs]

    def matrices(self, A: SparseBatch) -> SparseBatch | Tensor:
        """The tasks' ``A`` as the solvers take it to keep :attr:`ic_pattern`.

        ``"stored"``: the batch itself, whose IC(0) keeps its stored entries.
        ``"values"``: dense ``(B, N, N)``, whose IC(0) keeps each matrix's
        nonzeros (small meshes only: ``O(B N^2)`` memory).
        """
        return A if self.ic_pattern == "stored" else A.to_dense()

    @property
    def pattern_label(self) -> str:
        return self.ic_pattern

    @classmethod
    def check_options(cls, values: Mapping[str, Any], engine: str | None = None) -> None:
        """The checks of :class:`ShiftExperiment`, and of ``smooth`` and ``engine`` together.

        A ``smooth`` of 0 is the exact derivative; ``None``, not chosen yet.
        """
        super().check_options(values, engine)
        if engine == "petsc" and values.get("smooth") == 0:
            raise ValueError(
                "--engine petsc needs --smooth: PETSc's solves carry no derivative in alpha, "
                "and only the smoothed slope does without one"
            )

    @classmethod
    def script_system(cls, comm: Any, model: Any, given: Mapping[str, Any]) -> ScriptSystem:
        """The beam of ``given`` (``cells``, ``W``, ``lambda_``, ``mu``, ``rho``)."""
        from femeta.comparison import rigid_body_modes
        from femeta.problems.elasticity import beam_system

        cells = tuple(given["cells"])
        params = {name: float(given[name]) for name in ("W", "lambda_", "mu", "rho")}
        A, b, space = beam_system(comm, cells, *params.values())
        label = f"beam {' x '.join(map(str, cells))} cells"
        return ScriptSystem(A, b, params, label, rigid_body_modes(space), space)

    @classmethod
    def recommended_options(cls, given: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
        """The best known ``smooth``, ``engine`` and ``inputs``, where not ``given``.

        The smoothed derivative (:attr:`recommended_smooth`; the exact one with a
        ``clip``), solved with PETSc on every core when training on the CPU (a
        CUDA device keeps the torch solves), and the invariant inputs. An option
        given is kept, and the others follow it: an exact derivative (``smooth=0``)
        trains in torch.
        """
        smooth = given.get("smooth")
        if smooth is None:
            smooth = 0.0 if given.get("clip") is not None else cls.recommended_smooth
        engine = given.get("engine")
        if engine is None:
            engine = "petsc" if smooth > 0 and torch.device(device).type == "cpu" else "torch"
        inputs = "invariant" if given.get("inputs") is None else given["inputs"]
        return {"smooth": smooth, "engine": engine, "inputs": inputs}

    def params(self) -> dict[str, Any]:
        return {
            "cells": list(self.cells),
            "splits": list(self.splits),
            "ic_pattern": self.ic_pattern,
            "inputs": self.inputs,
        }

    def tasks(self, split: str, seed: int) -> TaskSet:
        return self.problem.split(split, seed).to(self.device)

    def shift_network(self, train_tasks: TaskSet | None) -> nn.Module:
        """The paper's MLP on the log features (or their :meth:`_projection`)."""
        names = ElasticBeam.feature_names
        network = ShiftNet(len(names), (128, 128), projection=self._projection())
        if train_tasks is not None:
            network.fit_inputs(train_tasks["features"])
        return network.to(self.device)

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

    @torch.no_grad()
    def stats(
        self, metasolver: nn.Module, tasks: TaskSet, tol: float, max_iterations: int,
        engine: str = "torch",
    ) -> IterationStats:  # fmt: skip
        """L_eps per task: iterations of Phi_{tol, max_iterations} (unconverged: the cap).

        ``engine="petsc"`` solves a meta-solver's shifts with :class:`PetscIccg` over
        the ranks of the MPI world, as training does with that engine; Psi_best's grid
        goes there in one round (PETSc's default shift has its own solve either way).
        """
        self.check_engine(engine)
        if engine == "petsc" and isinstance(metasolver, ShiftGrid):
            solve = self._petsc_solver()
            grid = metasolver.grid
            result = self._best(grid, tasks, tol, max_iterations, solve, len(grid))
        elif engine == "petsc" and not isinstance(metasolver, PetscDefaultShift):
            alpha = metasolver(tasks["features"])
            solve = self._petsc_solver()
            A = self.matrices(tasks["A"])
            (result,) = solve(A, tasks["b"], [alpha], tol, max_iterations)
        else:
            result = self.solve(metasolver, tasks, tol, max_iterations)
        return IterationStats.from_result(result, tol, max_iterations)

    def _petsc_solver(self) -> ShiftsSolver:
        """The :class:`PetscIccg` over the ranks of the MPI world, its results on this device."""
        if self._engine is not None:
            return self._engine
        engine = PetscIccg(world())

        def solve(
            A: SparseBatch | Tensor, b: Tensor, alphas: list[Tensor], tol: float | None,
            max_iterations: int,
        ) -> list[IccgResult]:  # fmt: skip
            results = engine.many(
                A.to("cpu"), b.cpu(), [alpha.detach().cpu() for alpha in alphas], tol=tol,
                max_iterations=max_iterations,
            )  # fmt: skip
            return [
                IccgResult(*(getattr(result, f.name).to(self.device) for f in fields(result)))
                for result in results
            ]

        self._engine = solve
        return solve

    def shifts_solver(self, engine: str) -> ShiftsSolver:
        """Torch, or with ``engine="petsc"`` a :class:`PetscIccg` over the MPI world's ranks."""
        if engine == "petsc":
            return self._petsc_solver()
        return super().shifts_solver(engine)
