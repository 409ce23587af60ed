"""SQLAlchemy models of the results store.

Non-finite numbers: SQLite turns NaN into NULL, so the float columns of ``steps`` and
``evals`` use ``MeasuredFloat``, which writes NaN as NULL and reads NULL back as NaN. Those
columns are always measured, so NULL there means NaN and nothing else. Infinities are stored as
IEEE infinities, which SQLite and PostgreSQL both keep. In ``runs``, a NULL metric means "not
measured" (a run that stopped before its first evaluation, say).
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

SCHEMA_VERSION = 1

RUN_STATUSES = ("running", "finished", "diverged", "interrupted", "failed")


class MeasuredFloat(TypeDecorator):
    """A float that is never missing: NaN is written as NULL and NULL is read as NaN."""

    impl = Float
    cache_ok = True

    def process_bind_param(self, value: float | None, dialect: Any) -> float | None:
        if value is None or math.isnan(value):
            return None
        return float(value)

    def process_result_value(self, value: float | None, dialect: Any) -> float:
        return math.nan if value is None else float(value)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class Meta(Base):
    """Key-value facts about the store itself, including ``schema_version``."""

    __tablename__ = "meta"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class Sweep(Base):
    """A tuning sweep: its target setup, grid, seeds, selection criterion and result."""

    __tablename__ = "sweeps"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    target: Mapped[str] = mapped_column(String(32), index=True)
    grid: Mapped[dict[str, Any]]
    seeds: Mapped[list[Any]]
    criterion: Mapped[str] = mapped_column(String(32))
    settings: Mapped[dict[str, Any]]
    """Training settings shared by every run of the sweep (epochs, batch size, subset …)."""
    status: Mapped[str] = mapped_column(String(16), default="running")
    best_config: Mapped[dict[str, Any] | None]
    best_value: Mapped[float | None] = mapped_column(Float)
    git_revision: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)
    seconds: Mapped[float | None] = mapped_column(Float)


class Run(Base):
    """One training run: what decided its numbers, its status and its final metrics."""

    __tablename__ = "runs"
    __table_args__ = (
        Index("ix_runs_setup_status", "setup", "status"),
        Index("ix_runs_config_key", "config_key"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    setup: Mapped[str] = mapped_column(String(32))
    kind: Mapped[str] = mapped_column(String(16), default="train")
    """``"train"`` for runs from ``train`` or ``experiment``; ``"sweep"`` for tuning runs."""
    sweep_id: Mapped[int | None] = mapped_column(ForeignKey("sweeps.id"), index=True)
    optimizer: Mapped[str] = mapped_column(String(32))
    optimizer_impl: Mapped[str | None] = mapped_column(String(32))
    """Kernel that ran the update: ``fused``, ``foreach`` or ``single_tensor``."""
    hparams: Mapped[dict[str, Any]]
    """Every hyperparameter and training setting, as passed to the engine."""
    config_key: Mapped[str] = mapped_column(String(64))
    """Hash of the setup, hyperparameters, settings and seed; equal keys mean the same run."""
    seed: Mapped[int] = mapped_column(Integer)
    hidden: Mapped[list[Any]]
    network_params: Mapped[int] = mapped_column(Integer)
    step_size_params: Mapped[int] = mapped_column(Integer, default=0)
    decay_params: Mapped[int] = mapped_column(Integer, default=0)
    budget_params: Mapped[int] = mapped_column(Integer)
    """Network, step-size and decay parameters together: the counted budget."""
    auxiliary_state: Mapped[int] = mapped_column(Integer, default=0)
    """Optimizer state outside the budget: traces, meta-momentum, Adam's moments."""
    device: Mapped[str] = mapped_column(String(64))
    torch_version: Mapped[str] = mapped_column(String(32))
    cuda_version: Mapped[str | None] = mapped_column(String(32))
    git_revision: Mapped[str | None] = mapped_column(String(64))
    host: Mapped[str | None] = mapped_column(String(255))
    pid: Mapped[int | None] = mapped_column(Integer)
    executor: Mapped[str | None] = mapped_column(String(32))
    gpus_per_run: Mapped[float | None] = mapped_column(Float)
    status: Mapped[str] = mapped_column(String(16), default="running")
    diverged_step: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime)
    steps_done: Mapped[int] = mapped_column(Integer, default=0)
    final_train_loss: Mapped[float | None] = mapped_column(Float)
    """Mean minibatch loss over the last epoch."""
    final_eval_loss: Mapped[float | None] = mapped_column(Float)
    """Loss on the whole training subset after the last step."""
    final_val_loss: Mapped[float | None] = mapped_column(Float)
    final_test_loss: Mapped[float | None] = mapped_column(Float)
    test_accuracy: Mapped[float | None] = mapped_column(Float)
    train_seconds: Mapped[float | None] = mapped_column(Float)
    compile_seconds: Mapped[float | None] = mapped_column(Float)
    weights_digest: Mapped[str | None] = mapped_column(String(64))
    """SHA-256 of the final weights (``stepcli.engine.weights_digest``); equal digests mean
    bit-identical weights. NULL while running, or when the weights could not be read back."""


class Step(Base):
    """One optimizer step: minibatch loss and training time since the run started."""

    __tablename__ = "steps"

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    step: Mapped[int] = mapped_column(Integer, primary_key=True)
    epoch: Mapped[int] = mapped_column(Integer)
    loss: Mapped[float] = mapped_column(MeasuredFloat, nullable=True)
    seconds: Mapped[float] = mapped_column(MeasuredFloat, nullable=True)
    """Training seconds up to the end of this step, without evaluation or store writes."""


class Eval(Base):
    """An evaluation after an epoch, taken outside the training clock."""

    __tablename__ = "evals"

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    epoch: Mapped[int] = mapped_column(Integer, primary_key=True)
    step: Mapped[int] = mapped_column(Integer)
    seconds: Mapped[float] = mapped_column(MeasuredFloat, nullable=True)
    train_loss: Mapped[float] = mapped_column(MeasuredFloat, nullable=True)
    """Loss on the whole training subset."""
    val_loss: Mapped[float | None] = mapped_column(Float)
    test_loss: Mapped[float] = mapped_column(MeasuredFloat, nullable=True)
    test_accuracy: Mapped[float] = mapped_column(MeasuredFloat, nullable=True)


class Diagnostic(Base):
    """Per-epoch, per-layer quantiles of a per-weight quantity (step size, curvature, decay)."""

    __tablename__ = "diagnostics"

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    epoch: Mapped[int] = mapped_column(Integer, primary_key=True)
    layer: Mapped[str] = mapped_column(String(64), primary_key=True)
    quantity: Mapped[str] = mapped_column(String(16), primary_key=True)
    q05: Mapped[float] = mapped_column(MeasuredFloat, nullable=True)
    q25: Mapped[float] = mapped_column(MeasuredFloat, nullable=True)
    q50: Mapped[float] = mapped_column(MeasuredFloat, nullable=True)
    q75: Mapped[float] = mapped_column(MeasuredFloat, nullable=True)
    q95: Mapped[float] = mapped_column(MeasuredFloat, nullable=True)
    frac_at_min: Mapped[float | None] = mapped_column(Float)
    frac_at_max: Mapped[float | None] = mapped_column(Float)
