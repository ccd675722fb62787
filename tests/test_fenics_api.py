"""femeta.fenics in a DOLFINx script: configure(ksp, ...), the guarded solve, LinearProblem."""

import numpy as np
import pytest
import torch
from test_iccg import growing_residual

from femeta._fenics import has_dolfinx

pytestmark = [pytest.mark.dolfinx, pytest.mark.skipif(not has_dolfinx(), reason="needs DOLFINx")]

if has_dolfinx():
    from mpi4py import MPI
    from petsc4py import PETSc

    import femeta
    from femeta.experiments import ElasticityIccg
    from femeta.fenics import LinearProblem, configure
    from femeta.problems.base import TaskSet
    from femeta.solvers.petsc import petsc_iccg

    class RecordingKSP(PETSc.KSP):
        """A KSP that records the initial guess of every solve."""

        def solve(self, b, x):
            self.starts.append(x.getArray().copy())
            super().solve(b, x)


BEAM = {"W": 0.1, "lambda_": 1.25, "mu": 1.0, "rho": 1.0}
SLENDER = {"W": 0.02, "lambda_": 10.0, "mu": 0.1, "rho": 1.0}  # nearly incompressible, thin
BREAKDOWNS = ("DIVERGED_INDEFINITE_PC", "DIVERGED_PCSETUP_FAILED")
STOP = {"tol": 1e-6, "max_iterations": 243}  # femeta's evaluation: rtol 1e-6, cap N


def cg_ksp(A, rtol=1e-6, max_it=10_000, ksp=None):
    """A KSP on ``A`` as a script makes one: operators and tolerances, nothing else."""
    ksp = PETSc.KSP() if ksp is None else ksp
    ksp.create(A.comm)
    ksp.setOperators(A)
    ksp.setTolerances(rtol=rtol, atol=0.0, max_it=max_it)
    return ksp


def slender_beam(assemble_beam):
    return assemble_beam(MPI.COMM_SELF, *SLENDER.values())


def dense(A):
    """A serial PETSc AIJ matrix as a dense array, and the entries it stores."""
    indptr, indices, values = A.getValuesCSR()
    n = A.getSize()[0]
    rows = np.repeat(np.arange(n), np.diff(indptr))
    array, stored = np.zeros((n, n)), np.zeros((n, n), dtype=bool)
    array[rows, indices], stored[rows, indices] = values, True
    return array, stored


def aij(array, pattern):
    """``array`` as a PETSc AIJ matrix storing the entries of ``pattern`` (zeros included)."""
    rows, columns = np.nonzero(pattern)
    n = array.shape[0]
    indptr = np.searchsorted(rows, np.arange(n + 1)).astype(PETSc.IntType)
    csr = (indptr, columns.astype(PETSc.IntType), array[rows, columns])
    return PETSc.Mat().createAIJ((n, n), csr=csr, comm=MPI.COMM_SELF)


@pytest.fixture(scope="module")
def dataset():
    """femeta's test beams (N = 243), their A dense, and the entries its IC(0) keeps."""
    experiment = ElasticityIccg()
    tasks = experiment.tasks("test", 0)
    dense = TaskSet({**tasks.fields, "A": tasks["A"].to_dense()})
    return dense, experiment.problem.stored_pattern()


def femeta_solve(A, b, alphas, pattern):
    """femeta's reference: ``petsc_iccg`` at float64 shifts (a float would pass as float32)."""
    alphas = torch.as_tensor(alphas, dtype=torch.float64).expand(len(b))
    return petsc_iccg(A, b, alphas, pattern=pattern, **STOP)


def first_attempt(A, b, alpha):
    """The first attempt of a guarded solve at ``alpha``, and ``x`` after it."""
    ksp = cg_ksp(A, rtol=STOP["tol"], max_it=STOP["max_iterations"])
    x = b.duplicate()
    report = configure(ksp, alpha, retries=0).solve(b, x)
    attempt = report.attempts[0]
    x_first = None if len(report.attempts) > 1 else x.getArray().copy()
    return attempt, x_first


