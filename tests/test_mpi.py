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


BEAM = {"W": 0.1, "lambda_": 1.25, "mu": 1.0, "rho": 1.0}
SLENDER = {"W": 0.02, "lambda_": 10.0, "mu": 0.1, "rho": 1.0}


def steps(report):
    """What every rank must agree on in a SolveReport (wall times differ)."""
    return [(attempt.alpha, attempt.reason, attempt.iterations) for attempt in report.attempts]


def test_every_rank_solves_at_rank_0_s_shift(beam_run, assemble_beam):
    from mpi4py import MPI
    from petsc4py import PETSc

    import femeta
    from femeta.fenics import configure

    comm = MPI.COMM_WORLD
    model = femeta.load(beam_run)
    beam = assemble_beam(comm, *BEAM.values())
    start, end = beam.A.getOwnershipRange()
    assert comm.allreduce(end - start) == 243 and (comm.size == 1 or end - start < 243)
    ksp = PETSc.KSP().create(comm)
    ksp.setOperators(beam.A)
    # Inputs that differ from rank to rank (say, rounded differently) give rank 0's shift.
    solver = configure(ksp, model, **{**BEAM, "W": BEAM["W"] * (1 + 0.1 * comm.rank)})
    assert comm.allgather(solver.alpha) == [model.predict(**BEAM)] * comm.size
    report = solver.solve(beam.b, beam.b.duplicate())
    assert report.converged and len(report.attempts) == 1
    assert comm.allgather(steps(report)) == [steps(report)] * comm.size


def test_the_guarded_solve_retries_under_block_jacobi_on_every_rank(assemble_beam):
    from mpi4py import MPI
    from petsc4py import PETSc

    from femeta.fenics import configure

    comm = MPI.COMM_WORLD
    beam = assemble_beam(comm, *SLENDER.values())
    ksp = PETSc.KSP().create(comm)
    ksp.setOperators(beam.A)
    ksp.setTolerances(rtol=1e-6, atol=0.0)
    x = beam.b.duplicate()
    report = configure(ksp, 1e-4).solve(beam.b, x)
    assert ksp.getPC().getType() == ("bjacobi" if comm.size > 1 else "icc")
    assert report.converged and report.attempts[0].reason in (
        "DIVERGED_INDEFINITE_PC",
        "DIVERGED_PCSETUP_FAILED",
    )
    assert len(report.attempts) > 1 and not report.fell_back
    assert comm.allgather(steps(report)) == [steps(report)] * comm.size
    residual = beam.b.duplicate()
    beam.A.mult(x, residual)
    residual.aypx(-1.0, beam.b)
    assert residual.norm() <= 1.01e-6 * beam.b.norm()


def test_linear_problem_in_parallel_solves_as_configure_does(beam_run, assemble_beam):
    from mpi4py import MPI
    from petsc4py import PETSc

    import femeta
    from femeta.fenics import LinearProblem, configure

    comm = MPI.COMM_WORLD
    model = femeta.load(beam_run)
    beam = assemble_beam(comm, *BEAM.values(), cells=(16, 4, 4))
    problem = LinearProblem(beam.a, beam.L, model=model, params=BEAM, bcs=beam.bcs)
    u = problem.solve()
    report = problem.report
    assert report.converged and report.alpha == model.predict(**BEAM)
    assert comm.allgather(steps(report)) == [steps(report)] * comm.size
    ksp = PETSc.KSP().create(comm)
    ksp.setOperators(beam.A)
    x = beam.b.duplicate()
    assert steps(configure(ksp, model, **BEAM).solve(beam.b, x)) == steps(report)
    owned = x.getLocalSize()
    np.testing.assert_allclose(u.x.array[:owned], x.getArray(), rtol=1e-10, atol=1e-14)


ONE_RANK_FAILS = """
import json, sys
from mpi4py import MPI
from petsc4py import PETSc
import femeta
from femeta.fenics import configure

comm = MPI.COMM_WORLD
model = femeta.load(sys.argv[1])
n = 30
A = PETSc.Mat().createAIJ([n, n], comm=comm)
A.setPreallocationNNZ(3)
start, end = A.getOwnershipRange()
for i in range(start, end):
    A[i, i] = 2.0
    if i > 0:
        A[i, i - 1] = -1.0
    if i < n - 1:
        A[i, i + 1] = -1.0
A.assemble()
good = {"W": 0.1, "lambda_": 1.25, "mu": 1.0, "rho": 1.0}
cases = {
    "W out of range on rank 1": {**good, "W": 5.0} if comm.rank == 1 else good,
    "rho missing on rank 0": {k: v for k, v in good.items() if k != "rho" or comm.rank},
}
seen = {}
for case, params in cases.items():
    ksp = PETSc.KSP().create(comm)
    ksp.setOperators(A)
    try:
        configure(ksp, model, **params)
        seen[case] = None
    except ValueError as err:
        seen[case] = str(err)
    ksp.destroy()
ksp = PETSc.KSP().create(comm)
ksp.setOperators(A)
b = A.createVecLeft()
b.set(1.0)
report = configure(ksp, model, **good).solve(b, b.duplicate())  # the ranks are still in step
seen["solved"] = report.converged
everyone = comm.gather(seen)  # one line from rank 0: lines from two ranks can interleave
if comm.rank == 0:
    print(json.dumps(everyone))
"""


