"""A family file's code, imported without torch: its module and its function.

Training (:mod:`femeta.problems.family`, which adds the distributions and
assembles the tasks) imports a family file with :func:`import_family`, which a
script applying a family model can call too without importing torch.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from femeta._fenics import import_dolfinx

__all__ = ["FamilyCode", "FamilyError", "failure", "import_family"]


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
    """

    spec: str
    label: str
    path: Path
    module: ModuleType
    make: Callable[[Any], Any]


def import_family(spec: str) -> FamilyCode:
    """Import the family ``FILE.py:FUNCTION`` or ``MODULE:FUNCTION``; find its function."""
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
    return FamilyCode(spec, f"{path.name}:{function}", path, module, make)


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
