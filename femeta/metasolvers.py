"""Meta-solvers Psi(tau; omega): map a batch of tasks to solver parameters theta.

A meta-solver is an ``nn.Module`` whose ``forward`` takes a tensor of task
features ``(B, F)`` and returns the parameter for each task.
"""

from __future__ import annotations

import copy
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
    "NewtonSorNet",
    "PetscDefaultShift",
    "PreviousStep",
    "ScaledMLP",
    "ShiftGrid",
    "ShiftNet",
    "ZeroGuess",
    "fold_scaling",
    "pca_whitening",
    "zero_output_layer",
]

ACTIVATIONS: dict[str, type[nn.Module]] = {"silu": nn.SiLU, "relu": nn.ReLU, "tanh": nn.Tanh}


class MLP(nn.Module):
    """A fully connected network: ``inputs -> hidden... -> outputs`` (float64 by default)."""

    def __init__(
        self,
        inputs: int,
        hidden: Sequence[int],
        outputs: int,
        activation: str = "silu",
        dtype: torch.dtype = torch.float64,
    ):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"unknown activation {activation!r}; expected one of {sorted(ACTIVATIONS)}"
            )
        widths = [inputs, *hidden]
        layers: list[nn.Module] = []
        for width_in, width_out in itertools.pairwise(widths):
            layers += [
                nn.Linear(width_in, width_out, dtype=dtype),
                ACTIVATIONS[activation](),
            ]
        layers.append(nn.Linear(widths[-1], outputs, dtype=dtype))
        self.layers = nn.Sequential(*layers)

    def forward(self, features: Tensor) -> Tensor:
        return self.layers(features)


class ScaledMLP(nn.Module):
    """An MLP trained in rescaled coordinates: ``x -> output_scale * network(x @ input_map.T)``.

    Adam takes steps of about the same size in every weight, so a network whose
    inputs and outputs span orders of magnitude learns the large ones and barely
    moves the small ones. Training it between a fixed input map (e.g.
    :func:`pca_whitening` of the training features) and a fixed output scale
    evens that out.

    ``activation_shift`` ``c`` computes each hidden activation as ``act(z + c) - c``.
    For SiLU and ``c`` of about 20 that is the identity to ``c e^-c`` wherever
    ``|z|`` is a few units: the network starts nearly linear, with centred activations,
    and can fit a linear map (the solution map of a linear problem) far more
    precisely than from SiLU's curved range near 0.

    All three are affine, so :meth:`fold` writes the same function into a plain
    :class:`MLP` (first weights ``W1 @ input_map``; each hidden bias ``+ c``, each
    following bias ``- c W.sum(1)``; last weights and bias times ``output_scale``):
    what is saved is the plain network.
    """

    def __init__(
        self,
        network: MLP,
        input_map: Tensor | None = None,
        output_scale: Tensor | None = None,
        activation_shift: float = 0.0,
    ):
        super().__init__()
        if not math.isfinite(activation_shift):
            raise ValueError(f"activation_shift must be finite, got {activation_shift!r}")
        first, last = network.layers[0], network.layers[-1]
        if input_map is not None and (
            input_map.dim() != 2 or input_map.shape[0] != first.in_features
        ):
            raise ValueError(
                f"input_map must have shape ({first.in_features}, inputs), "
                f"got {tuple(input_map.shape)}"
            )
        if output_scale is not None and output_scale.shape != (last.out_features,):
            raise ValueError(
                f"output_scale must have shape ({last.out_features},), "
                f"got {tuple(output_scale.shape)}"
            )
        self.network = network
        self.activation_shift = float(activation_shift)
        dtype = first.weight.dtype
        self.register_buffer("input_map", None if input_map is None else input_map.to(dtype))
        self.register_buffer(
            "output_scale", None if output_scale is None else output_scale.to(dtype)
        )

    def forward(self, features: Tensor) -> Tensor:
        if self.input_map is not None:
            features = features @ self.input_map.T
        out, shift = features, self.activation_shift
        for layer in self.network.layers:
            out = layer(out) if isinstance(layer, nn.Linear) else layer(out + shift) - shift
        return out if self.output_scale is None else self.output_scale * out

    @torch.no_grad()
    def fold(self) -> MLP:
        """A plain :class:`MLP` (a copy) that computes the same function."""
        network = copy.deepcopy(self.network)
        first, last = network.layers[0], network.layers[-1]
        if self.input_map is not None:
            first.weight.copy_(first.weight @ self.input_map)
            first.in_features = self.input_map.shape[1]
        linear = [layer for layer in network.layers if isinstance(layer, nn.Linear)]
        for before, after in itertools.pairwise(linear):
            before.bias.add_(self.activation_shift)
            after.bias.sub_(self.activation_shift * after.weight.sum(dim=1))
        if self.output_scale is not None:
            last.weight.mul_(self.output_scale[:, None])
            last.bias.mul_(self.output_scale)
        return network


