"""Lazy, order-safe imports of DOLFINx and petsc4py.

``mpi4py.MPI`` must be imported before DOLFINx or petsc4py, or the wheel build
fails to find ``libmpi``. The ``dolfinx_solver`` wheel does that (and checks its
environment) when present; conda or source installs do not have it.
"""

from __future__ import annotations

import contextlib
import importlib
from types import ModuleType

__all__ = ["MissingFenicsError", "has_dolfinx", "import_dolfinx"]

INSTALL_HINT = (
    "install it with `pip install 'femeta[fenics]'` (the dolfinx-solver-real wheel), "
    "or use a conda/source DOLFINx 0.11 in the same environment"
)


class MissingFenicsError(ImportError):
    """DOLFINx (or its MPI/PETSc stack) is not importable."""


def import_dolfinx() -> ModuleType:
    """Import and return ``dolfinx`` after ``mpi4py.MPI``."""
    try:
        importlib.import_module("mpi4py.MPI")
    except ImportError as err:
        raise MissingFenicsError(f"mpi4py is not installed ({err}); {INSTALL_HINT}") from err
    with contextlib.suppress(ImportError):
        importlib.import_module("dolfinx_solver")
    try:
        dolfinx = importlib.import_module("dolfinx")
        for sub in ("fem", "mesh", "la"):
            importlib.import_module(f"dolfinx.{sub}")
    except ImportError as err:
        raise MissingFenicsError(f"DOLFINx is not available ({err}); {INSTALL_HINT}") from err
    return dolfinx


def has_dolfinx() -> bool:
    """Whether DOLFINx can be imported."""
    try:
        import_dolfinx()
    except MissingFenicsError:
        return False
    return True
