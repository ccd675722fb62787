"""ICCG(alpha): conventions, agreement with PETSc, the derivative in alpha, bad input."""

from __future__ import annotations

import functools
import importlib

import pytest
import torch

from femeta._fenics import has_dolfinx
from femeta.solvers.iccg import IccgResult, iccg
from femeta.solvers.petsc import petsc_iccg

# The package re-exports the function `iccg`, which hides the submodule attribute.
iccg_module = importlib.import_module("femeta.solvers.iccg")

needs_dolfinx = pytest.mark.skipif(not has_dolfinx(), reason="needs DOLFINx and petsc4py")

# Kershaw's matrix: SPD, yet IC(0) meets a negative pivot without a shift.
KERSHAW = torch.tensor(
    [[3.0, -2.0, 0.0, 2.0], [-2.0, 3.0, -2.0, 0.0], [0.0, -2.0, 3.0, -2.0], [2.0, 0.0, -2.0, 3.0]],
    dtype=torch.float64,
)


@pytest.fixture(autouse=True, params=["auto", "torch"])
def method(request, monkeypatch):
    """Every test runs on both implementations: "auto" is the compiled one on the CPU."""
    solve = functools.partial(iccg_module.iccg, method=request.param)
    monkeypatch.setitem(globals(), "iccg", solve)
    return request.param


