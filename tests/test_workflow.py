import inspect
import json

import pytest
import torch

from femeta.experiments import ElasticityIccg
from femeta.workflow import (
    TrainOptions,
    build_experiment,
    evaluate_metasolver,
    load_checkpoint,
    load_metasolver,
    monitor_cap,
    resolve_options,
    resume_training,
    train_metasolver,
)


def weights(options):
    _, metasolver, _ = train_metasolver(options)
    return metasolver.state_dict()


def test_same_seed_same_data_and_weights_other_seed_differs():
    options = TrainOptions(loss="m", m=2, epochs=3, p=0.01, seed=5)
    first, second = weights(options), weights(options)
    assert all(torch.equal(first[name], second[name]) for name in first)
    other = weights(TrainOptions(loss="m", m=2, epochs=3, p=0.01, seed=6))
    assert not all(torch.equal(first[name], other[name]) for name in first)


def test_saved_model_evaluates_like_the_trained_one(tmp_path):
    options = TrainOptions(loss="surrogate", m=400, tol=1e-4, epochs=2, p=0.01)
    experiment, trained, result = train_metasolver(options, tmp_path / "run")
    assert result.history[-1].validation_iterations is None
    _, loaded = load_metasolver(tmp_path / "run", "poisson1d")
    direct = evaluate_metasolver(experiment, trained, 1e-4)
    reloaded = evaluate_metasolver(experiment, loaded, 1e-4)
    assert (direct.iterations == reloaded.iterations).all()
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_poisson_trains_with_the_recommended_set_up_and_saves_a_plain_network(tmp_path):
    options = TrainOptions(loss="surrogate", m=300, tol=1e-4, epochs=6, p=0.01)
    experiment, trained, result = train_metasolver(options, tmp_path / "run")
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["train_config"]["schedule"] == "cosine"
    assert config["train_config"]["ema"] == 0.99 and config["options"]["paper"] is False
    # Validated every 5 epochs and after the last one.
    assert [r["validation_loss"] == r["validation_loss"] for r in config_history(tmp_path)] == [
        False, False, False, False, True, True
    ]  # fmt: skip
    assert result.best_epoch in (5, 6)
    _, loaded = load_metasolver(tmp_path / "run", "poisson1d")
    assert type(loaded.network) is type(experiment.metasolver("nn").network)
    direct = evaluate_metasolver(experiment, trained, 1e-4)
    assert (direct.iterations == evaluate_metasolver(experiment, loaded, 1e-4).iterations).all()
    # It learned something from the zero guess (Psi_base).
    base = evaluate_metasolver(experiment, experiment.metasolver("base"), 1e-4)
    assert direct.mean_iterations < base.mean_iterations


def config_history(tmp_path):
    return json.loads((tmp_path / "run" / "history.json").read_text())


def test_paper_flag_gives_the_papers_optimiser_and_network(tmp_path):
    options = TrainOptions(loss="m", m=2, epochs=1, p=0.01, paper=True)
    train_metasolver(options, tmp_path / "run")
    config = json.loads((tmp_path / "run" / "config.json").read_text())["train_config"]
    assert (config["schedule"], config["betas"], config["ema"]) == ("plateau", [0.999, 0.999], None)
    assert (config["epochs"], config["lr"]) == (1, 0.01)


def test_a_checkpoint_of_the_recommended_set_up_evaluates_as_a_plain_network(tmp_path):
    # A checkpoint keeps the network as it trains (scaled); loading it folds the scaling.
    options = resolve_options(TrainOptions(loss="m", m=2, epochs=2, p=0.01), "cpu")
    experiment = build_experiment(options, "cpu")
    train_tasks = experiment.tasks("train", 0)
    training = experiment.training_metasolver(train_tasks, paper=False)
    with torch.no_grad():
        for parameter in training.parameters():
            parameter.normal_(0, 0.1)
    trainer = {"best_state": training.state_dict(), "epoch": 1, "best_epoch": 1,
               "best_validation_loss": 1.0}  # fmt: skip
    torch.save({"options": options.as_dict(), "trainer": trainer}, tmp_path / "checkpoint.pt")
    _, loaded, progress = load_checkpoint(tmp_path / "checkpoint.pt", "poisson1d")
    assert type(loaded.network) is type(experiment.metasolver("nn").network)
    features = train_tasks["f"][:5]
    with torch.no_grad():
        torch.testing.assert_close(loaded(features), training(features))
    assert progress["epochs_done"] == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_training_on_cuda_gives_a_model_that_runs_on_the_cpu(tmp_path):
    options = TrainOptions(loss="surrogate", m=400, tol=1e-4, epochs=2, p=0.01)
    experiment, trained, _ = train_metasolver(options, tmp_path / "run", device="cuda")
    assert experiment.matrix.is_cuda and next(trained.parameters()).is_cuda
    on_gpu = evaluate_metasolver(experiment, trained, 1e-4)
    cpu_experiment, on_cpu = load_metasolver(tmp_path / "run", "poisson1d", device="cpu")
    stats = evaluate_metasolver(cpu_experiment, on_cpu, 1e-4)
    assert abs(stats.mean_iterations - on_gpu.mean_iterations) <= 0.01


def test_asking_for_cuda_without_a_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ValueError, match="no CUDA GPU"):
        train_metasolver(TrainOptions(loss="m", m=1, epochs=1), device="cuda")


