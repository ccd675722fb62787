import json
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from femeta.cli import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "model"
    result = invoke("train", "poisson1d", "--loss", "surrogate", "--tol", "1e-4", "--m", "300",
                    "--epochs", "2", "--p", "0.01", "--out", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    return out


def test_train_writes_a_complete_run_directory(trained):
    assert {p.name for p in trained.iterdir()} == {
        "model.safetensors",
        "config.json",
        "history.json",
    }
    config = json.loads((trained / "config.json").read_text())
    assert config["problem"] == "poisson1d" and config["options"]["tol"] == 1e-4
    assert config["options"]["m"] == 300 and config["problem_params"]["p"] == 0.01
    assert len(json.loads((trained / "history.json").read_text())) == 2


def test_evaluate_prints_one_json_object(trained):
    result = invoke("evaluate", "poisson1d", "--model", trained, "--tol", "1e-4", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert {"mean_iterations", "std_iterations", "convergence_ratio", "n_tasks"} <= set(summary)
    assert summary["n_tasks"] == 1000 and summary["p"] == 0.01


def test_evaluate_baseline_matches_table3():
    result = invoke("evaluate", "poisson1d", "--baseline", "--tol", "1e-6", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert abs(summary["mean_iterations"] - 158.41) < 5 and summary["convergence_ratio"] == 1.0


def test_train_reads_a_toml_config(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('loss = "m"\nm = 3\nepochs = 1\nbatch-size = 500\n')
    out = tmp_path / "run"
    result = invoke("train", "poisson1d", "--config", config, "--epochs", "2", "--out", out)
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "config.json").read_text())["options"]
    assert (saved["loss"], saved["m"], saved["epochs"], saved["batch_size"]) == ("m", 3, 2, 500)


def test_reproduce_table3_runs_end_to_end(tmp_path):
    result = invoke(
        "reproduce", "table3", "--epochs", "1", "--jobs", "1", "--json", "--out", tmp_path
    )
    assert result.exit_code == 0, result.output
    table = json.loads(result.stdout)
    assert len(table["rows"]) == 20 and table["epochs"] == 1
    base = next(r for r in table["rows"] if r["label"] == "base" and r["p"] == 0.0)
    assert base["paper"][2] == 158.41 and abs(base["mean"][2] - 158.41) < 5
    assert {"results.json", "figure1.png", "figure2.png"} <= {p.name for p in tmp_path.iterdir()}


def test_info_lists_the_stack():
    result = invoke("info")
    assert result.exit_code == 0, result.output
    for key in ("femeta", "torch", "device", "dolfinx"):
        assert key in result.output


@pytest.mark.parametrize("command", [[], ["train"], ["evaluate"], ["reproduce"], ["info"]])
def test_help_is_available(command):
    result = invoke(*command, "--help")
    assert result.exit_code == 0 and "Usage" in result.output


def test_errors_are_one_line_without_traceback(tmp_path, trained):
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
        ("evaluate", "poisson1d", "--baseline", "--tol", "0"): "tolerance",
        ("evaluate", "poisson1d", "--baseline", "--tol", "nan"): "tolerance",
        ("evaluate", "nope", "--baseline"): "unknown problem",
    }
    for args, message in cases.items():
        result = invoke(*args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output, (args, result.output)
        assert "Traceback" not in result.output
        assert len(result.output.strip().splitlines()) == 1, (args, result.output)


def test_bad_toml_keys_are_reported(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text("learning_rate = 3\n")
    result = invoke("train", "poisson1d", "--config", config, "--out", tmp_path / "r")
    assert result.exit_code == 2 and "unknown keys ['learning_rate']" in result.output
    config.write_text("epochs = [\n")
    result = invoke("train", "poisson1d", "--config", config, "--out", tmp_path / "r")
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_resume_after_a_kill_gives_the_same_weights(tmp_path):
    options = ["--loss", "m", "--m", "5", "--epochs", "150", "--p", "0.01", "--seed", "3"]
    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "femeta", "train", "poisson1d", *options]
    process = subprocess.Popen(
        [*command, "--checkpoint-seconds", "0", "--out", str(killed)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not (killed / "checkpoint.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert (killed / "checkpoint.pt").exists() and not (killed / "config.json").exists()

    resumed = invoke("train", "poisson1d", "--resume", killed)
    assert resumed.exit_code == 0, resumed.output
    straight = invoke("train", "poisson1d", *options, "--out", tmp_path / "straight")
    assert straight.exit_code == 0, straight.output

    first = load_file(killed / "model.safetensors")
    second = load_file(tmp_path / "straight" / "model.safetensors")
    assert first.keys() == second.keys()
    for name in first:
        assert bool((first[name] == second[name]).all()), name
    history = json.loads((killed / "history.json").read_text())
    assert [r["epoch"] for r in history] == list(range(1, 151))
    assert not (killed / "checkpoint.pt").exists()
    assert (killed / "config.json").exists()


def test_resume_errors(tmp_path, trained):
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


def test_plot_writes_training_curves_and_histograms(tmp_path, trained):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.json", "model.safetensors", "history.json"):
        (run / name).write_bytes((trained / name).read_bytes())
    result = invoke("plot", run, "--tol", "1e-4")
    assert result.exit_code == 0, result.output
    for name in ("training.png", "iterations.png"):
        assert (run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (run / "history.json").write_text("[{")
    result = invoke("plot", run)
    assert result.exit_code == 2 and "history.json is not valid JSON" in result.output
    result = invoke("plot", tmp_path / "nothing")
    assert result.exit_code == 2 and "does not exist" in result.output