def fold_scaling(module: nn.Module) -> nn.Module:
    """``module`` with every :class:`ScaledMLP` inside replaced by its fold (in place)."""
    if isinstance(module, ScaledMLP):
        return module.fold()
    for name, child in list(module.named_children()):
        folded = fold_scaling(child)
        if folded is not child:
            setattr(module, name, folded)
    return module


def pca_whitening(features: Tensor, floor: float = 1e-8) -> Tensor:
    """``T = diag(w)^-1/2 U^T`` from ``eigh(X^T X / n)`` of the features ``X`` ``(n, F)``.

    ``T x`` has the identity as second moment over the given features. The
    moment is not centred, so the map is linear (foldable into a layer's
    weights without touching its bias). Eigenvalues below ``floor`` times the
    largest are raised to it, so a direction the data do not span stays bounded.
    """
    if features.dim() != 2 or features.shape[0] < 1:
        shape = tuple(features.shape)
        raise ValueError(f"features must have shape (n, F) with n >= 1, got {shape}")
    eigenvalues, vectors = torch.linalg.eigh(features.T @ features / features.shape[0])
    eigenvalues = eigenvalues.clamp_min(floor * eigenvalues.max())
    return vectors.T / eigenvalues.sqrt()[:, None]


@torch.no_grad()
def zero_output_layer(network: MLP) -> MLP:
    """Zero the last layer's weights and bias, so the network starts at the output 0."""
    network.layers[-1].weight.zero_()
    network.layers[-1].bias.zero_()
    return network


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
        self.network: nn.Module = MLP(n, hidden, basis.shape[1], activation)

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


class PetscDefaultShift(nn.Module):
    """The baseline a FEniCS user already has: no alpha, PETSc's ICC with its default shift.

    PETSc's ICC(0) of ``A`` itself, shift type ``POSITIVE_DEFINITE`` (it shifts the
    diagonal only when a pivot breaks down). It has no forward pass: the experiment
    runs PETSc's solve for it.
    """

    def forward(self, features: Tensor) -> Tensor:
        raise TypeError("PETSc's default ICC has no shift; call the experiment's solve() with it")


