"""femeta: learn per-instance parameters of iterative solvers (gradient-based meta-solving).

The pure-torch parts (solvers, losses, meta-solvers, training) work without
DOLFINx; problems assembled with DOLFINx import it when they are used.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
