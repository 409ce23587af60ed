import math

import pytest
import torch

from stepcli.model import MLP, count_params, init_full, matched_model, solve_hidden


def test_count_params_formula():
    assert count_params((256,)) == 795 * 256 + 10 == 203_530
    assert count_params((128,)) == 101_770
    assert count_params((85,)) == 67_585
    assert count_params((256,)) == sum(p.numel() for p in MLP((256,)).parameters())
    assert count_params((64, 32)) == sum(p.numel() for p in MLP((64, 32)).parameters())


def test_solve_hidden_default_network():
    assert solve_hidden((256,), 1.0) == (256,)
    assert solve_hidden((256,), 0.5) == (128,)
    assert solve_hidden((256,), 1 / 3) == (85,)


@pytest.mark.parametrize("hidden", [(256,), (100,), (512, 256), (300, 100, 50)])
@pytest.mark.parametrize("fraction", [0.5, 1 / 3, 0.25])
def test_solve_hidden_nearest_count(hidden, fraction):
    target = fraction * count_params(hidden)
    widths = solve_hidden(hidden, fraction)
    assert len(widths) == len(hidden)
    error = abs(count_params(widths) - target)
    # No single-width change along the common scale gets closer than the solution by much:
    # the error is below the cost of one unit of every hidden layer.
    assert error <= sum(
        count_params(tuple(w + (i == j) for j, w in enumerate(widths))) - count_params(widths)
        for i in range(len(widths))
    )


def test_solve_hidden_rejects_bad_fraction():
    with pytest.raises(ValueError, match="fraction"):
        solve_hidden((256,), 0)
    with pytest.raises(ValueError, match="fraction"):
        solve_hidden((256,), 1.5)


def test_matched_init_bit_identical():
    first = matched_model((256,), (256,), seed=3)
    second = matched_model((256,), (256,), seed=3)
    other = matched_model((256,), (256,), seed=4)
    for a, b in zip(first.parameters(), second.parameters(), strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(first.layers[0].weight, other.layers[0].weight)


def test_matched_init_leaves_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    matched_model((256,), (85,), seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_slice_shares_draws_and_rescales():
    full = init_full((256,), seed=0)
    small = matched_model((256,), (85,), seed=0)
    # The first layer's fan-in (784) did not shrink: a plain slice.
    assert torch.equal(small.layers[0].weight, full.layers[0].weight[:85])
    assert torch.equal(small.layers[0].bias, full.layers[0].bias[:85])
    # The second layer's fan-in shrank from 256 to 85: slice times sqrt(256 / 85).
    scale = math.sqrt(256 / 85)
    torch.testing.assert_close(small.layers[1].weight, full.layers[1].weight[:, :85] * scale)
    torch.testing.assert_close(small.layers[1].bias, full.layers[1].bias * scale)


def test_slice_matches_default_init_distribution():
    # Default nn.Linear init is U(-1/sqrt(fan_in), 1/sqrt(fan_in)): std = 1/sqrt(3 fan_in).
    weights = torch.cat(
        [matched_model((256,), (64,), seed=s).layers[1].weight.flatten() for s in range(40)]
    )
    bound = 1 / math.sqrt(64)
    assert weights.abs().max() <= bound + 1e-7
    assert weights.abs().max() > 0.95 * bound
    assert weights.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    fresh = torch.cat([MLP((64,)).layers[1].weight.flatten() for _ in range(40)])
    assert weights.std().item() == pytest.approx(fresh.std().item(), rel=0.05)


def test_matched_model_rejects_wider():
    with pytest.raises(ValueError, match="no wider"):
        matched_model((64,), (128,), seed=0)
