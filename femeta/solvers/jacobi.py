"""Batched, differentiable Jacobi method: x <- x + D^{-1}(b - A x)."""

from __future__ import annotations

import torch
from torch import Tensor

from femeta.solvers.base import SolverResult, check_finite, check_stopping
from femeta.solvers.sparse import SparseBatch

__all__ = ["jacobi"]


def jacobi(
    A: Tensor | SparseBatch,
    b: Tensor,
    x0: Tensor | None = None,
    *,
    tol: float | None,
    max_iterations: int,
    reference: Tensor | None = None,
    block_size: int = 64,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float64,
) -> SolverResult:
    """Solve a batch of systems ``A x = b`` with the Jacobi method.

    Each instance stops on its own at the first iterate whose error measure is
    ``<= tol`` (the paper's Phi_{eps,m}), or after ``max_iterations``. With
    ``tol=None`` every instance takes exactly ``max_iterations`` steps (Phi_m).
    Differentiable with respect to ``b``, ``x0`` and ``reference``, and to a dense ``A``.

    Args:
        A: One matrix shared by the batch, ``(N, N)`` dense or torch sparse, or
            one matrix per instance: dense ``(B, N, N)``, or a :class:`SparseBatch`
            (matrices sharing a sparsity pattern, ``O(B nnz)`` memory).
        b: Right-hand sides, ``(B, N)``.
        x0: Initial guesses, ``(B, N)``; zero when omitted.
        tol: Tolerance on the error measure, or ``None`` for a fixed count.
        max_iterations: The cap ``m``.
        reference: Exact solutions ``(B, N)``. When given, the error measure is
            the relative error ``||x - x*|| / ||x*||`` (as in paper §2.2.1);
            otherwise the relative residual ``||b - A x|| / ||b||``.
        block_size: For a shared dense matrix, iterates are produced this many
            at a time from precomputed powers of the iteration matrix, which is
            the same method with far fewer kernel launches.
        device: Where to compute; defaults to the device of ``b``.
        dtype: Floating point type of the computation.

    Returns:
        A :class:`SolverResult` whose history is trimmed to the longest run.
    """
    check_stopping(tol, max_iterations)
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    device = torch.device(device) if device is not None else b.device
    b = _as_batch("b", b, device, dtype)
    batch, n = b.shape
    x0 = torch.zeros_like(b) if x0 is None else _as_batch("x0", x0, device, dtype, (batch, n))
    if reference is not None:
        reference = _as_batch("reference", reference, device, dtype, (batch, n))
    if not isinstance(A, Tensor | SparseBatch):
        raise TypeError(f"A must be a torch.Tensor or a SparseBatch, got {type(A).__name__}")
    A = A.to(device=device, dtype=dtype)
    shared = isinstance(A, Tensor) and A.dim() == 2
    if isinstance(A, SparseBatch):
        if A.shape != (batch, n, n):
            raise ValueError(
                f"A has shape {A.shape}; expected {(batch, n, n)} for b of shape {(batch, n)}"
            )
        check_finite("A", A.values)
    elif A.layout == torch.strided:
        expected = (n, n) if shared else (batch, n, n)
        if tuple(A.shape) != expected:
            raise ValueError(
                f"A has shape {tuple(A.shape)}; expected {expected} for b of shape {(batch, n)}"
            )
        check_finite("A", A)
    else:
        if tuple(A.shape) != (n, n):
            raise ValueError(f"sparse A has shape {tuple(A.shape)}; expected {(n, n)}")
        check_finite("A", A.to_sparse_coo().coalesce().values())
    diag = _diagonal(A)
    if bool((diag == 0).any()):
        raise ValueError("A has a zero on its diagonal; the Jacobi method needs a nonzero diagonal")
    if isinstance(A, SparseBatch):
        A = _Rows(A)

    if reference is not None:
        scale = torch.linalg.vector_norm(reference, dim=-1)
        target = reference
    else:
        scale = torch.linalg.vector_norm(b, dim=-1)
        target = b
    if bool((scale == 0).any()):
        raise ValueError(
            "an instance has a zero right-hand side or reference; its relative error is undefined"
        )

    def error(iterates: Tensor, rows: Tensor) -> Tensor:  # (R, s, N) -> (R, s)
        if reference is not None:
            diff = iterates - target[rows, None]
        else:
            diff = _matvec(A, rows)(iterates) - target[rows, None]
        return torch.linalg.vector_norm(diff, dim=-1) / scale[rows, None]

    if shared and A.layout == torch.strided:
        advance = _PowerStepper(A, diag, b, block_size)
    else:
        advance = _SingleStepper(A, diag, b)

    everyone = torch.arange(batch, device=device)
    first_error = error(x0[:, None], everyone)
    history = [first_error]
    iterations = torch.zeros(batch, dtype=torch.long, device=device)
    converged = torch.zeros(batch, dtype=torch.bool, device=device)
    if tol is not None:
        converged = first_error[:, 0] <= tol
    stopped_at = x0
    # Only the instances still running are advanced: the rest are settled.
    active = everyone[~converged]
    x = x0[active]
    k = 0
    while k < max_iterations and active.numel() > 0:
        iterates = advance(x, active, min(advance.block, max_iterations - k))
        errors = error(iterates, active)
        steps = errors.shape[1]
        if tol is not None:
            hit = errors <= tol
            newly = hit.any(dim=1)
            first = torch.where(newly, hit.int().argmax(dim=1), steps)
            position = torch.arange(steps, device=device)
            errors = torch.where(position[None] <= first[:, None], errors, torch.zeros_like(errors))
            done = active[newly]
            chosen = iterates[newly.nonzero().squeeze(1), first[newly]]
            stopped_at = stopped_at.index_copy(0, done, chosen)
            iterations[done] = k + 1 + first[newly]
            converged[done] = True
        history.append(errors.new_zeros(batch, steps).index_copy(0, active, errors))
        k += steps
        if tol is not None:
            active, x = active[~newly], iterates[~newly, -1]
        else:
            x = iterates[:, -1]
    iterations[active] = k
    stopped_at = stopped_at.index_copy(0, active, x)
    longest = int(iterations.max()) + 1 if batch else 1
    return SolverResult(stopped_at, iterations, torch.cat(history, dim=1)[:, :longest], converged)


