"""Losses on a solve: L_m (paper §2.2.1) and the surrogate of the iteration count (eq. 10).

Each takes a :class:`~femeta.solvers.SolverResult` and returns one value per task;
the trainer averages them. Experiments pick one by name (``--loss m|surrogate``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from femeta.solvers.base import SolverResult

__all__ = ["error_after_m", "icf_penalty", "iteration_surrogate"]


def error_after_m(result: SolverResult, squared: bool = True) -> Tensor:
    """L_m: the error measure at the last iterate of a fixed-``m`` solve.

    For the Poisson tasks the measure is the relative error and it is squared,
    ``||u^(m) - A^{-1} f||^2 / ||A^{-1} f||^2`` as in §2.2.1; for ICCG (§4.2)
    it is the relative residual ``||A u^(m) - f|| / ||f||``, not squared.
    """
    error = result.final_error
    return error.square() if squared else error


def icf_penalty(alpha: Tensor) -> Tensor:
    """L_ICF of §4.2, ``-log alpha``: pushes the shift up where IC(0) failed."""
    return -torch.log(alpha)


def iteration_surrogate(result: SolverResult, tol: float, gain: float = 1.0) -> Tensor:
    """The surrogate ``L~_eps^(m)`` of the number of iterations (equation 10).

    It adds ``sigmoid(gain * (log L_k - log eps))`` for every iteration ``k`` the
    solve took, i.e. for each ``k < iterations`` (at those, ``L_k > eps``).

    The error ``L_k`` is compared with ``eps`` in log space: errors span many
    decades (1 down to 1e-8) and the linear ``sigmoid(a (L_k - eps))`` would be
    flat, with no gradient, for every iterate far from ``eps`` unless ``a`` were
    tuned per tolerance. In log space ``gain`` means the same for every ``eps``:
    with ``gain = 1`` an error ``e`` times above ``eps`` contributes 0.73.
    """
    if not tol > 0:
        raise ValueError(f"tolerance must be positive, got {tol!r}")
    if not gain > 0:
        raise ValueError(f"gain must be positive, got {gain!r}")
    history = result.history
    steps = torch.arange(history.shape[1], device=history.device)
    # Only the counted entries (k < iterations) are transformed: a batch with a few long
    # solves has a wide history that is mostly padding.
    rows, counted = (steps[None, :] < result.iterations[:, None]).nonzero(as_tuple=True)
    indicator = torch.sigmoid(gain * (torch.log(history[rows, counted]) - math.log(tol)))
    return history.new_zeros(history.shape[0]).index_add(0, rows, indicator)
