"""Storage faults: read-only, locked, truncated, not a database, another application's
database. Each gives a StorageError naming the file and what to do, and damages nothing."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from _rel_support import cli_argv, cli_env, file_state

from cio_outbox import Outbox
from cio_outbox.storage import StorageError
from cio_outbox.storage.sqlite import SQLiteStorage


def _healthy(path: Path, rows: int = 2000) -> Path:
    with Outbox(path) as box:
        box.enqueue_many({"type": "track", "userId": f"u{i % 40}", "event": "E",
                          "properties": {"i": i}} for i in range(rows))
    return path  # closed: WAL checkpointed into the main file


def _count(path: Path) -> int:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT count(*) FROM messages").fetchone()[0]
    finally:
        conn.close()


def _assert_clear(exc: StorageError, path: Path, *hints: str) -> None:
    text = str(exc)
    assert str(path) in text, text
    for hint in hints:
        assert hint in text, text


# ---------------------------------------------------------------- read-only

PR_CAPBSET_DROP, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 24, 1, 2

READ_ONLY_PROBE = textwrap.dedent(
    """
    import json, sys
    from cio_outbox import Outbox
    from cio_outbox.storage import StorageError
    try:
        with Outbox(sys.argv[1]) as box:
            box.track("u1", "Written")
        print(json.dumps({"outcome": "written"}))
    except StorageError as exc:
        print(json.dumps({"outcome": "StorageError", "text": str(exc)}))
    """
)


def _drop_dac_override() -> None:
    """In the child before exec: remove the capabilities that let root ignore file modes
    from the bounding set, so the program it runs has them neither."""
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A folder outside pytest's private (0700) tmp tree, so another user can reach it."""
    folder = Path(tempfile.mkdtemp(prefix="cio-ro-"))
    folder.chmod(0o755)
    yield folder
    folder.chmod(0o755)
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize("what", ["file", "folder"])
def test_read_only_outbox_gives_a_clear_error_and_stays_intact(
    shared_dir: Path, what: str
) -> None:
    path = _healthy(shared_dir / "ro.db")
    before = file_state(path)
    if what == "file":
        path.chmod(0o444)  # the folder stays writable: -wal and -shm can be made
    else:
        path.chmod(0o644)
        shared_dir.chmod(0o555)  # the file is writable, its folder not
    try:
        if os.geteuid() == 0:
            # Root ignores file modes through CAP_DAC_OVERRIDE: run the attempt in a child
            # that dropped it (and CAP_DAC_READ_SEARCH), so the modes apply as to anyone.
            done = subprocess.run(
                [sys.executable, "-c", READ_ONLY_PROBE, str(path)], env=cli_env(),
                capture_output=True, text=True, timeout=60, preexec_fn=_drop_dac_override,
            )
            assert done.returncode == 0, done.stderr[-2000:]
            outcome = json.loads(done.stdout)
        else:
            try:
                with Outbox(path) as box:
                    box.track("u1", "Written")
                outcome = {"outcome": "written"}
            except StorageError as exc:
                outcome = {"outcome": "StorageError", "text": str(exc)}
    finally:
        shared_dir.chmod(0o755)
        path.chmod(0o644)
    if what == "folder" and outcome["outcome"] == "written":
        pytest.fail("wrote into an outbox whose folder is read-only")
    assert outcome["outcome"] == "StorageError", outcome
    assert str(path) in outcome["text"]
    assert "read-only" in outcome["text"] or "write access" in outcome["text"], outcome
    assert file_state(path)[""] == before[""]
    assert _count(path) == 2000


# ---------------------------------------------------------------- locked

HOLDER = textwrap.dedent(
    """
    import sqlite3, sys
    conn = sqlite3.connect(sys.argv[1], isolation_level=None)
    conn.execute("BEGIN EXCLUSIVE")
    conn.execute("INSERT INTO counts (run, status, n) VALUES ('holder', 'pending', 0)")
    print("locked", flush=True)
    sys.stdin.read()  # hold the lock until the test closes our stdin
    conn.execute("ROLLBACK")
    """
)


