"""Options shared by several commands, and the checks that turn them into objects."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import torch
import typer

from stepcli import console
from stepcli.config import ConfigError
from stepcli.data import MNIST, data_dir_from, load_mnist
from stepcli.engine import describe_budget
from stepcli.setups import MAIN_SETUPS, SETUPS, get_setup
from stepcli.store import Store, StoreError, open_store
from stepcli.tables import print_rows

OUTPUT_FORMATS = ("table", "json", "csv")

AllowCpu = Annotated[
    bool, typer.Option("--allow-cpu", help="Train on the CPU when CUDA is not available.")
]
Device = Annotated[
    str | None,
    typer.Option(help="Torch device, such as cuda, cuda:1 or cpu; default: cuda when available."),
]
DataDir = Annotated[
    str | None,
    typer.Option(
        help="MNIST folder (a torchvision root, its MNIST/ or MNIST/raw/ folder, or the four "
        "files); default: $STEPCLI_DATA_DIR, else ./data. Downloaded when missing."
    ),
]
Db = Annotated[str, typer.Option(help="Results store: a file path or an SQLAlchemy URL.")]
OutputFormat = Annotated[
    str, typer.Option("--format", help="Output format of the result table: table, json or csv.")
]
Epochs = Annotated[int, typer.Option(help="Passes over the training subset.")]
BatchSize = Annotated[int, typer.Option(help="Examples per minibatch.")]
SubsetSize = Annotated[
    int,
    typer.Option(
        help="Class-balanced training subset size; the full size (60000) uses every image."
    ),
]
Hidden = Annotated[
    str, typer.Option(help="Hidden widths of the baseline network X, comma-separated.")
]
AlphaMin = Annotated[float, typer.Option(help="Lower clamp of every step size.")]
AlphaMax = Annotated[float, typer.Option(help="Upper clamp of every step size.")]
Gamma = Annotated[float, typer.Option(help="Trace decay of the learned setups, in [0, 1].")]
CurvatureEvery = Annotated[
    int, typer.Option(help="Steps between curvature refreshes of setups 3 and 6 (k).")
]
Curvature = Annotated[str, typer.Option(help="Curvature product of setup 4: hessian or ggn.")]
Compile = Annotated[
    bool, typer.Option("--compile", help="Compile the forward pass with torch.compile.")
]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Print debug messages.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Print results and errors only.")]


def parse_setups(text: str) -> list[str]:
    """Return the setup names in ``text``: one name, ``all`` (setups 1-6) or a comma list."""
    if text.strip().lower() == "all":
        return list(MAIN_SETUPS)
    names = []
    for part in text.split(","):
        try:
            names.append(get_setup(part.strip()).name)
        except KeyError:
            raise ConfigError(
                f"invalid --setup {part.strip()!r}: choose 1-6, all, or one of "
                f"{', '.join(name for name in SETUPS if name not in MAIN_SETUPS)}"
            ) from None
    return names


def check_format(value: str, allowed: tuple[str, ...] = OUTPUT_FORMATS) -> str:
    if value not in allowed:
        raise ConfigError(f"invalid --format {value!r}: choose one of {', '.join(allowed)}")
    return value


def resolve_device(device: str | None, allow_cpu: bool) -> torch.device:
    """Return the training device: CUDA by default, the CPU only with ``--allow-cpu``."""
    if device is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        if not allow_cpu:
            raise ConfigError(
                "CUDA is not available: pass --allow-cpu to train on the CPU (much slower)"
            )
        return torch.device("cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"invalid --device {device!r}: use cuda, cuda:N or cpu") from None
    if chosen.type not in ("cuda", "cpu"):
        raise ConfigError(f"invalid --device {device!r}: stepcli trains on cuda, cuda:N or cpu")
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"invalid --device {device}: CUDA is not available; pass --allow-cpu")
    if (
        chosen.type == "cuda"
        and chosen.index is not None
        and chosen.index >= torch.cuda.device_count()
    ):
        raise ConfigError(
            f"invalid --device {device}: only {torch.cuda.device_count()} CUDA device(s) exist"
        )
    if chosen.type == "cpu" and not allow_cpu and torch.cuda.is_available():
        console.info("training on the CPU although CUDA is available, as --device cpu asks")
    return chosen


def open_db(db: str) -> Store:
    return open_store(db)


def open_existing_db(db: str) -> Store:
    """Open the store at ``db`` for reading; a file path that does not exist raises."""
    if "://" not in db and not Path(db).expanduser().exists():
        raise StoreError(f"store {db} not found; run stepcli train first, or pass --db")
    return open_store(db)


def load_data(data_dir: str | None, device: torch.device) -> MNIST:
    folder = data_dir_from(data_dir)
    console.info(f"loading MNIST from {folder}")
    return load_mnist(folder, download=True, device=device)


def print_budget_table(names: list[str], hidden_full: tuple[int, ...]) -> None:
    """Print network, step-size, decay and total parameters of setups 1-6 and ``names``."""
    shown = list(MAIN_SETUPS) + [name for name in names if name not in MAIN_SETUPS]
    x = describe_budget(get_setup("1"), hidden_full)[1].network
    rows = []
    for name in shown:
        spec = get_setup(name)
        hidden, budget = describe_budget(spec, hidden_full)
        rows.append(
            {
                "setup": name,
                "hidden": ",".join(map(str, hidden)),
                "network": budget.network,
                "step_sizes": budget.step_sizes,
                "decays": budget.decays,
                "total": budget.total,
                "total/X": round(budget.total / x, 3),
                "auxiliary": budget.auxiliary,
            }
        )
    if console.state["verbosity"] > console.Verbosity.QUIET:
        print_rows(rows, "table", title=f"parameter budget (X = {x:,})", stream=console.stderr)
