"""Facts about the code and machine that produced a run."""

from __future__ import annotations

import functools
import socket
import subprocess
from pathlib import Path

import torch

import stepcli


@functools.cache
def git_revision() -> str | None:
    """Return the commit of the stepcli checkout, with ``-dirty`` for uncommitted changes.

    Returns ``None`` when stepcli is not installed from a git checkout.
    """
    root = Path(stepcli.__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        )
        if commit.returncode != 0:
            return None
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", "stepcli"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    dirty = "-dirty" if status.stdout.strip() else ""
    return commit.stdout.strip()[:12] + dirty


def code_version() -> str:
    """Return the git revision when known, else the package version."""
    return git_revision() or f"stepcli-{stepcli.__version__}"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def host_name() -> str:
    return socket.gethostname()


def versions() -> dict[str, str | None]:
    return {"torch_version": torch.__version__, "cuda_version": torch.version.cuda}
