"""The examples are part of the documentation: run them on a tiny budget."""

import runpy
from pathlib import Path

EXAMPLES = Path(__file__).parent.parent / "examples"


def test_poisson_initial_guess_example(capsys):
    module = runpy.run_path(str(EXAMPLES / "poisson_initial_guess.py"))
    means = module["main"](epochs=2, p=0.01)
    # Psi_base needs no training: Table 3 gives 164.41 at p = 0.01.
    assert abs(means["base"] - 164.41) < 5
    assert 0 < means["learned"] < 10_000
    assert "zero initial guess" in capsys.readouterr().out
