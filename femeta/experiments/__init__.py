"""Experiments: which problem, solver, meta-solver and losses go together.

One module per pairing of a problem with a solver, each declaring its own
options (:class:`~femeta.experiments.base.Option`). :data:`EXPERIMENTS` maps a
problem name, as on the command line, to its experiment class; a new experiment
is one module and one :func:`register` line.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from femeta.experiments.base import (
    EXPERIMENTS,
    Experiment,
    Option,
    TrainDefaults,
    check_option,
    resolve_device,
)
from femeta.experiments.elasticity import IC_PATTERNS, ElasticityIccg
from femeta.experiments.family import FamilyIccg
from femeta.experiments.poisson1d import Poisson1DJacobi
from femeta.experiments.robertson import RobertsonNewtonSor

__all__ = [
    "DEFAULT_PROBLEM",
    "EXPERIMENTS",
    "IC_PATTERNS",
    "ElasticityIccg",
    "Experiment",
    "FamilyIccg",
    "Option",
    "Poisson1DJacobi",
    "RobertsonNewtonSor",
    "TrainDefaults",
    "check_option",
    "get_experiment",
    "register",
    "resolve_device",
]


def register(experiment: type[Experiment]) -> type[Experiment]:
    """Add ``experiment`` to :data:`EXPERIMENTS` under its ``name``; returns it (a decorator)."""
    if not (isinstance(experiment, type) and issubclass(experiment, Experiment)):
        raise TypeError(f"an experiment is a subclass of Experiment, got {experiment!r}")
    EXPERIMENTS[experiment.name] = experiment
    return experiment


register(Poisson1DJacobi)
register(ElasticityIccg)
register(RobertsonNewtonSor)
register(FamilyIccg)

#: The problem that :class:`~femeta.workflow.TrainOptions` trains when none is named.
DEFAULT_PROBLEM = Poisson1DJacobi.name


def get_experiment(name: str, **params: Any) -> Experiment:
    """The experiment registered under ``name``, built with ``params``."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown problem {name!r}; expected one of {sorted(EXPERIMENTS)}")
    factory = EXPERIMENTS[name]
    allowed = {f.name for f in fields(factory) if f.init}
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise ValueError(
            f"{name} takes no option {', '.join(unknown)}; its options: {sorted(allowed)}"
        )
    return factory(**params)
