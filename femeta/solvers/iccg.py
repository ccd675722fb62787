"""Batched, differentiable ICCG(alpha): CG preconditioned with IC(0) of ``A + alpha diag(A)``.

The shift is relative to the diagonal (paper §4.2 writes ``A + alpha I``; a relative
shift is scale-free and means the same to PETSc, where ``P = A + alpha diag(A)``
with ``PCICC`` and shift type ``NONE`` gives this very preconditioner). IC(0)
keeps the nonzero pattern of ``A``, or a given sparsity pattern, e.g. the entries
that the assembled sparse matrix stores; it fails when a pivot is not positive.

For the small dense systems of the paper (``N = 243``) the preconditioner
``M = L L^T`` is applied through its explicit inverse, computed once per task, so
each CG iteration costs two batched matrix-vector products and no triangular
solve: ``M^{-1}`` dense, ``A`` on its nonzero pattern (one block-diagonal CSR
matrix for the batch).

The derivative with respect to ``alpha`` is exact. ``alpha`` is one scalar per
task, so it is carried forward (``torch.autograd.forward_ad``) through the
factorization and all CG iterations alongside the solve, which needs no graph
of the iterations; :func:`iccg` then exposes ``history`` and ``x`` to ordinary
reverse-mode autograd through that Jacobian.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from femeta.solvers.base import SolverResult, check_finite, check_stopping

__all__ = ["IccgResult", "iccg", "petsc_iccg"]

# Recompact the batch once this fraction of the instances it holds have stopped.
_COMPACT_FRACTION = 0.25
# Tasks solved together on the CPU (all of them on a GPU). With A applied as sparse, a
# whole paper batch (128) beat chunks of 32 and 64 on 2 cores; the chunk bounds memory.
_CPU_CHUNK = 128


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
    A: Tensor,
    b: Tensor,
    alpha: Tensor | float,
    x0: Tensor | None = None,
    *,
    tol: float | None,
    max_iterations: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float64,
    pattern: Tensor | None = None,
) -> IccgResult:
    """Solve ``A x = b`` for a batch of SPD matrices with ICCG(alpha).

    Each instance stops on its own at the first iterate whose relative residual
    is ``<= tol``, or after ``max_iterations``; with ``tol=None`` every instance
    takes exactly ``max_iterations`` steps. ``history`` and ``x`` are
    differentiable with respect to ``alpha`` (the stopping decisions are not);
    ``A``, ``b`` and ``x0`` are treated as data.

    Args:
        A: Symmetric positive definite matrices, ``(B, N, N)`` dense. IC(0) keeps
            their nonzero pattern (or ``pattern``); only the lower triangle is read.
        b: Right-hand sides, ``(B, N)``, none of them zero.
        alpha: Relative diagonal shifts, ``(B,)`` or a scalar, positive.
        x0: Initial guesses, ``(B, N)``; zero when omitted.
        tol: Tolerance on the relative residual, or ``None`` for a fixed count.
        max_iterations: The cap ``m``.
        device: Where to compute; defaults to the device of ``b``.
        dtype: Floating point type of the computation.
        pattern: The entries IC(0) keeps, boolean ``(N, N)`` or ``(B, N, N)``,
            symmetric and holding every nonzero of ``A``: e.g. what the sparse
            matrix stores, entries that cancelled to zero or to rounding noise
            included, as PETSc's ICC keeps them. Default: the nonzeros of ``A``.

    Returns:
        An :class:`IccgResult` whose history is trimmed to the longest run.
    """
    check_stopping(tol, max_iterations)
    device = torch.device(device) if device is not None else b.device
    A, b, alpha, x0 = _check_inputs(A, b, alpha, x0, device, dtype)
    pattern = _check_pattern(pattern, A)
    differentiable = alpha.requires_grad and torch.is_grad_enabled()
    tangent = torch.ones_like(alpha) if differentiable else None
    x, history, iterations, converged, failed, dx, dhistory = _solve(
        A, b, alpha.detach(), tangent, x0, tol, max_iterations, pattern
    )
    if differentiable:
        x, history = _AlphaJacobian.apply(alpha, x, history, dx, dhistory)
    return IccgResult(x, iterations, history, converged, failed)


def petsc_iccg(
    A: Tensor,
    b: Tensor,
    alpha: Tensor | float,
    *,
    tol: float | None,
    max_iterations: int,
    pattern: Tensor | None = None,
) -> IccgResult:
    """The same solve with PETSc (CG + ICC(0)), one KSP per task, serial; a reference.

    ``P = A + alpha diag(A)`` on the nonzero pattern of ``A`` (or on ``pattern``,
    as :func:`iccg` takes it, with explicit zeros) is the
    preconditioning matrix (``ksp.setOperators(A, P)``), with natural ordering,
    shift type ``NONE``, the unpreconditioned norm, ``rtol = tol``, ``atol = 0``
    and a zero initial guess. PETSc flags only a zero pivot; a negative one
    surfaces in CG as an indefinite preconditioner, so both count as a failed
    factorization. For systems solved again and again, or over several
    processes, use :class:`~femeta.solvers.petsc.PetscIccg`.
    """
    from femeta.solvers.petsc import PetscIccg

    with PetscIccg() as engine:
        return engine(A, b, alpha, tol=tol, max_iterations=max_iterations, pattern=pattern)


def _check_inputs(
    A: Tensor,
    b: Tensor,
    alpha: Tensor | float,
    x0: Tensor | None,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    for name, value in (("A", A), ("b", b)):
        if not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if b.dim() != 2:
        raise ValueError(f"b must have shape (batch, N), got {tuple(b.shape)}")
    batch, n = b.shape
    if batch == 0:
        raise ValueError("b holds no instances; pass at least one system")
    if A.layout != torch.strided or tuple(A.shape) != (batch, n, n):
        raise ValueError(
            f"A must be dense with shape {(batch, n, n)} for b of shape {(batch, n)}, "
            f"got {tuple(A.shape)} ({A.layout})"
        )
    A = A.detach().to(device=device, dtype=dtype)
    b = b.detach().to(device=device, dtype=dtype)
    check_finite("A", A)
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
    A: Tensor,
    b: Tensor,
    alpha: Tensor,
    alpha_tangent: Tensor | None,
    x0: Tensor,
    tol: float | None,
    max_iterations: int,
    pattern: Tensor | None,
) -> tuple[Tensor, ...]:
    """ICCG with an optional forward-mode tangent on ``alpha``, chunk by chunk.

    Returns ``x, history, iterations, converged, failed`` and the tangents of
    ``x`` and ``history`` (zeros without ``alpha_tangent``).
    """
    chunk = _CPU_CHUNK if A.device.type == "cpu" else A.shape[0]
    pieces = []
    for start in range(0, A.shape[0], chunk):
        part = slice(start, start + chunk)
        with fwAD.dual_level():
            shift = alpha[part]
            if alpha_tangent is not None:
                with warnings.catch_warnings():
                    # torch scripts its forward-mode decompositions on first use, which warns
                    # (a FutureWarning in torch 2.14, a DeprecationWarning in 2.11).
                    warnings.filterwarnings("ignore", "`torch.jit.script`")
                    shift = fwAD.make_dual(shift, alpha_tangent[part])
            kept = None if pattern is None else pattern[part]
            inverse, failed = _inverse_preconditioner(A[part], shift, kept)
            pieces.append(_cg(A[part], b[part], inverse, failed, x0[part], tol, max_iterations))
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
    A: Tensor,
    b: Tensor,
    inverse: Tensor,
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
    operator = _SharedPattern.from_dense(A)
    r = b - operator(x0)
    error0 = torch.linalg.vector_norm(r, dim=-1) / scale
    if fwAD.unpack_dual(inverse).tangent is not None:
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
    A_k, M_k, scale_k = operator.select(index), inverse[index], scale[index]
    x, r = x0[index], r[index]
    z = _matvec(M_k, r)
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
                A_k, M_k, scale_k = A_k.select(keep), M_k[keep], scale_k[keep]
                x, r, p, rz = x[keep], r[keep], p[keep], rz[keep]
            if not bool(live.any()):
                break
        z = _matvec(M_k, r)
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


class _SharedPattern:
    """``A x`` for a batch of matrices with one common nonzero pattern.

    The batch is stored as one block-diagonal CSR matrix, so a product is one
    sparse kernel over the nonzeros (about a sixth of the entries for the
    beams) instead of a pass over every dense matrix. Tangents of ``x`` ride
    along as a second column.
    """

    def __init__(self, values: Tensor, rows: Tensor, cols: Tensor, n: int):
        """``values[b, k]`` is entry ``(rows[k], cols[k])`` of matrix ``b``, in CSR order."""
        self.values, self.rows, self.cols, self.n = values, rows, cols, n
        batch, count = self.values.shape
        device = self.values.device
        offsets = torch.arange(batch, device=device)[:, None]
        row_starts = torch.zeros(self.n + 1, dtype=torch.long, device=device)
        row_starts[1:] = torch.bincount(self.rows, minlength=self.n).cumsum(0)
        crow = torch.cat(
            [
                (row_starts[:-1] + count * offsets).reshape(-1),
                row_starts.new_full((1,), batch * count),
            ]
        )
        col = (self.cols + self.n * offsets).reshape(-1)
        size = (batch * self.n, batch * self.n)
        if batch * max(count, self.n) < 2**31:  # 32-bit indices: the product ran 1.5-2x faster
            crow, col = crow.int(), col.int()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta", UserWarning)
            # torch 2.11 (seen on a GPU machine) warns that check_invariants=False is implicit.
            warnings.filterwarnings("ignore", "Sparse invariant checks are implicitly", UserWarning)
            self.matrix = torch.sparse_csr_tensor(
                crow, col, self.values.reshape(-1), size=size, check_invariants=False
            )

    @classmethod
    def from_dense(cls, A: Tensor) -> _SharedPattern:
        """The operator of dense ``(B, N, N)`` matrices, on their common nonzero pattern."""
        # nonzero() lists the entries row by row, which is the CSR order.
        rows, cols = torch.nonzero(A.ne(0).any(dim=0), as_tuple=True)
        return cls(A[:, rows, cols], rows, cols, A.shape[-1])

    def select(self, index: Tensor) -> _SharedPattern:
        """The operator of the instances at ``index``."""
        return _SharedPattern(self.values[index], self.rows, self.cols, self.n)

    def __call__(self, vector: Tensor) -> Tensor:
        vector, tangent = fwAD.unpack_dual(vector)
        batch = vector.shape[0]
        if tangent is None:  # a matrix-vector product, twice as fast as a one-column product
            return torch.mv(self.matrix, vector.reshape(-1)).reshape(batch, self.n)
        columns = torch.stack([vector, tangent], -1).reshape(batch * self.n, 2)
        product = (self.matrix @ columns).reshape(batch, self.n, 2)
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
