"""A family file's code, imported without torch: its module, its function and its STATISTICS.

Training (:mod:`femeta.problems.family`, which adds the distributions and
assembles the tasks) and a script that applies a family model
(:mod:`femeta.fenics`, which computes the file's statistics of the script's own
matrix) both import a family file with :func:`import_family` and evaluate its
statistics with :func:`statistic_values`, so the two compute the same numbers.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import keyword
import math
import numbers
import sys
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from femeta._fenics import import_dolfinx
from femeta.model import STATISTICS as BUILT_IN_STATISTICS
from femeta.parallel import collective

__all__ = ["FamilyCode", "FamilyError", "Statistic", "failure", "import_family", "statistic_values"]

#: A statistic of an assembled matrix, ``function(A: petsc4py.PETSc.Mat) -> float``,
#: collective on ``A``'s communicator.
Statistic = Callable[[Any], float]


class FamilyError(ValueError):
    """A family file is missing, malformed, or its forms fail; the message names the file."""


@dataclass(frozen=True)
class FamilyCode:
    """An imported family file.

    Attributes:
        spec: ``FILE.py:FUNCTION`` with an absolute path, or ``MODULE:FUNCTION``.
        label: ``FILE.py:FUNCTION`` as errors name it.
        path: The file.
        module: The imported module.
        make: The function that builds the forms.
        statistics: The file's ``STATISTICS`` in its order (empty when it declares none).
    """

    spec: str
    label: str
    path: Path
    module: ModuleType
    make: Callable[[Any], Any]
    statistics: dict[str, Statistic]


def import_family(spec: str) -> FamilyCode:
    """Import the family ``FILE.py:FUNCTION`` or ``MODULE:FUNCTION`` and check its STATISTICS."""
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise FamilyError(
            f"family must be FILE.py:FUNCTION or MODULE:FUNCTION (e.g. family.py:make), "
            f"got {spec!r}"
        )
    where, function = spec.split(":")
    import_dolfinx()  # a family file imports DOLFINx: MPI first
    if where.endswith(".py") or "/" in where:
        path = Path(where).expanduser().resolve()
        if not path.is_file():
            raise FamilyError(f"family file {where} does not exist")
        module = _import_file(path)
        spec = f"{path}:{function}"
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as err:
            raise FamilyError(f"cannot import the family module {where!r}: {err}") from err
        if getattr(module, "__file__", None) is None:
            raise FamilyError(f"the family module {where!r} has no source file")
        path = Path(module.__file__).resolve()
    make = getattr(module, function, None)
    if not callable(make):
        functions = sorted(name for name, value in vars(module).items()
                           if callable(value) and getattr(value, "__module__", None)
                           == module.__name__)  # fmt: skip
        raise FamilyError(f"{path} defines no function {function!r}; its functions: {functions}")
    statistics = _statistics(getattr(module, "STATISTICS", {}), path)
    return FamilyCode(spec, f"{path.name}:{function}", path, module, make, statistics)


def statistic_values(A: Any, statistics: Mapping[str, Statistic], path: Path) -> dict[str, float]:
    """Each of ``statistics`` (functions of the family file ``path``) of the matrix ``A``.

    Collective on ``A``'s communicator, as every statistic is. A statistic that
    raises, returns anything but a finite real number, or gives the processes
    different values is a :class:`FamilyError` on every process, naming the file
    and the statistic.
    """
    comm = A.comm.tompi4py()
    values = {}
    for name, function in statistics.items():
        value = collective(comm, functools.partial(_value, name, function, A, path))
        everywhere = comm.allgather(value)
        # A sum reduced in another order on another process may differ in its last bits.
        if max(everywhere) - min(everywhere) > 1e-9 * max(abs(v) for v in everywhere):
            raise FamilyError(
                f"{path}: statistic {name!r} differs between the processes ({everywhere}); it "
                "must be collective on A's communicator, e.g. reduce with A.comm.tompi4py()"
            )
        values[name] = everywhere[0]
    return values


def failure(err: BaseException, path: Path, doing: str, otherwise: str) -> FamilyError:
    """A :class:`FamilyError` for ``err``, raised while ``doing``: ``FILE, line N: doing
    failed: Type: message``, with ``otherwise`` where no line of ``path`` raised it."""
    lines = [f.lineno for f in traceback.extract_tb(err.__traceback__) if Path(f.filename) == path]
    where = f"{path}, line {lines[-1]}" if lines else otherwise
    first = (str(err).strip().splitlines() or [""])[0]
    return FamilyError(f"{where}: {doing} failed: {type(err).__name__}: {first}")


def _import_file(path: Path) -> ModuleType:
    name = "femeta_family_" + hashlib.sha256(str(path).encode()).hexdigest()[:16]
    loader = importlib.util.spec_from_file_location(name, path)
    if loader is None or loader.loader is None:
        raise FamilyError(f"cannot load {path} as Python")
    module = importlib.util.module_from_spec(loader)
    sys.modules[name] = module  # dataclasses and pickling look a module up there
    try:
        loader.loader.exec_module(module)
    except Exception as err:
        del sys.modules[name]
        raise failure(err, path, "importing it", str(path)) from err
    return module


def _statistics(declared: Any, path: Path) -> dict[str, Statistic]:
    """The ``STATISTICS`` a family file declares, checked."""
    if not isinstance(declared, Mapping):
        raise FamilyError(
            f"{path}: STATISTICS must be a dict name -> function(A) -> float, got "
            f"{type(declared).__name__}"
        )
    for name, function in declared.items():
        if not (isinstance(name, str) and name.isidentifier() and not keyword.iskeyword(name)):
            raise FamilyError(f"{path}: statistic names must be identifiers, got {name!r}")
        if name in BUILT_IN_STATISTICS or name in BUILT_IN_STATISTICS.values():
            raise FamilyError(
                f"{path}: statistic {name!r} has the name of one femeta computes itself; rename it"
            )
        if not callable(function):
            raise FamilyError(
                f"{path}: statistic {name!r} is {function!r}, not a function(A) -> float"
            )
    return dict(declared)


def _value(name: str, function: Statistic, A: Any, path: Path) -> float:
    try:
        value = function(A)
    except Exception as err:
        raise failure(err, path, f"statistic {name!r}", str(path)) from err
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise FamilyError(
            f"{path}: statistic {name!r} returned {value!r}; it must return a finite float"
        )
    return float(value)
