"""The diagonal shift of ICCG on clamped-beam tasks (§4.2, Table 2, Appendix C.3)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from functools import partial
from types import MappingProxyType
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from femeta._io import write_atomic
from femeta.evaluation import IterationStats
from femeta.experiments.base import (
    Experiment,
    Option,
    TrainDefaults,
)
from femeta.losses import error_after_m, icf_penalty, iteration_surrogate
from femeta.metasolvers import ConstantShift, PetscDefaultShift, ShiftGrid, ShiftNet
from femeta.parallel import on_root, world
from femeta.problems.base import TaskSet
from femeta.problems.elasticity import ElasticBeam, default_cache_dir
from femeta.runs import tasks_digest
from femeta.solvers.iccg import IccgResult, iccg
from femeta.solvers.petsc import PetscIccg, default_icc
from femeta.solvers.sparse import SparseBatch
from femeta.training import Objective

__all__ = ["BEAM_INPUTS", "IC_PATTERNS", "ElasticityIccg"]

_Solved = tuple[IccgResult, Tensor]
# Solves ``A x = b`` at each of several shifts: (A, b, alphas, tol, max_iterations).
_ShiftsSolver = Callable[
    [SparseBatch | Tensor, Tensor, list[Tensor], float | None, int], list[IccgResult]
]
#: The sparsity patterns that the beams' IC(0) can keep (:class:`ElasticityIccg`).
IC_PATTERNS = ("values", "stored")
#: What Psi_nn of the beams sees (``ElasticityIccg.inputs``), described.
BEAM_INPUTS = {
    "paper": "W, lambda, mu, rho, ||A||_1, ||A||_inf, ||A||_F (log, standardised)",
    "invariant": "W, lambda/mu (log, standardised): all that ICCG(alpha) depends on",
}
#: The ICF penalty weight of §4.2.
PAPER_GAMMA = 500.0
#: The step of the smoothed derivative in log alpha that trains best (docs/results.md).
RECOMMENDED_SMOOTH = 0.25

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
    "tasks in the training, validation and test sets (the paper's 1000 each; fewer keep "
    "large meshes affordable).",
    default=(1000, 1000, 1000),
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
CLIP = Option(
    "clip",
    float,
    "clip each task's derivative of the solve loss in log(alpha) to [-CLIP, CLIP] (not in "
    "the paper).",
    shown="no clipping",
    stage="objective",
    positive=True,
)
SMOOTH = Option(
    "smooth",
    float,
    "replace each task's derivative of the solve loss in log(alpha) by its central "
    "difference over alpha*exp(+-SMOOTH) (not in the paper); 0 keeps the paper's exact "
    "derivative.",
    shown=f"{RECOMMENDED_SMOOTH:g}; with --clip or --paper: 0",
    stage="objective",
    positive=True,
    zero=True,
    finite=True,
    requirement="positive, or 0 for the exact derivative, and finite",
)
GAMMA = Option(
    "gamma",
    float,
    "weight of the ICF penalty gamma * (-log alpha) that a failed IC(0) costs in training (§4.2).",
    default=PAPER_GAMMA,
    shown=f"{PAPER_GAMMA:g}, the paper's",
    stage="objective",
    positive=True,
    finite=True,
    # One check for the option and the objective's argument, worded for both.
    requirement="positive: the ICF penalty weight gamma must be a positive finite number",
)


@dataclass
class ElasticityIccg(Experiment):
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
    label: ClassVar[str] = "the elasticity shift"
    scriptable: ClassVar[bool] = True
    predicts: ClassVar[str] = "alpha, the diagonal shift of IC(0) relative to diag(A)"
    default_tol: ClassVar[float] = 1e-6
    #: The ICF penalty weight of §4.2.
    gamma: ClassVar[float] = PAPER_GAMMA
    #: The log grid of Psi_best and Psi_base: 31 shifts from 1e-5 to 10.
    alpha_grid: ClassVar[Tensor] = torch.logspace(-5, 1, 31, dtype=torch.float64)
    #: What ``femeta evaluate --baseline`` takes: Psi_base (one shift), Psi_best (per-beam
    #: grid search) and PETSc's ICC with its default shift (what a FEniCS script has).
    baselines: ClassVar[tuple[str, ...]] = ("base", "best", "petsc")
    #: What solves :meth:`stats` can run on (``femeta evaluate --engine``).
    engines: ClassVar[tuple[str, ...]] = ("torch", "petsc")
    #: The paper's training settings: its exact derivative in torch, its seven inputs.
    paper_options: ClassVar[Mapping[str, Any]] = MappingProxyType(
        {"smooth": 0.0, "engine": "torch", "inputs": "paper"}
    )
    recommended_smooth: ClassVar[float] = RECOMMENDED_SMOOTH
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
    _engine: _ShiftsSolver | None = field(default=None, init=False, repr=False, compare=False)

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
    def evaluation_cap(self) -> int:
        """The paper's cap ``M = N`` (a failed or unconverged solve counts as ``M``)."""
        return self.problem.n

    @property
    def surrogate_cap(self) -> int:
        return self.problem.n

    @classmethod
    def shown_cap(cls) -> str:
        return "N"

    @classmethod
    def check_options(cls, values: Mapping[str, Any], engine: str | None = None) -> None:
        """The checks of :class:`Experiment`, and of ``clip``, ``smooth`` and ``engine`` together.

        A ``smooth`` of 0 is the exact derivative; ``None``, not chosen yet.
        """
        super().check_options(values, engine)
        smooth = values.get("smooth")
        if values.get("clip") is not None and smooth:
            raise ValueError("give clip or smooth, not both: each replaces the exact derivative")
        if engine == "petsc" and smooth == 0:
            raise ValueError(
                "--engine petsc needs --smooth: PETSc's solves carry no derivative in alpha, "
                "and only the smoothed slope does without one"
            )

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
            result = iccg(self.matrices(tasks["A"]), tasks["b"], alpha, tol=None, max_iterations=0)
            if bool(result.factorization_failed.any()):
                break
            chosen = alpha
        if chosen is None:
            raise ValueError(f"IC(0) fails on some task even at alpha = {self.alpha_grid[-1]:g}")
        record = json.dumps({"alpha": chosen, "ic_pattern": self.ic_pattern}).encode()
        on_root(world(), lambda: write_atomic(path, record))
        return chosen

    def solve(
        self, metasolver: nn.Module, tasks: TaskSet, tol: float | None, max_iterations: int
    ) -> IccgResult:
        """Phi(tau; Psi(tau)): ICCG with the meta-solver's shift, from a zero guess.

        :class:`PetscDefaultShift` solves with PETSc's ICC of ``A`` and its default shift
        instead, on the same pattern (on the CPU; the result comes back to this device).
        """
        if isinstance(metasolver, ShiftGrid):
            return self._best(metasolver.grid, tasks, tol, max_iterations, _torch_shifts, 1)
        if isinstance(metasolver, PetscDefaultShift):
            A = self.matrices(tasks["A"].to("cpu"))
            result = default_icc(
                A, tasks["b"].cpu(), tol=tol, max_iterations=max_iterations, comm=world()
            )
            return IccgResult(*(getattr(result, f.name).to(self.device) for f in fields(result)))
        alpha = metasolver(tasks["features"])
        A = self.matrices(tasks["A"])
        return iccg(A, tasks["b"], alpha, tol=tol, max_iterations=max_iterations)

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
        A = self.matrices(tasks["A"])
        results = (
            result
            for start in range(0, len(shifts), per_round)
            for result in solve_shifts(A, tasks["b"], shifts[start : start + per_round], tol, cap)
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

    def _petsc_solver(self) -> _ShiftsSolver:
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

    def objective(
        self,
        loss: str,
        m: int,
        tol: float | None,
        gain: float = 1.0,
        clip: float | None = None,
        smooth: float | None = None,
        engine: str = "torch",
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
        the ranks of the MPI world; the results do not depend on their number.
        """
        step = 0.0 if smooth is None else smooth  # None or 0: the exact derivative
        self.check_options({"clip": clip, "smooth": step, "gamma": gamma}, engine)
        if loss not in ("m", "surrogate"):
            raise ValueError(f"unknown loss {loss!r}; expected 'm' or 'surrogate'")
        if loss == "surrogate" and tol is None:
            raise ValueError("the surrogate loss needs a training tolerance (--tol)")
        smooth = step or None
        gamma = self.gamma if gamma is None else float(gamma)
        solver = _torch_shifts if engine == "torch" else self._petsc_solver()
        stop_tol = None if loss == "m" else tol

        def solve_losses_at(tasks: TaskSet, shifts: list[Tensor]) -> list[_Solved]:
            results = solver(self.matrices(tasks["A"]), tasks["b"], shifts, stop_tol, m)
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
    A: SparseBatch | Tensor, b: Tensor, alphas: list[Tensor], tol: float | None,
    max_iterations: int,
) -> list[IccgResult]:  # fmt: skip
    return [iccg(A, b, alpha, tol=tol, max_iterations=max_iterations) for alpha in alphas]


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
