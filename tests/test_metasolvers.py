import math

import pytest
import torch

from femeta.metasolvers import MLP, EigenbasisGuess, NewtonSorNet, PreviousStep, ZeroGuess
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


def test_newton_sor_heads_predict_what_they_name():
    features = torch.tensor(
        [[0.04, 3e7, 1e4, 1e-3, 0.9, 1e-6, 0.1], [1e-3, 1e6, 1e3, 1.0, 0.5, 0.0, 0.5]],
        dtype=torch.float64,
    )
    torch.manual_seed(0)
    base_y, base_r = PreviousStep(1.25)(features)
    assert torch.equal(base_y, features[:, 4:]) and torch.equal(base_r, torch.full((2,), 1.25))
    for head in NewtonSorNet.heads:
        assert torch.equal(NewtonSorNet(head, 1.25, hidden=(16, 16))(features)[0], base_y)
        network = NewtonSorNet(head, 1.25, hidden=(16, 16), guess_init="default")
        network.fit_inputs(features)
        y0, r = network(features)
        assert y0.dtype == r.dtype == torch.float64 and y0.shape == (2, 3) and r.shape == (2,)
        if head == "relax":
            assert torch.equal(y0, features[:, 4:])
        else:  # a change of log y_n by tanh(.): within a factor e, and zero stays zero
            ratio = y0[features[:, 4:] > 0] / features[:, 4:][features[:, 4:] > 0]
            assert bool((ratio > math.exp(-1)).all() and (ratio < math.e).all())
            assert not torch.equal(y0, features[:, 4:]) and y0[1, 1] == 0
        if head == "ini":
            assert torch.equal(r, torch.full((2,), 1.25, dtype=torch.float64))
        else:
            assert network.network.layers[-1].bias[-1].item() == -1.0
            assert bool((r > 1).all() and (r < 2).all())
    with pytest.raises(ValueError, match="unknown head"):
        NewtonSorNet("guess", 1.2)
    with pytest.raises(ValueError, match="unknown guess_init"):
        NewtonSorNet("both", 1.2, guess_init="ones")
    with pytest.raises(ValueError, match=r"\(0, 2\]"):
        PreviousStep(2.5)
