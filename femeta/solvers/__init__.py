"""Batched, differentiable iterative solvers Phi(tau; theta).

Every solver returns a :class:`SolverResult` (ICCG adds its factorization flags).
"""

from femeta.solvers.base import SolverResult
from femeta.solvers.iccg import IccgResult, iccg
from femeta.solvers.jacobi import jacobi
from femeta.solvers.newton_sor import NonlinearSystem, newton_sor

__all__ = ["IccgResult", "NonlinearSystem", "SolverResult", "iccg", "jacobi", "newton_sor"]
