"""Shared fixtures: the real MNIST folder beside the checkout and a helper to run the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Ray reads these when it is first imported, by any test: no usage statistics sent anywhere, and
# a local Ray instance that listens on 127.0.0.1 instead of the machine's network address.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def mnist_root() -> Path:
    """Return the real MNIST folder: $STEPCLI_TEST_MNIST, else ``shared/mnist`` beside the repo."""
    path = Path(os.environ.get("STEPCLI_TEST_MNIST", REPO.parent / "shared" / "mnist"))
    if not (path / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file():
        pytest.fail(f"real MNIST not found at {path}: set STEPCLI_TEST_MNIST to a torchvision root")
    return path


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    return mnist_root()


@pytest.fixture(scope="session")
def mnist_cpu(mnist_dir):
    from stepcli.data import load_mnist

    return load_mnist(mnist_dir, download=False, device="cpu")


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600):
    """Run ``python -m stepcli ARGS`` in a subprocess and return the completed process."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "stepcli", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def cli():
    return run_cli
