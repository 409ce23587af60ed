"""The MLP, budget-matched hidden widths and matched initialisation.

Every network in a study is cut from one full-width network drawn once per seed. A smaller
network takes the leading slice of each weight matrix and bias; every tensor whose fan-in
shrank is multiplied by ``sqrt(fan_in_full / fan_in_small)``. ``nn.Linear``'s default init draws
weights and biases from ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``, so the slice then has exactly the
default-init distribution of the small network while it shares the full network's random draws.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

INPUT_SIZE = 784
NUM_CLASSES = 10
DEFAULT_HIDDEN = (256,)


class MLP(nn.Module):
    """A ReLU multilayer perceptron from 784 inputs to 10 logits."""

    def __init__(self, hidden: Sequence[int] = DEFAULT_HIDDEN) -> None:
        super().__init__()
        sizes = [INPUT_SIZE, *hidden, NUM_CLASSES]
        self.hidden = tuple(int(h) for h in hidden)
        self.layers = nn.ModuleList(
            nn.Linear(fan_in, fan_out) for fan_in, fan_out in zip(sizes, sizes[1:], strict=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:
            x = torch.relu(layer(x))
        return self.layers[-1](x)


def count_params(hidden: Sequence[int]) -> int:
    """Return the parameter count of ``MLP(hidden)``: weights plus biases of every layer."""
    sizes = [INPUT_SIZE, *hidden, NUM_CLASSES]
    return sum(
        fan_in * fan_out + fan_out for fan_in, fan_out in zip(sizes, sizes[1:], strict=False)
    )


def solve_hidden(full_hidden: Sequence[int], fraction: float) -> tuple[int, ...]:
    """Scale every hidden width by one factor so the network has about ``fraction`` of the params.

    The count is monotone in the common scale, so a bisection over the scale finds the widths
    whose count is nearest to ``fraction * count_params(full_hidden)``. For 784-h-10,
    ``params(h) = 795 h + 10``: h = 256 gives 203,530, the half network h = 128 and the third
    network h = 85.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"invalid network fraction {fraction}: must be in (0, 1]")
    full = tuple(int(h) for h in full_hidden)
    if fraction == 1:
        return full
    target = fraction * count_params(full)

    def widths(scale: float) -> tuple[int, ...]:
        return tuple(max(1, round(h * scale)) for h in full)

    low, high = 0.0, 1.0
    for _ in range(60):
        mid = (low + high) / 2
        if count_params(widths(mid)) < target:
            low = mid
        else:
            high = mid
    candidates = {widths(low), widths(high)}
    if len(full) == 1:
        # One hidden layer: the count is linear in h, so the two neighbours of the exact width
        # contain the nearest one.
        exact = (target - NUM_CLASSES) / (INPUT_SIZE + NUM_CLASSES + 1)
        candidates |= {(max(1, math.floor(exact)),), (max(1, math.ceil(exact)),)}
    return min(candidates, key=lambda w: (abs(count_params(w) - target), w))


def init_full(hidden: Sequence[int], seed: int) -> MLP:
    """Draw the full-width network for ``seed`` with ``nn.Linear``'s default initialisation."""
    # fork_rng restores the global generator afterwards, so drawing a model has no side effect.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MLP(hidden)


def matched_model(full_hidden: Sequence[int], hidden: Sequence[int], seed: int) -> MLP:
    """Build ``MLP(hidden)`` initialised as the rescaled leading slice of the full network.

    The same seed gives bit-identical weights for equal architectures, and the same batch of
    random draws for every width.
    """
    full = init_full(full_hidden, seed)
    if tuple(hidden) == tuple(full_hidden):
        return full
    if len(hidden) != len(full_hidden) or any(
        h > f for h, f in zip(hidden, full_hidden, strict=True)
    ):
        raise ValueError(
            f"invalid hidden widths {list(hidden)}: must have as many layers as "
            f"{list(full_hidden)} and be no wider"
        )
    with torch.random.fork_rng(devices=[]):
        small = MLP(hidden)  # its own draws are overwritten below
    with torch.no_grad():
        for big_layer, small_layer in zip(full.layers, small.layers, strict=True):
            fan_out, fan_in = small_layer.weight.shape
            scale = math.sqrt(big_layer.in_features / fan_in)
            small_layer.weight.copy_(big_layer.weight[:fan_out, :fan_in] * scale)
            small_layer.bias.copy_(big_layer.bias[:fan_out] * scale)
    return small
