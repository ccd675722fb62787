"""A family of problems defined in a user's file: loaded, assembled, trained and evaluated."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import femeta
from femeta import cli
from femeta._fenics import has_dolfinx, import_dolfinx
from femeta.problems.family import (
    MATRIX_FEATURES,
    FamilyError,
    UserFamily,
    load_family,
    read_distributions,
)
from femeta.solvers.iccg import iccg

pytestmark = [
    pytest.mark.dolfinx,
    pytest.mark.skipif(not has_dolfinx(), reason="needs DOLFINx"),
]
if has_dolfinx():
    import_dolfinx()  # before a test moves XDG_CACHE_HOME: the compiled forms stay cached

EXAMPLE = Path(__file__).parent.parent / "examples" / "heterogeneous_poisson.py"

FAMILY = """
import numpy as np
import ufl
from dolfinx import default_scalar_type, fem, mesh

PARAMETERS = {"kappa": ("loguniform", 1.0, 1e3), "load": ("uniform", 0.5, 2.0)}
SPLITS = {"train": 24, "validation": 8, "test": 8}


def make(comm):
    msh = mesh.create_unit_square(comm, 6, 6)
    space = fem.functionspace(msh, ("Lagrange", 1))
    kappa = fem.Constant(msh, default_scalar_type(1.0))
    load = fem.Constant(msh, default_scalar_type(1.0))
    x = ufl.SpatialCoordinate(msh)
    u, v = ufl.TrialFunction(space), ufl.TestFunction(space)
    k = ufl.conditional(ufl.lt(x[0], 0.5), kappa, 1.0)
    dofs = fem.locate_dofs_geometrical(space, lambda p: np.isclose(p[0], 0.0))
    bc = fem.dirichletbc(default_scalar_type(1.0), dofs, space)
    return {
        "a": k * ufl.inner(ufl.grad(u), ufl.grad(v)) * ufl.dx,
        "L": load * v * ufl.dx,
        "bcs": [bc],
        "parameters": {"kappa": kappa, "load": load},
    }
"""
PARAMETERS = 'PARAMETERS = {"kappa": ("loguniform", 1.0, 1e3), "load": ("uniform", 0.5, 2.0)}\n'
SPLITS = 'SPLITS = {"train": 24, "validation": 8, "test": 8}\n'
#: The family with its distributions kept in a TOML file instead (:data:`DISTRIBUTIONS`).
BARE = FAMILY.replace(PARAMETERS, "").replace(SPLITS, "")
DISTRIBUTIONS = """
[parameters]
kappa = ["loguniform", 1.0, 100.0]
load = ["uniform", 0.5, 2.0]

