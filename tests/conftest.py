"""Shared test helpers."""

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from femeta._fenics import has_dolfinx
from femeta.cli import app

#: The Psi_base shift the tiny beam run saves as its model's ``base_alpha``.
BEAM_BASE_ALPHA = 0.1


@pytest.fixture(scope="session")
def invoke():
    """Run the femeta CLI in-process; arguments may be paths or numbers."""
    runner = CliRunner()
    return lambda *args: runner.invoke(app, [str(a) for a in args])


def _train_on_rank_0(train: Callable[[], Path]) -> Path:
    """``train()``, run once: under mpiexec by rank 0 alone, the others waiting for its path.

    The others wait asleep rather than in a spinning MPI call, so that the one
    training keeps both cores.
    """
    if "PMI_RANK" not in os.environ:
        return train()
    from mpi4py import MPI

    from femeta._fenics import import_dolfinx

    import_dolfinx()  # PETSc starts up collectively: on every rank before rank 0 uses it
    from petsc4py import PETSc  # noqa: F401

    comm = MPI.COMM_WORLD
    outcome = None
    if comm.rank == 0:
        try:
            with pytest.MonkeyPatch.context() as patch:
                # Rank 0 trains alone: femeta must not take it for one rank of several.
                for name in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK"):
                    patch.delenv(name, raising=False)
                outcome = (str(train()), None)
        except Exception as err:
            outcome = (None, f"{type(err).__name__}: {err}")
    request = comm.Ibarrier()
    while not request.Test():
        time.sleep(0.05)
    path, error = comm.bcast(outcome, root=0)
    if error is not None:
        raise RuntimeError(f"training the test model on rank 0 failed: {error}")
    return Path(path)


@pytest.fixture(scope="session")
def beam_run(tmp_path_factory) -> Path:
    """A 1-epoch elasticity run (invariant inputs, smoothed surrogate solved in PETSc)."""
    if not has_dolfinx():
        pytest.skip("needs DOLFINx to train on beams")
    from femeta.experiments import ElasticityIccg
    from femeta.workflow import TrainOptions, train_metasolver

    def train() -> Path:
        out = tmp_path_factory.mktemp("runs") / "beam"
        options = TrainOptions(problem="elasticity", loss="surrogate", epochs=1, smooth=0.25,
                               engine="petsc")  # fmt: skip
        with pytest.MonkeyPatch.context() as patch:
            # Psi_base's shift, saved with the model, takes a dozen dense IC(0)
            # factorizations of the 1000 training beams: minutes, several times the
            # epoch itself. No test here depends on its value.
            patch.setattr(ElasticityIccg, "base_shift", lambda self, tasks: BEAM_BASE_ALPHA)
            train_metasolver(options, out)
        return out

    return _train_on_rank_0(train)


@pytest.fixture(scope="session")
def poisson_run(tmp_path_factory) -> Path:
    """A 1-epoch L_2 run of the Poisson initial guess (p = 0.01)."""
    from femeta.workflow import TrainOptions, train_metasolver

    def train() -> Path:
        out = tmp_path_factory.mktemp("runs") / "poisson"
        train_metasolver(TrainOptions(loss="m", m=2, epochs=1, p=0.01), out)
        return out

    return _train_on_rank_0(train)


@pytest.fixture(scope="session")
def robertson_run(tmp_path_factory) -> Path:
    """A 1-epoch L_1 run of Psi_both (initial guess and relaxation) on 8 parameter sets.

    PyTorch's initialisation of the guess outputs (``guess_init="default"``) makes the
    guess differ from ``y_n`` already after one epoch.
    """
    from femeta.workflow import TrainOptions, train_metasolver

    def train() -> Path:
        out = tmp_path_factory.mktemp("runs") / "robertson"
        options = TrainOptions(problem="robertson", head="both", guess_init="default", loss="m",
                               m=1, epochs=1, sets=8, batch_size=64)  # fmt: skip
        train_metasolver(options, out)
        return out

    return _train_on_rank_0(train)


