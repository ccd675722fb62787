"""Batched, differentiable iterative solvers Phi(tau; theta).

Every solver returns a :class:`SolverResult`; ``SOLVERS`` maps names to them.
"""

from femeta.solvers.base import SolverResult
from femeta.solvers.jacobi import jacobi

SOLVERS = {"jacobi": jacobi}

__all__ = ["SOLVERS", "SolverResult", "jacobi"]
