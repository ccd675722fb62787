"""Batched, differentiable iterative solvers Phi(tau; theta).

Every solver returns a :class:`SolverResult`; ``SOLVERS`` maps names to them.
"""

from femeta.solvers.base import SolverResult
from femeta.solvers.iccg import IccgResult, iccg
from femeta.solvers.jacobi import jacobi

SOLVERS = {"jacobi": jacobi, "iccg": iccg}

__all__ = ["SOLVERS", "IccgResult", "SolverResult", "iccg", "jacobi"]
