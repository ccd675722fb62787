"""Compiled CPU kernels of ICCG(alpha) on a sparsity pattern shared by a batch.

Each thread takes a share of the tasks and iterates up to ``slots`` of them at
once in lockstep, so one pass over the pattern serves them all; a task stops at
its own iteration and its slot takes the next task, so little work is spent on
finished tasks. The derivative in ``alpha`` is carried forward beside every quantity (the tangent
of IC(0), of both triangular solves and of every CG scalar), so one pass gives
the solve and its exact derivative. The arithmetic is IC(0) row by row and CG
as PETSc does it, with the unpreconditioned residual norm. Loops are written
out and work in preallocated buffers: a CG iteration allocates nothing.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

__all__ = ["ic0_batch", "iccg_batch"]


@njit(cache=True, parallel=True)
def iccg_batch(
    indptr, indices, lower_ptr, lower_cols, lower_source, values, b, x0, alpha, tol,
    max_iterations, tangent, queues, slots,
):  # fmt: skip  # pragma: no cover - compiled
    """Solve ``A_t x = b_t`` for every task ``t``; see :func:`femeta.solvers.iccg.iccg`.

    ``indptr, indices``: the shared CSR pattern (sorted columns, diagonal stored);
    ``lower_ptr``: row starts of its lower triangle, diagonal last in each row;
    ``lower_cols``: the column of each lower entry; ``lower_source``: where each
    lower entry sits in ``values``; ``values``: ``(B, nnz)``; ``tol <= 0`` means
    a fixed number of iterations. The tasks are dealt to ``queues`` threads; each
    works on ``slots`` tasks at once (see :func:`_queue`).
    """
    batch = b.shape[0]
    width = max_iterations + 1
    x = x0.copy()
    dx = np.zeros_like(x0)
    history = np.zeros((batch, width))
    dhistory = np.zeros((batch, width))
    iterations = np.full(batch, max_iterations, dtype=np.int64)
    converged = np.zeros(batch, dtype=np.bool_)
    failed = np.zeros(batch, dtype=np.bool_)
    for queue in prange(queues):
        _queue(
            np.arange(queue, batch, queues), indptr, indices, lower_ptr, lower_cols,
            lower_source, values, b, alpha, tol, max_iterations, tangent, slots,
            x, dx, history, dhistory, iterations, converged, failed,
        )  # fmt: skip
    return x, dx, history, dhistory, iterations, converged, failed


@njit(cache=True, parallel=True)
def ic0_batch(lower_ptr, lower_cols, lower_source, values, alpha, tangent):  # pragma: no cover
    """IC(0) of every task's ``A + alpha diag(A)``: the lower factors' values ``(B, nnz_L)``,
    their tangents (zeros without ``tangent``) and which tasks failed. A failed task's
    factor is the identity, so that it can still be applied."""
    batch = values.shape[0]
    n = lower_ptr.shape[0] - 1
    factor = np.zeros((batch, lower_cols.shape[0]))
    dfactor = np.zeros((batch, lower_cols.shape[0]))
    failed = np.zeros(batch, dtype=np.bool_)
    for t in prange(batch):
        position = np.full(n, -1, dtype=np.int64)
        ok = _ic0(lower_ptr, lower_cols, lower_source, values[t], alpha[t], tangent,
                  factor[t], dfactor[t], position)  # fmt: skip
        if not ok:
            failed[t] = True
            for i in range(n):
                for e in range(lower_ptr[i], lower_ptr[i + 1]):
                    factor[t, e] = 1.0 if e == lower_ptr[i + 1] - 1 else 0.0
                    dfactor[t, e] = 0.0
    return factor, dfactor, failed


@njit(cache=True)
def _queue(
    tasks, indptr, indices, lower_ptr, lower_cols, lower_source, values, b, alpha, tol,
    max_iterations, tangent, slots, x, dx, history, dhistory, iterations, converged, failed,
):  # fmt: skip
    """Preconditioned CG on ``tasks``, ``slots`` of them at a time in lockstep.

    The slots' matrices, factors and vectors are stored slot-minor (``(nnz, S)``,
    ``(N, S)``), so every loop over the pattern reads an index once for all slots
    and runs over contiguous slot values. A slot whose task stops takes the next
    task at once, so no slot idles while tasks are left.
    """
    n = b.shape[1]
    nnz = indices.shape[0]
    nnz_lower = lower_cols.shape[0]
    width = max_iterations + 1
    S = min(slots, tasks.shape[0])
    matrix = np.zeros((nnz, S))
    factor = np.zeros((nnz_lower, S))
    dfactor = np.zeros((nnz_lower if tangent else 0, S))
    xs, rs, ys = np.zeros((n, S)), np.zeros((n, S)), np.zeros((n, S))
    zs, ps, qs = np.zeros((n, S)), np.zeros((n, S)), np.zeros((n, S))
    m = n if tangent else 0  # the tangents' buffers, empty without them
    dxs, drs, dzs = np.zeros((m, S)), np.zeros((m, S)), np.zeros((m, S))
    dps, dqs = np.zeros((m, S)), np.zeros((m, S))
    task_of = np.full(S, -1, dtype=np.int64)
    fresh = np.zeros(S, dtype=np.bool_)
    step, dstep, beta, dbeta = np.zeros(S), np.zeros(S), np.zeros(S), np.zeros(S)
    rz, drz, rz_next, drz_next = np.zeros(S), np.zeros(S), np.zeros(S), np.zeros(S)
    pq, dpq, norm, rdr = np.zeros(S), np.zeros(S), np.zeros(S), np.zeros(S)
    scale = np.ones(S)
    count = np.zeros(S, dtype=np.int64)
    work = np.empty(n)
    column = np.empty(nnz_lower)
    dcolumn = np.zeros(nnz_lower)
    position = np.full(n, -1, dtype=np.int64)
    following = 0
    active = 0
    used = S  # slots [0, used) hold the running tasks once the queue is empty
    for s in range(S):  # an idle slot: identity factor, zero matrix, zero vectors
        for i in range(n):
            factor[lower_ptr[i + 1] - 1, s] = 1.0
    while True:
        # Give every empty slot a task that needs iterating, while there are tasks.
        for s in range(S):
            while task_of[s] < 0 and following < tasks.shape[0]:
                t = tasks[following]
                following += 1
                ok = _ic0(lower_ptr, lower_cols, lower_source, values[t], alpha[t], tangent,
                          column, dcolumn, position)  # fmt: skip
                _matvec(indptr, indices, values[t], x[t], work)
                squares = 0.0
                total = 0.0
                for i in range(n):
                    work[i] = b[t, i] - work[i]
                    squares += work[i] * work[i]
                    total += b[t, i] * b[t, i]
                error = np.sqrt(squares) / np.sqrt(total)
                history[t, 0] = error
                if not ok:
                    failed[t] = True
                    for k in range(width):
                        history[t, k] = error
                    continue
                if tol > 0 and error <= tol:
                    converged[t] = True
                    iterations[t] = 0
                    continue
                if max_iterations == 0:
                    iterations[t] = 0
                    continue
                task_of[s] = t
                active += 1
                fresh[s] = True
                count[s] = 0
                scale[s] = np.sqrt(total)
                for e in range(nnz):
                    matrix[e, s] = values[t, e]
                for e in range(nnz_lower):
                    factor[e, s] = column[e]
                for i in range(n):
                    xs[i, s] = x[t, i]
                    rs[i, s] = work[i]
                if tangent:
                    for e in range(nnz_lower):
                        dfactor[e, s] = dcolumn[e]
                    for i in range(n):
                        dxs[i, s] = 0.0
                        drs[i, s] = 0.0
        if active == 0:
            break
        _precondition(lower_ptr, lower_cols, factor, rs, ys, zs, used)
        if tangent:
            _precondition_tangent(lower_ptr, lower_cols, factor, dfactor, ys, zs, drs, dzs, used)
        rz_next[:] = 0.0
        drz_next[:] = 0.0
        for i in range(n):
            for s in range(used):
                rz_next[s] += rs[i, s] * zs[i, s]
        if tangent:
            for i in range(n):
                for s in range(used):
                    drz_next[s] += drs[i, s] * zs[i, s] + rs[i, s] * dzs[i, s]
        for s in range(used):  # a fresh slot starts with p = z
            usable = rz[s] > 0 and not fresh[s]
            beta[s] = rz_next[s] / rz[s] if usable else 0.0
            dbeta[s] = (drz_next[s] - beta[s] * drz[s]) / rz[s] if usable else 0.0
            fresh[s] = False
            rz[s] = rz_next[s]
            drz[s] = drz_next[s]
        if tangent:
            for i in range(n):
                for s in range(used):
                    dps[i, s] = dzs[i, s] + dbeta[s] * ps[i, s] + beta[s] * dps[i, s]
        for i in range(n):
            for s in range(used):
                ps[i, s] = zs[i, s] + beta[s] * ps[i, s]
        _block_matvec(indptr, indices, matrix, ps, qs, used)
        pq[:] = 0.0
        for i in range(n):
            for s in range(used):
                pq[s] += ps[i, s] * qs[i, s]
        for s in range(used):
            step[s] = rz[s] / pq[s] if pq[s] > 0 and task_of[s] >= 0 else 0.0
        if tangent:
            _block_matvec(indptr, indices, matrix, dps, dqs, used)
            dpq[:] = 0.0
            for i in range(n):
                for s in range(used):
                    dpq[s] += dps[i, s] * qs[i, s] + ps[i, s] * dqs[i, s]
            for s in range(used):
                dstep[s] = (drz[s] - step[s] * dpq[s]) / pq[s] if step[s] != 0 else 0.0
        norm[:] = 0.0
        for i in range(n):
            for s in range(used):
                xs[i, s] += step[s] * ps[i, s]
                rs[i, s] -= step[s] * qs[i, s]
                norm[s] += rs[i, s] * rs[i, s]
        if tangent:
            rdr[:] = 0.0
            for i in range(n):
                for s in range(used):
                    dxs[i, s] += dstep[s] * ps[i, s] + step[s] * dps[i, s]
                    drs[i, s] -= dstep[s] * qs[i, s] + step[s] * dqs[i, s]
                    rdr[s] += rs[i, s] * drs[i, s]
        for s in range(used):
            t = task_of[s]
            if t < 0:
                continue
            count[s] += 1
            k = count[s]
            residual = np.sqrt(norm[s])
            history[t, k] = residual / scale[s]
            if tangent and residual > 0:
                dhistory[t, k] = rdr[s] / (residual * scale[s])
            done = tol > 0 and history[t, k] <= tol
            if done or k == max_iterations:
                converged[t] = done
                iterations[t] = k
                for i in range(n):
                    x[t, i] = xs[i, s]
                    xs[i, s] = 0.0
                    rs[i, s] = 0.0
                if tangent:
                    for i in range(n):
                        dx[t, i] = dxs[i, s]
                task_of[s] = -1
                active -= 1
        if following == tasks.shape[0]:
            # No task is left to take: move the running tasks to the first slots, so
            # that the loops above run over them alone.
            s = 0
            while s < used:
                if task_of[s] >= 0:
                    s += 1
                    continue
                used -= 1
                if used > s:
                    _move_slot(
                        used, s, task_of, fresh, rz, drz, scale, count, matrix, factor,
                        dfactor, xs, rs, ys, zs, ps, qs, dxs, drs, dzs, dps, dqs,
                    )  # fmt: skip


@njit(cache=True)
def _ic0(lower_ptr, lower_cols, lower_source, values, alpha, tangent, factor, dfactor, position):
    """IC(0) of ``A + alpha diag(A)`` on the lower pattern, row by row, with its tangent.

    Returns ``False`` at the first pivot that is not positive (PETSc's ICC fails
    there too, with a zero pivot or an indefinite preconditioner).
    ``position`` is a work array of ``N`` entries, all ``-1``, and is left so.
    """
    n = lower_ptr.shape[0] - 1
    for i in range(n):  # position[j]: where row i holds column j, or -1
        start, stop = lower_ptr[i], lower_ptr[i + 1]
        for e in range(start, stop):
            position[lower_cols[e]] = e
        for e in range(start, stop - 1):
            k = lower_cols[e]
            total = values[lower_source[e]]
            dtotal = 0.0
            # sum over j < k of L[i, j] L[k, j], walking row k and looking j up in row i
            for f in range(lower_ptr[k], lower_ptr[k + 1] - 1):
                g = position[lower_cols[f]]
                if g >= 0:
                    total -= factor[g] * factor[f]
                    if tangent:
                        dtotal -= dfactor[g] * factor[f] + factor[g] * dfactor[f]
            pivot = factor[lower_ptr[k + 1] - 1]
            factor[e] = total / pivot
            if tangent:
                dfactor[e] = (dtotal - factor[e] * dfactor[lower_ptr[k + 1] - 1]) / pivot
        d = stop - 1
        diagonal = values[lower_source[d]]
        total = diagonal + alpha * diagonal
        dtotal = diagonal
        for e in range(start, d):
            total -= factor[e] * factor[e]
            dtotal -= 2.0 * factor[e] * dfactor[e]
        for e in range(start, stop):
            position[lower_cols[e]] = -1
        if not total > 0:
            position[:] = -1
            return False
        factor[d] = np.sqrt(total)
        if tangent:
            dfactor[d] = dtotal / (2.0 * factor[d])
    return True


@njit(cache=True)
def _matvec(indptr, indices, values, vector, out):
    """``out = A vector`` for one task."""
    n = indptr.shape[0] - 1
    for i in range(n):
        total = 0.0
        for e in range(indptr[i], indptr[i + 1]):
            total += values[e] * vector[indices[e]]
        out[i] = total


@njit(cache=True)
def _move_slot(source, target, task_of, fresh, rz, drz, scale, count, *columns):
    """Move slot ``source``'s task, scalars and columns to slot ``target``."""
    task_of[target], fresh[target] = task_of[source], fresh[source]
    rz[target], drz[target] = rz[source], drz[source]
    scale[target], count[target] = scale[source], count[source]
    task_of[source] = -1
    for array in columns:
        for row in range(array.shape[0]):
            array[row, target] = array[row, source]


