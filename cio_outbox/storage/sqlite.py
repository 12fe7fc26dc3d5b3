"""The SQLite outbox: one file, WAL, a versioned schema.

Durability: every write is a committed transaction in WAL mode. With the default
``synchronous=NORMAL`` a committed enqueue survives a crash of the process (or of
any process using the file); surviving a power loss or OS crash needs
``synchronous="FULL"``, which fsyncs on every commit (see benchmarks for its cost).
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from itertools import groupby, islice
from pathlib import Path
from typing import Any

from cio_outbox.batch import Row, select
from cio_outbox.storage.base import (
    CHUNK_ROWS,
    Attempt,
    NewRow,
    StorageError,
    in_ranges,
    row_ranges,
)

BUSY_TIMEOUT_SECONDS = 60.0

# Each entry moves the schema one version up. Never edit a released entry: add one.
MIGRATIONS: list[str] = [
    # 1: messages, the audit trail, and per-run counts by status. The counts are kept
    # by the code in the same transaction as each change (one statement per
    # transaction, not a trigger per row), so status stays instant at 10M rows.
    """
    CREATE TABLE messages (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        message_id TEXT NOT NULL UNIQUE,
        run TEXT NOT NULL DEFAULT '',
        call_type TEXT NOT NULL,
        person TEXT NOT NULL,
        payload TEXT NOT NULL,
        size INTEGER NOT NULL,
        status TEXT NOT NULL DEFAULT 'pending',
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL,
        lease_expires_at REAL,
        worker_id TEXT,
        last_error TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        sent_at REAL
    );
    CREATE INDEX messages_pending ON messages (id) WHERE status = 'pending';
    CREATE INDEX messages_pending_run ON messages (run, id) WHERE status = 'pending';
    CREATE INDEX messages_deferred ON messages (next_attempt_at)
        WHERE status = 'pending' AND next_attempt_at IS NOT NULL;
    CREATE INDEX messages_in_flight ON messages (lease_expires_at) WHERE status = 'in_flight';
    CREATE INDEX messages_failed ON messages (run, id) WHERE status = 'failed';

    CREATE TABLE counts (
        run TEXT NOT NULL,
        status TEXT NOT NULL,
        n INTEGER NOT NULL,
        PRIMARY KEY (run, status)
    ) WITHOUT ROWID;
    CREATE TABLE attempts (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at REAL NOT NULL,
        worker_id TEXT NOT NULL,
        endpoint TEXT NOT NULL,
        runs TEXT NOT NULL,
        messages INTEGER NOT NULL,
        bytes INTEGER NOT NULL,
        status_code INTEGER,
        latency_ms REAL,
        outcome TEXT NOT NULL,
        error TEXT,
        row_ranges TEXT NOT NULL,
        min_row_id INTEGER NOT NULL,
        max_row_id INTEGER NOT NULL
    );
    CREATE INDEX attempts_max_row ON attempts (max_row_id);
    CREATE TABLE attempt_runs (
        run TEXT NOT NULL,
        attempt_id INTEGER NOT NULL,
        PRIMARY KEY (run, attempt_id)
    ) WITHOUT ROWID;

    CREATE TABLE forgotten (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at REAL NOT NULL,
        rows_deleted INTEGER NOT NULL
    );
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)

#: Page cache per connection, in KiB (SQLite's default is 2 MB).
CACHE_KIB = 65_536

