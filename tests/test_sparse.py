"""SparseBatch, and ICCG on sparse batches against PETSc on several SPD families."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse
import torch

from femeta._fenics import has_dolfinx
from femeta.solvers.iccg import iccg
from femeta.solvers.sparse import SparseBatch

needs_dolfinx = pytest.mark.skipif(not has_dolfinx(), reason="needs DOLFINx and petsc4py")


def laplacian_batch(batch: int = 3, n: int = 30, seed: int = 0) -> tuple[SparseBatch, torch.Tensor]:
    """Weighted path-graph Laplacians plus a positive diagonal, in CSR, and right-hand sides."""
    generator = np.random.default_rng(seed)
    rows, cols = np.arange(n - 1), np.arange(1, n)
    pattern = scipy.sparse.coo_matrix((np.ones(n - 1), (rows, cols)), shape=(n, n))
    pattern = (pattern + pattern.T + scipy.sparse.eye(n)).tocsr()
    pattern.sort_indices()
    values = []
    for _ in range(batch):
        weights = generator.uniform(0.1, 10, n - 1)
        off = scipy.sparse.coo_matrix((-weights, (rows, cols)), shape=(n, n))
        matrix = (off + off.T).tocsr()
        matrix = matrix - scipy.sparse.diags(np.asarray(matrix.sum(axis=1)).ravel() - 0.1)
        matrix = (matrix + 0 * pattern).tocsr()
        matrix.sort_indices()
        values.append(matrix.data)
    b = torch.from_numpy(generator.standard_normal((batch, n)))
    return SparseBatch.from_csr(pattern.indptr, pattern.indices, np.stack(values)), b


def test_round_trip_through_dense():
    A, _ = laplacian_batch()
    dense = A.to_dense()
    again = SparseBatch.from_dense(dense)
    assert torch.equal(again.indptr, A.indptr) and torch.equal(again.indices, A.indices)
    assert torch.equal(again.values, A.values)
    torch.testing.assert_close(A.diagonal(), torch.diagonal(dense, dim1=-2, dim2=-1))
    x = torch.randn(3, 30, dtype=torch.float64)
    torch.testing.assert_close(A.matvec(x), (dense @ x[..., None])[..., 0])
    assert A[1:].shape == (2, 30, 30) and A[0].shape == (1, 30, 30)


def test_unsorted_columns_are_sorted():
    A, _ = laplacian_batch(batch=1, n=4)
    indices = A.indices.clone()
    values = A.values.clone()
    for row in range(4):  # reverse every row
        part = slice(int(A.indptr[row]), int(A.indptr[row + 1]))
        indices[part], values[:, part] = indices[part].flip(0), values[:, part].flip(1)
    again = SparseBatch.from_csr(A.indptr, indices, values)
    assert torch.equal(again.to_dense(), A.to_dense())


def test_bad_batches_are_refused():
    A, b = laplacian_batch()
    with pytest.raises(ValueError, match="must agree"):
        SparseBatch(A.indptr, A.indices, A.values[:, 1:])
    with pytest.raises(ValueError, match="indices must lie in"):
        SparseBatch(A.indptr, A.indices + 1, A.values)
    with pytest.raises(ValueError, match="needs indptr"):
        SparseBatch(A.indptr, A.indices, A.values[0])
    with pytest.raises(ValueError, match="expected"):
        iccg(A, b[:, 1:], 0.1, tol=1e-6, max_iterations=10)
    with pytest.raises(ValueError, match="carries its pattern"):
        iccg(A, b, 0.1, tol=1e-6, max_iterations=10, pattern=torch.ones(30, 30, dtype=torch.bool))
    no_diagonal = SparseBatch.from_csr([0, 1, 2], [1, 0], [[1.0, 1.0]])
    with pytest.raises(ValueError, match="diagonal"):
        iccg(no_diagonal, torch.ones(1, 2), 0.1, tol=1e-6, max_iterations=10)
    with pytest.raises(ValueError, match="NaN"):
        iccg(SparseBatch(A.indptr, A.indices, A.values * np.nan), b, 0.1, tol=1e-6,
             max_iterations=10)  # fmt: skip


@pytest.mark.parametrize("method", ["compiled", "torch"])
def test_sparse_and_dense_input_give_the_same_solve(method):
    A, b = laplacian_batch()
    alpha = torch.tensor([1e-3, 0.1, 3.0], dtype=torch.float64)
    sparse = iccg(A, b, alpha, tol=1e-8, max_iterations=40, method=method)
    dense = iccg(A.to_dense(), b, alpha, tol=1e-8, max_iterations=40, method=method)
    assert torch.equal(sparse.iterations, dense.iterations)
    torch.testing.assert_close(sparse.x, dense.x, rtol=1e-10, atol=1e-12)


def test_compiled_and_torch_agree_with_an_initial_guess_and_a_derivative():
    A, b = laplacian_batch(seed=1)
    x0 = torch.randn(3, 30, dtype=torch.float64)
    outcomes = []
    for method in ("compiled", "torch"):
        alpha = torch.tensor([1e-2, 0.3, 2.0], dtype=torch.float64, requires_grad=True)
        result = iccg(A, b, alpha, x0, tol=None, max_iterations=8, method=method)
        (grad,) = torch.autograd.grad(result.history.sum() + result.x.sum(), alpha)
        outcomes.append((result, grad))
    (compiled, compiled_grad), (torch_, torch_grad) = outcomes
    torch.testing.assert_close(compiled.history, torch_.history, rtol=1e-9, atol=1e-14)
    torch.testing.assert_close(compiled.x, torch_.x, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(compiled_grad, torch_grad, rtol=1e-7, atol=1e-12)


def test_the_compiled_method_refuses_other_dtypes():
    A, b = laplacian_batch()
    with pytest.raises(ValueError, match="method='torch'"):
        iccg(A, b, 0.1, tol=1e-6, max_iterations=10, dtype=torch.float32, method="compiled")
    with pytest.raises(ValueError, match="method must be"):
        iccg(A, b, 0.1, tol=1e-6, max_iterations=10, method="fast")


def _random_graph_laplacian(n: int) -> torch.Tensor:
    """The Laplacian of a random geometric graph in the unit square, plus 1e-2 I."""
    points = np.random.default_rng(1).uniform(size=(n, 2))
    close = np.linalg.norm(points[:, None] - points[None], axis=-1) < 0.1
    adjacency = torch.from_numpy((close & ~np.eye(n, dtype=bool)).astype(np.float64))
    return torch.diag(adjacency.sum(1) + 1e-2) - adjacency


def _assembled(kind: str):
    """A small SPD matrix of one family, assembled with DOLFINx, as a PETSc matrix."""
    import ufl
    from dolfinx import fem, mesh
    from dolfinx.fem import petsc
    from mpi4py import MPI

    comm = MPI.COMM_SELF
    if kind == "poisson-2d":
        domain = mesh.create_unit_square(comm, 24, 24)
    elif kind == "anisotropic":
        domain = mesh.create_unit_square(comm, 24, 24, mesh.CellType.quadrilateral)
    elif kind == "poisson-3d":
        domain = mesh.create_unit_cube(comm, 7, 7, 7)
    else:  # elasticity on tetrahedra
        domain = mesh.create_box(
            comm, [np.zeros(3), np.array([1.0, 0.2, 0.2])], [10, 2, 2], mesh.CellType.tetrahedron
        )
    shape = (3,) if kind == "elasticity-tet" else ()
    space = fem.functionspace(domain, ("Lagrange", 1, shape))
    u, v = ufl.TrialFunction(space), ufl.TestFunction(space)
    if kind == "anisotropic":
        diffusion = ufl.as_matrix([[1.0, 0.0], [0.0, 1e-3]])
        form = ufl.inner(diffusion * ufl.grad(u), ufl.grad(v)) * ufl.dx
    elif kind == "elasticity-tet":

        def strain(w):
            return ufl.sym(ufl.grad(w))

        stress = 1.25 * ufl.tr(strain(u)) * ufl.Identity(3) + 2 * strain(u)
        form = ufl.inner(stress, strain(v)) * ufl.dx
    else:
        form = ufl.inner(ufl.grad(u), ufl.grad(v)) * ufl.dx
    fixed = fem.locate_dofs_geometrical(space, lambda x: np.isclose(x[0], 0.0))
    zero = np.zeros(3) if shape else 0.0
    bc = fem.dirichletbc(np.asarray(zero, dtype=np.float64), fixed, space)
    matrix = petsc.assemble_matrix(fem.form(form), bcs=[bc])
    matrix.assemble()
    return matrix


@pytest.mark.dolfinx
@needs_dolfinx
@pytest.mark.parametrize(
    "kind", ["poisson-2d", "anisotropic", "poisson-3d", "elasticity-tet", "graph"]
)
def test_iterations_equal_petsc_on_other_families(kind):
    from femeta.solvers.petsc import petsc_iccg

    if kind == "graph":
        dense = _random_graph_laplacian(300)
    else:
        matrix = _assembled(kind)
        dense = SparseBatch.from_petsc([matrix]).to_dense()[0]
        matrix.destroy()
    # Symmetrise (PETSc's ICC reads one triangle, ours the other) and vary the values per task.
    A = SparseBatch.from_dense(
        ((dense + dense.T) / 2).expand(5, -1, -1) * torch.arange(1.0, 6.0)[:, None, None]
    )
    b = torch.randn(5, A.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for alpha in (1e-4, 1e-2, 1.0, 10.0):
        ours = iccg(A, b, alpha, tol=1e-8, max_iterations=2000)
        reference = petsc_iccg(A, b, alpha, tol=1e-8, max_iterations=2000)
        assert torch.equal(ours.factorization_failed, reference.factorization_failed)
        assert bool(ours.converged.all()), (kind, alpha)
        assert int((ours.iterations - reference.iterations).abs().max()) <= 1, (kind, alpha)
        torch.testing.assert_close(ours.history[:, :6], reference.history[:, :6], rtol=1e-8, atol=0)


@pytest.mark.dolfinx
@needs_dolfinx
def test_a_batch_from_petsc_matrices_keeps_their_stored_entries():
    from mpi4py import MPI

    from femeta.problems.elasticity import beam_system

    systems = [beam_system(MPI.COMM_SELF, (4, 1, 1), w, 1.0, 1.0, 1.0) for w in (0.01, 0.1)]
    A = SparseBatch.from_petsc([matrix for matrix, _, _ in systems])
    _, indices, data = systems[1][0].getValuesCSR()
    assert A.nnz == len(indices) and np.array_equal(A.values[1].numpy(), data)
    other = beam_system(MPI.COMM_SELF, (5, 1, 1), 0.1, 1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="stores other entries"):
        SparseBatch.from_petsc([systems[0][0], other[0]])
