import pytest
import torch

from femeta.metasolvers import MLP, EigenbasisGuess, ZeroGuess
from femeta.problems.poisson1d import Poisson1D


def test_zero_guess_is_zero():
    features = torch.randn(5, 16, dtype=torch.float64)
    assert torch.equal(ZeroGuess(16)(features), torch.zeros(5, 16, dtype=torch.float64))


def test_mlp_shape_and_layers():
    network = MLP(16, (15, 15), 16, "silu")
    assert network(torch.randn(3, 16, dtype=torch.float64)).shape == (3, 16)
    linear = [m for m in network.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linear] == [(16, 15), (15, 15), (15, 16)]
    assert sum(isinstance(m, torch.nn.SiLU) for m in network.modules()) == 2


def test_eigenbasis_guess_is_a_combination_of_eigenvectors():
    problem = Poisson1D(16)
    guess = EigenbasisGuess(problem.eigenvectors)
    f = torch.randn(4, 16, dtype=torch.float64)
    coefficients = guess.network(f)
    torch.testing.assert_close(guess(f), coefficients @ problem.eigenvectors.T)
    guess(f).sum().backward()
    assert all(p.grad is not None for p in guess.parameters())


def test_unknown_activation_is_rejected():
    with pytest.raises(ValueError, match="unknown activation"):
        MLP(2, (3,), 1, "gelu2")
