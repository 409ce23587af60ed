"""Side-by-side speed measurements of stepcli on MNIST.

    python benchmarks/bench.py --data-dir /path/to/mnist

``--data-dir`` is a torchvision MNIST root (it contains ``MNIST/raw``). Every figure is a
ratio of variants measured in this one process on the same data and model. The variants run
interleaved (A B A B ..., starting at a different variant each round), and each ratio is the
median of the per-round ratios, so a change in machine load affects the variants alike.

Sections, in the order printed (the most important last):

* store: per-step rows written per second through ``write_rows`` in the engine's batch sizes,
  and the seconds ``stepcli report`` takes on a store with 1,000,000 step rows.
* optimizer: ms per training step of setups 2-6 against Adam on the same network, and the
  ms of ``optimizer.step()`` alone.
* script: stepcli against a torchvision ``DataLoader`` loop that calls ``.item()`` each step.
* engine: ``stepcli.engine.train`` (SQLite store, clock, progress) against a bare PyTorch
  loop over the same tensors, model, batch size and Adam.

Other modes:

* ``--device cuda`` adds a comparison of the CUDA-event clock with synchronised host timing.
* ``--setups-table`` trains every setup and control for 2 epochs and prints a markdown table.
* ``--compile-check`` trains setups 1, 2 and 4 with and without ``torch.compile``.
* ``--profile SETUP`` prints a ``torch.profiler`` table of 50 training steps.
"""

from __future__ import annotations

import argparse
import io
import logging
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from stepcli import console
from stepcli.config import TrainConfig
from stepcli.data import MNIST, balanced_subset, epoch_batches, load_mnist
from stepcli.engine import build_optimizer, describe_budget, evaluate, train
from stepcli.model import matched_model, solve_hidden
from stepcli.optim import LearnedStepSize, backward_and_step
from stepcli.setups import MAIN_SETUPS, SETUPS, get_setup
from stepcli.store import create_run, finish_run, open_store, write_rows
from stepcli.timing import CudaClock

SEED = 0
BATCH_SIZE = 256
SUBSET_SIZE = 12_000
HIDDEN = (256,)
ADAM_LR = 1e-3

ENGINE_EPOCHS = 3
"""Epochs per run in the engine-overhead section (47 steps each at the study settings)."""
BLOCK_STEPS = 50
"""Steps per timed block in the optimizer section. A multiple of k = 10, so every block holds
the same number of curvature refreshes."""
STORE_STEP_ROWS = 1_000_000
STORE_RUNS = 50
STORE_EPOCH_STEPS = 400
"""Steps per epoch in the generated store. Each epoch gets one eval row and, for the learned
setups, diagnostics rows."""

# Ratios compare each setup with Adam on a network of the same size, keyed by its fraction of X.
ADAM_OF_FRACTION = {1.0: "1", 0.5: "adam-half", 1 / 3: "adam-third"}
TABLE_SETUPS = (
    *MAIN_SETUPS,
    "sgd",
    "adam-half",
    "adam-third",
    "6-nodecay",
    "2-mu0",
    "3-mu0",
    "4-mu0",
    "5-mu0",
    "6-mu0",
)


