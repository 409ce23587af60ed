"""Tests for the seeded subset, validation split and batch order helpers."""

from __future__ import annotations

import pytest
import torch

from stepcli.data import balanced_subset, epoch_batches, split_validation


def class_counts(labels: torch.Tensor, indices: torch.Tensor) -> list[int]:
    return torch.bincount(labels[indices], minlength=10).tolist()


def test_subset_same_seed_same_indices(real_mnist):
    first = balanced_subset(real_mnist.train_labels, 1000, seed=7)
    second = balanced_subset(real_mnist.train_labels, 1000, seed=7)

    assert torch.equal(first, second)


def test_subset_different_seed_differs(real_mnist):
    first = balanced_subset(real_mnist.train_labels, 1000, seed=7)
    second = balanced_subset(real_mnist.train_labels, 1000, seed=8)

    assert not torch.equal(first, second)


def test_subset_is_balanced_sorted_unique(real_mnist):
    labels = real_mnist.train_labels

    indices = balanced_subset(labels, 1000, seed=0)

    assert indices.dtype == torch.int64
    assert indices.device == labels.device
    assert class_counts(labels, indices) == [100] * 10
    assert torch.equal(indices, torch.sort(indices).values)
    assert len(torch.unique(indices)) == 1000


def test_subset_remainder_one_per_class(real_mnist):
    labels = real_mnist.train_labels

    counts = class_counts(labels, balanced_subset(labels, 1005, seed=3))

    assert sorted(counts) == [100] * 5 + [101] * 5
    assert sum(counts) == 1005


def test_subset_remainder_classes_vary_with_seed(real_mnist):
    labels = real_mnist.train_labels
    extra_class_sets = set()
    for seed in range(8):
        counts = class_counts(labels, balanced_subset(labels, 1003, seed=seed))
        extra_class_sets.add(tuple(label for label, count in enumerate(counts) if count == 101))

    assert all(len(classes) == 3 for classes in extra_class_sets)
    assert len(extra_class_sets) > 1


def test_subset_accepts_any_int_seed(real_mnist):
    labels = real_mnist.train_labels

    negative = balanced_subset(labels, 100, seed=-5)
    wrapped = balanced_subset(labels, 100, seed=2**64 - 5)
    large = balanced_subset(labels, 100, seed=2**70)

    assert torch.equal(negative, wrapped)
    assert class_counts(labels, large) == [10] * 10


def test_subset_whole_balanced_range(real_mnist):
    labels = real_mnist.train_labels
    smallest_class = int(torch.bincount(labels).min())

    indices = balanced_subset(labels, 10 * smallest_class, seed=1)

    assert class_counts(labels, indices) == [smallest_class] * 10


@pytest.mark.parametrize("size", [0, -5])
def test_subset_rejects_non_positive_size(real_mnist, size):
    with pytest.raises(ValueError, match=f"subset size must be positive, got {size}"):
        balanced_subset(real_mnist.train_labels, size, seed=0)


def test_subset_rejects_size_above_data(real_mnist):
    with pytest.raises(ValueError, match="subset size 60001 is larger than the 60000") as error:
        balanced_subset(real_mnist.train_labels, 60_001, seed=0)

    assert "at most 60000" in str(error.value)


def test_subset_rejects_small_class():
    # Ten examples of every class except class 3, which has two.
    labels = torch.cat([torch.full((2 if label == 3 else 10,), label) for label in range(10)])

    with pytest.raises(ValueError, match="needs 5 examples of class 3 but only 2") as error:
        balanced_subset(labels, 50, seed=0)

    assert "at most 20" in str(error.value)


def test_validation_disjoint_and_balanced(real_mnist):
    labels = real_mnist.train_labels
    subset = balanced_subset(labels, 12_000, seed=0)

    validation = split_validation(labels, subset, 5000, seed=0)

    assert len(validation) == 5000
    assert len(torch.unique(validation)) == 5000
    assert not torch.isin(validation, subset).any()
    assert class_counts(labels, validation) == [500] * 10


def test_validation_deterministic(real_mnist):
    labels = real_mnist.train_labels
    subset = balanced_subset(labels, 1000, seed=0)

    first = split_validation(labels, subset, 1000, seed=4)
    second = split_validation(labels, subset, 1000, seed=4)
    other_seed = split_validation(labels, subset, 1000, seed=5)

    assert torch.equal(first, second)
    assert not torch.equal(first, other_seed)


def test_validation_rejects_size_above_rest():
    labels = torch.arange(10).repeat(10)
    subset = balanced_subset(labels, 50, seed=0)

    with pytest.raises(ValueError, match="validation size 51 is larger than the 50"):
        split_validation(labels, subset, 51, seed=0)
    with pytest.raises(ValueError, match="validation size must be positive, got 0"):
        split_validation(labels, subset, 0, seed=0)


def test_batches_sizes_keep_last_partial():
    batches = epoch_batches(12_000, 256, seed=0, epoch=0, device="cpu")

    assert len(batches) == 47
    assert [len(batch) for batch in batches[:-1]] == [256] * 46
    assert len(batches[-1]) == 224


def test_batches_cover_each_index_once():
    for epoch in range(3):
        batches = epoch_batches(12_000, 256, seed=0, epoch=epoch, device="cpu")
        order = torch.cat(batches)

        assert order.dtype == torch.int64
        assert torch.equal(torch.sort(order).values, torch.arange(12_000))


def test_batches_epochs_differ():
    epoch_0 = torch.cat(epoch_batches(12_000, 256, seed=0, epoch=0, device="cpu"))
    epoch_1 = torch.cat(epoch_batches(12_000, 256, seed=0, epoch=1, device="cpu"))

    assert not torch.equal(epoch_0, epoch_1)


def test_batches_same_seed_same_order():
    first = torch.cat(epoch_batches(12_000, 256, seed=5, epoch=2, device="cpu"))
    second = torch.cat(epoch_batches(12_000, 256, seed=5, epoch=2, device="cpu"))
    other_seed = torch.cat(epoch_batches(12_000, 256, seed=6, epoch=2, device="cpu"))

    assert torch.equal(first, second)
    assert not torch.equal(first, other_seed)


def test_batches_exact_division():
    batches = epoch_batches(512, 256, seed=0, epoch=0, device="cpu")

    assert [len(batch) for batch in batches] == [256, 256]


def test_batches_large_seed_accepted():
    batches = epoch_batches(10, 4, seed=2**63, epoch=1, device="cpu")

    assert [len(batch) for batch in batches] == [4, 4, 2]


@pytest.mark.parametrize(("n", "batch_size"), [(0, 256), (100, 0)])
def test_batches_reject_non_positive(n, batch_size):
    with pytest.raises(ValueError, match="must be at least 1"):
        epoch_batches(n, batch_size, seed=0, epoch=0, device="cpu")
