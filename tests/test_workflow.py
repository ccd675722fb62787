import torch

from femeta.workflow import TrainOptions, evaluate_metasolver, load_metasolver, train_metasolver


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