SECTIONS = ("store", "optimizer", "script", "engine")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda: no CUDA device is available; run with --device cpu")
    started = time.perf_counter()
    quiet_progress_output()
    print_machine(args)

    data = load_mnist(args.data_dir, download=False, device=device)
    workdir = Path(tempfile.mkdtemp(prefix="stepcli-bench-"))
    try:
        run_sections(args, data, device, workdir)
    finally:
        if args.keep_files:
            print(f"scratch files kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print_footer(started)


def run_sections(
    args: argparse.Namespace, data: MNIST, device: torch.device, workdir: Path
) -> None:
    if args.profile:
        profile_steps(data, device, args.profile)
        return
    if args.setups_table:
        print_setups_table(data, device, args.table_db, args.repeats)
        return
    if args.compile_check:
        compile_check(data, device, workdir)
        return

    results: list[tuple[str, str]] = []
    if device.type == "cuda":
        results += cuda_clock_check(data, device, args.repeats)
    if "store" in args.sections:
        results += store_figures(workdir, args.report_rows)
    if "optimizer" in args.sections:
        results += optimizer_cost(data, device, args.repeats + 2)
    if "script" in args.sections:
        rounds = max(3, args.repeats - 2)
        results += usual_script(data, device, args.data_dir, workdir, rounds)
    if "engine" in args.sections:
        results += engine_overhead(data, device, workdir, args.repeats)

    print()
    print("== ratios (median of the per-round ratios, and their range) ==")
    for label, value in results:
        print(f"{label}: {value}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])

    # What to measure on, and how often.
    parser.add_argument(
        "--data-dir",
        type=Path,
        required=True,
        help="torchvision MNIST root: the folder that contains MNIST/raw",
    )
    parser.add_argument("--device", default="cpu", help="torch device: cpu or cuda")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1, which keeps timings stable when other "
        "processes share the cores: more threads then wait on each other)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=7,
        help="interleaved rounds of the engine comparison (default 7); the optimizer "
        "section runs 2 more, the script section 2 fewer (at least 3)",
    )
    parser.add_argument(
        "--report-rows",
        type=int,
        default=STORE_STEP_ROWS,
        help="step rows in the store that 'stepcli report' reads (default 1000000)",
    )
    parser.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"comma-separated sections to run (default: all of {','.join(SECTIONS)})",
    )
    parser.add_argument(
        "--keep-files", action="store_true", help="keep the scratch stores after the run"
    )

    # Modes that replace the ratio sections.
    parser.add_argument(
        "--setups-table",
        action="store_true",
        help="train every setup and control for 2 epochs and print a markdown table",
    )
    parser.add_argument(
        "--table-db",
        default="/tmp/bench_setups.db",
        help="store for --setups-table (default /tmp/bench_setups.db)",
    )
    parser.add_argument(
        "--compile-check",
        action="store_true",
        help="train setups 1, 2 and 4 for one epoch with and without --compile",
    )
    parser.add_argument(
        "--profile",
        metavar="SETUP",
        help="print a torch.profiler table of 50 training steps of SETUP and exit",
    )

    args = parser.parse_args()
    if args.threads < 1:
        parser.error(f"invalid --threads {args.threads}: must be >= 1")
    if args.repeats < 1:
        parser.error(f"invalid --repeats {args.repeats}: must be >= 1")
    args.sections = [name.strip() for name in args.sections.split(",") if name.strip()]
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown:
        parser.error(f"invalid --sections {','.join(unknown)}: choose from {','.join(SECTIONS)}")
    if args.report_rows < STORE_RUNS:
        parser.error(f"invalid --report-rows {args.report_rows}: must be >= {STORE_RUNS}")
    return args


# Machine and measurement helpers


def print_machine(args: argparse.Namespace) -> None:
    import torchvision

    print(f"command: python {' '.join(sys.argv)}")
    print("== machine ==")
    print(f"cpu: {cpu_model()}")
    print(f"cores: {os.cpu_count()} (usable by this process: {len(os.sched_getaffinity(0))})")
    print(
        f"python {platform.python_version()}, torch {torch.__version__}, torchvision "
        f"{torchvision.__version__}"
    )
    print(f"torch threads: {torch.get_num_threads()}")
    print(
        f"device: {args.device}"
        + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else "")
    )
    print(f"load average at start (1, 5, 15 min): {load()}")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load() -> str:
    return ", ".join(f"{value:.2f}" for value in os.getloadavg())


def print_footer(started: float) -> None:
    print(f"load average at end (1, 5, 15 min): {load()}")
    print(f"total wall time: {time.perf_counter() - started:.1f} s")


def quiet_progress_output() -> None:
    """Send stepcli's progress lines and log records to a non-terminal sink, as in a pipe."""
    from rich.console import Console

    sink = open(os.devnull, "w")  # noqa: SIM115 - kept open for the whole process
    console.stderr = Console(file=sink, soft_wrap=True, width=200)
    console.state["verbosity"] = console.Verbosity.NORMAL
    logger = logging.getLogger("stepcli")
    logger.handlers.clear()
    logger.addHandler(logging.StreamHandler(sink))
    logger.setLevel(logging.INFO)
    logger.propagate = False


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleave(variants: dict[str, Callable[[], Any]], rounds: int) -> dict[str, list[Any]]:
    """Call every variant once per round, starting each round at the next variant."""
    names = list(variants)
    results: dict[str, list[Any]] = {name: [] for name in names}
    for round_index in range(rounds):
        start = round_index % len(names)
        for name in names[start:] + names[:start]:
            results[name].append(variants[name]())
    return results


def median(values: list[float]) -> float:
    return statistics.median(values)


def spread(values: list[float]) -> str:
    """Return the median and the range of ``values`` as text."""
    return f"{median(values):.4g} (range {min(values):.4g}-{max(values):.4g})"


def ratio(numerators: list[float], denominators: list[float], digits: int = 3) -> str:
    """Return the median of the per-round ratios, with their range, as text.

    Within a round the variants run back to back, so a per-round ratio compares them under
    nearly the same machine load.
    """
    ratios = [n / d for n, d in zip(numerators, denominators, strict=True)]
    return f"{median(ratios):.{digits}f} (rounds {min(ratios):.{digits}f}-{max(ratios):.{digits}f})"


