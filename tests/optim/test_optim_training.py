"""End-to-end check that each trace rule trains a small convolutional network."""

import pytest
import torch
import torch.nn.functional as F

from stepcli.optim import LearnedStepSize, backward_and_step

DTYPE = torch.float64


def _separable_images(examples_per_class=16, seed=0):
    """Build 8x8 single-channel images of three classes, each a fixed pattern plus noise."""
    generator = torch.Generator().manual_seed(seed)
    patterns = torch.zeros(3, 8, 8, dtype=DTYPE)
    patterns[0, :, :4] = 1.0  # left half bright
    patterns[1, :4, :] = 1.0  # top half bright
    patterns[2, 2:6, 2:6] = 1.0  # centre square bright
    labels = torch.arange(3).repeat_interleave(examples_per_class)
    noise = 0.3 * torch.randn(labels.numel(), 8, 8, generator=generator, dtype=DTYPE)
    images = (patterns[labels] + noise).unsqueeze(1)
    return images, labels


def _small_cnn(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, kernel_size=3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 4 * 4, 3),
    ).to(DTYPE)


@pytest.mark.parametrize(
    "options",
    [
        {"trace": "gradient"},
        {"trace": "decay", "curvature_every": 5},
        {"trace": "hvp", "curvature": "hessian"},
        {"trace": "hvp", "curvature": "ggn"},
    ],
    ids=["gradient", "decay", "hvp-hessian", "hvp-ggn"],
)
def test_cnn_loss_decreases(options):
    images, labels = _separable_images()
    model = _small_cnn()
    params = list(model.parameters())
    optimizer = LearnedStepSize(params, alpha0=0.05, meta_lr=0.05, **options)
    generator = torch.Generator().manual_seed(1)

    losses = []
    for _ in range(60):
        logits = model(images)
        loss = F.cross_entropy(logits, labels)
        losses.append(loss.item())
        backward_and_step(optimizer, params, loss, logits, generator)

    with torch.no_grad():
        final_loss = F.cross_entropy(model(images), labels).item()
    assert final_loss < 0.3 * losses[0], f"loss went from {losses[0]:.3f} to {final_loss:.3f}"
    # The meta-step must have moved some step sizes away from alpha0.
    step_sizes = torch.cat([alpha.flatten() for alpha in optimizer.step_sizes()])
    assert not torch.allclose(step_sizes, torch.full_like(step_sizes, 0.05))