@njit(cache=True)
def _block_matvec(indptr, indices, matrix, vectors, out, slots):
    """``out[:, s] = A_s vectors[:, s]`` for the first ``slots`` slots."""
    n = vectors.shape[0]
    total = np.empty(slots)
    for i in range(n):
        total[:] = 0.0
        for e in range(indptr[i], indptr[i + 1]):
            j = indices[e]
            for s in range(slots):
                total[s] += matrix[e, s] * vectors[j, s]
        for s in range(slots):
            out[i, s] = total[s]


@njit(cache=True)
def _precondition(lower_ptr, lower_cols, factor, r, y, z, slots):
    """``z = (L L^T)^{-1} r`` for the first ``slots`` slots: ``L y = r`` forward, then
    ``L^T z = y`` backward."""
    n = r.shape[0]
    total = np.empty(slots)
    for i in range(n):
        d = lower_ptr[i + 1] - 1
        for s in range(slots):
            total[s] = r[i, s]
        for e in range(lower_ptr[i], d):
            j = lower_cols[e]
            for s in range(slots):
                total[s] -= factor[e, s] * y[j, s]
        for s in range(slots):
            y[i, s] = total[s] / factor[d, s]
    for i in range(n):
        for s in range(slots):
            z[i, s] = y[i, s]
    for i in range(n - 1, -1, -1):
        d = lower_ptr[i + 1] - 1
        for s in range(slots):
            z[i, s] /= factor[d, s]
        for e in range(lower_ptr[i], d):
            j = lower_cols[e]
            for s in range(slots):
                z[j, s] -= factor[e, s] * z[i, s]