def subset_tensors(data: MNIST, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the engine's class-balanced training subset for ``SEED`` on ``device``."""
    subset = balanced_subset(data.train_labels.cpu(), SUBSET_SIZE, SEED).to(device)
    return data.train_images[subset], data.train_labels[subset]


def study_config(setup: str, device: torch.device, epochs: int) -> TrainConfig:
    return TrainConfig(
        setup=setup,
        device=str(device),
        epochs=epochs,
        batch_size=BATCH_SIZE,
        subset_size=SUBSET_SIZE,
        seed=SEED,
    )


def engine_run(data: MNIST, device: torch.device, db_path: Path, epochs: int) -> dict[str, float]:
    """Train setup 1 through the engine with progress on; return its timings and step count."""
    store = open_store(str(db_path))
    progress = console.RichProgress()
    started = time.perf_counter()
    result = train(study_config("1", device, epochs), store, data, progress=progress)
    wall = time.perf_counter() - started
    store.dispose()
    if result.status != "finished":
        raise RuntimeError(f"engine run {result.run_id} ended {result.status}")
    return {"wall": wall, "train": result.train_seconds, "steps": result.steps}


# 1. Engine overhead


def bare_loop(
    images: torch.Tensor,
    labels: torch.Tensor,
    device: torch.device,
    epochs: int,
    test_set: tuple[torch.Tensor, torch.Tensor] | None = None,
    index_select: bool = True,
) -> tuple[float, int]:
    """Train like the engine with nothing around the steps; return the seconds and steps.

    With ``test_set``, the model is also evaluated like the engine does (on the training
    subset and the test set, before the first epoch and after each one), outside the timer.
    Batches are gathered with ``index_select`` like the engine does, or with
    ``images[batch]`` when ``index_select`` is false.
    """
    model = matched_model(HIDDEN, HIDDEN, SEED).to(device)
    if device.type == "cuda":
        optimizer = torch.optim.Adam(model.parameters(), lr=ADAM_LR, fused=True)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=ADAM_LR, foreach=True)
    # The same untimed forward and backward pass the engine makes before its clock starts.
    model(images[:BATCH_SIZE]).sum().backward()
    optimizer.zero_grad(set_to_none=True)

    def evaluate_outside_timer() -> None:
        if test_set is not None:
            evaluate(model, images, labels)
            evaluate(model, *test_set)

    evaluate_outside_timer()
    synchronize(device)
    seconds = 0.0
    steps = 0
    for epoch in range(1, epochs + 1):
        started = time.perf_counter()
        for batch in epoch_batches(images.shape[0], BATCH_SIZE, SEED, epoch, device):
            if index_select:
                inputs, targets = images.index_select(0, batch), labels.index_select(0, batch)
            else:
                inputs, targets = images[batch], labels[batch]
            loss = F.cross_entropy(model(inputs), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
        synchronize(device)
        seconds += time.perf_counter() - started
        evaluate_outside_timer()
    return seconds, steps


def engine_overhead(
    data: MNIST, device: torch.device, workdir: Path, rounds: int
) -> list[tuple[str, str]]:
    print(f"\n== engine overhead: setup 1, {ENGINE_EPOCHS} epochs, {rounds} rounds ==")
    images, labels = subset_tensors(data, device)
    test_set = (data.test_images, data.test_labels)
    db_path = workdir / "engine.db"
    # One untimed run of each pays lazy loading and first-call costs.
    bare_loop(images, labels, device, 1)
    engine_run(data, device, db_path, 1)

    def bare() -> dict[str, float]:
        seconds, steps = bare_loop(images, labels, device, ENGINE_EPOCHS)
        return {"wall": seconds, "steps": steps}

    def bare_with_evaluations() -> dict[str, float]:
        seconds, steps = bare_loop(images, labels, device, ENGINE_EPOCHS, test_set)
        return {"wall": seconds, "steps": steps}

    def bare_with_indexing() -> dict[str, float]:
        seconds, steps = bare_loop(images, labels, device, ENGINE_EPOCHS, index_select=False)
        return {"wall": seconds, "steps": steps}

    def engine() -> dict[str, float]:
        return engine_run(data, device, db_path, ENGINE_EPOCHS)

    runs = interleave(
        {
            "bare": bare,
            "engine": engine,
            "bare_eval": bare_with_evaluations,
            "bare_indexing": bare_with_indexing,
        },
        rounds,
    )
    steps = runs["bare"][0]["steps"]
    if runs["engine"][0]["steps"] != steps:
        raise RuntimeError("the engine and the bare loop took different numbers of steps")
    bare_seconds = [r["wall"] for r in runs["bare"]]
    bare_eval_seconds = [r["wall"] for r in runs["bare_eval"]]
    bare_indexing_seconds = [r["wall"] for r in runs["bare_indexing"]]
    train_seconds = [r["train"] for r in runs["engine"]]
    wall_seconds = [r["wall"] for r in runs["engine"]]
    print(f"steps per run: {steps}")
    print(f"bare loop, seconds: {spread(bare_seconds)}")
    print(f"bare loop evaluating between epochs, step seconds: {spread(bare_eval_seconds)}")
    print(f"bare loop gathering with images[batch], seconds: {spread(bare_indexing_seconds)}")
    print(f"engine train_seconds (steps only): {spread(train_seconds)}")
    print(
        f"engine wall seconds (train() call: evaluations, store writes, setup): "
        f"{spread(wall_seconds)}"
    )
    print(f"bare loop steps/s: {steps / median(bare_seconds):.1f}")
    print(f"engine steps/s (train_seconds): {steps / median(train_seconds):.1f}")
    print(f"load average: {load()}")

    return [
        (
            "engine end to end / bare loop steps/s (evaluates the 12000-image subset and the "
            f"10000 test images {ENGINE_EPOCHS + 1} times, writes the store)",
            ratio(bare_seconds, wall_seconds),
        ),
        (
            "engine training steps / bare loop gathering batches with images[batch], steps/s",
            ratio(bare_indexing_seconds, train_seconds),
        ),
        (
            "engine training steps / bare loop that also evaluates between epochs, steps/s",
            ratio(bare_eval_seconds, train_seconds),
        ),
        (
            "engine training steps / bare loop steps/s (train_seconds, no evaluation, same "
            "gather; goal >= 0.95)",
            ratio(bare_seconds, train_seconds),
        ),
    ]


# 2. Against the usual script


def usual_script_epoch(data_dir: Path, device: torch.device) -> dict[str, float]:
    """Train one epoch the way a typical MNIST script does; return its timings."""
    from torch.utils.data import DataLoader, Subset
    from torchvision import datasets, transforms

    started = time.perf_counter()
    transform = transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))]
    )
    dataset = datasets.MNIST(str(data_dir), train=True, download=False, transform=transform)
    indices = balanced_subset(dataset.targets, SUBSET_SIZE, SEED).tolist()
    generator = torch.Generator().manual_seed(SEED)
    loader = DataLoader(
        Subset(dataset, indices), batch_size=BATCH_SIZE, shuffle=True, generator=generator
    )
    model = matched_model(HIDDEN, HIDDEN, SEED).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=ADAM_LR)
    loop_started = time.perf_counter()

    running_loss = 0.0
    steps = 0
    for inputs, targets in loader:
        inputs, targets = inputs.to(device), targets.to(device)
        optimizer.zero_grad()
        loss = F.cross_entropy(model(inputs.view(inputs.shape[0], -1)), targets)
        loss.backward()
        optimizer.step()
        running_loss += loss.item()
        steps += 1
    ended = time.perf_counter()
    return {"setup": loop_started - started, "loop": ended - loop_started, "steps": steps}


