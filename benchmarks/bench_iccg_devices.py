"""The batched torch ICCG(alpha) on the CPU against the same solves on a CUDA GPU.

Run from the repository root, with femeta importable (installed, or ``PYTHONPATH=.``)::

    python benchmarks/bench_iccg_devices.py

Every variant solves the first ``--tasks`` clamped beams of the test split with the
same shift (10^-0.6 by default, as in ``bench_iccg.py``), tolerance and cap: on the GPU in
batches of each size in ``--batches``, on the CPU in the first size. The table
shows the median wall time of ``--repeats`` runs (``--cpu-repeats`` on the CPU),
after one untimed warm-up, and the solved tasks per second. "+ d/dalpha" also
carries the derivative in alpha and back-propagates the summed history, as a
training step does. The script then compares every variant's iteration counts,
convergence and ICF flags with the CPU's forward solve: rounding differs with
the batch and the kernels, and the slender beams' counts are sensitive to it,
so it says how many tasks differ and by how much. DOLFINx is needed
only if the test split (or the stored pattern) is not in femeta's cache yet.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from femeta.problems.elasticity import ElasticBeam
from femeta.solvers.iccg import iccg

_FIELDS = ("iterations", "converged", "factorization_failed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=1000, help="test tasks to solve")
    parser.add_argument("--batches", default="128,1000", help="comma-separated batch sizes")
    parser.add_argument("--alpha", type=float, default=10**-0.6, help="relative shift")
    parser.add_argument("--tol", type=float, default=1e-6)
    parser.add_argument("--max-iterations", type=int, default=243)
    parser.add_argument("--ic-pattern", choices=("values", "stored"), default="stored")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each variant")
    parser.add_argument("--cpu-repeats", type=int, help="timed runs on the CPU (--repeats)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("torch sees no CUDA GPU; this benchmark compares the CPU with one")
    if args.threads:
        torch.set_num_threads(args.threads)

    beam = ElasticBeam()
    tasks = beam.split("test", 0).subset(slice(0, args.tasks))
    # A sparse batch keeps its stored entries; dense matrices their nonzeros.
    A = tasks["A"] if args.ic_pattern == "stored" else tasks["A"].to_dense()
    stop = {"tol": args.tol, "max_iterations": args.max_iterations}
    gpu = torch.device("cuda")
    on = {
        "cpu": (A, tasks["b"], None),
        "cuda": (A.to(gpu), tasks["b"].to(gpu), None),
    }
    print(
        f"{len(tasks)} test beams, IC(0) on {args.ic_pattern} pattern, alpha = {args.alpha:.4g}, "
        f"tol = {args.tol}, m = {args.max_iterations}, CPU threads = {torch.get_num_threads()}, "
        f"GPU {torch.cuda.get_device_name(0)}, torch {torch.__version__}, "
        f"median of {args.repeats} (CPU: {args.cpu_repeats or args.repeats})"
    )
    outcomes = {}
    print(f"{'variant':<34}{'seconds':>10}{'tasks/s':>10}")
    sizes = [int(size) for size in args.batches.split(",")]
    for batch in sizes:
        parts = [slice(start, start + batch) for start in range(0, len(tasks), batch)]
        for device, (A, b, kept) in on.items():
            if device == "cpu" and batch != sizes[0]:
                continue  # the CPU solves in chunks of 128 whatever the batch
            alpha = torch.full((len(tasks),), args.alpha, dtype=torch.float64, device=A.device)
            for gradient in (False, True):
                run = _variant(A, b, alpha, kept, parts, gradient, stop)
                outcomes[device, batch, gradient] = run()  # warm-up, and the counts compared
                repeats = args.cpu_repeats if device == "cpu" and args.cpu_repeats else args.repeats
                seconds = statistics.median(_time(run, A.device) for _ in range(repeats))
                name = f"{device}, batch {batch}" + (" + d/dalpha" if gradient else "")
                print(f"{name:<34}{seconds:>10.3f}{len(tasks) / seconds:>10.1f}", flush=True)
    reference = outcomes["cpu", sizes[0], False]
    print(f"against the CPU's forward solve in batches of {sizes[0]}:")
    for (device, batch, gradient), outcome in outcomes.items():
        steps = outcome["iterations"].cpu()
        differ = torch.zeros(len(tasks), dtype=torch.bool)
        for field in _FIELDS:
            differ |= outcome[field].cpu() != reference[field]
        gap = (steps - reference["iterations"]).abs().max()
        print(
            f"  {device}, batch {batch}{' + d/dalpha' if gradient else ''}: mean iterations "
            f"{steps.double().mean():.3f}, converged {int(outcome['converged'].sum())}, "
            f"ICF failures {int(outcome['factorization_failed'].sum())}; "
            f"{int(differ.sum())} tasks differ, by at most {int(gap)} iterations"
        )
    peak = torch.cuda.max_memory_allocated() / 2**30
    print(f"peak GPU memory allocated: {peak:.2f} GiB")


def _variant(
    A: torch.Tensor,
    b: torch.Tensor,
    alpha: torch.Tensor,
    pattern: torch.Tensor | None,
    parts: list[slice],
    gradient: bool,
    stop: dict,
) -> Callable[[], dict[str, torch.Tensor]]:
    def run() -> dict[str, torch.Tensor]:
        results = []
        for part in parts:
            shift = alpha[part].clone().requires_grad_(gradient)
            result = iccg(A[part], b[part], shift, pattern=pattern, **stop)
            if gradient:
                result.history.sum().backward()
            results.append(result)
        return {name: torch.cat([getattr(r, name) for r in results]) for name in _FIELDS}

    return run


def _time(run: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
