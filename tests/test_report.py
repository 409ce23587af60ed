"""The report and export commands against a store filled by real short runs and edge rows."""

from __future__ import annotations

import csv
import io
import json
import math
import sqlite3
import uuid
import warnings

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from matplotlib import ticker
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from stepcli.config import TrainConfig
from stepcli.engine import train
from stepcli.report import (
    NoRunsError,
    SelectionError,
    build_report,
    frames,
    load_report_data,
    plots,
)
from stepcli.report.export import export_table
from stepcli.report.figures import FIGURES, loss_vs_step_figure, sweep_figure
from stepcli.report.stats import mean_ci, moving_average, t_quantile_975
from stepcli.report.style import LINE_STYLES, group_line_styles, report_style
from stepcli.store import Sweep, create_run, finish_run, open_store, utcnow, write_rows

FIGURE_FILES = (
    "all_experiments_loss_over_time",
    "convergence_times",
    "loss_vs_step",
    "loss_vs_grad_evals",
    "sweep_sensitivity",
    "step_size_distributions",
    "test_accuracy",
)
PNG_HEADER = b"\x89PNG\r\n\x1a\n"


def small(setup: str, seed: int, **overrides) -> TrainConfig:
    values = dict(setup=setup, device="cpu", epochs=2, batch_size=128, subset_size=600, seed=seed)
    values.update(overrides)
    return TrainConfig(**values)


