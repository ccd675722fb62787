import copy
import math

import pytest
import torch
from torch import nn

from femeta.problems.base import TaskSet
from femeta.training import TrainConfig, train


def regression_tasks(count, seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(count, 3, generator=generator, dtype=torch.float64)
    return TaskSet({"x": x, "y": x @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)})


def squared_error(model, tasks):
    return (model(tasks["x"]).squeeze(1) - tasks["y"]) ** 2


def linear_model():
    torch.manual_seed(0)
    return nn.Linear(3, 1, dtype=torch.float64)


def test_training_reduces_the_loss_and_keeps_the_best_weights():
    model = linear_model()
    config = TrainConfig(epochs=60, batch_size=32, lr=0.05, betas=(0.9, 0.999))
    result = train(model, squared_error, regression_tasks(256, 0), regression_tasks(64, 1), config)
    losses = [record.validation_loss for record in result.history]
    assert losses[-1] < 0.01 * losses[0]
    assert result.best_validation_loss == min(losses)
    assert result.history[result.best_epoch - 1].validation_loss == result.best_validation_loss
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, result.best_state[name])


def test_step_schedule_divides_the_learning_rate():
    config = TrainConfig(epochs=5, batch_size=64, lr=1e-2, schedule="steps", milestones=(2, 4))
    result = train(
        linear_model(), squared_error, regression_tasks(64, 0), regression_tasks(8, 1), config
    )
    assert [round(r.lr, 8) for r in result.history] == [1e-2, 2e-3, 2e-3, 4e-4, 4e-4]


def test_plateau_schedule_waits_for_patience():
    def constant(model, tasks):
        return model(tasks["x"]).squeeze(1) * 0 + 1.0

    config = TrainConfig(epochs=6, batch_size=64, lr=1e-2, patience=2)
    result = train(
        linear_model(), constant, regression_tasks(64, 0), regression_tasks(8, 1), config
    )
    assert [round(r.lr, 8) for r in result.history] == [1e-2, 1e-2, 1e-2, 2e-3, 2e-3, 2e-3]


def test_non_finite_steps_are_skipped_and_counted():
    model = linear_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def broken(model, tasks):
        return squared_error(model, tasks) * math.nan

    config = TrainConfig(epochs=2, batch_size=16)
    result = train(model, broken, regression_tasks(64, 0), regression_tasks(8, 1), config)
    assert result.skipped_steps == 8
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, before[name])


def test_steps_whose_squared_gradient_overflows_are_skipped():
    """A finite float32 gradient of 1e25 would leave Adam's second moment infinite."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    before = copy.deepcopy(model.state_dict())
    first_batch = [True]

    def spiky(model, tasks):
        loss = (model(tasks["x"].float()).squeeze(1) - tasks["y"].float()) ** 2
        scale = 1e25 if first_batch[0] else 1.0
        first_batch[0] = False
        return loss * scale

    config = TrainConfig(epochs=1, batch_size=16)
    result = train(model, spiky, regression_tasks(64, 0), regression_tasks(8, 1), config)
    assert result.skipped_steps == 1
    # Taken, that step would have frozen every weight: the other three must move them.
    for name, value in model.state_dict().items():
        assert bool(torch.isfinite(value).all()) and not torch.equal(value, before[name])


def test_training_steps_take_gradients_and_validation_does_not():
    calls = []

    def recording(model, tasks):
        calls.append((model.training, torch.is_grad_enabled()))
        return squared_error(model, tasks)

    config = TrainConfig(epochs=2, batch_size=16)
    train(linear_model(), recording, regression_tasks(32, 0), regression_tasks(16, 1), config)
    assert calls == [(True, True), (True, True), (False, False)] * 2


def test_each_step_sees_its_own_tasks():
    """Every epoch's batches hold each training task once (the last one smaller), in the
    order of the epoch's shuffle."""
    seen = []

    def recording(model, tasks):
        if model.training:
            seen.append((tasks["x"].clone(), tasks["y"].clone()))
        return squared_error(model, tasks)

    train_tasks = regression_tasks(40, 0)
    config = TrainConfig(epochs=2, batch_size=16, seed=3)
    train(linear_model(), recording, train_tasks, regression_tasks(8, 1), config)
    assert [len(x) for x, _ in seen] == [16, 16, 8] * 2
    order = torch.Generator().manual_seed(3)
    for epoch in range(2):
        expected = train_tasks.subset(torch.randperm(40, generator=order))
        x = torch.cat([x for x, _ in seen[3 * epoch : 3 * epoch + 3]])
        y = torch.cat([y for _, y in seen[3 * epoch : 3 * epoch + 3]])
        assert torch.equal(x, expected["x"]) and torch.equal(y, expected["y"])


def test_same_seed_gives_the_same_weights():
    config = TrainConfig(epochs=3, batch_size=16, seed=4)
    first, second = linear_model(), linear_model()
    train(first, squared_error, regression_tasks(64, 0), regression_tasks(8, 1), config)
    train(second, squared_error, regression_tasks(64, 0), regression_tasks(8, 1), config)
    for name, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[name])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"epochs": 0},
        {"batch_size": -1},
        {"lr": 0.0},
        {"factor": 1.5},
        {"schedule": "linear"},
        {"select": "accuracy"},
    ],
)
def test_bad_configuration_is_rejected(kwargs):
    with pytest.raises(ValueError):
        TrainConfig(**kwargs)


