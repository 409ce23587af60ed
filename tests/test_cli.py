import json
import sqlite3

import pytest

import stepcli

SMALL = ["--allow-cpu", "--subset-size", "600", "--epochs", "2", "--batch-size", "128"]


def test_version(cli):
    done = cli("--version")
    assert done.returncode == 0
    assert done.stdout.strip() == f"stepcli {stepcli.__version__}"


def test_train_end_to_end(cli, tmp_path, mnist_dir):
    db = tmp_path / "r.db"
    done = cli(
        "train",
        "--setup",
        "1",
        "--lr",
        "3e-3",
        *SMALL,
        "--data-dir",
        str(mnist_dir),
        "--db",
        str(db),
    )
    assert done.returncode == 0, done.stderr
    assert "parameter budget" in done.stderr
    assert "finished" in done.stdout

    listed = cli("runs", "--db", str(db), "--format", "json")
    assert listed.returncode == 0, listed.stderr
    runs = json.loads(listed.stdout)
    assert len(runs) == 1
    run = runs[0]
    assert run["status"] == "finished"
    assert run["setup"] == "1"
    assert run["hparams"]["lr"] == 3e-3
    assert run["steps"] == 10
    assert run["network_params"] == 203_530

    connection = sqlite3.connect(db)
    steps = connection.execute(
        "SELECT COUNT(*) FROM steps WHERE run_id = ?", (run["id"],)
    ).fetchone()[0]
    evals = connection.execute(
        "SELECT COUNT(*) FROM evals WHERE run_id = ?", (run["id"],)
    ).fetchone()[0]
    assert steps == 10
    assert evals == 3


def test_runs_formats(cli, tmp_path, mnist_dir):
    db = tmp_path / "r.db"
    cli("train", "--setup", "5", *SMALL, "--data-dir", str(mnist_dir), "--db", str(db))
    as_csv = cli("runs", "--db", str(db), "--format", "csv")
    assert as_csv.returncode == 0
    header, row = as_csv.stdout.strip().splitlines()
    assert header.startswith("id,setup,kind")
    assert row.startswith("1,5,train")
    as_table = cli("runs", "--db", str(db))
    assert "finished" in as_table.stdout


def test_data_dir_from_environment(cli, tmp_path, mnist_dir):
    db = tmp_path / "r.db"
    done = cli(
        "-q",
        "train",
        "--setup",
        "1",
        *SMALL,
        "--db",
        str(db),
        env={"STEPCLI_DATA_DIR": str(mnist_dir)},
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--setup", "7"], "invalid --setup '7'"),
        (["--lr", "-1"], "invalid --lr -1"),
        (["--batch-size", "0"], "invalid --batch-size 0"),
        (["--subset-size", "0"], "invalid --subset-size 0"),
        (["--subset-size", "-3"], "invalid --subset-size -3"),
        (["--subset-size", "58000"], "or 60000 for the whole training set"),
        (["--subset-size", "70000"], "invalid --subset-size 70000"),
        (["--epochs", "0"], "invalid --epochs 0"),
        (["--gamma", "1.5"], "invalid --gamma 1.5"),
        (["--alpha0", "5"], "invalid --alpha0 5"),
        (["--curvature", "fisher"], "invalid --curvature 'fisher'"),
        (["--batch-size", "abc"], "--batch-size"),
        (["--no-such-flag"], "No such option"),
    ],
)
def test_bad_options(cli, tmp_path, mnist_dir, args, fragment):
    db = tmp_path / "r.db"
    done = cli(
        "train",
        "--allow-cpu",
        "--epochs",
        "1",
        "--data-dir",
        str(mnist_dir),
        "--db",
        str(db),
        *args,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ")
    assert fragment in lines[-1]
    assert "Traceback" not in done.stderr


def test_whole_training_set_by_its_size(cli, tmp_path, mnist_dir):
    db = tmp_path / "r.db"
    done = cli(
        "-q",
        "train",
        "--setup",
        "5",
        "--allow-cpu",
        "--subset-size",
        "60000",
        "--epochs",
        "1",
        "--batch-size",
        "4096",
        "--data-dir",
        str(mnist_dir),
        "--db",
        str(db),
        "--format",
        "json",
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)[0]["steps"] == 15  # ceil(60000 / 4096)


def test_cuda_required_without_allow_cpu(cli, tmp_path, mnist_dir):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this check needs a machine without CUDA")
    done = cli("train", "--data-dir", str(mnist_dir), "--db", str(tmp_path / "r.db"))
    assert done.returncode == 2
    assert "--allow-cpu" in done.stderr
    assert not (tmp_path / "r.db").exists()


def test_missing_data_one_line(cli, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    done = cli("train", "--allow-cpu", "--data-dir", str(empty), "--db", str(tmp_path / "r.db"))
    assert done.returncode == 1
    error_lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1
    assert str(empty) in error_lines[0]
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "r.db").exists()


def test_mistyped_data_dir_left_absent(cli, tmp_path):
    mistyped = tmp_path / "mnsit" / "nested"
    done = cli("train", "--allow-cpu", "--data-dir", str(mistyped), "--db", str(tmp_path / "r.db"))
    assert done.returncode == 1
    assert str(mistyped) in done.stderr
    assert not (tmp_path / "mnsit").exists()
    assert not (tmp_path / "r.db").exists()
