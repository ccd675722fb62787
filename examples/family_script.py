"""One task of a family file solved in a plain DOLFINx script with a learned ICC(0) shift.

The forms come from the family file (the user's own code); the lines marked
``# femeta:`` are all that a trained model adds. Train a model with
`femeta train family --family examples/anisotropic_poisson.py:make --out RUN`, then run
(also under mpiexec -n 2):

    python examples/family_script.py --model RUN --family examples/anisotropic_poisson.py \
        kappa0=1 kappa1=10 kappa2=100 kappa3=1000 theta=0.7 eps=0.01 wave=0.3
"""

import argparse
import runpy
import time

from mpi4py import MPI  # first: the DOLFINx wheel's libraries need MPI loaded

# isort: split
from dolfinx import fem
from dolfinx.fem import petsc
from petsc4py import PETSc

import femeta  # femeta:
import femeta.fenics  # femeta:
from femeta import comparison

parser = argparse.ArgumentParser(description="A family's task with a learned ICC shift.")
parser.add_argument("--model", required=True, metavar="RUN_DIR", help="a family run")
parser.add_argument("--family", required=True, metavar="FILE.py", help="the family file")
parser.add_argument("values", nargs="+", metavar="NAME=VALUE", help="the task's parameters")
args = parser.parse_args()
params = {name: float(value) for name, value in (item.split("=") for item in args.values)}
comm = MPI.COMM_WORLD

built = runpy.run_path(args.family)["make"](comm)
for name, value in params.items():
    built["parameters"][name].value = value
a, L, bcs = fem.form(built["a"]), fem.form(built["L"]), built["bcs"]
A = petsc.assemble_matrix(a, bcs=bcs)
A.assemble()
b = petsc.assemble_vector(L)
petsc.apply_lifting(b, [a], bcs=[bcs])
b.ghostUpdate(addv=PETSc.InsertMode.ADD, mode=PETSc.ScatterMode.REVERSE)
petsc.set_bc(b, bcs)
uh = fem.Function(built["a"].arguments()[0].ufl_function_space())

ksp = PETSc.KSP().create(comm)
ksp.setOperators(A)
ksp.setTolerances(rtol=1e-6, max_it=10 * A.getSize()[0])
# femeta: the model's shift for this task, from its parameters and statistics of A
model = femeta.load(args.model)
solver = femeta.fenics.configure(ksp, model, **params)
start = time.perf_counter()
# femeta: a guarded solve (a larger shift if IC(0) breaks down, PETSc's default if all else fails)
report = solver.solve(b, uh.x.petsc_vec)
seconds = time.perf_counter() - start
uh.x.scatter_forward()

# For comparison, PETSc's own ICC(0) with its default shift, and GAMG.
default = comparison.default_icc(A, b, 1e-6, 10 * A.getSize()[0])
gamg = comparison.gamg(A, b, 1e-6, 10 * A.getSize()[0])
if comm.rank == 0:
    print(f"unknowns: {A.getSize()[0]} on {comm.size} process(es)")
    print(f"alpha: {solver.alpha!r}")
    print(f"report: {report}")
    print(f"femeta: {report.iterations} iterations in {seconds:.4f} s")
    for outcome in (default, gamg):
        print(f"{outcome.name}: {outcome.iterations} iterations ({outcome.reason}) "
              f"in {outcome.seconds:.4f} s")  # fmt: skip
