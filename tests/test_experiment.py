import json
import sqlite3

from stepcli.experiment import REFERENCE_STEPS, default_grid, fresh_seeds
from stepcli.setups import META_LR_GRID

TINY = [
    "--setup", "1,2", "--seeds", "1", "--tuning-seeds", "1", "--subset-size", "300",
    "--epochs", "1", "--batch-size", "128", "--allow-cpu",
]  # fmt: skip


def test_experiment_end_to_end_and_resume(cli, tmp_path, mnist_dir):
    db = tmp_path / "r.db"
    out = tmp_path / "out"
    args = ["experiment", *TINY, "--data-dir", str(mnist_dir), "--db", str(db), "--out", str(out)]

    first = cli(*args, "--table-format", "csv")
    assert first.returncode == 0, first.stderr
    connection = sqlite3.connect(db)
    sweeps = connection.execute("SELECT target, status FROM sweeps ORDER BY id").fetchall()
    assert sweeps == [("1", "finished"), ("2", "finished")]
    sweep_runs = connection.execute("SELECT COUNT(*) FROM runs WHERE kind = 'sweep'").fetchone()
    assert sweep_runs[0] == 18
    final = connection.execute(
        "SELECT setup, seed, status FROM runs WHERE kind = 'train' ORDER BY setup"
    ).fetchall()
    assert final == [("1", 1000, "finished"), ("2", 1000, "finished")]
    hparams = connection.execute("SELECT hparams FROM runs WHERE kind = 'train' AND setup = '1'")
    best = connection.execute("SELECT best_config FROM sweeps WHERE target = '1'").fetchone()[0]
    assert json.loads(hparams.fetchone()[0])["lr"] == json.loads(best)["lr"]
    connection.close()

    for name in ("all_experiments_loss_over_time.png", "convergence_times.png", "summary.csv"):
        assert (out / name).stat().st_size > 0
    header, *rows = first.stdout.strip().splitlines()
    assert header.startswith("setup")
    assert [row.split(",")[0] for row in rows] == ["1", "2"]

    second = cli(*args)
    assert second.returncode == 0, second.stderr
    assert "18 runs" not in second.stderr
    assert "9 runs, 9 already done" in second.stderr
    assert "2 already done" in second.stderr
    connection = sqlite3.connect(db)
    assert connection.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 20


def test_experiment_rejects_bad_seeds(cli, tmp_path, mnist_dir):
    done = cli("experiment", "--seeds", "0", "--allow-cpu", "--db", str(tmp_path / "r.db"))
    assert done.returncode == 2
    assert "invalid --seeds 0" in done.stderr
    assert not (tmp_path / "r.db").exists()


def test_meta_lr_grid_scaled_for_long_runs():
    assert default_grid("2", REFERENCE_STEPS)["meta_lr"] == META_LR_GRID
    assert default_grid("2", 100)["meta_lr"] == META_LR_GRID
    assert default_grid("2", 2 * REFERENCE_STEPS)["meta_lr"] == (0.015, 0.05, 0.15)
    assert "meta_lr" not in default_grid("1", 10 * REFERENCE_STEPS)


def test_fresh_seeds_avoid_tuning_seeds():
    assert fresh_seeds(3) == (1000, 1001, 1002)