@pytest.fixture(autouse=True)
def one_thread():
    """The solver runs many small kernels: on a shared 2-core machine a second intra-op
    thread made it ten times slower (measured), so the tests run on one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def growing_residual() -> tuple[torch.Tensor, torch.Tensor]:
    """A 1D Laplacian scaled over 12 decades (a batch of one): at alpha = 1, CG's
    unpreconditioned residual grows more than 10^4-fold before it falls."""
    n = 40
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    scale = torch.logspace(0, 6, n, dtype=torch.float64)[order]
    laplacian = 2 * torch.eye(n, dtype=torch.float64)
    laplacian -= torch.diag(torch.ones(n - 1, dtype=torch.float64), 1)
    laplacian -= torch.diag(torch.ones(n - 1, dtype=torch.float64), -1)
    A = scale[:, None] * laplacian * scale[None, :]
    return A[None], torch.ones(1, n, dtype=torch.float64)


def random_spd(batch: int, sides: tuple[int, int, int] = (4, 3, 3), seed: int = 0):
    """Weighted 3D grid Laplacians plus a small random diagonal, and right-hand sides."""
    generator = torch.Generator().manual_seed(seed)
    grid = torch.arange(sides[0] * sides[1] * sides[2]).reshape(sides)
    edges = torch.cat(
        [
            torch.stack(
                [grid.narrow(axis, 0, sides[axis] - 1), grid.narrow(axis, 1, sides[axis] - 1)]
            ).reshape(2, -1)
            for axis in range(3)
        ],
        dim=1,
    )
    n = grid.numel()
    weights = torch.rand(batch, edges.shape[1], generator=generator, dtype=torch.float64) * 10 + 0.1
    A = torch.zeros(batch, n, n, dtype=torch.float64)
    i, j = edges
    A[:, i, j] = -weights
    A[:, j, i] = -weights
    A -= torch.diag_embed(A.sum(dim=-1))
    A += torch.diag_embed(torch.rand(batch, n, generator=generator, dtype=torch.float64) * 0.1)
    b = torch.randn(batch, n, generator=generator, dtype=torch.float64)
    return A, b


@pytest.fixture(scope="module")
def beams():
    from femeta.problems.elasticity import ElasticBeam

    tasks = ElasticBeam(cache=False).sample(24, seed=2024)
    return tasks["A"].to_dense(), tasks["b"], tasks["params"][:, 0]


@pytest.fixture(scope="module")
def stored():
    from femeta.problems.elasticity import ElasticBeam

    return ElasticBeam(cache=False).stored_pattern()


def test_converges_to_the_solution():
    A, b = random_spd(5)
    result = iccg(A, b, torch.full((5,), 0.1), tol=1e-10, max_iterations=100)
    assert isinstance(result, IccgResult)
    assert bool(result.converged.all()) and not bool(result.factorization_failed.any())
    torch.testing.assert_close(result.x, torch.linalg.solve(A, b), rtol=1e-8, atol=1e-8)
    assert bool((result.final_error <= 1e-10).all())
    true_residual = torch.linalg.vector_norm(b - (A @ result.x[..., None])[..., 0], dim=-1)
    torch.testing.assert_close(
        true_residual / b.norm(dim=-1), result.final_error, rtol=1e-2, atol=1e-13
    )


def test_history_conventions():
    A, b = random_spd(6)
    result = iccg(A, b, torch.linspace(0.01, 2.0, 6), tol=1e-6, max_iterations=100)
    assert result.history.shape == (6, int(result.iterations.max()) + 1)
    assert torch.equal(result.history[:, 0], torch.ones(6, dtype=torch.float64))
    steps = torch.arange(result.history.shape[1])
    after = steps[None] > result.iterations[:, None]
    assert bool((result.history[after] == 0).all())
    assert bool((result.history[~after] > 0).all())
    assert bool((result.final_error <= 1e-6).all())
    earlier = steps[None] < result.iterations[:, None]
    assert bool((result.history[earlier] > 1e-6).all())


def test_fixed_iteration_count():
    A, b = random_spd(3)
    result = iccg(A, b, 0.5, tol=None, max_iterations=7)
    assert result.iterations.tolist() == [7, 7, 7]
    assert result.history.shape == (3, 8)
    assert not bool(result.converged.any())
    none = iccg(A, b, 0.5, tol=None, max_iterations=0)
    assert none.iterations.tolist() == [0, 0, 0] and none.history.shape == (3, 1)
    assert torch.equal(none.x, torch.zeros_like(b))


def test_chunks_slots_and_compaction_do_not_change_results(monkeypatch, method):
    """Chunks of the torch implementation; for the compiled one, 2 slots per thread, so
    slots are refilled as tasks stop, and compacted once none are left."""
    A, b = random_spd(7, seed=3)
    alpha = torch.logspace(-3, 1, 7, dtype=torch.float64, requires_grad=True)
    whole = iccg(A, b, alpha, tol=1e-9, max_iterations=60)
    (whole_grad,) = torch.autograd.grad(whole.history.sum() + whole.x.sum(), alpha)
    monkeypatch.setattr(iccg_module, "_CPU_CHUNK", 2)
    monkeypatch.setattr(iccg_module, "_SLOTS", 2)
    split = iccg(A, b, alpha, tol=1e-9, max_iterations=60)
    (split_grad,) = torch.autograd.grad(split.history.sum() + split.x.sum(), alpha)
    assert len(set(whole.iterations.tolist())) > 3  # the tasks stop at different iterations
    assert torch.equal(whole.iterations, split.iterations)
    torch.testing.assert_close(whole.history, split.history, rtol=1e-10, atol=1e-15)
    torch.testing.assert_close(whole.x, split.x, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(whole_grad, split_grad, rtol=1e-9, atol=1e-12)


def test_failed_factorization_is_masked():
    A = KERSHAW.expand(3, 4, 4).clone()
    b = torch.ones(3, 4, dtype=torch.float64)
    alpha = torch.tensor([1e-3, 0.5, 1e-2], dtype=torch.float64, requires_grad=True)
    result = iccg(A, b, alpha, tol=1e-8, max_iterations=20)
    assert result.factorization_failed.tolist() == [True, False, True]
    assert result.iterations.tolist()[::2] == [20, 20]
    assert not bool(result.converged[::2].any()) and bool(result.converged[1])
    assert torch.equal(result.x[::2], torch.zeros(2, 4, dtype=torch.float64))
    assert torch.equal(result.history[::2], torch.ones(2, 21, dtype=torch.float64))
    (grad,) = torch.autograd.grad((result.history.sum() + result.x.sum()), alpha)
    assert bool(torch.isfinite(grad).all()) and grad[0] == 0 and grad[2] == 0


def surrogate(result: IccgResult, tol: float) -> torch.Tensor:
    """A smooth stand-in for the iteration count: sum of sigmoid(log(r_k / tol)) up to the stop."""
    steps = torch.arange(result.history.shape[1])
    running = steps[None] <= result.iterations[:, None]
    terms = torch.sigmoid(torch.log(result.history.clamp_min(1e-300) / tol))
    return (terms * running).sum(dim=1)


# Central differences in alpha: CG's late residuals round differently for every alpha, so a
# step of 1e-6 left up to 4e-4 of rounding noise in the quotient; at 1e-4 the noise and the
# truncation error stayed below 1e-5 on these systems (measured over four seeds).
RELATIVE_STEP = 1e-4


def finite_difference(function, alpha: torch.Tensor) -> torch.Tensor:
    step = alpha * RELATIVE_STEP
    with torch.no_grad():
        return (function(alpha + step) - function(alpha - step)) / (2 * step)


def test_gradient_of_the_surrogate_matches_finite_differences():
    A, b = random_spd(4, seed=5)
    tol, cap = 1e-6, 60

    def loss(alpha):
        return surrogate(iccg(A, b, alpha, tol=tol, max_iterations=cap), tol)

    alpha = torch.tensor([0.02, 0.1, 0.5, 2.0], dtype=torch.float64, requires_grad=True)
    iterations = iccg(A, b, alpha.detach(), tol=tol, max_iterations=cap).iterations
    for shifted in (alpha.detach() * (1 + RELATIVE_STEP), alpha.detach() * (1 - RELATIVE_STEP)):
        assert torch.equal(iccg(A, b, shifted, tol=tol, max_iterations=cap).iterations, iterations)
    (grad,) = torch.autograd.grad(loss(alpha).sum(), alpha)
    assert bool((grad != 0).all())
    torch.testing.assert_close(grad, finite_difference(loss, alpha.detach()), rtol=1e-5, atol=0)


def test_gradient_of_the_solution_matches_finite_differences():
    A, b = random_spd(3, seed=6)

    def loss(alpha):
        result = iccg(A, b, alpha, tol=None, max_iterations=6)
        return (result.x**2).sum(dim=1) + result.history[:, -1]

    alpha = torch.tensor([0.05, 0.3, 1.5], dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(loss(alpha).sum(), alpha)
    torch.testing.assert_close(grad, finite_difference(loss, alpha.detach()), rtol=1e-5, atol=0)


def test_scalar_alpha_is_broadcast_and_differentiable():
    A, b = random_spd(2)
    alpha = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    result = iccg(A, b, alpha, tol=None, max_iterations=5)
    (grad,) = torch.autograd.grad(result.history[:, -1].sum(), alpha)
    assert grad.shape == () and torch.isfinite(grad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    A, b = random_spd(5)
    alpha = torch.linspace(0.01, 1.0, 5, dtype=torch.float64)
    cpu = iccg(A, b, alpha, tol=1e-8, max_iterations=80)
    gpu = iccg(A.cuda(), b.cuda(), alpha.cuda(), tol=1e-8, max_iterations=80)
    assert torch.equal(cpu.iterations, gpu.iterations.cpu())
    torch.testing.assert_close(cpu.x, gpu.x.cpu(), rtol=1e-9, atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_derivative_pattern_and_failure_match_cpu():
    A, b = random_spd(4)
    wider = (A != 0) | torch.eye(A.shape[-1], dtype=torch.bool).roll(2, 0)
    wider = wider | wider.mT
    A = torch.cat([A, torch.nn.functional.pad(KERSHAW, (0, 32, 0, 32))[None]])
    A[-1, 4:, 4:] += torch.eye(32, dtype=torch.float64)
    b = torch.cat([b, torch.ones(1, 36, dtype=torch.float64)])
    pattern = torch.cat([wider, (A[-1:] != 0)])
    outcomes = []
    for device in ("cpu", "cuda"):
        alpha = torch.tensor([0.01, 0.1, 0.5, 1.0, 0.01], device=device, requires_grad=True)
        args = (A.to(device), b.to(device), alpha)
        result = iccg(*args, tol=1e-8, max_iterations=60, pattern=pattern.to(device))
        (grad,) = torch.autograd.grad(result.history.sum(), alpha)
        outcomes.append((result, grad))
    (cpu, cpu_grad), (gpu, gpu_grad) = outcomes
    assert cpu.factorization_failed.tolist() == [False] * 4 + [True]
    assert torch.equal(cpu.factorization_failed, gpu.factorization_failed.cpu())
    assert torch.equal(cpu.iterations, gpu.iterations.cpu())
    torch.testing.assert_close(cpu.x, gpu.x.cpu(), rtol=1e-9, atol=1e-12)
    assert bool(cpu_grad[:4].abs().gt(0).all())
    torch.testing.assert_close(cpu_grad, gpu_grad.cpu(), rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("alpha", [0.0, -0.1, float("nan"), float("inf")])
def test_bad_alpha_is_rejected(alpha):
    A, b = random_spd(2)
    with pytest.raises(ValueError, match="alpha must be positive and finite"):
        iccg(A, b, torch.tensor([0.1, alpha]), tol=1e-6, max_iterations=10)


def test_bad_input_is_rejected():
    A, b = random_spd(2)
    with pytest.raises(ValueError, match="alpha must be a scalar or have shape"):
        iccg(A, b, torch.ones(3), tol=1e-6, max_iterations=10)
    with pytest.raises(ValueError, match="A must be dense with shape"):
        iccg(A[0], b, 0.1, tol=1e-6, max_iterations=10)
    with pytest.raises(ValueError, match="zero right-hand side"):
        iccg(A, torch.zeros_like(b), 0.1, tol=1e-6, max_iterations=10)
    with pytest.raises(ValueError, match="A contains NaN"):
        iccg(A.clone().fill_(float("nan")), b, 0.1, tol=1e-6, max_iterations=10)
    with pytest.raises(ValueError, match="tolerance"):
        iccg(A, b, 0.1, tol=-1.0, max_iterations=10)
    with pytest.raises(ValueError, match="max_iterations"):
        iccg(A, b, 0.1, tol=1e-6, max_iterations=-1)
    with pytest.raises(ValueError, match="x0"):
        iccg(A, b, 0.1, torch.zeros(3), tol=1e-6, max_iterations=10)


def test_a_pattern_keeps_entries_that_are_zero_in_A():
    """Kershaw's IC(0) fails on its nonzeros; on the full pattern it is the exact Cholesky."""
    A = KERSHAW.expand(2, 4, 4).clone()
    b = torch.ones(2, 4, dtype=torch.float64)
    full = torch.ones(4, 4, dtype=torch.bool)
    assert bool(iccg(A, b, 1e-3, tol=1e-8, max_iterations=20).factorization_failed.all())
    result = iccg(A, b, 1e-3, tol=1e-8, max_iterations=20, pattern=full)
    assert not bool(result.factorization_failed.any()) and bool(result.converged.all())
    assert torch.equal(iccg(A, b, 1e-3, tol=1e-8, max_iterations=20, pattern=A != 0).iterations,
                       iccg(A, b, 1e-3, tol=1e-8, max_iterations=20).iterations)  # fmt: skip


