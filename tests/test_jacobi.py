import numpy as np
import pytest
import torch

from femeta.problems.poisson1d import Poisson1D, closed_form_matrix
from femeta.solvers import jacobi
from femeta.solvers.sparse import SparseBatch


def numpy_jacobi_iterations(A, b, x0, reference, tol, cap):
    """Independent loop: iterations until ||x - x*|| / ||x*|| <= tol."""
    d = np.diag(A)
    counts = []
    for bi, xi, ri in zip(b, x0, reference, strict=True):
        x, k = xi.copy(), 0
        while np.linalg.norm(x - ri) / np.linalg.norm(ri) > tol and k < cap:
            x = x + (bi - A @ x) / d
            k += 1
        counts.append(k)
    return np.array(counts)


@pytest.fixture(scope="module")
def poisson():
    problem = Poisson1D(16, p=0.5)
    tasks = problem.sample(64, seed=3)
    return torch.from_numpy(closed_form_matrix(16)), tasks


@pytest.mark.parametrize("tol", [1e-2, 1e-6, 1e-8])
def test_iterations_match_independent_numpy_loop(poisson, tol):
    A, tasks = poisson
    result = jacobi(A, tasks["f"], tol=tol, max_iterations=5000, reference=tasks["solution"])
    expected = numpy_jacobi_iterations(
        A.numpy(), tasks["f"].numpy(), np.zeros((64, 16)), tasks["solution"].numpy(), tol, 5000
    )
    np.testing.assert_array_equal(result.iterations.numpy(), expected)
    assert bool(result.converged.all())
    assert float(result.final_error.max()) <= tol


def test_matrix_layouts_agree(poisson):
    A, tasks = poisson
    b = tasks["f"]
    x0 = 0.1 * torch.ones_like(b)
    runs = [
        jacobi(matrix, b, x0, tol=1e-7, max_iterations=3000)
        for matrix in (
            A,
            A.expand(len(b), 16, 16).clone(),
            A.to_sparse(),
            A.to_sparse_csr(),
            SparseBatch.from_dense(A.expand(len(b), 16, 16)),
        )
    ]
    for other in runs[1:]:
        torch.testing.assert_close(other.iterations, runs[0].iterations)
        torch.testing.assert_close(other.x, runs[0].x)
    block_one = jacobi(A, b, x0, tol=1e-7, max_iterations=3000, block_size=1)
    torch.testing.assert_close(block_one.iterations, runs[0].iterations)


def test_history_is_zero_padded_after_convergence(poisson):
    A, tasks = poisson
    result = jacobi(A, tasks["f"], tol=1e-4, max_iterations=5000, reference=tasks["solution"])
    history, iterations = result.history, result.iterations
    assert history.shape == (64, int(iterations.max()) + 1)
    steps = torch.arange(history.shape[1])
    assert bool((history[steps[None] > iterations[:, None]] == 0).all())
    assert bool((history[steps[None] <= iterations[:, None]] > 0).all())
    before_stop = history.gather(1, (iterations - 1)[:, None]).squeeze(1)
    assert bool((before_stop > 1e-4).all())


def test_fixed_iteration_solve_takes_exactly_m_steps(poisson):
    A, tasks = poisson
    result = jacobi(A, tasks["f"], tol=None, max_iterations=7, reference=tasks["solution"])
    assert result.iterations.tolist() == [7] * 64
    assert not bool(result.converged.any())
    x = torch.zeros_like(tasks["f"])
    for _ in range(7):
        x = x + (tasks["f"] - x @ A.T) / 2.0
    torch.testing.assert_close(result.x, x)
    zero = jacobi(A, tasks["f"], tol=None, max_iterations=0)
    assert zero.history.shape == (64, 1) and bool((zero.x == 0).all())


def test_converged_instances_stop_at_their_own_iterate(poisson):
    A, tasks = poisson
    x0 = tasks["solution"].clone()
    x0[1:] = 0.0
    result = jacobi(A, tasks["f"], x0, tol=1e-6, max_iterations=5000, reference=tasks["solution"])
    assert int(result.iterations[0]) == 0
    torch.testing.assert_close(result.x[0], tasks["solution"][0])


