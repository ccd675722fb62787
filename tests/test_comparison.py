"""femeta.comparison: the solvers `femeta solve` and the benchmarks set beside a model."""

import pytest

from femeta._fenics import has_dolfinx

pytestmark = [pytest.mark.dolfinx, pytest.mark.skipif(not has_dolfinx(), reason="needs DOLFINx")]

if has_dolfinx():
    from test_fenics_api import growing_system

    from femeta import comparison


def test_a_residual_that_grows_before_it_falls_stops_no_solver():
    """PETSc's default divergence test would stop GAMG and the shifted ICC here."""
    A, b = growing_system()
    solved = [
        comparison.gamg(A, b, 1e-8, 400),
        comparison.default_icc(A, b, 1e-8, 400),
        comparison.shifted_icc("learned", A, b, 1.0, 1e-8, 400),
    ]
    assert [outcome.reason for outcome in solved] == ["CONVERGED_RTOL"] * 3
    assert len(solved[2].attempts) == 1 and solved[2].alpha == 1.0