def test_bad_pattern_is_rejected():
    A, b = random_spd(2)
    nonzero = A != 0
    cases = {
        "boolean torch.Tensor": nonzero.double(),
        "pattern must have shape": nonzero[:, :5],
        "must be symmetric": nonzero[0] | torch.eye(36, dtype=torch.bool).roll(1, dims=1),
        r"A\[0\] has a nonzero at \(0, 1\) outside pattern": torch.eye(36, dtype=torch.bool),
    }
    for message, pattern in cases.items():
        with pytest.raises((TypeError, ValueError), match=message):
            iccg(A, b, 0.1, tol=1e-6, max_iterations=10, pattern=pattern)


@pytest.mark.dolfinx
@needs_dolfinx
def test_petsc_keeps_the_pattern_with_explicit_zeros():
    A = KERSHAW.expand(2, 4, 4).clone()
    b = torch.ones(2, 4, dtype=torch.float64)
    full = torch.ones(4, 4, dtype=torch.bool)
    ours = iccg(A, b, 1e-3, tol=1e-8, max_iterations=20, pattern=full)
    reference = petsc_iccg(A, b, 1e-3, tol=1e-8, max_iterations=20, pattern=full)
    assert not bool(reference.factorization_failed.any())
    assert torch.equal(ours.iterations, reference.iterations)