def usual_script(
    data: MNIST, device: torch.device, data_dir: Path, workdir: Path, rounds: int
) -> list[tuple[str, str]]:
    print(f"\n== against the usual script: setup 1, 1 epoch, {rounds} rounds ==")
    if not (data_dir / "MNIST" / "raw").is_dir():
        print(f"skipped: {data_dir} has no MNIST/raw folder for torchvision.datasets.MNIST")
        return [("usual script / stepcli", "skipped: --data-dir is not a torchvision root")]
    images, labels = subset_tensors(data, device)
    db_path = workdir / "script.db"
    usual_script_epoch(data_dir, device)
    engine_run(data, device, db_path, 1)

    def load_data_seconds() -> float:
        started = time.perf_counter()
        load_mnist(data_dir, download=False, device=device)
        return time.perf_counter() - started

    def bare() -> float:
        return bare_loop(images, labels, device, 1)[0]

    runs = interleave(
        {
            "usual": lambda: usual_script_epoch(data_dir, device),
            "stepcli": lambda: engine_run(data, device, db_path, 1),
            "load": load_data_seconds,
            "bare": bare,
        },
        rounds,
    )
    usual_loop = [r["loop"] for r in runs["usual"]]
    usual_total = [r["setup"] + r["loop"] for r in runs["usual"]]
    stepcli_train = [r["train"] for r in runs["stepcli"]]
    stepcli_total = [r["wall"] + s for r, s in zip(runs["stepcli"], runs["load"], strict=True)]
    print(
        f"steps per epoch: usual script {runs['usual'][0]['steps']}, "
        f"stepcli {runs['stepcli'][0]['steps']}"
    )
    print(
        f"usual script, dataset and loader setup seconds: "
        f"{spread([r['setup'] for r in runs['usual']])}"
    )
    print(f"usual script, epoch loop seconds: {spread(usual_loop)}")
    print(f"stepcli load_mnist seconds: {spread(runs['load'])}")
    print(f"stepcli train_seconds: {spread(stepcli_train)}")
    print(
        f"stepcli train() wall seconds (2 evaluations, store writes): "
        f"{spread([r['wall'] for r in runs['stepcli']])}"
    )
    print(f"bare loop seconds: {spread(runs['bare'])}")
    print(f"load average: {load()}")
    return [
        (
            "usual script / bare loop, epoch loop seconds",
            ratio(usual_loop, runs["bare"], 1),
        ),
        (
            "usual script / stepcli, end to end (data loading + 1 epoch; stepcli also "
            "evaluates twice and writes the store)",
            ratio(usual_total, stepcli_total, 1),
        ),
        (
            "usual script / stepcli, training steps of 1 epoch (goal >= 10x)",
            ratio(usual_loop, stepcli_train, 1),
        ),
    ]