@njit(cache=True)
def _precondition_tangent(lower_ptr, lower_cols, factor, dfactor, y, z, dr, dz, slots):
    """The tangent of :func:`_precondition`, given its ``y`` and ``z``:
    ``dy = L^{-1} (dr - dL y)``, then ``dz = L^{-T} (dy - dL^T z)``."""
    n = z.shape[0]
    total = np.empty(slots)
    for i in range(n):
        d = lower_ptr[i + 1] - 1
        for s in range(slots):
            total[s] = dr[i, s] - dfactor[d, s] * y[i, s]
        for e in range(lower_ptr[i], d):
            j = lower_cols[e]
            for s in range(slots):
                total[s] -= dfactor[e, s] * y[j, s] + factor[e, s] * dz[j, s]
        for s in range(slots):
            dz[i, s] = total[s] / factor[d, s]
    for i in range(n - 1, -1, -1):
        d = lower_ptr[i + 1] - 1
        for s in range(slots):
            dz[i, s] = (dz[i, s] - dfactor[d, s] * z[i, s]) / factor[d, s]
        for e in range(lower_ptr[i], d):
            j = lower_cols[e]
            for s in range(slots):
                dz[j, s] -= dfactor[e, s] * z[i, s] + factor[e, s] * dz[i, s]
