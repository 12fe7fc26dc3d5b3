"""The PostgreSQL outbox: the same rows, statuses and audit trail as SQLite, many machines.

``Outbox("postgresql://user@host/db")`` keeps its tables in a PostgreSQL schema of their
own, ``cio_outbox`` unless the URL says ``?schema=name`` (read here, never passed to
libpq), so one database can hold several outboxes next to other applications' tables.

Design, in short:

- psycopg 3, one connection per thread (like the SQLite backend), autocommit for reads
  and one explicit transaction per change. Connections are dropped after a fork.
- Times come from the database server's clock, so leases mean the same thing on every
  machine however their clocks drift. (``release(next_attempt_at=...)`` and the
  ``before``/``since`` arguments are the caller's clock, as the protocol says.)
- Per-run status counts live in the ``counts`` table and change in the same
  transaction as the rows they count; every transaction locks its message rows first
  and its count rows last, in a fixed order, so counts never dead-lock.
- A claim is one short transaction: it takes a transaction-level advisory lock
  (``pg_advisory_xact_lock``), so claims follow one another, recovers expired leases,
  reads the blocked persons and the next pending rows, lets
  :func:`cio_outbox.batch.select` pick, then locks the picked rows with
  ``SELECT ... FOR UPDATE SKIP LOCKED``. A picked row that another transaction holds
  (a late ``mark_sent`` of a worker whose lease ran out, a ``forget``) is skipped and
  so is every later picked row of its person: one person's rows leave in order.
  Serializing claims is what closes the race where two claimers would pick disjoint
  rows of one person from snapshots that cannot see each other; it costs little
  because a claim hands out a whole request (up to 500 KB) in a few milliseconds
  (see benchmarks/postgres_vs_sqlite.py).
- Dead-locks and serialization failures (possible between two imports that add the
  same messageIds in different orders) are retried a few times.
"""

from __future__ import annotations

import json
import os
import random
import re
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from contextlib import suppress
from itertools import islice
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from cio_outbox.batch import Row, select
from cio_outbox.storage.base import (
    CHUNK_ROWS,
    Attempt,
    NewRow,
    StorageError,
    in_ranges,
    row_ranges,
)

if TYPE_CHECKING:
    import psycopg

T = TypeVar("T")

DEFAULT_SCHEMA = "cio_outbox"
CONNECT_TIMEOUT_SECONDS = 10
_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_RETRIES = 8
_COPY_FROM = 64  # rows from which an insert goes by COPY