@pytest.mark.parametrize("tol", [None, 1e-3])
def test_gradcheck_through_jacobi(tol):
    torch.manual_seed(0)
    A = torch.from_numpy(closed_form_matrix(5)) + torch.eye(5, dtype=torch.float64)
    b = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    x0 = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)

    def solve(b, x0):
        result = jacobi(A, b, x0, tol=tol, max_iterations=6, block_size=4)
        return result.x, result.history

    assert torch.autograd.gradcheck(solve, (b, x0))


def test_gradcheck_per_instance_matrices():
    torch.manual_seed(1)
    A = (torch.from_numpy(closed_form_matrix(4)) + torch.eye(4, dtype=torch.float64)).expand(
        2, 4, 4
    )
    A = A.clone().requires_grad_(True)
    b = torch.randn(2, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda A: jacobi(A, b, tol=None, max_iterations=3).history, (A,)
    )


def test_a_sparse_batch_of_different_matrices_matches_dense_and_gradcheck():
    generator = torch.Generator().manual_seed(2)
    scales = torch.rand(5, 1, 1, dtype=torch.float64, generator=generator) + 0.5
    A = (torch.from_numpy(closed_form_matrix(8)) + torch.eye(8, dtype=torch.float64)) * scales
    b = torch.randn(5, 8, dtype=torch.float64, generator=generator)
    sparse = jacobi(SparseBatch.from_dense(A), b, tol=1e-9, max_iterations=400)
    dense = jacobi(A, b, tol=1e-9, max_iterations=400)
    assert torch.equal(sparse.iterations, dense.iterations)
    torch.testing.assert_close(sparse.history, dense.history)
    x0 = torch.randn(5, 8, dtype=torch.float64, generator=generator, requires_grad=True)
    batch = SparseBatch.from_dense(A)
    assert torch.autograd.gradcheck(
        lambda x0: jacobi(batch, b, x0, tol=1e-3, max_iterations=50).history, (x0,)
    )
    with pytest.raises(ValueError, match="expected"):
        jacobi(batch, b[:3], tol=1e-6, max_iterations=10)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda A, b, x0: (A[:3], b, x0), "shape"),
        (lambda A, b, x0: (A, b[:, :5], x0), "shape"),
        (lambda A, b, x0: (A, b, x0[:2]), "x0 has shape"),
        (lambda A, b, x0: (A, b[0], x0), "batch, N"),
        (lambda A, b, x0: (A, b.index_fill(1, torch.tensor([0]), float("nan")), x0), "NaN"),
        (lambda A, b, x0: (A - torch.diag(torch.diag(A)), b, x0), "zero on its diagonal"),
    ],
)
def test_bad_input_is_rejected(poisson, change, message):
    A, tasks = poisson
    b = tasks["f"][:4]
    A2, b2, x02 = change(A, b, torch.zeros_like(b))
    with pytest.raises(ValueError, match=message):
        jacobi(A2, b2, x02, tol=1e-6, max_iterations=10)


def test_nan_in_a_sparse_matrix_is_rejected(poisson):
    A, tasks = poisson
    broken = A.clone()
    broken[3, 4] = float("nan")
    with pytest.raises(ValueError, match="A contains NaN"):
        jacobi(broken.to_sparse(), tasks["f"], tol=1e-6, max_iterations=10)
    with pytest.raises(TypeError, match=r"A must be a torch\.Tensor"):
        jacobi(A.numpy(), tasks["f"], tol=1e-6, max_iterations=10)


@pytest.mark.parametrize("tol", [0.0, -1e-6, float("nan"), float("inf")])
def test_non_positive_tolerance_is_rejected(poisson, tol):
    A, tasks = poisson
    with pytest.raises(ValueError, match="tolerance must be a positive"):
        jacobi(A, tasks["f"], tol=tol, max_iterations=10)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu(poisson):
    A, tasks = poisson
    cpu = jacobi(A, tasks["f"], tol=1e-6, max_iterations=5000, reference=tasks["solution"])
    gpu = jacobi(
        A, tasks["f"], tol=1e-6, max_iterations=5000, reference=tasks["solution"], device="cuda"
    )
    assert gpu.x.is_cuda
    torch.testing.assert_close(gpu.iterations.cpu(), cpu.iterations)
    torch.testing.assert_close(gpu.x.cpu(), cpu.x)
