"""Bad input at every public CLI command and API entry point gets a clear error.

The CLI answers with one line on stderr and exit status 2, never a traceback;
the API raises ``ValueError`` (or ``TypeError`` for a wrong type) saying what
was wrong.
"""

import json

import pytest
import torch

from femeta.experiments import get_experiment
from femeta.losses import error_after_m, iteration_surrogate
from femeta.metasolvers import MLP
from femeta.problems import ElasticBeam, Poisson1D, TaskSet
from femeta.problems.poisson1d import closed_form_matrix
from femeta.runs import RunError, load_run, read_history
from femeta.solvers import iccg, jacobi
from femeta.training import TrainConfig
from femeta.workflow import TrainOptions, load_metasolver, resume_training, train_metasolver


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("bad-input") / "model"
    train_metasolver(TrainOptions(loss="m", m=1, epochs=1), out)
    return out


A16 = torch.from_numpy(closed_form_matrix(16))
B = torch.ones(3, 16, dtype=torch.float64)
NAN = float("nan")

API_CASES = {
    "jacobi: b of the wrong rank": (
        lambda: jacobi(A16, B[0], tol=1e-6, max_iterations=5),
        "batch, N",
    ),
    "jacobi: A of the wrong size": (
        lambda: jacobi(A16[:4, :4], B, tol=1e-6, max_iterations=5),
        "shape",
    ),
    "jacobi: NaN in b": (lambda: jacobi(A16, B * NAN, tol=1e-6, max_iterations=5), "NaN"),
    "jacobi: zero tolerance": (lambda: jacobi(A16, B, tol=0.0, max_iterations=5), "tolerance"),
    "jacobi: negative cap": (lambda: jacobi(A16, B, tol=1e-6, max_iterations=-1), "max_iterations"),
    "iccg: non-positive alpha": (
        lambda: iccg(A16.expand(3, 16, 16), B, torch.zeros(3), tol=1e-6, max_iterations=5),
        "alpha",
    ),
    "iccg: NaN alpha": (
        lambda: iccg(A16.expand(3, 16, 16), B, torch.full((3,), NAN), tol=1e-6, max_iterations=5),
        "alpha",
    ),
    "surrogate: non-positive tolerance": (
        lambda: iteration_surrogate(jacobi(A16, B, tol=None, max_iterations=2), -1.0),
        "tolerance",
    ),
    "TrainConfig: zero epochs": (lambda: TrainConfig(epochs=0), "epochs"),
    "TrainConfig: NaN learning rate": (lambda: TrainConfig(lr=NAN), "lr"),
    "TrainOptions: unknown loss": (lambda: TrainOptions(loss="l1"), "unknown loss"),
    "TrainOptions: tolerance 0": (lambda: TrainOptions(tol=0.0), "tolerance"),
    "TrainOptions: NaN tolerance": (lambda: TrainOptions(tol=NAN), "tolerance"),
    "TrainOptions: fractional m": (lambda: TrainOptions(m=2.5), "m must be an integer"),
    "TrainOptions: text learning rate": (lambda: TrainOptions(lr="fast"), "lr must be a number"),
    "TrainOptions: NaN smoothing step": (
        lambda: TrainOptions(smooth=NAN),
        "smooth must be positive",
    ),
    "TrainOptions: NaN ICF penalty weight": (
        lambda: TrainOptions(problem="elasticity", gamma=NAN),
        "gamma must be positive",
    ),
    "ElasticityIccg: zero ICF penalty weight": (
        lambda: get_experiment("elasticity").objective("surrogate", 243, 1e-6, gamma=0.0),
        "gamma must be a positive finite number",
    ),
    "TrainOptions: clip and smooth": (
        lambda: TrainOptions(problem="elasticity", clip=10.0, smooth=0.25),
        "clip or smooth, not both",
    ),
    "Poisson1D: p outside [0, 1]": (lambda: Poisson1D(p=1.5), "probability"),
    "Poisson1D: NaN p": (lambda: Poisson1D(p=NAN), "probability"),
    "Poisson1D: unknown split": (lambda: Poisson1D().split("dev", 0), "unknown split"),
    "ElasticBeam: W <= 0": (
        lambda: ElasticBeam(cache=False).assemble(torch.tensor([[0.0, 1.0, 1.0, 1.0]])),
        "W",
    ),
    "ElasticBeam: NaN parameter": (
        lambda: ElasticBeam(cache=False).assemble(torch.tensor([[0.1, NAN, 1.0, 1.0]])),
        "lambda = nan",
    ),
    "get_experiment: unknown problem": (lambda: get_experiment("heat3d"), "unknown problem"),
    "Poisson meta-solver: unknown kind": (
        lambda: get_experiment("poisson1d").metasolver("best"),
        "unknown meta-solver",
    ),
    "MLP: unknown activation": (lambda: MLP(2, (3,), 1, "softmax2"), "unknown activation"),
    "TaskSet: fields of different lengths": (
        lambda: TaskSet({"a": torch.zeros(2), "b": torch.zeros(3)}),
        "same number of rows",
    ),
}