@pytest.mark.dolfinx
@needs_dolfinx
def test_kershaw_failure_agrees_with_petsc():
    A = KERSHAW.expand(2, 4, 4).clone()
    b = torch.ones(2, 4, dtype=torch.float64)
    for alpha in (1e-3, 0.5):
        ours = iccg(A, b, alpha, tol=1e-8, max_iterations=20)
        reference = petsc_iccg(A, b, alpha, tol=1e-8, max_iterations=20)
        assert torch.equal(ours.factorization_failed, reference.factorization_failed)
        assert torch.equal(ours.iterations, reference.iterations)


@pytest.mark.dolfinx
@needs_dolfinx
@pytest.mark.parametrize("alpha", [0.003, 0.05, 0.5])
def test_iterations_match_petsc_on_beams(beams, alpha):
    A, b, width = beams
    ours = iccg(A, b, alpha, tol=1e-6, max_iterations=243)
    reference = petsc_iccg(A, b, alpha, tol=1e-6, max_iterations=243)
    assert torch.equal(ours.factorization_failed, reference.factorization_failed)
    solved = ~ours.factorization_failed
    difference = (ours.iterations - reference.iterations).abs()[solved]
    stocky = width[solved] >= 0.1
    # Stocky beams are well conditioned (cond(A) <~ 1e5): rounding moves CG by at most one step.
    assert int(difference[stocky].max()) <= 1
    # Slender ones reach cond(A) ~ 1e9, where CG's rounding alone moves the count by a few
    # percent (measured up to 7% on single tasks), but not on average.
    allowed = torch.clamp(0.1 * reference.iterations[solved], min=4)
    assert bool((difference <= allowed).all())
    ours_mean = ours.iterations[solved].double().mean()
    assert float(ours_mean / reference.iterations[solved].double().mean()) == pytest.approx(
        1, abs=0.05
    )
    # Same preconditioner: the first residuals agree to many digits.
    torch.testing.assert_close(ours.history[:, :6], reference.history[:, :6], rtol=1e-7, atol=0)


