"""Batched, differentiable one-step Newton-SOR for nonlinear systems ``g(y) = 0`` (Appendix C.2).

Each iteration splits the Jacobian ``J(y_k) = D_k - L_k - U_k`` (diagonal, strictly
lower, strictly upper) and takes one SOR sweep from zero on the Newton system
``J dy = g`` (equations (45)-(46)):

    y_{k+1} = y_k - r (D_k - r L_k)^{-1} g(y_k).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from femeta.solvers.base import SolverResult, check_finite, check_stopping

__all__ = ["NonlinearSystem", "newton_sor"]

#: ``system(y, rows) -> (g, J)``: the residual ``(R, n)`` and Jacobian ``(R, n, n)`` at the
#: iterates ``y`` ``(R, n)`` of the batch instances ``rows`` ``(R,)``. The solver passes the
#: same ``rows`` object until an instance stops, so a system can cache what it selects by it.
NonlinearSystem = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


def newton_sor(
    system: NonlinearSystem,
    y0: Tensor,
    relaxation: Tensor | float,
    *,
    tol: float | None,
    max_iterations: int,
    divergence_limit: float = 1e10,
) -> SolverResult:
    """Solve a batch of nonlinear systems with one-step Newton-SOR.

    The error measure is the absolute residual ``||g(y_k)||_2``, as in the
    paper. Each instance stops on its own at the first iterate with
    ``||g|| <= tol`` or after ``max_iterations``; with ``tol=None`` every
    instance takes exactly ``max_iterations`` steps.

    An instance whose next iterate would leave ``||y||_inf <= divergence_limit``
    (or be NaN) has diverged: it stops before that iterate, unconverged, counted
    as ``max_iterations``, and its history repeats its last residual, detached,
    up to the cap. Stopping before ``g`` overflows keeps every gradient finite.
    With a tolerance, the history of every instance that does not converge is
    detached, so it passes no derivative: through thousands of iterations of a
    map that does not contract, that derivative reaches 1e200 or overflows.

    Differentiable (reverse mode) with respect to ``y0``, ``relaxation`` and
    whatever ``system`` depends on. Only the instances still running are
    iterated, so the graph grows with the iterations actually taken.

    Args:
        system: The residual and Jacobian, see :data:`NonlinearSystem`.
        y0: Initial guesses ``(B, n)``; their dtype and device are used throughout.
        relaxation: The SOR factor ``r``: a number or one per instance ``(B,)``.
            The paper takes ``r`` in ``[1, 2]``; any value in ``(0, 2]`` is accepted.
        tol: Tolerance on ``||g||``, or ``None`` for a fixed count.
        max_iterations: The cap ``m``.
        divergence_limit: The bound on ``|y|`` beyond which an instance has diverged.

    Returns:
        A :class:`SolverResult`; ``x`` is the iterate each instance stopped at.
    """
    check_stopping(tol, max_iterations)
    if not isinstance(y0, Tensor) or y0.dim() != 2:
        raise ValueError("y0 must be a (B, n) tensor of initial guesses")
    check_finite("y0", y0)
    batch, device = y0.shape[0], y0.device
    r = torch.as_tensor(relaxation, dtype=y0.dtype, device=device)
    r = r.expand(batch) if r.dim() == 0 else r
    if tuple(r.shape) != (batch,):
        raise ValueError(
            f"relaxation must be a number or have shape ({batch},), got {tuple(r.shape)}"
        )
    check_finite("relaxation", r)
    if not bool(((r > 0) & (r <= 2)).all()):
        raise ValueError("the SOR relaxation factor must lie in (0, 2]; the paper uses [1, 2]")

    rows = torch.arange(batch, device=device)
    y = y0
    g, jacobian = system(y, rows)
    norm = torch.linalg.vector_norm(g, dim=-1)
    # The history is kept sparse, (instance, step, residual) of the running instances,
    # and scattered into a dense (B, K) tensor once: a per-step dense row would cost
    # O(B) per step, forward and backward, however few instances are still running.
    history_rows, history_steps, history_values = [rows], [torch.zeros_like(rows)], [norm]
    iterations = torch.full((batch,), max_iterations, dtype=torch.long, device=device)
    converged = torch.zeros(batch, dtype=torch.bool, device=device)
    diverged_at = torch.full((batch,), max_iterations + 1, dtype=torch.long, device=device)
    diverged_norm = torch.zeros(batch, dtype=y0.dtype, device=device)
    stops: list[tuple[Tensor, Tensor]] = []
    n = y0.shape[1]
    eye = torch.eye(n, dtype=y0.dtype, device=device)
    lower = torch.ones(n, n, dtype=y0.dtype, device=device).tril(-1)
    weights = relax = None
    for k in range(max_iterations + 1):
        # Invariant: y is iterate k of the running instances `rows`, g and norm belong to it.
        level = norm.detach()
        done = ~torch.isfinite(level)  # only a system that overflows within the limit
        if tol is not None:
            done = done | (level <= tol)
        if k == max_iterations:
            done = torch.ones_like(done)
        if bool(done.any()):
            finished = rows[done]
            converged[finished] = level[done] <= tol if tol is not None else False
            iterations[finished] = torch.where(torch.isfinite(level[done]), k, max_iterations)
            stops.append((finished, y[done]))
            keep = ~done
            rows, y, g, jacobian, norm = rows[keep], y[keep], g[keep], jacobian[keep], norm[keep]
            weights = None
            if rows.numel() == 0:
                break
        if weights is None:
            # D - r L = J * (I + r * strictly lower ones), since L = -tril(J, -1).
            relax = r[rows]
            weights = eye + relax[:, None, None] * lower
        step = torch.linalg.solve_triangular(jacobian * weights, g[..., None], upper=False)[..., 0]
        new = y - relax[:, None] * step
        blown = ~(new.detach().abs().amax(dim=-1) <= divergence_limit)
        if bool(blown.any()):
            # Stop before evaluating g where it could overflow: its gradient would be NaN.
            gone = rows[blown]
            diverged_at[gone] = k + 1
            diverged_norm[gone] = norm.detach()[blown]
            stops.append((gone, y[blown]))
            keep = ~blown
            rows, new, norm = rows[keep], new[keep], norm[keep]
            weights = None
            if rows.numel() == 0:
                break
        y = new
        g, jacobian = system(y, rows)
        norm = torch.linalg.vector_norm(g, dim=-1)
        history_rows.append(rows)
        history_steps.append(torch.full_like(rows, len(history_steps)))
        history_values.append(norm)

    x = torch.zeros_like(y0)
    for index, values in stops:
        x = x.index_put((index,), values)
    width = len(history_steps)
    flat = torch.cat(history_rows) * width + torch.cat(history_steps)
    history = y0.new_zeros(batch * width).index_put((flat,), torch.cat(history_values))
    history = history.view(batch, width)
    if tol is not None:
        # An instance that does not converge passes no derivative through its history.
        # Through thousands of steps of a map that does not contract, or on the way to
        # divergence, its derivative in y0 and r reaches 1e200, drowning every other
        # instance's, or overflows to NaN, voiding the batch's; its value is the cap's.
        history = torch.where(converged[:, None], history, history.detach())
    if bool((diverged_at <= max_iterations).any()):
        # A diverged instance counts as the cap: its last residual stands until then.
        # (Its x is its last iterate within the limit.)
        history = torch.nn.functional.pad(history, (0, max_iterations + 1 - history.shape[1]))
        steps = torch.arange(max_iterations + 1, device=device)
        after = steps[None, :] >= diverged_at[:, None]
        history = torch.where(after, diverged_norm[:, None], history)
    return SolverResult(x, iterations, history, converged)
