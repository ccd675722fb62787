"""Newton-SOR: a known solution, an independent numpy loop, gradients, divergence, bad input."""

import numpy as np
import pytest
import torch

from femeta.losses import iteration_surrogate
from femeta.problems.robertson import Robertson, backward_euler_system
from femeta.solvers.newton_sor import newton_sor


@pytest.fixture(scope="module")
def steps():
    """300 Robertson tasks (3 parameter sets)."""
    return Robertson(split_sizes={"train": 3, "validation": 1, "test": 1}).split("train", 5)


def robertson_system(tasks):
    return lambda y, rows: backward_euler_system(
        tasks["c"][rows], tasks["h"][rows], tasks["y_prev"][rows], y
    )


def numpy_newton_sor(c, h, y_prev, y, r, tol, cap):
    """One task, written out from equations (45)-(46) with numpy."""
    c1, c2, c3 = c
    for k in range(cap + 1):
        y1, y2, y3 = y
        f = np.array([-c1 * y1 + c3 * y2 * y3, c1 * y1 - c2 * y2**2 - c3 * y2 * y3, c2 * y2**2])
        g = y - h * f - y_prev
        if np.linalg.norm(g) <= tol:
            return k, y
        if k == cap:
            return cap, y
        dfdy = np.array([[-c1, c3 * y3, c3 * y2], [c1, -2 * c2 * y2 - c3 * y3, -c3 * y2],
                         [0.0, 2 * c2 * y2, 0.0]])  # fmt: skip
        jacobian = np.eye(3) - h * dfdy
        diagonal = np.diag(np.diag(jacobian))
        strictly_lower = -np.tril(jacobian, -1)  # J = D - L - U
        y = y - r * np.linalg.solve(diagonal - r * strictly_lower, g)


def test_linear_system_converges_to_its_solution():
    """For g(y) = A y - b, Newton-SOR is SOR; it must reach A^{-1} b."""
    generator = torch.Generator().manual_seed(0)
    m = torch.rand(4, 5, 5, generator=generator, dtype=torch.float64)
    A = m @ m.transpose(1, 2) + 5 * torch.eye(5, dtype=torch.float64)
    b = torch.rand(4, 5, generator=generator, dtype=torch.float64)

    def system(y, rows):
        return (A[rows] @ y[..., None])[..., 0] - b[rows], A[rows]

    result = newton_sor(system, torch.zeros_like(b), 1.3, tol=1e-12, max_iterations=500)
    assert bool(result.converged.all())
    torch.testing.assert_close(result.x, torch.linalg.solve(A, b), atol=1e-11, rtol=0)


@pytest.mark.parametrize("r", [1.0, 1.2, 1.37])
def test_iterations_match_an_independent_numpy_loop(steps, r):
    result = newton_sor(robertson_system(steps), steps["y_prev"], r, tol=1e-9, max_iterations=3000)
    for i in range(0, len(steps), 3):
        count, y = numpy_newton_sor(steps["c"][i].numpy(), steps["h"][i].item(),
                                    steps["y_prev"][i].numpy(), steps["y_prev"][i].numpy(), r,
                                    1e-9, 3000)  # fmt: skip
        assert int(result.iterations[i]) == count, i
        np.testing.assert_allclose(result.x[i].numpy(), y, rtol=1e-12, atol=1e-15)
    assert bool(result.converged.all())
    # The history is ||g|| at every iterate, zero after the stop.
    counts = result.iterations
    assert bool((result.history.gather(1, counts[:, None])[:, 0] <= 1e-9).all())
    after = torch.arange(result.history.shape[1])[None, :] > counts[:, None]
    assert bool((result.history[after] == 0).all())


