"""The SQLite outbox: one file, WAL, a versioned schema (see schema.py and sql.py).

Durability: every write is a committed transaction in WAL mode. With the default
``synchronous=NORMAL`` a committed enqueue survives a crash of the process (or of
any process using the file); surviving a power loss or OS crash needs
``synchronous="FULL"``, which fsyncs on every commit (see benchmarks for its cost).
"""

from __future__ import annotations

import functools
import json
import operator
import os
import sqlite3
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from contextlib import suppress
from itertools import groupby
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from cio_outbox.storage.base import CHUNK_ROWS, NewRow, StorageError
from cio_outbox.storage.lanes import lane_of
from cio_outbox.storage.schema import (
    COMPARED_CHECK_VERSION,
    LANES_VERSION,
    SCHEMA_VERSION,
    SQLITE,
    render,
)
from cio_outbox.storage.slots import WorkerSlot, file_slot
from cio_outbox.storage.sql import Deltas, Moved, SQLStorage, with_thread_connection
from cio_outbox.storage.sqlite_schema import (
    add_status_check,
    compare_status_check,
    statements,
)

T = TypeVar("T")

BUSY_TIMEOUT_SECONDS = 60.0

#: Page cache per connection, in KiB (SQLite's default is 2 MB).
CACHE_KIB = 65_536

#: WAL pages after which a commit checkpoints (32 MiB of 4 KiB pages; SQLite's default is
#: 1,000). The WAL file grows to about this size between checkpoints.
WAL_CHECKPOINT_PAGES = 8_192

_NOW = "((julianday('now') - 2440587.5) * 86400.0)"
_INSERT = (
    "INSERT OR IGNORE INTO messages (message_id, run, call_type, person, payload, size,"
    " lane, created_at, updated_at) VALUES "
)
_VALUES = "(?, ?, ?, ?, ?, ?, ?, ?, ?)"
_COLUMNS = 9

#: Rows per INSERT statement. One statement of many rows, not executemany of one-row
#: statements: each statement's own cost (run, reset, the status CHECK set up) is then paid
#: once per 100 rows; executemany measured 8.4 us a row against 5.3 (benchmarks/README.md,
#: "Sixth session"). 100 rows of 9 values stay far below SQLite's limit of 32,766
#: parameters.
ROWS_PER_STATEMENT = 100


@functools.cache
def _insert_sql(rows: int) -> str:
    return _INSERT + ", ".join([_VALUES] * rows)


_INSERT_ONE = _insert_sql(1)
# The pending count of the run, +1 (the counts' (run, status) row may not exist yet).
_COUNT_ONE = (
    "INSERT INTO counts AS c (run, status, n) VALUES (?, 'pending', 1)"
    " ON CONFLICT (run, status) DO UPDATE SET n = c.n + 1"
)


_run_of = operator.attrgetter("run")
#: People whose lane a process remembers, per number of lanes (then forgotten at once).
_LANES_KNOWN = 65_536


@functools.cache
def _lanes_known(lanes: int) -> dict[str, int]:
    return {}


