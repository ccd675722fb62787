"""Task spaces (T, P): one module per PDE/ODE family. Problems know nothing of solvers."""

from femeta.problems.base import TaskSet
from femeta.problems.elasticity import ElasticBeam
from femeta.problems.poisson1d import Poisson1D
from femeta.problems.robertson import Robertson

__all__ = ["ElasticBeam", "Poisson1D", "Robertson", "TaskSet"]
