"""femeta: learn per-instance parameters of iterative solvers (gradient-based meta-solving).

The pure-torch parts (solvers, losses, meta-solvers, training) work without
DOLFINx; problems assembled with DOLFINx import it when they are used.
"""

__version__ = "0.1.0"

from femeta.model import Model, RunError, load  # after __version__, which it reads

__all__ = ["Model", "RunError", "__version__", "load"]
