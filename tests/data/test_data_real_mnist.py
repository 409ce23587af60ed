"""Tests that load the real MNIST files."""

from __future__ import annotations

import pytest
import torch
import torchvision

from stepcli.data import MNIST_MEAN, MNIST_STD


def test_real_counts_and_types(real_mnist):
    assert real_mnist.train_images.shape == (60_000, 784)
    assert real_mnist.train_labels.shape == (60_000,)
    assert real_mnist.test_images.shape == (10_000, 784)
    assert real_mnist.test_labels.shape == (10_000,)
    assert real_mnist.train_images.dtype == torch.float32
    assert real_mnist.test_images.dtype == torch.float32
    assert real_mnist.train_labels.dtype == torch.int64
    assert real_mnist.test_labels.dtype == torch.int64
    assert real_mnist.train_images.device.type == "cpu"


def test_real_first_labels(real_mnist):
    assert real_mnist.train_labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert real_mnist.test_labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]


def test_real_normalisation(real_mnist):
    images = real_mnist.train_images
    assert abs(images.mean().item()) < 0.005
    assert abs(images.std().item() - 1.0) < 0.005
    assert images.min().item() == pytest.approx(-MNIST_MEAN / MNIST_STD, abs=1e-6)
    assert images.max().item() == pytest.approx((1 - MNIST_MEAN) / MNIST_STD, abs=1e-6)


def test_real_pixels_match_torchvision(real_root, real_mnist):
    reference = torchvision.datasets.MNIST(real_root, train=False, download=False)

    pixels = (real_mnist.test_images * MNIST_STD + MNIST_MEAN) * 255

    assert torch.equal(pixels.round().to(torch.uint8), reference.data.reshape(-1, 784))
    assert torch.equal(real_mnist.test_labels, reference.targets)
