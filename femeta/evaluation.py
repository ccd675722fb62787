"""L_eps: iterations to reach a test tolerance, per task, and their summary."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from femeta.solvers.base import SolverResult

__all__ = ["IterationStats"]


@dataclass(frozen=True)
class IterationStats:
    """Iterations each task took to reach ``tol``; a task that did not converge counts as the cap.

    Works the same for any solver that returns a :class:`SolverResult`.
    """

    iterations: np.ndarray
    converged: np.ndarray
    tol: float
    max_iterations: int

    @classmethod
    def from_result(cls, result: SolverResult, tol: float, max_iterations: int) -> IterationStats:
        converged = result.converged.detach().cpu().numpy().astype(bool)
        iterations = result.iterations.detach().cpu().numpy().astype(np.int64)
        iterations = np.where(converged, iterations, max_iterations)
        return cls(iterations, converged, float(tol), int(max_iterations))

    @classmethod
    def concatenate(cls, parts: list[IterationStats]) -> IterationStats:
        """The statistics of several batches solved with the same tolerance and cap."""
        if not parts or len({(p.tol, p.max_iterations) for p in parts}) != 1:
            raise ValueError("concatenate needs at least one part, all with one tolerance and cap")
        iterations = np.concatenate([p.iterations for p in parts])
        converged = np.concatenate([p.converged for p in parts])
        return cls(iterations, converged, parts[0].tol, parts[0].max_iterations)

    @property
    def mean_iterations(self) -> float:
        return float(self.iterations.mean())

    @property
    def std_iterations(self) -> float:
        return float(self.iterations.std())

    @property
    def convergence_ratio(self) -> float:
        """Fraction of tasks that reached the tolerance within the cap."""
        return float(self.converged.mean())

    def histogram(self, bins: int = 30) -> tuple[np.ndarray, np.ndarray]:
        """Counts and bin edges of the iteration numbers."""
        return np.histogram(self.iterations, bins=bins)

    def summary(self) -> dict[str, float | int]:
        """The JSON-ready summary the CLI prints."""
        return {
            "mean_iterations": self.mean_iterations,
            "std_iterations": self.std_iterations,
            "convergence_ratio": self.convergence_ratio,
            "n_tasks": int(self.iterations.size),
            "tol": self.tol,
            "max_iterations": self.max_iterations,
        }
