"""Run directories: a trained model, its configuration and its training history.

Files are written atomically (a temporary file, then ``os.replace``), and
``config.json`` is written last, so a directory with a config is complete.
Weights are stored with safetensors, never pickled.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor

import femeta
from femeta._io import write_atomic

__all__ = [
    "RunError",
    "load_run",
    "read_history",
    "restore",
    "run_problem",
    "save_run",
    "tasks_digest",
]

WEIGHTS, CONFIG, HISTORY = "model.safetensors", "config.json", "history.json"


class RunError(ValueError):
    """A run directory is missing, incomplete, corrupt or made for something else."""


def tasks_digest(*tensors: Tensor) -> str:
    """A SHA-256 of the training data, to tell later which data a model saw."""
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def save_run(
    run_dir: Path, state: dict[str, Tensor], config: dict[str, Any], history: list[dict]
) -> None:
    """Save weights, history and (last) the configuration of a trained meta-solver."""
    run_dir = Path(run_dir)
    weights = {name: value.detach().cpu().contiguous() for name, value in state.items()}
    write_atomic(run_dir / WEIGHTS, save_safetensors(weights))
    write_atomic(run_dir / HISTORY, json.dumps(history, indent=1).encode())
    config = {"femeta_version": femeta.__version__, **config}
    write_atomic(run_dir / CONFIG, json.dumps(config, indent=2).encode())


def load_run(run_dir: Path, problem: str | None) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Read a run directory made for ``problem`` (any, if None); return config and weights."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(
            f"model directory {run_dir} does not exist; pass the --out of `femeta train`"
        )
    config_path, weights_path = run_dir / CONFIG, run_dir / WEIGHTS
    for path in (config_path, weights_path):
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
    try:
        state = load_safetensors(weights_path.read_bytes())
    except (SafetensorError, ValueError, OSError) as err:
        raise RunError(f"{weights_path} is corrupt ({err}); retrain the model") from err
    return config, state


def run_problem(run_dir: Path) -> str:
    """The problem a run directory was trained for."""
    config, _ = load_run(Path(run_dir), problem=None)
    return config["problem"]


def read_history(run_dir: Path) -> list[dict[str, Any]]:
    """The per-epoch training history of a run directory."""
    path = Path(run_dir) / HISTORY
    try:
        history = json.loads(path.read_text())
    except FileNotFoundError:
        raise RunError(f"{path} is missing; {run_dir} is not a complete run directory") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RunError(f"{path} is not valid JSON ({err})") from err
    if not isinstance(history, list):
        raise RunError(f"{path} does not hold a list of epochs")
    return history


def restore(module: torch.nn.Module, state: dict[str, Tensor], run_dir: Path) -> None:
    """Load ``state`` into ``module``, with a clear error when they do not match."""
    try:
        module.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise RunError(f"the weights in {run_dir} do not fit this meta-solver ({first})") from err
