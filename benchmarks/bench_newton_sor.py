"""Newton-SOR on Robertson steps: what a training step and an evaluation cost.

Measured side by side in one run, one torch thread by default:

- one training step of Psi_both with the surrogate (eps = 1e-9, m = 2000) on
  a batch of the paper's size: forward and backward, with the network;
- evaluation throughput (no gradient, cap 10^4) of the batched torch solver,
  against the same iteration written per task in numpy (``tests/test_newton_sor.py``
  checks that the two count the same iterations).

    python benchmarks/bench_newton_sor.py [--batch 16384] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from femeta.experiments import get_experiment
from femeta.metasolvers import PreviousStep

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_newton_sor import numpy_newton_sor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--numpy-tasks", type=int, default=2000)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    experiment = get_experiment("robertson", head="both")
    tasks = experiment.tasks("train", 0)
    torch.manual_seed(0)
    network = experiment.metasolver("nn", tasks)
    objective = experiment.objective("surrogate", 2000, 1e-9)
    order = torch.randperm(len(tasks), generator=torch.Generator().manual_seed(0))

    forward, backward, longest = [], [], []
    for repeat in range(args.repeats):
        batch = tasks.subset(order[repeat * args.batch : (repeat + 1) * args.batch])
        network.zero_grad()
        start = time.perf_counter()
        loss = objective(network, batch).mean()
        middle = time.perf_counter()
        loss.backward()
        forward.append(middle - start)
        backward.append(time.perf_counter() - middle)
        with torch.no_grad():
            longest.append(int(experiment.solve(network, batch, 1e-9, 2000).iterations.max()))
    print(f"training step, batch {args.batch}, {args.threads} thread(s), median of {args.repeats}:")
    fwd, bwd = statistics.median(forward), statistics.median(backward)
    print(f"  forward {fwd:.2f} s, backward {bwd:.2f} s "
          f"(longest solve in the batch: {statistics.median(longest):.0f} iterations)")  # fmt: skip

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