#: A small family file whose network reads a statistic of A of its own, log trace(A).
FAMILY_WITH_A_STATISTIC = """
import math

import numpy as np
import ufl
from dolfinx import default_scalar_type, fem, mesh

PARAMETERS = {"kappa": ("loguniform", 1.0, 1e3)}
SPLITS = {"train": 16, "validation": 4, "test": 4}
STATISTICS = {"log_trace": lambda A: math.log(A.getDiagonal().sum())}


def make(comm):
    msh = mesh.create_unit_square(comm, 6, 6)
    space = fem.functionspace(msh, ("Lagrange", 1))
    kappa = fem.Constant(msh, default_scalar_type(1.0))
    x = ufl.SpatialCoordinate(msh)
    u, v = ufl.TrialFunction(space), ufl.TestFunction(space)
    k = ufl.conditional(ufl.lt(x[0], 0.5), kappa, 1.0)
    dofs = fem.locate_dofs_geometrical(space, lambda p: np.isclose(p[0], 0.0))
    bc = fem.dirichletbc(default_scalar_type(0.0), dofs, space)
    a = k * ufl.inner(ufl.grad(u), ufl.grad(v)) * ufl.dx
    return {"a": a, "L": v * ufl.dx, "bcs": [bc], "parameters": {"kappa": kappa}}
"""


@pytest.fixture(scope="session")
def family_run(tmp_path_factory) -> Path:
    """A 1-epoch run of :data:`FAMILY_WITH_A_STATISTIC` (its tasks cached beside it)."""
    if not has_dolfinx():
        pytest.skip("needs DOLFINx to assemble a family")
    from femeta.workflow import TrainOptions, train_metasolver

    def train() -> Path:
        directory = tmp_path_factory.mktemp("family")
        path = directory / "family.py"
        path.write_text(FAMILY_WITH_A_STATISTIC)
        options = TrainOptions(problem="family", family=f"{path}:make", epochs=1, batch_size=8)
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("XDG_CACHE_HOME", str(directory / "cache"))
            train_metasolver(options, directory / "run")
        return directory / "run"

    return _train_on_rank_0(train)


@dataclass
class ScriptBeam:
    """A clamped beam as a DOLFINx script sets it up. ``A`` and ``b`` live on the mesh's
    communicator: keep this object while using them."""

    space: Any
    a: Any  # the UFL forms, as a script passes them to LinearProblem
    L: Any
    bcs: list
    A: Any
    b: Any


def _assemble_beam(comm, W, lam, mu, rho, cells=(8, 2, 2)) -> ScriptBeam:
    """The beam of femeta's family (clamped at x = 0, gravity rho g, g = 0.4 W^2, in -z)
    written the usual script way, distributed over ``comm``."""
    import numpy as np
    import ufl
    from dolfinx import default_scalar_type, fem, mesh
    from dolfinx.fem import petsc
    from petsc4py import PETSc

    domain = mesh.create_box(comm, [np.zeros(3), np.array([1.0, W, W])], list(cells),
                             cell_type=mesh.CellType.hexahedron)  # fmt: skip
    space = fem.functionspace(domain, ("Lagrange", 1, (3,)))
    lam_, mu_, rho_ = (fem.Constant(domain, default_scalar_type(v)) for v in (lam, mu, rho))
    g = 0.4 * W**2

    def epsilon(w):
        return ufl.sym(ufl.grad(w))

    def sigma(w):
        return lam_ * ufl.tr(epsilon(w)) * ufl.Identity(3) + 2 * mu_ * epsilon(w)

    u, v = ufl.TrialFunction(space), ufl.TestFunction(space)
    a = ufl.inner(sigma(u), epsilon(v)) * ufl.dx
    L = ufl.dot(ufl.as_vector((0, 0, -rho_ * g)), v) * ufl.dx
    clamped = fem.locate_dofs_geometrical(space, lambda x: np.isclose(x[0], 0.0))
    bcs = [fem.dirichletbc(np.zeros(3, dtype=default_scalar_type), clamped, space)]
    bilinear, linear = fem.form(a), fem.form(L)
    A = petsc.assemble_matrix(bilinear, bcs=bcs)
    A.assemble()
    b = petsc.assemble_vector(linear)
    petsc.apply_lifting(b, [bilinear], bcs=[bcs])
    b.ghostUpdate(addv=PETSc.InsertMode.ADD, mode=PETSc.ScatterMode.REVERSE)
    petsc.set_bc(b, bcs)
    return ScriptBeam(space, a, L, bcs, A, b)


@pytest.fixture(scope="session")
def assemble_beam():
    """``assemble_beam(comm, W, lam, mu, rho, cells=(8, 2, 2)) -> ScriptBeam``."""
    if not has_dolfinx():
        pytest.skip("needs DOLFINx")
    return _assemble_beam
