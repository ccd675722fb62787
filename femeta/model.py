"""A trained meta-solver applied without torch: ``femeta.load(run_dir).predict(**params)``.

The network of a run directory is evaluated with numpy from its saved weights,
so a script that only applies a model pays neither torch's import time nor its
memory. Parameters are passed by name, checked against the distribution the
model was trained on, and turned into the network's inputs as in training.

A run's ``config.json`` describes the model under the key ``"model"`` (run-file
format 2). Files of format 1 have no such key; they were written for the
paper's task distributions, which :func:`load` then assumes.
"""

from __future__ import annotations

import json
import keyword
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import femeta

__all__ = ["FORMAT_VERSION", "Model", "RunError", "load", "read_config"]

#: The run-file format this version writes; it reads this one and format 1.
FORMAT_VERSION = 2
WEIGHTS, CONFIG = "model.safetensors", "config.json"
#: Matrix statistics a model may read beside the parameters (from the assembled A).
MATRIX_FEATURES = ("norm_1", "norm_inf", "norm_fro")
#: The statistic of A behind each matrix feature: the beams read the norms, a family model
#: their logs and the range of ``|diag(A)|`` over the rows coupled to others.
STATISTICS = {
    **{name: name for name in MATRIX_FEATURES},
    "log_diag_min": "diag_min",
    "log_diag_max": "diag_max",
    "log_norm_inf": "norm_inf",
    "log_norm_fro": "norm_fro",
}


class RunError(ValueError):
    """A run directory is missing, incomplete, corrupt or made for something else."""


