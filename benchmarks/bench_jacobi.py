"""Throughput of the batched torch Jacobi solver against a plain numpy loop.

Run: python benchmarks/bench_jacobi.py [--tasks 1000] [--repeats 5]
Prints the median wall time of each variant, measured side by side.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from femeta.problems.poisson1d import Poisson1D, closed_form_matrix
from femeta.solvers import jacobi


def numpy_loop(A, F, U, tol, cap):
    d = np.diag(A)
    counts = []
    for f, u in zip(F, U, strict=True):
        x, k, scale = np.zeros_like(f), 0, np.linalg.norm(u)
        while np.linalg.norm(x - u) > tol * scale and k < cap:
            x = x + (f - A @ x) / d
            k += 1
        counts.append(k)
    return np.array(counts)


def median_seconds(run, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tol", type=float, default=1e-6)
    args = parser.parse_args()
    torch.set_num_threads(1)
    tasks = Poisson1D(16, p=0.01).sample(args.tasks, seed=0)
    A = torch.from_numpy(closed_form_matrix(16))
    F, U = tasks["f"], tasks["solution"]

    def torch_run(block_size):
        return lambda: jacobi(
            A, F, tol=args.tol, max_iterations=10_000, reference=U, block_size=block_size
        )

    x0 = torch.zeros_like(F, requires_grad=True)

    def with_gradient():
        result = jacobi(A, F, x0, tol=args.tol, max_iterations=10_000, reference=U)
        result.history.sum().backward()

    variants = {
        "torch, blocks of 64 (default)": torch_run(64),
        "torch, one step at a time": torch_run(1),
        "torch, blocks of 64, forward + backward": with_gradient,
        "numpy loop, one task at a time": lambda: numpy_loop(
            A.numpy(), F.numpy(), U.numpy(), args.tol, 10_000
        ),
    }
    reference = numpy_loop(A.numpy(), F.numpy(), U.numpy(), args.tol, 10_000)
    assert np.array_equal(torch_run(64)().iterations.numpy(), reference)
    print(f"{args.tasks} tasks, tol {args.tol:g}, mean {reference.mean():.2f} iterations")
    base = None
    for name, run in variants.items():
        seconds = median_seconds(run, args.repeats)
        base = base or seconds
        print(f"{name:42s} {seconds * 1e3:9.1f} ms  {args.tasks / seconds:10.0f} tasks/s  "
              f"x{seconds / base:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
