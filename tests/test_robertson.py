"""The Robertson task space: backward Euler trajectory, tasks, and its checks."""

import math

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

from femeta.problems.robertson import Robertson, backward_euler_system, solve_step

SMALL = {"train": 3, "validation": 2, "test": 4}


def robertson_rhs(c):
    def f(_, y):
        return [
            -c[0] * y[0] + c[2] * y[1] * y[2],
            c[0] * y[0] - c[1] * y[1] ** 2 - c[2] * y[1] * y[2],
            c[1] * y[1] ** 2,
        ]

    return f


def test_tasks_are_consecutive_backward_euler_steps():
    problem = Robertson(split_sizes=SMALL)
    tasks = problem.split("train", 0)
    assert len(tasks) == 3 * 100
    assert tasks["features"].shape == (300, 7) and bool((tasks["features"] > 0).all())
    # Each task starts where the previous one (of the same set) ended.
    assert torch.equal(tasks["y_prev"][1:100], tasks["solution"][:99])
    assert torch.equal(tasks["y_prev"][0], torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
    assert math.isclose(tasks["h"][0].item(), 1e-6) and math.isclose(
        tasks["h"].sum().item() / 3, 1e3
    )
    g, _ = backward_euler_system(tasks["c"], tasks["h"], tasks["y_prev"], tasks["solution"])
    assert float(torch.linalg.vector_norm(g, dim=1).max()) <= 1e-13
    # Backward Euler keeps y1 + y2 + y3 = 1, and the concentrations stay non-negative.
    assert float((tasks["solution"].sum(dim=1) - 1).abs().max()) < 1e-13
    assert bool((tasks["solution"] >= 0).all())


def test_splits_are_reproducible_and_disjoint():
    problem = Robertson(split_sizes=SMALL)
    assert torch.equal(problem.split("test", 3)["c"], problem.split("test", 3)["c"])
    assert not torch.equal(
        problem.split("train", 3)["c"][:100], problem.split("test", 3)["c"][:100]
    )
    rates = problem.draw(1000, 0)
    for column, (lo, hi) in enumerate(((1e-4, 1.0), (1e5, 1e9), (1e2, 1e6))):
        assert lo <= float(rates[:, column].min()) and float(rates[:, column].max()) <= hi


def test_jacobian_matches_autograd():
    tasks = Robertson(split_sizes=SMALL).split("validation", 1).subset(slice(0, 200, 7))
    y = tasks["solution"] * 1.1 + 1e-6
    _, jacobian = backward_euler_system(tasks["c"], tasks["h"], tasks["y_prev"], y)
    for i in range(len(tasks)):
        row = tasks.subset(slice(i, i + 1))
        exact = torch.autograd.functional.jacobian(
            lambda v, row=row: backward_euler_system(row["c"], row["h"], row["y_prev"], v)[0],
            y[i : i + 1],
        )[0, :, 0, :]
        torch.testing.assert_close(jacobian[i], exact)


def test_trajectory_converges_to_radau_at_first_order():
    """Backward Euler is first order: 4x the steps on the same span cuts the error about 4x."""
    rates = torch.tensor([[0.04, 3e7, 1e4]], dtype=torch.float64)
    coarse = Robertson(steps=100).trajectory(rates)[0]
    fine = Robertson(steps=397).trajectory(rates)[0][1::4]  # at the coarse points
    times = np.logspace(-6, 3, 100)
    reference = solve_ivp(robertson_rhs(rates[0].numpy()), (0, 1e3), [1, 0, 0], method="Radau",
                          t_eval=times, rtol=1e-11, atol=1e-16).y.T  # fmt: skip
    # Absolute error on y1 and y3, which are O(1); y2 is ~1e-5.
    error_coarse = np.abs(coarse[1:, [0, 2]].numpy() - reference[:, [0, 2]]).max()
    error_fine = np.abs(fine[:, [0, 2]].numpy() - reference[:, [0, 2]]).max()
    assert error_coarse < 0.05
    assert 3.0 < error_coarse / error_fine < 5.0


@pytest.mark.parametrize(
    "rates, message",
    [
        (torch.tensor([[0.04, -3e7, 1e4]]), "positive and finite"),
        (torch.tensor([[0.04, float("nan"), 1e4]]), "positive and finite"),
        (torch.tensor([0.04, 3e7, 1e4]), "shape"),
    ],
)
def test_bad_rates_are_rejected(rates, message):
    with pytest.raises(ValueError, match=message):
        Robertson().trajectory(rates)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"steps": 0}, "steps"),
        ({"t_span": (1.0, 1e-3)}, "t_span"),
        ({"t_span": (0.0, 1.0)}, "t_span"),
    ],
)
def test_bad_task_space_is_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Robertson(**kwargs)


def test_newton_solves_a_long_step_where_a_descent_test_stalls():
    # The first full Newton step raises ||g|| from 0.02 to 6; the next three converge.
    rates = torch.tensor([[0.43693, 6.3310e5, 9.6856e5]], dtype=torch.float64)
    h = torch.tensor([352.45], dtype=torch.float64)
    start = torch.tensor([[0.94621, 7.9358e-6, 5.3783e-2]], dtype=torch.float64)
    y = solve_step(rates, h, start)
    assert float(torch.linalg.vector_norm(backward_euler_system(rates, h, start, y)[0])) <= 1e-13
    assert bool((y > 0).all()) and abs(float(y.sum() - start.sum())) < 1e-12


@pytest.mark.parametrize("h", [0.0, -1e-3, float("nan")])
def test_bad_step_sizes_are_rejected(h):
    rates = torch.tensor([[0.04, 3e7, 1e4]], dtype=torch.float64)
    start = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)
    with pytest.raises(ValueError, match="step sizes h_n must be positive"):
        solve_step(rates, torch.tensor([h], dtype=torch.float64), start)


def test_newton_reports_steps_it_cannot_solve():
    rates = torch.tensor([[0.04, 3e7, 1e4]], dtype=torch.float64)
    with pytest.raises(RuntimeError, match="did not reach"):
        h = torch.tensor([1e3], dtype=torch.float64)
        start = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)
        solve_step(rates, h, start, max_iterations=1)
