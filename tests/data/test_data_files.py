"""Tests for finding, reading and validating MNIST files, on small generated IDX files."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from stepcli.data import (
    DATA_DIR_ENV,
    MNIST_FILES,
    MNIST_MEAN,
    MNIST_STD,
    TEST_IMAGES,
    TRAIN_IMAGES,
    TRAIN_LABELS,
    DataError,
    data_dir_from,
    load_mnist,
    resolve_data_dir,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
NOBODY = 65534


def assert_one_line_error(error: pytest.ExceptionInfo[DataError], *fragments: str) -> str:
    message = str(error.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message
    return message


# Damaged files: each case replaces one valid file with the output of a function that
# receives the valid file's bytes, and names the text the error must contain.
def _truncated(data: bytes) -> bytes:
    return data[:-100]


def _trailing_junk(data: bytes) -> bytes:
    return data + b"junk"


def _html_page(data: bytes) -> bytes:
    return b"<!DOCTYPE html>\n<html><body><h1>404 Not Found</h1></body></html>\n"


def _gzipped(data: bytes) -> bytes:
    return gzip.compress(data)


def _wrong_image_magic(data: bytes) -> bytes:
    return (0x00000804).to_bytes(4, "big") + data[4:]


def _labels_instead_of_images(data: bytes) -> bytes:
    return (0x00000801).to_bytes(4, "big") + data[4:]


def _image_size_28x29(data: bytes) -> bytes:
    count = int.from_bytes(data[4:8], "big")
    header = np.array([0x00000803, count, 28, 29], dtype=">u4").tobytes()
    return header + bytes(count * 28 * 29)


def _label_10_at_index_3(data: bytes) -> bytes:
    labels = bytearray(data)
    labels[8 + 3] = 10
    return bytes(labels)


def _empty(data: bytes) -> bytes:
    return b""


def _header_only(data: bytes) -> bytes:
    return data[:6]


def _zero_labels(data: bytes) -> bytes:
    return np.array([0x00000801, 0], dtype=">u4").tobytes()


DAMAGED_CASES: list[tuple[str, str, Callable[[bytes], bytes], tuple[str, ...]]] = [
    ("truncated", TRAIN_IMAGES, _truncated, ("truncated", "(23536 bytes)", "has 23436 bytes")),
    ("trailing junk", TRAIN_LABELS, _trailing_junk, ("4 extra bytes",)),
    ("html page", TRAIN_LABELS, _html_page, ("HTML",)),
    ("gzip", TEST_IMAGES, _gzipped, ("gzip-compressed", "gunzip")),
    ("wrong magic", TRAIN_IMAGES, _wrong_image_magic, ("magic number 0x00000804", "0x00000803")),
    ("label file as images", TRAIN_IMAGES, _labels_instead_of_images, ("0x00000801",)),
    ("image size", TRAIN_IMAGES, _image_size_28x29, ("28x29",)),
    ("label 10", TRAIN_LABELS, _label_10_at_index_3, ("label 10 at index 3 is outside 0-9",)),
    ("empty file", TEST_IMAGES, _empty, ("0 bytes",)),
    ("header cut", TRAIN_LABELS, _header_only, ("truncated", "6 bytes", "8-byte")),
    ("zero labels", TRAIN_LABELS, _zero_labels, ("declares 0 labels",)),
]


@pytest.mark.parametrize(
    ("file_name", "damage", "fragments"),
    [case[1:] for case in DAMAGED_CASES],
    ids=[case[0] for case in DAMAGED_CASES],
)
def test_damaged_file_raises_data_error(tmp_path, idx_files, file_name, damage, fragments):
    folder = idx_files.write_folder(tmp_path / "raw")
    damaged = folder / file_name
    damaged.write_bytes(damage(damaged.read_bytes()))

    with pytest.raises(DataError) as error:
        load_mnist(folder, download=False)

    message = assert_one_line_error(error, str(damaged), *fragments)
    assert "download it again" in message or "gunzip" in message


def test_count_mismatch_names_both_files(tmp_path, idx_files):
    folder = idx_files.write_folder(tmp_path / "raw")
    labels = idx_files.label_array(idx_files.train_count - 1)
    (folder / TRAIN_LABELS).write_bytes(idx_files.labels_bytes(labels))

    with pytest.raises(DataError) as error:
        load_mnist(folder, download=False)

    assert_one_line_error(
        error,
        str(folder / TRAIN_IMAGES),
        str(folder / TRAIN_LABELS),
        f"{idx_files.train_count} images",
        f"{idx_files.train_count - 1} labels",
    )


def test_data_file_that_is_folder(tmp_path, idx_files):
    folder = idx_files.write_folder(tmp_path / "raw")
    (folder / TEST_IMAGES).unlink()
    (folder / TEST_IMAGES).mkdir()

    with pytest.raises(DataError) as error:
        load_mnist(folder, download=False)

    assert_one_line_error(error, str(folder / TEST_IMAGES), "not a regular file")


@pytest.mark.parametrize("download", [False, True])
def test_missing_file_is_named(tmp_path, idx_files, download):
    folder = idx_files.write_folder(tmp_path / "MNIST" / "raw")
    (folder / TRAIN_LABELS).unlink()

    with pytest.raises(DataError) as error:
        load_mnist(tmp_path, download=download)

    message = assert_one_line_error(error, str(folder), f"missing {TRAIN_LABELS}")
    for present in (TRAIN_IMAGES, TEST_IMAGES):
        assert present not in message


def test_empty_folder_without_download(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()

    with pytest.raises(DataError) as error:
        load_mnist(folder, download=False)

    assert_one_line_error(
        error,
        str(folder),
        str(folder / "MNIST" / "raw"),
        *MNIST_FILES,
        "download is disabled",
        "--data-dir",
        DATA_DIR_ENV,
    )


def test_missing_folder_without_download(tmp_path):
    folder = tmp_path / "absent"

    with pytest.raises(DataError) as error:
        load_mnist(folder, download=False)

    assert_one_line_error(error, str(folder), "not found", "--data-dir")
    assert not folder.exists()


def test_data_dir_that_is_file(tmp_path):
    path = tmp_path / "data"
    path.write_text("not a folder")

    with pytest.raises(DataError) as error:
        resolve_data_dir(path)

    assert_one_line_error(error, str(path), "is not a folder")


def test_loads_generated_files(tmp_path, idx_files):
    folder = idx_files.write_folder(tmp_path / "raw")

    mnist = load_mnist(folder, download=False)

    assert mnist.train_images.shape == (idx_files.train_count, 784)
    assert mnist.test_images.shape == (idx_files.test_count, 784)
    assert mnist.train_images.dtype == torch.float32
    assert mnist.train_labels.dtype == torch.int64
    assert mnist.train_labels.tolist() == idx_files.label_array(idx_files.train_count).tolist()
    assert mnist.test_labels.tolist() == idx_files.label_array(idx_files.test_count).tolist()

    pixels = torch.from_numpy(idx_files.image_array(idx_files.train_count, seed=1))
    expected = (pixels.reshape(-1, 784).float() / 255 - MNIST_MEAN) / MNIST_STD
    torch.testing.assert_close(mnist.train_images, expected)
    assert mnist.train_images[0, 0].item() == pytest.approx(-MNIST_MEAN / MNIST_STD)
    assert mnist.train_images[0, 1].item() == pytest.approx((1 - MNIST_MEAN) / MNIST_STD)


def test_mnist_dataclass_is_frozen(tmp_path, idx_files):
    mnist = load_mnist(idx_files.write_folder(tmp_path / "raw"), download=False)

    with pytest.raises(AttributeError):
        mnist.train_labels = mnist.test_labels


def test_resolve_accepts_each_layout(tmp_path, idx_files):
    root = tmp_path / "root"
    raw = idx_files.write_folder(root / "MNIST" / "raw")
    flat = tmp_path / "flat"
    flat.mkdir()
    for name in MNIST_FILES:
        (flat / name).symlink_to(raw / name)

    assert resolve_data_dir(root) == raw
    assert resolve_data_dir(root / "MNIST") == raw
    assert resolve_data_dir(raw) == raw
    assert resolve_data_dir(flat) == flat
    assert load_mnist(flat, download=False).train_labels.shape == (idx_files.train_count,)


def test_resolve_returns_absolute_path(tmp_path, idx_files, monkeypatch):
    raw = idx_files.write_folder(tmp_path / "MNIST" / "raw")
    monkeypatch.chdir(tmp_path)

    assert resolve_data_dir("MNIST") == raw


def test_resolve_finds_real_folder(real_root):
    assert resolve_data_dir(real_root) == real_root.absolute() / "MNIST" / "raw"


def test_data_dir_from_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "from-env"))
    assert data_dir_from(str(tmp_path / "from-option")) == tmp_path / "from-option"
    assert data_dir_from(None) == tmp_path / "from-env"

    monkeypatch.setenv(DATA_DIR_ENV, "")
    assert data_dir_from(None) == Path("data")

    monkeypatch.delenv(DATA_DIR_ENV)
    assert data_dir_from(None) == Path("data")
    assert data_dir_from("") == Path("data")


# The tests run as root, which reads any folder whatever its mode. A real permission
# failure therefore needs a process running as another user: as root, a child process
# imports stepcli, switches to the unprivileged user "nobody" and then loads each folder.
_LOAD_AS_NOBODY = """
import json, os, sys
sys.path.insert(0, sys.argv[1])
from stepcli.data import DataError, load_mnist
os.setgroups([])
os.setgid({uid})
os.setuid({uid})
results = {{}}
for folder in sys.argv[2:]:
    try:
        results[folder] = "loaded " + str(len(load_mnist(folder, download=False).train_labels))
    except DataError as error:
        results[folder] = "DataError: " + str(error)