def _create_private_file(path: Path) -> None:
    """Create the outbox file with mode 0600 before SQLite opens it (its WAL inherits it)."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        return
    os.close(fd)


class SQLiteStorage(SQLStorage):
    """An outbox in one SQLite file. Safe for many threads and processes at once."""

    fields: ClassVar[dict[str, str]] = {
        "now": _NOW, "clock": _NOW, "ids": "id IN (SELECT value FROM json_each(?))",
        "json": "TEXT", "pending_run": "INDEXED BY messages_pending_run",
        "previous_id": "json_extract(payload, '$.previousId')",
        "lane_pending": "INDEXED BY messages_lane_pending",
        "lanes": "lane IN (SELECT value FROM json_each(?))",
    }

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
        self._conns: list[tuple[threading.Thread, sqlite3.Connection]] = []
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
            # A checkpoint (two fsyncs) after every 1,000 WAL pages (SQLite's default) came
            # every ~170 single-call enqueues, each of which writes ~6 pages (the row, four
            # index leaves, the counts and the id sequence), and cost 20-60 ms; it was most
            # of an enqueue()'s mean time. Committed data is as durable either way.
            conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_CHECKPOINT_PAGES}")
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
                self._conns = with_thread_connection(self._conns, conn)
        return conn

    def _explain(self, exc: sqlite3.Error) -> StorageError:
        text = str(exc)
        if "not a database" in text or "malformed" in text:
            return StorageError(
                f"{self.path} is not a cio-outbox database or is damaged ({text}); "
                "point --db at another file, or restore it from a backup"
            )
        read_only = self._why_read_only()
        if "readonly" in text or "read-only" in text or (
                read_only and "unable to open" in text):
            return StorageError(
                f"{self.path} is read-only ({read_only or text}); the outbox needs write "
                "access to the file and its folder (for the -wal and -shm files)"
            )
        if "locked" in text or "busy" in text:
            return StorageError(
                f"{self.path} stayed locked by another process for more than "
                f"{self.busy_timeout:g} s ({text}); find the process holding it, or retry"
            )
        if "full" in text:
            return StorageError(
                f"{self.path}: the disk is full ({text}); nothing of this change was "
                "written. Free space on that disk (or purge sent rows) and retry"
            )
        if "unable to open" in text:
            return StorageError(f"cannot open outbox {self.path} ({text})")
        return StorageError(f"outbox {self.path}: {text}")

    def _why_read_only(self) -> str | None:
        """Why the file cannot be written, when the file system or permissions say so."""
        folder = self.path.parent
        try:
            if os.statvfs(folder).f_flag & os.ST_RDONLY:
                return f"the file system holding {folder} is mounted read-only"
        except OSError:
            return None
        if not os.access(folder, os.W_OK):
            return f"folder {folder} is not writable"
        if self.path.exists() and not os.access(self.path, os.W_OK):
            return "the file is not writable"
        return None

    def _tx(self, body: Callable[[Any], T]) -> T:
        """One write transaction, taken up front so that it never dead-locks on upgrade."""
        return self._transaction("BEGIN IMMEDIATE", body)

    def _read_tx(self, body: Callable[[Any], T]) -> T:
        """A deferred transaction: consistent reads (and the connection's temporary tables)
        without taking the write lock."""
        return self._transaction("BEGIN", body)

    def _transaction(self, begin: str, body: Callable[[Any], T]) -> T:
        conn = self.conn
        try:
            conn.execute(begin)
            result = body(conn)
            conn.execute("COMMIT")
            return result
        except sqlite3.Error as exc:
            _rollback(conn)
            raise self._explain(exc) from None
        except BaseException:
            _rollback(conn)
            raise

    def _read(self, sql: str, params: Sequence[Any] = (), *, tuples: bool = False
              ) -> list[Any]:
        try:
            cursor = self.conn.execute(sql, params)
            if tuples:
                return cursor.fetchall()
            cursor.row_factory = sqlite3.Row
            return [dict(row) for row in cursor.fetchall()]
        except sqlite3.Error as exc:
            raise self._explain(exc) from None

    def _id_list(self, ids: Sequence[int]) -> str:
        return json.dumps(list(ids))

    # -- schema ------------------------------------------------------------------------

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
        def body(conn: sqlite3.Connection) -> None:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StorageError(
                    f"{self.path} has schema version {version}, newer than this "
                    f"cio-outbox understands ({SCHEMA_VERSION}); upgrade cio-outbox"
                )
            for number in range(version, SCHEMA_VERSION):
                for statement in statements(render(number, SQLITE, "")):
                    conn.execute(statement)
                if number + 1 == 3:
                    add_status_check(conn)
                if number + 1 == COMPARED_CHECK_VERSION:
                    compare_status_check(conn)
                if number + 1 == LANES_VERSION:
                    self._fill_lanes(conn)
                conn.execute(f"PRAGMA user_version = {number + 1}")

        self._tx(body)

    @property
    def schema_version(self) -> int:
        return int(self.conn.execute("PRAGMA user_version").fetchone()[0])

    # -- enqueue -----------------------------------------------------------------------

    def insert(self, rows: Iterable[NewRow], *, chunk_size: int = CHUNK_ROWS) -> int:
        if type(rows) is list and len(rows) == 1:
            return self._insert_one(rows[0])
        return super().insert(rows, chunk_size=chunk_size)

    def _insert_one(self, row: NewRow) -> int:
        """One row in a transaction of its own (``Outbox.enqueue``): the same statements
        as a chunk's, without the chunk's grouping and bookkeeping, which cost a single
        enqueue about 40 us of its 130 us of CPU."""
        lane = lane_of(row.person, self.lanes)

        def body(conn: sqlite3.Connection) -> int:
            now = time.time()
            added: int = conn.execute(_INSERT_ONE, (
                row.message_id, row.run, row.call_type, row.person, row.payload, row.size,
                lane, now, now)).rowcount
            if added:
                conn.execute(_COUNT_ONE, (row.run,))
            return added

        added = self._tx(body)
        if added:
            self._signal()
        return added

    # -- hooks -------------------------------------------------------------------------

    def _insert_chunk(self, cur: Any, chunk: list[NewRow]) -> Deltas:
        now = time.time()
        deltas: Deltas = defaultdict(int)
        lanes = self.lanes
        known = _lanes_known(lanes)  # a person's lane, without a call per row
        if len(known) > _LANES_KNOWN:
            known.clear()
        step = ROWS_PER_STATEMENT * _COLUMNS
        for run, group in groupby(chunk, key=_run_of):
            params: list[Any] = []
            add = params.extend
            for r in group:
                person = r.person
                lane = known.get(person)
                if lane is None:
                    lane = known[person] = lane_of(person, lanes)
                add((r.message_id, run, r.call_type, person, r.payload, r.size, lane, now,
                     now))
            added = 0
            for start in range(0, len(params), step):
                part = params[start:start + step]
                # rowcount: rows inserted; rows whose message_id exists are skipped.
                added += cur.execute(_insert_sql(len(part) // _COLUMNS), part).rowcount
            deltas[(run, "pending")] += added
        return deltas

    def _move(self, cur: Any, where: str, params: Sequence[Any], new_status: str,
              assignments: str, assignment_params: Sequence[Any]) -> Moved:
        # The write lock is ours (BEGIN IMMEDIATE): what we count is what we update.
        where = f"({where}) AND status != ?"
        moved = cur.execute(
            f"SELECT run, status, count(*) FROM messages WHERE {where} GROUP BY run, status",
            (*params, new_status),
        ).fetchall()
        if moved:
            cur.execute(f"UPDATE messages SET status = ?, {assignments} WHERE {where}",
                        (new_status, *assignment_params, *params, new_status))
        return moved

    def _delete(self, cur: Any, where: str, params: Sequence[Any]) -> Moved:
        gone = cur.execute(
            f"SELECT run, status, count(*) FROM messages WHERE {where} GROUP BY run, status",
            params,
        ).fetchall()
        if gone:
            cur.execute(f"DELETE FROM messages WHERE {where}", params)
        return gone

    def vacuum(self) -> list[int]:
        """Rewrite the file so deleted data leaves no trace, and empty the WAL."""
        conn = self.conn
        try:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            conn.execute("VACUUM")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:
            raise self._explain(exc) from None
        return []

    def worker_slot(self) -> WorkerSlot:
        """A slot of this outbox on this host, held until released (see slots.py)."""
        return file_slot(self.path)

    def close(self) -> None:
        with self._lock:
            for _, conn in self._conns:
                with suppress(sqlite3.Error):
                    conn.close()
            self._conns.clear()
        self._local = threading.local()

    def __repr__(self) -> str:
        return f"SQLiteStorage({self.location!r})"

    # -- recurring syncs (issue 20): the table and its SQL are in storage/sync_state.py --

    def _sync_dialect(self) -> Any:
        from cio_outbox.storage import sync_state

        return sync_state.SQLITE



def _rollback(conn: sqlite3.Connection) -> None:
    """Roll back if a transaction is still open. SQLite rolls back by itself on some
    errors (a full disk); a second ROLLBACK would then replace the real error."""
    if conn.in_transaction:
        with suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
