"""What applying a model costs a DOLFINx script, against the solve it speeds up.

On one beam distributed over the MPI ranks: the time and memory of importing
femeta and loading a model, of predicting the shift (all ranks agree on it), and
of building ``P = A + alpha diag(A)``, against the guarded CG + ICC(0) solve.
Times are medians over ``--repeat`` runs, the slowest rank's.

    mpiexec -n 2 python benchmarks/script_overhead.py --model RUN --cells 120 16 16
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

from mpi4py import MPI

IMPORT_COST = """
import sys, time
def rss():
    with open("/proc/self/statm") as stream:
        return int(stream.read().split()[1]) * 4096 / 2**20
from mpi4py import MPI
import dolfinx, dolfinx.fem.petsc
before, start = rss(), time.perf_counter()
import femeta, femeta.fenics
W, lam, mu, rho = {params}
alpha = femeta.load({model!r}).predict(W=W, lambda_=lam, mu=mu, rho=rho)
print(f"import femeta + femeta.fenics, load, predict (after DOLFINx): "
      f"{{time.perf_counter() - start:.3f}} s, +{{rss() - before:.0f}} MB; "
      f"torch imported: {{'torch' in sys.modules}}")
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--cells", type=int, nargs=3, default=(120, 16, 16))
    parser.add_argument("--params", type=float, nargs=4, default=(0.2, 1.25, 1.0, 1.0),
                        metavar=("W", "LAMBDA", "MU", "RHO"))  # fmt: skip
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    from femeta.problems.elasticity import beam_system

    width, lam, mu, rho = args.params
    if comm.rank == 0:  # in a fresh process: this one has imported femeta's problems (torch)
        probe = IMPORT_COST.format(model=args.model, params=(width, lam, mu, rho))
        # Without the launcher's variables its MPI starts as a singleton.
        launcher = ("PMI_", "PMIX_", "OMPI_", "HYDRA_", "HYDI_", "MPIR_")
        env = {k: v for k, v in os.environ.items() if not k.startswith(launcher)}
        command = [sys.executable, "-c", probe]
        cost = subprocess.run(command, capture_output=True, text=True, env=env)
        print(cost.stdout.strip() or cost.stderr.strip().splitlines()[-1])
    A, b, space = beam_system(comm, tuple(args.cells), width, lam, mu, rho)
    from petsc4py import PETSc

    import femeta
    import femeta.fenics

    model = femeta.load(args.model)
    times = {"configure (predict, checks)": [], "P = A + alpha diag(A)": [], "guarded solve": []}
    iterations = []
    for _ in range(args.repeat):
        ksp = PETSc.KSP().create(comm)
        ksp.setOperators(A)
        ksp.setTolerances(rtol=1e-6, max_it=10 * A.getSize()[0])
        comm.Barrier()
        start = time.perf_counter()
        solver = femeta.fenics.configure(ksp, model, W=width, lambda_=lam, mu=mu, rho=rho)
        times["configure (predict, checks)"].append(time.perf_counter() - start)
        comm.Barrier()
        start = time.perf_counter()
        solver.shifted_matrix(solver.alpha)
        times["P = A + alpha diag(A)"].append(time.perf_counter() - start)
        x = A.createVecRight()
        comm.Barrier()
        start = time.perf_counter()
        report = solver.solve(b, x)
        comm.Barrier()
        times["guarded solve"].append(time.perf_counter() - start)
        iterations.append(report.iterations)
        solver.destroy()
        ksp.destroy()
        x.destroy()
    medians = {name: comm.allreduce(statistics.median(values), op=MPI.MAX)
               for name, values in times.items()}  # fmt: skip
    del space  # A and b live on its mesh's communicator
    if comm.rank == 0:
        print(f"{A.getSize()[0]} unknowns on {comm.size} ranks: {report}")
        solve = medians["guarded solve"]
        apply = medians["configure (predict, checks)"] + medians["P = A + alpha diag(A)"]
        for name, value in medians.items():
            print(f"  {name:30s} {value:8.4f} s")
        print(
            f"applying the model: {apply:.4f} s = {100 * apply / solve:.2f}% of the solve "
            "(the P build is also inside the solve's time)"
        )


if __name__ == "__main__":
    main()
