"""Meta-solvers Psi(tau; omega): map a batch of tasks to solver parameters theta.

A meta-solver is an ``nn.Module`` whose ``forward`` takes a tensor of task
features ``(B, F)`` and returns the parameter for each task.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["ACTIVATIONS", "MLP", "EigenbasisGuess", "ZeroGuess"]

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