class StopAt:
    """A progress object that raises KeyboardInterrupt at one step, as Ctrl-C would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def start(self, *args) -> None:
        pass

    def advance(self, step: int) -> None:
        if step == self.step:
            raise KeyboardInterrupt

    def stats(self, *args) -> None:
        pass

    def finish(self, status: str) -> None:
        pass


def add_run(
    store,
    setup: str,
    seed: int,
    losses: list[float],
    *,
    status: str = "finished",
    optimizer: str = "adam",
    final_train_loss: float | None = None,
    test_accuracy: float | None = 0.5,
    hparams: dict | None = None,
    **fields,
) -> int:
    """Insert a run with the given minibatch losses, one epoch, 10 ms per step."""
    run_id = create_run(
        store,
        setup=setup,
        optimizer=optimizer,
        hparams=hparams or {"lr": 1e-3, "epochs": 1},
        config_key=uuid.uuid4().hex,
        seed=seed,
        hidden=[256],
        network_params=203_530,
        budget_params=203_530,
        device="cpu",
        torch_version=torch.__version__,
        **fields,
    )
    steps = [
        {"step": i + 1, "epoch": 1, "loss": loss, "seconds": 0.01 * (i + 1)}
        for i, loss in enumerate(losses)
    ]
    evals = [
        {
            "epoch": 0,
            "step": 0,
            "seconds": 0.0,
            "train_loss": 2.3,
            "test_loss": 2.3,
            "test_accuracy": 0.1,
        },
        {
            "epoch": 1,
            "step": len(losses),
            "seconds": 0.01 * len(losses),
            "train_loss": 1.0,
            "test_loss": 1.0,
            "test_accuracy": test_accuracy if test_accuracy is not None else math.nan,
        },
    ]
    write_rows(store, run_id, steps=steps, evals=evals)
    finish_run(
        store,
        run_id,
        status,
        steps_done=len(losses),
        train_seconds=0.01 * len(losses),
        final_train_loss=final_train_loss,
        test_accuracy=test_accuracy,
    )
    return run_id


def add_edge_runs(store) -> dict[str, int]:
    """Insert a one-step run, an all-NaN run and a run that reaches a loss of exactly 0."""
    return {
        "single_step": add_run(
            store, "5", 0, [2.0], optimizer="learned-gradient", final_train_loss=2.0
        ),
        "all_nan": add_run(
            store,
            "6",
            0,
            [math.nan] * 12,
            optimizer="learned-decay",
            hparams={"alpha0": 0.1, "meta_lr": 0.1, "curvature_every": 10},
        ),
        "zero_loss": add_run(
            store,
            "2-mu0",
            0,
            [1.0, 0.5, 0.25, 0.0, 0.0, 0.0, 0.0],
            optimizer="learned-gradient",
            final_train_loss=0.0,
        ),
    }


def add_sweep(store, target: str = "1") -> int:
    """Insert a finished sweep over lr with 2 seeds. At lr = 10 one seed diverges."""

    def work(session):
        sweep = Sweep(
            target=target,
            grid={"lr": [1e-3, 1e-2, 10.0]},
            seeds=[0, 1],
            criterion="train-loss",
            settings={"epochs": 1},
            status="finished",
            best_config={"lr": 1e-2},
            best_value=0.35,
            created_at=utcnow(),
        )
        session.add(sweep)
        session.flush()
        return sweep.id

    sweep_id = store.write(work)
    values = {1e-3: (0.5, 0.6), 1e-2: (0.3, 0.4), 10.0: (None, 2.0)}
    for lr, per_seed in values.items():
        for seed, value in enumerate(per_seed):
            add_run(
                store,
                target,
                seed,
                [2.3, 1.0, value if value is not None else 1e6],
                status="diverged" if value is None else "finished",
                final_train_loss=value,
                hparams={"lr": lr, "epochs": 1},
                kind="sweep",
                sweep_id=sweep_id,
            )
    return sweep_id


def add_grid_sweep(store, target: str, seeds: int) -> int:
    """Insert a finished alpha0 x meta_lr sweep of 3 x 3 configurations.

    At alpha0 = 0.03 and meta_lr = 0.3 the first seed diverges, as in a real sweep of setups
    2-6. The criterion falls with alpha0 and differs a little between seeds.
    """
    alphas, meta_lrs = (0.03, 0.1, 0.3), (0.03, 0.1, 0.3)

    def work(session):
        sweep = Sweep(
            target=target,
            grid={"alpha0": list(alphas), "meta_lr": list(meta_lrs)},
            seeds=list(range(seeds)),
            criterion="train-loss",
            settings={"epochs": 1},
            status="finished",
            best_config={"alpha0": 0.3, "meta_lr": 0.1},
            best_value=0.8,
            created_at=utcnow(),
        )
        session.add(sweep)
        session.flush()
        return sweep.id

    sweep_id = store.write(work)
    for alpha0 in alphas:
        for meta_lr in meta_lrs:
            for seed in range(seeds):
                diverged = alpha0 == 0.03 and meta_lr == 0.3 and seed == 0
                value = 0.7 / alpha0**0.3 + 0.05 * seed + meta_lr / 10
                add_run(
                    store,
                    target,
                    seed,
                    [2.3, 1.5, 1e6 if diverged else value],
                    status="diverged" if diverged else "finished",
                    optimizer="learned-gradient",
                    final_train_loss=None if diverged else value,
                    hparams={"alpha0": alpha0, "meta_lr": meta_lr, "epochs": 1},
                    kind="sweep",
                    sweep_id=sweep_id,
                )
    return sweep_id


def add_experiment_runs(store) -> None:
    """Insert train runs of setups 1-6 with 3 seeds that end at different times, a diverged
    and an interrupted seed, and a single-seed setup."""
    rng = np.random.default_rng(0)
    for setup_index, setup in enumerate(("1", "2", "3", "4", "5", "6")):
        for seed in range(3):
            losses = 2.3 * np.exp(-np.linspace(0, 1.5 - 0.1 * setup_index, 16))
            losses *= 1 + 0.1 * rng.standard_normal(16)
            status = "finished"
            if setup == "4" and seed == 2:
                losses[-4:] = [40.0, 900.0, 5e3, math.nan]
                status = "diverged"
            add_run(
                store,
                setup,
                seed,
                list(losses),
                status=status,
                optimizer="adam" if setup == "1" else "learned-gradient",
                final_train_loss=float(losses[-1]) if status == "finished" else None,
            )
    add_run(store, "2", 3, [2.3, 2.0, 1.8], status="interrupted", optimizer="learned-gradient")
    add_run(store, "adam-half", 0, [2.3, 1.9, 1.2, 0.9], final_train_loss=0.9)


def sweep_store(path, sweeps: int):
    """Return a store with the experiment runs, an lr sweep of setup 1 and ``sweeps - 1``
    alpha0 x meta_lr sweeps of setups 2, 3, …"""
    store = open_store(str(path))
    add_experiment_runs(store)
    add_sweep(store, "1")
    for target in ("2", "3", "4", "5", "6")[: sweeps - 1]:
        add_grid_sweep(store, target, seeds=1 if sweeps == 2 else 3)
    return store


@pytest.fixture(scope="module")
def store_path(tmp_path_factory, mnist_cpu):
    """A store with real runs of setups 1-4 (2 seeds for 1 and 2), a diverged and an
    interrupted run, the edge runs and a sweep."""
    path = tmp_path_factory.mktemp("report") / "results.db"
    store = open_store(str(path))
    # An older finished run of setup 3, seed 0, that the newer real run below replaces.
    add_run(store, "3", 0, [2.3, 2.2], optimizer="learned-decay", final_train_loss=2.2)
    for setup, seeds in (("1", (0, 1)), ("2", (0, 1)), ("3", (0,)), ("4", (0,))):
        for seed in seeds:
            train(small(setup, seed), store, mnist_cpu)
    train(small("sgd", 0, lr=1e4), store, mnist_cpu)
    with pytest.raises(KeyboardInterrupt):
        train(small("1", 0), store, mnist_cpu, progress=StopAt(3))
    add_edge_runs(store)
    add_sweep(store)
    store.dispose()
    return path


@pytest.fixture(scope="module")
def report_dir(store_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("outputs")
    store = open_store(str(store_path))
    report = build_report(store, out)
    store.dispose()
    return out, report


def query(path, sql: str, *params) -> list[tuple]:
    with sqlite3.connect(path) as connection:
        return connection.execute(sql, params).fetchall()


LATEST_RUNS = """
    SELECT setup, COUNT(*), SUM(status = 'diverged'),
           AVG(CASE WHEN status = 'finished' THEN final_train_loss END),
           AVG(CASE WHEN status = 'finished' THEN test_accuracy END)
    FROM runs AS r
    WHERE kind = 'train' AND status IN ('finished', 'diverged') AND id = (
        SELECT MAX(id) FROM runs AS newer
        WHERE newer.kind = 'train' AND newer.setup = r.setup AND newer.seed = r.seed
          AND newer.status IN ('finished', 'diverged'))
    GROUP BY setup