def read_config(run_dir: str | Path, problem: str | None = None) -> dict[str, Any]:
    """The checked ``config.json`` of a run directory made for ``problem`` (any, if None)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(
            f"model directory {run_dir} does not exist; pass the --out of `femeta train`"
        )
    config_path = run_dir / CONFIG
    for path in (config_path, run_dir / WEIGHTS):
        if not path.is_file():
            raise RunError(f"{path} is missing; {run_dir} is not a complete femeta run directory")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RunError(f"{config_path} is not valid JSON ({err}); retrain the model") from err
    if not isinstance(config, dict) or "problem" not in config:
        raise RunError(f"{config_path} has no 'problem' entry; it was not written by femeta")
    if problem is not None and config["problem"] != problem:
        raise RunError(
            f"{run_dir} holds a model for {config['problem']!r}, not {problem!r}; use "
            f"`femeta evaluate {config['problem']} --model {run_dir}` or train one for {problem!r}"
        )
    saved = str(config.get("femeta_version", "?"))
    if saved.split(".")[:2] != femeta.__version__.split(".")[:2]:
        raise RunError(
            f"{run_dir} was written by femeta {saved}, this is {femeta.__version__}; "
            "retrain the model"
        )
    version = config.get("format", 1)
    if version not in (1, FORMAT_VERSION):
        raise RunError(
            f"{config_path} has run-file format {version!r}; this femeta reads formats 1 and "
            f"{FORMAT_VERSION}: upgrade femeta or retrain the model"
        )
    return config


@dataclass(frozen=True)
class _Input:
    """One input of the network: ``sum_j coefficient_j log(feature_j)`` and its trained range."""

    label: str
    coefficients: dict[str, float]
    low: float | None
    high: float | None


class Model:
    """A trained meta-solver, evaluated with numpy. Build it with :func:`load`.

    Attributes:
        problem: The task family the model was trained on (e.g. ``"elasticity"``).
        predicts: ``"alpha"`` (a diagonal shift), ``"guess"`` (an initial guess)
            or ``"guess+relaxation"``.
        parameters: The names :meth:`predict` takes, with their trained ranges
            (``None`` where a parameter has none).
        statistics: The statistics of the assembled matrix that :meth:`predict`
            also takes (e.g. ``norm_fro``, ``diag_min``, or one that the family file
            declares in ``STATISTICS``); ``femeta.fenics`` computes them.
        family: The family file of a model trained with ``femeta train family``.
        distributions: A family model's distribution of each parameter,
            ``name -> (kind, low, high)`` (empty for other models).
        run_dir: Where it was loaded from.
    """

    def __init__(self, run_dir: Path, config: dict[str, Any], weights: dict[str, np.ndarray]):
        self.run_dir = run_dir
        self.problem: str = config["problem"]
        spec = config.get("model") or _format1_spec(config)
        self._network: str = spec["network"]
        self._features: list[str] = list(spec["features"])
        ranges = {name: tuple(bounds) for name, bounds in spec.get("ranges", {}).items()}
        # A family file's model: its inputs are the parameters on the scale of their
        # distribution (log for log-uniform ones), the logs of matrix statistics and the
        # family file's own statistics as they come.
        self.distributions: dict[str, tuple[str, float, float]] = {
            name: (kind, float(low), float(high))
            for name, (kind, low, high) in spec.get("distributions", {}).items()
        }
        self._file_statistics: tuple[str, ...] = tuple(spec.get("family_statistics", ()))
        bounds = ranges | {name: d[1:] for name, d in self.distributions.items()}
        self.parameters: dict[str, tuple[float, float] | None] = {
            _argument(name): bounds.get(name)
            for name in self._features
            if name not in STATISTICS and name not in self._file_statistics
        }
        self.predicts: str = {
            "ShiftNet": "alpha",
            "EigenbasisGuess": "guess",
            "NewtonSorNet": "guess+relaxation",
        }[self._network]
        self.base_alpha: float | None = spec.get("base_alpha")
        self.ic_pattern: str | None = config.get("problem_params", {}).get("ic_pattern")
        self.family: str | None = config.get("problem_params", {}).get("family")
        self._head = spec.get("head")
        self._weights = weights
        self._layers = _layers(weights, "network.layers")
        self._inputs = _inputs(self._features, spec.get("projection"), ranges)
        # Matrix statistics that no input reads need not be given (they enter as log 1 = 0).
        read = {name for item in self._inputs for name in item.coefficients}
        self._unread = {name for name in MATRIX_FEATURES if name not in read}
        self.statistics: tuple[str, ...] = tuple(
            STATISTICS.get(name, name)
            for name in self._features
            if (name in STATISTICS and name not in self._unread) or name in self._file_statistics
        )

    @property
    def needs_matrix(self) -> bool:
        """Whether the network reads statistics of the assembled matrix beside the parameters."""
        return bool(self.statistics)

    def __repr__(self) -> str:
        names = ", ".join(self.parameters)
        return f"Model({self.problem!r}, predicts={self.predicts!r}, parameters=({names}))"

    def predict(self, *, extrapolate: bool = False, **params: Any) -> Any:
        """The solver parameter for one task given by its named parameters.

        A shift model (:attr:`predicts` ``"alpha"``) returns ``alpha`` as a float;
        an initial-guess model returns the guess as an array (and the relaxation
        factor with it, as a tuple, for ``"guess+relaxation"``). Names a Python
        keyword would clash with take a trailing underscore (``lambda_``). Each
        input the network reads must lie in the range of the training
        distribution, unless ``extrapolate`` is set.

        Raises:
            ValueError: A parameter is missing, unknown, not a positive finite
                number, or outside the trained range.
        """
        params = {_argument(name): value for name, value in params.items()}
        features = self._feature_vector(params)
        if self._network == "EigenbasisGuess":
            coefficients = _mlp(self._layers, features[None, :], "silu")[0]
            return coefficients @ self._weights["basis"].T
        if self.distributions:
            inputs = self._family_inputs(features, params, extrapolate)
        else:
            logs = np.log(np.maximum(features, 1e-30) if self._network == "NewtonSorNet"
                          else features)  # fmt: skip
            inputs = self._project(logs, params, extrapolate)
        mean, scale = self._weights["mean"], self._weights["scale"]
        standardised = (inputs - mean) / scale
        if self._network == "ShiftNet":
            z = _mlp(self._layers, standardised[None, :], "relu")[0, 0]
            high = float(self._weights["high"])
            return max(high * _sigmoid(z), high * 1e-12)
        out = _mlp(self._layers, standardised[None, :].astype(np.float32), "relu")[0]
        out = out.astype(np.float64)
        guess, relaxation = features[4:7].copy(), float(self._weights["base.relaxation"])
        if self._head in ("ini", "both"):
            guess = guess * np.exp(np.tanh(out[:3]))
        if self._head in ("relax", "both"):
            relaxation = _sigmoid(out[-1]) + 1.0
        return guess, relaxation

    def _feature_vector(self, params: Mapping[str, Any]) -> np.ndarray:
        given = params
        statistics = set(self.statistics) | (set() if self.distributions else set(MATRIX_FEATURES))
        unknown = sorted(set(given) - set(self.parameters) - statistics)
        if unknown:
            raise ValueError(
                f"unknown parameter {unknown[0]!r} for this {self.problem} model; "
                f"it takes {', '.join(self.parameters)}"
            )
        values = []
        for name in self._features:
            argument = STATISTICS.get(name) or _argument(name)
            if name in self._unread:
                values.append(1.0)
                continue
            if argument not in given:
                statistic = name in STATISTICS or name in self._file_statistics
                what = "matrix statistic" if statistic else "parameter"
                needs = f" and the statistics of A ({', '.join(self.statistics)})"
                raise ValueError(
                    f"missing {what} {argument!r}: this {self.problem} model takes "
                    f"{', '.join(self.parameters)}{needs if self.needs_matrix else ''}"
                )
            values.append(given[argument])
        if self._network == "EigenbasisGuess":
            vector = np.asarray(values[0], dtype=np.float64).reshape(-1)
            size = self._weights["basis"].shape[0]
            if vector.shape != (size,) or not np.isfinite(vector).all():
                raise ValueError(
                    f"f must be {size} finite numbers (the source at the grid points), "
                    f"got shape {np.shape(values[0])}"
                )
            return vector
        vector = np.empty(len(values))
        for index, (name, value) in enumerate(zip(self._features, values, strict=True)):
            number = _number(value)
            floor = 0.0 if self._network == "NewtonSorNet" and name.startswith("y") else None
            if name in self._file_statistics or self.distributions.get(name, ("",))[0] == "uniform":
                valid, kind = math.isfinite(number), "finite number"
            else:
                valid = math.isfinite(number) and (number >= 0 if floor is not None else number > 0)
                kind = f"{'non-negative' if floor is not None else 'positive'} finite number"
            if not valid:
                argument = STATISTICS.get(name) or _argument(name)
                raise ValueError(f"{argument} = {value!r} is not a {kind}")
            vector[index] = number
        return vector

    def _family_inputs(
        self, values: np.ndarray, params: Mapping[str, Any], extrapolate: bool
    ) -> np.ndarray:
        """A family model's inputs: each parameter on its distribution's scale, logs of A's
        statistics, the family file's own statistics as they come."""
        inputs = np.empty(len(values))
        for index, (name, value) in enumerate(zip(self._features, values, strict=True)):
            if name in self._file_statistics:
                inputs[index] = value
                continue
            kind, low, high = self.distributions.get(name, ("loguniform", None, None))
            if low is not None and not extrapolate:
                margin = 1e-9 * max(1.0, abs(low), abs(high))
                if not low - margin <= value <= high + margin:
                    given = _argument(name)
                    raise ValueError(
                        f"{given} = {params[given]!r} is outside [{low:g}, {high:g}], the range "
                        f"the model in {self.run_dir} was trained on; pass extrapolate=True to "
                        "use it anyway"
                    )
            inputs[index] = math.log(value) if kind == "loguniform" else value
        return inputs

    def _project(
        self, logs: np.ndarray, params: Mapping[str, Any], extrapolate: bool
    ) -> np.ndarray:
        position = {name: index for index, name in enumerate(self._features)}
        values = np.empty(len(self._inputs))
        for index, item in enumerate(self._inputs):
            value = sum(c * logs[position[name]] for name, c in item.coefficients.items())
            values[index] = value
            if extrapolate or item.low is None:
                continue
            # A relative margin for bounds given in decimal (e.g. 0.003 = exp(log(0.003))).
            margin = 1e-9 * max(1.0, abs(item.low), abs(item.high))
            if not (item.low - margin <= value <= item.high + margin):
                shown = ", ".join(
                    f"{_argument(name)} = {params[_argument(name)]!r}" for name in item.coefficients
                )
                shown = f" ({shown})" if len(item.coefficients) > 1 else ""
                raise ValueError(
                    f"{item.label} = {math.exp(value):.6g}{shown} is outside "
                    f"[{math.exp(item.low):.6g}, {math.exp(item.high):.6g}], the range the "
                    f"model in {self.run_dir} was trained on; pass extrapolate=True to use "
                    "it anyway"
                )
        return values


