"""The paper's clamped beam as a family file: the forms of femeta's built-in beams.

A beam [0, 1] x [0, W] x [0, W] of hexahedra, clamped at x = 0, under its weight
rho g (g = 0.4 W^2) in -z; W, lambda, mu and rho log-uniform as in the paper. W
changes the geometry: its setter scales the mesh's y and z coordinates, so the forms
compile once. :class:`~femeta.problems.elasticity.ElasticBeam` assembles its tasks
from this file, and ``femeta train family --family femeta.problems.beam_family:make``
trains on it as on any family file.
"""

import numpy as np
import ufl
from dolfinx import default_scalar_type, fem, mesh

CELLS = (8, 2, 2)
PARAMETERS = {
    "W": ("loguniform", 0.003, 0.3),
    **{name: ("loguniform", 0.1, 10.0) for name in ("lambda", "mu", "rho")},
}
SPLITS = {"train": 1000, "validation": 1000, "test": 1000}


def make(comm, cells=CELLS):
    """The forms on ``cells`` hexahedra, the clamp, and how each parameter reaches them."""
    domain = mesh.create_box(comm, [np.zeros(3), np.ones(3)], list(cells),
                             cell_type=mesh.CellType.hexahedron)  # fmt: skip
    reference = domain.geometry.x.copy()
    space = fem.functionspace(domain, ("Lagrange", 1, (3,)))
    c = {name: fem.Constant(domain, default_scalar_type(1.0)) for name in (*PARAMETERS, "g")}

    def set_width(width):
        domain.geometry.x[:, 1:] = reference[:, 1:] * width
        c["g"].value = 0.4 * width**2

    def strain(w):
        return ufl.sym(ufl.grad(w))

    u, v = ufl.TrialFunction(space), ufl.TestFunction(space)
    stress = c["lambda"] * ufl.tr(strain(u)) * ufl.Identity(3) + 2 * c["mu"] * strain(u)
    weight = ufl.as_vector((0, 0, -c["rho"] * c["g"]))
    clamped = fem.locate_dofs_geometrical(space, lambda x: np.isclose(x[0], 0.0))
    bc = fem.dirichletbc(np.zeros(3, dtype=default_scalar_type), clamped, space)
    parameters = {"W": set_width, **{name: c[name] for name in ("lambda", "mu", "rho")}}
    return {"a": ufl.inner(stress, strain(v)) * ufl.dx, "L": ufl.dot(weight, v) * ufl.dx,
            "bcs": [bc], "parameters": parameters}  # fmt: skip
