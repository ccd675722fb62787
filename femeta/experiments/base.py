"""What every experiment has: the :class:`Experiment` base, its options and their checks.

An experiment declares its options once, as :class:`Option` records; the command
line, the TOML file of ``femeta train --config``, :class:`~femeta.workflow.TrainOptions`
and the experiment itself all take them from there, and :func:`check_option` is the
one check of a value. :data:`EXPERIMENTS` is the registry, filled by
:mod:`femeta.experiments`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from femeta.evaluation import IterationStats
from femeta.losses import error_after_m, iteration_surrogate
from femeta.problems.base import TaskSet
from femeta.solvers.base import SolverResult
from femeta.training import Objective, TrainConfig

__all__ = [
    "EXPERIMENTS",
    "TORCH_ONLY",
    "Experiment",
    "Option",
    "ScriptSystem",
    "TrainDefaults",
    "check_option",
    "declared_option",
    "owners",
    "paper_steps",
    "resolve_device",
]

#: The registry: problem name (as on the command line) -> experiment class.
EXPERIMENTS: dict[str, type[Experiment]] = {}

#: The engine every experiment has: torch, in this process.
TORCH = "torch"


@dataclass(frozen=True)
class Option:
    """One option of an experiment, declared once by it.

    ``stage`` says who takes it: ``"problem"`` options are parameters of the
    experiment (they define its tasks or network), ``"objective"`` ones are
    arguments of its :meth:`Experiment.objective`. ``default`` is the value in
    force when the option is not given (``None``: off, or chosen by
    :meth:`Experiment.recommended_options`); ``shown`` is how help states it where
    that is not ``default``. ``choices`` (strings), ``minimum`` (integers) and
    ``positive``/``zero``/``finite`` (numbers) are what :func:`check_option`
    allows; ``requirement`` is how its error states the allowed numbers. With
    ``count``, the value is that many integers (``type`` must be ``int``), e.g. a
    mesh's cells along three axes, each checked as above. With ``tables``, a string
    option names a TOML file, and its value may also be the tables read from it (a
    mapping: what a run saves in its place), which the experiment checks.
    ``evaluate`` is the help of ``femeta evaluate --NAME``, for a problem option
    that changes the test tasks of a saved model (``None``: no such flag).
    """

    name: str
    type: type[int] | type[float] | type[str]
    help: str
    default: Any = None
    shown: str | None = None
    stage: Literal["problem", "objective"] = "problem"
    choices: tuple[str, ...] = ()
    minimum: int | None = None
    positive: bool = False
    zero: bool = False
    finite: bool = False
    requirement: str = "positive"
    evaluate: str | None = None
    count: int | None = None
    tables: bool = False

    @property
    def flag(self) -> str:
        """The command-line flag, ``--name-with-dashes``."""
        return "--" + self.name.replace("_", "-")

    @property
    def default_text(self) -> str:
        """The default as help states it."""
        if self.shown is not None:
            return self.shown
        if isinstance(self.default, tuple):
            return " ".join(map(str, self.default))
        return "none" if self.default is None else f"{self.default:g}" if isinstance(
            self.default, float
        ) else str(self.default)  # fmt: skip


def check_option(option: Option, value: Any) -> Any:
    """``value`` if ``option`` allows it (``None``, not given, always); else a ValueError."""
    name = option.name
    if value is None:
        return None
    if option.count is not None:
        if not isinstance(value, tuple | list) or len(value) != option.count:
            raise ValueError(f"{name} must be {option.count} integers, got {value!r}")
        single = replace(option, count=None)
        for item in value:
            try:
                check_option(single, item)
            except ValueError:
                at_least = "" if option.minimum is None else f" >= {option.minimum}"
                raise ValueError(
                    f"{name} must be {option.count} integers{at_least}, got {value!r}"
                ) from None
        return tuple(value)
    if option.type is str:
        if option.tables and isinstance(value, Mapping):
            return value
        if not isinstance(value, str):
            raise ValueError(f"{name} must be a string, got {value!r}")
        if option.choices and value not in option.choices:
            raise ValueError(f"unknown {name} {value!r}; expected one of {list(option.choices)}")
        return value
    if option.type is int:
        at_least = "" if option.minimum is None else f" >= {option.minimum}"
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or (option.minimum is not None and value < option.minimum)
        ):
            raise ValueError(f"{name} must be an integer{at_least}, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {value!r}")
    allowed = not option.positive or value > 0 or (option.zero and value == 0)
    if not allowed or (option.finite and not math.isfinite(value)):
        raise ValueError(f"{name} must be {option.requirement}, got {value!r}")
    return value


def declared_option(name: str) -> Option:
    """The declaration of option ``name`` by a registered experiment."""
    for experiment in EXPERIMENTS.values():
        for option in experiment.options:
            if option.name == name:
                return option
    names = sorted({option.name for e in EXPERIMENTS.values() for option in e.options})
    raise ValueError(f"unknown option {name!r}; the problems' options: {names}")


def owners(name: str) -> list[type[Experiment]]:
    """The registered experiments that declare option ``name``."""
    return [e for e in EXPERIMENTS.values() if any(o.name == name for o in e.options)]


@dataclass(frozen=True)
class ScriptSystem:
    """One task as a DOLFINx script assembles it, for ``femeta solve``.

    Attributes:
        A: The matrix (PETSc AIJ), distributed over the ranks.
        b: The right-hand side.
        params: The task's parameters, by the names the model takes.
        label: What it is, for a person (e.g. ``"beam 8 x 2 x 2 cells"``).
        near_nullspace: For GAMG (e.g. the rigid-body modes), or ``None``: its default.
        keep: What ``A`` and ``b`` need kept alive (their mesh and its communicator).
    """

    A: Any
    b: Any
    params: dict[str, float]
    label: str
    near_nullspace: Any = None
    keep: Any = None


@dataclass(frozen=True)
class TrainDefaults:
    """The training settings of an experiment when none are given (the paper's).

    ``m`` is the iteration count of L_m; ``schedule`` is ``"plateau"`` (Adam
    with betas 0.999, lr cut by 5 on a plateau: :class:`TrainConfig`'s
    defaults), ``"steps"`` (:func:`paper_steps`) or ``"cosine"`` (Adam with
    ``betas``, the lr decayed to 0 along a cosine; ``ema`` and
    ``validate_every`` as in :class:`TrainConfig`). ``gain`` is the surrogate's
    sigmoid gain a (:func:`~femeta.losses.iteration_surrogate`).
    """

    epochs: int
    batch_size: int
    lr: float
    m: int
    schedule: Literal["plateau", "steps", "cosine"] = "steps"
    betas: tuple[float, float] = (0.9, 0.999)
    ema: float | None = None
    validate_every: int = 1
    gain: float = 1.0


#: The paper's settings of the generic engine options, for an experiment with torch only.
TORCH_ONLY: Mapping[str, Any] = MappingProxyType({"engine": TORCH})


class Experiment:
    """Which problem, solver, meta-solver and losses go together.

    An experiment turns a task set into solver calls and builds the objective the
    trainer minimises. A subclass is a dataclass whose fields are its
    parameters (its ``"problem"`` options among them, with ``device``) and sets
    the class attributes below; it implements :meth:`tasks`, :meth:`metasolver`,
    :meth:`model_spec` and :meth:`solve`, and may replace the rest.
    """

    #: The problem name, as on the command line and in saved runs.
    name: ClassVar[str]
    #: The iterative solver Phi, as saved with a run.
    solver_name: ClassVar[str]
    #: What an error message calls what this experiment learns.
    label: ClassVar[str]
    #: What Psi predicts and what Psi_nn sees (saved with a run).
    predicts: ClassVar[str]
    features: ClassVar[str]
    #: The test tolerance eps when none is given.
    default_tol: ClassVar[float] = 1e-6
    #: The cap of evaluation solves; an unconverged task counts as the cap.
    evaluation_cap: ClassVar[int]
    #: The cap of the surrogate's Phi_{eps,m} in training when no ``m`` is given.
    surrogate_cap: ClassVar[int]
    #: What ``femeta evaluate --baseline`` takes.
    baselines: ClassVar[tuple[str, ...]] = ("base",)
    #: What the training and evaluation solves can run on (``--engine``).
    engines: ClassVar[tuple[str, ...]] = (TORCH,)
    #: The paper's settings of the options that :meth:`recommended_options` picks.
    paper_options: ClassVar[Mapping[str, Any]] = TORCH_ONLY
    #: The options this experiment takes besides the generic ones of ``femeta train``.
    options: ClassVar[tuple[Option, ...]] = ()
    #: The values that a run saved without an option's key used.
    saved_defaults: ClassVar[Mapping[str, Any]] = MappingProxyType({})
    #: The paper's training settings (``--paper``, and everything not in a recommended set-up).
    train_defaults: ClassVar[TrainDefaults]
    #: The best known training settings where they differ from the paper's (``None``: the
    #: paper's are the best known); :meth:`training_metasolver` builds the network to match.
    recommended_train: ClassVar[TrainDefaults | None] = None
    #: Whether L_m squares the error measure (the Poisson tasks do, §3.1.2).
    squared_error: ClassVar[bool] = True
    #: Whether ``femeta solve`` assembles one task with DOLFINx (:meth:`script_system`).
    scriptable: ClassVar[bool] = False

    device: torch.device

    # -- declarations --------------------------------------------------------------------------

    @classmethod
    def option(cls, name: str) -> Option | None:
        """This experiment's declaration of option ``name`` (``None``: it has none)."""
        return next((option for option in cls.options if option.name == name), None)

    @classmethod
    def shown_cap(cls) -> str:
        """The surrogate's default cap as help states it."""
        return str(cls.surrogate_cap)

    @classmethod
    def check_options(cls, values: Mapping[str, Any], engine: str | None = None) -> None:
        """Check option values for this experiment: each value, then that it applies here.

        ``engine`` (``None``: not chosen yet) is checked with :meth:`check_engine`. A
        subclass adds the checks of options together.
        """
        for name, value in values.items():
            check_option(cls.option(name) or declared_option(name), value)
        for name, value in values.items():
            if value is not None and cls.option(name) is None:
                flag = "--" + name.replace("_", "-")
                where = " and ".join(owner.label for owner in owners(name))
                raise ValueError(
                    f"{cls.name} takes no option {name}: {flag} applies to {where} only"
                )
        if engine is not None:
            cls.check_engine(engine)

    @classmethod
    def check_engine(cls, engine: str | None) -> None:
        """``engine`` must be one of :attr:`engines` (``None``: not chosen yet)."""
        if engine is not None and engine not in cls.engines:
            allowed = list(cls.engines)
            elsewhere = [e.label for e in EXPERIMENTS.values() if engine in e.engines]
            if elsewhere:
                raise ValueError(
                    f"--engine for {cls.name} must be one of {allowed}, got {engine!r}: "
                    f"--engine {engine} applies to {' and '.join(elsewhere)} only"
                )
            raise ValueError(
                f"unknown engine {engine!r}; engine must be one of {allowed} for {cls.name}"
            )

    @classmethod
    def recommended_options(cls, given: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
        """The best known settings of what :attr:`paper_options` sets, where not ``given``.

        By default the paper's: no better ones are known.
        """
        return dict(cls.paper_options)

    @classmethod
    def script_system(cls, comm: Any, model: Any, given: Mapping[str, Any]) -> ScriptSystem:
        """One task assembled with DOLFINx on ``comm`` for ``femeta solve`` (when
        :attr:`scriptable`), from the loaded ``model`` and the command's options ``given``."""
        raise NotImplementedError(f"femeta solve does not assemble {cls.name} tasks")

    def check_params(self) -> None:
        """Check this experiment's ``"problem"`` options (called by ``__post_init__``)."""
        for option in self.options:
            if option.stage == "problem":
                check_option(option, getattr(self, option.name))

    # -- what training and evaluation call ------------------------------------------------------

    def params(self) -> dict[str, Any]:
        """What identifies the task space (saved with a model): the problem options."""
        return {o.name: getattr(self, o.name) for o in self.options if o.stage == "problem"}

    def tasks(self, split: str, seed: int) -> TaskSet:
        """The tasks of ``split`` (``train``, ``validation`` or ``test``) on this device."""
        raise NotImplementedError

    def default_m(self, loss: str) -> int:
        """``m`` when none is given: the paper's for L_m, else :attr:`surrogate_cap`."""
        return self.train_defaults.m if loss == "m" else self.surrogate_cap

    def train_config(self, epochs: int | None, batch_size: int | None, lr: float | None,
                     seed: int, paper: bool = True) -> TrainConfig:  # fmt: skip
        """The optimiser and schedule where a value is ``None``: the paper's
        (:attr:`train_defaults`), or without ``paper`` the :attr:`recommended_train`."""
        defaults = self.train_set_up(paper)
        epochs = defaults.epochs if epochs is None else epochs
        batch_size = defaults.batch_size if batch_size is None else batch_size
        lr = defaults.lr if lr is None else lr
        if defaults.schedule == "steps":
            return paper_steps(epochs, batch_size, lr, seed)
        if defaults.schedule == "cosine":
            return TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, betas=defaults.betas,
                               schedule="cosine", seed=seed, ema=defaults.ema,
                               validate_every=defaults.validate_every)  # fmt: skip
        return TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed)

    @classmethod
    def train_set_up(cls, paper: bool) -> TrainDefaults:
        """The paper's :attr:`train_defaults`, or the :attr:`recommended_train` where known."""
        if paper or cls.recommended_train is None:
            return cls.train_defaults
        return cls.recommended_train

    def training_metasolver(self, train_tasks: TaskSet, paper: bool) -> nn.Module:
        """Psi_nn as it is trained: the paper's network, or the recommended set-up's.

        A recommended set-up may wrap parts of the network in
        :class:`~femeta.metasolvers.ScaledMLP`; the trainer folds them
        (:func:`~femeta.metasolvers.fold_scaling`) into the plain network of
        :meth:`metasolver` before it is saved. By default, that plain network.
        """
        return self.metasolver("nn", train_tasks)

    def metasolver(self, kind: str, train_tasks: TaskSet | None = None) -> nn.Module:
        """``nn`` (Psi_nn) or one of :attr:`baselines`, on this device."""
        raise NotImplementedError

    def model_spec(self, train_tasks: TaskSet) -> dict[str, Any]:
        """How :mod:`femeta.model` applies the trained network (saved with it)."""
        raise NotImplementedError

    def solve(
        self, metasolver: nn.Module, tasks: TaskSet, tol: float | None, max_iterations: int
    ) -> SolverResult:
        """Phi(tau; Psi(tau)) on every task."""
        raise NotImplementedError

    @torch.no_grad()
    def stats(
        self, metasolver: nn.Module, tasks: TaskSet, tol: float, max_iterations: int
    ) -> IterationStats:
        """L_eps per task: iterations of Phi_{tol, max_iterations} (unconverged: the cap)."""
        result = self.solve(metasolver, tasks, tol, max_iterations)
        return IterationStats.from_result(result, tol, max_iterations)

    def objective(
        self, loss: str, m: int, tol: float | None, gain: float = 1.0, engine: str = TORCH,
        **options: Any,
    ) -> Objective:  # fmt: skip
        """L_m after exactly ``m`` iterations, or the surrogate with Phi_{tol,m}.

        ``options`` are the experiment's ``"objective"`` options; this one has none.
        """
        self.check_options(options, engine)
        squared = self.squared_error
        if loss == "m":
            return lambda psi, tasks: error_after_m(self.solve(psi, tasks, None, m), squared)
        if loss == "surrogate":
            if tol is None:
                raise ValueError("the surrogate loss needs a training tolerance (--tol)")
            return lambda psi, tasks: iteration_surrogate(self.solve(psi, tasks, tol, m), tol, gain)
        raise ValueError(f"unknown loss {loss!r}; expected 'm' or 'surrogate'")


def paper_steps(epochs: int | None, batch_size: int, lr: float, seed: int) -> TrainConfig:
    """Adam (betas 0.9, 0.999), ``epochs`` (default 200), lr cut by 5 at 1/2 and 3/4 of them."""
    epochs = 200 if epochs is None else epochs
    return TrainConfig(
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        betas=(0.9, 0.999),
        schedule="steps",
        milestones=tuple(sorted({epochs // 2, 3 * epochs // 4} - {0})),
        seed=seed,
    )


def resolve_device(name: str | torch.device) -> torch.device:
    """``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``, checked."""
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"unknown device {name!r}; use auto, cpu or cuda") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but torch sees no CUDA GPU; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {name!r} is not supported; use auto, cpu or cuda")
    return device
