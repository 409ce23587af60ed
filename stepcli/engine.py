"""The training loop: one run of one setup, with its rows written to the store.

``train`` reads top to bottom: build the network and optimizer, take the subset, then for each
epoch run the steps, pause the clock, write the rows, check for divergence and evaluate.
Training seconds exclude evaluation and store writes. Losses stay on the device until a flush,
so on CUDA no step waits for the host.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from stepcli.config import DIVERGENCE_LOSS, TrainConfig
from stepcli.data import MNIST, balanced_subset, epoch_batches, split_validation
from stepcli.model import MLP, count_params, matched_model, solve_hidden
from stepcli.optim import LearnedStepSize, backward_and_step
from stepcli.provenance import device_name, git_revision, host_name, versions
from stepcli.setups import Setup
from stepcli.store import Store
from stepcli.store.sink import StoreSink
from stepcli.timing import make_clock

log = logging.getLogger(__name__)

EVAL_BATCH = 8192
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


class Progress(Protocol):
    """Progress callbacks that the engine calls while it trains; the CLI draws them."""

    def start(self, run_id: int, title: str, total_steps: int) -> None: ...

    def advance(self, step: int) -> None: ...

    def stats(self, loss: float, steps_per_second: float) -> None: ...

    def finish(self, status: str) -> None: ...


class NullProgress:
    def start(self, run_id: int, title: str, total_steps: int) -> None:
        pass

    def advance(self, step: int) -> None:
        pass

    def stats(self, loss: float, steps_per_second: float) -> None:
        pass

    def finish(self, status: str) -> None:
        pass


@dataclass
class Budget:
    """Parameter counts of one run; the first three add up to the counted budget."""

    network: int
    step_sizes: int
    decays: int
    auxiliary: int

    @property
    def total(self) -> int:
        return self.network + self.step_sizes + self.decays


@dataclass
class RunResult:
    run_id: int
    setup: str
    seed: int
    status: str
    steps: int
    hparams: dict[str, Any]
    final_train_loss: float | None = None
    final_eval_loss: float | None = None
    final_val_loss: float | None = None
    final_test_loss: float | None = None
    test_accuracy: float | None = None
    train_seconds: float | None = None
    diverged_step: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def build_optimizer(
    spec: Setup, params: list[torch.nn.Parameter], config: TrainConfig, device: torch.device
) -> tuple[torch.optim.Optimizer, str]:
    """Return the setup's optimizer and the name of the kernel it runs."""
    if spec.optimizer == "adam":
        if device.type == "cuda":
            optimizer = torch.optim.Adam(
                params, lr=config.lr, betas=(0.9, 0.999), eps=1e-8, fused=True
            )
            return optimizer, "fused"
        optimizer = torch.optim.Adam(
            params, lr=config.lr, betas=(0.9, 0.999), eps=1e-8, foreach=True
        )
        return optimizer, "foreach"
    if spec.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, foreach=True), "foreach"
    optimizer = LearnedStepSize(
        params,
        alpha0=config.alpha0,
        meta_lr=config.meta_lr,
        alpha_min=config.alpha_min,
        alpha_max=config.alpha_max,
        gamma=config.gamma,
        trace=spec.trace,
        curvature_every=config.curvature_every,
        curvature=config.curvature,
    )
    return optimizer, optimizer.implementation


def budget_of(spec: Setup, model: MLP, optimizer: torch.optim.Optimizer) -> Budget:
    network = count_params(model.hidden)
    if isinstance(optimizer, LearnedStepSize):
        counts = optimizer.budget()
        return Budget(network, counts["step_sizes"], counts["decays"], counts["auxiliary"])
    # Adam keeps two moments per weight; plain SGD keeps nothing.
    auxiliary = 2 * network if spec.optimizer == "adam" else 0
    return Budget(network, 0, 0, auxiliary)


def describe_budget(spec: Setup, hidden_full: tuple[int, ...]) -> tuple[tuple[int, ...], Budget]:
    """Return the hidden widths and the counted budget of ``spec`` without building anything."""
    hidden = solve_hidden(hidden_full, spec.fraction)
    network = count_params(hidden)
    step_sizes = network if spec.learned else 0
    decays = network if spec.has_decays else 0
    # Adam keeps two moments per weight, the learned optimizer a trace and a meta-momentum.
    auxiliary = 2 * network if spec.optimizer == "adam" or spec.learned else 0
    return hidden, Budget(network, step_sizes, decays, auxiliary)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor
) -> tuple[float, float]:
    """Return the mean cross-entropy and the accuracy of ``model`` on a whole split."""
    if images.shape[0] == 0:
        return math.nan, math.nan
    loss_sum = torch.zeros((), device=images.device, dtype=torch.float64)
    correct = torch.zeros((), device=images.device, dtype=torch.int64)
    for start in range(0, images.shape[0], EVAL_BATCH):
        logits = model(images[start : start + EVAL_BATCH])
        target = labels[start : start + EVAL_BATCH]
        loss_sum += F.cross_entropy(logits, target, reduction="sum").double()
        correct += (logits.argmax(dim=1) == target).sum()
    count = images.shape[0]
    return loss_sum.item() / count, correct.item() / count