print(json.dumps(results))
"""


def _load_as_nobody(folders: list[Path]) -> dict[str, str]:
    script = _LOAD_AS_NOBODY.format(uid=NOBODY)
    completed = subprocess.run(
        [sys.executable, "-c", script, str(REPO_ROOT), *map(str, folders)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout)


def test_unreadable_folder_is_named(idx_files):
    # tmp_path sits under a root-only folder, so "nobody" could not reach any folder in
    # it. This test uses a fresh folder in the system temp directory instead.
    base = Path(tempfile.mkdtemp(prefix="stepcli-data-test-"))
    try:
        base.chmod(0o755)
        readable = idx_files.write_folder(base / "readable")
        locked = idx_files.write_folder(base / "locked")
        for folder in (readable, locked):
            for name in MNIST_FILES:
                (folder / name).chmod(0o644)
        readable.chmod(0o755)

        if os.geteuid() == 0:
            locked.chmod(0o700)
            results = _load_as_nobody([readable, locked])
            readable_result = results[str(readable)]
            locked_result = results[str(locked)]
        else:
            locked.chmod(0o000)
            readable_result = f"loaded {len(load_mnist(readable, download=False).train_labels)}"
            with pytest.raises(DataError) as error:
                load_mnist(locked, download=False)
            locked_result = f"DataError: {error.value}"

        # The readable folder shows that the unprivileged user can reach the temp folder.
        assert readable_result == f"loaded {idx_files.train_count}"
        assert locked_result.startswith("DataError: ")
        assert f"cannot read MNIST data folder {locked}" in locked_result
        assert "permission denied" in locked_result
        assert "\n" not in locked_result
    finally:
        locked_path = base / "locked"
        if locked_path.exists():
            locked_path.chmod(0o700)
        shutil.rmtree(base)
