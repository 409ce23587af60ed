"""MNIST loading, validation and seeded sampling.

load_mnist reads the four IDX files into tensors once, and the sampling helpers return
index tensors, so training needs no DataLoader and no worker processes. Every random
choice uses a CPU torch.Generator seeded from the caller's seed, so a seed selects the
same examples and batch order on CPU and CUDA.
"""

from __future__ import annotations

import operator
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
NUM_CLASSES = 10
IMAGE_SIDE = 28
IMAGE_PIXELS = IMAGE_SIDE * IMAGE_SIDE

TRAIN_IMAGES = "train-images-idx3-ubyte"
TRAIN_LABELS = "train-labels-idx1-ubyte"
TEST_IMAGES = "t10k-images-idx3-ubyte"
TEST_LABELS = "t10k-labels-idx1-ubyte"
MNIST_FILES = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)

DATA_DIR_ENV = "STEPCLI_DATA_DIR"
DEFAULT_DATA_DIR = Path("data")

# IDX magic numbers: two zero bytes, type code 0x08 (unsigned byte), number of dimensions.
_IMAGES_MAGIC = 0x00000803
_LABELS_MAGIC = 0x00000801
_IMAGES_HEADER_BYTES = 16
_LABELS_HEADER_BYTES = 8
_GZIP_MAGIC = b"\x1f\x8b"

# torchvision 0.29 opens its download URLs without a timeout, so a stalled connection
# would hang forever without a socket default.
_DOWNLOAD_TIMEOUT_S = 60.0
_MAX_REASON_CHARS = 300

_FIX_FILE = "delete the file and download it again, or pass --data-dir with the official files"
_FIX_FOLDER = (
    "pass --data-dir with a folder that contains the four official MNIST files "
    f"or set {DATA_DIR_ENV}"
)


class DataError(Exception):
    """Error for MNIST data that cannot be used.

    The message is one line that names the file or folder, the problem and the fix.
    """

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.splitlines()))


@dataclass(frozen=True)
class MNIST:
    """MNIST training and test sets as tensors on one device.

    Images are float32 of shape (N, 784): pixel / 255, then (x - MNIST_MEAN) / MNIST_STD.
    Labels are int64 of shape (N,) with values 0-9.
    """

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor


def data_dir_from(option: str | os.PathLike[str] | None) -> Path:
    """Return the data folder: the --data-dir value, else $STEPCLI_DATA_DIR, else ./data.

    An empty option or an empty environment variable counts as not set.
    """
    if option:
        return Path(option).expanduser()

    from_env = os.environ.get(DATA_DIR_ENV)
    if from_env:
        return Path(from_env).expanduser()

    return DEFAULT_DATA_DIR


def resolve_data_dir(path: str | os.PathLike[str]) -> Path:
    """Return the folder that contains the four raw MNIST files.

    `path` may be a torchvision root (containing MNIST/raw/), the MNIST/ folder, the
    MNIST/raw/ folder, or any folder that contains the four files directly. Only the
    uncompressed file names count.

    Raises:
        DataError: when the folder is missing, unreadable, not a folder, contains none of
            the files, or contains only some of them (the message names the missing ones).
    """
    root = Path(path).expanduser().absolute()
    raw_folder = _find_raw_folder(root)
    if raw_folder is None:
        raise DataError(_not_found_message(root, _FIX_FOLDER))
    return raw_folder