def assert_same_solve(attempt, x, reference, index=0):
    """One ShiftedICC attempt against one task of a ``petsc_iccg`` result."""
    if bool(reference.factorization_failed[index]):
        assert attempt.reason in BREAKDOWNS, attempt
        return
    assert attempt.iterations == int(reference.iterations[index]), attempt
    assert attempt.converged == bool(reference.converged[index]), attempt
    if attempt.converged:
        np.testing.assert_allclose(x, reference.x[index].numpy(), rtol=1e-10, atol=1e-14)


def test_the_script_beam_is_femeta_s_beam(assemble_beam, dataset):
    """A script's beam is the dataset's (up to its symmetrisation), on the stored pattern."""
    tasks, pattern = dataset
    for index in (0, 6, 7):
        W, lam, mu, rho = tasks["params"][index].tolist()
        beam = assemble_beam(MPI.COMM_SELF, W, lam, mu, rho)
        array, stored = dense(beam.A)
        assert beam.A.getType() == "seqaij" and np.array_equal(stored, pattern.numpy())
        expected = tasks["A"][index].numpy()
        assert np.abs(array - expected).max() <= 1e-15 * np.abs(expected).max()
        np.testing.assert_allclose(beam.b.getArray(), tasks["b"][index].numpy(), rtol=1e-14,
                                   atol=1e-15 * np.abs(expected).max())  # fmt: skip


# Powers of two and the model's own shifts (below) are solved alike.
DYADIC_SHIFTS = (2.0**-10, 2.0**-3, 1.0)


@pytest.mark.parametrize("alpha", DYADIC_SHIFTS)
def test_configure_solves_as_femeta_s_petsc_reference(dataset, alpha):
    """CG + ICC(0) set up by configure = femeta's petsc_iccg on the stored pattern."""
    tasks, pattern = dataset
    indices = list(range(8))
    reference = femeta_solve(tasks["A"][indices], tasks["b"][indices], alpha, pattern)
    for position, index in enumerate(indices):
        A = aij(tasks["A"][index].numpy(), pattern.numpy())
        b = PETSc.Vec().createWithArray(tasks["b"][index].numpy().copy(), comm=MPI.COMM_SELF)
        attempt, x = first_attempt(A, b, alpha)
        assert_same_solve(attempt, x, reference, position)


@pytest.mark.parametrize("alpha", DYADIC_SHIFTS)
def test_on_a_script_beam_configure_solves_as_femeta(assemble_beam, dataset, alpha):
    tasks, pattern = dataset
    for index in (0, 6, 7):
        W, lam, mu, rho = tasks["params"][index].tolist()
        beam = assemble_beam(MPI.COMM_SELF, W, lam, mu, rho)
        array, _ = dense(beam.A)
        rhs = torch.from_numpy(beam.b.getArray().copy())[None]
        reference = femeta_solve(torch.from_numpy(array)[None], rhs, alpha, pattern)
        attempt, x = first_attempt(beam.A, beam.b, alpha)
        assert_same_solve(attempt, x, reference)


def test_at_the_model_s_shifts_configure_solves_as_femeta(beam_run, dataset):
    tasks, pattern = dataset
    model = femeta.load(beam_run)
    indices = list(range(40))
    alphas = [
        model.predict(W=w, lambda_=lam, mu=mu, rho=rho)
        for w, lam, mu, rho in tasks["params"][indices].tolist()
    ]
    reference = femeta_solve(tasks["A"][indices], tasks["b"][indices], alphas, pattern)
    differ = []
    for position, index in enumerate(indices):
        A = aij(tasks["A"][index].numpy(), pattern.numpy())
        b = PETSc.Vec().createWithArray(tasks["b"][index].numpy().copy(), comm=MPI.COMM_SELF)
        attempt, _ = first_attempt(A, b, alphas[position])
        expected = int(reference.iterations[position])
        if attempt.iterations != expected:
            differ.append((index, attempt.iterations, expected))
    assert not differ, f"(test beam, iterations, femeta's) differ: {differ}"


