"""Robertson's stiff chemical kinetics, one backward Euler step per task (§4.1, Appendix C.2).

``y' = f(y)`` with ``f1 = -c1 y1 + c3 y2 y3``, ``f2 = c1 y1 - c2 y2^2 - c3 y2 y3``,
``f3 = c2 y2^2`` and ``y(0) = (1, 0, 0)`` (equations (12)-(13)). Backward Euler
solves ``g_n(y) = y - h_n f(y) - y_n = 0`` at every step (equation (14)).

A parameter set ``(c1, c2, c3)`` is drawn log-uniformly from ``[1e-4, 1]``,
``[1e5, 1e9]`` and ``[1e2, 1e6]``. Its 100 evaluation points are log-uniform
in ``[1e-6, 1e3]`` and the steps start at ``t = 0``, so ``h_0 = 1e-6``. Each step
is one task ``tau = (c1, c2, c3, h_n, y_n)``. ``y_n`` comes from the backward
Euler trajectory itself, each step solved by damped Newton to
``||g_n|| <= 1e-13``. ``tests/test_robertson.py`` checks the trajectory against
scipy's Radau: the error shrinks with the step, as a first-order method's should.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from femeta.problems.base import TaskSet, split_size_and_seed

__all__ = ["Robertson", "backward_euler_system"]

#: Parameter sets per split (Appendix C.2); each gives ``steps`` tasks.
SPLIT_SIZES = {"train": 2500, "validation": 2500, "test": 5000}
RATE_RANGES = ((1e-4, 1.0), (1e5, 1e9), (1e2, 1e6))
#: ``log10`` of the state is floored here: ``y2`` and ``y3`` start at exactly 0.
STATE_FLOOR = 1e-30


def backward_euler_system(c: Tensor, h: Tensor, y_prev: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """``g_n(y) = y - h f(y) - y_n`` and its Jacobian ``I - h df/dy``, batched.

    Args:
        c: Rate constants ``(B, 3)``.
        h: Step sizes ``(B,)``.
        y_prev: The previous state ``y_n``, ``(B, 3)``.
        y: Where to evaluate, ``(B, 3)``.

    Returns:
        ``g`` of shape ``(B, 3)`` and ``J`` of shape ``(B, 3, 3)``.
    """
    hc1, hc2, hc3 = (h[:, None] * c).unbind(-1)
    y1, y2, y3 = y.unbind(-1)
    # h f(y), component by component; written out because Newton-SOR calls this every iteration.
    a = hc1 * y1
    b = hc3 * y2 * y3
    q = hc2 * y2 * y2
    g = y - torch.stack((b - a, a - q - b, q), dim=-1) - y_prev
    zero = torch.zeros_like(y1)
    one = torch.ones_like(y1)
    two_hc2_y2 = 2 * hc2 * y2
    jacobian = torch.stack(
        (
            1 + hc1, -hc3 * y3, -hc3 * y2,
            -hc1, 1 + two_hc2_y2 + hc3 * y3, hc3 * y2,
            zero, -two_hc2_y2, one,
        ),
        dim=-1,
    )  # fmt: skip
    return g, jacobian.view(*y1.shape, 3, 3)


class Robertson:
    """The task space of backward Euler steps of the Robertson equation.

    Args:
        steps: Evaluation points per parameter set (the paper: 100).
        t_span: The first and last evaluation point (log-uniform in between).
        split_sizes: Parameter sets per split; the paper's 2500 / 2500 / 5000
            when omitted.
    """

    name = "robertson"
    feature_names = ("c1", "c2", "c3", "h", "y1", "y2", "y3")

    def __init__(
        self,
        steps: int = 100,
        t_span: tuple[float, float] = (1e-6, 1e3),
        split_sizes: dict[str, int] | None = None,
    ):
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        start, stop = (float(t) for t in t_span)
        if not (0 < start < stop < math.inf):
            raise ValueError(f"t_span must satisfy 0 < start < stop < inf, got {t_span!r}")
        self.steps = steps
        self.t_span = (start, stop)
        self.split_sizes = dict(SPLIT_SIZES if split_sizes is None else split_sizes)
        times = torch.logspace(math.log10(start), math.log10(stop), steps, dtype=torch.float64)
        #: The step sizes ``h_n``, shared by every parameter set.
        self.step_sizes = torch.diff(times, prepend=times.new_zeros(1))

    def draw(self, count: int, seed: int) -> Tensor:
        """``count`` rate-constant triples ``(c1, c2, c3)``, log-uniform, ``(count, 3)``."""
        rng = np.random.default_rng(seed)
        logs = [rng.uniform(math.log(lo), math.log(hi), count) for lo, hi in RATE_RANGES]
        return torch.from_numpy(np.exp(np.stack(logs, axis=1)))

    def trajectory(self, rates: Tensor) -> Tensor:
        """The backward Euler states ``y_0 ... y_steps`` per set, ``(S, steps + 1, 3)``."""
        rates = check_rates(rates)
        state = torch.zeros(rates.shape[0], 3, dtype=torch.float64)
        state[:, 0] = 1.0
        states = [state]
        for h in self.step_sizes.tolist():
            state = solve_step(rates, torch.full_like(state[:, 0], h), state)
            states.append(state)
        return torch.stack(states, dim=1)

    def tasks_from_rates(self, rates: Tensor) -> TaskSet:
        """The ``S * steps`` tasks of the given parameter sets, in set-major order.

        Fields: ``c`` ``(T, 3)``, ``h`` ``(T,)``, ``y_prev`` (``y_n``) and
        ``solution`` (``y_{n+1}``, for checks only) ``(T, 3)``, ``features``
        ``(T, 7)`` (all positive; the meta-solvers take their logs).
        """
        states = self.trajectory(rates)
        sets = states.shape[0]
        c = rates.to(torch.float64).repeat_interleave(self.steps, dim=0)
        h = self.step_sizes.repeat(sets)
        y_prev = states[:, :-1].reshape(-1, 3)
        solution = states[:, 1:].reshape(-1, 3)
        features = torch.cat((c, h[:, None], y_prev.clamp_min(STATE_FLOOR)), dim=1)
        return TaskSet(
            {"c": c, "h": h, "y_prev": y_prev, "solution": solution, "features": features}
        )

    def sample(self, count: int, seed: int) -> TaskSet:
        """The tasks of ``count`` parameter sets drawn with ``seed``."""
        return self.tasks_from_rates(self.draw(count, seed))

    def split(self, name: str, seed: int) -> TaskSet:
        """The ``train``, ``validation`` or ``test`` tasks of the dataset ``seed``."""
        count, child = split_size_and_seed(name, seed, self.split_sizes)
        return self.sample(count, child)


def check_rates(rates: Tensor) -> Tensor:
    """Rate constants as a float64 ``(S, 3)`` tensor, positive and finite, or a ``ValueError``."""
    rates = torch.as_tensor(rates, dtype=torch.float64)
    if rates.dim() != 2 or rates.shape[1] != 3:
        raise ValueError(f"rate constants must have shape (S, 3), got {tuple(rates.shape)}")
    if not bool(torch.isfinite(rates).all()) or not bool((rates > 0).all()):
        raise ValueError("rate constants c1, c2, c3 must be positive and finite (no NaN)")
    return rates


def solve_step(
    rates: Tensor, h: Tensor, y_prev: Tensor, tol: float = 1e-13, max_iterations: int = 200
) -> Tensor:
    """Solve ``g_n(y) = 0`` by damped Newton from ``y_n``, batched, to ``||g|| <= tol``.

    The step is halved while it would make a concentration negative (the
    physical root has none); otherwise full Newton steps are taken, since a
    descent test on ``||g||`` stalls on some long stiff steps where Newton
    converges. A ``RuntimeError`` names the tasks that do not converge.
    """
    if not bool((torch.isfinite(h) & (h > 0)).all()):
        raise ValueError("step sizes h_n must be positive and finite (no NaN)")
    if not bool((torch.isfinite(y_prev) & (y_prev >= 0)).all()):
        raise ValueError("the previous state y_n must be finite and non-negative (no NaN)")
    y = y_prev.clone()
    for _ in range(max_iterations):
        g, jacobian = backward_euler_system(rates, h, y_prev, y)
        norm = torch.linalg.vector_norm(g, dim=-1)
        running = norm > tol
        if not bool(running.any()):
            return y
        delta = torch.linalg.solve(jacobian, g[..., None])[..., 0]
        step = torch.ones_like(norm)
        for _ in range(60):
            trial = y - step[:, None] * delta
            negative = (trial < 0).any(dim=-1) & running
            if not bool(negative.any()):
                break
            step = torch.where(negative, step / 2, step)
        y = torch.where(running[:, None], trial, y)
    failed = torch.nonzero(norm > tol)[:, 0].tolist()
    raise RuntimeError(f"backward Euler: Newton did not reach {tol:g} on tasks {failed[:10]}")