# Each entry moves the schema one version up. Never edit a released entry: add one.
# ``{s}`` is the outbox's schema name (checked against _SCHEMA_NAME).
MIGRATIONS: list[str] = [
    # 1: the same tables as the SQLite outbox (see storage/sqlite.py), in PostgreSQL types.
    """
    CREATE TABLE {s}.messages (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        message_id TEXT NOT NULL UNIQUE,
        run TEXT NOT NULL DEFAULT '',
        call_type TEXT NOT NULL,
        person TEXT NOT NULL,
        payload TEXT NOT NULL,
        size INTEGER NOT NULL,
        status TEXT NOT NULL DEFAULT 'pending'
            CHECK (status IN ('pending', 'in_flight', 'sent', 'failed')),
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at DOUBLE PRECISION,
        lease_expires_at DOUBLE PRECISION,
        worker_id TEXT,
        last_error TEXT,
        created_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL,
        sent_at DOUBLE PRECISION
    );
    CREATE INDEX messages_pending ON {s}.messages (id) WHERE status = 'pending';
    CREATE INDEX messages_pending_run ON {s}.messages (run, id) WHERE status = 'pending';
    CREATE INDEX messages_deferred ON {s}.messages (next_attempt_at)
        WHERE status = 'pending' AND next_attempt_at IS NOT NULL;
    CREATE INDEX messages_in_flight ON {s}.messages (lease_expires_at)
        WHERE status = 'in_flight';
    CREATE INDEX messages_failed ON {s}.messages (run, id) WHERE status = 'failed';
    CREATE INDEX messages_sent ON {s}.messages (sent_at) WHERE status = 'sent';

    CREATE TABLE {s}.counts (
        run TEXT NOT NULL,
        status TEXT NOT NULL,
        n BIGINT NOT NULL,
        PRIMARY KEY (run, status)
    );
    CREATE TABLE {s}.attempts (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        at DOUBLE PRECISION NOT NULL,
        worker_id TEXT NOT NULL,
        endpoint TEXT NOT NULL,
        runs JSONB NOT NULL,
        messages INTEGER NOT NULL,
        bytes INTEGER NOT NULL,
        status_code INTEGER,
        latency_ms DOUBLE PRECISION,
        outcome TEXT NOT NULL,
        error TEXT,
        row_ranges JSONB NOT NULL,
        min_row_id BIGINT NOT NULL,
        max_row_id BIGINT NOT NULL
    );
    CREATE INDEX attempts_max_row ON {s}.attempts (max_row_id);
    CREATE INDEX attempts_at ON {s}.attempts (at);
    CREATE TABLE {s}.attempt_runs (
        run TEXT NOT NULL,
        attempt_id BIGINT NOT NULL,
        PRIMARY KEY (run, attempt_id)
    );

    CREATE TABLE {s}.forgotten (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        at DOUBLE PRECISION NOT NULL,
        rows_deleted INTEGER NOT NULL
    );
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)

_CANDIDATE_COLUMNS = "id, run, call_type, person, size, attempts"
# The server's clock, in Unix seconds, at the start of the current transaction.
_NOW = "extract(epoch from now())::float8"

Deltas = dict[tuple[str, str], int]


def _driver() -> Any:
    """psycopg, imported on first use so that the SQLite path never needs it."""
    try:
        import psycopg
    except ImportError:
        raise StorageError(
            "a postgresql:// outbox needs psycopg 3, which is not installed; "
            "install it with: pip install 'cio-outbox[postgres]'"
        ) from None
    return psycopg


def split_location(url: str) -> tuple[str, str]:
    """(URL for libpq without our ``schema`` parameter, schema name)."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    schema = DEFAULT_SCHEMA
    kept = []
    for name, value in query:
        if name == "schema":
            schema = value
        else:
            kept.append((name, value))
    if not _SCHEMA_NAME.match(schema):
        raise StorageError(
            f"schema={schema!r} in the outbox URL is not a plain lower-case name "
            "(letters, digits, underscore; at most 63)"
        )
    return urlunsplit(parts._replace(query=urlencode(kept))), schema


def redact(url: str) -> str:
    """The URL with any password replaced by ``***`` (for messages and repr)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc
    userinfo, _, hostinfo = netloc.rpartition("@")
    user = userinfo.split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{hostinfo}"))


class PostgresStorage:
    """An outbox in a PostgreSQL schema. Safe for many threads, processes and machines."""

    def __init__(self, url: str, *, connect_timeout: float = CONNECT_TIMEOUT_SECONDS) -> None:
        self._psycopg = _driver()
        self.location = redact(url)
        self._url, self.schema = split_location(url)
        self.connect_timeout = connect_timeout
        s = self.schema
        self._s = s
        # Two keys for advisory locks: one for migrations, one that orders claims.
        self._migrate_key = f"cio_outbox:{s}:migrate"
        self._claim_key = f"cio_outbox:{s}:claim"
        self._local = threading.local()
        self._all: list[tuple[threading.Thread, Any]] = []
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._migrate()

    # -- connections -------------------------------------------------------------------

    def _connect(self) -> psycopg.Connection[Any]:
        psycopg = self._psycopg
        try:
            conn = psycopg.connect(
                self._url, autocommit=True, connect_timeout=max(1, int(self.connect_timeout)),
                application_name="cio-outbox",
            )
        except psycopg.Error as exc:
            raise self._explain(exc) from None
        return conn

    @property
    def conn(self) -> psycopg.Connection[Any]:
        if os.getpid() != self._pid:  # forked: the parent's connections are not ours
            self._pid = os.getpid()
            self._local = threading.local()
            with self._lock:
                self._all = []
        conn = getattr(self._local, "conn", None)
        if conn is not None and (conn.closed or conn.broken):
            conn = None
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
            with self._lock:
                # Close connections of threads that ended (a worker's senders per run).
                alive = []
                for thread, other in self._all:
                    if thread.is_alive() and not other.closed:
                        alive.append((thread, other))
                    else:
                        with suppress(Exception):
                            other.close()
                alive.append((threading.current_thread(), conn))
                self._all = alive
        return conn

    def _explain(self, exc: Exception) -> StorageError:
        text = str(exc).strip()
        where = self.location
        errors = self._psycopg.errors
        if isinstance(exc, errors.InsufficientPrivilege):
            return StorageError(
                f"outbox {where} (schema {self.schema}): permission denied ({text}); the "
                "database user needs to create and use that schema"
            )
        if isinstance(exc, self._psycopg.OperationalError):
            return StorageError(f"cannot use outbox {where}: {text}")
        return StorageError(f"outbox {where}: {text}")

    def _tx(self, body: Callable[[Any], T]) -> T:
        """Run body(cursor) in one transaction; retry it after a dead-lock."""
        psycopg = self._psycopg
        retryable = (
            psycopg.errors.DeadlockDetected,
            psycopg.errors.SerializationFailure,
            psycopg.errors.LockNotAvailable,
        )
        for attempt in range(_RETRIES):
            conn = self.conn
            try:
                with conn.transaction(), conn.cursor() as cur:
                    return body(cur)
            except retryable:
                if attempt == _RETRIES - 1:
                    raise
                time.sleep(random.uniform(0.001, 0.01 * (attempt + 1)))
            except psycopg.Error as exc:
                raise self._explain(exc) from None
        raise AssertionError("unreachable")

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        from psycopg.rows import dict_row

        try:
            with self.conn.cursor(row_factory=dict_row) as cur:
                cur.execute(sql, params)
                return cur.fetchall()
        except self._psycopg.Error as exc:
            raise self._explain(exc) from None

    def _migrate(self) -> None:
        s = self._s

        def body(cur: Any) -> None:
            cur.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
                        (self._migrate_key,))
            cur.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (s,))
            if cur.fetchone() is None:  # create only when missing: that needs a privilege
                cur.execute(f"CREATE SCHEMA {s}")
            cur.execute(
                "SELECT count(*) FROM pg_tables WHERE schemaname = %s", (s,)
            )
            tables = cur.fetchone()[0]
            cur.execute(
                "SELECT 1 FROM pg_tables WHERE schemaname = %s AND tablename = 'schema_version'",
                (s,),
            )
            if cur.fetchone() is None:
                if tables:
                    raise StorageError(
                        f"schema {s} of {self.location} holds tables that are not a "
                        "cio-outbox outbox; choose another with ?schema=name in the URL"
                    )
                cur.execute(
                    f"CREATE TABLE {s}.schema_version (version INTEGER PRIMARY KEY,"
                    f" applied_at DOUBLE PRECISION NOT NULL)"
                )
            cur.execute(f"SELECT coalesce(max(version), 0) FROM {s}.schema_version")
            version = cur.fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StorageError(
                    f"{self.location} (schema {s}) has schema version {version}, newer than "
                    f"this cio-outbox understands ({SCHEMA_VERSION}); upgrade cio-outbox"
                )
            for number in range(version, SCHEMA_VERSION):
                cur.execute(MIGRATIONS[number].format(s=s))
                cur.execute(
                    f"INSERT INTO {s}.schema_version (version, applied_at) VALUES (%s, {_NOW})",
                    (number + 1,),
                )

        self._tx(body)

    @property
    def schema_version(self) -> int:
        return int(self._read(
            f"SELECT coalesce(max(version), 0) AS v FROM {self._s}.schema_version"
        )[0]["v"])

    # -- enqueue -----------------------------------------------------------------------

    def insert(self, rows: Iterable[NewRow], *, chunk_size: int = CHUNK_ROWS) -> int:
        """Add rows in chunked transactions; large chunks travel by COPY (about twice as
        fast as one INSERT of arrays), then one INSERT ... ON CONFLICT DO NOTHING."""
        s = self._s
        insert = (
            f"WITH added AS (INSERT INTO {s}.messages (message_id, run, call_type, person,"
            f" payload, size, created_at, updated_at)"
            f" SELECT m, r, c, p, b, z, {_NOW}, {_NOW} FROM %s ORDER BY o"
            f" ON CONFLICT (message_id) DO NOTHING RETURNING run)"
            f" SELECT run, count(*) FROM added GROUP BY run"
        )
        from_arrays = insert.replace("%s", (
            "unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::text[], %s::int[])"
            " WITH ORDINALITY AS t(m, r, c, p, b, z, o)"
        ), 1)
        from_copy = insert.replace("%s", "cio_new_rows", 1)
        added = 0
        iterator = iter(rows)
        while True:
            chunk = list(islice(iterator, chunk_size))
            if not chunk:
                return added

            def body(cur: Any, chunk: list[NewRow] = chunk) -> int:
                if len(chunk) < _COPY_FROM:
                    cur.execute(from_arrays, (
                        [r.message_id for r in chunk], [r.run for r in chunk],
                        [r.call_type for r in chunk], [r.person for r in chunk],
                        [r.payload for r in chunk], [r.size for r in chunk],
                    ))
                else:
                    cur.execute(
                        "CREATE TEMP TABLE cio_new_rows (m text, r text, c text, p text,"
                        " b text, z int, o int) ON COMMIT DROP"
                    )
                    with cur.copy("COPY cio_new_rows FROM STDIN") as copy:
                        for order, r in enumerate(chunk):
                            copy.write_row((r.message_id, r.run, r.call_type, r.person,
                                            r.payload, r.size, order))
                    cur.execute(from_copy)
                deltas: Deltas = {(run, "pending"): n for run, n in cur.fetchall()}
                self._shift(cur, deltas)
                return sum(deltas.values())

            added += self._tx(body)

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
        s = self._s
        page = max(2 * max_messages, 500)
        if run is None:
            sql = (
                f"SELECT {_CANDIDATE_COLUMNS} FROM {s}.messages WHERE status = 'pending'"
                " AND id > %s ORDER BY id LIMIT %s"
            )
            args: tuple[Any, ...] = ()
        else:
            sql = (
                f"SELECT {_CANDIDATE_COLUMNS} FROM {s}.messages"
                " WHERE status = 'pending' AND run = %s AND id > %s ORDER BY run, id LIMIT %s"
            )
            args = (run,)

        def body(cur: Any) -> list[Row]:
            # Claims follow one another (see the module docstring); other writers do not wait.
            cur.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
                        (self._claim_key,))
            cur.execute("SELECT extract(epoch from clock_timestamp())::float8")
            now = cur.fetchone()[0]
            deltas: Deltas = defaultdict(int)
            # Rows leased by a worker that died come back once their lease has expired.
            self._transition(
                cur, deltas, "status = 'in_flight' AND lease_expires_at < %s", (now,),
                "pending", "worker_id = NULL, lease_expires_at = NULL, updated_at = %s", (now,),
            )
            cur.execute(
                f"SELECT person FROM {s}.messages WHERE status = 'in_flight'"
                f" UNION SELECT person FROM {s}.messages WHERE status = 'pending'"
                " AND next_attempt_at IS NOT NULL AND next_attempt_at > %s",
                (now,),
            )
            blocked = {person for (person,) in cur.fetchall()}
            chosen: list[Row] = []
            after = 0
            for _ in range(5):  # bounded: never scan far inside the claim lock
                cur.execute(sql, (*args, after, page))
                # Narrow rows: payloads are read only for the rows chosen.
                batch = [Row(i, "", r, c, p, "", n, a) for i, r, c, p, n, a in cur.fetchall()]
                if not batch:
                    break
                chosen = select(batch, blocked, max_bytes=max_bytes, max_messages=max_messages)
                if chosen:
                    break
                after = batch[-1].id
                blocked.update(row.person for row in batch)
            if chosen:
                cur.execute(
                    f"SELECT id FROM {s}.messages WHERE id = ANY(%s::bigint[])"
                    " AND status = 'pending' FOR UPDATE SKIP LOCKED",
                    ([r.id for r in chosen],),
                )
                locked = {row_id for (row_id,) in cur.fetchall()}
                if len(locked) < len(chosen):
                    chosen = _in_order(chosen, locked)
            if chosen:
                cur.execute(
                    f"UPDATE {s}.messages SET status = 'in_flight', worker_id = %s,"
                    " lease_expires_at = %s, next_attempt_at = NULL, updated_at = %s"
                    " WHERE id = ANY(%s::bigint[])",
                    (worker_id, now + lease_seconds, now, [r.id for r in chosen]),
                )
                for row in chosen:
                    deltas[(row.run, "pending")] -= 1
                    deltas[(row.run, "in_flight")] += 1
                cur.execute(
                    f"SELECT id, message_id, payload FROM {s}.messages"
                    " WHERE id = ANY(%s::bigint[])",
                    ([r.id for r in chosen],),
                )
                bodies = {row_id: (mid, payload) for row_id, mid, payload in cur.fetchall()}
                for row in chosen:
                    row.message_id, row.payload = bodies[row.id]
            self._shift(cur, deltas)
            return chosen

        return self._tx(body)

    def extend_lease(self, ids: Sequence[int], worker_id: str, lease_seconds: float) -> None:
        def body(cur: Any) -> None:
            cur.execute(
                f"UPDATE {self._s}.messages SET lease_expires_at = {_NOW} + %s,"
                f" updated_at = {_NOW} WHERE id = ANY(%s::bigint[]) AND status = 'in_flight'",
                (lease_seconds, list(ids)),
            )

        self._tx(body)

    def record_attempt(self, attempt: Attempt, *, count: bool, sent: bool = False) -> None:
        s = self._s
        ids = [row.id for row in attempt.rows]
        runs = sorted({row.run for row in attempt.rows})

        def body(cur: Any) -> None:
            cur.execute(
                f"INSERT INTO {s}.attempts (at, worker_id, endpoint, runs, messages, bytes,"
                " status_code, latency_ms, outcome, error, row_ranges, min_row_id, max_row_id)"
                f" VALUES ({_NOW}, %s, %s, %s::jsonb, %s, %s, %s, %s, %s, %s, %s::jsonb, %s, %s)"
                " RETURNING id",
                (
                    attempt.worker_id, attempt.endpoint, json.dumps(runs), len(ids),
                    attempt.bytes, attempt.status_code, attempt.latency_ms, attempt.outcome,
                    attempt.error, json.dumps(row_ranges(ids)), min(ids), max(ids),
                ),
            )
            attempt_id = cur.fetchone()[0]
            cur.execute(
                f"INSERT INTO {s}.attempt_runs (run, attempt_id)"
                " SELECT unnest(%s::text[]), %s ON CONFLICT DO NOTHING",
                (runs, attempt_id),
            )
            if count:
                cur.execute(
                    f"UPDATE {s}.messages SET attempts = attempts + 1, last_error = %s,"
                    f" updated_at = {_NOW} WHERE id = ANY(%s::bigint[])",
                    (attempt.error, ids),
                )
            if sent:  # same transaction: the audit never says sent for a row still in flight
                deltas: Deltas = defaultdict(int)
                self._transition(cur, deltas, self._SENT_WHERE, (ids,), "sent", self._SENT_SET, ())
                self._shift(cur, deltas)

        self._tx(body)

    _SENT_WHERE = "id = ANY(%s::bigint[])"
    _SENT_SET = (
        f"sent_at = {_NOW}, updated_at = {_NOW}, worker_id = NULL,"
        " lease_expires_at = NULL, next_attempt_at = NULL, last_error = NULL"
    )

    def mark_sent(self, ids: Sequence[int]) -> None:
        self._change(self._SENT_WHERE, (list(ids),), "sent", self._SENT_SET, ())

    def dead_letter(self, errors: Sequence[tuple[int, str]]) -> None:
        if not errors:
            return

        def body(cur: Any) -> None:
            deltas: Deltas = defaultdict(int)
            # One statement: each row gets its own error, from the unnested pair of arrays.
            cur.execute(
                f"WITH e AS (SELECT * FROM unnest(%s::bigint[], %s::text[]) AS e(id, error)),"
                f" old AS (SELECT m.id, m.run, m.status, e.error FROM {self._s}.messages m"
                f" JOIN e ON e.id = m.id WHERE m.status NOT IN ('sent', 'failed')"
                f" ORDER BY m.id FOR UPDATE OF m),"
                f" moved AS (UPDATE {self._s}.messages m SET status = 'failed',"
                f" last_error = old.error, updated_at = {_NOW}, worker_id = NULL,"
                f" lease_expires_at = NULL, next_attempt_at = NULL FROM old"
                f" WHERE m.id = old.id RETURNING old.run, old.status)"
                f" SELECT run, status, count(*) FROM moved GROUP BY run, status",
                ([row_id for row_id, _ in errors], [error for _, error in errors]),
            )
            for run, old_status, n in cur.fetchall():
                deltas[(run, old_status)] -= n
                deltas[(run, "failed")] += n
            self._shift(cur, deltas)

        self._tx(body)

    def release(self, ids: Sequence[int], *, next_attempt_at: float | None = None) -> None:
        self._change(
            "id = ANY(%s::bigint[]) AND status = 'in_flight'", (list(ids),), "pending",
            f"worker_id = NULL, lease_expires_at = NULL, next_attempt_at = %s,"
            f" updated_at = {_NOW}",
            (next_attempt_at,),
        )

    def release_worker(self, worker_id: str) -> int:
        return self._change(
            "status = 'in_flight' AND worker_id = %s", (worker_id,), "pending",
            f"worker_id = NULL, lease_expires_at = NULL, updated_at = {_NOW}", (),
        )

    # -- reporting ---------------------------------------------------------------------

    def counts(self, run: str | None = None) -> dict[str, int]:
        result = {"pending": 0, "in_flight": 0, "sent": 0, "failed": 0}
        if run is None:
            rows = self._read(
                f"SELECT status, sum(n) AS n FROM {self._s}.counts GROUP BY status"
            )
        else:
            rows = self._read(
                f"SELECT status, n FROM {self._s}.counts WHERE run = %s", (run,)
            )
        for row in rows:
            result[row["status"]] = int(row["n"])
        return result

    def runs(self) -> list[dict[str, Any]]:
        by_run: dict[str, dict[str, Any]] = {}
        for row in self._read(f"SELECT run, status, n FROM {self._s}.counts ORDER BY run"):
            entry = by_run.setdefault(
                row["run"], {"run": row["run"], "pending": 0, "in_flight": 0, "sent": 0,
                             "failed": 0}
            )
            entry[row["status"]] = int(row["n"])
        return [entry for entry in by_run.values() if any(
            entry[s] for s in ("pending", "in_flight", "sent", "failed"))]

    def oldest_pending(self, run: str | None = None) -> float | None:
        s = self._s
        if run is None:
            rows = self._read(
                f"SELECT created_at FROM {s}.messages WHERE status = 'pending'"
                " ORDER BY id LIMIT 1"
            )
        else:
            rows = self._read(
                f"SELECT created_at FROM {s}.messages WHERE status = 'pending' AND run = %s"
                " ORDER BY run, id LIMIT 1",
                (run,),
            )
        return rows[0]["created_at"] if rows else None

    def last_error(self, run: str | None = None) -> dict[str, Any] | None:
        s = self._s
        if run is None:
            rows = self._read(
                f"SELECT * FROM {s}.attempts WHERE error IS NOT NULL ORDER BY id DESC LIMIT 1"
            )
        else:
            rows = self._read(
                f"SELECT a.* FROM {s}.attempts a JOIN {s}.attempt_runs r"
                " ON r.attempt_id = a.id"
                " WHERE r.run = %s AND a.error IS NOT NULL ORDER BY a.id DESC LIMIT 1",
                (run,),
            )
        return rows[0] if rows else None

    def sent_since(self, since: float, run: str | None = None) -> int:
        s = self._s
        if run is None:
            rows = self._read(
                f"SELECT coalesce(sum(messages), 0) AS n FROM {s}.attempts"
                " WHERE at >= %s AND outcome = 'sent'",
                (since,),
            )
        else:
            rows = self._read(
                f"SELECT coalesce(sum(a.messages), 0) AS n FROM {s}.attempts a"
                f" JOIN {s}.attempt_runs r ON r.attempt_id = a.id"
                " WHERE r.run = %s AND a.at >= %s AND a.outcome = 'sent'",
                (run, since),
            )
        return int(rows[0]["n"])

    def failed(self, run: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        return self.rows(run=run, status="failed", limit=limit)

    def rows(
        self, *, run: str | None = None, status: str | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        where: list[str] = []
        params: list[Any] = []
        if status is not None:
            where.append("status = %s")
            params.append(status)
        if run is not None:
            where.append("run = %s")
            params.append(run)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        return self._read(
            f"SELECT * FROM {self._s}.messages {clause} ORDER BY id LIMIT %s", (*params, limit)
        )

    def requeue(self, *, ids: Sequence[int] | None = None, run: str | None = None) -> int:
        where = "status = 'failed'"
        params: list[Any] = []
        if ids is not None:
            where += " AND id = ANY(%s::bigint[])"
            params.append(list(ids))
        if run is not None:
            where += " AND run = %s"
            params.append(run)
        return self._change(
            where, params, "pending",
            f"attempts = 0, next_attempt_at = NULL, updated_at = {_NOW}", (),
        )

    def replace_failed(
        self, row_id: int, *, payload: str, size: int, call_type: str, person: str
    ) -> bool:
        return self._change(
            "id = %s AND status = 'failed'", [row_id], "pending",
            "payload = %s, size = %s, call_type = %s, person = %s, attempts = 0,"
            f" next_attempt_at = NULL, updated_at = {_NOW},"
            " last_error = 'replaced; was: ' || coalesce(last_error, '')",
            (payload, size, call_type, person),
        ) == 1

    def message(self, message_id: str) -> dict[str, Any] | None:
        rows = self._read(
            f"SELECT * FROM {self._s}.messages WHERE message_id = %s", (message_id,)
        )
        return rows[0] if rows else None

    def attempts_for(self, row_id: int) -> list[dict[str, Any]]:
        rows = self._read(
            f"SELECT * FROM {self._s}.attempts WHERE max_row_id >= %s AND min_row_id <= %s"
            " ORDER BY id",
            (row_id, row_id),
        )
        return [row for row in rows if in_ranges(row_id, row["row_ranges"])]

    def attempts(self, run: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        s = self._s
        if run is None:
            rows = self._read(
                f"SELECT * FROM {s}.attempts ORDER BY id DESC LIMIT %s", (limit,)
            )
        else:
            rows = self._read(
                f"SELECT a.* FROM {s}.attempts a JOIN {s}.attempt_runs r"
                " ON r.attempt_id = a.id WHERE r.run = %s ORDER BY a.id DESC LIMIT %s",
                (run, limit),
            )
        return list(reversed(rows))

    # -- retention and data protection -------------------------------------------------

    def purge_sent(self, before: float) -> int:
        return self._remove("status = 'sent' AND sent_at < %s", (before,))

    def forget(self, person: str) -> int:
        """Delete every row naming this person, scrub audit errors, then VACUUM FULL.

        VACUUM FULL rewrites the tables (and their TOAST and indexes) into new files, so
        the deleted rows are in no table file afterwards. PostgreSQL still keeps them in
        WAL segments until they are recycled, and in any WAL archive, base backup or
        replica made before: those are the operator's to expire.
        """
        s = self._s
        needle = json.dumps(person, ensure_ascii=False)

        def body(cur: Any) -> int:
            deltas: Deltas = defaultdict(int)
            deleted = self._delete(
                cur, deltas, "person = %s OR strpos(payload, %s) > 0", (person, needle)
            )
            cur.execute(
                f"UPDATE {s}.attempts SET error = replace(error, %s, '[forgotten]')"
                " WHERE strpos(error, %s) > 0",
                (person, person),
            )
            cur.execute(
                f"UPDATE {s}.messages SET last_error = replace(last_error, %s, '[forgotten]')"
                " WHERE strpos(last_error, %s) > 0",
                (person, person),
            )
            cur.execute(
                f"INSERT INTO {s}.forgotten (at, rows_deleted) VALUES ({_NOW}, %s)", (deleted,)
            )
            self._shift(cur, deltas)
            return deleted

        deleted = self._tx(body)
        self.vacuum()
        return deleted

    def vacuum(self) -> None:
        """Rewrite the tables that hold personal data so deleted rows leave no trace."""
        try:
            with self.conn.cursor() as cur:  # autocommit: VACUUM cannot run in a transaction
                cur.execute(f"VACUUM FULL {self._s}.messages, {self._s}.attempts")
        except self._psycopg.Error as exc:
            raise self._explain(exc) from None

    def drop(self) -> None:
        """Delete this outbox: its whole schema and everything in it."""
        try:
            with self.conn.cursor() as cur:
                cur.execute(f"DROP SCHEMA IF EXISTS {self._s} CASCADE")
        except self._psycopg.Error as exc:
            raise self._explain(exc) from None

    def close(self) -> None:
        with self._lock:
            for _, conn in self._all:
                with suppress(Exception):
                    conn.close()
            self._all = []
        self._local = threading.local()

    def __repr__(self) -> str:
        return f"PostgresStorage({self.location!r})"

    # -- recurring syncs (issue 20): the table and its SQL are in storage/sync_state.py --

    def sync_transaction(self, body: Any, *, write: bool = True) -> Any:
        """``body(tx)`` in one transaction: it reads and writes sync state through
        ``tx.db`` and adds messages with ``tx.insert(rows)``; all of it commits together
        or not at all. Retried after a dead-lock. (``write`` matters to SQLite only.)"""
        from cio_outbox.storage import sync_state

        dialect = sync_state.postgres(self._s)
        if not getattr(self, "_sync_ready", False):
            def create(cur: Any) -> None:
                cur.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
                            (self._migrate_key,))
                sync_state.create(cur, dialect)

            self._tx(create)
            self._sync_ready = True
        s = self._s
        insert_sql = (
            f"WITH added AS (INSERT INTO {s}.messages (message_id, run, call_type, person,"
            f" payload, size, created_at, updated_at)"
            f" SELECT m, r, c, p, b, z, {_NOW}, {_NOW} FROM unnest(%s::text[], %s::text[],"
            f" %s::text[], %s::text[], %s::text[], %s::int[]) WITH ORDINALITY"
            f" AS t(m, r, c, p, b, z, o) ORDER BY o"
            f" ON CONFLICT (message_id) DO NOTHING RETURNING run)"
            f" SELECT run, count(*) FROM added GROUP BY run"
        )

        def run(cur: Any) -> Any:
            def insert(rows: Sequence[NewRow]) -> int:
                if not rows:
                    return 0
                cur.execute(insert_sql, (
                    [r.message_id for r in rows], [r.run for r in rows],
                    [r.call_type for r in rows], [r.person for r in rows],
                    [r.payload for r in rows], [r.size for r in rows]))
                deltas: Deltas = {(name, "pending"): n for name, n in cur.fetchall()}
                self._shift(cur, deltas)
                return sum(deltas.values())

            return body(sync_state.SyncTransaction(cur, dialect, insert))

        return self._tx(run)

    # -- status bookkeeping, in the caller's transaction -------------------------------

    def _shift(self, cur: Any, deltas: Deltas) -> None:
        """Apply changes to the per-run status counts, in a fixed order (no dead-locks)."""
        items = sorted((key, n) for key, n in deltas.items() if n)
        if not items:
            return
        cur.execute(
            f"INSERT INTO {self._s}.counts AS c (run, status, n)"
            " SELECT * FROM unnest(%s::text[], %s::text[], %s::bigint[])"
            " ON CONFLICT (run, status) DO UPDATE SET n = c.n + excluded.n",
            ([k[0] for k, _ in items], [k[1] for k, _ in items], [n for _, n in items]),
        )

    def _transition(
        self,
        cur: Any,
        deltas: Deltas,
        where: str,
        params: Sequence[Any],
        new_status: str,
        assignments: str,
        assignment_params: Sequence[Any],
    ) -> int:
        """Move the rows matching ``where`` to ``new_status``; add the moves to deltas."""
        s = self._s
        cur.execute(
            f"WITH old AS (SELECT id, run, status FROM {s}.messages"
            f" WHERE ({where}) AND status != %s ORDER BY id FOR UPDATE),"
            f" moved AS (UPDATE {s}.messages m SET status = %s, {assignments} FROM old"
            f" WHERE m.id = old.id RETURNING old.run, old.status)"
            f" SELECT run, status, count(*) FROM moved GROUP BY run, status",
            (*params, new_status, new_status, *assignment_params),
        )
        total = 0
        for run, old_status, n in cur.fetchall():
            deltas[(run, old_status)] -= n
            deltas[(run, new_status)] += n
            total += n
        return total

    def _change(
        self, where: str, params: Sequence[Any], new_status: str, assignments: str,
        assignment_params: Sequence[Any],
    ) -> int:
        def body(cur: Any) -> int:
            deltas: Deltas = defaultdict(int)
            moved = self._transition(
                cur, deltas, where, params, new_status, assignments, assignment_params
            )
            self._shift(cur, deltas)
            return moved

        return self._tx(body)

    def _delete(self, cur: Any, deltas: Deltas, where: str, params: Sequence[Any]) -> int:
        cur.execute(
            f"WITH gone AS (DELETE FROM {self._s}.messages WHERE {where}"
            " RETURNING run, status) SELECT run, status, count(*) FROM gone GROUP BY run, status",
            params,
        )
        total = 0
        for run, status, n in cur.fetchall():
            deltas[(run, status)] -= n
            total += n
        return total

    def _remove(self, where: str, params: Sequence[Any]) -> int:
        def body(cur: Any) -> int:
            deltas: Deltas = defaultdict(int)
            removed = self._delete(cur, deltas, where, params)
            self._shift(cur, deltas)
            return removed

        return self._tx(body)


def _in_order(chosen: list[Row], locked: set[int]) -> list[Row]:
    """The chosen rows we could lock, minus every row after an unlocked one of its person."""
    skipped: set[str] = set()
    kept: list[Row] = []
    for row in chosen:
        if row.id not in locked:
            skipped.add(row.person)
        elif row.person not in skipped:
            kept.append(row)
    return kept
