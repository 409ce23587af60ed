"""The sweep command against real MNIST subsets, a real SQLite store and the CLI in a subprocess."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
import torch

from stepcli.data import balanced_subset, split_validation
from stepcli.store import open_store
from stepcli.store.queries import latest_sweep
from stepcli.sweep import PointResult, SeedResult, edge_warnings, rank_points

SMALL = ("--allow-cpu", "--epochs", "1", "--batch-size", "128", "--subset-size", "500")


def sweep_args(mnist_dir, db, *args: str) -> list[str]:
    return ["sweep", *args, *SMALL, "--data-dir", str(mnist_dir), "--db", str(db)]


def query(db, sql: str, *params) -> list[tuple]:
    with sqlite3.connect(db) as connection:
        return connection.execute(sql, params).fetchall()


def finished_runs(db) -> int:
    """Count finished runs, or 0 while the store does not exist yet."""
    if not db.exists():
        return 0
    try:
        return query(db, "SELECT count(*) FROM runs WHERE status = 'finished'")[0][0]
    except sqlite3.OperationalError:
        return 0


def point(value: float, *results: tuple[str, float | None]) -> PointResult:
    seeds = [SeedResult(i, i + 1, status, v) for i, (status, v) in enumerate(results)]
    return PointResult({"lr": value}, seeds)


# Selection rules, without training.


def test_rank_prefers_lowest_mean():
    rows = rank_points(
        [
            point(1e-3, ("finished", 0.5), ("finished", 0.7)),
            point(1e-2, ("finished", 0.4), ("finished", 0.4)),
        ]
    )
    assert [row.point["lr"] for row in rows] == [1e-2, 1e-3]
    assert rows[0].best
    assert not rows[1].best
    assert rows[1].mean == pytest.approx(0.6)
    assert rows[1].std == pytest.approx(0.1414, abs=1e-4)


def test_rank_never_selects_diverged_seed():
    # A lower mean over the finished seed does not beat a point whose seeds all finished.
    rows = rank_points(
        [
            point(1e-1, ("finished", 0.01), ("diverged", None)),
            point(1e-3, ("finished", 0.9), ("finished", 0.9)),
        ]
    )
    assert rows[0].point == {"lr": 1e-3}
    assert rows[0].best
    assert rows[1].rank == 2
    assert rows[1].mean is None
    assert rows[1].diverged == 1


def test_rank_all_diverged_selects_nothing():
    rows = rank_points([point(10.0, ("diverged", None)), point(100.0, ("failed", None))])
    assert not any(row.best for row in rows)
    assert rows[1].missing == 1


def test_edge_warnings_name_axis_and_direction():
    grid = {"alpha0": (0.03, 0.1, 0.3), "meta_lr": (0.03, 0.1, 0.3), "gamma": (0.9,)}
    warnings = edge_warnings(grid, {"alpha0": 0.3, "meta_lr": 0.03, "gamma": 0.9})
    assert warnings == [
        "best alpha0 0.3 is the largest value on the grid; extend --alpha0s upward",
        "best meta_lr 0.03 is the smallest value on the grid; extend --meta-lrs downward",
    ]
    assert edge_warnings(grid, {"alpha0": 0.1, "meta_lr": 0.1, "gamma": 0.9}) == []


# The command on real MNIST.


def test_diverged_runs_stored_never_selected(tmp_path, mnist_dir, cli):
    db = tmp_path / "r.db"
    result = cli(
        *sweep_args(mnist_dir, db, "adam", "--lrs", "1e-3,10,100", "--seeds", "2"),
        "--format",
        "json",
    )
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["best"]["config"] == {"lr": 1e-3}
    assert [row["config"]["lr"] for row in payload["rows"]] == [1e-3, 10.0, 100.0]
    assert [row["diverged"] for row in payload["rows"]] == [0, 2, 2]
    assert payload["rows"][0]["best"]

    statuses = query(db, "SELECT json_extract(hparams, '$.lr'), status, kind FROM runs")
    assert len(statuses) == 6
    assert {(lr, status) for lr, status, _ in statuses} == {
        (1e-3, "finished"),
        (10.0, "diverged"),
        (100.0, "diverged"),
    }
    assert {kind for _, _, kind in statuses} == {"sweep"}
    sweeps = query(db, "SELECT id, target, status, best_config, best_value FROM sweeps")
    assert len(sweeps) == 1
    sweep_id, target, status, best_config, best_value = sweeps[0]
    assert (target, status) == ("1", "finished")
    assert json.loads(best_config) == {"lr": 1e-3}
    assert best_value == pytest.approx(payload["best"]["value"])
    assert query(db, "SELECT DISTINCT sweep_id FROM runs") == [(sweep_id,)]
    # 1e-3 is the smallest value, so the grid should extend downward.
    assert "extend --lrs downward" in result.stderr

    trained = cli("train", "--setup", "1", *SMALL, "--data-dir", str(mnist_dir), "--db", str(db))
    assert trained.returncode == 0, trained.stderr
    assert f"lr=0.001 from sweep {sweep_id}" in trained.stderr
    lr = query(db, "SELECT json_extract(hparams, '$.lr') FROM runs WHERE kind = 'train'")
    assert lr == [(1e-3,)]


def test_bracketed_best_gives_no_edge_warning(tmp_path, mnist_dir, cli):
    db = tmp_path / "r.db"
    result = cli(*sweep_args(mnist_dir, db, "adam", "--lrs", "1e-4,3e-3,10", "--seeds", "1"))
    assert result.returncode == 0, result.stderr
    best = query(db, "SELECT best_config FROM sweeps")
    assert json.loads(best[0][0]) == {"lr": 3e-3}
    assert "warning" not in result.stderr


def test_edge_of_grid_warning(tmp_path, mnist_dir, cli):
    db = tmp_path / "r.db"
    result = cli(*sweep_args(mnist_dir, db, "adam", "--lrs", "1e-4,3e-4", "--seeds", "1"))
    assert result.returncode == 0, result.stderr
    assert (
        "warning: best lr 0.0003 is the largest value on the grid; extend --lrs upward"
        in result.stderr
    )


def test_all_diverged_exits_nonzero(tmp_path, mnist_dir, cli):
    db = tmp_path / "r.db"
    result = cli(*sweep_args(mnist_dir, db, "sgd", "--lrs", "10,100", "--seeds", "1"))
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: sweep 1 of setup sgd selected no configuration: every run diverged (2 of 2); "
        "try smaller values of --lrs"
    ]
    sweeps = query(db, "SELECT status, best_config IS NULL, best_value IS NULL FROM sweeps")
    assert sweeps == [("finished", 1, 1)]
    assert query(db, "SELECT status FROM runs") == [("diverged",), ("diverged",)]
    assert latest_sweep(open_store(str(db)), "sgd") is None


def test_learned_setup_sweeps_both_axes(tmp_path, mnist_dir, cli):
    db = tmp_path / "r.db"
    args = ("setup-2", "--alpha0s", "0.1", "--meta-lrs", "0.03,0.1", "--seeds", "1")
    result = cli(*sweep_args(mnist_dir, db, *args), "--format", "json")
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["target"] == "2"
    assert set(payload["best"]["config"]) == {"alpha0", "meta_lr"}
    stored = query(db, "SELECT target, best_config FROM sweeps")
    assert stored[0][0] == "2"
    assert json.loads(stored[0][1]) == payload["best"]["config"]
    hparams = query(db, "SELECT json_extract(hparams, '$.meta_lr') FROM runs ORDER BY id")
    assert hparams == [(0.03,), (0.1,)]


def test_rerun_skips_finished_runs(tmp_path, mnist_dir, cli):
    db = tmp_path / "r.db"
    args = sweep_args(mnist_dir, db, "adam", "--lrs", "1e-3,2e-3", "--seeds", "1")
    first = cli(*args, "--gpus-per-run", "0.5")
    assert first.returncode == 0, first.stderr
    assert "sweep 1: 2 runs, 0 already done, 2 to run" in first.stderr

    second = cli(*args)
    assert second.returncode == 0, second.stderr
    assert "sweep 1: 2 runs, 2 already done, 0 to run" in second.stderr
    assert query(db, "SELECT count(*) FROM runs") == [(2,)]
    assert query(db, "SELECT count(*), status FROM sweeps") == [(1, "finished")]
    assert query(db, "SELECT DISTINCT executor, gpus_per_run FROM runs") == [("local", 0.5)]

    # A wider grid is a new sweep, and the runs it shares with the first one are not trained.
    wider = cli(*sweep_args(mnist_dir, db, "adam", "--lrs", "1e-3,2e-3,5e-3", "--seeds", "1"))
    assert wider.returncode == 0, wider.stderr
    assert "sweep 2: 3 runs, 2 already done, 1 to run" in wider.stderr
    assert query(db, "SELECT count(*) FROM runs") == [(3,)]


def test_force_reruns_everything(tmp_path, mnist_dir, cli):
    db = tmp_path / "r.db"
    args = sweep_args(mnist_dir, db, "adam", "--lrs", "1e-3,2e-3", "--seeds", "1")
    first = cli(*args, "--format", "json")
    assert first.returncode == 0, first.stderr
    forced = cli(*args, "--force", "--format", "json")
    assert forced.returncode == 0, forced.stderr
    assert "sweep 1: 2 runs, 0 skipped (--force), 2 to run" in forced.stderr
    assert query(db, "SELECT count(*) FROM runs WHERE sweep_id = 1") == [(4,)]
    assert query(db, "SELECT count(*) FROM sweeps") == [(1,)]
    run_ids = [run["run_id"] for row in json.loads(forced.stdout)["rows"] for run in row["runs"]]
    assert sorted(run_ids) == [3, 4]
    # The same seed and settings on the same code give the same numbers.
    assert json.loads(forced.stdout)["best"] == json.loads(first.stdout)["best"]


def test_val_loss_selection_uses_held_out_split(tmp_path, mnist_dir, mnist_cpu, cli):
    db = tmp_path / "r.db"
    args = ("adam", "--lrs", "1e-3,3e-3", "--seeds", "2", "--select-by", "val-loss")
    result = cli(*sweep_args(mnist_dir, db, *args, "--val-size", "400"), "--format", "json")
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["criterion"] == "val-loss"

    runs = query(
        db,
        "SELECT id, seed, final_val_loss, final_train_loss, json_extract(hparams, '$.val_size')"
        " FROM runs",
    )
    assert {row[4] for row in runs} == {400}
    by_id = {row[0]: row for row in runs}
    for row in payload["rows"]:
        for run in row["runs"]:
            assert run["value"] == by_id[run["run_id"]][2]
            assert run["value"] != by_id[run["run_id"]][3]
    best_runs = [by_id[run["run_id"]] for run in payload["rows"][0]["runs"]]
    expected = sum(row[2] for row in best_runs) / len(best_runs)
    stored = query(db, "SELECT criterion, best_value FROM sweeps")
    assert stored[0][0] == "val-loss"
    assert stored[0][1] == pytest.approx(expected)

    labels = mnist_cpu.train_labels
    for seed in (0, 1):
        subset = balanced_subset(labels, 500, seed)
        validation = split_validation(labels, subset, 400, seed)
        assert len(validation) == 400
        assert not bool(torch.isin(validation, subset).any())


def test_interrupted_sweep_resumes(tmp_path, mnist_dir):
    db = tmp_path / "r.db"
    args = sweep_args(mnist_dir, db, "adam", "--lrs", "1e-4,3e-4,1e-3,3e-3", "--seeds", "2")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "stepcli", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        while process.poll() is None and finished_runs(db) == 0:
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, stderr
    assert "run the same command again to resume" in stderr
    assert query(db, "SELECT status FROM sweeps") == [("interrupted",)]
    statuses = [row[0] for row in query(db, "SELECT status FROM runs")]
    assert "running" not in statuses
    done = statuses.count("finished") + statuses.count("diverged")
    assert 1 <= done < 8

    resumed = subprocess.run(
        [sys.executable, "-m", "stepcli", *args], env=env, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"sweep 1: 8 runs, {done} already done, {8 - done} to run" in resumed.stderr
    assert query(db, "SELECT status FROM sweeps") == [("finished",)]
    finished = query(
        db, "SELECT config_key FROM runs WHERE status IN ('finished', 'diverged') AND sweep_id = 1"
    )
    assert len(finished) == 8
    assert len(set(finished)) == 8


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("adam", "--lrs="), "error: invalid --lrs '': give comma-separated numbers"),
        (("adam", "--lrs", "-1"), "error: invalid --lrs value -1: must be > 0"),
        (("setup-9",), "error: invalid setup 'setup-9': choose adam, setup-1"),
        (("adam", "--seeds", "0"), "error: invalid --seeds 0: must be an integer from 1 to 1000"),
        (("adam", "--alpha0s", "0.1"), "error: invalid --alpha0s: setup 1"),
    ],
)
def test_bad_input_exits_2(tmp_path, mnist_dir, cli, args, message):
    db = tmp_path / "r.db"
    result = cli(*sweep_args(mnist_dir, db, *args))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(message)
    assert not db.exists()
