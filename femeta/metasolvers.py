"""Meta-solvers Psi(tau; omega): map a batch of tasks to solver parameters theta.

A meta-solver is an ``nn.Module`` whose ``forward`` takes a tensor of task
features ``(B, F)`` and returns the parameter for each task.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "ACTIVATIONS",
    "MLP",
    "ConstantShift",
    "EigenbasisGuess",
    "ShiftGrid",
    "ShiftNet",
    "ZeroGuess",
]

ACTIVATIONS: dict[str, type[nn.Module]] = {"silu": nn.SiLU, "relu": nn.ReLU, "tanh": nn.Tanh}


class MLP(nn.Module):
    """A fully connected network: ``inputs -> hidden... -> outputs``, float64."""

    def __init__(self, inputs: int, hidden: Sequence[int], outputs: int, activation: str = "silu"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"unknown activation {activation!r}; expected one of {sorted(ACTIVATIONS)}"
            )
        widths = [inputs, *hidden]
        layers: list[nn.Module] = []
        for width_in, width_out in itertools.pairwise(widths):
            layers += [
                nn.Linear(width_in, width_out, dtype=torch.float64),
                ACTIVATIONS[activation](),
            ]
        layers.append(nn.Linear(widths[-1], outputs, dtype=torch.float64))
        self.layers = nn.Sequential(*layers)

    def forward(self, features: Tensor) -> Tensor:
        return self.layers(features)


class ZeroGuess(nn.Module):
    """Psi_base of §2.2.1: the constant initial guess 0 for every task."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def forward(self, features: Tensor) -> Tensor:
        return features.new_zeros(features.shape[0], self.size)


class EigenbasisGuess(nn.Module):
    """Psi_nn of Appendix C.1: an MLP predicts the coefficients of ``x0`` in a basis.

    Args:
        basis: ``(N, N)`` matrix whose columns are the basis vectors (for the
            Poisson tasks, the eigenvectors of ``A``).
        hidden: Widths of the hidden layers (the paper: two of 15).
        activation: Hidden activation (the paper: SiLU).
    """

    def __init__(self, basis: Tensor, hidden: Sequence[int] = (15, 15), activation: str = "silu"):
        super().__init__()
        n = basis.shape[0]
        self.register_buffer("basis", basis.to(torch.float64))
        self.network = MLP(n, hidden, basis.shape[1], activation)

    def forward(self, features: Tensor) -> Tensor:
        return self.network(features) @ self.basis.T


class ConstantShift(nn.Module):
    """Psi_base of §4.2: one diagonal shift ``alpha`` for every task."""

    def __init__(self, alpha: float):
        super().__init__()
        if not (alpha > 0 and math.isfinite(alpha)):
            raise ValueError(f"alpha must be a positive finite number, got {alpha!r}")
        self.register_buffer("alpha", torch.tensor(float(alpha), dtype=torch.float64))

    def forward(self, features: Tensor) -> Tensor:
        return self.alpha.expand(features.shape[0])


class ShiftGrid(nn.Module):
    """Psi_best of §4.2: a per-task brute-force search over a log grid of ``alpha``.

    It has no forward pass of its own: the search needs the solver, so the
    experiment runs it (the grid is kept here, as a buffer).
    """

    def __init__(self, grid: Tensor):
        super().__init__()
        if grid.dim() != 1 or not bool((grid > 0).all()):
            raise ValueError("the grid must be a 1D tensor of positive shifts")
        self.register_buffer("grid", grid.to(torch.float64))

    def forward(self, features: Tensor) -> Tensor:
        raise TypeError("Psi_best needs the solver; call the experiment's solve() with it")


class ShiftNet(nn.Module):
    """Psi_nn of §4.2 / Appendix C.3: task features to a diagonal shift ``alpha``.

    The features (all positive) are taken in log space and standardised with
    the statistics of the training tasks (:meth:`fit_inputs`; saved as
    buffers). An MLP (ReLU) gives ``z`` and ``alpha = high * sigmoid(z)``, as in
    the paper (``high = 1``). For small shifts ``log alpha ~ z + log high``, so the
    network acts on a log scale, and the ICF penalty ``-log alpha`` keeps a slope
    of one in ``z`` however small alpha gets. (Mapping the sigmoid onto a
    bounded log range instead flattens that slope at the low end, where a
    failing task then stops pushing alpha up.)
    """

    def __init__(self, inputs: int, hidden: Sequence[int] = (128, 128), high: float = 1.0):
        super().__init__()
        if not (high > 0 and math.isfinite(high)):
            raise ValueError(f"high must be a positive finite number, got {high!r}")
        self.network = MLP(inputs, hidden, 1, "relu")
        self.register_buffer("high", torch.tensor(float(high), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(inputs, dtype=torch.float64))
        self.register_buffer("scale", torch.ones(inputs, dtype=torch.float64))

    @torch.no_grad()
    def fit_inputs(self, features: Tensor) -> None:
        """Set the standardisation from the training tasks' features ``(B, F)``."""
        logs = features.to(self.mean).log()
        self.mean.copy_(logs.mean(dim=0))
        self.scale.copy_(logs.std(dim=0).clamp_min(1e-12))

    def forward(self, features: Tensor) -> Tensor:
        inputs = (features.log() - self.mean) / self.scale
        # The floor keeps alpha a valid shift where the sigmoid underflows.
        return self.high * torch.sigmoid(self.network(inputs)[:, 0]).clamp_min(1e-12)