def test_the_monitor_validates_at_the_cap_a_surrogate_was_trained_for():
    beam = {"problem": "elasticity", "smooth": 0.25}
    assert monitor_cap(243, TrainOptions(**beam, m=2430)) == 2430  # cap 10 N: validated at 10 N
    assert monitor_cap(243, TrainOptions(**beam, m=243)) == 243
    assert monitor_cap(243, TrainOptions(**beam, loss="m", m=1)) == 243  # L_1: m is no cap
    assert monitor_cap(10_000, TrainOptions(problem="robertson", m=2000)) == 10_000


@pytest.mark.dolfinx
def test_with_the_petsc_engine_the_monitor_solves_in_petsc():
    pytest.importorskip("petsc4py")
    from femeta.evaluation import IterationStats
    from femeta.solvers.petsc import petsc_iccg

    options = TrainOptions(problem="elasticity", smooth=0.25, engine="petsc", epochs=1,
                           select="iterations")  # fmt: skip
    experiment, psi, result = train_metasolver(options, monitor_iterations=True)
    tasks = experiment.tasks("validation", 0)
    with torch.no_grad():
        alpha = psi(tasks["features"])
    solved = petsc_iccg(tasks["A"], tasks["b"], alpha, tol=1e-6, max_iterations=243)
    expected = IterationStats.from_result(solved, 1e-6, 243).mean_iterations
    assert result.history[0].validation_iterations == expected


@pytest.mark.dolfinx
@pytest.mark.parametrize(("gamma", "in_force"), [(None, 500.0), (2000.0, 2000.0)])
def test_the_icf_penalty_weight_reaches_the_objective_and_the_saved_run(
    tmp_path, monkeypatch, gamma, in_force
):
    real = ElasticityIccg.objective
    seen = []

    def spy(self, *args, **kwargs):
        seen.append(inspect.signature(real).bind(self, *args, **kwargs).arguments.get("gamma"))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ElasticityIccg, "objective", spy)
    options = TrainOptions(problem="elasticity", loss="m", m=1, smooth=0.0, epochs=1, gamma=gamma)
    train_metasolver(options, tmp_path / "run")
    assert seen == [in_force]
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["options"]
    assert saved["gamma"] == in_force


@pytest.mark.dolfinx
def test_a_beam_checkpoint_saved_without_its_pattern_resumes_with_values(tmp_path, monkeypatch):
    def stop_after_the_first_epoch(record):  # epoch 1 is checkpointed after its callback
        if record.epoch == 2:
            raise KeyboardInterrupt

    options = TrainOptions(problem="elasticity", loss="m", m=1, smooth=0.0, epochs=2)
    with pytest.raises(KeyboardInterrupt):
        train_metasolver(options, tmp_path, stop_after_the_first_epoch, checkpoint_seconds=0)
    path = tmp_path / "checkpoint.pt"
    saved = torch.load(path, weights_only=True)
    assert saved["options"]["ic_pattern"] == "stored"
    del saved["options"]["ic_pattern"]  # a checkpoint saved without the key
    torch.save(saved, path)
    patterns = []
    real = ElasticityIccg.__post_init__

    def spy(self):
        patterns.append(self.ic_pattern)
        real(self)

    monkeypatch.setattr(ElasticityIccg, "__post_init__", spy)
    experiment, _, result = resume_training(tmp_path, "elasticity")
    assert experiment.ic_pattern == "values" and patterns == ["values"]
    assert [record.epoch for record in result.history] == [1, 2]


def derivative_options(options):
    return (options.smooth, options.engine, options.inputs)


def test_beams_train_with_the_best_known_settings_unless_told_otherwise():
    def resolved(**given):
        return derivative_options(
            resolve_options(TrainOptions(problem="elasticity", **given), "cpu")
        )

    assert resolved() == (0.25, "petsc", "invariant")
    assert resolved(paper=True) == (0.0, "torch", "paper")
    # What is given wins, and what follows from it follows.
    assert resolved(smooth=0.5) == (0.5, "petsc", "invariant")
    assert resolved(smooth=0.0) == (0.0, "torch", "invariant")
    assert resolved(clip=100.0) == (0.0, "torch", "invariant")
    assert resolved(engine="torch") == (0.25, "torch", "invariant")
    assert resolved(inputs="paper") == (0.25, "petsc", "paper")
    assert resolved(paper=True, smooth=0.0, epochs=5) == (0.0, "torch", "paper")
    # A GPU keeps the torch solves.
    on_gpu = ElasticityIccg.recommended_options({}, torch.device("cuda"))
    assert on_gpu == {"smooth": 0.25, "engine": "torch", "inputs": "invariant"}
    with pytest.raises(
        ValueError, match=r"drop --smooth 0\.25 and --engine petsc, or drop --paper"
    ):
        resolved(paper=True, smooth=0.25, engine="petsc")
    with pytest.raises(ValueError, match="needs --smooth"):
        resolved(clip=100.0, engine="petsc")


@pytest.mark.parametrize("problem", ["poisson1d", "robertson"])
def test_poisson_and_robertson_solve_in_torch_either_way(problem):
    for paper in (False, True):
        options = resolve_options(TrainOptions(problem=problem, paper=paper), "cpu")
        assert derivative_options(options) == (None, "torch", None)