@pytest.mark.dolfinx
@needs_dolfinx
@pytest.mark.parametrize("alpha", [0.003, 0.05])
def test_iterations_match_petsc_on_beams_with_the_stored_pattern(beams, stored, alpha):
    A, b, width = beams
    ours = iccg(A, b, alpha, tol=1e-6, max_iterations=243, pattern=stored)
    reference = petsc_iccg(A, b, alpha, tol=1e-6, max_iterations=243, pattern=stored)
    assert torch.equal(ours.factorization_failed, reference.factorization_failed)
    solved = ~ours.factorization_failed
    difference = (ours.iterations - reference.iterations).abs()[solved]
    assert int(difference[width[solved] >= 0.1].max()) <= 1
    assert bool((difference <= torch.clamp(0.1 * reference.iterations[solved], min=4)).all())
    torch.testing.assert_close(ours.history[:, :6], reference.history[:, :6], rtol=1e-7, atol=0)


@pytest.mark.dolfinx
@needs_dolfinx
def test_petsc_reference_handles_a_batch_of_different_patterns():
    """Task 1 gains an edge, task 2 loses one: each is solved as when alone."""
    A, b = random_spd(3)
    A[1, 0, 5] = A[1, 5, 0] = -0.5  # the Laplacian of a new edge keeps A SPD
    A[1, 0, 0] += 0.5
    A[1, 5, 5] += 0.5
    A[2, 0, 1] = A[2, 1, 0] = 0.0
    alpha = torch.tensor([0.01, 0.02, 0.05], dtype=torch.float64)
    batched = petsc_iccg(A, b, alpha, tol=1e-10, max_iterations=36)
    for task in range(3):
        alone = petsc_iccg(A[task : task + 1], b[task : task + 1], alpha[task : task + 1],
                           tol=1e-10, max_iterations=36)  # fmt: skip
        assert bool(alone.converged.all())
        assert torch.equal(batched.iterations[task : task + 1], alone.iterations)
        width = alone.history.shape[1]
        assert torch.equal(batched.history[task : task + 1, :width], alone.history)
        assert torch.equal(batched.x[task : task + 1], alone.x)
