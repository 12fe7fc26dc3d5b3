"""A PostgreSQL server for the tests and the benchmark.

``CIO_TEST_POSTGRES_URL`` names a running server to use. Without it, a throwaway server
is started from ``initdb``/``pg_ctl`` (on PATH or under /usr/lib/postgresql/*/bin) in a
temporary folder, listening on 127.0.0.1 only, with a random password, and removed at
the end. As root it runs as the ``postgres`` OS user (the server refuses to run as root).

Each test gets its own PostgreSQL schema of that server (``?schema=t_...`` in the outbox
URL), dropped after the test, so tests never see each other's rows.

    python tests/pg.py      # start a throwaway server, print its URL, stop on Ctrl-C
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

ENV = "CIO_TEST_POSTGRES_URL"
SERVER_USER = "postgres"

# Fast and throwaway: nothing here must survive a power loss.
TEST_SETTINGS = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "200",
}


def find_bin_dir() -> Path | None:
    """The folder holding initdb and pg_ctl, or None."""
    initdb = shutil.which("initdb")
    if initdb and shutil.which("pg_ctl"):
        return Path(os.path.realpath(initdb)).parent
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    for initdb_path in reversed(versions):
        if (initdb_path.parent / "pg_ctl").exists():
            return initdb_path.parent
    return None


def driver_missing_reason() -> str | None:
    """Why the PostgreSQL tests cannot talk to a server from here, or None."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return ("the PostgreSQL driver is not installed: pip install -e '.[dev]' "
                "(or '.[postgres]') installs psycopg")
    return None


def unavailable_reason() -> str | None:
    """Why no throwaway server can be started here, or None when one can."""
    if find_bin_dir() is None:
        return (
            f"no PostgreSQL server: set {ENV}=postgresql://user:pass@127.0.0.1:5432/db or "
            "install PostgreSQL (apt-get install postgresql) so that initdb and pg_ctl exist"
        )
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(SERVER_USER)
        except KeyError:
            return (
                f"running as root and there is no '{SERVER_USER}' OS user to run a throwaway "
                f"PostgreSQL server as; set {ENV} instead"
            )
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ThrowawayPostgres:
    """initdb + pg_ctl start in a temporary folder; stop() removes everything."""

    def __init__(self, *, settings: dict[str, str] | None = None) -> None:
        self.settings = dict(TEST_SETTINGS if settings is None else settings)
        self.bin_dir = find_bin_dir()
        self.base: Path | None = None
        self.url: str | None = None
        self._as_user: list[str] = []

    def _run(self, *argv: str) -> None:
        assert self.bin_dir is not None
        command = [*self._as_user, str(self.bin_dir / argv[0]), *argv[1:]]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120,
                                stdin=subprocess.DEVNULL)
        if result.returncode != 0:
            log = ""
            if self.base is not None and (self.base / "server.log").exists():
                log = (self.base / "server.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(
                f"{' '.join(argv[:2])} failed ({result.returncode}): "
                f"{result.stdout[-1000:]}{result.stderr[-2000:]}{log}"
            )

    def start(self) -> str:
        reason = unavailable_reason()
        if reason is not None:
            raise RuntimeError(reason)
        self.base = Path(tempfile.mkdtemp(prefix="cio-outbox-pg-"))
        data = self.base / "data"
        password = secrets.token_hex(16)
        pwfile = self.base / "pwfile"
        pwfile.write_text(password + "\n")
        if os.geteuid() == 0:
            user = pwd.getpwnam(SERVER_USER)
            self._as_user = ["runuser", "-u", SERVER_USER, "--"]
            os.chown(self.base, user.pw_uid, user.pw_gid)
            os.chown(pwfile, user.pw_uid, user.pw_gid)
        self._run("initdb", "-D", str(data), "-U", "postgres", "-A", "scram-sha-256",
                  f"--pwfile={pwfile}", "-E", "UTF8", "--locale=C", "--no-sync")
        pwfile.unlink()
        options = " ".join(f"-c {name}={value}" for name, value in self.settings.items())
        for _ in range(5):  # the free port may be taken between probing and binding
            port = _free_port()
            try:
                self._run(
                    "pg_ctl", "-D", str(data), "-l", str(self.base / "server.log"), "-w",
                    "-t", "60", "-o",
                    f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories='' "
                    + options,
                    "start",
                )
            except RuntimeError:
                if "could not bind" in (self.base / "server.log").read_text(errors="replace"):
                    continue
                raise
            self.url = f"postgresql://postgres:{password}@127.0.0.1:{port}/postgres"
            return self.url
        raise RuntimeError("could not find a free port for PostgreSQL")

    def stop(self) -> None:
        if self.base is None:
            return
        with contextlib.suppress(Exception):
            self._run("pg_ctl", "-D", str(self.base / "data"), "-m", "immediate", "-w",
                      "stop")
        shutil.rmtree(self.base, ignore_errors=True)
        self.base = None
        self.url = None


def schema_url(url: str, schema: str | None = None) -> str:
    """The URL of a fresh outbox on this server: its own schema (``?schema=``)."""
    schema = schema or "t_" + uuid.uuid4().hex[:16]
    return f"{url}{'&' if '?' in url else '?'}schema={schema}"


def drop_schema(url: str) -> None:
    """Remove the schema an outbox URL names (the test's cleanup)."""
    import psycopg

    from cio_outbox.storage.postgres import split_location

    plain, schema = split_location(url)
    with psycopg.connect(plain, autocommit=True, connect_timeout=10) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


def check_server(url: str) -> None:
    """Raise with a readable reason when the server at url cannot be used."""
    import psycopg

    try:
        with psycopg.connect(url, connect_timeout=10) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        raise RuntimeError(f"{ENV} is set but the server cannot be used: {exc}") from None


@contextlib.contextmanager
def server_url() -> Iterator[str]:
    """CIO_TEST_POSTGRES_URL, or a throwaway server for the duration of the block."""
    url = os.environ.get(ENV)
    if url:
        check_server(url)
        yield url
        return
    server = ThrowawayPostgres()
    try:
        yield server.start()
    finally:
        server.stop()


if __name__ == "__main__":
    server = ThrowawayPostgres(settings={})
    print(server.start(), flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
        sys.exit(0)
