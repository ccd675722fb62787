"""Train, save, load and evaluate meta-solvers: what the CLI and scripts call."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from femeta._io import write_atomic
from femeta.evaluation import IterationStats
from femeta.experiments import DEFAULT_PROBLEM, EXPERIMENTS, Experiment, get_experiment
from femeta.experiments.base import TORCH, owners, resolve_device
from femeta.metasolvers import fold_scaling
from femeta.model import FORMAT_VERSION
from femeta.parallel import on_root, world
from femeta.runs import RunError, load_run, restore, save_run, tasks_digest
from femeta.training import EpochRecord, TrainResult, train

__all__ = [
    "TrainOptions",
    "base_alpha",
    "baseline_metasolver",
    "build_experiment",
    "evaluate_metasolver",
    "load_checkpoint",
    "load_metasolver",
    "monitor_cap",
    "read_checkpoint",
    "resolve_options",
    "resume_training",
    "train_metasolver",
]

CHECKPOINT = "checkpoint.pt"


#: The options of every experiment; an experiment adds its own (``Experiment.options``).
GENERIC_OPTIONS = ("loss", "m", "tol", "epochs", "seed", "gain", "batch_size", "lr", "select",
                   "engine", "paper")  # fmt: skip


@dataclass(frozen=True, init=False)
class TrainOptions:
    """Everything that defines a training run; saved with the model.

    ``None`` picks the experiment's default: for ``m`` (the fixed iteration
    count of L_m, or the cap of Phi_{eps,m} for the surrogate) see its
    ``default_m``; for ``tol`` its ``default_tol``; for ``epochs``,
    ``batch_size`` and ``lr`` its ``train_config`` (the paper's settings). For
    ``engine`` and the options the experiment picks (e.g. the beams'
    ``smooth`` and ``inputs``) it is the experiment's ``recommended_options``
    (the best known settings), or with ``paper`` its ``paper_options``
    (:func:`resolve_options`); an option given always wins, and with ``paper``
    one that differs from the paper's is an error. ``select`` keeps the epoch
    with the lowest validation loss (the paper) or, with ``"iterations"``, the
    fewest mean validation iterations, which needs the monitor. ``engine`` runs
    the training, validation and monitor solves; an engine other than torch shares
    them over the ranks of ``mpiexec``, which changes the wall time and nothing else.

    Every other keyword is an option that the problem's experiment declares
    (``Experiment.options``: e.g. ``p`` of ``poisson1d``), read back as an
    attribute; an option of another problem reads as ``None``, and giving one
    is an error. :func:`train_metasolver` saves the resolved values.
    """

    problem: str = DEFAULT_PROBLEM
    loss: str = "surrogate"
    m: int | None = None
    tol: float | None = None
    epochs: int | None = None
    seed: int = 0
    gain: float | None = None
    batch_size: int | None = None
    lr: float | None = None
    select: str = "loss"
    engine: str | None = None
    paper: bool = False
    #: The experiment's options that were given (``None`` values dropped).
    problem_options: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __init__(
        self, problem: str = DEFAULT_PROBLEM, loss: str = "surrogate", m: int | None = None,
        tol: float | None = None, epochs: int | None = None, seed: int = 0,
        gain: float | None = None, batch_size: int | None = None, lr: float | None = None,
        select: str = "loss",
        engine: str | None = None, paper: bool = False,
        problem_options: Mapping[str, Any] | None = None, **options: Any,
    ) -> None:  # fmt: skip
        given = {**(problem_options or {}), **options}
        values = dict(locals())
        for name in (*GENERIC_OPTIONS, "problem"):
            object.__setattr__(self, name, values[name])
        kept = {name: value for name, value in given.items() if value is not None}
        object.__setattr__(self, "problem_options", kept)
        self.__post_init__()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "problem_options":
            raise AttributeError(name)
        if name in self.problem_options:
            return self.problem_options[name]
        if owners(name):
            return None
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __post_init__(self) -> None:
        for name in ("m", "epochs", "seed", "batch_size"):
            value = getattr(self, name)
            if not (value is None and name != "seed") and (
                isinstance(value, bool) or not isinstance(value, int)
            ):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        if not isinstance(self.paper, bool):
            raise ValueError(f"paper must be true or false, got {self.paper!r}")
        for name in ("tol", "gain", "lr"):
            value = getattr(self, name)
            if isinstance(value, bool | str):
                raise ValueError(f"{name} must be a number, got {value!r}")
        if self.engine is not None and not isinstance(self.engine, str):
            raise ValueError(f"engine must be a string, got {self.engine!r}")
        if self.select not in ("loss", "iterations"):
            raise ValueError(f"select must be 'loss' or 'iterations', got {self.select!r}")
        if self.loss not in ("m", "surrogate"):
            raise ValueError(f"unknown loss {self.loss!r}; expected 'm' or 'surrogate'")
        if self.tol is not None and not (self.tol > 0 and self.tol < 1):
            raise ValueError(f"tolerance must lie in (0, 1), got {self.tol!r}")
        if self.m is not None and (self.m < 0 or (self.loss == "surrogate" and self.m < 1)):
            raise ValueError(f"m must be >= 0 (>= 1 for the surrogate), got {self.m}")
        if self.gain is not None and not self.gain > 0:
            raise ValueError(f"gain must be positive, got {self.gain!r}")
        experiment = _experiment_class(self.problem)
        experiment.check_options(self.problem_options, self.engine)

    def as_dict(self) -> dict[str, Any]:
        """The options as saved with a run: every option of every problem, ``None`` if unused."""
        names = {option.name: None for e in EXPERIMENTS.values() for option in e.options}
        generic = {name: getattr(self, name) for name in ("problem", *GENERIC_OPTIONS)}
        return generic | names | dict(self.problem_options)

    @classmethod
    def from_dict(cls, saved: Mapping[str, Any]) -> TrainOptions:
        """The options saved by :meth:`as_dict`, with the defaults of keys a run lacks.

        A key set to ``None`` is an option not given (or of another problem). Some runs
        of model format 2 carry ``workers``, the processes that shared their PETSc
        solves; it changed only the wall time, and is dropped.
        """
        problem = saved.get("problem", DEFAULT_PROBLEM)
        values = {name: value for name, value in saved.items()
                  if value is not None and name != "workers"}  # fmt: skip
        return cls(**_with_saved_defaults(problem, values))


def _experiment_class(problem: str) -> type[Experiment]:
    if problem not in EXPERIMENTS:
        raise ValueError(f"unknown problem {problem!r}; expected one of {sorted(EXPERIMENTS)}")
    return EXPERIMENTS[problem]


def _with_saved_defaults(problem: str | None, saved: Mapping[str, Any]) -> dict[str, Any]:
    """``saved`` (options or problem parameters of a run), with the values that a run saved
    without one of the experiment's keys used (``Experiment.saved_defaults``)."""
    defaults = EXPERIMENTS[problem].saved_defaults if problem in EXPERIMENTS else {}
    return dict(defaults) | {name: value for name, value in saved.items() if value is not None}


def monitor_cap(evaluation_cap: int, options: TrainOptions) -> int:
    """The cap of the monitor's validation solves: the evaluation's, or the surrogate's if larger.

    A beam model trained with the surrogate at cap 10 N is validated at 10 N, not at
    the default evaluation cap N; Robertson's surrogate cap (2000) stays below its
    evaluation cap (10^4).
    """
    if options.loss == "surrogate" and options.m is not None:
        return max(evaluation_cap, options.m)
    return evaluation_cap


def resolve_options(options: TrainOptions, device: str | torch.device) -> TrainOptions:
    """``options`` with ``engine`` and the options the experiment picks set.

    What is not given comes from the problem's experiment: its best known
    settings for training on ``device`` (``recommended_options``), or with
    ``options.paper`` the paper's (``paper_options``), where giving a value
    that differs from the paper's is an error. Given values are kept.
    """
    factory = _experiment_class(options.problem)
    names = [option.name for option in factory.options] + ["engine"]
    given = {name: getattr(options, name) for name in names}
    picked = set(factory.paper_options)
    chosen = {name: value for name, value in given.items()
              if name in picked and value is not None}  # fmt: skip
    if options.paper:
        paper = factory.paper_options
        differ = {name: value for name, value in chosen.items()
                  if name in paper and value != paper[name]}  # fmt: skip
        if differ:
            settings = ", ".join(_flag(name, value) for name, value in paper.items())
            dropped = " and ".join(_flag(name, value) for name, value in differ.items())
            raise ValueError(
                f"--paper trains {options.problem} with the paper's {settings}; "
                f"drop {dropped}, or drop --paper"
            )
        defaults = dict(paper)
    else:
        defaults = factory.recommended_options(given, resolve_device(device))
    return replace(options, **(defaults | chosen))


def _flag(name: str, value: Any) -> str:
    """``--name value``, as on the command line."""
    shown = f"{value:g}" if isinstance(value, float) else value
    return f"--{name.replace('_', '-')} {shown}"


def build_experiment(options: TrainOptions, device: str | torch.device) -> Any:
    """The experiment that ``options`` train on, on ``device``."""
    factory = _experiment_class(options.problem)
    given = {o.name: getattr(options, o.name) for o in factory.options if o.stage == "problem"}
    params = {name: value for name, value in given.items() if value is not None}
    return get_experiment(options.problem, **params, device=resolve_device(device))


def train_metasolver(
    options: TrainOptions,
    out: Path | None = None,
    on_epoch: Callable[[EpochRecord], None] | None = None,
    checkpoint_seconds: float = 10.0,
    monitor_iterations: bool = False,
    device: str | torch.device = "cpu",
) -> tuple[Any, nn.Module, TrainResult]:
    """Train Psi_nn for ``options`` on ``device``; save it to ``out`` when given.

    With ``monitor_iterations``, each epoch also records the mean iterations
    to ``options.tol`` on the validation tasks (a solve more per epoch).
    With ``out``, the training state is checkpointed there (``checkpoint.pt``)
    every ``checkpoint_seconds`` until the run completes, so that
    :func:`resume_training` can continue it after an interruption.

    Returns the experiment, the trained meta-solver (best on validation) and
    the training result.
    """
    return _train(options, out, on_epoch, checkpoint_seconds, None, monitor_iterations, device)


def resume_training(
    run_dir: Path,
    problem: str,
    on_epoch: Callable[[EpochRecord], None] | None = None,
    checkpoint_seconds: float = 10.0,
    monitor_iterations: bool = False,
    device: str | torch.device = "cpu",
) -> tuple[Any, nn.Module, TrainResult]:
    """Continue an interrupted :func:`train_metasolver` run from its last checkpoint."""
    run_dir = Path(run_dir)
    if (run_dir / "config.json").exists():
        raise RunError(f"{run_dir} holds a completed run; there is nothing to resume")
    path = run_dir / CHECKPOINT
    if not path.is_file():
        raise RunError(f"{path} does not exist; only a run started with --out can be resumed")
    options, trainer = read_checkpoint(path)
    if options.problem != problem:
        raise RunError(f"{run_dir} is a {options.problem!r} run, not {problem!r}")
    return _train(
        options, run_dir, on_epoch, checkpoint_seconds, trainer, monitor_iterations, device
    )


def load_checkpoint(
    path: Path,
    problem: str,
    device: str | torch.device = "cpu",
    **overrides: Any,
) -> tuple[Any, nn.Module, dict[str, Any]]:
    """The best weights so far of an interrupted (or running) run's ``checkpoint.pt``.

    ``overrides`` (problem options) change the task distribution, as in
    :func:`load_metasolver`. Returns the experiment, the meta-solver on ``device`` and
    how far the training had come: ``epochs_done``, ``epochs``, ``best_epoch`` and
    ``best_validation_loss``.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise RunError(
            f"{path} {what}; give the checkpoint.pt that `femeta train --out RUN_DIR` keeps "
            "in RUN_DIR until the run completes"
        )
    options, trainer = read_checkpoint(path)
    if options.problem != problem:
        raise RunError(f"{path} is a checkpoint of a {options.problem!r} run, not {problem!r}")
    try:
        experiment = build_experiment(replace(options, **overrides), device)
    except (TypeError, ValueError) as err:
        raise RunError(f"cannot evaluate {path} with these options: {err}") from err
    try:
        state = trainer["best_state"]
        progress = {
            "epochs_done": int(trainer["epoch"]),
            "epochs": options.epochs,
            "best_epoch": int(trainer["best_epoch"]),
            "best_validation_loss": float(trainer["best_validation_loss"]),
        }
    except (KeyError, TypeError, ValueError) as err:
        raise RunError(f"{path} is not a readable femeta checkpoint (no {err})") from err
    metasolver = experiment.metasolver("nn")
    if experiment.recommended_train is not None and not options.paper:
        # The recommended set-up's checkpoint holds the network as it trains.
        train_tasks = experiment.tasks("train", options.seed)
        metasolver = experiment.training_metasolver(train_tasks, options.paper)
    restore(metasolver, state, path)
    metasolver = fold_scaling(metasolver)
    metasolver.eval()
    return experiment, metasolver, progress


def read_checkpoint(path: Path) -> tuple[TrainOptions, dict[str, Any]]:
    """The options and the trainer's state (weights, best weights, optimiser, history)
    of an interrupted run's ``checkpoint.pt``."""
    try:
        saved = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:  # a truncated or foreign file fails in many ways
        raise RunError(
            f"{path} is not a readable femeta checkpoint (torch.load failed with "
            f"{type(err).__name__}: truncated, or not written by `femeta train`)"
        ) from err
    try:
        return TrainOptions.from_dict(saved["options"]), saved["trainer"]
    except Exception as err:
        first = (str(err).splitlines() or [type(err).__name__])[0]
        raise RunError(f"{path} is not a readable femeta checkpoint ({first})") from err


def _train(
    options: TrainOptions,
    out: Path | None,
    on_epoch: Callable[[EpochRecord], None] | None,
    checkpoint_seconds: float,
    resume: dict[str, Any] | None,
    monitor_iterations: bool,
    device: str | torch.device,
) -> tuple[Any, nn.Module, TrainResult]:
    if options.select == "iterations" and not monitor_iterations:
        raise ValueError(
            "select='iterations' keeps the epoch with the fewest validation iterations, "
            "which only the monitor measures; turn the monitor on (drop --no-monitor)"
        )
    comm = world()
    if resume is None:  # a checkpoint holds resolved options
        options = resolve_options(options, device)
    experiment = build_experiment(options, device)
    config = experiment.train_config(
        options.epochs, options.batch_size, options.lr, options.seed, paper=options.paper
    )
    config = replace(config, select=options.select)
    options = replace(
        options,
        m=experiment.default_m(options.loss) if options.m is None else options.m,
        tol=experiment.default_tol if options.tol is None else options.tol,
        gain=experiment.train_set_up(options.paper).gain if options.gain is None else options.gain,
        epochs=config.epochs,
        batch_size=config.batch_size,
        lr=config.lr,
        **_in_force(experiment, options),
    )
    train_tasks = experiment.tasks("train", options.seed)
    validation_tasks = experiment.tasks("validation", options.seed)
    tol = options.tol if options.loss == "surrogate" else None
    objective_options = {
        option.name: getattr(options, option.name)
        for option in experiment.options
        if option.stage == "objective"
    }
    objective = experiment.objective(
        options.loss, options.m, tol, options.gain, engine=options.engine, **objective_options,
    )  # fmt: skip
    torch.manual_seed(options.seed)
    metasolver = experiment.training_metasolver(train_tasks, options.paper)
    monitor = None
    if monitor_iterations:
        cap = monitor_cap(experiment.evaluation_cap, options)

        # With the PETSc engine the monitor solves with it too, on the systems training keeps.
        engine = {} if options.engine == TORCH else {"engine": options.engine}

        def monitor(psi: nn.Module) -> float:
            stats = experiment.stats(psi, validation_tasks, options.tol, cap, **engine)
            return stats.mean_iterations

    checkpoint = None
    if out is not None:

        def checkpoint(state: dict[str, Any]) -> None:
            buffer = io.BytesIO()
            torch.save({"options": options.as_dict(), "trainer": state}, buffer)
            on_root(comm, lambda: write_atomic(Path(out) / CHECKPOINT, buffer.getvalue()))

    result = train(
        metasolver,
        objective,
        train_tasks,
        validation_tasks,
        config,
        on_epoch,
        checkpoint,
        checkpoint_seconds,
        resume,
        monitor,
    )
    # What is saved and returned is the plain network: fold any training-time scaling into it.
    metasolver = fold_scaling(metasolver)
    result.best_state = metasolver.state_dict()
    if out is not None:
        # Every rank takes part in what the record computes (Psi_base's shift); rank 0 writes.
        record = {
            "format": FORMAT_VERSION,
            "problem": experiment.name,
            "problem_params": experiment.params(),
            "model": experiment.model_spec(train_tasks),
            "solver": experiment.solver_name,
            "predicts": experiment.predicts,
            "features": experiment.features,
            "metasolver": "nn",
            "options": options.as_dict(),
            "train_config": asdict(config),
            "training_data_sha256": tasks_digest(*train_tasks.fields.values()),
            "best_epoch": result.best_epoch,
            "best_validation_loss": result.best_validation_loss,
            "skipped_steps": result.skipped_steps,
        }

        def save() -> None:
            save_run(Path(out), result.best_state, record, result.history_dicts())
            (Path(out) / CHECKPOINT).unlink(missing_ok=True)

        on_root(comm, save)
    return experiment, metasolver, result


def load_metasolver(
    run_dir: Path, problem: str, device: str | torch.device = "cpu", **overrides: Any
) -> tuple[Any, nn.Module]:
    """Load a trained meta-solver onto ``device``.

    ``overrides`` (``None`` values ignored) replace problem options of the saved
    model that change its test tasks (those with an ``evaluate`` help, e.g.
    ``p`` of ``poisson1d``).
    """
    device = resolve_device(device)
    config, state = load_run(Path(run_dir), problem)
    params = _with_saved_defaults(problem, config.get("problem_params", {}))
    overrides = {name: value for name, value in overrides.items() if value is not None}
    for name in overrides:
        option = EXPERIMENTS[problem].option(name)
        if option is None or option.evaluate is None:
            flag = "--" + name.replace("_", "-")
            where = " and ".join(e.name for e in owners(name)) or "no problem"
            raise RunError(f"{flag} applies to {where} only; {run_dir} is a {problem!r} model")
    try:
        experiment = get_experiment(problem, **params | overrides, device=device)
        metasolver = experiment.metasolver(config.get("metasolver", "nn"))
    except (TypeError, ValueError) as err:
        if overrides:
            flags = ", ".join(
                f"--{name.replace('_', '-')} {value}" for name, value in overrides.items()
            )
            raise RunError(f"cannot evaluate {run_dir} with {flags}: {err}") from err
        raise RunError(f"{run_dir}/config.json does not describe a usable model ({err})") from err
    restore(metasolver, state, Path(run_dir))
    metasolver.eval()
    return experiment, metasolver


def _in_force(experiment: Experiment, options: TrainOptions) -> dict[str, Any]:
    """The experiment's options as it trains with them: its parameters, and the defaults of
    objective options not given (e.g. the beams' ICF penalty weight)."""
    params = experiment.params()
    return {
        option.name: params[option.name]
        if option.stage == "problem"
        else option.default
        if getattr(options, option.name) is None
        else getattr(options, option.name)
        for option in experiment.options
    }


def base_alpha(model: Any) -> float:
    """Psi_base's shift of a loaded beam model (:func:`femeta.load`): saved with it, or
    found again on its training beams (on every rank under ``mpiexec``)."""
    if model.base_alpha is not None:
        return model.base_alpha
    experiment, _ = load_metasolver(model.run_dir, model.problem)
    seed = json.loads((model.run_dir / "config.json").read_text())["options"]["seed"]
    return experiment.base_shift(experiment.tasks("train", seed))


def baseline_metasolver(experiment: Any, kind: str, seed: int = 0) -> nn.Module:
    """A baseline meta-solver (``base``, or ``best`` where there is one); ``base`` is
    fitted on the training split of ``seed`` (``best`` searches per task, without data)."""
    train_tasks = experiment.tasks("train", seed) if kind == "base" else None
    return experiment.metasolver(kind, train_tasks)


@torch.no_grad()
def evaluate_metasolver(
    experiment: Any,
    metasolver: nn.Module,
    tol: float,
    seed: int = 0,
    max_iterations: int | None = None,
    engine: str = "torch",
) -> IterationStats:
    """L_eps on the test split: iterations of Phi_eps from Psi's parameters, per task.

    ``engine`` is one of the experiment's ``engines``: ``"petsc"`` solves in PETSc
    over the ranks of ``mpiexec`` (the counts differ from torch's only by rounding).
    """
    experiment.check_engine(engine)
    cap = experiment.evaluation_cap if max_iterations is None else max_iterations
    tasks = experiment.tasks("test", seed)
    if engine == TORCH:
        return experiment.stats(metasolver, tasks, tol, cap)
    return experiment.stats(metasolver, tasks, tol, cap, engine=engine)
