"""Newton-SOR on Robertson steps: what a training step and an evaluation cost.

Measured side by side in one run, one torch thread by default:

- one training step of Psi_both with the surrogate (eps = 1e-9, m = 2000) on
  a batch of the paper's size: forward and backward, with the network; with
  ``--against REV``, also with ``femeta/losses.py`` as it was at git revision
  ``REV``, alternating, and the largest difference in loss and gradient;
- evaluation throughput (no gradient, cap 10^4) of the batched torch solver,
  against the same iteration written per task in numpy (``tests/test_newton_sor.py``
  checks that the two count the same iterations).

    python benchmarks/bench_newton_sor.py [--batch 16384] [--repeats 3] [--threads 1]
                                          [--against REV]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from femeta.experiments import get_experiment
from femeta.losses import iteration_surrogate
from femeta.metasolvers import PreviousStep

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _revision import load_revision
from test_newton_sor import numpy_newton_sor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--numpy-tasks", type=int, default=2000)
    parser.add_argument("--against", help="git revision whose femeta/losses.py to time too")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    experiment = get_experiment("robertson", head="both")
    tasks = experiment.tasks("train", 0)
    torch.manual_seed(0)
    network = experiment.metasolver("nn", tasks)
    order = torch.randperm(len(tasks), generator=torch.Generator().manual_seed(0))
    surrogates = {"this checkout": iteration_surrogate}
    if args.against:
        earlier = load_revision(args.against, "femeta/losses.py")
        surrogates = {args.against: earlier.iteration_surrogate, **surrogates}

    times: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in surrogates}
    longest, difference = [], 0.0
    for repeat in range(args.repeats):
        batch = tasks.subset(order[repeat * args.batch : (repeat + 1) * args.batch])
        outcomes = []
        for name, surrogate in surrogates.items():
            network.zero_grad()
            start = time.perf_counter()
            loss = surrogate(experiment.solve(network, batch, 1e-9, 2000), 1e-9).mean()
            middle = time.perf_counter()
            loss.backward()
            times[name][0].append(middle - start)
            times[name][1].append(time.perf_counter() - middle)
            grads = torch.cat([p.grad.flatten() for p in network.parameters()])
            outcomes.append((loss.detach(), grads))
        for loss, grads in outcomes[1:]:
            reference_loss, reference_grads = outcomes[0]
            difference = max(
                difference,
                float((loss - reference_loss).abs() / reference_loss.abs()),
                float((grads - reference_grads).norm() / reference_grads.norm()),
            )
        with torch.no_grad():
            longest.append(int(experiment.solve(network, batch, 1e-9, 2000).iterations.max()))
    print(f"training step, batch {args.batch}, {args.threads} thread(s), median of "
          f"{args.repeats} (longest solve in the batch: {statistics.median(longest):.0f} "
          "iterations):")  # fmt: skip
    steps = {}
    for name, (forward, backward) in times.items():
        fwd, bwd = statistics.median(forward), statistics.median(backward)
        steps[name] = statistics.median(f + b for f, b in zip(forward, backward, strict=True))
        print(f"  losses.py of {name}: forward {fwd:.2f} s, backward {bwd:.2f} s")
    if args.against:
        ratio = steps[args.against] / steps["this checkout"]
        print(f"  step time {args.against} / this checkout: {ratio:.2f}; largest relative "
              f"difference in the loss or the gradient: {difference:.1e}")  # fmt: skip

    psi = PreviousStep(1.2)
    sample = tasks.subset(order[: args.numpy_tasks])
    start = time.perf_counter()
    stats = experiment.stats(psi, sample, 1e-9, 10_000)
    torch_seconds = time.perf_counter() - start
    start = time.perf_counter()
    counts = [
        numpy_newton_sor(sample["c"][i].numpy(), sample["h"][i].item(), sample["y_prev"][i].numpy(),
                         sample["y_prev"][i].numpy(), 1.2, 1e-9, 10_000)[0]
        for i in range(len(sample))
    ]  # fmt: skip
    numpy_seconds = time.perf_counter() - start
    assert counts == stats.iterations.tolist()
    print(f"evaluation, r = 1.2, {len(sample)} tasks, {stats.mean_iterations:.2f} mean iterations:")
    ratio = numpy_seconds / torch_seconds
    print(f"  torch batched {len(sample) / torch_seconds:.0f} tasks/s, numpy per task "
          f"{len(sample) / numpy_seconds:.0f} tasks/s ({ratio:.1f}x)")  # fmt: skip


if __name__ == "__main__":
    main()