def load(run_dir: str | Path) -> Model:
    """Load the trained model of a run directory (the ``--out`` of ``femeta train``)."""
    from safetensors.numpy import load_file

    run_dir = Path(run_dir)
    config = read_config(run_dir)
    if config.get("metasolver", "nn") != "nn":
        raise RunError(f"{run_dir} does not hold a network (metasolver {config['metasolver']!r})")
    try:
        weights = load_file(str(run_dir / WEIGHTS))
    except Exception as err:  # safetensors raises its own error type and OSError
        raise RunError(f"{run_dir / WEIGHTS} is corrupt ({err}); retrain the model") from err
    try:
        return Model(run_dir, config, weights)
    except (KeyError, IndexError, TypeError, ValueError) as err:
        raise RunError(f"{run_dir} does not describe a usable model ({err!r})") from err


def _argument(name: str) -> str:
    """The keyword-argument name of a feature (``lambda`` -> ``lambda_``)."""
    return f"{name}_" if keyword.iskeyword(name) else name


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


def _layers(weights: dict[str, np.ndarray], prefix: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """The ``(weight, bias)`` pairs of an MLP saved from ``femeta.metasolvers.MLP``."""
    indices = sorted(
        int(key[len(prefix) + 1 :].split(".")[0])
        for key in weights
        if key.startswith(prefix + ".") and key.endswith(".weight")
    )
    if not indices:
        raise KeyError(f"no layers under {prefix!r} in the weights")
    return [(weights[f"{prefix}.{i}.weight"], weights[f"{prefix}.{i}.bias"]) for i in indices]


def _mlp(layers: list[tuple[np.ndarray, np.ndarray]], x: np.ndarray, activation: str) -> np.ndarray:
    for index, (weight, bias) in enumerate(layers):
        x = x @ weight.T + bias
        if index < len(layers) - 1:
            x = np.maximum(x, 0) if activation == "relu" else x / (1.0 + np.exp(-x))  # or SiLU
    return x


def _inputs(
    features: list[str], projection: list[list[float]] | None,
    ranges: dict[str, tuple[float, float]],
) -> list[_Input]:  # fmt: skip
    """The network's inputs (log features, or their projection) and each one's trained range.

    The range of a combination of logs over the box of the parameters' ranges is
    reached at the box's corners; a combination that reads a feature without a
    range (e.g. a matrix norm) has none.
    """
    if projection is None:
        projection = np.eye(len(features)).tolist()
    inputs = []
    for row in projection:
        coefficients = {f: float(c) for f, c in zip(features, row, strict=True) if c != 0}
        low = high = 0.0
        for name, c in coefficients.items():
            if name not in ranges:
                low = high = None
                break
            bounds = sorted((c * math.log(ranges[name][0]), c * math.log(ranges[name][1])))
            low, high = low + bounds[0], high + bounds[1]
        label = _label(coefficients)
        inputs.append(_Input(label, coefficients, low, high))
    return inputs


def _label(coefficients: dict[str, float]) -> str:
    """``lambda_/mu`` for the coefficients ``{lambda: 1, mu: -1}``."""
    above = [_power(name, c) for name, c in coefficients.items() if c > 0]
    below = [_power(name, -c) for name, c in coefficients.items() if c < 0]
    return " * ".join(above or ["1"]) + "".join(f"/{term}" for term in below)


def _power(name: str, exponent: float) -> str:
    return _argument(name) if exponent == 1 else f"{_argument(name)}^{exponent:g}"


def _format1_spec(config: dict[str, Any]) -> dict[str, Any]:
    """What a format-1 run file left out: the paper's distributions and inputs."""
    problem, params = config["problem"], config.get("problem_params", {})
    if problem == "elasticity":
        features = ["W", "lambda", "mu", "rho", *MATRIX_FEATURES]
        projection = None
        if params.get("inputs", "paper") == "invariant":
            projection = [[1, 0, 0, 0, 0, 0, 0], [0, 1, -1, 0, 0, 0, 0]]
        ranges = {"W": (0.003, 0.3), "lambda": (0.1, 10.0), "mu": (0.1, 10.0), "rho": (0.1, 10.0)}
        return {"network": "ShiftNet", "features": features, "projection": projection,
                "ranges": ranges}  # fmt: skip
    if problem == "poisson1d":
        return {"network": "EigenbasisGuess", "features": ["f"]}
    if problem == "robertson":
        ranges = {"c1": (1e-4, 1.0), "c2": (1e5, 1e9), "c3": (1e2, 1e6)}
        return {"network": "NewtonSorNet", "features": ["c1", "c2", "c3", "h", "y1", "y2", "y3"],
                "ranges": ranges, "head": params.get("head", "both")}  # fmt: skip
    raise RunError(f"no model description for problem {problem!r} in this run file")
