"""A beam model against what a FEniCS user has, on test beams assembled as a script does.

Run from the repository root, serially or under ``mpiexec`` (each beam's mesh is
distributed over the ranks; in parallel ICC(0) is block Jacobi with ICC(0) blocks)::

    .venv/bin/mpiexec -n 2 .venv/bin/python benchmarks/beam_sizes.py --model RUN --tasks 100

The test beams are the model's test split (``femeta evaluate``'s, at the model's
mesh and seed, or the same parameters on the mesh ``--cells``), each assembled with
:func:`femeta.problems.elasticity.beam_system` and solved by CG to ``--tol`` from a
zero guess with: the learned shift (guarded, as in a script), Psi_base's shift
(saved with the model, guarded), PETSc's ICC with its default shift, and GAMG with
the six rigid-body modes as near-nullspace. On the first ``--best`` beams,
Psi_best is the best of the 31 shifts 1e-5..10 (unguarded; each solve capped at
the best count so far, which does not change the minimum).
Unconverged solves count as the cap (``10 N``). Rank 0 prints one JSON line per
beam and a summary.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from femeta._fenics import import_dolfinx

import_dolfinx()
from mpi4py import MPI  # noqa: E402
from petsc4py import PETSc  # noqa: E402

import femeta  # noqa: E402
from femeta import comparison  # noqa: E402
from femeta.fenics import ShiftedICC, set_icc  # noqa: E402
from femeta.problems.base import split_size_and_seed  # noqa: E402
from femeta.problems.elasticity import SPLITS, ElasticBeam, beam_system  # noqa: E402
from femeta.workflow import base_alpha  # noqa: E402

GRID = np.logspace(-5, 1, 31)
SOLVERS = ("learned", "psi_base", "psi_best", "petsc_icc", "gamg")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="run directory of an elasticity model")
    parser.add_argument("--tasks", type=int, default=100, help="test beams to solve")
    parser.add_argument("--best", type=int, default=10, help="beams that get Psi_best")
    parser.add_argument("--tol", type=float, default=1e-6)
    parser.add_argument("--cap", type=float, default=10.0, help="iteration cap, times N")
    parser.add_argument(
        "--cells", type=int, nargs=3, help="another mesh for the same beams (default: the model's)"
    )
    parser.add_argument(
        "--solvers", nargs="+", default=list(SOLVERS), choices=SOLVERS, help="what to run"
    )
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    model = femeta.load(args.model)
    config = json.loads((model.run_dir / "config.json").read_text())
    cells = tuple(args.cells or config["problem_params"]["cells"])
    splits = config["problem_params"].get("splits", (1000, 1000, 1000))
    sizes = dict(zip(SPLITS, splits, strict=True))
    count, seed = split_size_and_seed("test", config["options"]["seed"], sizes)
    params = ElasticBeam(cells).draw(count, seed)[: args.tasks].tolist()
    base = base_alpha(model)
    rows = []
    start = time.perf_counter()
    for task, (width, lam, mu, rho) in enumerate(params):
        A, b, space = beam_system(comm, cells, width, lam, mu, rho)
        n = A.getSize()[0]
        cap = int(args.cap * n)
        alpha = model.predict(W=width, lambda_=lam, mu=mu, rho=rho)
        shifts = {"learned": alpha, "psi_base": base}
        outcomes = [
            _solve(name, A, b, space, shifts.get(name), args.tol, cap)
            for name in args.solvers
            if name != "psi_best"
        ]
        row = {
            "task": task, "unknowns": n, "ranks": comm.size, "cap": cap,
            "params": [width, lam, mu, rho],
            "solvers": {o.name: [o.iterations if o.converged else cap, o.converged, o.seconds,
                                 o.alpha] for o in outcomes},
        }  # fmt: skip
        if task < args.best and "psi_best" in args.solvers:
            row["solvers"]["psi_best"] = _best(A, b, args.tol, cap)
        rows.append(row)
        if comm.rank == 0:
            print(json.dumps(row), flush=True)
        A.destroy()
        b.destroy()
    if comm.rank == 0:
        _summary(rows, cells, args, time.perf_counter() - start)


def _solve(
    name: str, A: PETSc.Mat, b: PETSc.Vec, space: object, alpha: float | None, tol: float,
    cap: int,
) -> comparison.Outcome:  # fmt: skip
    if name == "petsc_icc":
        return comparison.default_icc(A, b, tol, cap)
    if name == "gamg":
        return comparison.gamg(A, b, tol, cap, comparison.rigid_body_modes(space))
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
        ksp.setTolerances(rtol=tol, atol=0.0, max_it=max(1, best[0] - 1 if best[1] else cap))
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


def _summary(rows: list[dict], cells: tuple, args: argparse.Namespace, seconds: float) -> None:
    names = [name for name in SOLVERS if name in rows[0]["solvers"]]
    print(
        f"beam {'x'.join(map(str, cells))}, N = {rows[0]['unknowns']}, {rows[0]['ranks']} "
        f"rank(s), {len(rows)} test beams, CG to {args.tol:g}, cap {args.cap:g} N; "
        f"{seconds:.0f} s in all"
    )
    sample = [row for row in rows if "psi_best" in row["solvers"]]
    on_sample = f"on the {len(sample)} Psi_best beams"
    print(f"{'solver':<10}{'mean its':>10}{'converged':>11}{'median s':>10}{on_sample:>28}"
          f"{'median alpha':>14}")  # fmt: skip
    for name in names:
        own = [row["solvers"][name] for row in rows if name in row["solvers"]]
        on_sample = statistics.mean(row["solvers"][name][0] for row in sample) if sample else 0
        alphas = [o[3] for o in own if o[3] is not None]
        shift = f"{statistics.median(alphas):>14.4g}" if alphas else ""
        print(
            f"{name:<10}{statistics.mean(o[0] for o in own):>10.1f}"
            f"{sum(o[1] for o in own) / len(own):>11.3f}"
            f"{statistics.median(o[2] for o in own):>10.3f}{on_sample:>28.1f}{shift}"
        )


if __name__ == "__main__":
    main()
