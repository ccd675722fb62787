"""femeta.load(run).predict(...) (numpy) against the torch meta-solver it was trained as."""

import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import femeta
from femeta.model import FORMAT_VERSION
from femeta.workflow import load_metasolver

BEAM = {"W": 0.1, "lambda_": 1.25, "mu": 1.0, "rho": 1.0}


def format1_copy(run, tmp_path):
    """The run as a format-1 file: no ``format`` and no ``model`` entry."""
    old = tmp_path / f"{run.name}-format1"
    shutil.copytree(run, old)
    config = json.loads((old / "config.json").read_text())
    assert config["format"] == FORMAT_VERSION and "model" in config
    del config["format"], config["model"]
    (old / "config.json").write_text(json.dumps(config))
    return old


def beam_alphas(model, params):
    return np.array(
        [model.predict(W=w, lambda_=lam, mu=mu, rho=rho) for w, lam, mu, rho in params.tolist()]
    )


@pytest.fixture(scope="module")
def beam_test(beam_run):
    """The test beams' parameters and the torch network's shifts for them."""
    experiment, psi = load_metasolver(beam_run, "elasticity")
    tasks = experiment.tasks("test", 0)
    with torch.no_grad():
        alpha = psi(tasks["features"]).numpy()
    return tasks["params"], alpha


def test_beam_shift_equals_the_torch_network_on_the_test_beams(beam_run, beam_test):
    params, expected = beam_test
    model = femeta.load(beam_run)
    assert (model.problem, model.predicts) == ("elasticity", "alpha")
    assert list(model.parameters) == ["W", "lambda_", "mu", "rho"]
    assert not model.needs_matrix  # invariant inputs: W and lambda/mu only
    saved = json.loads((beam_run / "config.json").read_text())["model"]
    assert model.base_alpha == saved["base_alpha"] > 0  # Psi_base's shift
    alpha = beam_alphas(model, params)
    assert len(alpha) == 1000 and type(model.predict(**BEAM)) is float
    np.testing.assert_allclose(alpha, expected, rtol=1e-12, atol=0)


def test_a_format1_beam_run_predicts_the_same(beam_run, beam_test, tmp_path):
    params, _ = beam_test
    old = femeta.load(format1_copy(beam_run, tmp_path))
    assert old.base_alpha is None and list(old.parameters) == ["W", "lambda_", "mu", "rho"]
    sample = params[::50]
    assert np.array_equal(beam_alphas(old, sample), beam_alphas(femeta.load(beam_run), sample))


def test_poisson_guess_equals_the_torch_network_on_the_test_tasks(poisson_run, tmp_path):
    experiment, psi = load_metasolver(poisson_run, "poisson1d")
    f = experiment.tasks("test", 0)["f"]
    with torch.no_grad():
        expected = psi(f).numpy()
    model = femeta.load(poisson_run)
    assert (model.predicts, list(model.parameters)) == ("guess", ["f"])
    guesses = np.stack([model.predict(f=row) for row in f.numpy()])
    assert guesses.shape == (1000, 16)
    np.testing.assert_allclose(guesses, expected, rtol=1e-10, atol=1e-12 * np.abs(expected).max())
    old = femeta.load(format1_copy(poisson_run, tmp_path))
    assert np.array_equal(old.predict(f=f[0].numpy()), guesses[0])