def test_a_breakdown_is_retried_with_a_larger_shift(assemble_beam):
    beam = slender_beam(assemble_beam)  # kept: A and b live on its mesh's communicator
    A, b = beam.A, beam.b
    x = b.duplicate()
    report = configure(cg_ksp(A), 1e-4).solve(b, x)
    first, *_, last = report.attempts
    assert first.alpha == 1e-4 and first.reason in BREAKDOWNS
    assert report.converged and not report.fell_back and report.alpha == last.alpha
    shifts = [1e-4 * 10.0**k for k in range(len(report.attempts))]  # growth 10
    assert [a.alpha for a in report.attempts] == pytest.approx(shifts, rel=1e-12)
    assert all(a.reason in BREAKDOWNS for a in report.attempts[:-1])
    assert report.total_iterations == sum(a.iterations for a in report.attempts)
    assert report.iterations == last.iterations > 0
    assert_solves(A, b, x)
    assert "after" in str(report) and "before:" in str(report)


def test_without_retries_it_falls_back_to_petsc_s_default_icc(assemble_beam):
    beam = slender_beam(assemble_beam)  # kept: A and b live on its mesh's communicator
    A, b = beam.A, beam.b
    x = b.duplicate()
    ksp = cg_ksp(A)
    report = configure(ksp, 1e-4, retries=0).solve(b, x)
    assert [a.alpha for a in report.attempts] == [1e-4, None]
    assert report.attempts[0].reason in BREAKDOWNS
    assert report.converged and report.fell_back and report.alpha is None
    assert "PETSc's default shift" in str(report)
    assert_solves(A, b, x)
    # What a script gets with -ksp_type cg -pc_type icc and the unpreconditioned norm.
    default = cg_ksp(A)
    default.setType("cg")
    default.setNormType(PETSc.KSP.NormType.UNPRECONDITIONED)
    default.getPC().setType("icc")
    y = b.duplicate()
    default.solve(b, y)
    assert default.getConvergedReason() > 0
    assert report.iterations == default.getIterationNumber()
    np.testing.assert_array_equal(x.getArray(), y.getArray())


def test_running_out_of_iterations_falls_back_too(assemble_beam):
    beam = slender_beam(assemble_beam)  # kept: A and b live on its mesh's communicator
    A, b = beam.A, beam.b
    report = configure(cg_ksp(A, max_it=50), 0.1).solve(b, b.duplicate())
    assert report.attempts[0].reason == "DIVERGED_MAX_IT"
    assert report.fell_back and not report.converged and len(report.attempts) == 2


def growing_system():
    """:func:`test_iccg.growing_residual` as PETSc objects."""
    A, b = (tensor[0].numpy() for tensor in growing_residual())
    matrix = aij(A, A != 0)
    vector = matrix.createVecLeft()
    vector.setArray(b)
    return matrix, vector


def test_a_residual_that_grows_before_it_falls_is_not_taken_for_divergence():
    A, b = growing_system()
    ksp = cg_ksp(A, rtol=1e-8, max_it=400)
    norms = []
    ksp.setMonitor(lambda _, __, norm: norms.append(norm))
    report = configure(ksp, 1.0).solve(b, b.duplicate())
    assert max(norms) > 1e4 * norms[0]  # beyond PETSc's default divtol
    assert report.converged and len(report.attempts) == 1


def test_a_divergence_tolerance_the_user_set_is_kept():
    A, b = growing_system()
    ksp = cg_ksp(A, rtol=1e-8, max_it=400)
    ksp.setTolerances(divtol=1e3)
    report = configure(ksp, 1.0).solve(b, b.duplicate())
    assert ksp.getTolerances()[2] == 1e3
    assert report.attempts[0].reason == "DIVERGED_DTOL" and report.fell_back


