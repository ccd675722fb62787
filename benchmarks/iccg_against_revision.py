"""The torch ICCG of this checkout against the one of an earlier git revision, side by side.

Run from the repository root, with femeta importable (installed, or ``PYTHONPATH=.``)::

    .venv/bin/python benchmarks/iccg_against_revision.py 1a1710e --repeats 3

The earlier ``femeta/solvers/iccg.py`` is read with ``git show`` and loaded as a
module of its own (it must still import against this checkout's
``femeta.solvers.base``). Both solve the same clamped-beam test tasks at one
shift, plain and with ``d/dalpha``, alternating within each repetition so
that both meet the same machine load; the table shows the medians and the
ratio earlier / now.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from femeta.problems.elasticity import ElasticBeam
from femeta.solvers.iccg import iccg


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
    solvers = {args.revision: _load_revision(args.revision).iccg, "this checkout": iccg}

    tasks = ElasticBeam().split("test", 0).subset(slice(0, args.tasks))
    A, b = tasks["A"], tasks["b"]
    alpha = torch.full((len(tasks),), args.alpha, dtype=torch.float64)
    parts = [slice(start, start + args.batch) for start in range(0, len(tasks), args.batch)]
    stop = {"tol": 1e-6, "max_iterations": 243}

    def plain(solve) -> float:
        iterations = [solve(A[part], b[part], alpha[part], **stop).iterations for part in parts]
        return float(torch.cat(iterations).double().mean())

    def with_derivative(solve) -> None:
        for part in parts:
            shift = alpha[part].clone().requires_grad_()
            solve(A[part], b[part], shift, **stop).history.sum().backward()

    print(
        f"{len(tasks)} test beams, batch {args.batch}, alpha = {args.alpha:.4g}, tol = 1e-6, "
        f"m = 243, torch threads = {args.threads}, median of {args.repeats}"
    )
    times: dict[tuple[str, str], list[float]] = {}
    runs = (("plain", plain), ("+ d/dalpha", with_derivative))
    for repeat in range(args.repeats):
        for name, solve in solvers.items():
            for variant, run in runs:
                start = time.perf_counter()
                value = run(solve)
                times.setdefault((name, variant), []).append(time.perf_counter() - start)
                if repeat == 0 and variant == "plain":
                    print(f"{name}: mean iterations {value:.3f}")
    print(f"{'variant':<14}{args.revision:>14}{'this checkout':>16}{'ratio':>8}")
    for variant in ("plain", "+ d/dalpha"):
        before = statistics.median(times[(args.revision, variant)])
        now = statistics.median(times[("this checkout", variant)])
        print(f"{variant:<14}{before:>13.2f}s{now:>15.2f}s{before / now:>8.2f}")


def _load_revision(revision: str):
    source = subprocess.run(
        ["git", "show", f"{revision}:femeta/solvers/iccg.py"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "iccg_at_revision.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("iccg_at_revision", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    main()
