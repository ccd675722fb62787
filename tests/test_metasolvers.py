import math

import pytest
import torch

from femeta.metasolvers import (
    MLP,
    EigenbasisGuess,
    NewtonSorNet,
    PreviousStep,
    ScaledMLP,
    ZeroGuess,
    fold_scaling,
    pca_whitening,
    zero_output_layer,
)
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


def random_mlp(seed, hidden=(5, 4)):
    torch.manual_seed(seed)
    network = MLP(6, hidden, 3)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.normal_()
    return network


def test_folding_the_scaling_gives_the_same_function():
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(20, 6, generator=generator, dtype=torch.float64)
    input_map = torch.randn(6, 6, generator=generator, dtype=torch.float64)
    output_scale = torch.rand(3, generator=generator, dtype=torch.float64) * 100
    scaled = ScaledMLP(random_mlp(0), input_map, output_scale)
    folded = scaled.fold()
    assert type(folded) is MLP
    torch.testing.assert_close(folded(features), scaled(features), rtol=1e-12, atol=1e-10)
    # ... and the function is not the unscaled network's (the test can fail).
    assert not torch.allclose(scaled.network(features), scaled(features))
    # Folding copies: training the scaled network on does not change the fold.
    before = folded(features)
    with torch.no_grad():
        scaled.network.layers[0].weight.add_(1.0)
    torch.testing.assert_close(folded(features), before)


def test_folding_an_activation_shift_gives_the_same_function():
    generator = torch.Generator().manual_seed(2)
    features = torch.randn(20, 6, generator=generator, dtype=torch.float64)
    scaled = ScaledMLP(random_mlp(0), output_scale=torch.linspace(0.5, 2, 3, dtype=torch.float64),
                       activation_shift=20.0)  # fmt: skip
    folded = scaled.fold()
    torch.testing.assert_close(folded(features), scaled(features), rtol=1e-10, atol=1e-10)
    # Shifted SiLU is nearly linear: the network is nearly affine, unlike the unshifted one.
    small = features / 10

    def curvature(network):
        odd = (network(small) - network(-small)).abs().max()
        return (network(small) + network(-small) - 2 * network(0 * small)).abs().max() / odd

    assert curvature(scaled) < 1e-3 < 1e-1 < curvature(scaled.network)
    with pytest.raises(ValueError, match="activation_shift must be finite"):
        ScaledMLP(random_mlp(0), activation_shift=math.inf)


def test_fold_scaling_leaves_a_plain_metasolver_that_loads_its_saved_weights():
    basis = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))[0]
    guess = EigenbasisGuess(basis, hidden=(5, 4))
    guess.network = ScaledMLP(
        guess.network, pca_whitening(torch.randn(50, 6, dtype=torch.float64)),
        torch.linspace(0.1, 10, 6, dtype=torch.float64),
    )  # fmt: skip
    features = torch.randn(7, 6, dtype=torch.float64)
    expected = guess(features)
    folded = fold_scaling(guess)
    assert folded is guess and not any(isinstance(m, ScaledMLP) for m in guess.modules())
    plain = EigenbasisGuess(basis, hidden=(5, 4))
    plain.load_state_dict(folded.state_dict())
    torch.testing.assert_close(plain(features), expected, rtol=1e-12, atol=1e-10)


def test_pca_whitening_gives_the_identity_second_moment():
    generator = torch.Generator().manual_seed(0)
    scales = torch.logspace(-2, 1, 5, dtype=torch.float64)
    features = torch.randn(400, 5, generator=generator, dtype=torch.float64) * scales
    whitening = pca_whitening(features)
    white = features @ whitening.T
    torch.testing.assert_close(white.T @ white / 400, torch.eye(5, dtype=torch.float64))
    # A direction the data do not span stays bounded (floored eigenvalue).
    flat = torch.cat([features[:, :4], torch.zeros(400, 1, dtype=torch.float64)], dim=1)
    assert torch.isfinite(pca_whitening(flat)).all()
    with pytest.raises(ValueError, match="features must have shape"):
        pca_whitening(torch.ones(3))


def test_scaled_mlp_checks_shapes_and_zero_output_layer_starts_at_zero():
    network = zero_output_layer(random_mlp(0))
    assert torch.equal(network(torch.ones(2, 6, dtype=torch.float64)), torch.zeros(2, 3,
                       dtype=torch.float64))  # fmt: skip
    with pytest.raises(ValueError, match="input_map must have shape"):
        ScaledMLP(network, torch.eye(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="output_scale must have shape"):
        ScaledMLP(network, None, torch.ones(4, dtype=torch.float64))
