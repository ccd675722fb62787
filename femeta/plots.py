"""Figures: training curves and iteration histograms (like the paper's Figure 2)."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from femeta._io import write_atomic

__all__ = ["plot_iterations", "plot_training", "save_figure"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure: Any, path: Path) -> None:
    """Write ``figure`` as a PNG, atomically, and close it."""
    plt = _pyplot()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    write_atomic(Path(path), buffer.getvalue())


def plot_training(history: Sequence[Mapping[str, float]], path: Path) -> None:
    """Training and validation loss, learning rate and (if monitored) iterations, per epoch."""
    plt = _pyplot()
    epochs = [record["epoch"] for record in history]
    iterations = [record.get("validation_iterations") for record in history]
    monitored = all(value is not None for value in iterations)
    figure, panels = plt.subplots(1, 3 if monitored else 2, figsize=(15 if monitored else 10, 4))
    losses, rates = panels[0], panels[1]
    losses.plot(epochs, [r["train_loss"] for r in history], label="training")
    losses.plot(epochs, [r["validation_loss"] for r in history], label="validation")
    losses.set_yscale("log")
    losses.set_xlabel("epoch")
    losses.set_ylabel("loss")
    losses.legend()
    rates.plot(epochs, [r["lr"] for r in history])
    rates.set_yscale("log")
    rates.set_xlabel("epoch")
    rates.set_ylabel("learning rate")
    if monitored:
        panels[2].plot(epochs, iterations)
        panels[2].set_xlabel("epoch")
        panels[2].set_ylabel("mean iterations, validation tasks")
    figure.tight_layout()
    save_figure(figure, path)


def plot_iterations(iterations: Mapping[str, np.ndarray], tol: float, path: Path) -> None:
    """One histogram of iterations to ``tol`` per meta-solver, on shared bins."""
    plt = _pyplot()
    everything = np.concatenate([np.asarray(v) for v in iterations.values()])
    bins = np.linspace(everything.min(), everything.max() + 1, 41)
    figure, grid = plt.subplots(len(iterations), 1, figsize=(7, 2.4 * len(iterations)), sharex=True)
    for axes, (label, counts) in zip(np.atleast_1d(grid), iterations.items(), strict=True):
        axes.hist(counts, bins=bins)
        axes.set_title(f"{label}: mean {np.mean(counts):.2f}")
    np.atleast_1d(grid)[-1].set_xlabel(f"iterations to tol = {tol:g}")
    figure.tight_layout()
    save_figure(figure, path)
