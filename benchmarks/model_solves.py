"""A shift model against what a FEniCS user has, on test tasks assembled as a script does.

Run from the repository root, serially or under ``mpiexec`` (each task's mesh is
distributed over the ranks; in parallel ICC(0) is block Jacobi with ICC(0) blocks)::

    .venv/bin/mpiexec -n 2 .venv/bin/python benchmarks/model_solves.py --model RUN --tasks 100

The tasks are the model's test split (``femeta evaluate``'s, at the model's seed):
beams (at the model's mesh, or the same parameters on the mesh ``--cells``) or
the tasks of a family file. Each is assembled as ``femeta solve`` assembles it
(``Experiment.script_system``) and solved by CG to ``--tol`` from a zero guess
with: the learned shift (guarded, as in a script), Psi_base's shift (guarded),
PETSc's ICC with its default shift, and GAMG (for beams with the six rigid-body
modes as near-nullspace). On the first ``--best`` tasks, Psi_best is the best of
the 31 shifts 1e-5..10 (unguarded; each solve capped at the best count so far,
which does not change the minimum); ``psi_best_near`` solves again at Psi_best's
shift times 10^0.1 and 10^-0.1 (half a grid step; guarded) and gives the mean of
the two counts: how much of Psi_best's minimum a shift that is off by 26%, e.g. a
smooth function of the task's parameters, keeps. Unconverged solves count as the
cap (``10 N``). Rank 0 prints one JSON line per task (each solver's iterations,
convergence, seconds, shift and PETSc's reason) and a summary; with ``--out
FILE`` it also appends the line to FILE, and a rerun with the same FILE solves only the
tasks not in it (long runs at 10^5 unknowns survive being stopped) and summarises all.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from femeta._fenics import import_dolfinx

import_dolfinx()
from mpi4py import MPI  # noqa: E402
from petsc4py import PETSc  # noqa: E402

import femeta  # noqa: E402
from femeta import comparison  # noqa: E402
from femeta.experiments import EXPERIMENTS, get_experiment  # noqa: E402
from femeta.fenics import ShiftedICC, configure, set_icc  # noqa: E402
from femeta.problems.base import split_size_and_seed  # noqa: E402
from femeta.problems.elasticity import SPLITS, ElasticBeam  # noqa: E402
from femeta.workflow import base_alpha  # noqa: E402

GRID = np.logspace(-5, 1, 31)
SOLVERS = ("learned", "psi_base", "psi_best", "psi_best_near", "petsc_icc", "gamg")
BEST = ("psi_best", "psi_best_near")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="run directory of a beam or family model")
    parser.add_argument("--tasks", type=int, default=100, help="test tasks to solve")
    parser.add_argument("--best", type=int, default=10, help="tasks that get Psi_best")
    parser.add_argument("--tol", type=float, default=1e-6)
    parser.add_argument("--cap", type=float, default=10.0, help="iteration cap, times N")
    parser.add_argument(
        "--cells", type=int, nargs=3, help="beams: another mesh for them (default: the model's)"
    )
    parser.add_argument(
        "--solvers", nargs="+", default=list(SOLVERS), choices=SOLVERS, help="what to run"
    )
    parser.add_argument(
        "--out", type=Path, help="JSON lines file: append each task's row; skip tasks in it"
    )
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    model = femeta.load(args.model)
    given = _test_tasks(model, args)[: args.tasks]
    base = base_alpha(model)
    rows = comm.bcast(_done(args, comm.size) if comm.rank == 0 else None, root=0)
    if isinstance(rows, str):
        if comm.rank == 0:
            print(f"model_solves.py: {rows}", file=sys.stderr)
        raise SystemExit(2)
    rows = [row for row in rows if row["task"] < len(given)]
    done = {row["task"] for row in rows}
    start = time.perf_counter()
    for task, values in enumerate(given):
        if task in done:
            continue
        system = EXPERIMENTS[model.problem].script_system(comm, model, values)
        A, b = system.A, system.b
        n = A.getSize()[0]
        cap = int(args.cap * n)
        probe = PETSc.KSP().create(comm)
        probe.setOperators(A)
        alpha = configure(probe, model, **system.params).alpha
        probe.destroy()
        shifts = {"learned": alpha, "psi_base": base}
        outcomes = [
            _solve(name, A, b, system.near_nullspace, shifts.get(name), args.tol, cap)
            for name in args.solvers
            if name not in BEST
        ]
        row = {
            "task": task, "label": system.label, "unknowns": n, "ranks": comm.size, "cap": cap,
            "tol": args.tol, "params": system.params,
            "solvers": {o.name: [o.iterations if o.converged else cap, o.converged, o.seconds,
                                 o.alpha, o.reason] for o in outcomes},
        }  # fmt: skip
        if task < args.best and set(BEST) & set(args.solvers):
            best = _best(A, b, args.tol, cap)
            if "psi_best" in args.solvers:
                row["solvers"]["psi_best"] = best
            if "psi_best_near" in args.solvers:
                row["solvers"]["psi_best_near"] = _near(A, b, best[3], args.tol, cap)
        rows.append(row)
        if comm.rank == 0:
            print(json.dumps(row), flush=True)
            if args.out is not None:
                with args.out.open("a") as out:
                    out.write(json.dumps(row) + "\n")
        A.destroy()
        b.destroy()
    if comm.rank == 0 and rows:
        rows.sort(key=lambda row: row["task"])
        _summary(rows, args, time.perf_counter() - start)


def _done(args: argparse.Namespace, ranks: int) -> list[dict] | str:
    """The rows already in ``--out``, or why this run cannot add to them."""
    if args.out is None:
        return []
    if not args.out.parent.is_dir():
        return f"--out {args.out}: there is no folder {args.out.parent}; make it first"
    if not args.out.is_file():
        return []
    wanted = set(args.solvers) - set(BEST)
    try:
        rows = [json.loads(line) for line in args.out.read_text().splitlines() if line.strip()]
        for row in rows:
            asked = (ranks, int(args.cap * row["unknowns"]), args.tol)
            if (row["ranks"], row["cap"], row["tol"]) != asked or not (
                wanted <= set(row["solvers"])
            ):
                return (
                    f"{args.out} holds task {row['task']} solved on {row['ranks']} rank(s) to "
                    f"{row['tol']}, cap {row['cap']}, with "
                    f"{', '.join(sorted(row['solvers']))}: not what this run asks. Give another "
                    "--out, or this file's ranks, --tol, --cap and --solvers."
                )
    except (ValueError, KeyError, TypeError) as error:
        return f"{args.out} is not a file of this script's rows ({error!r}); give another --out"
    return rows


def _test_tasks(model: femeta.Model, args: argparse.Namespace) -> list[dict]:
    """What ``script_system`` takes for each test task of the model."""
    config = json.loads((model.run_dir / "config.json").read_text())
    seed = config["options"]["seed"]
    if model.problem == "family":
        # The family, distributions and splits the model was trained on, as it saved them.
        family = get_experiment("family", **config["problem_params"]).problem
        count, seed = split_size_and_seed("test", seed, family.splits)
        return [
            {"param": [f"{name}={value!r}" for name, value in zip(family.param_names, row,
                                                                   strict=True)]}
            for row in family.draw(count, seed).tolist()
        ]  # fmt: skip
    cells = tuple(args.cells or config["problem_params"]["cells"])
    splits = config["problem_params"].get("splits", (1000, 1000, 1000))
    count, seed = split_size_and_seed("test", seed, dict(zip(SPLITS, splits, strict=True)))
    return [
        {"cells": cells, "W": width, "lambda_": lam, "mu": mu, "rho": rho}
        for width, lam, mu, rho in ElasticBeam(cells).draw(count, seed).tolist()
    ]


def _solve(
    name: str, A: PETSc.Mat, b: PETSc.Vec, near_nullspace: object, alpha: float | None,
    tol: float, cap: int,
) -> comparison.Outcome:  # fmt: skip
    if name == "petsc_icc":
        return comparison.default_icc(A, b, tol, cap)
    if name == "gamg":
        return comparison.gamg(A, b, tol, cap, near_nullspace)
    return comparison.shifted_icc(name, A, b, alpha, tol, cap)


def _best(A: PETSc.Mat, b: PETSc.Vec, tol: float, cap: int) -> list:
    """Psi_best: the fewest iterations over the grid, its convergence, seconds and shift."""
    ksp = PETSc.KSP().create(A.comm)
    ksp.setOptionsPrefix("femeta_best_")
    ksp.setOperators(A)
    ksp.setType(PETSc.KSP.Type.CG)
    ksp.setNormType(PETSc.KSP.NormType.UNPRECONDITIONED)
    shifted = ShiftedICC(ksp, 1.0)
    x = A.createVecRight()
    best = [cap, False, 0.0, None]
    for alpha in GRID:
        ksp.setOperators(A, shifted.shifted_matrix(float(alpha)))
        set_icc(ksp, default_shift=False)
        # Only a count below the best so far can win (ties go to the smaller shift).
        ksp.setTolerances(
            rtol=tol,
            atol=0.0,
            divtol=PETSc.UNLIMITED,
            max_it=max(1, best[0] - 1 if best[1] else cap),
        )
        x.set(0.0)
        begin = time.perf_counter()
        ksp.solve(b, x)
        seconds = A.comm.tompi4py().allreduce(time.perf_counter() - begin, op=MPI.MAX)
        if int(ksp.getConvergedReason()) > 0:
            best = [ksp.getIterationNumber(), True, seconds, float(alpha)]
    shifted.destroy()
    ksp.destroy()
    x.destroy()
    return best


def _near(A: PETSc.Mat, b: PETSc.Vec, alpha: float | None, tol: float, cap: int) -> list:
    """The mean count, whether both converged, mean seconds and ``alpha``, of the solves at
    ``alpha`` times 10^0.1 and 10^-0.1 (the cap where no shift of the grid converged)."""
    if alpha is None:
        return [cap, False, 0.0, None]
    outcomes = [
        comparison.shifted_icc("psi_best_near", A, b, alpha * 10.0**step, tol, cap)
        for step in (0.1, -0.1)
    ]
    counts = [o.iterations if o.converged else cap for o in outcomes]
    return [statistics.mean(counts), all(o.converged for o in outcomes),
            statistics.mean(o.seconds for o in outcomes), alpha]  # fmt: skip


def _summary(rows: list[dict], args: argparse.Namespace, seconds: float) -> None:
    names = [name for name in SOLVERS if name in rows[0]["solvers"]]
    first = rows[0]
    print(
        f"{first['label']}, N = {first['unknowns']}, {first['ranks']} rank(s), {len(rows)} test "
        f"tasks, CG to {args.tol:g}, cap {args.cap:g} N; {seconds:.0f} s in this run"
    )
    sample = [row for row in rows if set(BEST) & set(row["solvers"])]
    on_sample = f"on the {len(sample)} Psi_best tasks"
    print(f"{'solver':<14}{'mean its':>10}{'converged':>11}{'median s':>10}{on_sample:>28}"
          f"{'median alpha':>14}")  # fmt: skip
    for name in names:
        own = [row["solvers"][name] for row in rows if name in row["solvers"]]
        on_sample = statistics.mean(row["solvers"][name][0] for row in sample) if sample else 0
        alphas = [o[3] for o in own if o[3] is not None]
        shift = f"{statistics.median(alphas):>14.4g}" if alphas else ""
        print(
            f"{name:<14}{statistics.mean(o[0] for o in own):>10.1f}"
            f"{sum(o[1] for o in own) / len(own):>11.3f}"
            f"{statistics.median(o[2] for o in own):>10.3f}{on_sample:>28.1f}{shift}"
        )


if __name__ == "__main__":
    main()