def load_mnist(
    data_dir: str | os.PathLike[str],
    *,
    download: bool = True,
    device: str | torch.device = "cpu",
) -> MNIST:
    """Load and validate the four MNIST files, downloading them first if none are present.

    The download goes through torchvision into <root>/MNIST/raw, where <root> is
    `data_dir`, or its parent folders when `data_dir` itself is MNIST/ or MNIST/raw/.
    A folder that contains only some of the files raises DataError without downloading.
    Every file is checked before use: IDX magic number, 28x28 image size, exact file
    size, matching image and label counts, and labels within 0-9. The images are
    normalised on the CPU and then moved, so every device receives identical values.

    Raises:
        DataError: for a missing, unreadable or damaged file or folder, or a failed download.
    """
    root = Path(data_dir).expanduser().absolute()
    raw_folder = _find_raw_folder(root)

    if raw_folder is None:
        if not download:
            raise DataError(_not_found_message(root, f"download is disabled; {_FIX_FOLDER}"))
        _download(root)
        raw_folder = _find_raw_folder(root)
        if raw_folder is None:
            raise DataError(
                _not_found_message(root, f"the download left no files there; {_FIX_FOLDER}")
            )

    train_images, train_labels = _read_split(raw_folder / TRAIN_IMAGES, raw_folder / TRAIN_LABELS)
    test_images, test_labels = _read_split(raw_folder / TEST_IMAGES, raw_folder / TEST_LABELS)

    target = torch.device(device)
    return MNIST(
        train_images=_normalise(train_images).to(target),
        train_labels=torch.from_numpy(train_labels.astype(np.int64)).to(target),
        test_images=_normalise(test_images).to(target),
        test_labels=torch.from_numpy(test_labels.astype(np.int64)).to(target),
    )


def balanced_subset(labels: torch.Tensor, size: int, seed: int) -> torch.Tensor:
    """Draw a class-balanced random subset of example indices, sorted ascending.

    Each of the 10 classes gets size // 10 examples, and size % 10 classes chosen at
    random get one more. All draws come from a CPU torch.Generator seeded with `seed`,
    so a seed gives the same indices on every machine with the same torch version.
    Returns int64 indices on labels.device.

    Raises:
        ValueError: when size is not between 1 and len(labels), or a class has fewer
            examples than its share.
    """
    labels_cpu = _labels_on_cpu(labels)
    candidates = torch.arange(len(labels_cpu))
    generator = _seeded_generator(seed)
    chosen = _balanced_draw(labels_cpu, candidates, size, generator, "subset size")
    return chosen.to(labels.device)


def split_validation(
    labels: torch.Tensor, subset_indices: torch.Tensor, val_size: int, seed: int
) -> torch.Tensor:
    """Draw a class-balanced validation split from the examples outside `subset_indices`.

    The split is disjoint from the subset and follows the same rules as balanced_subset:
    size // 10 per class, one extra for size % 10 random classes, sorted ascending, and a
    CPU torch.Generator seeded with `seed`. Returns int64 indices on labels.device.

    Raises:
        ValueError: when val_size is not between 1 and the number of examples outside the
            subset, or a class has too few examples left.
    """
    labels_cpu = _labels_on_cpu(labels)
    outside_subset = torch.ones(len(labels_cpu), dtype=torch.bool)
    outside_subset[subset_indices.detach().cpu().long()] = False
    candidates = outside_subset.nonzero().flatten()

    generator = _seeded_generator(seed)
    chosen = _balanced_draw(labels_cpu, candidates, val_size, generator, "validation size")
    return chosen.to(labels.device)


def epoch_batches(
    n: int, batch_size: int, seed: int, epoch: int, device: str | torch.device = "cpu"
) -> list[torch.Tensor]:
    """Split a seeded permutation of range(n) into batches of index tensors on `device`.

    The permutation comes from a CPU torch.Generator seeded with
    (seed * 1_000_003 + epoch) mod 2**64 and is moved to `device` once, so CPU and CUDA
    runs see the same order. The last batch keeps the remainder: n=12000 with
    batch_size=256 gives 46 batches of 256 and one of 224.

    Raises:
        ValueError: when n or batch_size is below 1.
    """
    n = operator.index(n)
    batch_size = operator.index(batch_size)
    if n < 1:
        raise ValueError(f"number of examples must be at least 1, got {n}; pass a positive n")
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}; pass a positive size")

    generator = _seeded_generator(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=generator).to(device)
    return list(torch.split(order, batch_size))


def _seeded_generator(seed: int) -> torch.Generator:
    # torch.Generator.manual_seed accepts values up to 2**64 - 1 and maps a negative
    # seed s to s + 2**64, so reducing mod 2**64 only extends the accepted range.
    return torch.Generator().manual_seed(seed % 2**64)