# 3. Optimizer cost


class StepBlock:
    """Training steps of one setup through the engine's per-step code, timed in blocks."""

    def __init__(
        self,
        setup: str,
        images: torch.Tensor,
        labels: torch.Tensor,
        device: torch.device,
        fused_adam: bool = False,
    ) -> None:
        spec = get_setup(setup)
        config = study_config(setup, device, 1).resolved()
        hidden = solve_hidden(HIDDEN, spec.fraction)
        self.model = matched_model(HIDDEN, hidden, SEED).to(device)
        self.params = list(self.model.parameters())
        if fused_adam:
            self.optimizer = torch.optim.Adam(self.params, lr=config.lr, fused=True)
            self.kernel = "fused"
        else:
            self.optimizer, self.kernel = build_optimizer(spec, self.params, config, device)
        self.generator = torch.Generator(device=device).manual_seed(SEED)
        self.images, self.labels, self.device = images, labels, device
        self.batches = epoch_batches(images.shape[0], BATCH_SIZE, SEED, 1, device)
        # Drop the smaller last batch so that every step costs the same.
        self.batches = [b for b in self.batches if b.shape[0] == BATCH_SIZE]
        self.position = 0
        self.run(20)

    def step(self) -> None:
        """Take one step with no synchronisation, as the engine's loop does."""
        batch = self.batches[self.position % len(self.batches)]
        self.position += 1
        logits = self.model(self.images.index_select(0, batch))
        loss = F.cross_entropy(logits, self.labels.index_select(0, batch))
        backward_and_step(self.optimizer, self.params, loss, logits, generator=self.generator)

    def run(self, steps: int) -> float:
        """Take ``steps`` steps; return the mean milliseconds per step."""
        synchronize(self.device)
        started = time.perf_counter()
        for _ in range(steps):
            self.step()
        synchronize(self.device)
        return (time.perf_counter() - started) / steps * 1e3


def optimizer_cost(data: MNIST, device: torch.device, rounds: int) -> list[tuple[str, str]]:
    print(f"\n== optimizer cost: blocks of {BLOCK_STEPS} steps, {rounds} rounds ==")
    images, labels = subset_tensors(data, device)
    names = ["1", "2", "3", "adam-half", "4", "5", "adam-third", "6"]
    blocks = {name: StepBlock(name, images, labels, device) for name in names}
    if device.type == "cpu":
        # For reference: torch's fused CPU Adam, which stepcli does not use on the CPU.
        for name in ("1", "adam-half", "adam-third"):
            blocks[f"{name} fused"] = StepBlock(name, images, labels, device, fused_adam=True)
    times = interleave(
        {name: lambda b=block: b.run(BLOCK_STEPS) for name, block in blocks.items()}, rounds
    )
    for name, block in blocks.items():
        print(f"setup {name:16s} {block.kernel:13s} ms/step {spread(times[name])}")
    optimizer_steps_only(device, rounds)
    print(f"load average: {load()}")

    goals = {"2": 1.15, "3": 1.25, "4": 2.3, "5": 1.15, "6": 1.25}
    results = []
    for setup, goal in goals.items():
        adam = ADAM_OF_FRACTION[get_setup(setup).fraction]
        text = f"{ratio(times[setup], times[adam])}, goal <= {goal}"
        fused = f"{adam} fused"
        if fused in times:
            text += f"; against fused Adam {ratio(times[setup], times[fused])}"
        results.append(
            (
                f"optimizer cost, setup {setup} / setup {adam} (Adam, "
                f"{blocks[adam].kernel}) ms per step",
                text,
            )
        )
    return results


