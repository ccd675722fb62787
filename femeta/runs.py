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
from femeta.model import CONFIG, WEIGHTS, RunError, read_config
from femeta.solvers.sparse import SparseBatch

__all__ = [
    "RunError",
    "load_run",
    "read_history",
    "restore",
    "run_problem",
    "save_run",
    "tasks_digest",
]

HISTORY = "history.json"


def tasks_digest(*tensors: Tensor | SparseBatch) -> str:
    """A SHA-256 of the training data, to tell later which data a model saw.

    A :class:`SparseBatch` counts as its pattern and values.
    """
    digest = hashlib.sha256()
    for item in tensors:
        parts = (
            (item.indptr, item.indices, item.values) if isinstance(item, SparseBatch) else (item,)
        )
        for tensor in parts:
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
    config = read_config(run_dir, problem)
    weights_path = run_dir / WEIGHTS
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
