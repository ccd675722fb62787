"""Tests that run on every rank under `mpiexec -n 2` (and serially)."""

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from femeta._fenics import has_dolfinx

pytestmark = [pytest.mark.mpi, pytest.mark.skipif(not has_dolfinx(), reason="needs DOLFINx")]


@pytest.fixture(autouse=True)
def collective_teardown():
    from mpi4py import MPI

    yield
    # PETSc and DOLFINx destructors are collective: free them on all ranks together.
    gc.collect()
    MPI.COMM_WORLD.Barrier()


@pytest.mark.parametrize("n", [16, 41])
def test_distributed_poisson_matrix_equals_closed_form(n):
    from mpi4py import MPI

    from femeta.problems.poisson1d import assemble_poisson_matrix, closed_form_matrix

    comm = MPI.COMM_WORLD
    matrix = assemble_poisson_matrix(n, comm)
    np.testing.assert_allclose(matrix, closed_form_matrix(n), atol=1e-12)
    gathered = comm.allgather(matrix)
    assert all(np.array_equal(gathered[0], other) for other in gathered)


def test_the_mesh_is_really_distributed():
    from mpi4py import MPI

    from femeta._fenics import import_dolfinx

    dolfinx = import_dolfinx()
    comm = MPI.COMM_WORLD
    mesh = dolfinx.mesh.create_interval(comm, 17, [0.0, 1.0])
    owned = mesh.topology.index_map(0).size_local
    assert comm.allreduce(owned) == 18
    if comm.size > 1:
        assert owned < 18


@pytest.mark.skipif("PMI_RANK" in os.environ, reason="launches mpiexec itself")
def test_cli_under_mpiexec_prints_one_result():
    mpiexec = Path(sys.executable).parent / "mpiexec"
    command = [str(mpiexec), "-n", "2", sys.executable, "-m", "femeta", "evaluate", "poisson1d",
               "--baseline", "base", "--tol", "1e-2", "--json"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["n_tasks"] == 1000
