"""Batched, differentiable iterative solvers Phi(tau; theta).

Every solver returns a :class:`SolverResult` (ICCG adds its factorization flags).
ICCG and Jacobi take a :class:`SparseBatch`: matrices of one mesh, one pattern.
"""

from femeta.solvers.base import SolverResult
from femeta.solvers.iccg import IccgResult, iccg
from femeta.solvers.jacobi import jacobi
from femeta.solvers.newton_sor import NonlinearSystem, newton_sor
from femeta.solvers.sparse import SparseBatch

__all__ = [
    "IccgResult",
    "NonlinearSystem",
    "SolverResult",
    "SparseBatch",
    "iccg",
    "jacobi",
    "newton_sor",
]
