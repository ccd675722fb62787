"""A cantilever under its own weight, solved by CG with a learned ICC(0) shift.

A plain DOLFINx linear-elasticity script; the lines marked ``# femeta:`` are all
that a trained model adds. Beam [0, 1] x [0, W]^2 clamped at x = 0, gravity rho g
with g = 0.4 W^2 in -z: femeta's beam family. Train a model with
`femeta train elasticity --out RUN`, then run (also under mpiexec -n 2):

    python examples/cantilever.py --model RUN [--cells 8 2 2] [--W 0.2]
"""

import argparse
import time

from mpi4py import MPI  # first: the DOLFINx wheel's libraries need MPI loaded

# isort: split
import numpy as np
import ufl
from dolfinx import default_scalar_type, fem, mesh
from dolfinx.fem import petsc
from petsc4py import PETSc

import femeta  # femeta:
import femeta.fenics  # femeta:

parser = argparse.ArgumentParser(description="Cantilever with a learned ICC shift.")
parser.add_argument("--model", required=True, metavar="RUN_DIR", help="an elasticity run")
parser.add_argument("--cells", type=int, nargs=3, default=[8, 2, 2], metavar=("NX", "NY", "NZ"))
parser.add_argument("--W", type=float, default=0.2, help="width and height of the beam")
parser.add_argument("--lam", type=float, default=1.25, help="Lame's first parameter")
parser.add_argument("--mu", type=float, default=1.0, help="shear modulus")
parser.add_argument("--rho", type=float, default=1.0, help="density")
args = parser.parse_args()
comm = MPI.COMM_WORLD

domain = mesh.create_box(comm, [np.zeros(3), np.array([1.0, args.W, args.W])], args.cells,
                         cell_type=mesh.CellType.hexahedron)  # fmt: skip
V = fem.functionspace(domain, ("Lagrange", 1, (3,)))
lam, mu, rho = (fem.Constant(domain, default_scalar_type(v)) for v in (args.lam, args.mu, args.rho))
g = 0.4 * args.W**2


def epsilon(u):
    return ufl.sym(ufl.grad(u))


def sigma(u):
    return lam * ufl.tr(epsilon(u)) * ufl.Identity(3) + 2 * mu * epsilon(u)


u, v = ufl.TrialFunction(V), ufl.TestFunction(V)
a = fem.form(ufl.inner(sigma(u), epsilon(v)) * ufl.dx)
L = fem.form(ufl.dot(ufl.as_vector((0, 0, -rho * g)), v) * ufl.dx)
clamped = fem.locate_dofs_geometrical(V, lambda x: np.isclose(x[0], 0.0))
bc = fem.dirichletbc(np.zeros(3, dtype=default_scalar_type), clamped, V)

A = petsc.assemble_matrix(a, bcs=[bc])
A.assemble()
b = petsc.assemble_vector(L)
petsc.apply_lifting(b, [a], bcs=[[bc]])
b.ghostUpdate(addv=PETSc.InsertMode.ADD, mode=PETSc.ScatterMode.REVERSE)
petsc.set_bc(b, [bc])
uh = fem.Function(V)

ksp = PETSc.KSP().create(comm)
ksp.setOperators(A)
ksp.setTolerances(rtol=1e-6)
# femeta: the model's shift alpha for this beam; CG + ICC(0) on A + alpha diag(A)
model = femeta.load(args.model)
solver = femeta.fenics.configure(ksp, model, W=args.W, lambda_=args.lam, mu=args.mu, rho=args.rho)
start = time.perf_counter()
# femeta: a guarded solve (a larger shift if IC(0) breaks down, PETSc's default if all else fails)
report = solver.solve(b, uh.x.petsc_vec)
seconds = time.perf_counter() - start
uh.x.scatter_forward()

# For comparison, PETSc's own ICC(0) (its default shift; in parallel on block Jacobi's blocks).
default = PETSc.KSP().create(comm)
default.setOperators(A)
default.setType("cg")
default.setNormType(PETSc.KSP.NormType.UNPRECONDITIONED)
default.setTolerances(rtol=1e-6)
default.getPC().setType("icc" if comm.size == 1 else "bjacobi")
if comm.size > 1:
    default.setUp()
    for block in default.getPC().getBJacobiSubKSP():
        block.getPC().setType("icc")
x = b.duplicate()
start = time.perf_counter()
default.solve(b, x)
default_seconds = time.perf_counter() - start
reason = femeta.fenics.reason_name(default.getConvergedReason())

if comm.rank == 0:
    print(f"unknowns: {A.getSize()[0]} on {comm.size} process(es)")
    print(f"alpha: {solver.alpha!r}")
    print(f"report: {report}")
    print(f"femeta: {report.iterations} iterations in {seconds:.4f} s")
    print(f"PETSc default ICC: {default.getIterationNumber()} iterations ({reason}) "
          f"in {default_seconds:.4f} s")  # fmt: skip