[splits]
train = 16
validation = 4
test = 6
"""


def write_family(directory: Path, text: str = FAMILY, name: str = "family.py") -> Path:
    path = directory / name
    path.write_text(text)
    return path


def run(capsys, *args) -> str:
    """``femeta ARGS`` in this process; its standard output."""
    with pytest.raises(SystemExit) as stopped:
        cli.main([str(arg) for arg in args])
    captured = capsys.readouterr()
    assert stopped.value.code == 0, captured.err
    return captured.out


def test_tasks_are_drawn_from_the_seed_assembled_symmetric_and_cached(tmp_path):
    source = load_family(f"{write_family(tmp_path)}:make")
    assert source.splits == {"train": 24, "validation": 8, "test": 8}
    first = UserFamily(source, cache_dir=tmp_path).sample(4, seed=3)
    (cached,) = tmp_path.glob("family-family-*.safetensors")
    again = UserFamily(load_family(f"{tmp_path / 'family.py'}:make"), cache_dir=tmp_path)
    second = again.sample(4, seed=3)
    assert again._assembler is None  # read from the cache, not assembled
    assert cached.is_file() and torch.equal(first["A"].values, second["A"].values)
    params = first["params"]
    assert ((params[:, 0] >= 1) & (params[:, 0] <= 1e3)).all()
    assert ((params[:, 1] >= 0.5) & (params[:, 1] <= 2)).all()
    # Inputs: log kappa (log-uniform), the load as drawn, then log statistics of A.
    assert torch.allclose(first["features"][:, 0], params[:, 0].log())
    assert torch.equal(first["features"][:, 1], params[:, 1])
    dense = first["A"].to_dense()
    assert torch.equal(dense, dense.transpose(1, 2))
    # The Dirichlet rows are identity rows, and b holds the boundary value 1 there.
    constrained = (dense[0] == torch.eye(dense.shape[1], dtype=dense.dtype)).all(dim=1)
    assert int(constrained.sum()) == 7 and (first["b"][:, constrained] == 1).all()
    result = iccg(first["A"], first["b"], 0.01, tol=1e-8, max_iterations=100)
    assert result.converged.all()
    residual = first["A"].matvec(result.x) - first["b"]
    assert (residual.norm(dim=1) / first["b"].norm(dim=1)).max() < 1e-7


def test_a_family_trains_and_evaluates_every_test_task_through_the_cli(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    family = f"{write_family(tmp_path)}:make"
    out = tmp_path / "run"
    said = run(capsys, "train", "family", "--family", family, "--epochs", 2, "--batch-size", 8,
               "--out", out)  # fmt: skip
    assert said.startswith(f"saved {out}: kept epoch")
    config = json.loads((out / "config.json").read_text())
    assert config["problem_params"] == {"family": family, "distributions": None,
                                        "family_inputs": "all", "splits": None}  # fmt: skip
    assert config["model"]["features"][:2] == ["kappa", "load"]
    assert config["options"]["smooth"] == 0.25 and config["options"]["engine"] == "torch"
    check_the_script_api(out, family)
    solved = json.loads(run(capsys, "solve", "family", "--model", out, "--param", "kappa=10",
                            "--param", "load=1.5", "--json"))  # fmt: skip
    assert (solved["task"], solved["unknowns"]) == ("family.py:make task", 49)
    assert solved["params"] == {"kappa": 10.0, "load": 1.5}
    solvers = {row["name"]: row for row in solved["solvers"]}
    assert list(solvers) == ["femeta", "psi_base", "petsc_icc", "gamg"]
    assert all(row["converged"] for row in solvers.values())
    with pytest.raises(SystemExit) as stopped:
        cli.main(["solve", "family", "--model", str(out), "--param", "kappa=10"])
    assert stopped.value.code == 2
    assert "family.py:make: no value for ['load']" in capsys.readouterr().err

    model = json.loads(run(capsys, "evaluate", "family", "--model", out, "--json"))
    assert model["n_tasks"] == 8 and model["convergence_ratio"] == 1.0
    means = {}
    for baseline in ("base", "best", "petsc"):
        said = run(capsys, "evaluate", "family", "--baseline", baseline, "--family", family,
                   "--json")  # fmt: skip
        summary = json.loads(said)
        assert summary["n_tasks"] == 8 and summary["convergence_ratio"] == 1.0
        means[baseline] = summary["mean_iterations"]
    assert means["best"] <= min(means["base"], model["mean_iterations"])


def test_splits_given_to_train_replace_the_file_s(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    family = f"{write_family(tmp_path)}:make"
    out = tmp_path / "run"
    run(capsys, "train", "family", "--family", family, "--splits", 12, 4, 6, "--epochs", 1,
        "--batch-size", 6, "--no-monitor", "--out", out)  # fmt: skip
    config = json.loads((out / "config.json").read_text())
    assert config["problem_params"]["splits"] == [12, 4, 6]
    summary = json.loads(run(capsys, "evaluate", "family", "--model", out, "--json"))
    assert summary["n_tasks"] == 6


def test_a_family_trained_on_distributions_from_toml_needs_the_file_no_more(
    tmp_path, monkeypatch, capsys
):
    from femeta.workflow import TrainOptions, load_metasolver

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    family = f"{write_family(tmp_path, BARE)}:make"
    toml = tmp_path / "distributions.toml"
    toml.write_text(DISTRIBUTIONS)
    out = tmp_path / "run"
    run(capsys, "train", "family", "--family", family, "--distributions", toml, "--epochs", 1,
        "--batch-size", 8, "--no-monitor", "--out", out)  # fmt: skip
    base = json.loads(run(capsys, "evaluate", "family", "--baseline", "base", "--family", family,
                          "--distributions", toml, "--json"))  # fmt: skip
    assert base["n_tasks"] == 6
    toml.unlink()

    config = json.loads((out / "config.json").read_text())
    tables = {
        "parameters": {"kappa": ["loguniform", 1.0, 100.0], "load": ["uniform", 0.5, 2.0]},
        "splits": {"train": 16, "validation": 4, "test": 6},
    }
    assert config["problem_params"]["distributions"] == tables
    assert TrainOptions.from_dict(config["options"]).distributions == tables  # as on --resume
    summary = json.loads(run(capsys, "evaluate", "family", "--model", out, "--json"))
    assert summary["n_tasks"] == 6 and summary["convergence_ratio"] == 1.0
    solved = json.loads(run(capsys, "solve", "family", "--model", out, "--param", "kappa=10",
                            "--param", "load=1.5", "--json"))  # fmt: skip
    assert all(row["converged"] for row in solved["solvers"])

    # predict reads the saved distributions: kappa on a log scale, in its trained range.
    model = femeta.load(out)
    assert model.parameters == {"kappa": (1.0, 100.0), "load": (0.5, 2.0)}
    experiment, network = load_metasolver(out, "family")
    tasks = experiment.tasks("test", 0)
    values = dict(zip(("kappa", "load"), tasks["params"][0].tolist(), strict=True))
    statistics = dict(zip(model.statistics, tasks["features"][0, 2:].exp().tolist(), strict=True))
    with torch.no_grad():
        expected = float(network(tasks["features"][:1])[0])
    assert model.predict(**values, **statistics) == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError, match=r"kappa = 200.0 is outside \[1, 100\]"):
        model.predict(**(values | statistics | {"kappa": 200.0}))


def test_the_dataset_cache_is_keyed_by_the_distributions(tmp_path):
    path = write_family(tmp_path, BARE)
    toml = tmp_path / "distributions.toml"

    def sample(text: str) -> torch.Tensor:
        toml.write_text(text)
        source = load_family(f"{path}:make", read_distributions(toml))
        return UserFamily(source, cache_dir=tmp_path / "cache").sample(2, seed=0)["params"]

    first = sample(DISTRIBUTIONS)
    wider = sample(DISTRIBUTIONS.replace("100.0", "1000.0"))
    assert sample(DISTRIBUTIONS).equal(first) and not wider.equal(first)
    assert len(list((tmp_path / "cache").glob("family-family-*.safetensors"))) == 2


TOML_ERRORS = {
    "a syntax error": (
        DISTRIBUTIONS.replace("load = ", "load "),
        "{toml} is not valid TOML: Expected '=' after a key in a key/value pair (at line 4",
    ),
    "an unknown kind": (
        DISTRIBUTIONS.replace('"uniform", 0.5', '"normal", 0.5'),
        "{toml}: parameter 'load' has kind 'normal'; expected one of ['uniform', 'loguniform']",
    ),
    "bounds out of order": (
        DISTRIBUTIONS.replace('"uniform", 0.5, 2.0', '"uniform", 2.0, 0.5'),
        "{toml}: parameter 'load' needs finite bounds low < high, got (2.0, 0.5)",
    ),
    "a parameter the forms use left out": (
        DISTRIBUTIONS.replace('load = ["uniform", 0.5, 2.0]\n', ""),
        "family.py:make uses parameter 'load', which [parameters] of {toml} does not declare",
    ),
    "a parameter the forms do not use": (
        DISTRIBUTIONS.replace("[splits]", 'scale = ["uniform", 0, 1]\n\n[splits]'),
        "[parameters] of {toml} declares 'scale', but family.py:make returns no such entry",
    ),
    "no [parameters] table": (
        DISTRIBUTIONS.replace("[parameters]", "[parameter]"),
        "{toml}: unknown entries ['parameter']; a distributions file holds the table "
        "[parameters] and optionally [splits]",
    ),
    "a split of no tasks": (
        DISTRIBUTIONS.replace("test = 6", "test = 0"),
        "{toml}: [splits] must give integers >= 1 for exactly ['train', 'validation', 'test']",
    ),
}


@pytest.mark.parametrize("case", list(TOML_ERRORS))
def test_a_bad_distributions_file_is_one_line_naming_it_and_the_parameter(
    tmp_path, monkeypatch, capsys, case
):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    text, expected = TOML_ERRORS[case]
    family = f"{write_family(tmp_path, BARE)}:make"
    toml = tmp_path / "distributions.toml"
    toml.write_text(text)
    with pytest.raises(SystemExit) as stopped:
        cli.main(["evaluate", "family", "--baseline", "base", "--family", family,
                  "--distributions", str(toml)])  # fmt: skip
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and err.count("\n") == 1
    assert expected.format(toml=toml) in err


def check_the_script_api(run_dir: Path, family: str) -> None:
    """``femeta.load`` and ``configure`` give a script the shift the network gives a test task,
    from the parameters and the statistics of the script's own PETSc matrix."""
    from dolfinx import fem
    from dolfinx.fem import petsc as dolfinx_petsc
    from mpi4py import MPI
    from petsc4py import PETSc

    from femeta.fenics import LinearProblem, configure
    from femeta.workflow import load_metasolver

    model = femeta.load(run_dir)
    assert model.predicts == "alpha" and model.parameters == {
        "kappa": (1.0, 1e3),
        "load": (0.5, 2.0),
    }
    assert model.statistics == ("diag_min", "diag_max", "norm_inf", "norm_fro")
    experiment, network = load_metasolver(run_dir, "family")
    tasks = experiment.tasks("test", 0)
    with torch.no_grad():
        expected = network(tasks["features"])
    built = load_family(family).make(MPI.COMM_SELF)
    bilinear = fem.form(built["a"])
    for task in range(3):
        values = dict(zip(("kappa", "load"), tasks["params"][task].tolist(), strict=True))
        for name, value in values.items():
            built["parameters"][name].value = value
        A = dolfinx_petsc.assemble_matrix(bilinear, bcs=built["bcs"])
        A.assemble()
        ksp = PETSc.KSP().create(MPI.COMM_SELF)
        ksp.setOperators(A)
        alpha = configure(ksp, model, **values).alpha
        assert alpha == pytest.approx(float(expected[task]), rel=1e-9)
        ksp.destroy()
        A.destroy()
    # LinearProblem in place of DOLFINx's: it assembles A before predicting from its statistics.
    problem = LinearProblem(built["a"], built["L"], bcs=built["bcs"], model=model, params=values,
                            petsc_options_prefix="family_")  # fmt: skip
    problem.solve()
    assert problem.report.converged and problem.report.attempts[0].alpha == alpha
    with pytest.raises(ValueError, match=r"kappa = 2000.0 is outside \[1, 1000\]"):
        model.predict(kappa=2000.0, load=1.0, diag_min=1.0, diag_max=2.0, norm_inf=3.0,
                      norm_fro=4.0)  # fmt: skip
    with pytest.raises(ValueError, match="missing matrix statistic 'norm_fro'"):
        model.predict(kappa=2.0, load=1.0, diag_min=1.0, diag_max=2.0, norm_inf=3.0)