def optimizer_steps_only(device: torch.device, rounds: int) -> None:
    """Print the ms of ``optimizer.step()`` alone on the X network's shapes, gradients given."""
    generator = torch.Generator().manual_seed(SEED)
    shapes = [tuple(p.shape) for p in matched_model(HIDDEN, HIDDEN, SEED).parameters()]

    def tensors(scale: float) -> list[torch.Tensor]:
        return [(scale * torch.randn(shape, generator=generator)).to(device) for shape in shapes]

    def variant(kind: str) -> Callable[[], float]:
        params = [torch.nn.Parameter(t) for t in tensors(0.05)]
        for p, grad in zip(params, tensors(0.01), strict=True):
            p.grad = grad
        if kind.startswith("adam"):
            optimizer = torch.optim.Adam(params, lr=ADAM_LR, **{kind.split()[1]: True})
        else:
            optimizer = LearnedStepSize(params, trace=kind)
        products = tensors(0.01)

        def run() -> float:
            synchronize(device)
            started = time.perf_counter()
            for _ in range(BLOCK_STEPS):
                if kind == "hvp":
                    optimizer.step(hvp=products)
                    continue
                if kind == "decay" and optimizer.curvature_due():
                    optimizer.update_curvature(products, batch_size=BATCH_SIZE)
                optimizer.step()
            synchronize(device)
            return (time.perf_counter() - started) / BLOCK_STEPS * 1e3

        run()
        return run

    kinds = ["adam foreach", "adam fused", "gradient", "decay", "hvp"]
    times = interleave({kind: variant(kind) for kind in kinds}, rounds)
    print(f"optimizer.step() alone, X network ({sum(math.prod(s) for s in shapes)} weights):")
    for kind in kinds:
        print(f"  {kind:13s} ms/step {spread(times[kind])}")


def profile_steps(data: MNIST, device: torch.device, setup: str) -> None:
    from torch.profiler import ProfilerActivity, profile

    images, labels = subset_tensors(data, device)
    block = StepBlock(setup, images, labels, device)
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as profiler:
        block.run(BLOCK_STEPS)
    print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))


# 4. Store


def run_fields(setup: str, seed: int) -> dict[str, Any]:
    """Return the run fields the engine stores, for a synthetic run of ``setup``."""
    spec = get_setup(setup)
    hidden, budget = describe_budget(spec, HIDDEN)
    return {
        "setup": spec.name,
        "optimizer": f"learned-{spec.trace}" if spec.learned else spec.optimizer,
        "optimizer_impl": "foreach",
        "hparams": study_config(setup, torch.device("cpu"), 50).resolved().record(),
        "config_key": f"synthetic-{setup}-{seed}",
        "seed": seed,
        "hidden": list(hidden),
        "network_params": budget.network,
        "step_size_params": budget.step_sizes,
        "decay_params": budget.decays,
        "budget_params": budget.total,
        "auxiliary_state": budget.auxiliary,
        "device": "cpu",
        "torch_version": torch.__version__,
    }


def step_rows(first: int, count: int, seconds_per_step: float) -> list[dict[str, Any]]:
    rows = []
    for step in range(first, first + count):
        loss = 2.3 * math.exp(-step / 3000) + 0.05 + 0.02 * math.sin(step)
        rows.append(
            {
                "step": step,
                "epoch": (step - 1) // STORE_EPOCH_STEPS + 1,
                "loss": loss,
                "seconds": step * seconds_per_step,
            }
        )
    return rows


def write_throughput(store: Any, batch: int, calls: int) -> float:
    """Write ``calls`` batches of ``batch`` step rows like the engine; return rows per second."""
    run_id = create_run(store, **run_fields("1", 10_000 + batch))
    started = time.perf_counter()
    for call in range(calls):
        rows = step_rows(call * batch + 1, batch, 0.003)
        write_rows(
            store,
            run_id,
            steps=rows,
            run_fields={"steps_done": rows[-1]["step"], "train_seconds": rows[-1]["seconds"]},
        )
    return batch * calls / (time.perf_counter() - started)