def diagnostic_rows(
    optimizer: torch.optim.Optimizer, names: list[str], epoch: int
) -> list[dict[str, Any]]:
    """Turn the optimizer's per-tensor quantiles into store rows for ``epoch``."""
    if not isinstance(optimizer, LearnedStepSize):
        return []
    rows = []
    for entry in optimizer.diagnostics(QUANTILES):
        quantiles = entry["quantiles"]
        rows.append(
            {
                "epoch": epoch,
                "layer": names[entry["param_index"]],
                "quantity": entry["quantity"],
                **{f"q{round(q * 100):02d}": float(quantiles[q]) for q in QUANTILES},
                "frac_at_min": entry.get("frac_at_min"),
                "frac_at_max": entry.get("frac_at_max"),
            }
        )
    return rows


def _first_divergence(losses: torch.Tensor) -> int | None:
    bad = ~torch.isfinite(losses) | (losses > DIVERGENCE_LOSS)
    if not bool(bad.any()):
        return None
    return int(bad.nonzero()[0, 0])


def train(
    config: TrainConfig,
    store: Store | Any,
    data: MNIST,
    *,
    progress: Progress | None = None,
    run_fields: dict[str, Any] | None = None,
) -> RunResult:
    """Train one run of ``config`` on ``data`` and store it; return its final metrics.

    ``store`` is a ``Store`` or a sink with ``create_run``, ``write_rows`` and ``finish_run``
    (see ``stepcli.store.sink``).

    ``KeyboardInterrupt`` marks the run ``interrupted`` and is re-raised after its rows are
    written. Any other exception marks it ``failed`` and is re-raised.
    """
    config = config.resolved()
    config.validate()
    spec = config.spec
    progress = progress or NullProgress()
    device = torch.device(config.device)

    # Network, optimizer and budget. Every setup starts from the same draws for this seed.
    hidden = solve_hidden(config.hidden, spec.fraction)
    model = matched_model(config.hidden, hidden, config.seed).to(device)
    names = [name for name, _ in model.named_parameters()]
    params = list(model.parameters())
    optimizer, implementation = build_optimizer(spec, params, config, device)
    budget = budget_of(spec, model, optimizer)
    # Untimed forward and backward passes (no update), one per batch size the epochs use, pay
    # one-time costs such as kernel selection, lazy library loading and, with --compile,
    # compilation before the clock starts. A compiled forward compiles again for the last,
    # smaller batch of an epoch, so that batch size is warmed up too.
    forward = _compiled_forward(model, spec) if config.compile else model
    train_count = config.subset_size or data.train_images.shape[0]
    warm_up_seconds = sum(
        _warm_up(forward, data.train_images[:size])
        for size in _batch_sizes(train_count, config.batch_size)
    )
    compile_seconds = warm_up_seconds if forward is not model else None

    # Data: a class-balanced subset, and optionally a validation split held out of the rest.
    train_labels_cpu = data.train_labels.cpu()
    if config.subset_size is None:
        subset = torch.arange(train_labels_cpu.shape[0], device=device)
    else:
        subset = balanced_subset(train_labels_cpu, config.subset_size, config.seed).to(device)
    images, labels = data.train_images[subset], data.train_labels[subset]
    val_images = val_labels = None
    if config.val_size:
        val_index = split_validation(train_labels_cpu, subset.cpu(), config.val_size, config.seed)
        val_images = data.train_images[val_index.to(device)]
        val_labels = data.train_labels[val_index.to(device)]
    sample_generator = torch.Generator(device=device)
    sample_generator.manual_seed(config.seed)

    sink = StoreSink(store) if isinstance(store, Store) else store
    run_id = sink.create_run(
        setup=spec.name,
        optimizer=spec.optimizer if not spec.learned else f"learned-{spec.trace}",
        optimizer_impl=implementation,
        hparams=config.record(),
        config_key=config.key(),
        seed=config.seed,
        hidden=list(hidden),
        network_params=budget.network,
        step_size_params=budget.step_sizes,
        decay_params=budget.decays,
        budget_params=budget.total,
        auxiliary_state=budget.auxiliary,
        device=device_name(device),
        git_revision=git_revision(),
        host=host_name(),
        pid=os.getpid(),
        compile_seconds=compile_seconds,
        **versions(),
        **(run_fields or {}),
    )
    result = RunResult(run_id, spec.name, config.seed, "running", 0, config.optimizer_hparams())
    steps_per_epoch = math.ceil(images.shape[0] / config.batch_size)
    progress.start(run_id, f"setup {spec.name} seed {config.seed}", steps_per_epoch * config.epochs)
    log.debug(
        "run %d: setup %s, hidden %s, %d network params, budget %d, %s on %s",
        run_id,
        spec.name,
        list(hidden),
        budget.network,
        budget.total,
        implementation,
        device,
    )

    clock = make_clock(device)
    pending: list[torch.Tensor] = []
    pending_epochs: list[int] = []
    epoch_losses: list[float] = []
    step = 0
    status = "running"

    def record_eval(epoch: int) -> dict[str, Any]:
        model.eval()
        train_loss, _ = evaluate(forward, images, labels)
        test_loss, test_accuracy = evaluate(forward, data.test_images, data.test_labels)
        val_loss = evaluate(forward, val_images, val_labels)[0] if val_images is not None else None
        model.train()
        return {
            "epoch": epoch,
            "step": step,
            "seconds": clock.total,
            "train_loss": train_loss,
            "val_loss": val_loss,
            "test_loss": test_loss,
            "test_accuracy": test_accuracy,
        }

    written = 0  # the last step whose row is stored

    def flush(
        evals: list[dict[str, Any]] = (), diagnostics: list[dict[str, Any]] = ()
    ) -> int | None:
        """Write the pending steps; return the step that diverged, if one did."""
        nonlocal pending, pending_epochs, written
        seconds = clock.pause()
        # A flush repeated after an interrupted write finds the clock already paused.
        seconds += [clock.total] * (len(pending) - len(seconds))
        losses = torch.stack(pending).double().cpu() if pending else torch.zeros(0)
        first_step = step - len(pending) + 1
        diverged_at = _first_divergence(losses)
        keep = len(pending) if diverged_at is None else diverged_at + 1
        # One tolist() per flush, not one float() per step.
        loss_values = losses.tolist()
        rows = [
            {
                "step": first_step + i,
                "epoch": pending_epochs[i],
                "loss": loss_values[i],
                "seconds": seconds[i],
            }
            for i in range(keep)
        ]
        epoch_losses.extend(row["loss"] for row in rows)
        sink.write_rows(
            run_id,
            steps=rows,
            evals=list(evals) if diverged_at is None else [],
            diagnostics=list(diagnostics) if diverged_at is None else [],
            run_fields={"steps_done": first_step + keep - 1, "train_seconds": clock.total},
        )
        if rows:
            elapsed = max(clock.total, 1e-9)
            progress.stats(rows[-1]["loss"], (first_step + keep - 1) / elapsed)
        pending, pending_epochs = [], []
        written = first_step + keep - 1
        return None if diverged_at is None else first_step + diverged_at

    try:
        initial = record_eval(0)
        sink.write_rows(run_id, evals=[initial])
        model.train()
        for epoch in range(1, config.epochs + 1):
            epoch_losses = []
            clock.resume()
            for batch in epoch_batches(
                images.shape[0], config.batch_size, config.seed, epoch, device
            ):
                # index_select gathers the same rows as images[batch] in less time on the CPU:
                # 61 against 152 us for 256 rows of 784 floats (torch 2.14, one thread).
                logits = forward(images.index_select(0, batch))
                loss = F.cross_entropy(logits, labels.index_select(0, batch))
                backward_and_step(optimizer, params, loss, logits, generator=sample_generator)
                step += 1
                pending.append(loss.detach())
                pending_epochs.append(epoch)
                clock.mark()
                progress.advance(step)
                if len(pending) >= config.flush_every:
                    diverged = flush()
                    if diverged is not None:
                        result.diverged_step = diverged
                        break
                    clock.resume()
            if result.diverged_step is not None:
                break
            diverged = flush()
            if diverged is not None:
                result.diverged_step = diverged
                break
            eval_row = record_eval(epoch)
            sink.write_rows(
                run_id,
                evals=[eval_row],
                diagnostics=diagnostic_rows(optimizer, names, epoch),
            )
            result.final_eval_loss = eval_row["train_loss"]
            result.final_val_loss = eval_row["val_loss"]
            result.final_test_loss = eval_row["test_loss"]
            result.test_accuracy = eval_row["test_accuracy"]
            result.final_train_loss = sum(epoch_losses) / len(epoch_losses)
        status = "diverged" if result.diverged_step is not None else "finished"
        if status == "diverged":
            result.final_train_loss = None
        # A run that ends above its starting loss, or whose final weights give a non-finite
        # loss, counts as diverged too, at its last step.
        final_loss = result.final_eval_loss
        if status == "finished" and not (
            math.isfinite(final_loss) and final_loss <= initial["train_loss"]
        ):
            status = "diverged"
            result.diverged_step = step
            result.final_train_loss = None
    except KeyboardInterrupt:
        status = "interrupted"
        with _deferred_signals():
            if pending:
                diverged = flush()
                if diverged is not None:
                    status = "diverged"
                    result.diverged_step = diverged
        raise
    except BaseException as exc:
        status = "failed"
        result.extra["error"] = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        result.status = status
        # Only stored steps count, so an interrupted or failed run never claims rows it lost.
        result.steps = written if result.diverged_step is None else result.diverged_step
        result.train_seconds = clock.total
        final = {
            "steps_done": result.steps,
            "train_seconds": clock.total,
            "diverged_step": result.diverged_step,
            "final_train_loss": _finite_or_none(result.final_train_loss),
            "final_eval_loss": _finite_or_none(result.final_eval_loss),
            "final_val_loss": _finite_or_none(result.final_val_loss),
            "final_test_loss": _finite_or_none(result.final_test_loss),
            "test_accuracy": result.test_accuracy,
            "error": result.extra.get("error"),
            "weights_digest": _digest_or_none(model),
        }
        with _deferred_signals():
            sink.finish_run(run_id, status, **final)
        progress.finish(status)
    return result