# Finding the files


def _candidate_folders(root: Path) -> list[Path]:
    """List the folders that may hold the files: flat, torchvision root, or MNIST/."""
    return [root, root / "MNIST" / "raw", root / "raw"]


def _find_raw_folder(root: Path) -> Path | None:
    """Return the first candidate folder that contains all four files, else None if none has any.

    Raises DataError when `root` is not a readable folder, or when the candidates contain
    only some of the files.
    """
    if not _exists(root):
        return None
    if not root.is_dir():
        raise DataError(
            f"MNIST data folder {root} is not a folder; pass --data-dir with the folder "
            "that contains the four MNIST files"
        )

    partial: tuple[Path, list[str]] | None = None
    for folder in _candidate_folders(root):
        if not _is_dir(folder):
            continue
        _check_readable(folder)
        missing = [name for name in MNIST_FILES if not (folder / name).exists()]
        if not missing:
            return folder
        if len(missing) < len(MNIST_FILES) and partial is None:
            partial = (folder, missing)

    if partial is not None:
        folder, missing = partial
        raise DataError(
            f"incomplete MNIST data in {folder}: missing {', '.join(missing)}; copy the "
            "missing files there, or delete the folder and run again to download all four"
        )
    return None


# Path.exists and Path.is_dir raise PermissionError when a parent folder is not searchable.


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except PermissionError as error:
        raise _unreadable_folder(path.parent) from error


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except PermissionError as error:
        raise _unreadable_folder(path.parent) from error


def _check_readable(folder: Path) -> None:
    # Listing needs read permission and opening files inside needs execute permission.
    if not os.access(folder, os.R_OK | os.X_OK):
        raise _unreadable_folder(folder)


def _unreadable_folder(folder: Path) -> DataError:
    return DataError(
        f"cannot read MNIST data folder {folder}: permission denied; grant read access "
        f"to it, or {_FIX_FOLDER}"
    )


def _not_found_message(root: Path, next_step: str) -> str:
    looked_in = ", ".join(str(folder) for folder in _candidate_folders(root))
    return (
        f"MNIST files not found in {root} (looked in {looked_in}; expected "
        f"{', '.join(MNIST_FILES)}); {next_step}"
    )


# Downloading


def _download_root(root: Path) -> Path:
    """Return the root folder for torchvision, which downloads into <root>/MNIST/raw."""
    if root.name == "raw" and root.parent.name == "MNIST":
        return root.parent.parent
    if root.name == "MNIST":
        return root.parent
    return root


def _download(root: Path) -> None:
    """Download the four files with torchvision, raising DataError if that fails.

    torchvision downloads into a staging folder beside MNIST/, and the four files move into
    MNIST/raw only once all of them arrived. A failed or interrupted download therefore leaves
    no partial set behind, which the next attempt would reject as incomplete.
    """
    # Only the download needs torchvision, which takes about 1 s to import (torchvision 0.29).
    import torchvision

    download_root = _download_root(root)
    raw_folder = download_root / "MNIST" / "raw"
    # Folders this download creates, deepest first, so that a failed download (a mistyped
    # --data-dir, say) removes them again instead of leaving empty folders behind.
    created = [path for path in (download_root, *download_root.parents) if not path.exists()]
    try:
        download_root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".stepcli-download-", dir=download_root))
    except OSError as error:
        raise DataError(
            _not_found_message(
                root,
                f"cannot create a download folder in {download_root}: {_short_reason(error)}; "
                f"{_FIX_FOLDER}",
            )
        ) from error
    staged = staging / "MNIST" / "raw"
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(_DOWNLOAD_TIMEOUT_S)
    try:
        try:
            # MNIST.download fetches all four files, whichever split is requested. Its
            # progress bar goes to stderr.
            torchvision.datasets.MNIST(staging, train=True, download=True)
        except (OSError, RuntimeError, EOFError, ValueError, AssertionError) as error:
            # torchvision also parses the files after downloading them. If all four arrived,
            # the validation in load_mnist reports what is wrong with them more precisely.
            if not all((staged / name).exists() for name in MNIST_FILES):
                shutil.rmtree(staging, ignore_errors=True)
                _remove_empty(created)
                reason = f"download into {raw_folder} failed: {_short_reason(error)}"
                raise DataError(_not_found_message(root, f"{reason}; {_FIX_FOLDER}")) from error
        raw_folder.mkdir(parents=True, exist_ok=True)
        for name in MNIST_FILES:
            os.replace(staged / name, raw_folder / name)
    finally:
        socket.setdefaulttimeout(previous_timeout)
        shutil.rmtree(staging, ignore_errors=True)


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def _short_reason(error: BaseException) -> str:
    reason = " ".join(str(error).split()) or type(error).__name__
    if len(reason) > _MAX_REASON_CHARS:
        reason = reason[: _MAX_REASON_CHARS - 3] + "..."
    return reason