class ShiftNet(nn.Module):
    """Psi_nn of §4.2 / Appendix C.3: task features to a diagonal shift ``alpha``.

    The features (all positive) are taken in log space (``log_inputs=False``: as
    given, for features already on a suitable scale), mapped by ``projection``
    ``(k, inputs)`` when given (linear combinations of the logs, i.e. products
    and ratios of the features), and standardised with the statistics of the
    training tasks (:meth:`fit_inputs`; saved as buffers). An MLP (ReLU) gives
    ``z`` and ``alpha = high * sigmoid(z)``, as in the paper (``high = 1``). For
    small shifts ``log alpha ~ z + log high``, so the network acts on a log scale,
    and the ICF penalty ``-log alpha`` keeps a slope of one in ``z`` however small
    alpha gets. (Mapping the sigmoid onto a bounded log range instead flattens
    that slope at the low end, where a failing task then stops pushing alpha up.)
    """

    def __init__(
        self,
        inputs: int,
        hidden: Sequence[int] = (128, 128),
        high: float = 1.0,
        projection: Tensor | None = None,
        log_inputs: bool = True,
    ):
        super().__init__()
        self.log_inputs = log_inputs
        if not (high > 0 and math.isfinite(high)):
            raise ValueError(f"high must be a positive finite number, got {high!r}")
        if projection is not None and (projection.dim() != 2 or projection.shape[1] != inputs):
            raise ValueError(
                f"projection must have shape (k, {inputs}), got {tuple(projection.shape)}"
            )
        width = inputs if projection is None else projection.shape[0]
        self.network = MLP(width, hidden, 1, "relu")
        self.register_buffer("high", torch.tensor(float(high), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(width, dtype=torch.float64))
        self.register_buffer("scale", torch.ones(width, dtype=torch.float64))
        # Rebuilt by whoever builds the network, so not saved with the weights.
        if projection is not None:
            projection = projection.to(torch.float64)
        self.register_buffer("projection", projection, persistent=False)

    def _logs(self, features: Tensor) -> Tensor:
        logs = features.to(self.mean)
        if self.log_inputs:
            logs = logs.log()
        return logs if self.projection is None else logs @ self.projection.T

    @torch.no_grad()
    def fit_inputs(self, features: Tensor) -> None:
        """Set the standardisation from the training tasks' features ``(B, F)``."""
        logs = self._logs(features)
        self.mean.copy_(logs.mean(dim=0))
        self.scale.copy_(logs.std(dim=0).clamp_min(1e-12))

    def forward(self, features: Tensor) -> Tensor:
        inputs = (self._logs(features) - self.mean) / self.scale
        # The floor keeps alpha a valid shift where the sigmoid underflows.
        return self.high * torch.sigmoid(self.network(inputs)[:, 0]).clamp_min(1e-12)


class PreviousStep(nn.Module):
    """Psi_base of §4.1: the previous state ``y_n`` as initial guess and one factor ``r``.

    Takes the Robertson features ``(c1, c2, c3, h, y1, y2, y3)`` and returns
    ``(y0, r)``: ``y0`` of shape ``(B, 3)``, ``r`` of shape ``(B,)``.
    """

    def __init__(self, relaxation: float):
        super().__init__()
        if not 0 < relaxation <= 2:
            raise ValueError(f"the SOR relaxation factor must lie in (0, 2], got {relaxation!r}")
        self.register_buffer("relaxation", torch.tensor(float(relaxation), dtype=torch.float64))

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        return features[:, 4:7], self.relaxation.expand(features.shape[0])


class NewtonSorNet(nn.Module):
    """Psi_ini, Psi_relax and Psi_both of §4.1 / Appendix C.2 (``head`` picks which).

    An MLP (ReLU) takes the logs of ``(c1, c2, c3, h, y1, y2, y3)`` (``y``
    floored at 1e-30, since ``y2 = y3 = 0`` at ``t = 0``), standardised with the
    training tasks' statistics (:meth:`fit_inputs`). Its last layer gives

    - the initial guess ``y_n * exp(tanh(W_ini x))`` (equation (47), read as a
      change of ``log y_n``; as printed, ``exp(log(y_n + tanh(.)))``, it would
      add up to 1 to concentrations of 1e-10), and
    - the relaxation factor ``sigmoid(W_relax x) + 1`` in ``(1, 2)``
      (equation (48)), its bias initialised to -1.

    A head that does not predict a quantity uses ``y_n``, or the constant
    ``relaxation`` (``r_base``). The network computes in float32 (2x faster
    than float64 on a CPU); its outputs are returned in float64.

    ``guess_init="zero"`` (not in the paper) starts the guess outputs' weights
    and biases at zero, so that training starts from ``y_n``, as the bias of -1
    starts ``r`` near 1.27; ``"default"`` keeps PyTorch's initialisation, under
    which the first guesses are ``y_n`` scaled by random factors in
    ``(1/e, e)``: worse than ``y_n`` (docs/results.md, Table 1).
    """

    heads = ("ini", "relax", "both")
    guess_inits = ("zero", "default")

    def __init__(
        self,
        head: str,
        relaxation: float,
        hidden: Sequence[int] = (1024, 1024),
        guess_init: str = "zero",
    ):
        super().__init__()
        if head not in self.heads:
            raise ValueError(f"unknown head {head!r}; expected one of {list(self.heads)}")
        if guess_init not in self.guess_inits:
            raise ValueError(
                f"unknown guess_init {guess_init!r}; expected one of {list(self.guess_inits)}"
            )
        self.head = head
        self.guess = head in ("ini", "both")
        self.relax = head in ("relax", "both")
        outputs = 3 * self.guess + self.relax
        self.network = MLP(7, hidden, outputs, "relu", dtype=torch.float32)
        last = self.network.layers[-1]
        with torch.no_grad():
            if self.relax:
                last.bias[-1] = -1.0
            if self.guess and guess_init == "zero":
                last.weight[:3].zero_()
                last.bias[:3].zero_()
        self.base = PreviousStep(relaxation)
        self.register_buffer("mean", torch.zeros(7, dtype=torch.float64))
        self.register_buffer("scale", torch.ones(7, dtype=torch.float64))

    @staticmethod
    def _logs(features: Tensor) -> Tensor:
        return features.to(torch.float64).clamp_min(1e-30).log()

    @torch.no_grad()
    def fit_inputs(self, features: Tensor) -> None:
        """Set the standardisation from the training tasks' features ``(B, 7)``."""
        logs = self._logs(features).to(self.mean)
        self.mean.copy_(logs.mean(dim=0))
        self.scale.copy_(logs.std(dim=0).clamp_min(1e-12))

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        y0, r = self.base(features)
        inputs = ((self._logs(features) - self.mean) / self.scale).to(torch.float32)
        out = self.network(inputs).to(torch.float64)
        if self.guess:
            y0 = y0 * torch.exp(torch.tanh(out[:, :3]))
        if self.relax:
            r = torch.sigmoid(out[:, -1]) + 1
        return y0, r