def test_fixed_count_gradients_match_finite_differences(steps):
    # y0 = y_n exp(s), as Psi_ini makes it: a step in s is relative, which suits y2 ~ 1e-6.
    tasks = steps.subset(torch.arange(1, 300, 37))
    system = robertson_system(tasks)
    s = torch.full_like(tasks["y_prev"], 0.01, requires_grad=True)
    r = torch.full((len(tasks),), 1.2, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(
        lambda s, r: (
            newton_sor(system, tasks["y_prev"] * s.exp(), r, tol=None, max_iterations=4).final_error
        ),
        (s, r),
        eps=1e-7,
        atol=1e-8,
        rtol=1e-4,
    )


def test_surrogate_gradient_matches_finite_differences(steps):
    """d L~ / d r against central differences, per task.

    L~ is smooth only while the iteration count stays put, so tasks whose count
    changes under the step are skipped (and most must remain). The derivative in
    y0 is checked by the fixed-count gradcheck above: in y0 these stiff steps
    reach 1e8, where central differences lose their digits.
    """
    tasks = steps.subset(torch.arange(5, 300, 13))
    system = robertson_system(tasks)

    def surrogate(r):
        result = newton_sor(system, tasks["y_prev"], r, tol=1e-9, max_iterations=2000)
        return result.iterations, iteration_surrogate(result, 1e-9)

    r = torch.full((len(tasks),), 1.15, dtype=torch.float64, requires_grad=True)
    counts, value = surrogate(r)
    value.sum().backward()
    step = 1e-6
    with torch.no_grad():
        counts_plus, plus = surrogate(r + step)
        counts_minus, minus = surrogate(r - step)
    same = (counts_plus == counts) & (counts_minus == counts)
    assert int(same.sum()) >= 0.8 * len(tasks)
    torch.testing.assert_close(
        r.grad[same], ((plus - minus) / (2 * step))[same], rtol=5e-3, atol=1e-4
    )


def test_diverged_instances_count_as_the_cap_with_finite_gradients(steps):
    tasks = steps.subset(slice(0, 300))
    r = torch.full((len(tasks),), 1.9, dtype=torch.float64, requires_grad=True)
    result = newton_sor(robertson_system(tasks), tasks["y_prev"], r, tol=1e-9, max_iterations=400)
    failed = ~result.converged
    assert bool(failed.any()) and bool(result.converged.any())
    assert bool((result.iterations[failed] == 400).all())
    assert result.history.shape[1] == 401 and bool(torch.isfinite(result.history).all())
    iteration_surrogate(result, 1e-9).sum().backward()
    assert bool(torch.isfinite(r.grad).all())


def test_unconverged_instances_pass_no_derivative(steps):
    """At r = 1.5, some of these steps neither converge nor diverge in 2000 iterations.

    The derivative through their history overflows to NaN; they must pass none, and
    the converged instances must get the gradient they get when solved alone.
    """
    r = torch.full((len(steps),), 1.5, dtype=torch.float64, requires_grad=True)
    y0 = steps["y_prev"].clone().requires_grad_()
    result = newton_sor(robertson_system(steps), y0, r, tol=1e-9, max_iterations=2000)
    iteration_surrogate(result, 1e-9).sum().backward()
    stuck = ~result.converged
    assert int(stuck.sum()) >= 5 and bool((result.iterations[stuck] == 2000).all())
    assert bool((r.grad[stuck] == 0).all()) and bool((y0.grad[stuck] == 0).all())

    alone = steps.subset(result.converged.nonzero()[:, 0])
    r_alone = r.detach()[result.converged].requires_grad_()
    y0_alone = alone["y_prev"].clone().requires_grad_()
    solo = newton_sor(robertson_system(alone), y0_alone, r_alone, tol=1e-9, max_iterations=2000)
    assert bool(solo.converged.all())
    iteration_surrogate(solo, 1e-9).sum().backward()
    torch.testing.assert_close(r.grad[result.converged], r_alone.grad, rtol=1e-12, atol=0)
    torch.testing.assert_close(y0.grad[result.converged], y0_alone.grad, rtol=1e-12, atol=0)


def test_zero_iterations_and_a_converged_start(steps):
    tasks = steps.subset(slice(0, 10))
    result = newton_sor(robertson_system(tasks), tasks["solution"], 1.0, tol=1e-9, max_iterations=0)
    assert bool(result.converged.all()) and result.history.shape == (10, 1)
    assert bool((result.iterations == 0).all())


@pytest.mark.parametrize(
    "relaxation, message",
    [(0.0, r"\(0, 2\]"), (2.5, r"\(0, 2\]"), (float("nan"), "NaN"), (torch.ones(3), "shape")],
)
def test_bad_relaxation_is_rejected(steps, relaxation, message):
    tasks = steps.subset(slice(0, 10))
    with pytest.raises(ValueError, match=message):
        newton_sor(robertson_system(tasks), tasks["y_prev"], relaxation, tol=1e-9, max_iterations=5)


def test_bad_initial_guess_is_rejected(steps):
    tasks = steps.subset(slice(0, 10))
    y0 = tasks["y_prev"].clone()
    y0[3, 1] = float("nan")
    with pytest.raises(ValueError, match="y0 contains NaN"):
        newton_sor(robertson_system(tasks), y0, 1.2, tol=1e-9, max_iterations=5)
    with pytest.raises(ValueError, match=r"\(B, n\)"):
        newton_sor(robertson_system(tasks), y0[0], 1.2, tol=1e-9, max_iterations=5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu(steps):
    tasks = steps.subset(torch.arange(0, 300, 7))
    outcomes = []
    for device in ("cpu", "cuda"):
        on = tasks.to(device)
        r = torch.full((len(tasks),), 1.15, dtype=torch.float64, device=device, requires_grad=True)
        result = newton_sor(robertson_system(on), on["y_prev"], r, tol=1e-9, max_iterations=2000)
        (grad,) = torch.autograd.grad(iteration_surrogate(result, 1e-9).sum(), r)
        outcomes.append((result, grad))
    (cpu, cpu_grad), (gpu, gpu_grad) = outcomes
    assert gpu.x.is_cuda and bool(cpu.converged.all())
    assert torch.equal(cpu.iterations, gpu.iterations.cpu())
    torch.testing.assert_close(cpu.x, gpu.x.cpu(), rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(cpu_grad, gpu_grad.cpu(), rtol=1e-6, atol=1e-9)
