"""Throughput and peak memory of femeta's sparse ICCG against a loop of PETSc KSPs, by mesh size.

Run from the repository root, with femeta importable (installed, or ``PYTHONPATH=.``)::

    .venv/bin/python benchmarks/bench_sparse_iccg.py --sizes 243 1e4 1e5

For each size, clamped beams of the elasticity family (W, lambda, mu, rho drawn as
in the paper) are assembled with DOLFINx on one mesh and solved at the same
shift, tolerance and cap by: :func:`femeta.solvers.iccg.iccg` on a
:class:`~femeta.solvers.sparse.SparseBatch` (compiled, on 1 and on all threads;
with the derivative in alpha on 1), and a loop of PETSc KSPs (CG + ICC(0) of
``A + alpha diag(A)``, matrices built before timing, one process). Each variant
runs in a process of its own, so its peak memory (growth of the resident set over
the loaded batch; Linux's peak is reset before timing) is its own. The table shows
the median wall time of the repetitions, tasks per second, the ratio to the PETSc
loop, and the peak memory against the batch's values and vectors
(``B (nnz + 4 N)`` float64).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SIZES = {  # name: (cells, batch, cap)
    "243": ((8, 2, 2), 128, 243),
    "1e4": ((40, 8, 8), 16, 2000),
    "1e5": ((90, 18, 18), 2, 2000),
}
VARIANTS = ("compiled, 1 thread", "compiled, all threads", "compiled + d/dalpha", "PETSc loop")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--alpha", type=float, default=10**-0.6, help="relative shift")
    parser.add_argument("--tol", type=float, default=1e-6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(_run_variant(args)))
        return
    print(f"alpha {args.alpha:g}, tol {args.tol:g}, {args.repeats} repeats, {os.cpu_count()} cores")
    header = f"{'N':>7} {'B':>4} {'variant':<22} {'median s':>9} {'tasks/s':>8} {'vs PETSc':>8}"
    print(header + f" {'mean its':>8} {'peak MB':>8} {'data MB':>8}")
    with tempfile.TemporaryDirectory() as folder:
        for size in args.sizes:
            cells, batch, cap = SIZES[size]
            data = Path(folder) / f"{size}.npz"
            n, nnz = _assemble(cells, batch, cap, args.seed, data)
            data_mb = batch * (nnz + 4 * n) * 8 / 2**20
            rows: dict[str, dict[str, float]] = {}
            for variant in args.variants:
                command = [sys.executable, __file__, "--variant", variant, "--data", str(data),
                           "--alpha", str(args.alpha), "--tol", str(args.tol),
                           "--repeats", str(args.repeats)]  # fmt: skip
                output = subprocess.run(command, check=True, capture_output=True, text=True)
                rows[variant] = json.loads(output.stdout.splitlines()[-1])
            reference = rows["PETSc loop"]["median"] if "PETSc loop" in rows else math.nan
            for variant, row in rows.items():
                print(
                    f"{n:>7} {batch:>4} {variant:<22} {row['median']:>9.3f} "
                    f"{batch / row['median']:>8.1f} {reference / row['median']:>7.2f}x "
                    f"{row['iterations']:>8.1f} {row['peak_mb']:>8.1f} {data_mb:>8.1f}"
                )


def _assemble(
    cells: tuple[int, int, int], batch: int, cap: int, seed: int, path: Path
) -> tuple[int, int]:
    """Beams of the family on ``cells``, symmetrised, saved as one shared pattern + values."""
    from mpi4py import MPI

    from femeta.problems.elasticity import ElasticBeam, beam_system
    from femeta.solvers.sparse import SparseBatch

    params = ElasticBeam(cache=False).draw(batch, seed).numpy()
    matrices, rhs, spaces = [], [], []
    for width, lam, mu, rho in params:
        A, b, space = beam_system(MPI.COMM_SELF, cells, width, lam, mu, rho)
        matrices.append(A)
        rhs.append(b.getArray().copy())
        spaces.append(space)
    batch_ = SparseBatch.from_petsc(matrices)
    transpose = _transpose_positions(batch_.indptr.numpy(), batch_.indices.numpy())
    values = (batch_.values.numpy() + batch_.values.numpy()[:, transpose]) / 2
    np.savez(path, indptr=batch_.indptr.numpy(), indices=batch_.indices.numpy(), values=values,
             b=np.stack(rhs), cap=cap)  # fmt: skip
    return batch_.shape[1], batch_.nnz


def _transpose_positions(indptr: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """For a structurally symmetric CSR pattern, where each entry's transpose sits."""
    n = len(indptr) - 1
    rows = np.repeat(np.arange(n), np.diff(indptr))
    return np.lexsort((rows, indices))  # by column, then row: the transpose's CSR order


def _run_variant(args: argparse.Namespace) -> dict[str, float]:
    import torch

    from femeta.solvers.iccg import iccg
    from femeta.solvers.sparse import SparseBatch

    data = np.load(args.data)
    cap = int(data["cap"])
    A = SparseBatch.from_csr(data["indptr"], data["indices"], data["values"])
    b = torch.from_numpy(data["b"])
    alpha = torch.full((len(b),), args.alpha, dtype=torch.float64)
    threads = os.cpu_count() if args.variant == "compiled, all threads" else 1
    torch.set_num_threads(threads)
    if args.variant == "PETSc loop":
        from bench_iccg import _bare_petsc  # this script's folder is on sys.path

        loop = _bare_petsc(A, args.alpha, args.tol, cap)

        def solve():
            return loop(b)
    elif args.variant == "compiled + d/dalpha":

        def solve():
            shift = alpha.clone().requires_grad_()
            result = iccg(A, b, shift, tol=args.tol, max_iterations=cap)
            result.history.sum().backward()
            return result.iterations
    else:

        def solve():
            return iccg(A, b, alpha, tol=args.tol, max_iterations=cap).iterations

    iccg(A[:1], b[:1], alpha[:1], tol=args.tol, max_iterations=2)  # compile or load the kernels
    before = _resident_mb()
    _reset_peak()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        iterations = solve()
        times.append(time.perf_counter() - start)
    peak = _peak_mb()
    return {
        "median": statistics.median(times),
        "iterations": float(np.mean(np.asarray(iterations))),
        "peak_mb": max(peak - before, 0.0),
    }


def _resident_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _reset_peak() -> None:
    """Start the peak resident set size afresh (Linux), so loading the data does not count."""
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")


def _peak_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


if __name__ == "__main__":
    main()
