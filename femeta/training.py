"""Algorithm 1 (GBMS): fit a meta-solver's weights omega by gradient descent on a solve loss.

The trainer knows nothing of problems or solvers. It receives an *objective*,
``objective(metasolver, tasks) -> per-task loss``, that composes Psi, Phi and L.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from femeta.problems.base import TaskSet

__all__ = ["EpochRecord", "Objective", "TrainConfig", "TrainResult", "train"]

Objective = Callable[[nn.Module, TaskSet], Tensor]


@dataclass(frozen=True)
class TrainConfig:
    """Optimiser and schedule of Algorithm 1.

    ``schedule="plateau"`` divides the learning rate by ``1 / factor`` after
    ``patience`` epochs without a new best validation loss (Appendix C.1);
    ``schedule="steps"`` does so at each epoch in ``milestones`` (C.2, C.3);
    ``schedule="cosine"`` lowers it after every optimiser step along half a
    cosine, from ``lr`` to 0 at the last step.
    ``select`` says which epoch's weights are kept: the lowest validation loss
    (the paper), or the fewest mean validation iterations (needs a monitor).

    ``ema`` (a decay per step in (0, 1), or ``None``) keeps an exponential moving
    average of the weights; it is the average that is validated and selected.
    The validation (and the monitor) runs every ``validate_every`` epochs and
    after the last one; an epoch without it records a NaN validation loss.
    """

    epochs: int = 2500
    batch_size: int = 256
    lr: float = 0.01
    betas: tuple[float, float] = (0.999, 0.999)
    schedule: Literal["plateau", "steps", "cosine"] = "plateau"
    factor: float = 0.2
    patience: int = 100
    milestones: tuple[int, ...] = ()
    seed: int = 0
    select: Literal["loss", "iterations"] = "loss"
    ema: float | None = None
    validate_every: int = 1

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "patience", "validate_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive finite number, got {self.lr!r}")
        if not 0 < self.factor < 1:
            raise ValueError(f"factor must lie in (0, 1), got {self.factor!r}")
        if self.schedule not in ("plateau", "steps", "cosine"):
            raise ValueError(
                f"schedule must be 'plateau', 'steps' or 'cosine', got {self.schedule!r}"
            )
        if self.schedule == "plateau" and self.validate_every != 1:
            raise ValueError(
                "the plateau schedule needs a validation every epoch (validate_every=1)"
            )
        if self.ema is not None and not 0 < self.ema < 1:
            raise ValueError(f"ema must lie in (0, 1) or be None, got {self.ema!r}")
        if self.select not in ("loss", "iterations"):
            raise ValueError(f"select must be 'loss' or 'iterations', got {self.select!r}")


@dataclass(frozen=True)
class EpochRecord:
    """What one epoch did; ``validation_iterations`` is set when a monitor was given."""

    epoch: int
    train_loss: float
    validation_loss: float
    lr: float
    skipped_steps: int
    validation_iterations: float | None = None


@dataclass
class TrainResult:
    """The best weights on the validation set, and the history of every epoch."""

    best_state: dict[str, Tensor]
    best_epoch: int
    best_validation_loss: float
    history: list[EpochRecord] = field(default_factory=list)

    @property
    def skipped_steps(self) -> int:
        """Optimiser steps skipped because the loss or a gradient was not finite."""
        return sum(record.skipped_steps for record in self.history)

    def history_dicts(self) -> list[dict]:
        return [asdict(record) for record in self.history]


def train(
    metasolver: nn.Module,
    objective: Objective,
    train_tasks: TaskSet,
    validation_tasks: TaskSet,
    config: TrainConfig,
    on_epoch: Callable[[EpochRecord], None] | None = None,
    checkpoint: Callable[[dict[str, Any]], None] | None = None,
    checkpoint_seconds: float = 10.0,
    resume: dict[str, Any] | None = None,
    monitor: Callable[[nn.Module], float] | None = None,
) -> TrainResult:
    """Minimise the mean of ``objective`` over ``train_tasks`` with Adam.

    A step whose loss or gradient is NaN or infinite, or whose gradient's square
    overflows, is skipped (and counted), so one broken solve cannot poison the
    weights or Adam's state (see :func:`_safe_gradient`). The weights of the best epoch
    (``config.select``; with ``config.ema``, their moving average) are kept in the
    result; ``metasolver`` is left holding them.

    ``checkpoint`` receives the whole training state (weights, optimiser,
    schedule, random states, history) after an epoch, at most every
    ``checkpoint_seconds`` and after the last one; passing such a state back as
    ``resume`` continues the run exactly where it stood, so an interrupted and
    resumed run ends with the same weights as an uninterrupted one.

    ``monitor``, when given, is called without gradients after each epoch (for
    instance, the mean iterations on the validation tasks) and recorded.
    """
    if config.select == "iterations" and monitor is None:
        raise ValueError("select='iterations' needs a monitor of the validation iterations")
    torch.manual_seed(config.seed)
    shuffle = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.Adam(metasolver.parameters(), lr=config.lr, betas=config.betas)
    if config.schedule == "plateau":
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, factor=config.factor, patience=config.patience
        )
    elif config.schedule == "steps":
        scheduler = torch.optim.lr_scheduler.MultiStepLR(
            optimizer, milestones=list(config.milestones), gamma=config.factor
        )
    else:
        steps = config.epochs * math.ceil(len(train_tasks) / config.batch_size)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    # The module that is validated and kept: the weights, or their moving average.
    average = copy.deepcopy(metasolver) if config.ema is not None else None
    validated = metasolver if average is None else average
    best = TrainResult(copy.deepcopy(validated.state_dict()), 0, math.inf)
    first_epoch = 1
    if resume is not None:
        metasolver.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        shuffle.set_state(resume["shuffle_rng"])
        torch.set_rng_state(resume["torch_rng"])
        best = TrainResult(
            resume["best_state"],
            resume["best_epoch"],
            resume["best_validation_loss"],
            [EpochRecord(**record) for record in resume["history"]],
        )
        first_epoch = resume["epoch"] + 1
        if average is not None:
            average.load_state_dict(resume["average"])
    best_score = math.inf
    if best.best_epoch > 0:
        best_score = _score(best.history[best.best_epoch - 1], config)
    last_checkpoint = time.monotonic()
    for epoch in range(first_epoch, config.epochs + 1):
        metasolver.train()
        order = torch.randperm(len(train_tasks), generator=shuffle)
        total, count, skipped = 0.0, 0, 0
        for start in range(0, len(train_tasks), config.batch_size):
            batch = train_tasks.subset(order[start : start + config.batch_size])
            optimizer.zero_grad(set_to_none=True)
            loss = objective(metasolver, batch).mean()
            if not torch.isfinite(loss):
                skipped += 1
                continue
            loss.backward()
            if not _safe_gradient(metasolver):
                skipped += 1
                continue
            optimizer.step()
            if config.schedule == "cosine":
                scheduler.step()
            if average is not None:
                _update_average(average, metasolver, config.ema)
            total += loss.item() * len(batch)
            count += len(batch)
        validate = epoch % config.validate_every == 0 or epoch == config.epochs
        validation_loss, iterations = math.nan, None
        if validate:
            validation_loss = evaluate_objective(
                validated, objective, validation_tasks, config.batch_size
            )
            iterations = _monitored(monitor, validated)
        if config.schedule == "plateau":
            scheduler.step(validation_loss)
        elif config.schedule == "steps":
            scheduler.step()
        record = EpochRecord(
            epoch=epoch,
            train_loss=total / count if count else math.nan,
            validation_loss=validation_loss,
            lr=optimizer.param_groups[0]["lr"],
            skipped_steps=skipped,
            validation_iterations=iterations,
        )
        best.history.append(record)
        if _score(record, config) < best_score:
            best_score = _score(record, config)
            best.best_state = copy.deepcopy(validated.state_dict())
            best.best_epoch, best.best_validation_loss = epoch, validation_loss
        if on_epoch is not None:
            on_epoch(record)
        now = time.monotonic()
        if checkpoint is not None and (
            now - last_checkpoint >= checkpoint_seconds or epoch == config.epochs
        ):
            checkpoint(
                {
                    "epoch": epoch,
                    "model": metasolver.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "shuffle_rng": shuffle.get_state(),
                    "torch_rng": torch.get_rng_state(),
                    "best_state": best.best_state,
                    "best_epoch": best.best_epoch,
                    "best_validation_loss": best.best_validation_loss,
                    "history": best.history_dicts(),
                }
                | ({} if average is None else {"average": average.state_dict()})
            )
            last_checkpoint = now
    metasolver.load_state_dict(best.best_state)
    metasolver.eval()
    return best


@torch.no_grad()
def _update_average(average: nn.Module, metasolver: nn.Module, decay: float) -> None:
    """One step of the exponential moving average of the weights."""
    for averaged, current in zip(average.parameters(), metasolver.parameters(), strict=True):
        averaged.mul_(decay).add_(current, alpha=1 - decay)


def _score(record: EpochRecord, config: TrainConfig) -> float:
    """What ``config.select`` minimises over the epochs (NaN counts as infinite)."""
    value = record.validation_loss if config.select == "loss" else record.validation_iterations
    return value if value is not None and math.isfinite(value) else math.inf


@torch.no_grad()
def _monitored(monitor: Callable[[nn.Module], float] | None, metasolver: nn.Module) -> float | None:
    if monitor is None:
        return None
    metasolver.eval()
    return float(monitor(metasolver))


def _safe_gradient(metasolver: nn.Module) -> bool:
    """Whether every gradient entry and its square are finite.

    Adam keeps a running mean of the squared gradient. A finite gradient near
    the limit of its dtype (about 1e20 in float32) can make that mean infinite
    for good, and the weight it belongs to never moves again: derivatives
    through near-chaotic solves froze a fifth of Psi_relax's weights this way
    (docs/results.md, Table 1).
    """
    return all(
        bool(torch.isfinite(p.grad.square()).all())
        for p in metasolver.parameters()
        if p.grad is not None
    )


@torch.no_grad()
def evaluate_objective(
    metasolver: nn.Module, objective: Objective, tasks: TaskSet, batch_size: int
) -> float:
    """Mean of ``objective`` over ``tasks``, without gradients (NaN counts as infinite)."""
    metasolver.eval()
    total = 0.0
    for start in range(0, len(tasks), batch_size):
        batch = tasks.subset(slice(start, start + batch_size))
        total += objective(metasolver, batch).sum().item()
    mean = total / len(tasks)
    return mean if math.isfinite(mean) else math.inf