_CANDIDATE_COLUMNS = "id, run, call_type, person, size, attempts"
_INSERT = (
    "INSERT OR IGNORE INTO messages (message_id, run, call_type, person, payload, size,"
    " created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
_COUNT_ONE = (
    "INSERT INTO counts (run, status, n) VALUES (?, 'pending', 1)"
    " ON CONFLICT (run, status) DO UPDATE SET n = n + 1"
)
_CANDIDATE_PAGE_SIZE = 1000
_CANDIDATE_PAGES = 20


def _create_private_file(path: Path) -> None:
    """Create the outbox file with mode 0600 before SQLite opens it (its WAL inherits it)."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        return
    os.close(fd)


class SQLiteStorage:
    """An outbox in one SQLite file. Safe for many threads and processes at once."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        synchronous: str = "NORMAL",
        busy_timeout: float = BUSY_TIMEOUT_SECONDS,
    ) -> None:
        self.path = Path(path)
        self.location = str(self.path)
        if synchronous.upper() not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise ValueError(f"synchronous must be NORMAL or FULL, not {synchronous!r}")
        self.synchronous = synchronous.upper()
        self.busy_timeout = busy_timeout
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        if self.path.exists() and self.path.is_dir():
            raise StorageError(f"{self.path} is a directory, not an outbox file")
        if not self.path.parent.exists():
            raise StorageError(
                f"cannot create outbox {self.path}: folder {self.path.parent} does not exist"
            )
        try:
            _create_private_file(self.path)
        except PermissionError:
            raise StorageError(
                f"cannot create outbox {self.path}: permission denied; "
                "choose a writable path with --db or CIO_OUTBOX"
            ) from None
        self._check_is_outbox()
        self._migrate()

    # -- connections -------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(
                self.path, timeout=self.busy_timeout, isolation_level=None,
                check_same_thread=False,
            )
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise StorageError(f"{self.path}: could not switch to WAL mode (got {mode})")
            conn.execute(f"PRAGMA synchronous = {self.synchronous}")
            conn.execute("PRAGMA foreign_keys = ON")
            # Imports with idempotency keys (and callers' own random messageIds) insert at
            # random places in the unique messageId index; once that index outgrows the
            # default 2 MB cache every commit rereads and rewrites most of its pages.
            # 64 MiB is a ceiling, taken only as pages are used.
            conn.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
        except sqlite3.DatabaseError as exc:
            raise self._explain(exc) from None
        return conn

    @property
    def conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    def _explain(self, exc: sqlite3.Error) -> StorageError:
        text = str(exc)
        if "not a database" in text or "malformed" in text:
            return StorageError(
                f"{self.path} is not a cio-outbox database or is damaged ({text}); "
                "point --db at another file, or restore it from a backup"
            )
        if "readonly" in text or "read-only" in text:
            return StorageError(
                f"{self.path} is read-only ({text}); the outbox needs write access to the "
                "file and its folder (for the -wal and -shm files)"
            )
        if "locked" in text or "busy" in text:
            return StorageError(
                f"{self.path} stayed locked by another process for more than "
                f"{self.busy_timeout:g} s ({text}); find the process holding it, or retry"
            )
        if "unable to open" in text:
            return StorageError(f"cannot open outbox {self.path} ({text})")
        return StorageError(f"outbox {self.path}: {text}")

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken up front so that it never dead-locks on upgrade."""
        conn = self.conn
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise self._explain(exc) from None
        try:
            yield conn
        except sqlite3.Error as exc:
            conn.execute("ROLLBACK")
            raise self._explain(exc) from None
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            conn.execute("ROLLBACK")
            raise self._explain(exc) from None

    def _read(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[sqlite3.Row]:
        try:
            cursor = self.conn.execute(sql, params)
        except sqlite3.Error as exc:
            raise self._explain(exc) from None
        cursor.row_factory = sqlite3.Row
        return cursor.fetchall()

    def _check_is_outbox(self) -> None:
        """Refuse another application's database before changing anything in it (WAL mode
        would otherwise be switched on, and -wal/-shm files left beside it)."""
        try:
            conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True,
                                   timeout=self.busy_timeout, isolation_level=None)
        except sqlite3.Error as exc:
            raise self._explain(exc) from None
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            foreign = conn.execute(
                "SELECT count(*) FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'"
            ).fetchone()[0]
        except sqlite3.Error as exc:
            raise self._explain(exc) from None
        finally:
            conn.close()
        if version == 0 and foreign:
            raise StorageError(
                f"{self.path} is an SQLite database but not a cio-outbox outbox; "
                "point --db at another file"
            )

    def _migrate(self) -> None:
        try:
            with self._write() as conn:
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    raise StorageError(
                        f"{self.path} has schema version {version}, newer than this "
                        f"cio-outbox understands ({SCHEMA_VERSION}); upgrade cio-outbox"
                    )
                if version == 0 and conn.execute(
                    "SELECT count(*) FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'"
                ).fetchone()[0]:
                    raise StorageError(
                        f"{self.path} is an SQLite database but not a cio-outbox outbox; "
                        "point --db at another file"
                    )
                for number in range(version, SCHEMA_VERSION):
                    for statement in _statements(MIGRATIONS[number]):
                        conn.execute(statement)
                    conn.execute(f"PRAGMA user_version = {number + 1}")
        except sqlite3.DatabaseError as exc:
            raise self._explain(exc) from None

    @property
    def schema_version(self) -> int:
        return self.conn.execute("PRAGMA user_version").fetchone()[0]

    # -- enqueue -----------------------------------------------------------------------

    def insert(self, rows: Iterable[NewRow], *, chunk_size: int = CHUNK_ROWS) -> int:
        if isinstance(rows, (list, tuple)) and len(rows) == 1:
            return self._insert_one(rows[0])
        added = 0
        iterator = iter(rows)
        sql = _INSERT
        while True:
            chunk = list(islice(iterator, chunk_size))
            if not chunk:
                return added
            now = time.time()
            with self._write() as conn:
                deltas: dict[tuple[str, str], int] = defaultdict(int)
                for run, group in groupby(chunk, key=lambda r: r.run):
                    params = [
                        (r.message_id, run, r.call_type, r.person, r.payload, r.size, now, now)
                        for r in group
                    ]
                    try:
                        # rowcount: rows inserted; rows whose message_id exists are skipped.
                        count = conn.executemany(sql, params).rowcount
                    except sqlite3.Error as exc:
                        raise self._explain(exc) from None
                    deltas[(run, "pending")] += count
                    added += count
                _shift(conn, deltas)

    def _insert_one(self, row: NewRow) -> int:
        """One message, one transaction: the path of every single enqueue call."""
        now = time.time()
        with self._write() as conn:
            added = conn.execute(_INSERT, (row.message_id, row.run, row.call_type, row.person,
                                           row.payload, row.size, now, now)).rowcount
            if added:
                conn.execute(_COUNT_ONE, (row.run,))
        return added

    # -- worker ------------------------------------------------------------------------

    def claim(
        self,
        worker_id: str,
        *,
        lease_seconds: float,
        max_bytes: int,
        max_messages: int,
        run: str | None = None,
    ) -> list[Row]:
        with self._write() as conn:
            now = time.time()
            # Rows leased by a worker that died come back once their lease has expired.
            _transition(
                conn, "status = 'in_flight' AND lease_expires_at < ?", (now,), "pending",
                "worker_id = NULL, lease_expires_at = NULL, updated_at = ?", (now,),
            )
            blocked = {
                person
                for (person,) in conn.execute(
                    "SELECT person FROM messages WHERE status = 'in_flight'"
                    " UNION SELECT person FROM messages WHERE status = 'pending'"
                    " AND next_attempt_at IS NOT NULL AND next_attempt_at > ?",
                    (now,),
                )
            }
            chosen = select(self._candidates(conn, run), blocked, max_bytes=max_bytes,
                            max_messages=max_messages)
            if not chosen:
                return []
            ids = json.dumps([r.id for r in chosen])
            conn.execute(
                "UPDATE messages SET status = 'in_flight', worker_id = ?, lease_expires_at = ?,"
                " next_attempt_at = NULL, updated_at = ?"
                " WHERE id IN (SELECT value FROM json_each(?))",
                (worker_id, now + lease_seconds, now, ids),
            )
            deltas: dict[tuple[str, str], int] = defaultdict(int)
            for row in chosen:
                deltas[(row.run, "pending")] -= 1
                deltas[(row.run, "in_flight")] += 1
            _shift(conn, deltas)
        # The rows are leased to us now: read their payloads outside the write lock.
        bodies = {
            row_id: (message_id, payload)
            for row_id, message_id, payload in self._read_tuples(
                "SELECT id, message_id, payload FROM messages"
                " WHERE id IN (SELECT value FROM json_each(?))",
                (ids,),
            )
        }
        for row in chosen:
            row.message_id, row.payload = bodies[row.id]
        return chosen

    def _candidates(self, conn: sqlite3.Connection, run: str | None) -> Iterator[Row]:
        """Pending rows in enqueue order, without their payloads, a page at a time.

        Lazy, so that :func:`select` reads only as far as it needs; bounded, so that a
        claim never scans far inside the write lock when most people are blocked."""
        if run is None:
            sql = (
                f"SELECT {_CANDIDATE_COLUMNS} FROM messages WHERE status = 'pending' AND id > ?"
                " ORDER BY id LIMIT ?"
            )
            args: tuple[Any, ...] = ()
        else:
            sql = (
                f"SELECT {_CANDIDATE_COLUMNS} FROM messages INDEXED BY messages_pending_run"
                " WHERE status = 'pending' AND run = ? AND id > ? ORDER BY run, id LIMIT ?"
            )
            args = (run,)
        after = 0
        for _ in range(_CANDIDATE_PAGES):
            page = conn.execute(sql, (*args, after, _CANDIDATE_PAGE_SIZE)).fetchall()
            for row_id, row_run, call_type, person, size, attempts in page:
                yield Row(row_id, "", row_run, call_type, person, "", size, attempts)
            if len(page) < _CANDIDATE_PAGE_SIZE:
                return
            after = page[-1][0]

    def _read_tuples(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        try:
            return self.conn.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise self._explain(exc) from None

    def extend_lease(self, ids: Sequence[int], worker_id: str, lease_seconds: float) -> None:
        with self._write() as conn:
            now = time.time()
            conn.execute(
                "UPDATE messages SET lease_expires_at = ?, updated_at = ?"
                " WHERE id IN (SELECT value FROM json_each(?)) AND status = 'in_flight'",
                (now + lease_seconds, now, json.dumps(list(ids))),
            )

    def record_attempt(self, attempt: Attempt, *, count: bool, sent: bool = False) -> None:
        ids = [row.id for row in attempt.rows]
        runs = sorted({row.run for row in attempt.rows})
        with self._write() as conn:
            now = time.time()
            cursor = conn.execute(
                "INSERT INTO attempts (at, worker_id, endpoint, runs, messages, bytes,"
                " status_code, latency_ms, outcome, error, row_ranges, min_row_id, max_row_id)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    now, attempt.worker_id, attempt.endpoint, json.dumps(runs), len(ids),
                    attempt.bytes, attempt.status_code, attempt.latency_ms, attempt.outcome,
                    attempt.error, json.dumps(row_ranges(ids)), min(ids), max(ids),
                ),
            )
            conn.executemany(
                "INSERT OR IGNORE INTO attempt_runs (run, attempt_id) VALUES (?, ?)",
                [(run, cursor.lastrowid) for run in runs],
            )
            if count:
                conn.execute(
                    "UPDATE messages SET attempts = attempts + 1, last_error = ?, updated_at = ?"
                    " WHERE id IN (SELECT value FROM json_each(?))",
                    (attempt.error, now, json.dumps(ids)),
                )
            if sent:  # same transaction: the audit never says sent for a row still in flight
                _mark_sent(conn, ids, now)

    def mark_sent(self, ids: Sequence[int]) -> None:
        with self._write() as conn:
            _mark_sent(conn, ids, time.time())

    def dead_letter(self, errors: Sequence[tuple[int, str]]) -> None:
        with self._write() as conn:
            now = time.time()
            for row_id, error in errors:
                _transition(
                    conn, "id = ? AND status != 'sent'", (row_id,), "failed",
                    "last_error = ?, updated_at = ?, worker_id = NULL, lease_expires_at = NULL,"
                    " next_attempt_at = NULL",
                    (error, now),
                )

    def release(self, ids: Sequence[int], *, next_attempt_at: float | None = None) -> None:
        with self._write() as conn:
            _transition(
                conn, _IDS + " AND status = 'in_flight'", (json.dumps(list(ids)),), "pending",
                "worker_id = NULL, lease_expires_at = NULL, next_attempt_at = ?, updated_at = ?",
                (next_attempt_at, time.time()),
            )

    def release_worker(self, worker_id: str) -> int:
        with self._write() as conn:
            return _transition(
                conn, "status = 'in_flight' AND worker_id = ?", (worker_id,), "pending",
                "worker_id = NULL, lease_expires_at = NULL, updated_at = ?", (time.time(),),
            )

    # -- reporting ---------------------------------------------------------------------

    def counts(self, run: str | None = None) -> dict[str, int]:
        result = {"pending": 0, "in_flight": 0, "sent": 0, "failed": 0}
        if run is None:
            rows = self._read("SELECT status, sum(n) AS n FROM counts GROUP BY status")
        else:
            rows = self._read("SELECT status, n FROM counts WHERE run = ?", (run,))
        for row in rows:
            result[row["status"]] = int(row["n"])
        return result

    def runs(self) -> list[dict[str, Any]]:
        by_run: dict[str, dict[str, Any]] = {}
        for row in self._read("SELECT run, status, n FROM counts ORDER BY run"):
            entry = by_run.setdefault(
                row["run"], {"run": row["run"], "pending": 0, "in_flight": 0, "sent": 0,
                             "failed": 0}
            )
            entry[row["status"]] = row["n"]
        return [entry for entry in by_run.values() if any(
            entry[s] for s in ("pending", "in_flight", "sent", "failed"))]

    def oldest_pending(self, run: str | None = None) -> float | None:
        if run is None:
            rows = self._read(
                "SELECT created_at FROM messages WHERE status = 'pending' ORDER BY id LIMIT 1"
            )
        else:
            rows = self._read(
                "SELECT created_at FROM messages INDEXED BY messages_pending_run"
                " WHERE status = 'pending' AND run = ? ORDER BY run, id LIMIT 1",
                (run,),
            )
        return rows[0]["created_at"] if rows else None

    def last_error(self, run: str | None = None) -> dict[str, Any] | None:
        if run is None:
            rows = self._read(
                "SELECT * FROM attempts WHERE error IS NOT NULL ORDER BY id DESC LIMIT 1"
            )
        else:
            rows = self._read(
                "SELECT a.* FROM attempts a JOIN attempt_runs r ON r.attempt_id = a.id"
                " WHERE r.run = ? AND a.error IS NOT NULL ORDER BY a.id DESC LIMIT 1",
                (run,),
            )
        return _attempt_dict(rows[0]) if rows else None

    def sent_since(self, since: float, run: str | None = None) -> int:
        if run is None:
            rows = self._read(
                "SELECT coalesce(sum(messages), 0) AS n FROM attempts"
                " WHERE at >= ? AND outcome = 'sent'",
                (since,),
            )
        else:
            rows = self._read(
                "SELECT coalesce(sum(a.messages), 0) AS n FROM attempts a"
                " JOIN attempt_runs r ON r.attempt_id = a.id"
                " WHERE r.run = ? AND a.at >= ? AND a.outcome = 'sent'",
                (run, since),
            )
        return int(rows[0]["n"])

    def failed(self, run: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        return self.rows(run=run, status="failed", limit=limit)

    def rows(
        self, *, run: str | None = None, status: str | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        where, params = [], []
        if status is not None:
            where.append("status = ?")
            params.append(status)
        if run is not None:
            where.append("run = ?")
            params.append(run)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        rows = self._read(f"SELECT * FROM messages {clause} ORDER BY id LIMIT ?",
                          (*params, limit))
        return [dict(row) for row in rows]

    def requeue(self, *, ids: Sequence[int] | None = None, run: str | None = None) -> int:
        where = "status = 'failed'"
        params: list[Any] = []
        if ids is not None:
            where += " AND " + _IDS
            params.append(json.dumps(list(ids)))
        if run is not None:
            where += " AND run = ?"
            params.append(run)
        with self._write() as conn:
            return _transition(
                conn, where, params, "pending",
                "attempts = 0, next_attempt_at = NULL, updated_at = ?", (time.time(),),
            )

    def replace_failed(
        self, row_id: int, *, payload: str, size: int, call_type: str, person: str
    ) -> bool:
        with self._write() as conn:
            return _transition(
                conn, "id = ? AND status = 'failed'", (row_id,), "pending",
                "payload = ?, size = ?, call_type = ?, person = ?, attempts = 0,"
                " next_attempt_at = NULL, updated_at = ?,"
                " last_error = 'replaced; was: ' || coalesce(last_error, '')",
                (payload, size, call_type, person, time.time()),
            ) == 1

    def message(self, message_id: str) -> dict[str, Any] | None:
        rows = self._read("SELECT * FROM messages WHERE message_id = ?", (message_id,))
        return dict(rows[0]) if rows else None

    def attempts_for(self, row_id: int) -> list[dict[str, Any]]:
        rows = self._read(
            "SELECT * FROM attempts WHERE max_row_id >= ? AND min_row_id <= ? ORDER BY id",
            (row_id, row_id),
        )
        return [
            _attempt_dict(row) for row in rows
            if in_ranges(row_id, json.loads(row["row_ranges"]))
        ]

    def attempts(self, run: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        if run is None:
            rows = self._read("SELECT * FROM attempts ORDER BY id DESC LIMIT ?", (limit,))
        else:
            rows = self._read(
                "SELECT a.* FROM attempts a JOIN attempt_runs r ON r.attempt_id = a.id"
                " WHERE r.run = ? ORDER BY a.id DESC LIMIT ?",
                (run, limit),
            )
        return [_attempt_dict(row) for row in reversed(rows)]

    # -- retention and data protection -------------------------------------------------

    def purge_sent(self, before: float) -> int:
        with self._write() as conn:
            return _delete(conn, "status = 'sent' AND sent_at < ?", (before,))

    def forget(self, person: str) -> int:
        """Delete every row naming this person and scrub them from audit errors, then VACUUM."""
        needle = json.dumps(person, ensure_ascii=False)
        like = "%" + needle.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        with self._write() as conn:
            deleted = _delete(conn, "person = ? OR payload LIKE ? ESCAPE '\\'", (person, like))
            conn.execute(
                "UPDATE attempts SET error = replace(error, ?, '[forgotten]')"
                " WHERE instr(error, ?) > 0",
                (person, person),
            )
            conn.execute(
                "UPDATE messages SET last_error = replace(last_error, ?, '[forgotten]')"
                " WHERE instr(last_error, ?) > 0",
                (person, person),
            )
            conn.execute(
                "INSERT INTO forgotten (at, rows_deleted) VALUES (?, ?)", (time.time(), deleted)
            )
        self.vacuum()
        return deleted

    def vacuum(self) -> None:
        """Rewrite the file so deleted data leaves no trace, and empty the WAL."""
        conn = self.conn
        try:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            conn.execute("VACUUM")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:
            raise self._explain(exc) from None

    def close(self) -> None:
        with self._lock:
            for conn in self._all:
                with suppress(sqlite3.Error):
                    conn.close()
            self._all.clear()
        self._local = threading.local()

    def __repr__(self) -> str:
        return f"SQLiteStorage({self.location!r})"

    # -- recurring syncs (issue 20): the table and its SQL are in storage/sync_state.py --

    def sync_transaction(self, body: Any, *, write: bool = True) -> Any:
        """``body(tx)`` in one transaction (a write transaction unless ``write=False``, for
        bodies that write nothing but temporary tables):
        it reads and writes sync state through ``tx.db`` and adds messages with
        ``tx.insert(rows)``; all of it commits together or not at all."""
        from cio_outbox.storage import sync_state

        if not getattr(self, "_sync_ready", False):
            with self._write() as conn:
                sync_state.create(conn, sync_state.SQLITE)
            self._sync_ready = True

        def insert(rows: Sequence[NewRow]) -> int:
            now = time.time()
            deltas: dict[tuple[str, str], int] = defaultdict(int)
            for run, group in groupby(rows, key=lambda r: r.run):
                deltas[(run, "pending")] += conn.executemany(_INSERT, [
                    (r.message_id, run, r.call_type, r.person, r.payload, r.size, now, now)
                    for r in group]).rowcount
            _shift(conn, deltas)
            return sum(deltas.values())

        if write:
            with self._write() as conn:
                return body(sync_state.SyncTransaction(conn, sync_state.SQLITE, insert))
        conn = self.conn  # a deferred transaction: reads, and the connection's temp tables
        try:
            conn.execute("BEGIN")
            try:
                result = body(sync_state.SyncTransaction(conn, sync_state.SQLITE, insert))
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise self._explain(exc) from None
        return result


_IDS = "id IN (SELECT value FROM json_each(?))"


def _shift(conn: sqlite3.Connection, deltas: dict[tuple[str, str], int]) -> None:
    """Apply changes to the per-run status counts, in the caller's transaction."""
    conn.executemany(
        "INSERT INTO counts (run, status, n) VALUES (?, ?, ?)"
        " ON CONFLICT (run, status) DO UPDATE SET n = n + excluded.n",
        [(run, status, n) for (run, status), n in deltas.items() if n],
    )