def test_robertson_guess_and_relaxation_equal_the_torch_network(robertson_run, tmp_path):
    experiment, psi = load_metasolver(robertson_run, "robertson")
    features = experiment.tasks("test", 0)["features"]
    with torch.no_grad():
        guess, relaxation = (value.numpy() for value in psi(features))
    model = femeta.load(robertson_run)
    assert model.predicts == "guess+relaxation"
    names = list(model.parameters)
    assert names == ["c1", "c2", "c3", "h", "y1", "y2", "y3"]
    predicted = [model.predict(**dict(zip(names, row, strict=True))) for row in features.tolist()]
    assert len(predicted) == len(features) == 400  # 4 test sets of 100 steps
    # The network computes in float32, as in training.
    np.testing.assert_allclose(np.stack([g for g, _ in predicted]), guess, rtol=1e-5)
    y_previous = features[:, 4:].numpy()
    assert not np.allclose(guess, y_previous, rtol=1e-3)  # the guess head is in use
    np.testing.assert_allclose([r for _, r in predicted], relaxation, rtol=1e-5)
    assert all(1 < r < 2 for _, r in predicted)
    old = femeta.load(format1_copy(robertson_run, tmp_path))
    first = dict(zip(names, features[0].tolist(), strict=True))
    old_guess, old_relaxation = old.predict(**first)
    assert np.array_equal(old_guess, predicted[0][0]) and old_relaxation == predicted[0][1]


BEAM_ERRORS = {
    "missing": ({"W": 0.1, "lambda_": 1.0, "mu": 1.0}, "missing parameter 'rho'"),
    "unknown": ({**BEAM, "nu": 0.3}, "unknown parameter 'nu'"),
    "Young's modulus": ({**BEAM, "E": 1.0}, "unknown parameter 'E' .* takes W, lambda_, mu, rho"),
    "zero": ({**BEAM, "rho": 0.0}, "rho = 0.0 is not a positive finite number"),
    "negative": ({**BEAM, "W": -0.1}, "W = -0.1 is not a positive"),
    "nan": ({**BEAM, "mu": math.nan}, "mu = nan is not a positive"),
    "infinite": ({**BEAM, "lambda_": math.inf}, "lambda_ = inf is not a positive"),
    "a string": ({**BEAM, "W": "wide"}, "W = 'wide' is not a positive"),
    "None": ({**BEAM, "mu": None}, "mu = None is not a positive"),
    "W too large": ({**BEAM, "W": 0.5}, r"W = 0.5 is outside \[0.003, 0.3\]"),
    "W too small": ({**BEAM, "W": 1e-4}, "W = 0.0001 is outside"),
    "lambda/mu too large": (
        {**BEAM, "lambda_": 10.0, "mu": 0.05},
        r"lambda_/mu = 200 \(lambda_ = 10.0, mu = 0.05\) is outside \[0.01, 100\]",
    ),
}


@pytest.mark.parametrize("case", BEAM_ERRORS)
def test_bad_beam_parameters_name_the_parameter(beam_run, case):
    params, message = BEAM_ERRORS[case]
    with pytest.raises(ValueError, match=message) as caught:
        femeta.load(beam_run).predict(**params)
    assert "\n" not in str(caught.value)


def test_extrapolate_lifts_the_range_check_only(beam_run):
    model = femeta.load(beam_run)
    for params in ({**BEAM, "W": 0.5}, {**BEAM, "lambda_": 10.0, "mu": 0.05}):
        alpha = model.predict(**params, extrapolate=True)
        assert isinstance(alpha, float) and 0 < alpha <= 1
    with pytest.raises(ValueError, match="W = -1 is not a positive"):
        model.predict(**{**BEAM, "W": -1}, extrapolate=True)


def test_an_invariant_model_takes_steel_in_pascals(beam_run):
    """Only lambda/mu is read: moduli and density in SI units give the shift of unit ones."""
    model = femeta.load(beam_run)
    assert model.predict(**{"lambda": 1.25, "W": 0.1, "mu": 1.0, "rho": 1.0}) == model.predict(
        **BEAM
    )  # the feature's own name works too
    steel = model.predict(W=0.1, lambda_=1e11, mu=1e11, rho=7800)
    assert steel == model.predict(W=0.1, lambda_=1.0, mu=1.0, rho=1.0)
    # The same ratio at any scale; numbers may come as numpy scalars or ints.
    assert model.predict(W=np.float32(0.1), lambda_=2e11, mu=1e11, rho=7800) == pytest.approx(
        model.predict(W=0.1, lambda_=2, mu=1, rho=1), rel=1e-6
    )


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"f": np.ones(15)}, r"f must be 16 finite numbers .* got shape \(15,\)"),
        ({"f": np.full(16, np.nan)}, "f must be 16 finite numbers"),
        ({}, "missing parameter 'f'"),
        ({"f": np.ones(16), "p": 0.01}, "unknown parameter 'p'"),
    ],
)
def test_bad_poisson_source_names_f(poisson_run, params, message):
    with pytest.raises(ValueError, match=message):
        femeta.load(poisson_run).predict(**params)


