"""1D Poisson equation -u'' = f on (0, 1), u(0) = u(1) = 0 (paper §2.2.1, Appendix C.1).

A task is a source term ``f_tau = sum_i c_i mu_i v_i`` where ``(mu_i, v_i)`` are the
eigenpairs of ``A = tridiag(-1, 2, -1)`` (Lemma B.1), so the exact solution is
``u_tau = sum_i c_i v_i``. Under P1 the coefficients of the lowest and highest
modes have the largest variance (hard for Jacobi), under P2 the middle ones.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from femeta._fenics import has_dolfinx, import_dolfinx
from femeta.problems.base import TaskSet, split_size_and_seed

__all__ = ["Poisson1D", "assemble_poisson_matrix", "closed_form_matrix"]

SPLIT_SIZES = {"train": 1000, "validation": 1000, "test": 1000}


class Poisson1D:
    """The task space of 1D Poisson problems with N interior grid points.

    Args:
        n: Number of unknowns N (the paper uses 16).
        p: Mixture weight of the hard distribution P1, in [0, 1].
    """

    name = "poisson1d"

    def __init__(self, n: int = 16, p: float = 0.0):
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            raise ValueError(f"n must be an integer >= 2, got {n!r}")
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p is a probability and must lie in [0, 1], got {p!r}")
        self.n, self.p = n, float(p)
        index = torch.arange(1, n + 1, dtype=torch.float64)
        angle = index * math.pi / (n + 1)
        self.eigenvalues = 2.0 - 2.0 * torch.cos(angle)
        # Column i is v_i = (sin(j i pi / (N + 1)))_j, unnormalised as in Lemma B.1.
        self.eigenvectors = torch.sin(index[:, None] * angle[None, :])
        # Equations (43)-(44) write c_i ~ N(0, s_i). Read as a standard deviation
        # (numpy's `scale`), Psi_base needs 158-159 Jacobi iterations at eps = 1e-6
        # for p = 0, as in Table 3; read as a variance it would need about 171.
        spread = torch.abs(n + 1 - 2 * index) / (n - 1)
        self.std_hard = spread  # P1, equation (43)
        self.std_easy = 1.0 - spread  # P2, equation (44)

    def matrix(self) -> Tensor:
        """The system matrix, assembled with DOLFINx when available, shape ``(N, N)``."""
        if has_dolfinx():
            return torch.from_numpy(assemble_poisson_matrix(self.n))
        return torch.from_numpy(closed_form_matrix(self.n))

    def sample(self, count: int, seed: int) -> TaskSet:
        """Draw ``count`` tasks from ``p P1 + (1 - p) P2``, deterministically from ``seed``.

        Fields: ``f`` (source, ``(count, N)``), ``solution`` (exact ``A^{-1} f``),
        ``hard`` (whether the task came from P1).
        """
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        generator = torch.Generator().manual_seed(int(seed))
        hard = torch.rand(count, generator=generator, dtype=torch.float64) < self.p
        std = torch.where(hard[:, None], self.std_hard, self.std_easy)
        coefficients = torch.randn(count, self.n, generator=generator, dtype=torch.float64) * std
        solution = coefficients @ self.eigenvectors.T
        f = (coefficients * self.eigenvalues) @ self.eigenvectors.T
        return TaskSet({"f": f, "solution": solution, "hard": hard})

    def split(self, name: str, seed: int) -> TaskSet:
        """The ``train``, ``validation`` or ``test`` split (1000 tasks each, Appendix C.1)."""
        return self.sample(*split_size_and_seed(name, seed, SPLIT_SIZES))


def closed_form_matrix(n: int) -> np.ndarray:
    """``tridiag(-1, 2, -1)`` of size ``n``."""
    return 2.0 * np.eye(n) - np.eye(n, k=1) - np.eye(n, k=-1)


def assemble_poisson_matrix(n: int, comm=None) -> np.ndarray:
    """Assemble ``h * K`` for P1 elements on ``n + 1`` cells, interior dofs only.

    ``K`` is the stiffness matrix of ``int u' v' dx``; scaled by the cell size
    ``h`` it equals the finite-difference matrix ``tridiag(-1, 2, -1)``. Works
    on any number of ranks: every rank returns the whole dense ``(n, n)``
    matrix, rows and columns ordered by the x-coordinate of the grid points.
    """
    dolfinx = import_dolfinx()
    import ufl
    from mpi4py import MPI

    comm = MPI.COMM_WORLD if comm is None else comm
    mesh = dolfinx.mesh.create_interval(comm, n + 1, [0.0, 1.0])
    space = dolfinx.fem.functionspace(mesh, ("Lagrange", 1))
    u, v = ufl.TrialFunction(space), ufl.TestFunction(space)
    form = dolfinx.fem.form(ufl.inner(ufl.grad(u), ufl.grad(v)) * ufl.dx)
    stiffness = dolfinx.fem.assemble_matrix(form)
    stiffness.scatter_reverse()
    local = stiffness.to_scipy(ghosted=False).tocoo()

    index_map = space.dofmap.index_map
    owned = index_map.size_local
    local_to_global = index_map.local_to_global(
        np.arange(owned + index_map.num_ghosts, dtype=np.int32)
    )
    coordinates = space.tabulate_dof_coordinates()[:owned, 0]
    pieces = comm.allgather(
        (
            local_to_global[local.row],
            local_to_global[local.col],
            local.data,
            local_to_global[:owned],
            coordinates,
        )
    )
    size = n + 2
    dense = np.zeros((size, size))
    position = np.zeros(size)
    for rows, cols, values, dofs, x in pieces:
        np.add.at(dense, (rows, cols), values)
        position[dofs] = x
    order = np.argsort(position)[1:-1]  # drop the boundary points x = 0 and x = 1
    return dense[np.ix_(order, order)] / (n + 1)
