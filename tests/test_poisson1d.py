import numpy as np
import pytest
import torch

from femeta._fenics import has_dolfinx
from femeta.problems.poisson1d import Poisson1D, assemble_poisson_matrix, closed_form_matrix
from femeta.solvers import jacobi


@pytest.mark.skipif(not has_dolfinx(), reason="needs DOLFINx")
@pytest.mark.parametrize("n", [3, 16, 31])
def test_dolfinx_matrix_equals_closed_form(n):
    np.testing.assert_allclose(assemble_poisson_matrix(n), closed_form_matrix(n), atol=1e-12)


def test_eigenpairs_of_lemma_b1():
    problem = Poisson1D(16)
    A = torch.from_numpy(closed_form_matrix(16))
    torch.testing.assert_close(A @ problem.eigenvectors, problem.eigenvectors * problem.eigenvalues)


def test_tasks_solve_their_system():
    problem = Poisson1D(16, p=0.5)
    tasks = problem.sample(50, seed=1)
    A = torch.from_numpy(closed_form_matrix(16))
    torch.testing.assert_close(tasks["solution"] @ A.T, tasks["f"])


def test_sampling_is_deterministic_and_splits_differ():
    problem = Poisson1D(16, p=0.01)
    first, again = problem.split("train", 7), problem.split("train", 7)
    torch.testing.assert_close(first["f"], again["f"])
    test = problem.split("test", 7)
    assert len(first) == len(test) == 1000
    assert not torch.allclose(first["f"], test["f"])


def test_mixture_weight_selects_the_hard_distribution():
    assert not Poisson1D(16, p=0.0).sample(500, seed=0)["hard"].any()
    assert Poisson1D(16, p=1.0).sample(500, seed=0)["hard"].all()
    hard = Poisson1D(16, p=0.3).sample(4000, seed=0)["hard"].double().mean()
    assert abs(float(hard) - 0.3) < 0.03
    # P2 gives no weight to the lowest and highest modes, P1 gives them the most.
    easy = Poisson1D(16, p=0.0)
    assert float(easy.std_easy[0]) == float(easy.std_easy[-1]) == 0.0
    assert float(easy.std_hard[0]) == float(easy.std_hard.max()) == 1.0


@pytest.mark.parametrize(("p", "paper"), [(0.0, 158.41), (0.01, 164.41)])
def test_baseline_iterations_match_the_paper(p, paper):
    """Psi_base (x0 = 0) needs no training: Table 3 within sampling error."""
    problem = Poisson1D(16, p=p)
    tasks = problem.split("test", 0)
    A = torch.from_numpy(closed_form_matrix(16))
    result = jacobi(A, tasks["f"], tol=1e-6, max_iterations=5000, reference=tasks["solution"])
    iterations = result.iterations.double()
    standard_error = float(iterations.std()) / np.sqrt(len(iterations))
    assert abs(float(iterations.mean()) - paper) < 4 * standard_error + 1


@pytest.mark.parametrize("kwargs", [{"n": 1}, {"n": 16.0}, {"p": -0.1}, {"p": 1.5}])
def test_bad_parameters_are_rejected(kwargs):
    with pytest.raises(ValueError):
        Poisson1D(**kwargs)


def test_unknown_split_is_rejected():
    with pytest.raises(ValueError, match="unknown split"):
        Poisson1D().split("holdout", 0)