def assert_solves(A, b, x, rtol=1e-6):
    r = b.duplicate()
    A.mult(x, r)
    r.aypx(-1.0, b)
    assert r.norm() <= 1.01 * rtol * b.norm()


def test_a_nonzero_initial_guess_is_restored_before_each_retry(assemble_beam):
    beam = slender_beam(assemble_beam)  # kept: A and b live on its mesh's communicator
    A, b = beam.A, beam.b
    ksp = cg_ksp(A, ksp=RecordingKSP())
    ksp.starts = []
    ksp.setInitialGuessNonzero(True)
    x = b.duplicate()
    configure(cg_ksp(A), 0.1).solve(b, x)
    guess = 0.5 * x.getArray()  # half the solution: nonzero, and within PETSc's divergence limit
    x.setArray(guess)
    report = configure(ksp, 1e-4, retries=1).solve(b, x)
    # 1e-4 and 1e-3 break down; PETSc's default then solves.
    assert len(ksp.starts) == len(report.attempts) == 3 and report.fell_back
    for start in ksp.starts:
        np.testing.assert_array_equal(start, guess)
    assert_solves(A, b, x)


def test_the_global_options_database_is_left_alone(assemble_beam):
    beam = slender_beam(assemble_beam)  # kept: A and b live on its mesh's communicator
    A, b = beam.A, beam.b
    options = PETSc.Options()
    options["femeta_test_marker"] = "kept"
    before = options.getAll()
    try:
        ksp = cg_ksp(A)
        ksp.setOptionsPrefix("beam_")
        solver = configure(ksp, 1e-4, retries=1)  # a retry and the fallback too
        report = solver.solve(b, b.duplicate())
        assert len(report.attempts) == 3
        assert options.getAll() == before
        assert ksp.getOptionsPrefix() == "beam_"
    finally:
        del options["femeta_test_marker"]


def test_configure_with_a_model_uses_its_shift(assemble_beam, beam_run):
    model = femeta.load(beam_run)
    beam = assemble_beam(MPI.COMM_SELF, *BEAM.values())
    solver = configure(cg_ksp(beam.A), model, **BEAM)
    assert solver.alpha == model.predict(**BEAM)
    report = solver.solve(beam.b, beam.b.duplicate())
    assert report.converged and report.alpha == solver.alpha and len(report.attempts) == 1
    assert solver.getType() == "cg" and solver.getPC().getType() == "icc"  # the KSP's own
    assert solver.getNormType() == PETSc.KSP.NormType.UNPRECONDITIONED


def test_bad_solvers_and_parameters_are_clear_errors(assemble_beam, beam_run, poisson_run):
    model = femeta.load(beam_run)
    beam = assemble_beam(MPI.COMM_SELF, *BEAM.values())
    gmres = cg_ksp(beam.A)
    gmres.setType("gmres")
    bare = PETSc.KSP().create(MPI.COMM_SELF)  # no operators (see the next test)
    rectangular = PETSc.Mat().createAIJ((3, 4), nnz=1, comm=MPI.COMM_SELF)
    rectangular.assemble()
    cases = [
        (lambda: configure(gmres, 0.1), ValueError, "type 'gmres'.*ksp.setType\\('cg'\\)"),
        (lambda: configure(bare, 0.1), ValueError, "the KSP has no operator|A has type None"),
        (lambda: configure(cg_ksp(rectangular), 0.1), ValueError, "3 x 4.*square"),
        (lambda: configure(beam.A, 0.1), TypeError, "expected a petsc4py KSP, got Mat"),
        (lambda: configure(None, model, **BEAM), TypeError, "got NoneType"),
        (
            lambda: configure(cg_ksp(beam.A), femeta.load(poisson_run), **BEAM),
            ValueError,
            "predicts guess for 'poisson1d', not a shift",
        ),
        (lambda: configure(cg_ksp(beam.A), model, W=0.1, mu=1, rho=1), ValueError, "'lambda_'"),
        (lambda: configure(cg_ksp(beam.A), model, **{**BEAM, "W": 5.0}), ValueError, "W = 5"),
        (lambda: configure(cg_ksp(beam.A), 0.0), ValueError, "alpha must be a positive"),
        (lambda: configure(cg_ksp(beam.A), 0.1, retries=-1), ValueError, "retries"),
        (lambda: configure(cg_ksp(beam.A), 0.1, growth=1.0), ValueError, "growth"),
        (lambda: configure(cg_ksp(beam.A), 0.1, W=0.1), TypeError, "a given shift takes none"),
    ]
    for call, kind, message in cases:
        with pytest.raises(kind, match=message):
            call()
    alpha = configure(cg_ksp(beam.A), model, **{**BEAM, "W": 5.0}, extrapolate=True).alpha
    assert alpha == model.predict(**{**BEAM, "W": 5.0}, extrapolate=True)