def _transition(
    conn: sqlite3.Connection,
    where: str,
    params: Sequence[Any],
    new_status: str,
    assignments: str,
    assignment_params: Sequence[Any],
) -> int:
    """Move the rows matching ``where`` to ``new_status`` and keep the counts right."""
    where = f"({where}) AND status != ?"
    moved = conn.execute(
        f"SELECT run, status, count(*) FROM messages WHERE {where} GROUP BY run, status",
        (*params, new_status),
    ).fetchall()
    if not moved:
        return 0
    conn.execute(
        f"UPDATE messages SET status = ?, {assignments} WHERE {where}",
        (new_status, *assignment_params, *params, new_status),
    )
    deltas: dict[tuple[str, str], int] = defaultdict(int)
    for run, old_status, n in moved:
        deltas[(run, old_status)] -= n
        deltas[(run, new_status)] += n
    _shift(conn, deltas)
    return sum(n for _, _, n in moved)


def _mark_sent(conn: sqlite3.Connection, ids: Sequence[int], now: float) -> None:
    _transition(
        conn, _IDS, (json.dumps(list(ids)),), "sent",
        "sent_at = ?, updated_at = ?, worker_id = NULL, lease_expires_at = NULL,"
        " next_attempt_at = NULL, last_error = NULL",
        (now, now),
    )


def _delete(conn: sqlite3.Connection, where: str, params: Sequence[Any]) -> int:
    gone = conn.execute(
        f"SELECT run, status, count(*) FROM messages WHERE {where} GROUP BY run, status", params
    ).fetchall()
    if not gone:
        return 0
    conn.execute(f"DELETE FROM messages WHERE {where}", params)
    _shift(conn, {(run, status): -n for run, status, n in gone})
    return sum(n for _, _, n in gone)


def _statements(script: str) -> list[str]:
    """Split a migration into statements, keeping trigger bodies whole."""
    statements, current = [], ""
    for line in script.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            if current.strip():
                statements.append(current.strip())
            current = ""
    if current.strip():
        statements.append(current.strip())
    return statements


def _attempt_dict(row: sqlite3.Row) -> dict[str, Any]:
    data = dict(row)
    data["runs"] = json.loads(data["runs"])
    data["row_ranges"] = json.loads(data["row_ranges"])
    return data
