"""Fixtures for the stepcli.data tests: small generated IDX files and the real MNIST set."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from stepcli.data import (
    MNIST,
    TEST_IMAGES,
    TEST_LABELS,
    TRAIN_IMAGES,
    TRAIN_LABELS,
    DataError,
    load_mnist,
    resolve_data_dir,
)

TEST_MNIST_ENV = "STEPCLI_TEST_MNIST"


class IdxFiles:
    """Builders for small valid MNIST IDX files."""

    train_count = 30
    test_count = 20

    @staticmethod
    def image_array(count: int, seed: int = 0) -> np.ndarray:
        """Return `count` random 28x28 uint8 images that include pixel values 0 and 255."""
        images = np.random.default_rng(seed).integers(0, 256, (count, 28, 28), dtype=np.uint8)
        images[0, 0, 0] = 0
        images[0, 0, 1] = 255
        return images

    @staticmethod
    def label_array(count: int) -> np.ndarray:
        return (np.arange(count) % 10).astype(np.uint8)

    @staticmethod
    def images_bytes(images: np.ndarray, magic: int = 0x00000803) -> bytes:
        count, rows, cols = images.shape
        header = np.array([magic, count, rows, cols], dtype=">u4").tobytes()
        return header + images.astype(np.uint8).tobytes()

    @staticmethod
    def labels_bytes(labels: np.ndarray, magic: int = 0x00000801) -> bytes:
        header = np.array([magic, len(labels)], dtype=">u4").tobytes()
        return header + np.asarray(labels, dtype=np.uint8).tobytes()

    @classmethod
    def file_bytes(cls) -> dict[str, bytes]:
        """Return the contents of the four files, keyed by MNIST file name."""
        return {
            TRAIN_IMAGES: cls.images_bytes(cls.image_array(cls.train_count, seed=1)),
            TRAIN_LABELS: cls.labels_bytes(cls.label_array(cls.train_count)),
            TEST_IMAGES: cls.images_bytes(cls.image_array(cls.test_count, seed=2)),
            TEST_LABELS: cls.labels_bytes(cls.label_array(cls.test_count)),
        }

    @classmethod
    def write_folder(cls, folder: Path) -> Path:
        """Write the four valid files into `folder`, creating it, and return the folder."""
        folder.mkdir(parents=True, exist_ok=True)
        for name, content in cls.file_bytes().items():
            (folder / name).write_bytes(content)
        return folder


@pytest.fixture
def idx_files() -> type[IdxFiles]:
    return IdxFiles


def real_mnist_root() -> Path:
    """Return $STEPCLI_TEST_MNIST, else shared/mnist beside the repository checkout."""
    override = os.environ.get(TEST_MNIST_ENV)
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[3] / "shared" / "mnist"


@pytest.fixture(scope="session")
def real_root() -> Path:
    root = real_mnist_root()
    try:
        resolve_data_dir(root)
    except DataError as error:
        pytest.fail(
            f"real MNIST files are required at {root} (a torchvision root with MNIST/raw/ "
            f"containing the four uncompressed files); set {TEST_MNIST_ENV} to another folder. "
            f"Lookup failed with: {error}",
            pytrace=False,
        )
    return root


@pytest.fixture(scope="session")
def real_mnist(real_root: Path) -> MNIST:
    return load_mnist(real_root, download=False)
