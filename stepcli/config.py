"""Settings of one training run, with bounds checks that name the value and the fix."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from stepcli.model import DEFAULT_HIDDEN
from stepcli.setups import Setup, get_setup

DIVERGENCE_LOSS = 1e3
"""A minibatch loss above this (or a non-finite one) stops the run as diverged."""


class ConfigError(ValueError):
    """An invalid setting; the message names the option, the value and the valid range."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides the numbers of one run."""

    setup: str
    """Setup name from the setups table (``"1"`` … ``"6"`` or a control)."""
    seed: int = 0
    """Seed of the initial weights, the training subset, the batch order and label sampling."""
    epochs: int = 6
    batch_size: int = 256
    subset_size: int | None = 12_000
    """Class-balanced training subset size; ``None`` uses the whole training set."""
    val_size: int = 0
    """Size of a validation split held out of the training set (0: none)."""
    hidden: tuple[int, ...] = DEFAULT_HIDDEN
    """Hidden widths of the baseline network, whose parameter count is X."""
    lr: float | None = None
    """Learning rate of Adam and SGD setups."""
    alpha0: float | None = None
    """Initial per-weight step size of the learned setups."""
    meta_lr: float | None = None
    """Meta step size mu: each step moves every log step size by +-mu."""
    alpha_min: float = 1e-6
    alpha_max: float = 3.0
    gamma: float = 0.99
    """Trace decay of the learned setups."""
    curvature_every: int = 10
    """Steps between curvature refreshes (k) of the Hessian-decay setups."""
    curvature: str = "hessian"
    """Curvature product of setup 4: ``"hessian"`` or ``"ggn"``."""
    device: str = "cuda"
    compile: bool = False
    """Compile the forward pass with ``torch.compile``; compile time is stored apart."""
    flush_every: int = 200
    """Steps between store writes and divergence checks (always also at each epoch end)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form labels stored with the run (not part of the optimizer)."""

    @property
    def spec(self) -> Setup:
        return get_setup(self.setup)

    def resolved(self) -> TrainConfig:
        """Return a copy whose unset hyperparameters take the setup's defaults and pins."""
        spec = self.spec
        values = {key: getattr(self, key) for key in ("lr", "alpha0", "meta_lr")}
        for key, value in spec.defaults.items():
            if values.get(key) is None:
                values[key] = value
        values.update(spec.fixed)
        return replace(self, **values)

    def optimizer_hparams(self) -> dict[str, Any]:
        """Return the hyperparameters that the setup's optimizer reads."""
        spec = self.spec
        if not spec.learned:
            return {"lr": self.lr}
        keys = ["alpha0", "meta_lr", "alpha_min", "alpha_max", "gamma"]
        if spec.trace == "decay":
            keys.append("curvature_every")
        if spec.trace == "hvp":
            keys.append("curvature")
        return {key: getattr(self, key) for key in keys}

    def record(self) -> dict[str, Any]:
        """Return the settings and hyperparameters stored with the run."""
        return {
            **self.optimizer_hparams(),
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "subset_size": self.subset_size,
            "val_size": self.val_size,
            "hidden": list(self.hidden),
            "compile": self.compile,
            **({"extra": self.extra} if self.extra else {}),
        }

    def key(self) -> str:
        """Return a hash of everything that decides the run's numbers except the code."""
        payload = {"setup": self.spec.name, "seed": self.seed, **self.record()}
        payload.pop("extra", None)
        text = json.dumps(payload, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def validate(self) -> None:
        """Raise ``ConfigError`` for the first out-of-range setting."""
        _check_int("--epochs", self.epochs, 1)
        _check_int("--batch-size", self.batch_size, 1)
        if self.subset_size is not None:
            _check_int("--subset-size", self.subset_size, 1)
        _check_int("--val-size", self.val_size, 0)
        _check_int("--seed", self.seed, 0)
        _check_int("--curvature-every", self.curvature_every, 1)
        _check_int("--flush-every", self.flush_every, 1)
        for width in self.hidden:
            _check_int("--hidden", width, 1)
        for option, value in (("--lr", self.lr), ("--alpha0", self.alpha0)):
            if value is not None:
                _check_positive(option, value)
        if self.meta_lr is not None and not (math.isfinite(self.meta_lr) and self.meta_lr >= 0):
            raise ConfigError(f"invalid --meta-lr {self.meta_lr}: must be a finite number >= 0")
        _check_positive("--alpha-min", self.alpha_min)
        _check_positive("--alpha-max", self.alpha_max)
        if self.alpha_min >= self.alpha_max:
            raise ConfigError(
                f"invalid --alpha-min {self.alpha_min}: must be below --alpha-max {self.alpha_max}"
            )
        if self.alpha0 is not None and not self.alpha_min <= self.alpha0 <= self.alpha_max:
            raise ConfigError(
                f"invalid --alpha0 {self.alpha0}: must lie within [--alpha-min, --alpha-max] = "
                f"[{self.alpha_min}, {self.alpha_max}]"
            )
        if not (math.isfinite(self.gamma) and 0 <= self.gamma <= 1):
            raise ConfigError(f"invalid --gamma {self.gamma}: must be in [0, 1]")
        if self.curvature not in ("hessian", "ggn"):
            raise ConfigError(f"invalid --curvature {self.curvature!r}: choose hessian or ggn")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


MAX_INT = 2**63 - 1
"""Largest integer setting: the store keeps seeds and counts in signed 64-bit columns."""


def _check_int(option: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"invalid {option} {value}: must be an integer >= {minimum}")
    if value > MAX_INT:
        raise ConfigError(f"invalid {option} {value}: must be an integer <= {MAX_INT}")


def _check_positive(option: str, value: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise ConfigError(f"invalid {option} {value}: must be a finite number > 0")
