"""What every ICCG-shift experiment shares: Psi_base, Psi_best, the ICF penalty, the losses.

A subclass of :class:`ShiftExperiment` supplies the tasks (fields ``A``, a
:class:`~femeta.solvers.sparse.SparseBatch`, ``b`` and ``features``, what Psi_nn
reads) and the network of :meth:`ShiftExperiment.shift_network`; the solves,
baselines and objective are the same for every family of SPD systems.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import fields
from functools import partial
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from femeta._io import write_atomic
from femeta.experiments.base import TORCH, Experiment, Option
from femeta.losses import error_after_m, icf_penalty, iteration_surrogate
from femeta.metasolvers import ConstantShift, PetscDefaultShift, ShiftGrid
from femeta.parallel import on_root, world
from femeta.problems.base import TaskSet, default_cache_dir
from femeta.runs import tasks_digest
from femeta.solvers.iccg import IccgResult, iccg
from femeta.solvers.petsc import default_icc
from femeta.solvers.sparse import SparseBatch
from femeta.training import Objective

__all__ = [
    "CLIP",
    "GAMMA",
    "PAPER_GAMMA",
    "RECOMMENDED_SMOOTH",
    "SMOOTH",
    "ShiftExperiment",
    "ShiftsSolver",
    "Solved",
]

Solved = tuple[IccgResult, Tensor]
#: Solves ``A x = b`` at each of several shifts: (A, b, alphas, tol, max_iterations).
ShiftsSolver = Callable[
    [SparseBatch | Tensor, Tensor, list[Tensor], float | None, int], list[IccgResult]
]
#: The ICF penalty weight of §4.2.
PAPER_GAMMA = 500.0
#: The step of the smoothed derivative in log alpha that trains best (docs/results.md).
RECOMMENDED_SMOOTH = 0.25

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


class ShiftExperiment(Experiment):
    """The diagonal shift alpha of ICCG, ``P = IC(0) of A + alpha diag(A)``, learned per task.

    The error measure is the relative residual. A task whose IC(0) fails counts
    as the cap and is not iterated; in training it costs ``gamma * (-log alpha)``
    instead of the solve loss (``1_success L + gamma 1_fail L_ICF``).
    """

    solver_name: ClassVar[str] = "iccg"
    predicts: ClassVar[str] = "alpha, the diagonal shift of IC(0) relative to diag(A)"
    #: The ICF penalty weight of §4.2.
    gamma: ClassVar[float] = PAPER_GAMMA
    #: The log grid of Psi_best and Psi_base: 31 shifts from 1e-5 to 10.
    alpha_grid: ClassVar[Tensor] = torch.logspace(-5, 1, 31, dtype=torch.float64)
    #: What ``femeta evaluate --baseline`` takes: Psi_base (one shift), Psi_best (per-task
    #: grid search) and PETSc's ICC with its default shift (what a FEniCS script has).
    baselines: ClassVar[tuple[str, ...]] = ("base", "best", "petsc")
    recommended_smooth: ClassVar[float] = RECOMMENDED_SMOOTH

    def matrices(self, A: SparseBatch) -> SparseBatch | Tensor:
        """The tasks' ``A`` as the solvers take it: here the batch, whose IC(0) keeps its
        stored entries."""
        return A

    @property
    def pattern_label(self) -> str:
        """Which entries IC(0) keeps, as Psi_base's cache names it."""
        return "stored"

    @property
    def evaluation_cap(self) -> int:
        """The paper's cap ``M = N``, the problem's unknowns (a failed or unconverged solve
        counts as ``M``)."""
        return self.problem.n

    @property
    def surrogate_cap(self) -> int:
        return self.problem.n

    @classmethod
    def shown_cap(cls) -> str:
        return "N"

    def shift_network(self, train_tasks: TaskSet | None) -> nn.Module:
        """Psi_nn, its inputs standardised on ``train_tasks`` when given, on this device."""
        raise NotImplementedError

    def shifts_solver(self, engine: str) -> ShiftsSolver:
        """What solves the objective's shifts with ``engine``: here torch (:func:`iccg`)."""
        return _torch_shifts

    @classmethod
    def check_options(cls, values: Mapping[str, Any], engine: str | None = None) -> None:
        """The checks of :class:`Experiment`, and of ``clip`` and ``smooth`` together."""
        super().check_options(values, engine)
        if values.get("clip") is not None and values.get("smooth"):
            raise ValueError("give clip or smooth, not both: each replaces the exact derivative")

    def metasolver(self, kind: str, train_tasks: TaskSet | None = None) -> nn.Module:
        """``base`` (constant alpha), ``best`` (per-task grid search), ``petsc`` (PETSc's
        default ICC shift, no alpha) or ``nn`` (:meth:`shift_network`).

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
            return self.shift_network(train_tasks)
        raise ValueError(
            f"unknown meta-solver {kind!r} for {self.name}; expected 'base', 'best', 'petsc' "
            "or 'nn'"
        )

    def base_shift(self, tasks: TaskSet) -> float:
        """The smallest grid shift at and above which IC(0) succeeds on every task.

        The grid is scanned downwards and stops at the first shift that fails a task.
        The result is cached on disk, keyed by the tasks and the pattern: the scan
        factorizes every task a dozen times (minutes on a CPU).
        """
        digest = tasks_digest(tasks["A"], tasks["b"], self.alpha_grid)[:24]
        label = self.pattern_label
        path = default_cache_dir() / f"{self.name}-base-{label}-{digest}.json"
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
        record = json.dumps({"alpha": chosen, "ic_pattern": label}).encode()
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
        solve_shifts: ShiftsSolver, per_round: int,
    ) -> IccgResult:  # fmt: skip
        """Psi_best: per task, the grid shift's solve with the fewest iterations.

        ``solve_shifts`` solves ``per_round`` shifts of the grid at a time. Ties go
        to the smaller shift. The solves are kept, not repeated: on ill-conditioned
        systems a repeat in another batch can round differently.
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

    def objective(
        self,
        loss: str,
        m: int,
        tol: float | None,
        gain: float = 1.0,
        clip: float | None = None,
        smooth: float | None = None,
        engine: str = TORCH,
        gamma: float | None = None,
    ) -> Objective:
        """``1_success L + gamma 1_fail L_ICF`` with L_m (relative residual) or the surrogate.

        ``gamma`` weighs the ICF penalty (``None``: the paper's :attr:`gamma`, 500).

        ``clip`` and ``smooth`` (``None`` or 0: the paper's exact derivative) are not the
        paper's; both change only the derivative of the solve
        loss in ``log alpha``, never its value or the penalty's derivative. The exact
        derivative of CG's late residuals in alpha is heavy-tailed on the beams: a
        few tasks carry most of a batch's gradient (see docs/results.md, Table 2).

        - ``clip``: each task's derivative is clipped to ``[-clip, clip]``.
        - ``smooth``: each task's derivative is the central difference of the solve
          loss between ``alpha e^-smooth`` and ``alpha e^smooth`` (one-sided where
          IC(0) fails at one end, zero at both), i.e. the slope of the loss on the
          scale of ``smooth`` instead of at ``alpha`` itself. The solves run
          without a tangent, three per task.

        ``engine`` runs those solves (:meth:`shifts_solver`); the PETSc engine shares
        them over the ranks of ``mpiexec``, and the results do not depend on their number.
        """
        step = 0.0 if smooth is None else smooth  # None or 0: the exact derivative
        self.check_options({"clip": clip, "smooth": step, "gamma": gamma}, engine)
        if loss not in ("m", "surrogate"):
            raise ValueError(f"unknown loss {loss!r}; expected 'm' or 'surrogate'")
        if loss == "surrogate" and tol is None:
            raise ValueError("the surrogate loss needs a training tolerance (--tol)")
        smooth = step or None
        gamma = self.gamma if gamma is None else float(gamma)
        solver = self.shifts_solver(engine)
        stop_tol = None if loss == "m" else tol

        def solve_losses_at(tasks: TaskSet, shifts: list[Tensor]) -> list[Solved]:
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
    solve_losses_at: Callable[[list[Tensor]], list[Solved]], alpha: Tensor, step: float
) -> Solved:
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