def test_outbox_locked_longer_than_the_busy_timeout(tmp_path: Path) -> None:
    path = _healthy(tmp_path / "locked.db")
    with Outbox(path) as box:
        box.status()  # now in WAL mode with a -wal file: the state a worker leaves
    before = _count(path)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], env=cli_env(),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(StorageError) as caught:
            SQLiteStorage(path, busy_timeout=1.0)
        _assert_clear(caught.value, path, "locked by another process", "more than 1 s",
                      "find the process holding it, or retry")
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=30)
    assert _count(path) == before
    with Outbox(path) as box:  # usable again once the other process let go
        box.track("u1", "After")
        assert box.status()["pending"] == before + 1


def test_a_write_waiting_on_a_lock_fails_clearly_and_writes_nothing(tmp_path: Path) -> None:
    path = _healthy(tmp_path / "locked2.db")
    box = Outbox(path)
    box.storage.close()
    box.storage = SQLiteStorage(path, busy_timeout=1.0)  # Outbox has no busy timeout option
    before = box.status()["pending"]
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], env=cli_env(),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        assert box.status()["pending"] == before  # WAL: readers are not blocked
        with pytest.raises(StorageError) as caught:
            box.track("u1", "Blocked")
        _assert_clear(caught.value, path, "locked by another process")
        with pytest.raises(StorageError):
            box.enqueue_many([{"type": "identify", "userId": "u2"}] * 10)
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=30)
    assert box.status()["pending"] == before
    box.track("u1", "After")
    assert box.status()["pending"] == before + 1
    box.close()


# ---------------------------------------------------------------- damaged or foreign files


def _garbage(path: Path) -> None:
    path.write_bytes(os.urandom(64 * 1024))


def _truncated(path: Path) -> None:
    healthy = _healthy(path.with_name("source.db"), rows=5000)
    data = healthy.read_bytes()
    path.write_bytes(data[: len(data) * 6 // 10])


def _short_header(path: Path) -> None:
    path.write_bytes(_healthy(path.with_name("source.db")).read_bytes()[:50])


@pytest.mark.parametrize("damage", [_garbage, _truncated, _short_header],
                         ids=["random-bytes", "truncated", "truncated-header"])
def test_damaged_file_gives_a_clear_error_and_is_left_as_it_was(
    tmp_path: Path, damage: object
) -> None:
    path = tmp_path / "damaged.db"
    damage(path)  # type: ignore[operator]
    before = file_state(path)
    with pytest.raises(StorageError) as caught:
        Outbox(path)
    _assert_clear(caught.value, path, "not a cio-outbox database or is damaged",
                  "point --db at another file")
    _assert_untouched(path, before)
    done = subprocess.run(cli_argv("status", "--db", str(path)), env=cli_env(),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr and str(path) in done.stderr
    _assert_untouched(path, before)


def _assert_untouched(path: Path, before: dict[str, bytes]) -> None:
    """The file's bytes are as they were; an empty -wal and an -shm index may be left
    beside it (SQLite made them before it found the damage), holding no data."""
    after = file_state(path)
    assert after[""] == before[""]
    assert after.get("-wal", b"") == before.get("-wal", b"")


def _other_application(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
    conn.executemany("INSERT INTO notes (body) VALUES (?)", [(f"note {i}",) for i in range(50)])
    conn.commit()
    conn.close()


def test_another_applications_database_is_refused_clearly(tmp_path: Path) -> None:
    path = tmp_path / "notes.db"
    _other_application(path)
    with pytest.raises(StorageError) as caught:
        Outbox(path)
    _assert_clear(caught.value, path, "not a cio-outbox outbox", "point --db at another file")
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT count(*) FROM notes").fetchone()[0] == 50
    conn.close()


def test_another_applications_database_is_left_byte_for_byte(tmp_path: Path) -> None:
    path = tmp_path / "notes.db"
    _other_application(path)
    before = file_state(path)
    with pytest.raises(StorageError):
        Outbox(path)
    assert file_state(path) == before