# Reading and validating IDX files


def _read_split(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one image file and its label file, checking that the counts match."""
    images = _read_images(images_path)
    labels = _read_labels(labels_path)
    if len(images) != len(labels):
        raise DataError(
            f"MNIST files do not match: {images_path} has {len(images)} images but "
            f"{labels_path} has {len(labels)} labels; delete both files and download them "
            "again, or pass --data-dir with the official files"
        )
    return images, labels


def _read_images(path: Path) -> np.ndarray:
    """Return the images of an IDX image file as a read-only uint8 array of shape (N, 784)."""
    data = _read_bytes(path)
    _check_magic(path, data, _IMAGES_MAGIC, "image")
    _check_header_size(path, data, _IMAGES_HEADER_BYTES, "image")

    count, rows, cols = np.frombuffer(data, dtype=">u4", count=3, offset=4).tolist()
    if (rows, cols) != (IMAGE_SIDE, IMAGE_SIDE):
        raise DataError(
            f"invalid MNIST file {path}: images are {rows}x{cols} but MNIST images are "
            f"{IMAGE_SIDE}x{IMAGE_SIDE}; {_FIX_FILE}"
        )
    _check_file_size(path, data, _IMAGES_HEADER_BYTES, count, IMAGE_PIXELS, "images of 28x28")

    images = np.frombuffer(data, dtype=np.uint8, offset=_IMAGES_HEADER_BYTES)
    return images.reshape(count, IMAGE_PIXELS)


def _read_labels(path: Path) -> np.ndarray:
    """Return the labels of an IDX label file as a read-only uint8 array of shape (N,)."""
    data = _read_bytes(path)
    _check_magic(path, data, _LABELS_MAGIC, "label")
    _check_header_size(path, data, _LABELS_HEADER_BYTES, "label")

    count = int(np.frombuffer(data, dtype=">u4", count=1, offset=4)[0])
    _check_file_size(path, data, _LABELS_HEADER_BYTES, count, 1, "labels")

    labels = np.frombuffer(data, dtype=np.uint8, offset=_LABELS_HEADER_BYTES)
    out_of_range = np.flatnonzero(labels >= NUM_CLASSES)
    if out_of_range.size > 0:
        index = int(out_of_range[0])
        raise DataError(
            f"invalid MNIST file {path}: label {int(labels[index])} at index {index} is "
            f"outside 0-9; {_FIX_FILE}"
        )
    return labels


def _read_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise DataError(f"invalid MNIST file {path}: not a regular file; {_FIX_FILE}")
    try:
        return path.read_bytes()
    except OSError as error:
        raise DataError(
            f"cannot read MNIST file {path}: {error.strerror or error}; grant read access "
            f"to it, or {_FIX_FOLDER}"
        ) from error


def _check_magic(path: Path, data: bytes, expected: int, kind: str) -> None:
    if data[:2] == _GZIP_MAGIC:
        raise DataError(
            f"invalid MNIST file {path}: the file is gzip-compressed; extract it with "
            f"gunzip, or {_FIX_FILE}"
        )
    if data.lstrip()[:1] == b"<":
        raise DataError(
            f"invalid MNIST file {path}: the file starts with '<' and looks like an HTML "
            f"page, not IDX {kind} data; {_FIX_FILE}"
        )
    if len(data) < 4:
        raise DataError(
            f"invalid MNIST file {path}: the file has {len(data)} bytes, too short for an "
            f"IDX magic number; {_FIX_FILE}"
        )

    magic = int.from_bytes(data[:4], "big")
    if magic != expected:
        raise DataError(
            f"invalid MNIST file {path}: magic number 0x{magic:08x}, expected "
            f"0x{expected:08x} for IDX {kind} data; {_FIX_FILE}"
        )


def _check_header_size(path: Path, data: bytes, header_bytes: int, kind: str) -> None:
    if len(data) < header_bytes:
        raise DataError(
            f"invalid MNIST file {path}: the file is truncated: it has {len(data)} bytes, "
            f"less than the {header_bytes}-byte IDX {kind} header; {_FIX_FILE}"
        )


def _check_file_size(
    path: Path, data: bytes, header_bytes: int, count: int, item_bytes: int, items: str
) -> None:
    expected = header_bytes + count * item_bytes
    if len(data) < expected:
        raise DataError(
            f"invalid MNIST file {path}: the file is truncated: the header declares {count} "
            f"{items} ({expected} bytes) but the file has {len(data)} bytes; {_FIX_FILE}"
        )
    if len(data) > expected:
        raise DataError(
            f"invalid MNIST file {path}: {len(data) - expected} extra bytes after the "
            f"{count} {items} that the header declares ({expected} bytes); {_FIX_FILE}"
        )
    if count == 0:
        raise DataError(f"invalid MNIST file {path}: the header declares 0 {items}; {_FIX_FILE}")


def _normalise(images: np.ndarray) -> torch.Tensor:
    # astype copies the read-only file buffer into a writable float32 array.
    pixels = torch.from_numpy(images.astype(np.float32))
    return pixels.div_(255.0).sub_(MNIST_MEAN).div_(MNIST_STD)


# Sampling


def _labels_on_cpu(labels: torch.Tensor) -> torch.Tensor:
    if labels.ndim != 1:
        raise ValueError(
            f"labels must be a 1-D tensor, got shape {tuple(labels.shape)}; pass the label vector"
        )
    return labels.detach().cpu()


def _balanced_draw(
    labels: torch.Tensor,
    candidates: torch.Tensor,
    size: int,
    generator: torch.Generator,
    size_name: str,
) -> torch.Tensor:
    """Draw `size` class-balanced indices from `candidates`, sorted ascending.

    The draw order is fixed (one permutation of the classes, then one permutation per
    class), so the result depends only on the inputs and the generator state.
    """
    size = operator.index(size)
    available = len(candidates)
    if size <= 0:
        raise ValueError(
            f"{size_name} must be positive, got {size}; pass a size from 1 to {available}"
        )
    if size > available:
        raise ValueError(
            f"{size_name} {size} is larger than the {available} available examples; pass a size "
            f"of at most {available}"
        )

    candidate_labels = labels[candidates]
    pools = [candidates[candidate_labels == label] for label in range(NUM_CLASSES)]
    per_class = torch.full((NUM_CLASSES,), size // NUM_CLASSES, dtype=torch.long)
    extra_classes = torch.randperm(NUM_CLASSES, generator=generator)[: size % NUM_CLASSES]
    per_class[extra_classes] += 1

    chosen = []
    for label, pool in enumerate(pools):
        share = int(per_class[label])
        if share > len(pool):
            always_fits = NUM_CLASSES * min(len(p) for p in pools)
            raise ValueError(
                f"{size_name} {size} needs {share} examples of class {label} but only "
                f"{len(pool)} are available; pass a size of at most {always_fits} "
                "(10 times the smallest class)"
            )
        order = torch.randperm(len(pool), generator=generator)[:share]
        chosen.append(pool[order])

    return torch.sort(torch.cat(chosen)).values
