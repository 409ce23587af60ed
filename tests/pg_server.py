"""A throwaway PostgreSQL server for tests: initdb and pg_ctl on a loopback port in a temp folder.

The server binaries come from ``$STEPCLI_TEST_PG_BIN``, else ``PATH``, else the Debian layout
``/usr/lib/postgresql/*/bin`` (the ``postgresql`` package that ``.ci/run`` installs). PostgreSQL
refuses to run as root, so under root the server runs as the ``postgres`` user (or ``nobody``)
and its folder is handed to that user. Authentication is ``trust``, so only loopback clients
are accepted: the server listens on 127.0.0.1 and on a unix socket in its own folder.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

BIN_ENV = "STEPCLI_TEST_PG_BIN"
START_TIMEOUT_S = 60
SERVER_USERS = ("postgres", "nobody")


class PostgresUnavailable(RuntimeError):
    """The PostgreSQL server binaries are missing or the server did not start."""


@dataclass(frozen=True)
class PostgresServer:
    """A running server: its port and the superuser that tests connect as."""

    port: int
    user: str
    folder: Path

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """Create an empty database with a unique name and return its SQLAlchemy URL."""
        import psycopg

        name = f"stepcli_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(
            host="127.0.0.1", port=self.port, user=self.user, dbname="postgres", autocommit=True
        ) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


def find_bin_dir() -> Path:
    """Return the folder that contains ``initdb``, ``pg_ctl`` and ``postgres``."""
    candidates = []
    if os.environ.get(BIN_ENV):
        candidates.append(Path(os.environ[BIN_ENV]))
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]
    for folder in candidates:
        if all((folder / name).is_file() for name in ("initdb", "pg_ctl", "postgres")):
            return folder
    raise PostgresUnavailable(
        "PostgreSQL server binaries not found (initdb, pg_ctl, postgres): install them with "
        f"apt-get install postgresql, or set {BIN_ENV} to their folder"
    )


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _server_account() -> pwd.struct_passwd | None:
    """Return the account to run the server as under root; ``None`` when not root."""
    if os.geteuid() != 0:
        return None
    for name in SERVER_USERS:
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise PostgresUnavailable(
        f"running as root and none of the users {', '.join(SERVER_USERS)} exists; "
        "PostgreSQL refuses to run as root, so create one of them"
    )


@contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    """Start a fresh server in a new temp folder, yield it, then stop it and delete the folder."""
    bin_dir = find_bin_dir()
    account = _server_account()
    folder = Path(tempfile.mkdtemp(prefix="stepcli-pg-"))
    data = folder / "data"
    log_file = folder / "server.log"
    as_user: dict = {}
    if account is not None:
        os.chown(folder, account.pw_uid, account.pw_gid)
        as_user = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
    superuser = "stepcli"
    port = _free_loopback_port()

    def run(*args: str) -> None:
        completed = subprocess.run(
            args, cwd=folder, capture_output=True, text=True, timeout=START_TIMEOUT_S, **as_user
        )
        if completed.returncode != 0:
            detail = (completed.stderr or completed.stdout).strip().splitlines()[-3:]
            raise PostgresUnavailable(f"{Path(args[0]).name} failed: {' | '.join(detail)}")

    started = False
    try:
        run(
            str(bin_dir / "initdb"),
            "-D",
            str(data),
            "-U",
            superuser,
            "--auth=trust",
            "--encoding=UTF8",
            "--no-sync",
        )
        # Durability settings are off because the data is thrown away after the tests.
        options = (
            f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        started = True
        run(
            str(bin_dir / "pg_ctl"),
            "-D",
            str(data),
            "-l",
            str(log_file),
            "-o",
            options,
            "-w",
            "start",
        )
        yield PostgresServer(port=port, user=superuser, folder=folder)
    except PostgresUnavailable as exc:
        log_tail = log_file.read_text().splitlines()[-5:] if log_file.exists() else []
        raise PostgresUnavailable(f"{exc} {' | '.join(log_tail)}".strip()) from None
    finally:
        if started:
            subprocess.run(
                [str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                cwd=folder,
                capture_output=True,
                timeout=START_TIMEOUT_S,
                **as_user,
            )
        shutil.rmtree(folder, ignore_errors=True)
