"""The ICCG shift on a family of problems defined in a user's file (``--family``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar

import torch
from torch import nn

from femeta.experiments.base import Option, ScriptSystem, TrainDefaults
from femeta.experiments.elasticity import SPLITS
from femeta.experiments.shift import CLIP, GAMMA, SMOOTH, ShiftExperiment
from femeta.metasolvers import ShiftNet
from femeta.parallel import collective, world
from femeta.problems.base import TaskSet
from femeta.problems.family import (
    MATRIX_FEATURES,
    Distributions,
    FamilyError,
    UserFamily,
    family_system,
    load_family,
    read_distributions,
)

__all__ = ["FAMILY_INPUTS", "FamilyIccg"]

#: What Psi_nn of a family may see (``FamilyIccg.family_inputs``), described.
FAMILY_INPUTS = {
    "all": "the parameters and the statistics of A",
    "parameters": "the parameters (log for log-uniform ones), standardised",
    "matrix": "log min and max of diag(A) off the Dirichlet rows, log ||A||_inf and ||A||_F, "
    "and the family file's STATISTICS",
}

FAMILY = Option(
    "family",
    str,
    "the family of problems: FILE.py:FUNCTION or MODULE:FUNCTION, a file that declares "
    "PARAMETERS (name -> (kind, low, high); or see --distributions), optionally STATISTICS "
    "of A, and whose function returns the DOLFINx forms "
    "(e.g. examples/heterogeneous_poisson.py:make).",
    shown="none: required",
    evaluate="the family file of the test tasks, FILE.py:FUNCTION.",
)
DISTRIBUTIONS = Option(
    "distributions",
    str,
    "a TOML file whose [parameters] table (name = [kind, low, high]) and optional [splits] "
    "table (train, validation, test) replace the family file's PARAMETERS and SPLITS; the "
    "run saves what it read, so the model needs the file no more.",
    shown="none: the family file's",
    tables=True,
    evaluate="a TOML file of distributions for the test tasks, in place of the model's "
    "(or the family file's).",
)
INPUTS = Option(
    "family_inputs",
    str,
    "what the network sees: 'all', the parameters (log for log-uniform ones) and "
    "statistics of the assembled A (log range of its diagonal, log norms, the family file's "
    "STATISTICS); 'parameters'; 'matrix'.",
    default="all",
    choices=tuple(FAMILY_INPUTS),
)


@dataclass
class FamilyIccg(ShiftExperiment):
    """The diagonal shift of ICCG on the tasks of a family file.

    The losses, baselines and solves are :class:`ShiftExperiment`'s, on the
    entries DOLFINx's matrix stores. Psi_nn is the beams' MLP on inputs that
    are standardised on the training tasks (``family_inputs``).
    """

    name: ClassVar[str] = "family"
    label: ClassVar[str] = "the family shift"
    scriptable: ClassVar[bool] = True
    default_tol: ClassVar[float] = 1e-6
    #: The exact derivative, as the paper trains the beams.
    paper_options: ClassVar[Mapping[str, Any]] = MappingProxyType(
        {"smooth": 0.0, "engine": "torch"}
    )
    options: ClassVar[tuple[Option, ...]] = (
        FAMILY, DISTRIBUTIONS, INPUTS, SPLITS, CLIP, SMOOTH, GAMMA,
    )  # fmt: skip
    #: Adam, lr 1e-3 cut by 5 at 1/2 and 3/4 of the epochs, as for the beams, with smaller
    #: batches for the smaller training sets.
    train_defaults: ClassVar[TrainDefaults] = TrainDefaults(epochs=50, batch_size=32, lr=1e-3, m=50)

    family: str | None = None
    #: A TOML file of the parameters' distributions (and splits), or its tables as a run
    #: saves them (``None``: the family file's).
    distributions: str | Mapping[str, Any] | None = None
    family_inputs: str = INPUTS.default
    #: Tasks in the training, validation and test splits (``None``: the file's ``SPLITS``).
    splits: tuple[int, int, int] | None = None
    device: torch.device = field(default=torch.device("cpu"), repr=False)
    problem: UserFamily = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.device = torch.device(self.device)
        self.check_params()
        if self.family is None:
            raise ValueError(
                "the family problem needs --family FILE.py:FUNCTION, a file that declares "
                "PARAMETERS and returns the forms (e.g. examples/heterogeneous_poisson.py:make)"
            )
        given = None
        if isinstance(self.distributions, str):
            path = self.distributions
            given = collective(world(), lambda: read_distributions(path))
        elif self.distributions is not None:
            given = Distributions.parse(self.distributions, "the distributions given")
        source = load_family(self.family, given)
        self.family = source.spec
        self.distributions = None if given is None else given.tables()
        splits = None
        if self.splits is not None:
            self.splits = tuple(self.splits)
            splits = dict(zip(source.splits, self.splits, strict=True))
        self.problem = UserFamily(source, splits=splits)

    @property
    def features(self) -> str:
        """What Psi_nn sees."""
        return f"{', '.join(self.input_names)}: {FAMILY_INPUTS[self.family_inputs]}"

    @property
    def input_names(self) -> list[str]:
        """The columns of the problem's features that Psi_nn reads."""
        if self.family_inputs == "parameters":
            return list(self.problem.param_names)
        if self.family_inputs == "matrix":
            return [*MATRIX_FEATURES, *self.problem.source.statistics]
        return list(self.problem.feature_names)

    @classmethod
    def script_system(cls, comm: Any, model: Any, given: Mapping[str, Any]) -> ScriptSystem:
        """The task ``given["param"]`` (``NAME=VALUE`` items) of ``given["family"]``, or of
        the model's family file."""
        spec = given.get("family") or model.family
        if spec is None:
            raise FamilyError(f"{model.run_dir} names no family file; pass --family FILE.py:make")
        trained = {name: list(d) for name, d in model.distributions.items()}
        where = f"the model in {model.run_dir}"
        source = load_family(spec, Distributions.parse({"parameters": trained}, where))
        values = {}
        for item in given.get("param") or ():
            name, _, value = item.partition("=")
            try:
                values[name.strip()] = float(value)
            except ValueError:
                raise FamilyError(f"--param takes NAME=VALUE with a number, got {item!r}") from None
        A, b, built = family_system(source, comm, values)
        return ScriptSystem(A, b, values, f"{source.label} task", None, built)

    @classmethod
    def recommended_options(cls, given: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
        """The beams' smoothed derivative (the exact one with a ``clip``), in torch."""
        smooth = given.get("smooth")
        if smooth is None:
            smooth = 0.0 if given.get("clip") is not None else cls.recommended_smooth
        return {"smooth": smooth, "engine": "torch"}

    def params(self) -> dict[str, Any]:
        splits = None if self.splits is None else list(self.splits)
        return {"family": self.family, "distributions": self.distributions,
                "family_inputs": self.family_inputs, "splits": splits}  # fmt: skip

    def tasks(self, split: str, seed: int) -> TaskSet:
        tasks = self.problem.split(split, seed)
        columns = [self.problem.feature_names.index(name) for name in self.input_names]
        fields = tasks.fields | {"features": tasks["features"][:, columns]}
        return TaskSet(fields).to(self.device)

    def shift_network(self, train_tasks: TaskSet | None) -> nn.Module:
        """The beams' MLP on the inputs as they come (already on a log scale where it fits)."""
        network = ShiftNet(len(self.input_names), (128, 128), log_inputs=False)
        if train_tasks is not None:
            network.fit_inputs(train_tasks["features"])
        return network.to(self.device)

    def model_spec(self, train_tasks: TaskSet) -> dict[str, Any]:
        """The network's inputs (the file's statistics among them), the family's distributions
        and Psi_base's shift."""
        source = self.problem.source
        return {
            "network": "ShiftNet",
            "log_inputs": False,
            "features": self.input_names,
            "family_statistics": [n for n in self.input_names if n in source.statistics],
            "distributions": {name: [d.kind, d.low, d.high]
                              for name, d in source.parameters.items()},
            "family_sha256": source.digest,
            "base_alpha": self.base_shift(train_tasks),
        }  # fmt: skip
