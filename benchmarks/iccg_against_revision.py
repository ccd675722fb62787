"""The ICCG solvers of this checkout against those of an earlier git revision, side by side.

Run from the repository root, with femeta importable (installed, or ``PYTHONPATH=.``)::

    .venv/bin/python benchmarks/iccg_against_revision.py 1a1710e --repeats 3

The earlier ``femeta/solvers/iccg.py`` is read with ``git show`` and loaded as a
module of its own (it must still import against this checkout's
``femeta.solvers.base``, so both use this checkout's input checks). Both
solve the same clamped-beam test tasks at one shift, with the torch ``iccg``
plain and with ``d/dalpha`` and with ``petsc_iccg``, alternating within each
repetition so that both meet the same machine load; the table shows the
medians and the ratio earlier / now.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from femeta.problems.elasticity import ElasticBeam
from femeta.solvers.iccg import iccg

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _revision import load_revision


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("revision", help="git revision whose femeta/solvers/iccg.py to compare")
    parser.add_argument("--tasks", type=int, default=1000, help="test tasks to solve")
    parser.add_argument("--batch", type=int, default=128, help="tasks per torch solve")
    parser.add_argument("--alpha", type=float, default=10**-0.8, help="relative shift")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    earlier = load_revision(args.revision, "femeta/solvers/iccg.py")
    modules = {args.revision: earlier, "this checkout": sys.modules[iccg.__module__]}

    tasks = ElasticBeam().split("test", 0).subset(slice(0, args.tasks))
    A, b = tasks["A"], tasks["b"]
    alpha = torch.full((len(tasks),), args.alpha, dtype=torch.float64)
    parts = [slice(start, start + args.batch) for start in range(0, len(tasks), args.batch)]
    stop = {"tol": 1e-6, "max_iterations": 243}

    def plain(module) -> float:
        solve = module.iccg
        iterations = [solve(A[part], b[part], alpha[part], **stop).iterations for part in parts]
        return float(torch.cat(iterations).double().mean())

    def with_derivative(module) -> None:
        for part in parts:
            shift = alpha[part].clone().requires_grad_()
            module.iccg(A[part], b[part], shift, **stop).history.sum().backward()

    def petsc(module) -> float:
        return float(module.petsc_iccg(A, b, alpha, **stop).iterations.double().mean())

    print(
        f"{len(tasks)} test beams, batch {args.batch}, alpha = {args.alpha:.4g}, tol = 1e-6, "
        f"m = 243, torch threads = {args.threads}, median of {args.repeats}"
    )
    times: dict[tuple[str, str], list[float]] = {}
    runs = (("plain", plain), ("+ d/dalpha", with_derivative), ("petsc_iccg", petsc))
    for repeat in range(args.repeats):
        for name, module in modules.items():
            for variant, run in runs:
                start = time.perf_counter()
                value = run(module)
                times.setdefault((name, variant), []).append(time.perf_counter() - start)
                if repeat == 0 and variant != "+ d/dalpha":
                    print(f"{name}, {variant}: mean iterations {value:.3f}")
    print(f"{'variant':<14}{args.revision:>14}{'this checkout':>16}{'ratio':>8}")
    for variant, _ in runs:
        before = statistics.median(times[(args.revision, variant)])
        now = statistics.median(times[("this checkout", variant)])
        print(f"{variant:<14}{before:>13.2f}s{now:>15.2f}s{before / now:>8.2f}")


if __name__ == "__main__":
    main()