def test_monitor_is_recorded_without_changing_the_weights():
    config = TrainConfig(epochs=3, batch_size=16, seed=4)
    plain, monitored = linear_model(), linear_model()
    train(plain, squared_error, regression_tasks(64, 0), regression_tasks(8, 1), config)
    result = train(
        monitored,
        squared_error,
        regression_tasks(64, 0),
        regression_tasks(8, 1),
        config,
        monitor=lambda model: float(model.weight.abs().sum()),
    )
    assert all(record.validation_iterations is not None for record in result.history)
    for name, value in plain.state_dict().items():
        assert torch.equal(value, monitored.state_dict()[name])


def test_select_iterations_keeps_the_epoch_with_the_fewest_monitored_iterations():
    iterations = [5.0, 3.0, 4.0, 1.0, 2.0]
    config = TrainConfig(epochs=5, batch_size=32, lr=0.05, betas=(0.9, 0.999), select="iterations")
    states = []

    def run(resume=None, calls=0):
        counter = iter(iterations[calls:])
        return train(
            linear_model(),
            squared_error,
            regression_tasks(256, 0),
            regression_tasks(64, 1),
            config,
            checkpoint=lambda state: states.append(copy.deepcopy(state)),
            checkpoint_seconds=0.0,
            resume=resume,
            monitor=lambda model: next(counter),
        )

    result = run()
    losses = [record.validation_loss for record in result.history]
    assert min(losses) == losses[-1]  # the loss alone would keep the last epoch
    assert result.best_epoch == 4 and result.best_validation_loss == losses[3]
    resumed = run(resume=states[2], calls=3)  # the state after epoch 3 (best so far: 2)
    assert resumed.best_epoch == 4
    for name, value in resumed.best_state.items():
        torch.testing.assert_close(value, result.best_state[name])


def test_select_iterations_needs_a_monitor():
    config = TrainConfig(epochs=1, select="iterations")
    with pytest.raises(ValueError, match="monitor"):
        train(linear_model(), squared_error, regression_tasks(8, 0), regression_tasks(8, 1), config)


def test_cosine_schedule_decays_the_learning_rate_to_zero_per_step():
    # 64 tasks in batches of 32: two steps an epoch, eight in all.
    config = TrainConfig(epochs=4, batch_size=32, lr=1e-2, betas=(0.9, 0.999), schedule="cosine")
    result = train(
        linear_model(), squared_error, regression_tasks(64, 0), regression_tasks(8, 1), config
    )
    expected = [1e-2 * (1 + math.cos(math.pi * 2 * epoch / 8)) / 2 for epoch in (1, 2, 3, 4)]
    assert [r.lr for r in result.history] == pytest.approx(expected, abs=1e-12)
    assert result.history[-1].lr == pytest.approx(0.0, abs=1e-15)


def recording(weights):
    """``squared_error`` that records the weights it is called with, and whether training."""

    def objective(model, tasks):
        weights.append((model.training, model.weight.detach().clone()))
        return squared_error(model, tasks)

    return objective


def test_the_moving_average_of_the_weights_is_validated_and_kept():
    train_tasks, validation_tasks = regression_tasks(64, 0), regression_tasks(8, 1)
    settings = dict(epochs=3, batch_size=16, lr=0.05, betas=(0.9, 0.999), schedule="cosine",
                    validate_every=3)  # fmt: skip
    # Without the average: the weights of every step, and the last ones (validated).
    steps = []
    train(linear_model(), recording(steps), train_tasks, validation_tasks, TrainConfig(**settings))
    trajectory = [weight for training, weight in steps if training] + [steps[-1][1]]
    decay = 0.75
    expected = trajectory[0]
    for weight in trajectory[1:]:
        expected = decay * expected + (1 - decay) * weight
    assert len(trajectory) == 3 * 4 + 1
    model = linear_model()
    validated = []
    config = TrainConfig(**settings, ema=decay)
    result = train(model, recording(validated), train_tasks, validation_tasks, config)
    # Validation only every 3 epochs: the earlier epochs record NaN and are never kept.
    assert [math.isnan(r.validation_loss) for r in result.history] == [True, True, False]
    assert result.best_epoch == 3
    torch.testing.assert_close(result.best_state["weight"], expected)
    torch.testing.assert_close(model.weight.detach(), expected)
    assert not torch.allclose(expected, trajectory[-1])
    evaluated = [weight for training, weight in validated if not training]
    torch.testing.assert_close(evaluated[-1], expected)


def test_the_best_moving_average_is_kept_over_later_worse_ones():
    def loss_grows_with_time(model, tasks):
        calls.append(None)
        return model(tasks["x"]).squeeze(1) * 0 + len(calls)

    calls = []
    config = TrainConfig(epochs=6, batch_size=64, lr=1e-2, schedule="cosine", ema=0.9,
                         validate_every=2)  # fmt: skip
    result = train(linear_model(), loss_grows_with_time, regression_tasks(64, 0),
                   regression_tasks(8, 1), config)  # fmt: skip
    assert result.best_epoch == 2


def test_recipe_options_are_checked():
    with pytest.raises(ValueError, match="ema must lie in"):
        TrainConfig(ema=1.0)
    with pytest.raises(ValueError, match="validation every epoch"):
        TrainConfig(validate_every=5)
    with pytest.raises(ValueError, match="validate_every must be a positive integer"):
        TrainConfig(schedule="cosine", validate_every=0)
