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


@needs_dolfinx
def test_a_family_model_in_a_script_gives_one_shift_on_any_number_of_ranks(tmp_path, capsys):
    from femeta import cli

    text = (EXAMPLES / "anisotropic_poisson.py").read_text()
    for old, new in (("\nCELLS = 100\n", "\nCELLS = 12\n"),
                     ('"train": 200, "validation": 50, "test": 100', '"train": 16, '
                      '"validation": 4, "test": 4')):  # fmt: skip
        assert old in text
        text = text.replace(old, new)
    family = tmp_path / "aniso.py"
    family.write_text(text)
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as stopped:
        cli.main(["train", "family", "--family", f"{family}:make", "--epochs", "2",
                  "--batch-size", "8", "--out", str(run), "--no-monitor"])  # fmt: skip
    assert stopped.value.code == 0, capsys.readouterr().err
    task = ["kappa0=1", "kappa1=10", "kappa2=100", "kappa3=1000", "theta=0.7", "eps=0.01",
            "wave=0.3"]  # fmt: skip
    printed = []
    for processes in (1, 2):
        command = [sys.executable, str(EXAMPLES / "family_script.py"), "--model", str(run),
                   "--family", str(family), *task]  # fmt: skip
        if processes > 1:
            command = [str(Path(sys.executable).parent / "mpiexec"), "-n", "2", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        assert f"unknowns: 169 on {processes} process(es)" in result.stdout
        assert re.search(r"^femeta: \d+ iterations", result.stdout, flags=re.MULTILINE)
        assert re.search(r"^petsc_icc: \d+ iterations", result.stdout, flags=re.MULTILINE)
        assert re.search(r"^gamg: \d+ iterations \(CONVERGED", result.stdout, flags=re.MULTILINE)
        printed.append(re.findall(r"^alpha: (\S+)$", result.stdout, flags=re.MULTILINE))
    # The shift reads statistics of A gathered over the ranks: the same on 1 and 2.
    assert len(printed[0]) == 1 and printed[0] == printed[1]
    params = dict(item.split("=") for item in task)
    model = femeta.load(run)
    assert 0 < float(printed[0][0]) == model.predict(**params, **statistics_of(family, params))


def statistics_of(family, params):
    """The statistics of the family's serial matrix at ``params`` that the model reads."""
    from dolfinx import fem
    from dolfinx.fem import petsc
    from mpi4py import MPI

    from femeta.fenics import matrix_statistics

    built = runpy.run_path(str(family))["make"](MPI.COMM_SELF)
    for name, value in params.items():
        built["parameters"][name].value = float(value)
    A = petsc.assemble_matrix(fem.form(built["a"]), bcs=built["bcs"])
    A.assemble()
    return matrix_statistics(A, ("diag_min", "diag_max", "norm_inf", "norm_fro"))