@pytest.mark.skipif("PMI_RANK" in os.environ, reason="launches mpiexec itself")
def test_a_bad_input_on_one_rank_fails_alike_on_every_rank(beam_run):
    mpiexec = Path(sys.executable).parent / "mpiexec"
    command = [str(mpiexec), "-n", "2", sys.executable, "-c", ONE_RANK_FAILS, str(beam_run)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    first, second = json.loads(result.stdout)  # what ranks 0 and 1 saw
    assert first == second
    assert first["W out of range on rank 1"].startswith("W = 5 is outside [0.003, 0.3]")
    assert first["rho missing on rank 0"].startswith("missing parameter 'rho'")
    assert first["solved"] is True


@pytest.mark.skipif("PMI_RANK" in os.environ, reason="launches mpiexec itself")
def test_solve_under_mpiexec_assembles_on_both_ranks_and_prints_once(beam_run):
    mpiexec = Path(sys.executable).parent / "mpiexec"
    command = [str(mpiexec), "-n", "2", sys.executable, "-m", "femeta", "solve", "elasticity",
               "--model", str(beam_run), "--cells", "16", "4", "4", "--W", "0.05",
               "--json"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.stdout
    summary = json.loads(lines[0])
    assert (summary["ranks"], summary["unknowns"]) == (2, 3 * 17 * 5 * 5)
    assert all(row["converged"] for row in summary["solvers"])
    bad = subprocess.run([*command[:-3], "--W", "5", "--json"], capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert bad.returncode == 2
    errors = [line for line in bad.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and errors[0] == errors[1] and "W = 5" in errors[0], bad.stderr


@pytest.mark.skipif("PMI_RANK" in os.environ, reason="launches mpiexec itself")
def test_training_under_mpiexec_gives_the_serial_weights(tmp_path):
    """Two ranks share the dataset's assembly and the PETSc solves: one dataset written,
    one run written, and the weights of a serial run, bit for bit."""
    mpiexec = Path(sys.executable).parent / "mpiexec"
    train = [sys.executable, "-m", "femeta", "train", "elasticity", "--cells", "4", "2", "2",
             "--splits", "24", "8", "8", "--epochs", "2", "--batch-size", "8", "--engine", "petsc",
             "--smooth", "0.25", "--device", "cpu"]  # fmt: skip
    runs = {}
    for ranks in (1, 2):
        cache, out = tmp_path / f"cache{ranks}", tmp_path / f"run{ranks}"
        launch = [str(mpiexec), "-n", "2"] if ranks == 2 else []
        environment = {**os.environ, "XDG_CACHE_HOME": str(cache)}
        result = subprocess.run([*launch, *train, "--out", str(out)], capture_output=True,
                                text=True, timeout=600, env=environment)  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert result.stdout.count("saved") == 1, result.stdout  # printed by rank 0 only
        datasets = sorted(path.name for path in (cache / "femeta").glob("elasticity-*"))
        runs[ranks] = (out, datasets)
    (serial, serial_data), (shared, shared_data) = runs[1], runs[2]
    assert serial_data == shared_data and len(serial_data) >= 3
    for name in serial_data:
        written = [(tmp_path / f"cache{ranks}" / "femeta" / name).read_bytes() for ranks in (1, 2)]
        assert written[0] == written[1], name
    assert (serial / "model.safetensors").read_bytes() == (
        shared / "model.safetensors"
    ).read_bytes()
    history = [json.loads((run / "history.json").read_text()) for run in (serial, shared)]
    for record in history:
        for epoch in record:
            epoch.pop("seconds", None)
    assert history[0] == history[1]
    assert sorted(path.name for path in shared.iterdir()) == sorted(
        path.name for path in serial.iterdir()
    )


def test_a_family_s_tasks_are_assembled_by_the_ranks_together(tmp_path):
    import torch
    from mpi4py import MPI

    from femeta.problems.family import UserFamily, load_family

    family_file = tmp_path / "family.py"
    family_file.write_text(
        "import ufl\n"
        "from dolfinx import default_scalar_type, fem, mesh\n"
        'PARAMETERS = {"kappa": ("loguniform", 1.0, 1e3)}\n'
        'STATISTICS = {"trace": lambda A: A.getDiagonal().sum()}\n'
        "def make(comm):\n"
        "    msh = mesh.create_unit_square(comm, 5, 5)\n"
        '    space = fem.functionspace(msh, ("Lagrange", 1))\n'
        "    kappa = fem.Constant(msh, default_scalar_type(1.0))\n"
        "    u, v = ufl.TrialFunction(space), ufl.TestFunction(space)\n"
        "    x = ufl.SpatialCoordinate(msh)\n"
        "    k = ufl.conditional(ufl.lt(x[0], 0.5), kappa, 1.0)\n"
        "    dofs = fem.locate_dofs_geometrical(space, lambda p: p[0] < 1e-12)\n"
        "    bc = fem.dirichletbc(default_scalar_type(0.0), dofs, space)\n"
        "    a = k * ufl.inner(ufl.grad(u), ufl.grad(v)) * ufl.dx\n"
        '    return {"a": a, "L": v * ufl.dx, "bcs": [bc], "parameters": {"kappa": kappa}}\n'
    )
    family = UserFamily(load_family(f"{family_file}:make"), cache=False)
    tasks = family.sample(5, seed=1)  # under mpiexec: tasks 0, 2, 4 on rank 0, 1 and 3 on rank 1
    A, b = family._forms()(tasks["params"])  # every task on this rank alone
    assert torch.equal(tasks["A"].values, A.values) and torch.equal(tasks["b"], b)
    # The file's statistic of each task, computed by the rank that assembled it.
    assert torch.allclose(tasks["features"][:, -1], A.diagonal().sum(dim=1), rtol=1e-14)
    sums = MPI.COMM_WORLD.allgather(float(tasks["features"].sum()))
    assert all(value == sums[0] for value in sums)
