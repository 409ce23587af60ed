"""Tests of the training clocks and of host reads in the training loop."""

import logging
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

import stepcli
from stepcli.config import TrainConfig
from stepcli.engine import _batch_sizes, evaluate, train
from stepcli.model import MLP
from stepcli.store import Run, open_store
from stepcli.timing import CpuClock, CudaClock, make_clock

PACKAGE_DIR = str(Path(stepcli.__file__).resolve().parent)

# Tensor methods that copy a value to the host. On CUDA each one waits for the device.
HOST_READS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__")


class FakeTimer:
    """A time source that returns the values it is given, in order."""

    def __init__(self, *times: float) -> None:
        self.times = list(times)

    def __call__(self) -> float:
        return self.times.pop(0)


def test_cpu_clock_marks_and_total():
    clock = CpuClock(timer=FakeTimer(10.0, 11.0, 13.0, 14.0, 20.0, 21.5, 25.0))

    clock.resume()
    clock.mark()
    clock.mark()
    assert clock.pause() == [1.0, 3.0]
    assert clock.total == 4.0

    # The second stretch continues from the first one's total.
    clock.resume()
    clock.mark()
    assert clock.pause() == [5.5]
    assert clock.total == 9.0


def test_cpu_clock_pause_without_resume():
    clock = CpuClock(timer=FakeTimer(1.0, 2.0))
    assert clock.pause() == []
    assert clock.total == 0.0

    clock.resume()
    assert clock.pause() == []
    assert clock.total == 1.0
    # A repeated pause finds the clock stopped and adds nothing.
    assert clock.pause() == []
    assert clock.total == 1.0


def test_make_clock_by_device():
    assert isinstance(make_clock(torch.device("cpu")), CpuClock)
    # Building a CudaClock touches no CUDA API, so this runs without a GPU.
    clock = make_clock(torch.device("cuda"))
    assert isinstance(clock, CudaClock)
    assert clock.total == 0.0
    assert clock.pause() == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_clock_matches_synchronised_timing():
    device = torch.device("cuda")
    a = torch.randn(2048, 2048, device=device)
    clock = CudaClock(device)
    for _ in range(3):
        a @ a
    torch.cuda.synchronize(device)

    started = time.perf_counter()
    clock.resume()
    for _ in range(50):
        a @ a
        clock.mark()
    seconds = clock.pause()
    torch.cuda.synchronize(device)
    synchronised = time.perf_counter() - started

    assert len(seconds) == 50
    assert all(b > a for a, b in zip(seconds, seconds[1:], strict=False))
    assert clock.total == pytest.approx(synchronised, rel=0.05)


@pytest.fixture
def host_reads(monkeypatch):
    """Count the host reads made from stepcli's own code, by method name."""
    counts = Counter()

    def spy(name, original):
        def wrapper(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(PACKAGE_DIR):
                counts[name] += 1
            return original(self, *args, **kwargs)

        return wrapper

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, spy(name, getattr(torch.Tensor, name)))
    return counts


def test_spy_counts_stepcli_reads(host_reads, mnist_cpu):
    torch.ones(1).item()
    assert host_reads["item"] == 0

    evaluate(MLP(), mnist_cpu.test_images[:10], mnist_cpu.test_labels[:10])
    assert host_reads["item"] == 2


@pytest.mark.parametrize("setup", ["1", "3", "4"])
def test_host_reads_independent_of_steps(tmp_path, mnist_cpu, host_reads, setup):
    # 512 and 1024 images at batch 128 give 4 and 8 steps in one epoch, each written in one
    # flush, so every host read left is per flush or per evaluation, and the counts match.
    store = open_store(str(tmp_path / "r.db"))
    counts = []
    for subset_size in (512, 1024):
        config = TrainConfig(
            setup=setup,
            device="cpu",
            epochs=1,
            batch_size=128,
            subset_size=subset_size,
            curvature_every=2,
        )
        host_reads.clear()
        result = train(config, store, mnist_cpu)
        assert result.status == "finished"
        assert result.steps == subset_size // 128
        counts.append(dict(host_reads))

    assert counts[0] == counts[1]
    # The flush reads the losses back once, however many steps it writes.
    assert counts[0]["tolist"] >= 1


@pytest.mark.parametrize(
    ("count", "batch_size", "expected"),
    [(12_000, 256, [256, 224]), (1024, 128, [128]), (100, 256, [100]), (300, 256, [256, 44])],
)
def test_warm_up_batch_sizes(count, batch_size, expected):
    assert _batch_sizes(count, batch_size) == expected


@pytest.mark.parametrize("setup", ["3", "4"])
def test_compile_falls_back_to_eager(tmp_path, mnist_cpu, caplog, setup):
    # Compiled graphs cannot run a second backward through one graph (decay) or a double
    # backward (hvp), so these setups train eagerly and store no compile time.
    store = open_store(str(tmp_path / "r.db"))
    config = TrainConfig(
        setup=setup, device="cpu", epochs=1, batch_size=128, subset_size=512, compile=True
    )
    # The handler goes on the engine's logger itself, because the CLI's logging setup stops
    # "stepcli" records from reaching the root logger that caplog listens on.
    engine_log = logging.getLogger("stepcli.engine")
    engine_log.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger="stepcli.engine"):
            result = train(config, store, mnist_cpu)
    finally:
        engine_log.removeHandler(caplog.handler)

    assert result.status == "finished"
    with store.session() as session:
        assert session.get(Run, result.run_id).compile_seconds is None
    assert f"setup {setup}: --compile ignored" in caplog.text
