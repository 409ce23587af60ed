"""Tests for downloading MNIST through torchvision, served from a loopback HTTP server."""

from __future__ import annotations

import functools
import gzip
import hashlib
import socket
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torchvision

import stepcli.data
from stepcli.data import DATA_DIR_ENV, MNIST_FILES, DataError, load_mnist

PROXY_VARIABLES = (
    "http_proxy",
    "HTTP_PROXY",
    "https_proxy",
    "HTTPS_PROXY",
    "all_proxy",
    "ALL_PROXY",
)


class QuietHandler(SimpleHTTPRequestHandler):
    requested: list[str]

    def do_GET(self) -> None:
        self.requested.append(self.path)
        super().do_GET()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep urllib from sending the loopback requests to a configured proxy."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def mnist_mirror(tmp_path, idx_files, loopback_only) -> Iterator[tuple[str, list[str]]]:
    """Serve gzipped generated MNIST files on 127.0.0.1 and point torchvision at them.

    Yields the mirror URL and the list of request paths the server received. The
    monkeypatch fixture restores MNIST.mirrors and MNIST.resources after the test.
    """
    served = tmp_path / "served"
    served.mkdir()
    resources = []
    for name, content in idx_files.file_bytes().items():
        compressed = gzip.compress(content)
        (served / f"{name}.gz").write_bytes(compressed)
        resources.append((f"{name}.gz", hashlib.md5(compressed).hexdigest()))

    requested: list[str] = []
    handler = type("MirrorHandler", (QuietHandler,), {"requested": requested})
    server = ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(handler, directory=str(served))
    )
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(torchvision.datasets.MNIST, "mirrors", [url])
            patch.setattr(torchvision.datasets.MNIST, "resources", resources)
            yield url, requested
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _unused_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_download_fetches_into_root(tmp_path, idx_files, mnist_mirror, capsys):
    _, requested = mnist_mirror
    root = tmp_path / "data"

    mnist = load_mnist(root, download=True)

    assert mnist.train_labels.tolist() == idx_files.label_array(idx_files.train_count).tolist()
    assert mnist.test_images.shape == (idx_files.test_count, 784)
    for name in MNIST_FILES:
        assert (root / "MNIST" / "raw" / name).read_bytes() == idx_files.file_bytes()[name]
        assert f"/{name}.gz" in requested
    assert capsys.readouterr().out == ""


def test_download_into_given_raw_folder(tmp_path, idx_files, mnist_mirror):
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)

    mnist = load_mnist(raw, download=True)

    assert mnist.test_labels.shape == (idx_files.test_count,)
    assert sorted(path.name for path in raw.iterdir() if "." not in path.name) == sorted(
        MNIST_FILES
    )
    assert not (raw / "MNIST").exists()


def test_download_skipped_when_files_present(tmp_path, idx_files, mnist_mirror):
    _, requested = mnist_mirror
    idx_files.write_folder(tmp_path / "MNIST" / "raw")

    load_mnist(tmp_path, download=True)

    assert requested == []


def test_download_from_unreachable_mirror(tmp_path, loopback_only, monkeypatch):
    mirror = f"http://127.0.0.1:{_unused_loopback_port()}/"
    monkeypatch.setattr(torchvision.datasets.MNIST, "mirrors", [mirror])
    root = tmp_path / "empty"
    root.mkdir()

    with pytest.raises(DataError) as error:
        load_mnist(root, download=True)

    message = str(error.value)
    assert "\n" not in message
    assert f"MNIST files not found in {root}" in message
    for name in MNIST_FILES:
        assert name in message
    assert f"download into {root / 'MNIST' / 'raw'} failed" in message
    assert mirror in message
    assert "Connection refused" in message
    assert "--data-dir" in message
    assert DATA_DIR_ENV in message


def test_download_from_stalled_mirror(tmp_path, loopback_only, monkeypatch):
    # The kernel completes the TCP handshake for a listening socket, but nothing ever
    # accepts the connection or answers the request.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        mirror = f"http://127.0.0.1:{listener.getsockname()[1]}/"
        monkeypatch.setattr(torchvision.datasets.MNIST, "mirrors", [mirror])
        monkeypatch.setattr(stepcli.data, "_DOWNLOAD_TIMEOUT_S", 0.5)
        root = tmp_path / "empty"

        with pytest.raises(DataError) as error:
            load_mnist(root, download=True)

    message = str(error.value)
    assert "\n" not in message
    assert f"download into {root / 'MNIST' / 'raw'} failed" in message
    assert "timed out" in message
    assert socket.getdefaulttimeout() is None