ROBERTSON = {"c1": 0.04, "c2": 3e7, "c3": 1e4, "h": 1e-3, "y1": 1.0, "y2": 0.0, "y3": 0.0}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"c1": 10.0}, r"c1 = 10 is outside \[0.0001, 1\]"),
        ({"c2": 1e3}, r"c2 = 1000 is outside \[100000, 1e\+09\]"),
        ({"y2": -1e-3}, "y2 = -0.001 is not a non-negative finite number"),
        ({"h": 0.0}, "h = 0.0 is not a positive finite number"),
        ({"y3": None}, "missing parameter 'y3'"),
    ],
)
def test_bad_robertson_parameters_name_the_parameter(robertson_run, change, message):
    params = {**ROBERTSON, **change}
    params = {name: value for name, value in params.items() if value is not None}
    with pytest.raises(ValueError, match=message):
        femeta.load(robertson_run).predict(**params)


def test_robertson_accepts_the_initial_state(robertson_run):
    guess, relaxation = femeta.load(robertson_run).predict(**ROBERTSON)
    assert guess.shape == (3,) and np.isfinite(guess).all() and 1 < relaxation < 2


@pytest.mark.parametrize(
    ("spoil", "message"),
    [
        (lambda run: (run / "config.json").write_text("{"), "config.json is not valid JSON"),
        (lambda run: (run / "config.json").write_bytes(b"\xff\xfe"), "is not valid JSON"),
        (lambda run: (run / "config.json").write_text("[]"), "has no 'problem' entry"),
        (lambda run: (run / "model.safetensors").write_bytes(b"junk"), "is corrupt"),
        (lambda run: (run / "model.safetensors").unlink(), "model.safetensors is missing"),
        (lambda run: _edit(run, format=99), "run-file format 99; this femeta reads formats 1"),
        (lambda run: _edit(run, femeta_version="9.0.0"), "written by femeta 9.0.0"),
        (lambda run: _edit(run, metasolver="base"), "does not hold a network"),
        (
            lambda run: _edit(run, problem="heat", format=..., model=...),
            "no model description for problem 'heat'",
        ),
        (lambda run: _edit(run, model={"network": "ShiftNet"}), "does not describe a usable"),
    ],
)
def test_a_bad_run_directory_is_a_run_error(poisson_run, tmp_path, spoil, message):
    run = tmp_path / "run"
    shutil.copytree(poisson_run, run)
    spoil(run)
    with pytest.raises(femeta.RunError, match=message):
        femeta.load(run)


def _edit(run, **changes):
    """Change entries of the run's config.json; ``...`` deletes one."""
    config = json.loads((run / "config.json").read_text())
    config.update(changes)
    config = {key: value for key, value in config.items() if value is not ...}
    (run / "config.json").write_text(json.dumps(config))


def test_a_missing_directory_is_a_run_error(tmp_path):
    with pytest.raises(femeta.RunError, match="does not exist"):
        femeta.load(tmp_path / "nothing")
    assert issubclass(femeta.RunError, ValueError)


WITHOUT_TORCH = """
import sys
import femeta
model = femeta.load(sys.argv[1])
alpha = model.predict(W=0.1, lambda_=1.25, mu=1.0, rho=1.0)
assert "torch" not in sys.modules, "femeta.load imported torch"
print(repr(alpha))
"""


def test_load_and_predict_never_import_torch(beam_run):
    result = subprocess.run([sys.executable, "-c", WITHOUT_TORCH, str(beam_run)],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert float(result.stdout) == femeta.load(beam_run).predict(**BEAM)
