"""The script path against `femeta evaluate` on the paper's test beams, and the guard.

For each test beam (N = 243): the shift from ``femeta.load(RUN).predict`` (numpy)
against the torch meta-solver's; the iterations of CG + ICC(0) on a beam assembled
the way a DOLFINx script does (``femeta.problems.elasticity.beam_system``) and
solved with ``femeta.fenics`` (guarded) against `femeta evaluate`'s torch ICCG on
the dataset's beam; and PETSc's default ICC beside both. At cap 10 N it counts
the solves that the guard loses and PETSc's default makes (the target is none).

    python benchmarks/script_path.py --model RUN [--count 1000]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from mpi4py import MPI

import femeta
from femeta.comparison import default_icc, shifted_icc
from femeta.problems.elasticity import beam_system
from femeta.workflow import load_metasolver

SLENDER = (0.02, 10.0, 0.1, 1.0)  # W, lambda, mu, rho: nearly incompressible, thin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="an elasticity run directory")
    parser.add_argument("--count", type=int, default=1000, help="test beams (at most 1000)")
    parser.add_argument("--tol", type=float, default=1e-6)
    args = parser.parse_args()
    start = time.perf_counter()
    experiment, psi = load_metasolver(args.model, "elasticity")
    model = femeta.load(args.model)
    tasks = experiment.tasks("test", 0)
    params = tasks["params"][: args.count]
    n = experiment.problem.n
    caps = {"N": n, "10 N": 10 * n}
    torch_alpha = psi(tasks["features"][: args.count]).detach().numpy()
    numpy_alpha = np.array(
        [model.predict(W=w, lambda_=lam, mu=mu, rho=rho) for w, lam, mu, rho in params.tolist()]
    )
    print(f"{len(params)} test beams, N = {n}, tol {args.tol:g}, model {args.model}")
    print(f"alpha, numpy against torch: max relative difference "
          f"{np.max(np.abs(numpy_alpha / torch_alpha - 1)):.2e}")  # fmt: skip
    evaluated, petsc_dataset = {}, {}
    first = tasks.subset(slice(0, args.count))
    for label, cap in caps.items():
        evaluated[label] = experiment.stats(psi, first, args.tol, cap).iterations
        # The dataset's (symmetrised) beams in PETSc: separates assembly from solver rounding.
        stats = experiment.stats(psi, first, args.tol, cap, engine="petsc")
        petsc_dataset[label] = stats.iterations
    script = {label: [] for label in caps}
    default = {label: [] for label in caps}
    lost, retried, fell_back = [], 0, 0
    beams = [*params.tolist(), list(SLENDER)]
    for index, (w, lam, mu, rho) in enumerate(beams):
        A, b, space = beam_system(MPI.COMM_SELF, experiment.cells, w, lam, mu, rho)
        alpha = model.predict(W=w, lambda_=lam, mu=mu, rho=rho)
        for label, cap in caps.items():
            guarded = shifted_icc("femeta", A, b, alpha, args.tol, cap)
            petsc = default_icc(A, b, args.tol, cap)
            if index < len(params):
                script[label].append(guarded.iterations if guarded.converged else cap)
                default[label].append(petsc.iterations if petsc.converged else cap)
            if label == "10 N":
                retried += len(guarded.attempts) > 1
                fell_back += guarded.alpha is None
                if petsc.converged and not guarded.converged:
                    lost.append(index)
                if index == len(params):
                    print(f"slender beam {SLENDER}: alpha {alpha:.4g}, guarded "
                          f"{guarded.iterations} iterations ({guarded.reason}, "
                          f"{len(guarded.attempts)} attempts, shift used {guarded.alpha}), "
                          f"PETSc default {petsc.iterations} ({petsc.reason})")  # fmt: skip
        A.destroy()
        b.destroy()
        del space
    for label, cap in caps.items():
        ours, theirs = np.array(script[label]), evaluated[label]
        petsc, dataset = np.array(default[label]), petsc_dataset[label]
        print(f"cap {label} = {cap}:")
        for name, counts in (("femeta evaluate (torch)", theirs),
                             ("PETSc on the dataset's beams", dataset),
                             ("script path (femeta.fenics)", ours),
                             ("PETSc default ICC", petsc)):  # fmt: skip
            print(f"  {name:30s} {counts.mean():7.2f}  converged {np.mean(counts < cap):.3f}")
        for name, counts in (("evaluate", theirs), ("PETSc on the dataset", dataset)):
            print(f"  script path = {name}: on {np.sum(ours == counts)} of {len(ours)} beams, "
                  f"largest difference {np.max(np.abs(ours - counts))}")  # fmt: skip
    print(f"guard at cap 10 N over {len(beams)} beams: {len(lost)} solves lost that "
          f"PETSc's default makes {lost}; {retried} retried, {fell_back} fell back")  # fmt: skip
    print(f"wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
