"""Batched, differentiable iterative solvers Phi(tau; theta).

Every solver returns a :class:`SolverResult` (ICCG adds its factorization flags).
"""

from femeta.solvers.base import SolverResult
from femeta.solvers.iccg import IccgResult, iccg
from femeta.solvers.jacobi import jacobi

__all__ = ["IccgResult", "SolverResult", "iccg", "jacobi"]
