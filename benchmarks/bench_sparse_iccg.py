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
(``B (nnz + 4 N)`` float64; on CUDA, the peak allocated on the device).

The variants ``torch`` and ``torch + d/dalpha`` run ``method="torch"`` (sparse
triangular solves) on ``--device``. On a GPU machine without DOLFINx, assemble
the batches elsewhere with ``--data-dir DIR`` (they are kept there) and take DIR
along::

    python benchmarks/bench_sparse_iccg.py --sizes 243 1e4 --data-dir DIR --device cuda \
        --variants "compiled, all threads" torch "torch + d/dalpha"
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
VARIANTS = (
    "compiled, 1 thread",
    "compiled, all threads",
    "compiled + d/dalpha",
    "PETSc loop",
    "torch",
    "torch + d/dalpha",
)
DEFAULT_VARIANTS = VARIANTS[:4]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--alpha", type=float, default=10**-0.6, help="relative shift")
    parser.add_argument("--tol", type=float, default=1e-6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=VARIANTS)
    parser.add_argument("--device", default="cpu", help="where the torch variants run")
    parser.add_argument(
        "--data-dir", help="keep the assembled batches here and reuse them (default: a temp dir)"
    )
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(_run_variant(args)))
        return
    print(f"alpha {args.alpha:g}, tol {args.tol:g}, {args.repeats} repeats, {os.cpu_count()} cores")
    header = f"{'N':>7} {'B':>4} {'variant':<22} {'median s':>9} {'tasks/s':>8} {'vs PETSc':>8}"
    print(header + f" {'mean its':>8} {'peak MB':>8} {'data MB':>8}")
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(args.data_dir or temporary)
        folder.mkdir(parents=True, exist_ok=True)
        for size in args.sizes:
            cells, batch, cap = SIZES[size]
            data = folder / f"{size}-seed{args.seed}.npz"
            if not data.exists():  # assembling needs DOLFINx; a kept batch does not
                _assemble(cells, batch, cap, args.seed, data)
            with np.load(data) as saved:
                n, nnz = saved["b"].shape[1], saved["indices"].shape[0]
            data_mb = batch * (nnz + 4 * n) * 8 / 2**20
            rows: dict[str, dict[str, float]] = {}
            for variant in args.variants:
                command = [sys.executable, __file__, "--variant", variant, "--data", str(data),
                           "--alpha", str(args.alpha), "--tol", str(args.tol),
                           "--repeats", str(args.repeats), "--device", args.device]  # fmt: skip
                output = subprocess.run(command, check=True, capture_output=True, text=True)
                rows[variant] = json.loads(output.stdout.splitlines()[-1])
            reference = rows["PETSc loop"]["median"] if "PETSc loop" in rows else math.nan
            for variant, row in rows.items():
                ratio = reference / row["median"]
                print(
                    f"{n:>7} {batch:>4} {variant:<22} {row['median']:>9.3f} "
                    f"{batch / row['median']:>8.1f} "
                    + (f"{ratio:>7.2f}x " if math.isfinite(ratio) else f"{'-':>8} ")
                    + f"{row['iterations']:>8.1f} {row['peak_mb']:>8.1f} {data_mb:>8.1f}"
                )


def _assemble(cells: tuple[int, int, int], batch: int, cap: int, seed: int, path: Path) -> None:
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
    values = (batch_.values + batch_.values[:, batch_.transposition()]) / 2
    np.savez(path, indptr=batch_.indptr.numpy(), indices=batch_.indices.numpy(),
             values=values.numpy(), b=np.stack(rhs), cap=cap)  # fmt: skip


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
    method, device = "auto", torch.device("cpu")
    if args.variant.startswith("torch"):  # the torch implementation, on --device
        method, device = "torch", torch.device(args.device)
        A, b, alpha = A.to(device), b.to(device), alpha.to(device)
    if args.variant == "PETSc loop":
        from bench_iccg import _bare_petsc  # this script's folder is on sys.path

        loop = _bare_petsc(A, args.alpha, args.tol, cap)

        def solve():
            return loop(b)
    elif args.variant.endswith("d/dalpha"):

        def solve():
            shift = alpha.clone().requires_grad_()
            result = iccg(A, b, shift, tol=args.tol, max_iterations=cap, method=method)
            result.history.sum().backward()
            return result.iterations.cpu()
    else:

        def solve():
            return iccg(
                A, b, alpha, tol=args.tol, max_iterations=cap, method=method
            ).iterations.cpu()

    iccg(A[:1], b[:1], alpha[:1], tol=args.tol, max_iterations=2, method=method)  # warm up
    before = _resident_mb()
    _reset_peak()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device) / 2**20
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        iterations = solve()  # on CUDA, .cpu() waits for the device
        times.append(time.perf_counter() - start)
    peak = _peak_mb()
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
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