def _as_batch(
    name: str,
    value: Tensor,
    device: torch.device,
    dtype: torch.dtype,
    shape: tuple[int, int] | None = None,
) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() != 2:
        raise ValueError(f"{name} must have shape (batch, N), got {tuple(value.shape)}")
    if shape is not None and tuple(value.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(value.shape)}; expected {shape}")
    value = value.to(device=device, dtype=dtype)
    check_finite(name, value)
    return value


def _diagonal(A: Tensor | SparseBatch) -> Tensor:
    if isinstance(A, SparseBatch):
        return A.diagonal()
    if A.layout != torch.strided:
        return _sparse_diagonal(A)
    return torch.diagonal(A, dim1=-2, dim2=-1)


def _sparse_diagonal(A: Tensor) -> Tensor:
    coo = A.to_sparse_coo().coalesce()
    rows, cols = coo.indices()
    on_diagonal = rows == cols
    diag = torch.zeros(A.shape[0], dtype=A.dtype, device=A.device)
    return diag.index_add(0, rows[on_diagonal], coo.values()[on_diagonal])


def _matvec(A: Tensor | _Rows, rows: Tensor):
    """Return ``v -> A v`` along the last axis of ``(R, s, N)`` for the instances ``rows``."""
    if isinstance(A, _Rows):
        return A.matvec(rows)
    if A.layout != torch.strided:

        def sparse(v: Tensor) -> Tensor:
            flat = v.reshape(-1, v.shape[-1])
            return (A @ flat.T).T.reshape(v.shape)

        return sparse
    if A.dim() == 2:
        return lambda v: v @ A.T
    return lambda v: torch.einsum("rij,rsj->rsi", A[rows], v)


class _Rows:
    """A :class:`SparseBatch` whose instances are taken a subset at a time: the subset's
    operator is kept while the same instances are asked for, as they are between
    two convergences."""

    def __init__(self, A: SparseBatch):
        self.A = A
        self.rows: Tensor | None = None
        self.subset = A

    def matvec(self, rows: Tensor):
        if self.rows is None or not torch.equal(self.rows, rows):
            self.rows, self.subset = rows, self.A[rows]
        subset = self.subset

        def product(v: Tensor) -> Tensor:  # (R, s, N) -> (R, s, N)
            if v.shape[1] == 1:
                return subset.matvec(v[:, 0])[:, None]
            return subset.matvec(v.transpose(1, 2)).transpose(1, 2)

        return product


class _SingleStepper:
    """One Jacobi step per call, for per-instance or sparse matrices."""

    block = 1

    def __init__(self, A: Tensor | _Rows, diag: Tensor, b: Tensor):
        self.A, self.diag, self.b = A, diag, b

    def __call__(self, x: Tensor, rows: Tensor, steps: int) -> Tensor:
        diag = self.diag if self.diag.dim() == 1 else self.diag[rows]
        residual = self.b[rows] - _matvec(self.A, rows)(x[:, None])[:, 0]
        return (x + residual / diag)[:, None]


class _PowerStepper:
    """Blocks of Jacobi iterates for one shared dense matrix.

    With ``M = I - D^{-1} A`` and ``c = D^{-1} b``, the iterate ``j`` steps after
    ``x`` is ``M^j x + (I + M + ... + M^{j-1}) c``; both matrices are
    precomputed for ``j = 1..block``.
    """

    def __init__(self, A: Tensor, diag: Tensor, b: Tensor, block: int):
        n = A.shape[0]
        self.block, self.n = block, n
        identity = torch.eye(n, dtype=A.dtype, device=A.device)
        iteration = identity - A / diag[:, None]
        powers, sums = [iteration], [identity]
        for _ in range(block - 1):
            sums.append(sums[-1] + powers[-1])
            powers.append(powers[-1] @ iteration)
        # Stacked as (block * N, N) so that a block is two plain matrix products.
        self.powers = torch.cat(powers)
        self.offset = (b / diag) @ torch.cat(sums).T

    def __call__(self, x: Tensor, rows: Tensor, steps: int) -> Tensor:
        size = steps * self.n
        blocks = x @ self.powers[:size].T + self.offset[rows, :size]
        return blocks.view(x.shape[0], steps, self.n)