def test_a_ksp_without_operators_is_told_to_set_them():
    with pytest.raises(ValueError, match=r"no operator; call ksp\.setOperators"):
        configure(PETSc.KSP().create(MPI.COMM_SELF), 0.1)


def test_linear_problem_solves_as_configure_does(assemble_beam, beam_run):
    model = femeta.load(beam_run)
    beam = assemble_beam(MPI.COMM_SELF, *BEAM.values())
    before = PETSc.Options().getAll()
    problem = LinearProblem(beam.a, beam.L, model=model, params=BEAM, bcs=beam.bcs)
    assert problem.report is None
    u = problem.solve()
    report = problem.report
    assert report is not None and report.converged and report.alpha == model.predict(**BEAM)
    assert problem.solver.getOptionsPrefix() == "femeta_"
    assert PETSc.Options().getAll() == before
    ksp = PETSc.KSP().create(MPI.COMM_SELF)  # PETSc's default tolerances, as in the problem
    ksp.setOperators(beam.A)
    x = beam.b.duplicate()
    direct = configure(ksp, model, **BEAM).solve(beam.b, x)
    assert report.iterations == direct.iterations > 0
    np.testing.assert_allclose(u.x.array, x.getArray(), rtol=1e-12, atol=1e-14)


def test_linear_problem_takes_tolerances_from_petsc_options(assemble_beam):
    beam = assemble_beam(MPI.COMM_SELF, *BEAM.values())
    problem = LinearProblem(beam.a, beam.L, model=0.1, bcs=beam.bcs,
                            petsc_options={"ksp_rtol": 1e-8, "ksp_atol": 0.0})  # fmt: skip
    assert problem.solver.getTolerances()[0] == 1e-8
    problem.solve()
    assert problem.report.converged


def test_a_matrix_set_after_configure_is_the_one_solved(assemble_beam):
    stout = assemble_beam(MPI.COMM_SELF, 0.2, 1.25, 1.0, 1.0)
    slender = assemble_beam(MPI.COMM_SELF, 0.02, 10.0, 0.1, 1.0)
    solver = configure(cg_ksp(stout.A), 0.5)
    solver.solve(stout.b, stout.b.duplicate())
    solver.ksp.setOperators(slender.A)
    switched = solver.solve(slender.b, slender.b.duplicate())
    fresh = configure(cg_ksp(slender.A), 0.5).solve(slender.b, slender.b.duplicate())
    assert switched.converged and switched.iterations == fresh.iterations > 0


