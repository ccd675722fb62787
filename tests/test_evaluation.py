import numpy as np
import torch

from femeta.evaluation import IterationStats
from femeta.solvers import SolverResult


def test_unconverged_tasks_count_as_the_cap():
    result = SolverResult(
        x=torch.zeros(4, 2),
        iterations=torch.tensor([3, 5, 10, 10]),
        history=torch.zeros(4, 11),
        converged=torch.tensor([True, True, False, True]),
    )
    stats = IterationStats.from_result(result, tol=1e-6, max_iterations=10)
    assert stats.iterations.tolist() == [3, 5, 10, 10]
    assert stats.mean_iterations == 7.0
    assert stats.convergence_ratio == 0.75
    assert np.isclose(stats.std_iterations, np.std([3, 5, 10, 10]))
    counts, edges = stats.histogram(bins=7)
    assert counts.sum() == 4 and edges[0] == 3 and edges[-1] == 10
    summary = stats.summary()
    assert {"mean_iterations", "std_iterations", "convergence_ratio", "n_tasks"} <= set(summary)
    assert summary["n_tasks"] == 4
