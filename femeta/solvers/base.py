"""The result every iterative solver returns, and the input checks they share."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["SolverResult", "check_finite", "check_stopping"]


@dataclass(frozen=True)
class SolverResult:
    """Outcome of a batched iterative solve.

    Attributes:
        x: The iterate at which each instance stopped, shape ``(B, N)``.
        iterations: Iterations each instance took, shape ``(B,)``, int64.
        history: The error measure after ``k`` iterations at ``[:, k]``, shape
            ``(B, m + 1)``; entries after an instance stopped are zero.
        converged: Whether each instance reached the tolerance, shape ``(B,)``.
            Always ``False`` for a fixed-iteration solve (``tol=None``).
    """

    x: Tensor
    iterations: Tensor
    history: Tensor
    converged: Tensor

    @property
    def final_error(self) -> Tensor:
        """The error measure at the iterate each instance stopped at, shape ``(B,)``."""
        return self.history.gather(1, self.iterations[:, None]).squeeze(1)


def check_finite(name: str, value: Tensor) -> None:
    """Raise ``ValueError`` when ``value`` holds NaN or infinity."""
    value = value.detach()
    # A finite sum needs finite entries; only a sum that overflowed needs the entrywise check.
    if not (bool(torch.isfinite(value.sum())) or bool(torch.isfinite(value).all())):
        raise ValueError(f"{name} contains NaN or infinite values; clean the input data first")


def check_stopping(tol: float | None, max_iterations: int) -> None:
    """Validate a tolerance (``None`` means a fixed number of iterations) and a cap."""
    if tol is not None and not (tol > 0 and tol < float("inf")):
        raise ValueError(f"tolerance must be a positive finite number, got {tol!r}")
    if isinstance(max_iterations, bool) or not isinstance(max_iterations, int):
        raise TypeError(f"max_iterations must be an int, got {type(max_iterations).__name__}")
    if max_iterations < 0:
        raise ValueError(f"max_iterations must be >= 0, got {max_iterations}")