def test_the_example_family_assembles_on_a_small_mesh(tmp_path):
    text = EXAMPLE.read_text()
    assert "\nCELLS = 100\n" in text
    path = write_family(tmp_path, text.replace("\nCELLS = 100\n", "\nCELLS = 8\n"), "poisson.py")
    family = UserFamily(load_family(f"{path}:make"), cache=False)
    tasks = family.sample(3, seed=0)
    assert family.n == 81 and len(family.feature_names) == 5 + 4
    result = iccg(tasks["A"], tasks["b"], 0.01, tol=1e-6, max_iterations=81)
    assert result.converged.all()


BROKEN = {
    "a parameter the distributions lack": (
        FAMILY.replace('"load": load}', '"load": load, "scale": kappa}'),
        "uses parameter 'scale', which PARAMETERS in",
    ),
    "a declared parameter left unused": (
        FAMILY.replace(', "load": load}', "}"),
        "declares 'load', but family.py:make returns no such entry",
    ),
    "an error in the forms": (
        FAMILY.replace("ufl.inner(ufl.grad(u), ufl.grad(v))", "ufl.inner(ufl.grad(u), v)"),
        "family.py, line 21: building the forms failed: ValueError: Shapes do not match",
    ),
    "an error raised in make": (
        FAMILY.replace("    x = ufl", "    x = undefined_name\n    y = ufl"),
        "family.py, line 15: building the forms failed: NameError",
    ),
    "bounds out of order": (
        FAMILY.replace('("uniform", 0.5, 2.0)', '("uniform", 2.0, 0.5)'),
        "parameter 'load' needs finite bounds low < high, got (2.0, 0.5)",
    ),
    "a log-uniform range through zero": (
        FAMILY.replace('("loguniform", 1.0, 1e3)', '("loguniform", 0.0, 1e3)'),
        "parameter 'kappa' is log-uniform and needs 0 < low, got 0.0",
    ),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_broken_family_is_named_with_its_file_and_parameter(tmp_path, case):
    text, expected = BROKEN[case]
    path = write_family(tmp_path, text)
    with pytest.raises(FamilyError) as raised:
        UserFamily(load_family(f"{path}:make"), cache=False).sample(1, seed=0)
    message = str(raised.value)
    assert expected in message and "family.py" in message


def with_statistics(statistics: str) -> str:
    """The family with ``STATISTICS = statistics`` (line 8 of the file)."""
    return FAMILY.replace(SPLITS, f"{SPLITS}STATISTICS = {statistics}\n")


def test_a_statistic_of_the_family_file_is_an_input_and_a_script_computes_it_from_its_matrix(
    tmp_path, monkeypatch, capsys
):
    from dolfinx import fem
    from dolfinx.fem import petsc as dolfinx_petsc
    from mpi4py import MPI
    from petsc4py import PETSc

    from femeta.experiments import get_experiment
    from femeta.fenics import LinearProblem, configure
    from femeta.workflow import load_metasolver

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    text = with_statistics('{"log_trace": lambda A: math.log(A.getDiagonal().sum())}')
    family = f"{write_family(tmp_path, 'import math' + text)}:make"
    out = tmp_path / "run"
    run(capsys, "train", "family", "--family", family, "--epochs", 1, "--batch-size", 8,
        "--no-monitor", "--out", out)  # fmt: skip
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["features"][-1] == "log_trace"
    assert config["model"]["family_statistics"] == ["log_trace"]
    experiment, network = load_metasolver(out, "family")
    tasks = experiment.tasks("test", 0)
    assert experiment.input_names == ["kappa", "load", *MATRIX_FEATURES, "log_trace"]
    # The network reads it as it comes: here log trace(A), of the matrix training solves.
    trace = tasks["A"].diagonal().sum(dim=1)
    assert torch.allclose(tasks["features"][:, -1], trace.log(), rtol=1e-12)
    for inputs, names in (("parameters", ["kappa", "load"]),
                          ("matrix", [*MATRIX_FEATURES, "log_trace"])):  # fmt: skip
        assert get_experiment("family", family=family, family_inputs=inputs).input_names == names

    model = femeta.load(out)
    assert model.statistics == ("diag_min", "diag_max", "norm_inf", "norm_fro", "log_trace")
    assert model.needs_matrix and list(model.parameters) == ["kappa", "load"]
    with torch.no_grad():
        expected = network(tasks["features"])
    built = load_family(family).make(MPI.COMM_SELF)
    bilinear = fem.form(built["a"])
    for task in range(2):
        values = dict(zip(("kappa", "load"), tasks["params"][task].tolist(), strict=True))
        logs = tasks["features"][task, 2:6].exp().tolist()
        serial = dict(zip(model.statistics, [*logs, float(tasks["features"][task, -1])],
                          strict=True))  # fmt: skip
        predicted = model.predict(**values, **serial)
        assert predicted == pytest.approx(float(expected[task]), rel=1e-9)
        for name, value in values.items():
            built["parameters"][name].value = value
        A = dolfinx_petsc.assemble_matrix(bilinear, bcs=built["bcs"])
        A.assemble()
        ksp = PETSc.KSP().create(MPI.COMM_SELF)
        ksp.setOperators(A)
        alpha = configure(ksp, model, **values).alpha  # log trace(A) from the family file
        assert alpha == pytest.approx(predicted, rel=1e-9)
        ksp.destroy()
        A.destroy()
    problem = LinearProblem(built["a"], built["L"], bcs=built["bcs"], model=model, params=values,
                            petsc_options_prefix="statistics_")  # fmt: skip
    problem.solve()
    assert problem.report.converged and problem.report.attempts[0].alpha == alpha
    with pytest.raises(ValueError, match="missing matrix statistic 'log_trace'"):
        model.predict(**values, **{name: 1.0 for name in model.statistics[:4]})


BAD_STATISTICS = {
    "one that raises": (
        '{"bad": lambda A: 1 / 0}',
        "family.py, line 8: statistic 'bad' failed: ZeroDivisionError: division by zero",
    ),
    "one that returns nan": (
        '{"bad": lambda A: float("nan")}',
        "family.py: statistic 'bad' returned nan; it must return a finite float",
    ),
    "one that returns no number": (
        '{"bad": lambda A: A.getDiagonal().getArray()}',
        "family.py: statistic 'bad' returned array([",
    ),
}
BAD_DECLARATIONS = {
    "one named as a parameter": (
        '{"kappa": lambda A: 1.0}',
        "family.py: statistic 'kappa' has the name of a parameter in PARAMETERS in",
    ),
    "one named as femeta's own": (
        '{"norm_fro": lambda A: 1.0}',
        "family.py: statistic 'norm_fro' has the name of one femeta computes itself",
    ),
    "one that is no function": (
        '{"bad": 1.0}',
        "family.py: statistic 'bad' is 1.0, not a function(A) -> float",
    ),
    "not a dict": ("[len]", "family.py: STATISTICS must be a dict name -> function(A) -> float"),
}


@pytest.mark.parametrize("case", list(BAD_STATISTICS))
def test_a_failing_statistic_is_named_with_its_file_in_training_and_in_a_script(tmp_path, case):
    from mpi4py import MPI

    from femeta.fenics import matrix_statistics
    from femeta.problems.family import family_system

    statistics, expected = BAD_STATISTICS[case]
    spec = f"{write_family(tmp_path, with_statistics(statistics))}:make"
    source = load_family(spec)
    with pytest.raises(FamilyError, match=re.escape(expected)):
        UserFamily(source, cache=False).sample(1, seed=0)
    A, _b, _built = family_system(source, MPI.COMM_SELF, {"kappa": 1.0, "load": 1.0})
    with pytest.raises(FamilyError, match=re.escape(expected)):
        matrix_statistics(A, ("norm_fro", "bad"), spec)
    A.destroy()


@pytest.mark.parametrize("case", list(BAD_DECLARATIONS))
def test_a_bad_statistics_declaration_is_named_with_its_file(tmp_path, case):
    statistics, expected = BAD_DECLARATIONS[case]
    path = write_family(tmp_path, with_statistics(statistics))
    with pytest.raises(FamilyError, match=re.escape(expected)):
        load_family(f"{path}:make")


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("{dir}/missing.py:make", "family file {dir}/missing.py does not exist"),
        ("{dir}/family.py:build", "family.py defines no function 'build'; its functions: ['make']"),
        ("{dir}/family.py", "family must be FILE.py:FUNCTION or MODULE:FUNCTION"),
    ],
)
def test_a_family_that_cannot_be_loaded_is_one_line_on_the_command_line(
    tmp_path, capsys, spec, expected
):
    write_family(tmp_path)
    with pytest.raises(SystemExit) as stopped:
        cli.main(["evaluate", "family", "--baseline", "base", "--family",
                  spec.format(dir=tmp_path)])  # fmt: skip
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and err.count("\n") == 1
    assert expected.format(dir=tmp_path) in err


def test_the_built_in_beam_is_a_family_file_that_trains_as_any_other():
    from femeta.problems.elasticity import ElasticBeam

    beam = ElasticBeam((8, 2, 2), cache=False)
    params = beam.draw(4, seed=0)
    A, b = beam.assemble(params)
    family = UserFamily(load_family("femeta.problems.beam_family:make"), cache=False)
    assert family.param_names == beam.param_names
    family_A, family_b = family._forms()(params)
    assert torch.equal(family_A.indices, A.indices) and torch.equal(family_A.values, A.values)
    assert torch.equal(family_b, b)
