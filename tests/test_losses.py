import pytest
import torch

from femeta.losses import error_after_m, iteration_surrogate
from femeta.problems.poisson1d import Poisson1D, closed_form_matrix
from femeta.solvers import SolverResult, jacobi


@pytest.fixture(scope="module")
def setup():
    tasks = Poisson1D(16, p=0.3).sample(32, seed=0)
    return torch.from_numpy(closed_form_matrix(16)), tasks


def test_error_after_m_is_the_squared_relative_error(setup):
    A, tasks = setup
    x0 = 0.05 * torch.ones_like(tasks["f"])
    result = jacobi(A, tasks["f"], x0, tol=None, max_iterations=5, reference=tasks["solution"])
    u = tasks["solution"]
    expected = ((result.x - u).norm(dim=1) / u.norm(dim=1)) ** 2
    torch.testing.assert_close(error_after_m(result), expected)


def test_surrogate_counts_iterations_for_a_large_gain(setup):
    A, tasks = setup
    result = jacobi(A, tasks["f"], tol=1e-6, max_iterations=2000, reference=tasks["solution"])
    surrogate = iteration_surrogate(result, 1e-6, gain=200.0)
    # Only the last counted iterate can sit close to eps; all others are far above it.
    assert bool(((result.iterations - surrogate).abs() <= 1.0).all())
    assert bool((surrogate <= result.iterations).all())


def test_surrogate_of_an_unconverged_solve_counts_every_step(setup):
    A, tasks = setup
    result = jacobi(A, tasks["f"], tol=1e-12, max_iterations=10, reference=tasks["solution"])
    torch.testing.assert_close(
        iteration_surrogate(result, 1e-12, gain=50.0), torch.full((32,), 10.0, dtype=torch.float64)
    )


def test_gradient_reaches_the_initial_guess(setup):
    A, tasks = setup
    x0 = torch.zeros_like(tasks["f"], requires_grad=True)
    result = jacobi(A, tasks["f"], x0, tol=1e-6, max_iterations=2000, reference=tasks["solution"])
    iteration_surrogate(result, 1e-6).sum().backward()
    assert x0.grad is not None and bool(torch.isfinite(x0.grad).all())
    assert float(x0.grad.abs().sum()) > 0
    # A step against the gradient lowers the surrogate.
    with torch.no_grad():
        before = iteration_surrogate(result, 1e-6).sum()
        stepped = x0 - 1e-3 * x0.grad / x0.grad.norm()
        after = iteration_surrogate(
            jacobi(
                A, tasks["f"], stepped, tol=1e-6, max_iterations=2000, reference=tasks["solution"]
            ),
            1e-6,
        ).sum()
    assert after < before


def test_surrogate_is_finite_when_an_instance_starts_converged():
    result = SolverResult(
        x=torch.zeros(2, 3),
        iterations=torch.tensor([0, 2]),
        history=torch.tensor([[1e-9, 0.0, 0.0], [1.0, 1e-3, 1e-9]], dtype=torch.float64),
        converged=torch.tensor([True, True]),
    )
    value = iteration_surrogate(result, 1e-6)
    assert float(value[0]) == 0.0 and 1.0 < float(value[1]) < 2.0


def test_surrogate_is_equation_10_on_the_counted_steps_only():
    # Ragged histories, zero-padded: the padding must add nothing, value or gradient.
    history = torch.tensor(
        [[1.0, 1e-2, 1e-5, 1e-7, 0.0], [3.0, 2.0, 1.0, 0.5, 0.2], [1e-7, 0.0, 0.0, 0.0, 0.0]],
        dtype=torch.float64,
        requires_grad=True,
    )
    iterations = torch.tensor([3, 4, 0])
    result = SolverResult(torch.zeros(3, 2), iterations, history, iterations < 4)
    tol, gain = 1e-6, 0.7
    value = iteration_surrogate(result, tol, gain)
    expected = [
        sum(
            torch.sigmoid(gain * torch.log(history.detach()[i, k] / tol)) for k in range(int(count))
        )
        for i, count in enumerate(iterations)
    ]
    torch.testing.assert_close(
        value, torch.tensor([float(e) for e in expected], dtype=torch.float64)
    )
    value.sum().backward()
    counted = torch.arange(5)[None, :] < iterations[:, None]
    assert bool((history.grad[~counted] == 0).all())
    assert bool((history.grad[counted] != 0).all())


@pytest.mark.parametrize(("tol", "gain"), [(0.0, 1.0), (-1.0, 1.0), (1e-6, 0.0)])
def test_surrogate_rejects_bad_parameters(setup, tol, gain):
    A, tasks = setup
    result = jacobi(A, tasks["f"], tol=None, max_iterations=2)
    with pytest.raises(ValueError):
        iteration_surrogate(result, tol, gain)