def generate_store(store: Any, total_rows: int) -> float:
    """Fill ``store`` with finished runs of ``total_rows`` step rows; return the seconds."""
    steps_per_run = total_rows // STORE_RUNS
    started = time.perf_counter()
    for index in range(STORE_RUNS):
        setup = MAIN_SETUPS[index % len(MAIN_SETUPS)]
        seed = index // len(MAIN_SETUPS)
        run_id = create_run(store, kind="train", **run_fields(setup, seed))
        epochs = math.ceil(steps_per_run / STORE_EPOCH_STEPS)
        evals = [
            {
                "epoch": epoch,
                "step": min(epoch * STORE_EPOCH_STEPS, steps_per_run),
                "seconds": epoch * 1.2,
                "train_loss": 2.3 / (1 + epoch),
                "test_loss": 2.3 / (1 + epoch),
                "test_accuracy": 1 - 0.9 / (1 + epoch),
            }
            for epoch in range(epochs + 1)
        ]
        diagnostics = []
        if get_setup(setup).learned:
            diagnostics = [
                {
                    "epoch": epoch,
                    "layer": layer,
                    "quantity": "step_size",
                    "q05": 0.01,
                    "q25": 0.05,
                    "q50": 0.1,
                    "q75": 0.2,
                    "q95": 0.5,
                    "frac_at_min": 0.0,
                    "frac_at_max": 0.0,
                }
                for epoch in range(1, epochs + 1)
                for layer in (
                    "layers.0.weight",
                    "layers.0.bias",
                    "layers.1.weight",
                    "layers.1.bias",
                )
            ]
        write_rows(
            store,
            run_id,
            steps=step_rows(1, steps_per_run, 0.003),
            evals=evals,
            diagnostics=diagnostics,
        )
        finish_run(
            store,
            run_id,
            "finished",
            steps_done=steps_per_run,
            train_seconds=steps_per_run * 0.003,
            final_train_loss=0.06,
            final_eval_loss=0.06,
            final_test_loss=0.08,
            test_accuracy=0.97,
        )
    return time.perf_counter() - started


def cli_seconds(*args: str) -> float:
    """Run ``python -m stepcli ARGS``; return its wall seconds or raise with its stderr."""
    started = time.perf_counter()
    process = subprocess.run(
        [sys.executable, "-m", "stepcli", *args], capture_output=True, text=True, timeout=600
    )
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        raise RuntimeError(f"stepcli {' '.join(args)} failed: {process.stderr.strip()[-500:]}")
    return seconds


def store_figures(workdir: Path, total_rows: int) -> list[tuple[str, str]]:
    print("\n== store ==")
    store = open_store(str(workdir / "writes.db"))
    throughput = {}
    # At the study settings the engine writes 47 rows (one epoch) per call. 200 is its
    # flush_every, the largest batch it writes.
    for batch, calls in ((47, 200), (200, 60)):
        throughput[batch] = write_throughput(store, batch, calls)
        print(
            f"write_rows, {calls} calls of {batch} step rows: {throughput[batch]:,.0f} rows/s, "
            f"{batch / throughput[batch] * 1e3:.2f} ms per call"
        )
    store.dispose()

    db_path = workdir / "report.db"
    store = open_store(str(db_path))
    generate_seconds = generate_store(store, total_rows)
    store.dispose()
    rows = total_rows // STORE_RUNS * STORE_RUNS
    print(
        f"generated {rows:,} step rows in {STORE_RUNS} runs: {generate_seconds:.1f} s "
        f"({rows / generate_seconds:,.0f} rows/s), file {db_path.stat().st_size / 1e6:.0f} MB"
    )

    startup = cli_seconds("--version")
    out = workdir / "report-out"
    report = cli_seconds("report", "--db", str(db_path), "--out", str(out), "--table-format", "csv")
    print(f"stepcli --version (interpreter and import): {startup:.2f} s")
    print(
        f"stepcli report on {rows:,} step rows: {report:.2f} s "
        f"({len(list(out.iterdir()))} files written)"
    )
    print(f"load average: {load()}")
    return [
        (
            "store write_rows, rows/s at 47 / 200 rows per call",
            f"{throughput[47]:,.0f} / {throughput[200]:,.0f}",
        ),
        (f"stepcli report on {rows:,} step rows, seconds (goal <= 5)", f"{report:.2f}"),
    ]


# GPU clock check


