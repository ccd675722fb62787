"""Batched, differentiable ICCG(alpha): CG preconditioned with IC(0) of ``A + alpha diag(A)``.

The shift is relative to the diagonal (paper §4.2 writes ``A + alpha I``; a relative
shift is scale-free and means the same to PETSc, where ``P = A + alpha diag(A)``
with ``PCICC`` and shift type ``NONE`` gives this very preconditioner). IC(0)
keeps the nonzero pattern of ``A``, or a given sparsity pattern, e.g. the entries
that the assembled sparse matrix stores; it fails when a pivot is not positive.

Two implementations, one answer:

- ``"compiled"`` (CPU, float64): compiled code factorizes each task on its sparse
  pattern (:class:`~femeta.solvers.sparse.SparseBatch`) and runs CG on groups of
  tasks in lockstep, the groups in parallel over the CPU threads; memory is
  ``O(B nnz)``, so it serves every mesh size.
- ``"torch"`` (any device and dtype): the batch moves in lockstep through torch
  operations. For dense input ``M = L L^T`` is applied through its explicit
  dense inverse, computed once per task, so a CG iteration is two batched
  products and no triangular solve (memory ``O(B N^2)``: small systems). For a
  :class:`~femeta.solvers.sparse.SparseBatch` the compiled IC(0) factors are
  applied by sparse triangular solves of the whole batch at once (MKL on the
  CPU, cuSPARSE on CUDA); memory ``O(B nnz)``.

The derivative with respect to ``alpha`` is exact. ``alpha`` is one scalar per
task, so it is carried forward through the factorization and all CG iterations
alongside the solve, which needs no graph of the iterations; :func:`iccg` then
exposes ``history`` and ``x`` to ordinary reverse-mode autograd through that
Jacobian.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from femeta.solvers.base import SolverResult, check_finite, check_stopping
from femeta.solvers.sparse import SparseBatch

__all__ = ["IccgResult", "iccg"]

# Recompact the batch once this fraction of the instances it holds have stopped.
_COMPACT_FRACTION = 0.25
# Tasks solved together on the CPU by the torch implementation (all of them on a GPU).
_CPU_CHUNK = 128
# Tasks that a thread of the compiled implementation iterates at once, so that a pass
# over the pattern serves them all (4 doubles fill an AVX2 register; two hide latency).
_SLOTS = 16

Method = Literal["auto", "compiled", "torch"]


@dataclass(frozen=True)
class IccgResult(SolverResult):
    """Outcome of a batched ICCG solve.

    The error measure in ``history`` is the relative residual ``||r_k|| / ||b||``
    of CG's recursively updated residual ``r_k``, as PETSc's CG monitors it.
    An instance whose factorization failed is not iterated: its ``x`` is the
    initial guess, its history the initial error at every step up to
    ``max_iterations``, its iteration count ``max_iterations``.

    Attributes:
        factorization_failed: Whether IC(0) met a non-positive pivot, shape ``(B,)``.
    """

    factorization_failed: Tensor


def iccg(
    A: Tensor | SparseBatch,
    b: Tensor,
    alpha: Tensor | float,
    x0: Tensor | None = None,
    *,
    tol: float | None,
    max_iterations: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float64,
    pattern: Tensor | None = None,
    method: Method = "auto",
) -> IccgResult:
    """Solve ``A x = b`` for a batch of SPD matrices with ICCG(alpha).

    Each instance stops on its own at the first iterate whose relative residual
    is ``<= tol``, or after ``max_iterations``; with ``tol=None`` every instance
    takes exactly ``max_iterations`` steps. ``history`` and ``x`` are
    differentiable with respect to ``alpha`` (the stopping decisions are not);
    ``A``, ``b`` and ``x0`` are treated as data.

    Args:
        A: Symmetric positive definite matrices: a :class:`SparseBatch` (IC(0)
            keeps its stored entries), or dense ``(B, N, N)`` (IC(0) keeps each
            matrix's nonzeros, or ``pattern``). Only the lower triangle is read.
        b: Right-hand sides, ``(B, N)``, none of them zero.
        alpha: Relative diagonal shifts, ``(B,)`` or a scalar, positive.
        x0: Initial guesses, ``(B, N)``; zero when omitted.
        tol: Tolerance on the relative residual, or ``None`` for a fixed count.
        max_iterations: The cap ``m``.
        device: Where to compute; defaults to the device of ``b``.
        dtype: Floating point type of the computation.
        pattern: For dense ``A``, the entries IC(0) keeps, boolean ``(N, N)`` or
            ``(B, N, N)``, symmetric and holding every nonzero of ``A``: e.g. what
            the sparse matrix stores, entries that cancelled to zero included, as
            PETSc's ICC keeps them. Default: the nonzeros of each matrix.
        method: ``"compiled"`` (CPU, float64), ``"torch"`` (any device and dtype)
            or ``"auto"``: compiled where it applies, else torch.

    Returns:
        An :class:`IccgResult` whose history is trimmed to the longest run.
    """
    check_stopping(tol, max_iterations)
    device = torch.device(device) if device is not None else b.device
    if method not in ("auto", "compiled", "torch"):
        raise ValueError(f"method must be 'auto', 'compiled' or 'torch', got {method!r}")
    compiled = method == "compiled" or (
        method == "auto" and device.type == "cpu" and dtype == torch.float64
    )
    if compiled and (device.type != "cpu" or dtype != torch.float64):
        raise ValueError(
            f"the compiled ICCG runs on the CPU in float64, not on {device} in {dtype}; "
            "use method='torch' there"
        )
    if isinstance(A, SparseBatch) and pattern is not None:
        raise ValueError("a SparseBatch carries its pattern; pass pattern only with dense A")
    A, b, alpha, x0 = _check_inputs(A, b, alpha, x0, device, dtype)
    if not isinstance(A, SparseBatch):
        pattern = _check_pattern(pattern, A)
    differentiable = alpha.requires_grad and torch.is_grad_enabled()
    x, history, iterations, converged, failed, dx, dhistory = (_compiled if compiled else _solve)(
        A, b, alpha.detach(), differentiable, x0, tol, max_iterations, pattern
    )
    if differentiable:
        x, history = _AlphaJacobian.apply(alpha, x, history, dx, dhistory)
    return IccgResult(x, iterations, history, converged, failed)


def _compiled(
    A: Tensor | SparseBatch,
    b: Tensor,
    alpha: Tensor,
    differentiable: bool,
    x0: Tensor,
    tol: float | None,
    max_iterations: int,
    pattern: Tensor | None,
) -> tuple[Tensor, ...]:
    """The compiled kernels, on each group of tasks whose IC(0) keeps the same entries.

    The tasks are spread over as many threads as torch uses (``torch.set_num_threads``).
    """
    import numba

    from femeta.solvers._iccg_kernels import iccg_batch

    threads = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(threads)

    if isinstance(A, SparseBatch):
        groups = [(slice(None), A)]
    else:
        kept = (A != 0) if pattern is None else pattern
        kept = kept | torch.eye(A.shape[1], dtype=torch.bool)
        unique, which = torch.unique(kept.reshape(len(A), -1), dim=0, return_inverse=True)
        groups = []
        for group in range(unique.shape[0]):
            index = torch.nonzero(which == group)[:, 0]
            groups.append(
                (index, SparseBatch.from_dense(A[index], unique[group].reshape(A.shape[1:])))
            )
    batch, n = b.shape
    width = max_iterations + 1
    x = torch.zeros(batch, n, dtype=torch.float64)
    history = torch.zeros(batch, width, dtype=torch.float64)
    iterations = torch.zeros(batch, dtype=torch.long)
    converged = torch.zeros(batch, dtype=torch.bool)
    failed = torch.zeros(batch, dtype=torch.bool)
    dx, dhistory = torch.zeros_like(x), torch.zeros_like(history)
    for index, group in groups:
        lower_ptr, lower_cols, lower_source = group.lower
        results = iccg_batch(
            *group.csr, lower_ptr, lower_cols, lower_source,
            group.values.numpy(), b[index].contiguous().numpy(),
            x0[index].contiguous().numpy(), alpha[index].contiguous().numpy(),
            0.0 if tol is None else tol, max_iterations, differentiable,
            min(threads, len(group)), _SLOTS,
        )  # fmt: skip
        for target, value in zip(
            (x, dx, history, dhistory, iterations, converged, failed), results, strict=True
        ):
            target[index] = torch.from_numpy(value)
    longest = int(iterations.max()) + 1
    return (
        x, history[:, :longest].contiguous(), iterations, converged, failed,
        dx, dhistory[:, :longest].contiguous(),
    )  # fmt: skip


def _check_inputs(
    A: Tensor | SparseBatch,
    b: Tensor,
    alpha: Tensor | float,
    x0: Tensor | None,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[Tensor | SparseBatch, Tensor, Tensor, Tensor]:
    if not isinstance(b, Tensor):
        raise TypeError(f"b must be a torch.Tensor, got {type(b).__name__}")
    if not isinstance(A, Tensor | SparseBatch):
        raise TypeError(f"A must be a torch.Tensor or a SparseBatch, got {type(A).__name__}")
    if b.dim() != 2:
        raise ValueError(f"b must have shape (batch, N), got {tuple(b.shape)}")
    batch, n = b.shape
    if batch == 0:
        raise ValueError("b holds no instances; pass at least one system")
    if isinstance(A, SparseBatch):
        if A.shape != (batch, n, n):
            raise ValueError(
                f"A has shape {A.shape}; expected {(batch, n, n)} for b of shape {(batch, n)}"
            )
        A = A.to(device=device, dtype=dtype)
        check_finite("A", A.values)
    else:
        if A.layout != torch.strided or tuple(A.shape) != (batch, n, n):
            raise ValueError(
                f"A must be dense with shape {(batch, n, n)} for b of shape {(batch, n)}, "
                f"got {tuple(A.shape)} ({A.layout})"
            )
        A = A.detach().to(device=device, dtype=dtype)
        check_finite("A", A)
    b = b.detach().to(device=device, dtype=dtype)
    check_finite("b", b)
    if bool((torch.linalg.vector_norm(b, dim=-1) == 0).any()):
        raise ValueError(
            "an instance has a zero right-hand side; its relative residual is undefined"
        )
    if x0 is None:
        x0 = torch.zeros_like(b)
    elif not isinstance(x0, Tensor) or tuple(x0.shape) != (batch, n):
        raise ValueError(f"x0 must be a tensor of shape {(batch, n)}")
    else:
        x0 = x0.detach().to(device=device, dtype=dtype)
        check_finite("x0", x0)
    alpha = _check_alpha(alpha, batch, device, dtype)
    return A, b, alpha, x0


def _check_pattern(pattern: Tensor | None, A: Tensor) -> Tensor | None:
    """``pattern`` as a boolean ``(B, N, N)`` tensor on ``A``'s device (``None`` stays)."""
    if pattern is None:
        return None
    if not isinstance(pattern, Tensor) or pattern.dtype != torch.bool:
        raise TypeError("pattern must be a boolean torch.Tensor (True where IC(0) keeps an entry)")
    if (
        pattern.shape[-2:] != A.shape[-2:]
        or pattern.dim() not in (2, 3)
        or (pattern.dim() == 3 and pattern.shape[0] != A.shape[0])
    ):
        raise ValueError(
            f"pattern must have shape {tuple(A.shape[1:])} or {tuple(A.shape)}, "
            f"got {tuple(pattern.shape)}"
        )
    if not bool(torch.equal(pattern, pattern.mT)):
        raise ValueError("pattern must be symmetric: IC(0) of a symmetric matrix keeps both halves")
    pattern = pattern.to(A.device).expand_as(A)
    outside = (A != 0) & ~pattern
    if bool(outside.any()):
        task, row, column = (int(i) for i in torch.nonzero(outside)[0])
        raise ValueError(
            f"A[{task}] has a nonzero at ({row}, {column}) outside pattern; the pattern must "
            "hold every stored entry of A"
        )
    return pattern


def _check_alpha(
    alpha: Tensor | float, batch: int, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """``alpha`` as a tensor of shape ``(batch,)``, checked positive and finite."""
    if isinstance(alpha, Tensor):
        alpha = alpha.to(device=device, dtype=dtype)
    else:  # a Python number: straight to dtype (as_tensor alone would round it to float32)
        alpha = torch.as_tensor(alpha, dtype=dtype, device=device)
    if alpha.dim() == 0:
        alpha = alpha.expand(batch).clone()
    if tuple(alpha.shape) != (batch,):
        raise ValueError(
            f"alpha must be a scalar or have shape {(batch,)}, got {tuple(alpha.shape)}"
        )
    alpha = alpha.contiguous()  # an expanded view cannot carry a forward-mode tangent
    valid = torch.isfinite(alpha.detach()) & (alpha.detach() > 0)
    if not bool(valid.all()):
        bad = int(torch.nonzero(~valid)[0])
        raise ValueError(
            f"alpha must be positive and finite, got {float(alpha[bad])!r} for instance {bad}; "
            "the shift is relative to diag(A), so use e.g. 1e-3 to 1"
        )
    return alpha


class _AlphaJacobian(torch.autograd.Function):
    """Attach ``d x / d alpha`` and ``d history / d alpha`` (per task) for reverse mode.

    The tangents come from forward mode, which ``autograd.Function.forward``
    disables, so they are computed before and handed in.
    """

    @staticmethod
    def forward(ctx, alpha, x, history, dx, dhistory):
        ctx.save_for_backward(dx, dhistory)
        return x.clone(), history.clone()

    @staticmethod
    def backward(ctx, grad_x, grad_history):
        dx, dhistory = ctx.saved_tensors
        grad_alpha = (grad_history * dhistory).sum(dim=1) + (grad_x * dx).sum(dim=1)
        return grad_alpha, None, None, None, None


def _solve(
    A: Tensor | SparseBatch,
    b: Tensor,
    alpha: Tensor,
    differentiable: bool,
    x0: Tensor,
    tol: float | None,
    max_iterations: int,
    pattern: Tensor | None,
) -> tuple[Tensor, ...]:
    """The torch implementation, with a forward-mode tangent on ``alpha``, chunk by chunk.

    Returns ``x, history, iterations, converged, failed`` and the tangents of
    ``x`` and ``history`` (zeros without ``alpha_tangent``).
    """
    alpha_tangent = torch.ones_like(alpha) if differentiable else None
    chunk = _CPU_CHUNK if A.device.type == "cpu" else len(A)
    pieces = []
    for start in range(0, len(A), chunk):
        part = slice(start, start + chunk)
        with fwAD.dual_level():
            shift = alpha[part]
            if alpha_tangent is not None:
                with warnings.catch_warnings():
                    # torch scripts its forward-mode decompositions on first use, which warns
                    # (a FutureWarning in torch 2.14, a DeprecationWarning in 2.11).
                    warnings.filterwarnings("ignore", "`torch.jit.script`")
                    shift = fwAD.make_dual(shift, alpha_tangent[part])
            if isinstance(A, SparseBatch):
                preconditioner, failed = _SparseFactor.of(A[part], shift)
            else:
                kept = None if pattern is None else pattern[part]
                inverse, failed = _inverse_preconditioner(A[part], shift, kept)
                preconditioner = _DenseInverse(inverse)
            pieces.append(
                _cg(A[part], b[part], preconditioner, failed, x0[part], tol, max_iterations)
            )
    longest = max(piece[1].shape[1] for piece in pieces)
    outputs = []
    for position in range(len(pieces[0])):
        parts = [piece[position] for piece in pieces]
        if position in (1, 6):  # histories end where their chunk's longest run ended
            parts = [torch.nn.functional.pad(part, (0, longest - part.shape[1])) for part in parts]
        outputs.append(torch.cat(parts))
    return tuple(outputs)


def _inverse_preconditioner(
    A: Tensor, alpha: Tensor, pattern: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """``(L L^T)^{-1}`` for IC(0) ``L L^T`` of ``A + alpha diag(A)``, and the failed instances.

    IC(0) keeps ``pattern`` (checked to hold ``A``'s nonzeros), else ``A``'s nonzeros.

    Column ``j`` of ``L`` is computed for the whole batch at once (left-looking),
    restricted to the band of the batch's common nonzero pattern. From its first
    non-positive pivot on, an instance's factor is continued by identity
    columns, so that nothing downstream meets a NaN.
    """
    batch, n = A.shape[:2]
    nonzero = A != 0 if pattern is None else pattern
    pattern = nonzero.tril(-1)
    band = nonzero.any(dim=0)
    first = band.int().argmax(dim=1).tolist()  # first nonzero column of each row
    last = (n - band.flip(0).int().argmax(dim=0)).tolist()  # one past the last row of each column
    # The tangent (d/d alpha) is carried by hand beside the primal: torch's forward-mode
    # rules for the slice updates below cost several times the primal loop.
    alpha, alpha_tangent = fwAD.unpack_dual(alpha)
    diagonal = torch.diagonal(A, dim1=-2, dim2=-1)
    shifted = A + torch.diag_embed(alpha[:, None] * diagonal)
    factor = torch.zeros_like(A)
    tangent = None if alpha_tangent is None else torch.zeros_like(A)
    failed = torch.zeros(batch, dtype=torch.bool, device=A.device)
    for j in range(n):
        start, stop = first[j], max(last[j], j + 1)
        rows, row_j = factor[:, j:stop, start:j], factor[:, j, start:j]
        column = shifted[:, j:stop, j] - _matvec(rows, row_j)
        pivot = column[:, 0]
        failed = failed | ~(pivot > 0)
        root = torch.where(failed, 1.0, pivot).sqrt()
        keep = pattern[:, j + 1 : stop, j] & ~failed[:, None]
        below = column[:, 1:] / root[:, None]
        factor[:, j, j] = root
        factor[:, j + 1 : stop, j] = torch.where(keep, below, 0.0)
        if tangent is not None:
            d_column = -(
                _matvec(tangent[:, j:stop, start:j], row_j) + _matvec(rows, tangent[:, j, start:j])
            )
            d_column[:, 0] += alpha_tangent * diagonal[:, j]
            d_root = torch.where(failed, 0.0, d_column[:, 0] / (2 * root))
            d_below = (d_column[:, 1:] - below * d_root[:, None]) / root[:, None]
            tangent[:, j, j] = d_root
            tangent[:, j + 1 : stop, j] = torch.where(keep, d_below, 0.0)
    identity = torch.eye(n, dtype=A.dtype, device=A.device).expand(batch, n, n)
    inverse_factor = torch.linalg.solve_triangular(factor, identity, upper=False)
    inverse = inverse_factor.mT @ inverse_factor
    if tangent is None:
        return inverse, failed
    # d (L L^T)^{-1} = -M^{-1} (dL L^T + L dL^T) M^{-1} = H + H^T with H = -M^{-1} dL L^{-1},
    # as L^T M^{-1} = L^{-1}.
    half = -(inverse @ tangent) @ inverse_factor
    return fwAD.make_dual(inverse, half + half.mT), failed


def _cg(
    A: Tensor | SparseBatch,
    b: Tensor,
    preconditioner: _DenseInverse | _SparseFactor,
    failed: Tensor,
    x0: Tensor,
    tol: float | None,
    max_iterations: int,
) -> tuple[Tensor, ...]:
    """Preconditioned CG on the instances that factorized, shrinking the batch as they stop."""
    batch = b.shape[0]
    device = b.device
    width = max_iterations + 1
    history = torch.zeros(batch, width, dtype=b.dtype, device=device)
    history_tangent = torch.zeros_like(history)
    x_out = x0.clone()
    x_tangent = torch.zeros_like(x0)
    iterations = torch.full((batch,), max_iterations, dtype=torch.long, device=device)
    converged = torch.zeros(batch, dtype=torch.bool, device=device)

    scale = torch.linalg.vector_norm(b, dim=-1)
    operator = _SharedPattern(A) if isinstance(A, SparseBatch) else _SharedPattern.from_dense(A)
    r = b - operator(x0)
    error0 = torch.linalg.vector_norm(r, dim=-1) / scale
    if preconditioner.has_tangent:
        # Zero tangents up front: torch's rules for a dual tensor meeting a plain one are slow.
        x0, r, scale = (fwAD.make_dual(t, torch.zeros_like(t)) for t in (x0, r, scale))
    history[:, 0] = error0
    history[failed] = error0[failed, None]
    running = ~failed
    if tol is not None:
        converged = running & (error0 <= tol)
        iterations = torch.where(converged, 0, iterations)
        running = running & ~converged

    # The working set: instances still iterating plus those stopped since the last compaction.
    index = torch.nonzero(running)[:, 0]
    A_k, M_k, scale_k = operator.select(index), preconditioner.select(index), scale[index]
    x, r = x0[index], r[index]
    z = M_k(r)
    p = z
    rz = (r * z).sum(-1)
    live = torch.ones(index.shape[0], dtype=torch.bool, device=device)
    for k in range(1, width):
        if index.numel() == 0:
            break
        q = A_k(p)
        pq = (p * q).sum(-1)
        step = torch.where(pq > 0, rz / torch.where(pq > 0, pq, 1.0), 0.0)
        x = x + step[:, None] * p
        r = r - step[:, None] * q
        error = torch.linalg.vector_norm(r, dim=-1) / scale_k
        primal, tangent = fwAD.unpack_dual(error)
        stops = live & (primal <= tol) if tol is not None else torch.zeros_like(live)
        if k == max_iterations:
            stops = live
        here = index[live]
        history[here, k] = primal[live]
        if tangent is not None:
            history_tangent[here, k] = tangent[live]
        if bool(stops.any()):
            done = index[stops]
            x_primal, x_dual = fwAD.unpack_dual(x)
            x_out[done] = x_primal[stops]
            if x_dual is not None:
                x_tangent[done] = x_dual[stops]
            iterations[done] = k
            if tol is not None:
                converged[done] = primal[stops] <= tol
            live = live & ~stops
            if int(live.sum()) <= (1 - _COMPACT_FRACTION) * live.numel():
                keep = torch.nonzero(live)[:, 0]
                index, live = index[keep], live[keep]
                A_k, M_k, scale_k = A_k.select(keep), M_k.select(keep), scale_k[keep]
                x, r, p, rz = x[keep], r[keep], p[keep], rz[keep]
            if not bool(live.any()):
                break
        z = M_k(r)
        rz_next = (r * z).sum(-1)
        beta = torch.where(rz > 0, rz_next / torch.where(rz > 0, rz, 1.0), 0.0)
        p = z + beta[:, None] * p
        rz = rz_next
    longest = int(iterations.max()) + 1
    return (
        x_out,
        history[:, :longest].contiguous(),
        iterations,
        converged,
        failed,
        x_tangent,
        history_tangent[:, :longest].contiguous(),
    )


class _DenseInverse:
    """``M^{-1} r`` through the explicit dense inverse (a dual tensor when differentiated)."""

    def __init__(self, inverse: Tensor):
        self.inverse = inverse

    @property
    def has_tangent(self) -> bool:
        return fwAD.unpack_dual(self.inverse).tangent is not None

    def select(self, index: Tensor) -> _DenseInverse:
        return _DenseInverse(self.inverse[index])

    def __call__(self, r: Tensor) -> Tensor:
        return _matvec(self.inverse, r)


class _SparseFactor:
    """``M^{-1} r`` with ``M = L L^T`` by two sparse triangular solves per task, all tasks in
    one solve with the batch's block-diagonal factor (MKL on the CPU, cuSPARSE on CUDA).

    The factors come from the compiled IC(0) on the CPU (a failed task gets the identity);
    their tangents ``dL`` give ``dz = L^{-T} (dy - dL^T z)`` with ``dy = L^{-1} (dr - dL y)``.
    """

    def __init__(
        self, lower: SparseBatch, upper: SparseBatch, dlower: SparseBatch | None,
        dupper: SparseBatch | None,
    ):  # fmt: skip
        self.lower, self.upper, self.dlower, self.dupper = lower, upper, dlower, dupper

    @classmethod
    def of(cls, A: SparseBatch, alpha: Tensor) -> tuple[_SparseFactor, Tensor]:
        """The IC(0) factors of ``A + alpha diag(A)`` (``alpha`` may be dual), and the
        failed tasks."""
        from femeta.solvers._iccg_kernels import ic0_batch

        alpha, alpha_tangent = fwAD.unpack_dual(alpha)
        lower_ptr, lower_cols, lower_source = A.lower
        factor, dfactor, failed = ic0_batch(
            lower_ptr, lower_cols, lower_source, A.values.detach().cpu().numpy(),
            alpha.detach().cpu().numpy(), alpha_tangent is not None,
        )  # fmt: skip
        rows = np.repeat(np.arange(A.shape[1]), np.diff(lower_ptr))
        order = np.lexsort((rows, lower_cols))  # the upper factor L^T, row by row
        upper_ptr = np.zeros_like(lower_ptr)
        upper_ptr[1:] = np.cumsum(np.bincount(lower_cols, minlength=A.shape[1]))
        device, dtype = A.device, A.dtype

        def batch(ptr: np.ndarray, cols: np.ndarray, values: np.ndarray) -> SparseBatch:
            return SparseBatch(
                torch.from_numpy(ptr.astype(np.int64)).to(device),
                torch.from_numpy(cols.astype(np.int64)).to(device),
                torch.from_numpy(values).to(device=device, dtype=dtype),
            )

        tangents = (None, None)
        if alpha_tangent is not None:
            dfactor = dfactor * alpha_tangent.detach().cpu().numpy()[:, None]
            tangents = (
                batch(lower_ptr, lower_cols, dfactor),
                batch(upper_ptr, rows[order], dfactor[:, order]),
            )
        factors = (
            batch(lower_ptr, lower_cols, factor),
            batch(upper_ptr, rows[order], factor[:, order]),
        )
        return cls(*factors, *tangents), torch.from_numpy(failed).to(device)

    @property
    def has_tangent(self) -> bool:
        return self.dlower is not None

    def select(self, index: Tensor) -> _SparseFactor:
        index = index.to(self.lower.device)
        parts = (self.lower, self.upper, self.dlower, self.dupper)
        return _SparseFactor(*(None if part is None else part[index] for part in parts))

    def __call__(self, r: Tensor) -> Tensor:
        r, dr = fwAD.unpack_dual(r)
        y = _triangular_solve(self.lower, r, upper=False)
        z = _triangular_solve(self.upper, y, upper=True)
        if self.dlower is None or self.dupper is None:
            return z
        dr = torch.zeros_like(r) if dr is None else dr
        dy = _triangular_solve(self.lower, dr - self.dlower.matvec(y), upper=False)
        dz = _triangular_solve(self.upper, dy - self.dupper.matvec(z), upper=True)
        return fwAD.make_dual(z, dz)


def _triangular_solve(factor: SparseBatch, r: Tensor, *, upper: bool) -> Tensor:
    """``factor_t^{-1} r_t`` for every task, one sparse triangular solve for the batch."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.triangular_solve is deprecated")
        solution = torch.triangular_solve(
            r.reshape(-1, 1), factor.block_diagonal, upper=upper
        ).solution
    return solution.reshape(r.shape)


class _SharedPattern:
    """``A x`` for a batch of matrices with one common nonzero pattern; tangents of ``x``
    ride along as a second column of one sparse product."""

    def __init__(self, batch: SparseBatch):
        self.batch = batch

    @classmethod
    def from_dense(cls, A: Tensor) -> _SharedPattern:
        """The operator of dense ``(B, N, N)`` matrices, on their common nonzero pattern."""
        return cls(SparseBatch.from_dense(A))

    def select(self, index: Tensor) -> _SharedPattern:
        """The operator of the instances at ``index``."""
        return _SharedPattern(self.batch[index])

    def __call__(self, vector: Tensor) -> Tensor:
        vector, tangent = fwAD.unpack_dual(vector)
        if tangent is None:
            return self.batch.matvec(vector)
        product = self.batch.matvec(torch.stack([vector, tangent], -1))
        return fwAD.make_dual(product[..., 0], product[..., 1])


def _matvec(matrix: Tensor, vector: Tensor) -> Tensor:
    """``matrix @ vector`` over a batch, with forward-mode tangents done by hand.

    It is computed as row vectors times ``matrix^T``: with MKL on one core this
    ran 2.4-3x faster than the batched matrix-vector product (``(128, 243, 243)``
    and slices of it, float64). The primal and the tangent of ``vector`` share
    one pass over ``matrix``.
    """
    matrix, matrix_tangent = fwAD.unpack_dual(matrix)
    vector, vector_tangent = fwAD.unpack_dual(vector)
    rows = vector[:, None] if vector_tangent is None else torch.stack([vector, vector_tangent], 1)
    both = rows @ matrix.mT
    product = both[:, 0]
    tangent = None if vector_tangent is None else both[:, 1]
    if matrix_tangent is not None:
        extra = (vector[:, None] @ matrix_tangent.mT)[:, 0]
        tangent = extra if tangent is None else tangent + extra
    return product if tangent is None else fwAD.make_dual(product, tangent)
