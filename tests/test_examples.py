"""The examples are part of the documentation: run them on a tiny budget."""

import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

import femeta
from femeta._fenics import has_dolfinx

EXAMPLES = Path(__file__).parent.parent / "examples"
needs_dolfinx = pytest.mark.skipif(not has_dolfinx(), reason="needs DOLFINx")


def test_poisson_initial_guess_example(capsys):
    module = runpy.run_path(str(EXAMPLES / "poisson_initial_guess.py"))
    means = module["main"](epochs=2, p=0.01)
    # Psi_base needs no training: Table 3 gives 164.41 at p = 0.01.
    assert abs(means["base"] - 164.41) < 5
    assert 0 < means["learned"] < 10_000
    assert "zero initial guess" in capsys.readouterr().out


def run_cantilever(run, *args, processes=1):
    command = [sys.executable, str(EXAMPLES / "cantilever.py"), "--model", str(run), *args]
    if processes > 1:
        command = [str(Path(sys.executable).parent / "mpiexec"), "-n", str(processes), *command]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def read_cantilever(output):
    """The numbers the cantilever example prints (once, by rank 0)."""
    patterns = {
        "unknowns": r"^unknowns: (\d+) on (\d+) process",
        "alpha": r"^alpha: (\S+)$",
        "report": r"^report: (.*)$",
        "femeta": r"^femeta: (\d+) iterations in ([\d.e-]+) s$",
        "default": r"^PETSc default ICC: (\d+) iterations \((\w+)\) in ([\d.e-]+) s$",
    }
    found = {}
    for name, pattern in patterns.items():
        matches = re.findall(pattern, output, flags=re.MULTILINE)
        assert len(matches) == 1, (name, output)
        found[name] = matches[0]
    return found


@needs_dolfinx
def test_cantilever_example_uses_the_model_s_shift(beam_run):
    printed = read_cantilever(run_cantilever(beam_run, "--cells", "8", "2", "2"))
    assert printed["unknowns"] == ("243", "1")
    model = femeta.load(beam_run)
    assert float(printed["alpha"]) == model.predict(W=0.2, lambda_=1.25, mu=1.0, rho=1.0)
    assert "CONVERGED_RTOL" in printed["report"]
    iterations, seconds = printed["femeta"]
    assert int(iterations) > 0 and float(seconds) > 0
    iterations, reason, seconds = printed["default"]
    assert int(iterations) > 0 and reason.startswith("CONVERGED") and float(seconds) > 0


@needs_dolfinx
def test_cantilever_example_takes_the_beam_s_parameters(beam_run):
    output = run_cantilever(beam_run, "--W", "0.02", "--lam", "10", "--mu", "0.1")
    printed = read_cantilever(output)
    assert "CONVERGED_RTOL" in printed["report"]
    model = femeta.load(beam_run)
    assert float(printed["alpha"]) == model.predict(W=0.02, lambda_=10, mu=0.1, rho=1.0)


@needs_dolfinx
@pytest.mark.skipif("PMI_RANK" in os.environ, reason="launches mpiexec itself")
def test_cantilever_example_under_mpiexec(beam_run):
    printed = read_cantilever(run_cantilever(beam_run, "--cells", "16", "4", "4", processes=2))
    assert printed["unknowns"] == (str(3 * 17 * 5 * 5), "2")
    assert "CONVERGED_RTOL" in printed["report"]
    assert int(printed["femeta"][0]) > 0
    iterations, reason, _ = printed["default"]
    assert int(iterations) > 0 and reason.startswith("CONVERGED")
