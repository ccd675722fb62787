"""How well can the paper's Psi_nn (MLP 16-15-15-16, SiLU) fit u = A^{-1} f directly?

A diagnostic for Table 3: the paper's m = 0 row (0.00 iterations at eps = 1e-2)
needs every test guess within 1% relative error of the solution. This fits the
same network by plain regression on the relative squared error (L_0), with a
generous budget, and prints the mean and worst relative error it reaches: with
Adam on mini-batches, or with full-batch L-BFGS (``--optimizer lbfgs``, where
``--steps`` counts L-BFGS iterations, 500 per report).

Run: python benchmarks/studies/poisson_mlp_capacity.py [--optimizer adam|lbfgs] [--steps 12000]
[--p 0.0]
"""

from __future__ import annotations

import argparse

import torch

from femeta.experiments import get_experiment


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=12000)
    parser.add_argument("--p", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--optimizer", choices=("adam", "lbfgs"), default="adam")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    experiment = get_experiment("poisson1d", p=args.p)
    train = experiment.tasks("train", args.seed)
    test = experiment.tasks("test", args.seed)
    psi = experiment.metasolver("nn")

    def relative_error(tasks):
        u = tasks["solution"]
        return (psi(tasks["f"]) - u).norm(dim=1) / u.norm(dim=1)

    def report(step):
        with torch.no_grad():
            error = relative_error(test)
        print(
            f"step {step:6d}: test relative error mean {error.mean():.4f}, "
            f"max {error.max():.4f}, share below 1e-2 {(error < 1e-2).double().mean():.3f}"
        )

    if args.optimizer == "lbfgs":
        lbfgs = torch.optim.LBFGS(
            psi.parameters(), max_iter=500, history_size=50, line_search_fn="strong_wolfe"
        )

        def closure():
            lbfgs.zero_grad()
            loss = relative_error(train).square().mean()
            loss.backward()
            return loss

        for step in range(500, args.steps + 1, 500):
            lbfgs.step(closure)
            report(step)
        return

    optimizer = torch.optim.Adam(psi.parameters(), lr=0.01, betas=(0.9, 0.999))
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, args.steps // 4, 0.2)
    generator = torch.Generator().manual_seed(args.seed)
    for step in range(1, args.steps + 1):
        batch = train.subset(torch.randint(0, len(train), (256,), generator=generator))
        optimizer.zero_grad()
        relative_error(batch).square().mean().backward()
        optimizer.step()
        schedule.step()
        if step % (args.steps // 4) == 0 or step == args.steps:
            report(step)


if __name__ == "__main__":
    main()