def weights_digest(model: torch.nn.Module) -> str:
    """Return the SHA-256 hex digest of every parameter's name, dtype, shape and CPU bytes.

    Two runs with equal digests ended with bit-identical weights.
    """
    digest = hashlib.sha256()
    for name, parameter in model.named_parameters():
        values = parameter.detach().cpu().contiguous()
        digest.update(f"{name}:{values.dtype}:{tuple(values.shape)};".encode())
        digest.update(values.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _digest_or_none(model: torch.nn.Module) -> str | None:
    # The final status must be stored even when the device can no longer copy the weights
    # back (after a CUDA error, say).
    try:
        return weights_digest(model)
    except Exception as exc:
        log.warning("cannot compute the weights digest: %s", exc)
        return None


@contextlib.contextmanager
def _deferred_signals() -> Any:
    """Hold SIGINT and SIGTERM back until the block ends, then raise ``KeyboardInterrupt``.

    A second Ctrl-C in the middle of the last write would otherwise abandon the transaction
    and lose the rows, or leave the write lock held. Outside the main thread this does nothing,
    because only the main thread may install signal handlers.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    handled = (signal.SIGINT, signal.SIGTERM)
    previous = {number: signal.getsignal(number) for number in handled}
    for number in handled:
        signal.signal(number, lambda number, frame: received.append(number))
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    if received:
        raise KeyboardInterrupt(f"signal {received[0]} during the final write")


def _finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _warm_up(forward: Any, batch: torch.Tensor) -> float:
    """Run one forward and backward pass, leave no gradients and return the seconds it took."""
    started = time.perf_counter()
    forward(batch).sum().backward()
    for parameter in forward.parameters():
        parameter.grad = None
    if batch.device.type == "cuda":
        torch.cuda.synchronize(batch.device)
    return time.perf_counter() - started


def _batch_sizes(count: int, batch_size: int) -> list[int]:
    """Return the distinct batch sizes of an epoch over ``count`` examples."""
    sizes = [min(batch_size, count)]
    if count > batch_size and count % batch_size:
        sizes.append(count % batch_size)
    return sizes


def _compiled_forward(model: torch.nn.Module, spec: Setup) -> Any:
    """Return ``torch.compile(model)``, or ``model`` itself where compiled graphs fail.

    Tested with torch 2.14 on the CPU. The Hessian-vector product of trace "hvp" needs a double
    backward, which AOTAutograd rejects. The curvature refresh of trace "decay" runs a second
    backward through the same graph, which a compiled backward rejects because it frees
    (donates) its saved buffers after the first one.
    """
    reasons = {
        "hvp": "compiled graphs do not support the double backward of the Hessian product",
        "decay": "compiled graphs do not support the second backward of the curvature refresh",
    }
    if spec.learned and spec.trace in reasons:
        log.warning(
            "setup %s: --compile ignored, the forward runs eagerly: %s",
            spec.name,
            reasons[spec.trace],
        )
        return model
    return torch.compile(model)