"""


def read_export(path) -> pd.DataFrame:
    if path.suffix == ".parquet":
        return pq.read_table(path).to_pandas()
    return pd.read_csv(path)


def assert_not_blank(figure: Figure) -> None:
    """Assert that every visible panel draws something or shows a "no data" text.

    An axes without axis lines that holds only a legend (the marker key of the sweep figure)
    counts as drawn.
    """
    for ax in figure.axes:
        if not ax.get_visible():
            continue
        drawn = bool(ax.lines or ax.collections or ax.patches)
        no_data = any(text.get_text().startswith("no data") for text in ax.texts)
        legend_row = not ax.axison and ax.get_legend() is not None
        assert drawn or no_data or legend_row, f"blank panel {ax.get_title()!r}"


# Figures and files.


def test_report_writes_every_figure(report_dir):
    out, report = report_dir
    for name in FIGURE_FILES:
        path = out / f"{name}.png"
        assert path.is_file(), name
        assert path.read_bytes()[:8] == PNG_HEADER, name
    assert (out / "summary.csv").stat().st_size > 0
    assert "| setup |" in (out / "summary.md").read_text()
    assert len(report.files) == len(FIGURE_FILES) + 2


def test_figures_have_no_blank_panel(store_path):
    store = open_store(str(store_path))
    data = load_report_data(store)
    store.dispose()
    with report_style():
        for name, draw in FIGURES.items():
            figure = draw(data)
            assert figure.axes, name
            assert_not_blank(figure)


def test_edge_runs_alone_render(tmp_path):
    store = open_store(str(tmp_path / "edge.db"))
    add_edge_runs(store)
    add_run(store, "sgd", 0, [2.3, 5e3], status="diverged", optimizer="sgd")
    report = build_report(store, tmp_path / "out", image_format="svg")
    data = load_report_data(store)
    store.dispose()
    for name in FIGURE_FILES:
        text = (tmp_path / "out" / f"{name}.svg").read_text()
        assert text.lstrip().startswith("<?xml"), name
    with report_style():
        for draw in FIGURES.values():
            assert_not_blank(draw(data))
    rows = report.summary.set_index("setup")
    assert rows.loc["6", "seeds"] == 1
    assert rows.loc["6", "target_reached"] == 0
    assert rows.loc["sgd", "diverged"] == 1


def test_runs_without_losses_render(tmp_path):
    store = open_store(str(tmp_path / "bare.db"))
    no_steps = add_run(store, "1", 0, [], test_accuracy=None)
    interrupted = add_run(
        store, "2", 0, [2.0, 1.5], status="interrupted", optimizer="learned-gradient"
    )
    report = build_report(store, tmp_path / "out", run_ids=[no_steps, interrupted])
    data = load_report_data(store, run_ids=[no_steps, interrupted])
    store.dispose()
    assert report.target is None
    assert list(report.summary["seeds"]) == [1, 1]
    assert any(f"{interrupted} (interrupted)" in note for note in report.notes)
    with report_style():
        for draw in FIGURES.values():
            assert_not_blank(draw(data))


def test_empty_panels_say_no_data():
    figure = Figure()
    axes = figure.subplots(1, 3)
    empty_curves = pd.DataFrame(columns=["group", "run_id", "seconds", "smooth_loss", "status"])
    empty_means = pd.DataFrame(columns=["group", "x", "mean", "low", "high", "seeds"])
    plots.plot_loss_curves(
        empty_curves, empty_means, axes[0], x="seconds", xlabel="s", colors={}, labels={}
    )
    plots.plot_step_size_bands(pd.DataFrame(columns=["epoch", "q05"]), axes[1], title="")
    plots.plot_accuracy_curves(
        pd.DataFrame(columns=["group", "epoch", "mean", "low", "high"]),
        axes[2],
        colors={},
        labels={},
    )
    for ax in axes:
        texts = [text.get_text() for text in ax.texts]
        assert texts and texts[0].startswith("no data")


def test_zero_loss_clipped_on_log_axis(tmp_path):
    store = open_store(str(tmp_path / "zero.db"))
    add_run(store, "1", 0, [1.0, 0.0, 0.0], final_train_loss=0.0)
    data = load_report_data(store, smooth_window=1)
    store.dispose()
    figure = Figure()
    ax = figure.subplots()
    plots.plot_loss_curves(
        data.curves,
        data.means["step"],
        ax,
        x="step",
        xlabel="step",
        colors=data.colors,
        labels=data.labels,
    )
    assert ax.get_yscale() == "log"
    drawn = np.concatenate([line.get_ydata() for line in ax.lines])
    assert drawn.min() == plots.LOSS_FLOOR
    assert ax.get_ylim()[0] > 0


@pytest.mark.parametrize("sweeps", [2, 6])
def test_report_raises_no_layout_warning(tmp_path, sweeps):
    store = sweep_store(tmp_path / "sweeps.db", sweeps)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        build_report(store, tmp_path / "out")
    store.dispose()
    assert (tmp_path / "out" / "sweep_sensitivity.png").stat().st_size > 0


@pytest.mark.parametrize("sweeps", [2, 6])
def test_sweep_panels_keep_their_size(tmp_path, sweeps):
    store = sweep_store(tmp_path / "sweeps.db", sweeps)
    data = load_report_data(store)
    store.dispose()
    with report_style():
        figure = sweep_figure(data)
        figure.savefig(io.BytesIO(), format="png")
    width, height = figure.get_size_inches()
    panels = [ax for ax in figure.axes if ax.get_visible() and ax.axison]
    assert len(panels) == sweeps
    for ax in panels:
        box = ax.get_position()
        assert box.width * width > 3.0, ax.get_title()
        assert box.height * height > 2.0, ax.get_title()


def test_sweep_log_axes_label_no_minor_ticks(tmp_path):
    store = sweep_store(tmp_path / "sweeps.db", 2)
    data = load_report_data(store)
    store.dispose()
    with report_style():
        figure = sweep_figure(data)
        figure.savefig(io.BytesIO(), format="png")
    panels = [ax for ax in figure.axes if ax.get_visible() and ax.axison]
    for ax in panels:
        assert ax.get_xscale() == "log", ax.get_title()
        assert isinstance(ax.xaxis.get_minor_formatter(), ticker.NullFormatter), ax.get_title()
        labels = [label.get_text() for label in ax.get_xticklabels()]
        assert all("\\times" not in label for label in labels), labels
    alpha0_labels = [label.get_text() for label in panels[1].get_xticklabels()]
    assert alpha0_labels == ["0.03", "0.1", "0.3"]


def test_sweep_legends_outside_panels(tmp_path):
    store = sweep_store(tmp_path / "sweeps.db", 6)
    data = load_report_data(store)
    store.dispose()
    with report_style():
        figure = sweep_figure(data)
        canvas = FigureCanvasAgg(figure)
        canvas.draw()
    renderer = canvas.get_renderer()
    for ax in figure.axes:
        legend = ax.get_legend()
        if legend is None or not ax.axison:
            continue
        assert legend.get_window_extent(renderer).y1 < ax.get_window_extent(renderer).y0


def test_loss_legend_counts_every_seed(tmp_path):
    store = open_store(str(tmp_path / "seeds.db"))
    for seed in range(2):
        add_run(store, "1", seed, [2.3, 1.5, 1.0, 0.8])
    add_run(store, "1", 2, [math.nan] * 4)
    add_run(store, "2", 0, [2.3, 2.0, 1.8, 1.7], optimizer="learned-gradient")
    data = load_report_data(store)
    store.dispose()
    with report_style():
        figure = loss_vs_step_figure(data)
    texts = [text.get_text() for text in figure.axes[0].get_legend().get_texts()]
    assert "1: X network, Adam (n=3, mean of 2)" in texts
    assert any(text.startswith("2: ") and text.endswith("(n=1)") for text in texts)
    caption = figure.texts[-1].get_text()
    assert "n: seeds (runs) of the setup" in caption
    assert "Setup 1: 'mean of k'" in caption


def test_loss_bands_stay_inside_axis(tmp_path):
    store = open_store(str(tmp_path / "band.db"))
    add_run(store, "1", 0, [2.3, 1.0, 0.5, 0.3])
    add_run(store, "1", 1, [2.3, 0.1, 0.01, 0.001])
    data = load_report_data(store, smooth_window=1)
    store.dispose()
    means = data.means["step"]
    assert (means["low"] > 0).all()
    assert means["mean"].iloc[-1] == pytest.approx(math.sqrt(0.3 * 0.001))
    with report_style():
        figure = loss_vs_step_figure(data)
    ax = figure.axes[0]
    bottom, top = ax.get_ylim()
    assert bottom == pytest.approx(0.001 / 1.3)
    for band in ax.collections:
        for path in band.get_paths():
            assert path.vertices[:, 1].min() >= bottom * (1 - 1e-9)
            assert path.vertices[:, 1].max() <= top * (1 + 1e-9)


def test_setups_get_distinct_line_styles(tmp_path):
    setups = ["1", "2", "3", "4", "5", "6"]
    styles = group_line_styles(setups, setups)
    assert len({str(style) for style in styles.values()}) == 6
    store = open_store(str(tmp_path / "styles.db"))
    for setup in ("2", "3"):
        add_run(store, setup, 0, [2.3, 1.5, 1.0], optimizer="learned-gradient")
    data = load_report_data(store)
    store.dispose()
    with report_style():
        figure = loss_vs_step_figure(data)
    means = [line for line in figure.axes[0].lines if line.get_label().startswith(("2:", "3:"))]
    assert [line.get_linestyle() for line in means] == ["--", ":"]
    assert LINE_STYLES[1:3] == ("--", ":")


def test_wall_clock_texts_say_noisy(report_dir, store_path):
    out, _ = report_dir
    assert "Timings on a shared or loaded CPU are noisy" in (out / "summary.md").read_text()
    store = open_store(str(store_path))
    data = load_report_data(store)
    store.dispose()
    with report_style():
        for name in ("all_experiments_loss_over_time", "convergence_times"):
            caption = FIGURES[name](data).texts[-1].get_text()
            assert "shared or loaded CPU are noisy" in caption, name


def test_no_data_panel_hides_axis():
    figure = Figure()
    ax = figure.subplots()
    plots.draw_no_data(ax, "no data: nothing")
    assert not ax.axison
    assert ax.texts[0].get_text() == "no data: nothing"


# The summary table against plain SQL on the same store.


def test_summary_matches_store(report_dir, store_path):
    _, report = report_dir
    summary = report.summary.set_index("setup")
    expected = query(store_path, LATEST_RUNS)
    assert sorted(summary.index) == sorted(row[0] for row in expected)
    for setup, count, diverged, loss, accuracy in expected:
        row = summary.loc[setup]
        assert row["seeds"] == count, setup
        assert row["diverged"] == diverged, setup
        if loss is None:
            assert math.isnan(row["final_train_loss_mean"]), setup
        else:
            assert row["final_train_loss_mean"] == pytest.approx(loss), setup
        if accuracy is None:
            assert math.isnan(row["test_accuracy_mean"]), setup
        else:
            assert row["test_accuracy_mean"] == pytest.approx(accuracy), setup


def test_summary_ci_is_t_interval(report_dir, store_path):
    _, report = report_dir
    losses = [
        row[0]
        for row in query(
            store_path,
            "SELECT final_train_loss FROM runs WHERE kind = 'train' AND setup = '1' "
            "AND status = 'finished' ORDER BY id",
        )
    ][-2:]
    half_width = 12.706 * np.std(losses, ddof=1) / math.sqrt(2)
    row = report.summary.set_index("setup").loc["1"]
    assert row["final_train_loss_ci"] == pytest.approx(half_width, rel=1e-3)


def test_summary_ms_per_step_is_block_mean(report_dir, store_path):
    _, report = report_dir
    expected = query(
        store_path,
        "SELECT AVG(1000.0 * train_seconds / steps_done) FROM runs WHERE id IN "
        "(SELECT MAX(id) FROM runs WHERE kind = 'train' AND setup = '2' "
        "AND status IN ('finished', 'diverged') GROUP BY seed)",
    )[0][0]
    assert report.summary.set_index("setup").loc["2", "ms_per_step"] == pytest.approx(expected)


def test_interrupted_run_counted_in_note(report_dir, store_path):
    _, report = report_dir
    (interrupted,) = query(store_path, "SELECT id FROM runs WHERE status = 'interrupted'")[0]
    assert any("1 interrupted" in note and str(interrupted) in note for note in report.notes)


def test_default_target_from_setup_1(store_path):
    store = open_store(str(store_path))
    data = load_report_data(store)
    store.dispose()
    selected = data.selection.runs
    setup_1 = selected[(selected["setup"] == "1") & (selected["status"] == "finished")]
    finals = frames.final_smoothed_loss(data.curves).set_index("run_id")
    expected = 1.1 * finals.loc[setup_1["run_id"], "final_smooth_loss"].mean()
    assert data.target.value == pytest.approx(expected)
    assert "1.1 ×" in data.target.description
    assert "training loss of setup 1 (X network, Adam), over 2 finished runs" in (
        data.target.description
    )


# Selection rules.


def test_selection_takes_newest_finished_run(store_path):
    store = open_store(str(store_path))
    selection = frames.select_runs(store.engine, setups=["1", "3"])
    store.dispose()
    expected = query(
        store_path,
        "SELECT MAX(id) FROM runs WHERE kind = 'train' AND setup IN ('1', '3') "
        "AND status IN ('finished', 'diverged') GROUP BY setup, seed",
    )
    (older,) = query(store_path, "SELECT MIN(id) FROM runs WHERE setup = '3'")[0]
    assert sorted(selection.runs["run_id"]) == sorted(row[0] for row in expected)
    assert older not in set(selection.runs["run_id"])
    assert list(selection.excluded["status"]) == ["interrupted"]


def test_run_ids_select_exactly(store_path):
    store = open_store(str(store_path))
    ids = [row[0] for row in query(store_path, "SELECT id FROM runs ORDER BY id LIMIT 3")]
    selection = frames.select_runs(store.engine, run_ids=ids)
    with pytest.raises(SelectionError, match="invalid --run 9999"):
        frames.select_runs(store.engine, run_ids=[ids[0], 9999])
    store.dispose()
    assert sorted(selection.runs["run_id"]) == ids


def test_unknown_sweep_rejected(store_path):
    store = open_store(str(store_path))
    with pytest.raises(SelectionError, match="invalid --sweep 999"):
        frames.select_runs(store.engine, sweep_id=999)
    store.dispose()


def test_setup_filter_without_runs(store_path):
    store = open_store(str(store_path))
    with pytest.raises(NoRunsError):
        frames.select_runs(store.engine, setups=["adam-third"])
    store.dispose()


def test_sweep_report_groups_configurations(store_path, tmp_path):
    store = open_store(str(store_path))
    (sweep_id,) = query(store_path, "SELECT id FROM sweeps")[0]
    report = build_report(store, tmp_path, image_format="pdf", sweep_id=sweep_id)
    data = load_report_data(store, sweep_id=sweep_id)
    store.dispose()
    assert (tmp_path / "sweep_sensitivity.pdf").read_bytes()[:5] == b"%PDF-"
    assert len(report.summary) == 3
    assert set(report.summary["seeds"]) == {2}
    means = data.sweep_means.set_index("x")
    assert not means.loc[10.0, "eligible"]
    assert means.loc[1e-2, "mean"] == pytest.approx(0.35)
    assert data.sweep_points.loc[data.sweep_points["best"], "x"].unique().tolist() == [1e-2]


# Statistics and conventions.


def test_t_quantile_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 9, 30, 31, 50, 200, 10_000):
        assert t_quantile_975(df) == pytest.approx(stats.t.ppf(0.975, df), rel=1e-4)


def test_mean_ci_one_value_has_no_interval():
    result = mean_ci([0.5, math.nan])
    assert result.mean == 0.5
    assert result.count == 1
    assert math.isnan(result.half_width)


def test_moving_average_marks_nan_windows():
    values = np.array([4.0, 2.0, math.nan, 1.0, 1.0, 1.0, 1.0])
    smoothed = moving_average(values, 3)
    assert smoothed[0] == 4.0
    assert smoothed[1] == 3.0
    assert np.isnan(smoothed[2:5]).all()
    assert smoothed[5] == 1.0
    assert smoothed[6] == 1.0


def test_grad_evals_decay_refresh_every_k():
    steps = np.arange(1, 8)
    assert frames.grad_evals_per_step("learned-decay", steps, 3).tolist() == [2, 1, 1, 2, 1, 1, 2]
    assert frames.cumulative_grad_evals("learned-decay", steps, 3).tolist() == [
        2,
        3,
        4,
        6,
        7,
        8,
        10,
    ]
    assert frames.cumulative_grad_evals("learned-hvp", steps).tolist() == list(range(2, 15, 2))
    assert frames.cumulative_grad_evals("adam", steps).tolist() == list(range(1, 8))


def test_time_to_target_never_counts_nan():
    curves = pd.DataFrame(
        {
            "run_id": [1, 1, 1, 2, 2],
            "step": [1, 2, 3, 1, 2],
            "seconds": [0.1, 0.2, 0.3, 0.1, 0.2],
            "smooth_loss": [math.nan, 0.6, 0.4, math.nan, math.nan],
        }
    )
    runs = pd.DataFrame(
        {
            "run_id": [1, 2, 3],
            "group": ["a", "a", "a"],
            "seed": [0, 1, 2],
            "status": ["finished"] * 3,
        }
    )
    times = frames.time_to_target(curves, runs, 0.5).set_index("run_id")
    assert times.loc[1, "reached"]
    assert times.loc[1, "seconds"] == 0.3
    assert not times.loc[2, "reached"]
    assert not times.loc[3, "reached"]
    summary = frames.convergence_summary(times.reset_index(), ["a"]).iloc[0]
    assert summary["reached"] == 1
    assert math.isnan(summary["mean"])


def test_mean_curves_stop_at_shortest_seed():
    curves = pd.DataFrame(
        {
            "group": ["a"] * 5,
            "run_id": [1, 1, 1, 2, 2],
            "seconds": [0.1, 0.3, 0.5, 0.2, 0.4],
            "smooth_loss": [3.0, 2.0, 1.0, 2.5, 1.5],
        }
    )
    means = frames.mean_curves(curves, "seconds")
    assert means["x"].min() == pytest.approx(0.2)
    assert means["x"].max() == pytest.approx(0.4)
    at_start = means.iloc[0]
    assert at_start["mean"] == pytest.approx((2.5 + 2.5) / 2)
    assert at_start["seeds"] == 2


def test_sqlite_steps_match_sqlalchemy_read(tmp_path):
    store = open_store(str(tmp_path / "steps.db"))
    losses = [2.0, math.nan, math.inf, 0.5, 0.0]
    first = add_run(store, "1", 0, losses)
    second = add_run(store, "1", 1, [1.0, 0.9])
    add_run(store, "1", 2, [7.0])
    steps = frames.load_steps(store.engine, [second, first])
    assert steps["run_id"].tolist() == [first] * 5 + [second] * 2
    assert steps["step"].tolist() == [1, 2, 3, 4, 5, 1, 2]
    assert steps.dtypes.to_dict() == {
        "run_id": np.dtype("int64"),
        "step": np.dtype("int64"),
        "epoch": np.dtype("int64"),
        "loss": np.dtype("float64"),
        "seconds": np.dtype("float64"),
    }
    np.testing.assert_array_equal(steps["loss"].to_numpy()[:5], losses)
    query = (
        frames.select(frames.Step.run_id, frames.Step.step, frames.Step.epoch)
        .add_columns(frames.Step.loss, frames.Step.seconds)
        .where(frames.Step.run_id.in_([first, second]))
        .order_by(frames.Step.run_id, frames.Step.step)
    )
    pd.testing.assert_frame_equal(steps, pd.read_sql(query, store.engine))
    assert frames.load_steps(store.engine, []).empty
    store.dispose()


def test_thinned_curve_keeps_extremes_gaps_and_ends():
    values = np.sin(np.linspace(0, 20, 20_000)) + 2.0
    values[7_000] = 50.0
    values[12_000:12_010] = math.nan
    keep = plots.thin_indices(values, max_points=2_000)
    assert len(keep) <= 2_000
    assert (np.diff(keep) > 0).all()
    assert keep[0] == 0
    assert keep[-1] == len(values) - 1
    assert 7_000 in keep
    assert np.isnan(values[keep]).any()
    assert np.nanmin(values[keep]) == np.nanmin(values)
    short = np.arange(5.0)
    assert plots.thin_indices(short, max_points=2_000).tolist() == [0, 1, 2, 3, 4]


def test_sweep_criteria_all_mapped():
    sweep = pytest.importorskip("stepcli.sweep")
    for name, column in sweep.CRITERIA.items():
        assert frames.CRITERION_COLUMNS[name] == column


# Export.


@pytest.mark.parametrize("export_format", ["csv", "parquet"])
def test_export_streams_every_row(store_path, tmp_path, export_format):
    store = open_store(str(store_path))
    path = tmp_path / f"steps.{export_format}"
    rows = export_table(store.engine, "steps", export_format, path, chunk_rows=7)
    store.dispose()
    (expected,) = query(store_path, "SELECT COUNT(*) FROM steps")[0]
    (nulls,) = query(store_path, "SELECT COUNT(*) FROM steps WHERE loss IS NULL")[0]
    assert rows == expected
    frame = read_export(path)
    assert len(frame) == expected
    assert list(frame.columns) == ["run_id", "step", "epoch", "loss", "seconds"]
    assert int(frame["loss"].isna().sum()) == nulls
    assert not list(tmp_path.glob("*.part"))


def test_export_runs_json_as_text(store_path, tmp_path):
    store = open_store(str(store_path))
    path = tmp_path / "runs.parquet"
    export_table(store.engine, "runs", "parquet", path, chunk_rows=4)
    store.dispose()
    table = pq.read_table(path)
    assert str(table.schema.field("sweep_id").type) == "int64"
    hparams = [json.loads(text) for text in table.column("hparams").to_pylist()]
    stored = [
        json.loads(row[0]) for row in query(store_path, "SELECT hparams FROM runs ORDER BY id")
    ]
    assert hparams == stored


# The CLI in a subprocess.


def test_cli_report_and_export(store_path, tmp_path, cli):
    out = tmp_path / "figures"
    result = cli(
        "report",
        "--db",
        str(store_path),
        "--out",
        str(out),
        "--table-format",
        "json",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    expected = {row[0]: row[1] for row in query(store_path, LATEST_RUNS)}
    assert {row["setup"]: row["seeds"] for row in rows} == expected
    for name in FIGURE_FILES:
        assert (out / f"{name}.png").stat().st_size > 0, name

    (steps,) = query(store_path, "SELECT COUNT(*) FROM steps")[0]
    result = cli(
        "export", "--db", str(store_path), "--table", "steps", "--format", "parquet", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert pq.read_metadata(tmp_path / "exports" / "steps.parquet").num_rows == steps

    target = tmp_path / "steps.csv"
    result = cli(
        "export",
        "--db",
        str(store_path),
        "--table",
        "steps",
        "--format",
        "csv",
        "--out",
        str(target),
    )
    assert result.returncode == 0, result.stderr
    with target.open() as handle:
        assert sum(1 for _ in csv.reader(handle)) == steps + 1


def test_cli_empty_store_exits_1(tmp_path, cli):
    db = tmp_path / "empty.db"
    open_store(str(db)).dispose()
    result = cli("report", "--db", str(db), "--out", str(tmp_path / "out"))
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"error: no runs to report in {db}; run stepcli train or stepcli experiment first"
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--format", "jpg"], "invalid --format 'jpg'"),
        (["--table-format", "html"], "invalid --table-format 'html'"),
        (["--target-loss", "-1"], "invalid --target-loss -1.0"),
        (["--run", "a,b"], "invalid --run 'a,b'"),
    ],
)
def test_cli_report_bad_option_exits_2(tmp_path, cli, args, message):
    db = tmp_path / "empty.db"
    open_store(str(db)).dispose()
    result = cli("report", "--db", str(db), *args)
    assert result.returncode == 2
    assert message in result.stderr