def poisson_matrix(comm):
    """A Dirichlet Poisson matrix with a jump in its coefficient, assembled on ``comm``, and
    its mesh (which holds the communicator the matrix lives on)."""
    import ufl
    from dolfinx import default_scalar_type, fem, mesh
    from dolfinx.fem import petsc as dolfinx_petsc

    msh = mesh.create_unit_square(comm, 8, 8)
    space = fem.functionspace(msh, ("Lagrange", 1))
    x = ufl.SpatialCoordinate(msh)
    u, v = ufl.TrialFunction(space), ufl.TestFunction(space)
    kappa = ufl.conditional(ufl.lt(x[0], 0.5), 30.0, 7.0)
    dofs = fem.locate_dofs_geometrical(space, lambda p: np.isclose(p[0], 0.0))
    bc = fem.dirichletbc(default_scalar_type(0.0), dofs, space)
    form = fem.form(kappa * ufl.inner(ufl.grad(u), ufl.grad(v)) * ufl.dx)
    A = dolfinx_petsc.assemble_matrix(form, bcs=[bc])
    A.assemble()
    return A, msh


@pytest.mark.mpi
def test_matrix_statistics_are_those_training_reads_on_any_number_of_ranks():
    from femeta.fenics import matrix_statistics
    from femeta.problems.family import diagonal_range
    from femeta.solvers.sparse import SparseBatch

    names = ("diag_min", "diag_max", "norm_1", "norm_inf", "norm_fro")
    A, _mesh = poisson_matrix(MPI.COMM_WORLD)
    shared = matrix_statistics(A, names)
    serial, _serial_mesh = poisson_matrix(MPI.COMM_SELF)
    alone = matrix_statistics(serial, names)
    assert shared == pytest.approx(alone, rel=1e-12)
    # Training reads the same range of |diag(A)|, off the Dirichlet rows (which hold 1).
    low, high = diagonal_range(SparseBatch.from_petsc([serial]))
    assert (alone["diag_min"], alone["diag_max"]) == pytest.approx((float(low), float(high)))
    assert alone["diag_min"] >= 7.0 and alone["diag_max"] >= 4 * 30.0
    A.destroy()
    serial.destroy()


@pytest.mark.mpi
def test_a_family_model_reads_its_own_statistic_of_a_distributed_matrix(family_run):
    from femeta.fenics import matrix_statistics
    from femeta.problems.family import family_system, load_family

    comm = MPI.COMM_WORLD
    model = femeta.load(family_run)
    assert model.statistics[-1] == "log_trace"
    source = load_family(model.family)
    values = {"kappa": 30.0}
    A, b, _built = family_system(source, comm, values)
    serial, serial_b, _serial_built = family_system(source, MPI.COMM_SELF, values)
    shared = matrix_statistics(A, model.statistics, model.family)
    alone = matrix_statistics(serial, model.statistics, model.family)
    assert shared == pytest.approx(alone, rel=1e-12)
    assert comm.allgather(shared) == [shared] * comm.size
    ksp = cg_ksp(A)
    alpha = configure(ksp, model, **values).alpha
    assert alpha == pytest.approx(model.predict(**values, **alone), rel=1e-9)
    for item in (ksp, A, b, serial, serial_b):
        item.destroy()


@pytest.mark.mpi
def test_a_statistic_that_is_not_collective_is_an_error_on_every_rank(tmp_path):
    from femeta.family_file import FamilyError
    from femeta.fenics import matrix_statistics

    comm = MPI.COMM_WORLD
    if comm.size == 1:
        pytest.skip("one process: every statistic is collective")
    path = tmp_path / "statistics.py"
    path.write_text(
        "STATISTICS = {'rows_here': lambda A: float(A.getLocalSize()[0])}\n"
        "def make(comm):\n"
        "    raise NotImplementedError\n"
    )
    A, _mesh = poisson_matrix(comm)  # 81 rows: not the same number on each of 2 ranks
    with pytest.raises(FamilyError, match="statistic 'rows_here' differs between the processes"):
        matrix_statistics(A, ("rows_here",), f"{path}:make")
    A.destroy()