def cuda_clock_check(data: MNIST, device: torch.device, rounds: int) -> list[tuple[str, str]]:
    """Time the same steps with CUDA events and with host timing around synchronisations."""
    print(f"\n== CUDA clock: {BLOCK_STEPS}-step stretches of setup 1, {rounds} rounds ==")
    images, labels = subset_tensors(data, device)
    block = StepBlock("1", images, labels, device)
    event_totals, synchronised_totals, per_step_totals = [], [], []
    for _ in range(rounds):
        clock = CudaClock(device)
        torch.cuda.synchronize(device)
        started = time.perf_counter()
        clock.resume()
        for _ in range(BLOCK_STEPS):
            block.step()
            clock.mark()
        marks = clock.pause()
        torch.cuda.synchronize(device)
        synchronised_totals.append(time.perf_counter() - started)
        event_totals.append(clock.total)
        if len(marks) != BLOCK_STEPS:
            raise RuntimeError(f"CudaClock returned {len(marks)} marks for {BLOCK_STEPS} steps")

        total = 0.0
        for _ in range(BLOCK_STEPS):
            total += block.run(1) / 1e3
        per_step_totals.append(total)
    print(f"event clock seconds: {spread(event_totals)}")
    print(f"host seconds, synchronised before and after: {spread(synchronised_totals)}")
    print(f"host seconds, synchronised after every step: {spread(per_step_totals)}")
    return [
        (
            "CUDA event clock / host timing synchronised around the stretch (goal within 5%)",
            ratio(event_totals, synchronised_totals),
        ),
        (
            "CUDA event clock / host timing synchronised after every step",
            ratio(event_totals, per_step_totals),
        ),
    ]


# Optional sections


def print_setups_table(data: MNIST, device: torch.device, db: str, rounds: int) -> None:
    """Train every setup and control for 2 epochs into ``db`` and print a markdown table.

    Losses and accuracy come from the stored runs. The ms per step come from interleaved
    blocks of steps, as in the optimizer section, because runs trained one after another
    see different machine load.
    """
    from sqlalchemy import select

    from stepcli.store import Eval, Run

    print(f"\n== setups table: {len(TABLE_SETUPS)} runs of 2 epochs into {db} ==")
    print(f"ms per step: median of {rounds} interleaved rounds of {BLOCK_STEPS}-step blocks")
    store = open_store(db)
    run_ids = {}
    for setup in TABLE_SETUPS:
        result = train(study_config(setup, device, 2), store, data)
        run_ids[setup] = result.run_id
        print(f"setup {setup}: run {result.run_id} {result.status}, load {load()}")

    with store.session() as session:
        runs = {setup: session.get(Run, run_id) for setup, run_id in run_ids.items()}
        evals = {
            setup: session.scalars(
                select(Eval).where(Eval.run_id == run_id).order_by(Eval.epoch)
            ).all()
            for setup, run_id in run_ids.items()
        }
    images, labels = subset_tensors(data, device)
    blocks = {setup: StepBlock(setup, images, labels, device) for setup in TABLE_SETUPS}
    times = interleave(
        {name: lambda b=block: b.run(BLOCK_STEPS) for name, block in blocks.items()}, rounds
    )
    ms_per_step = {setup: median(values) for setup, values in times.items()}

    print()
    print(
        "| setup | network | status | initial loss | final loss | loss lowered | "
        "test accuracy | ms/step | ms/step vs Adam on same network |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for setup in TABLE_SETUPS:
        run = runs[setup]
        spec = SETUPS[setup]
        adam = ADAM_OF_FRACTION[spec.fraction]
        first, last = evals[setup][0], evals[setup][-1]
        relative = ratio(times[setup], times[adam], 2).split()[0]
        print(
            f"| {setup} | {list(run.hidden)} | {run.status} | {first.train_loss:.4f} | "
            f"{last.train_loss:.4f} | {'yes' if last.train_loss < first.train_loss else 'no'} | "
            f"{last.test_accuracy:.4f} | {ms_per_step[setup]:.2f} | {relative} ({adam}) |"
        )
    store.dispose()


def compile_check(data: MNIST, device: torch.device, workdir: Path) -> None:
    """Train setups 1, 2 and 4 for one epoch eagerly and compiled; print the timings."""
    from dataclasses import replace

    print("\n== --compile check: setups 1, 2 and 4, 1 epoch each ==")
    store = open_store(str(workdir / "compile.db"))
    warnings = io.StringIO()
    handler = logging.StreamHandler(warnings)
    logging.getLogger("stepcli").addHandler(handler)
    for setup in ("1", "2", "4"):
        for compiled in (False, True):
            config = replace(study_config(setup, device, 1), compile=compiled)
            started = time.perf_counter()
            result = train(config, store, data)
            wall = time.perf_counter() - started
            with store.session() as session:
                from stepcli.store import Run

                compile_seconds = session.get(Run, result.run_id).compile_seconds
            print(
                f"setup {setup} compile={compiled}: {result.status}, train_seconds "
                f"{result.train_seconds:.2f}, compile_seconds {compile_seconds}, wall {wall:.1f}"
            )
    logging.getLogger("stepcli").removeHandler(handler)
    for line in warnings.getvalue().splitlines():
        if "compile" in line:
            print(f"warning: {line}")
    store.dispose()


if __name__ == "__main__":
    main()
