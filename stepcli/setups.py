"""The six setups of the study and its controls, as data.

Each entry gives the network (as a fraction of the baseline's parameter count X), the
optimizer and trace rule a run uses, its default hyperparameters and its tuning grid.
``train`` and ``sweep`` read this table; nothing else branches on a setup id.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ADAM_LR_GRID = (1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2)
SGD_LR_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.2, 0.3, 0.5, 1.0)
ALPHA0_GRID = (0.03, 0.1, 0.3)
META_LR_GRID = (0.03, 0.1, 0.3)
FIXED_ALPHA0_GRID = (0.01, 0.02, 0.03, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0)

LEARNED_DEFAULTS = {"alpha0": 0.1, "meta_lr": 0.1}


@dataclass(frozen=True)
class Setup:
    """One row of the study: a network size, an optimizer and how it is tuned."""

    name: str
    """Identifier used on the command line and in the store (``"1"`` … ``"6"`` or a control)."""
    title: str
    """One-line description for tables and figure legends."""
    fraction: float
    """Network parameter count as a fraction of X, the baseline's count."""
    optimizer: str
    """``"adam"``, ``"sgd"`` or ``"learned"`` (the learned per-weight step-size optimizer)."""
    trace: str | None = None
    """Trace rule of the learned optimizer: ``"gradient"``, ``"decay"`` or ``"hvp"``."""
    step_size_signal: str = "-"
    decay_signal: str = "-"
    defaults: dict[str, float] = field(default_factory=dict)
    """Hyperparameters used when neither a flag nor a finished sweep sets them."""
    fixed: dict[str, float] = field(default_factory=dict)
    """Hyperparameters this setup pins (for example ``meta_lr = 0``); flags cannot change them."""
    grid: dict[str, tuple[float, ...]] = field(default_factory=dict)
    """Default tuning grid, one axis per hyperparameter; 9 runs per seed for every setup."""
    control: bool = False

    @property
    def learned(self) -> bool:
        return self.optimizer == "learned"

    @property
    def has_decays(self) -> bool:
        return self.trace == "decay"


def _learned(name, title, fraction, trace, signal, decay="-", control=False) -> Setup:
    return Setup(
        name=name,
        title=title,
        fraction=fraction,
        optimizer="learned",
        trace=trace,
        step_size_signal=signal,
        decay_signal=decay,
        defaults=dict(LEARNED_DEFAULTS),
        grid={"alpha0": ALPHA0_GRID, "meta_lr": META_LR_GRID},
        control=control,
    )


def _fixed_step(base: Setup) -> Setup:
    return Setup(
        name=f"{base.name}-mu0",
        title=f"setup {base.name} with meta_lr = 0 (fixed step size alpha0)",
        fraction=base.fraction,
        optimizer="learned",
        trace=base.trace,
        step_size_signal=base.step_size_signal,
        decay_signal=base.decay_signal,
        defaults={"alpha0": 0.1},
        fixed={"meta_lr": 0.0},
        grid={"alpha0": FIXED_ALPHA0_GRID},
        control=True,
    )


def _build() -> dict[str, Setup]:
    adam = {"lr": 1e-3}
    main = [
        Setup("1", "X network, Adam", 1.0, "adam", defaults=adam, grid={"lr": ADAM_LR_GRID}),
        _learned("2", "X network, X step sizes (gradient)", 1.0, "gradient", "gradient"),
        _learned("3", "X network, X step sizes + X decays", 1.0, "decay", "gradient", "Hessian"),
        _learned("4", "X/2 network, X/2 step sizes (Hessian)", 0.5, "hvp", "Hessian"),
        _learned("5", "X/2 network, X/2 step sizes (gradient)", 0.5, "gradient", "gradient"),
        _learned(
            "6", "X/3 network, X/3 step sizes + X/3 decays", 1 / 3, "decay", "gradient", "Hessian"
        ),
    ]
    controls = [
        Setup(
            "sgd",
            "X network, SGD with a fixed learning rate",
            1.0,
            "sgd",
            defaults={"lr": 0.1},
            grid={"lr": SGD_LR_GRID},
            control=True,
        ),
        Setup(
            "adam-half",
            "X/2 network, Adam",
            0.5,
            "adam",
            defaults=adam,
            grid={"lr": ADAM_LR_GRID},
            control=True,
        ),
        Setup(
            "adam-third",
            "X/3 network, Adam",
            1 / 3,
            "adam",
            defaults=adam,
            grid={"lr": ADAM_LR_GRID},
            control=True,
        ),
        _learned(
            "6-nodecay",
            "X/3 network, X/3 step sizes, no decay",
            1 / 3,
            "gradient",
            "gradient",
            control=True,
        ),
    ]
    controls += [_fixed_step(setup) for setup in main[1:]]
    return {setup.name: setup for setup in main + controls}


SETUPS: dict[str, Setup] = _build()
MAIN_SETUPS: tuple[str, ...] = ("1", "2", "3", "4", "5", "6")


def get_setup(name: str) -> Setup:
    """Return the setup called ``name``; raise ``KeyError`` with the valid names otherwise."""
    key = name.removeprefix("setup-")
    if key not in SETUPS:
        raise KeyError(f"unknown setup {name!r}: choose one of {', '.join(SETUPS)}")
    return SETUPS[key]
