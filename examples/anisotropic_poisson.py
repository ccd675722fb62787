"""A femeta family file: -div(kappa K grad u) = f on the unit square, u = 0 on its boundary.

kappa is constant on each quadrant, log-uniform on [1, 1e4]; K = R(theta) diag(1, eps)
R(theta)^T is an anisotropy of ratio eps (log-uniform on [1e-3, 1]) along the angle theta;
f = 1 + wave sin(3 pi x) sin(2 pi y). Rotated anisotropy makes IC(0) of A break down on
some tasks, so the shift matters. Train with ``femeta train family --family
examples/anisotropic_poisson.py:make --splits 1000 100 100 --epochs 10 --out runs/aniso``
(SPLITS' 200 training tasks are too few to learn where IC(0) breaks down).
"""

import numpy as np
import ufl
from dolfinx import default_scalar_type, fem, mesh

#: Cells along each side: Q1 on 100 x 100 quadrilaterals has 101^2 = 10201 unknowns.
CELLS = 100
PARAMETERS = {
    **{f"kappa{quadrant}": ("loguniform", 1.0, 1e4) for quadrant in range(4)},
    "theta": ("uniform", 0.0, np.pi),
    "eps": ("loguniform", 1e-3, 1.0),
    "wave": ("uniform", -1.0, 1.0),
}
SPLITS = {"train": 200, "validation": 50, "test": 100}


def make(comm):
    """The forms, the boundary condition and the constants that each task sets."""
    msh = mesh.create_unit_square(comm, CELLS, CELLS, mesh.CellType.quadrilateral)
    space = fem.functionspace(msh, ("Lagrange", 1))
    c = {name: fem.Constant(msh, default_scalar_type(1.0)) for name in PARAMETERS}
    x = ufl.SpatialCoordinate(msh)
    left, low = ufl.lt(x[0], 0.5), ufl.lt(x[1], 0.5)
    west = ufl.conditional(low, c["kappa0"], c["kappa2"])
    east = ufl.conditional(low, c["kappa1"], c["kappa3"])
    rotation = ufl.as_matrix([[ufl.cos(c["theta"]), -ufl.sin(c["theta"])],
                              [ufl.sin(c["theta"]), ufl.cos(c["theta"])]])  # fmt: skip
    K = rotation * ufl.as_matrix([[1, 0], [0, c["eps"]]]) * rotation.T
    f = 1 + c["wave"] * ufl.sin(3 * np.pi * x[0]) * ufl.sin(2 * np.pi * x[1])
    u, v = ufl.TrialFunction(space), ufl.TestFunction(space)
    facets = mesh.locate_entities_boundary(msh, 1, lambda p: np.full(p.shape[1], True))
    dofs = fem.locate_dofs_topological(space, 1, facets)
    bc = fem.dirichletbc(default_scalar_type(0.0), dofs, space)
    a = ufl.conditional(left, west, east) * ufl.inner(K * ufl.grad(u), ufl.grad(v)) * ufl.dx
    return {"a": a, "L": f * v * ufl.dx, "bcs": [bc], "parameters": c}
