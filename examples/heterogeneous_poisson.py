"""A femeta family file: -div(kappa grad u) = f on the unit square, u = 0 on its boundary.

kappa is constant on each quadrant, log-uniform on [1, 1e4] (contrasts up to 10^4);
f = 1 + wave sin(3 pi x) sin(2 pi y). Train the ICCG shift for it with
``femeta train family --family examples/heterogeneous_poisson.py:make --out runs/poisson``.
"""

import numpy as np
import ufl
from dolfinx import default_scalar_type, fem, mesh

#: Cells along each side: P1 on 100 x 100 quadrilaterals has 101^2 = 10201 unknowns.
CELLS = 100
PARAMETERS = {
    **{f"kappa{quadrant}": ("loguniform", 1.0, 1e4) for quadrant in range(4)},
    "wave": ("uniform", -1.0, 1.0),
}
SPLITS = {"train": 200, "validation": 50, "test": 100}


def make(comm):
    """The forms, the boundary condition and the constants that each task sets."""
    msh = mesh.create_unit_square(comm, CELLS, CELLS, mesh.CellType.quadrilateral)
    space = fem.functionspace(msh, ("Lagrange", 1))
    constants = {name: fem.Constant(msh, default_scalar_type(1.0)) for name in PARAMETERS}
    x = ufl.SpatialCoordinate(msh)
    left, low = ufl.lt(x[0], 0.5), ufl.lt(x[1], 0.5)
    k = [constants[f"kappa{quadrant}"] for quadrant in range(4)]
    west, east = ufl.conditional(low, k[0], k[2]), ufl.conditional(low, k[1], k[3])
    kappa = ufl.conditional(left, west, east)
    f = 1 + constants["wave"] * ufl.sin(3 * np.pi * x[0]) * ufl.sin(2 * np.pi * x[1])
    u, v = ufl.TrialFunction(space), ufl.TestFunction(space)
    facets = mesh.locate_entities_boundary(msh, 1, lambda p: np.full(p.shape[1], True))
    dofs = fem.locate_dofs_topological(space, 1, facets)
    bc = fem.dirichletbc(default_scalar_type(0.0), dofs, space)
    a = kappa * ufl.inner(ufl.grad(u), ufl.grad(v)) * ufl.dx
    return {"a": a, "L": f * v * ufl.dx, "bcs": [bc], "parameters": constants}