@pytest.mark.parametrize("case", sorted(API_CASES))
def test_api_entry_points_reject_bad_input(case):
    call, message = API_CASES[case]
    with pytest.raises((ValueError, TypeError), match=message):
        call()


def test_loss_of_a_result_is_finite_for_good_input():
    result = jacobi(A16, B, tol=None, max_iterations=3)
    assert bool(torch.isfinite(error_after_m(result)).all())


def test_run_directories_are_checked(tmp_path, trained):
    with pytest.raises(RunError, match="does not exist"):
        load_run(tmp_path / "missing", "poisson1d")
    with pytest.raises(RunError, match="model for 'poisson1d', not 'elasticity'"):
        load_metasolver(trained, "elasticity")
    with pytest.raises(RunError, match="completed run"):
        resume_training(trained, "poisson1d")
    with pytest.raises(RunError, match=r"history\.json is missing"):
        read_history(tmp_path)


def test_errors_are_one_line_without_traceback(tmp_path, trained, invoke):
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text("{not json")
    (corrupt / "model.safetensors").write_bytes(b"garbage")
    wrong_problem = tmp_path / "other"
    wrong_problem.mkdir()
    (wrong_problem / "config.json").write_text(json.dumps({"problem": "elasticity"}))
    (wrong_problem / "model.safetensors").write_bytes((trained / "model.safetensors").read_bytes())
    bad_weights = tmp_path / "bad-weights"
    bad_weights.mkdir()
    (bad_weights / "config.json").write_text((trained / "config.json").read_text())
    (bad_weights / "model.safetensors").write_bytes(b"\x00" * 20)
    cases = {
        ("train", "heat3d", "--out", tmp_path / "x"): "unknown problem",
        ("train", "poisson1d", "--tol", "0", "--out", tmp_path / "y"): "tolerance",
        ("train", "poisson1d", "--tol", "-1e-6", "--out", tmp_path / "y"): "tolerance",
        ("train", "poisson1d", "--loss", "l2", "--out", tmp_path / "y"): "unknown loss",
        ("train", "poisson1d", "--p", "2", "--out", tmp_path / "y"): "probability",
        ("train", "poisson1d", "--epochs", "0", "--out", tmp_path / "y"): "epochs",
        ("train", "poisson1d", "--select", "best", "--out", tmp_path / "y"): "select must be",
        (
            "train",
            "elasticity",
            "--smooth",
            "0",
            "--engine",
            "petsc",
            "--out",
            tmp_path / "y",
        ): "needs --smooth",
        ("train", "elasticity", "--engine", "gpu", "--out", tmp_path / "y"): "engine must be",
        (
            "train",
            "elasticity",
            "--splits",
            "10",
            "0",
            "10",
            "--out",
            tmp_path / "y",
        ): "splits must be 3 integers >= 1",
        ("train", "elasticity", "--smooth", "-1", "--out", tmp_path / "y"): "smooth must be",
        (
            "train",
            "elasticity",
            "--paper",
            "--inputs",
            "invariant",
            "--out",
            tmp_path / "y",
        ): "drop --inputs invariant, or drop --paper",
        ("train", "elasticity", "--gamma", "0", "--out", tmp_path / "y"): "gamma must be",
        ("train", "elasticity", "--inputs", "all", "--out", tmp_path / "y"): "unknown inputs",
        ("train", "elasticity", "--gamma", "inf", "--out", tmp_path / "y"): "gamma must be",
        ("train", "poisson1d", "--gamma", "100", "--out", tmp_path / "y"): "family shift only",
        (
            "train",
            "poisson1d",
            "--cells",
            "8",
            "2",
            "2",
            "--out",
            tmp_path / "y",
        ): "elasticity shift only",
        (
            "train",
            "poisson1d",
            "--select",
            "iterations",
            "--no-monitor",
            "--out",
            tmp_path / "y",
        ): "drop --no-monitor",
        (
            "train",
            "poisson1d",
            "--smooth",
            "0.25",
            "--out",
            tmp_path / "y",
        ): "family shift only",
        (
            "train",
            "poisson1d",
            "--config",
            tmp_path / "none.toml",
            "--out",
            tmp_path / "y",
        ): "does not exist",
        ("train", "poisson1d", "--out", trained): "not empty",
        ("evaluate", "poisson1d", "--model", tmp_path / "missing"): "does not exist",
        ("evaluate", "poisson1d", "--model", corrupt): "not valid JSON",
        ("evaluate", "poisson1d", "--model", wrong_problem): "model for 'elasticity'",
        ("evaluate", "poisson1d", "--model", bad_weights): "corrupt",
        ("evaluate", "poisson1d"): "exactly one of",
        ("evaluate", "poisson1d", "--baseline", "base", "--tol", "0"): "tolerance",
        ("evaluate", "poisson1d", "--baseline", "base", "--tol", "nan"): "tolerance",
        ("evaluate", "nope", "--baseline", "base"): "unknown problem",
    }
    for args, message in cases.items():
        result = invoke(*args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output, (args, result.output)
        assert "Traceback" not in result.output
        assert len(result.output.strip().splitlines()) == 1, (args, result.output)


def test_bad_toml_keys_are_reported(tmp_path, invoke):
    config = tmp_path / "bad.toml"
    config.write_text("learning_rate = 3\n")
    result = invoke("train", "poisson1d", "--config", config, "--out", tmp_path / "r")
    assert result.exit_code == 2 and "unknown keys ['learning_rate']" in result.output
    config.write_text("m = 2.5\n")
    result = invoke("train", "poisson1d", "--config", config, "--out", tmp_path / "r")
    assert result.exit_code == 2 and "m must be an integer" in result.output
    config.write_text("epochs = [\n")
    result = invoke("train", "poisson1d", "--config", config, "--out", tmp_path / "r")
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_resume_errors(tmp_path, trained, invoke):
    cases = {
        ("train", "poisson1d", "--resume", trained): "completed run",
        ("train", "poisson1d", "--resume", tmp_path): "does not exist",
        ("train", "poisson1d"): "exactly one of",
    }
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    cases[("train", "poisson1d", "--resume", tmp_path / "broken")] = "not a readable"
    for args, message in cases.items():
        result = invoke(*args)
        assert result.exit_code == 2 and message in result.output, (args, result.output)


def test_reproduce_and_plot_reject_bad_options(tmp_path, invoke):
    cases = {
        ("reproduce", "table3", "--jobs", "0"): "--jobs",
        ("reproduce", "table3", "--epochs", "0"): "--epochs",
        ("reproduce", "table2", "--rows", "m=7"): "unknown Table 2 rows",
        ("reproduce", "table2", "--jobs", "0"): "--jobs",
        ("reproduce", "table2", "--max-iterations", "0"): "--max-iterations",
        ("reproduce", "table2", "--engine", "petsc"): "needs --smooth",
        ("reproduce", "table2", "--smooth", "-1"): "smooth must be positive",
        ("reproduce", "table2", "--smooth", "0.25", "--engine", "cuda"): "unknown engine",
        ("reproduce", "table2", "--ic-pattern", "full"): "unknown ic_pattern 'full'",
        ("plot", tmp_path / "missing"): "does not exist",
        ("plot", tmp_path, "--tol", "2"): "tolerance",
        (
            "evaluate",
            "poisson1d",
            "--baseline",
            "base",
            "--max-iterations",
            "0",
        ): "--max-iterations",
        ("evaluate", "poisson1d", "--baseline", "base", "--p", "nan"): "probability",
        ("evaluate", "poisson1d", "--baseline", "base", "--device", "tpu"): "unknown device",
        ("train", "poisson1d", "--device", "gpu0", "--out", tmp_path / "d"): "unknown device",
    }
    for args, message in cases.items():
        result = invoke(*args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output and "Traceback" not in result.output, (args, result.output)
