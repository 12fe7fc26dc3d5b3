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
- A claim is one short transaction with no global lock: it recovers expired leases,
  reads the free lanes, chooses its share of them (all of them when no other claimant
  waits, see sql.py) and locks only those (rows of the ``lanes`` table, oldest head first,
  ``FOR UPDATE SKIP LOCKED``, so concurrent claims take different lanes, and the lanes it
  leaves are free for the claims of other processes at once; locking every free lane
  kept them from other workers until commit), rechecks in a fresh snapshot
  that nothing of them went in flight meanwhile, lets :func:`cio_outbox.batch.select`
  pick from their pending rows, then locks the picked rows with ``SELECT ... FOR UPDATE
  SKIP LOCKED``. A picked row that another transaction holds (a late ``mark_sent`` of a
  worker whose lease ran out, a ``forget``) is skipped and so is every later picked row
  of its person: one person's rows leave in order. A person's rows share one lane, and
  one claim at a time holds a lane, which closes the race where two claimers would pick
  rows of one person from snapshots that cannot see each other.
- Everything but the connection, the schema versioning, COPY, claim locking and the two
  statements that move or delete rows while counting them is in sql.py, shared with
  SQLite.
- Idle senders of other processes and machines wake on a change: every change that can
  make rows claimable (rows added, sent, released, ...) sends a NOTIFY on the outbox's
  channel, and a listener thread (its own connection, started by the first
  ``wait_for_change``) turns the others' notifications into the same wake-up as a change
  made in this process. Without it, they would claim again only after their poll interval.
- Dead-locks and serialization failures (possible between two imports that add the
  same messageIds in different orders) are retried a few times.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import suppress
from hashlib import blake2b
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_random

from cio_outbox.storage.base import NewRow, Row, StorageError
from cio_outbox.storage.lanes import lane_of, lanes_per_claim
from cio_outbox.storage.location import DEFAULT_SCHEMA, redact, split_location
from cio_outbox.storage.schema import LANES_VERSION, POSTGRES, SCHEMA_VERSION, render
from cio_outbox.storage.slots import MAX_SLOTS, NoFreeSlot, WorkerSlot, slot_id
from cio_outbox.storage.sql import (
    _BUSY,
    _DEFERRED,
    _LANE_HEAD,
    _WAIT,
    Deltas,
    Moved,
    SQLStorage,
    with_thread_connection,
)

if TYPE_CHECKING:
    import psycopg

__all__ = ["DEFAULT_SCHEMA", "PostgresStorage", "redact", "split_location"]

T = TypeVar("T")

CONNECT_TIMEOUT_SECONDS = 10
_RETRIES = 8
IDLE_IN_TRANSACTION_MS = 60_000
_COPY_FROM = 64  # rows from which an insert goes by COPY
# How often a claiming worker renews its entry in the claimants table, in seconds.
_ACTIVE_REFRESH = 1.0
# How often the listener thread looks up from its connection to see if it should stop.
_LISTEN_TICK = 0.5
# The server's clock, in Unix seconds, at the start of the current transaction.
_NOW = "extract(epoch from now())::float8"

_INSERT = (
    "WITH added AS (INSERT INTO {s}messages (message_id, run, call_type, person,"
    " payload, size, lane, created_at, updated_at)"
    " SELECT m, r, c, p, b, z, n, {now}, {now} FROM %s ORDER BY o"
    " ON CONFLICT (message_id) DO NOTHING RETURNING run)"
    " SELECT run, count(*) FROM added GROUP BY run"
)
_FROM_ARRAYS = (
    "unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::text[], %s::int[],"
    " %s::int[]) WITH ORDINALITY AS t(m, r, c, p, b, z, n, o)"
)


# A lane with nothing in flight, probed per lane (one index entry of messages_in_flight)
# rather than NOT EXISTS: the planner estimates the rows in flight from the last ANALYZE,
# usually taken when none were, and then joins every lane against a full scan of the
# in-flight index, visiting the heap for each of its thousands of live and dead entries
# (20 to 30 ms a claim with 4 workers' rows in flight; the probes take a few ms).
_IDLE_LANE = (
    "(SELECT 1 FROM {s}messages b WHERE b.status = 'in_flight' AND b.lane = l.lane LIMIT 1)"
    " IS NULL"
)
_FREE_LANES = (
    "SELECT l.lane, (" + _LANE_HEAD + ") AS head FROM {s}lanes l"
    " WHERE (" + _LANE_HEAD + ") IS NOT NULL"
    " AND " + _IDLE_LANE + " AND NOT EXISTS (" + _DEFERRED + ")"
    " ORDER BY head"
)
# As sql.py's, with the same per-lane probes (an EXISTS became a hash join over every
# pending index entry, dead or alive: 100 ms).
_ANYTHING = (
    "SELECT 1 FROM {s}lanes l WHERE (" + _LANE_HEAD + ") IS NOT NULL"
    " AND " + _IDLE_LANE + " AND NOT EXISTS (" + _DEFERRED.replace("?", "{now}") + ")"
    " UNION ALL SELECT 1 FROM {s}messages WHERE status = 'in_flight'"
    " AND lease_expires_at < {now} LIMIT 1"
)


# The fenced change of claimed rows, looked up by id (the primary key). With the status
# test written plainly, the planner scanned the whole in-flight index instead (every
# worker's rows in flight, and the dead entries of those sent since the last vacuum), on
# its estimate from the last ANALYZE that few rows are in flight. The concatenation is
# not provable from that index's predicate, so only the id lookup remains.
_FENCED = (
    "UPDATE {s}messages SET %s"
    " WHERE (status || '') = 'in_flight' AND claim_token = ? AND {ids} RETURNING id, run"
)
# A claim's lease in one statement: lock the chosen rows (skipping rows another
# transaction holds), lease them, and return their message ids and payloads.
_LOCK_AND_LEASE = (
    "WITH locked AS (SELECT id FROM {s}messages WHERE id = ANY(?::bigint[])"
    " AND status = 'pending' FOR UPDATE SKIP LOCKED)"
    " UPDATE {s}messages m SET status = 'in_flight', worker_id = ?, lease_expires_at = ?,"
    " next_attempt_at = NULL, updated_at = ?, claim_token = ? FROM locked"
    " WHERE m.id = locked.id RETURNING m.id, m.message_id, m.payload"
)
# Rows leased above that must not go (a row of their person was skipped): back to pending.
_UNLEASE = (
    "UPDATE {s}messages SET status = 'pending', worker_id = NULL, lease_expires_at = NULL,"
    " claim_token = NULL WHERE id = ANY(?::bigint[])"
)


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


#: The tables that can hold a person's data (the sync tables exist once a sync ran).
_PERSONAL_TABLES = ("messages", "attempts", "sync_keys", "sync_runs")
# Other clients' transactions in this database that began before a moment and may see
# rows deleted since (a snapshot, or an id of their own, holds VACUUM back).
_OLDER_TRANSACTIONS = (
    "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
    " AND pid <> pg_backend_pid() AND (backend_xmin IS NOT NULL OR backend_xid IS NOT NULL)"
    " AND coalesce(xact_start, query_start) < %s ORDER BY pid"
)


class PostgresStorage(SQLStorage):
    """An outbox in a PostgreSQL schema. Safe for many threads, processes and machines."""

    #: Seconds :meth:`vacuum` waits for older transactions before it rewrites the tables.
    vacuum_wait: float = 60.0

    placeholder = "%s"
    _anything_sql = _ANYTHING
    _fenced_sql = _FENCED
    fields: ClassVar[dict[str, str]] = {
        "now": _NOW, "clock": "extract(epoch from clock_timestamp())::float8",
        "ids": "id = ANY(?::bigint[])", "json": "JSONB", "pending_run": "",
        "previous_id": "(payload::jsonb ->> 'previousId')",
        "lane_pending": "", "lanes": "lane = ANY(?::int[])",
    }

    def __init__(self, url: str, *, connect_timeout: float = CONNECT_TIMEOUT_SECONDS) -> None:
        self._psycopg = _driver()
        self.location = redact(url)
        self._url, self.schema = split_location(url)
        self.connect_timeout = connect_timeout
        self._s = self.schema
        self.prefix = f"{self.schema}."
        # The advisory lock that lets one process at a time migrate the schema.
        self._migrate_key = f"cio_outbox:{self.schema}:migrate"
        self._local = threading.local()
        self._all: list[tuple[threading.Thread, Any]] = []
        self._lock = threading.Lock()
        self._pid = os.getpid()
        # LISTEN/NOTIFY: the outbox's channel (an identifier of at most 63 bytes), and
        # this object's mark on its own notifications (it has woken its waiters already).
        self._channel = "cio_outbox_" + blake2b(self.schema.encode(), digest_size=12).hexdigest()
        self._mark = secrets.token_hex(8)
        self._listener: tuple[int, threading.Thread, threading.Event, threading.Event] | None \
            = None
        self._migrate()

    # -- connections -------------------------------------------------------------------

    def _connect(self) -> psycopg.Connection[Any]:
        psycopg = self._psycopg
        try:
            conn = psycopg.connect(
                self._url, autocommit=True, connect_timeout=max(1, int(self.connect_timeout)),
                application_name="cio-outbox",
                # Our transactions last milliseconds. One left open longer belongs to a
                # process that is paused (SIGSTOP, a suspended laptop) or hung; the server
                # ends it, so that its claim lock and row locks do not stop every worker.
                options=f"-c idle_in_transaction_session_timeout={IDLE_IN_TRANSACTION_MS}",
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
                self._all = with_thread_connection(self._all, conn,
                                                   closed=lambda other: other.closed)
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
        """Run body(cursor) in one transaction; run it again after a dead-lock or a
        serialization failure (a few times, with a short random pause)."""
        psycopg = self._psycopg
        retryable = (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure,
                     psycopg.errors.LockNotAvailable)

        def once() -> T:
            conn = self.conn
            try:
                with conn.transaction(), conn.cursor() as cur:
                    return body(cur)
            except retryable:
                raise
            except psycopg.Error as exc:
                raise self._explain(exc) from None

        retrying = Retrying(retry=retry_if_exception_type(retryable),
                            stop=stop_after_attempt(_RETRIES), wait=wait_random(0.001, 0.05),
                            reraise=True)
        try:
            return retrying(once)
        except retryable as exc:
            raise self._explain(exc) from None

    def _read(self, sql: str, params: Sequence[Any] = (), *, tuples: bool = False
              ) -> list[Any]:
        from psycopg.rows import dict_row, tuple_row

        try:
            with self.conn.cursor(row_factory=tuple_row if tuples else dict_row) as cur:
                cur.execute(sql, params)
                return cur.fetchall()
        except self._psycopg.Error as exc:
            raise self._explain(exc) from None

    def _id_list(self, ids: Sequence[int]) -> list[int]:
        return list(ids)

    # -- schema ------------------------------------------------------------------------

    def _migrate(self) -> None:
        s = self._s

        def body(cur: Any) -> None:
            cur.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
                        (self._migrate_key,))
            cur.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (s,))
            if cur.fetchone() is None:  # create only when missing: that needs a privilege
                cur.execute(f"CREATE SCHEMA {s}")
            cur.execute("SELECT count(*) FROM pg_tables WHERE schemaname = %s", (s,))
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
                script = render(number, POSTGRES, self.prefix)
                if script.strip():  # a migration may concern SQLite only
                    cur.execute(script)
                if number + 1 == LANES_VERSION:
                    self._fill_lanes(cur)
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

    # -- hooks -------------------------------------------------------------------------

    def _insert_chunk(self, cur: Any, chunk: list[NewRow]) -> Deltas:
        """Small chunks as arrays; large ones by COPY (about twice as fast as one INSERT
        of arrays) into a temporary table, then one INSERT ... ON CONFLICT DO NOTHING."""
        insert = self.q(_INSERT.replace("%s", "{source}"))
        lanes = self.lanes
        if len(chunk) < _COPY_FROM:
            cur.execute(insert.replace("{source}", _FROM_ARRAYS), (
                [r.message_id for r in chunk], [r.run for r in chunk],
                [r.call_type for r in chunk], [r.person for r in chunk],
                [r.payload for r in chunk], [r.size for r in chunk],
                [lane_of(r.person, lanes) for r in chunk],
            ))
        else:
            # IF NOT EXISTS and the DELETE below: a transaction may insert more than once
            # (a sync writes its new rows and its deletions together).
            cur.execute("CREATE TEMP TABLE IF NOT EXISTS cio_new_rows (m text, r text, c text,"
                        " p text, b text, z int, n int, o int) ON COMMIT DROP")
            with cur.copy("COPY cio_new_rows FROM STDIN") as copy:
                for order, r in enumerate(chunk):
                    copy.write_row((r.message_id, r.run, r.call_type, r.person, r.payload,
                                    r.size, lane_of(r.person, lanes), order))
            cur.execute(insert.replace("{source}", "cio_new_rows"))
            added = {(run, "pending"): n for run, n in cur.fetchall()}
            cur.execute("DELETE FROM cio_new_rows")
            return added
        return {(run, "pending"): n for run, n in cur.fetchall()}

    def _sync_dialect(self) -> Any:
        from cio_outbox.storage import sync_state

        return sync_state.postgres(self._s)

    def _create_sync_state(self, cur: Any) -> None:
        # Two processes creating the table at once would collide: one at a time.
        cur.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
                    (self._migrate_key,))
        super()._create_sync_state(cur)

    def _free_lanes(self, cur: Any, now: float, run: str | None) -> list[tuple[int, int]]:
        # Read without locks; _keep_lanes locks and rechecks the lanes the claim keeps.
        run_filter, run_args = ("", ()) if run is None else (" AND h.run = ?", (run,))
        return [(lane, head) for lane, head in cur.execute(
            self.q(_FREE_LANES % (run_filter, run_filter)),
            (*run_args, *run_args, now)).fetchall()]

    def _claimant_to_note(self, worker_id: str, run: str | None) -> bool:
        return True  # every claiming worker is a claimant here (see _note_claimant)

    def _note_claimant(self, cur: Any, worker_id: str, now: float, served: bool,
                       run: str | None) -> None:
        """Record that this worker claims, served or not: on PostgreSQL the claimants
        table lists every worker that claimed in the last WAITING_SECONDS, and a claim
        shares the free lanes among all of them.

        Counting only workers whose last claim found nothing (SQLite's rule) let workers
        whose requests ended together (one NOTIFY wakes them all) each see itself alone
        and try to take every free lane: the first took all, and the others sat out a
        round. Written at most once a second per worker (a small HOT update)."""
        noted: dict[str, float] = self.__dict__.setdefault("_waiting_as", {})
        last = noted.get(worker_id)
        if last is None or time.monotonic() - last > _ACTIVE_REFRESH:
            cur.execute(self.q(_WAIT), (worker_id, now))
            noted[worker_id] = time.monotonic()

    def _keep_lanes(self, cur: Any, free: list[tuple[int, int]], take: int, now: float
                    ) -> list[tuple[int, int]]:
        if not free or take <= 0:
            return []
        # Alone, a claim takes no more than a shared claim would: with every free lane,
        # a worker that started first held them all for its first request while the
        # workers started with it found nothing (no row is cheaper to lease for being
        # next to the others here, unlike SQLite's page writes).
        take = min(take, max(lanes_per_claim(self.lanes), take if take < len(free) else 0))
        kept: set[int] = set()
        tried: set[int] = set()
        while len(kept) < take:
            order = [lane for lane, _ in free if lane not in tried]
            if not order:
                break
            # LIMIT applies after the locks: lanes another claim holds are skipped and the
            # next oldest taken instead, up to this claim's share.
            cur.execute(
                f"SELECT lane FROM {self._s}.lanes WHERE lane = ANY(%s::int[])"
                " ORDER BY array_position(%s::int[], lane) LIMIT %s FOR UPDATE SKIP LOCKED",
                (order, order, take - len(kept)),
            )
            locked = [lane for (lane,) in cur.fetchall()]
            if not locked:
                break
            tried.update(locked)
            # A claim that committed after the read above may have made a lane busy: then
            # lock the next free ones instead (seen in the claim log as claims that kept
            # none of the 8 lanes they chose while 19 others were free).
            busy = {lane for (lane,) in cur.execute(self.q(_BUSY), (locked, now, locked))}
            kept.update(lane for lane in locked if lane not in busy)
        return [(lane, head) for lane, head in free if lane in kept]

    def _scan_candidates(self, cur: Any, lanes: list[tuple[int, int]], run: str | None
                         ) -> Iterator[Row]:
        """Always lane by lane: the one scan in id order over many lanes was planned as
        a bitmap scan of every pending row of those lanes and a sort (270 ms at 27,000
        rows), whatever its LIMIT."""
        return self._lane_candidates(cur, lanes, run)

    def _lease_chosen(self, cur: Any, chosen: list[Row], lease: tuple[Any, ...]
                      ) -> list[Row]:
        """Lock, lease and read the chosen rows in one statement (three before). A
        chosen row another transaction holds (a late mark_sent, a forget) is skipped, and
        so is every later row of its person: those were leased too and go back at once,
        in this transaction (rare)."""
        cur.execute(self.q(_LOCK_AND_LEASE), ([r.id for r in chosen], *lease))
        bodies = {row_id: (message_id, payload)
                  for row_id, message_id, payload in cur.fetchall()}
        kept = chosen if len(bodies) == len(chosen) else _in_order(chosen, set(bodies))
        if len(kept) != len(bodies):
            keep = {r.id for r in kept}
            cur.execute(self.q(_UNLEASE), ([i for i in bodies if i not in keep],))
        for row in kept:
            row.message_id, row.payload = bodies[row.id]
        return sorted(kept, key=lambda r: r.id)

    def _move(self, cur: Any, where: str, params: Sequence[Any], new_status: str,
              assignments: str, assignment_params: Sequence[Any]) -> Moved:
        # Rows are locked in id order first, so that two movers never dead-lock.
        s = self._s
        cur.execute(
            f"WITH old AS (SELECT id, run, status FROM {s}.messages"
            f" WHERE ({where}) AND status != %s ORDER BY id FOR UPDATE),"
            f" moved AS (UPDATE {s}.messages m SET status = %s, {assignments} FROM old"
            f" WHERE m.id = old.id RETURNING old.run, old.status)"
            f" SELECT run, status, count(*) FROM moved GROUP BY run, status",
            (*params, new_status, new_status, *assignment_params),
        )
        return cur.fetchall()

    def _delete(self, cur: Any, where: str, params: Sequence[Any]) -> Moved:
        cur.execute(
            f"WITH gone AS (DELETE FROM {self._s}.messages WHERE {where}"
            " RETURNING run, status) SELECT run, status, count(*) FROM gone GROUP BY run, status",
            params,
        )
        return cur.fetchall()

    def vacuum(self) -> list[int]:
        """Rewrite the tables that hold personal data so deleted rows leave no trace.

        VACUUM FULL rewrites the tables (and their TOAST and indexes) into new files. It
        copies a deleted row too while any transaction that may still see it is open, in
        this database, by any client: so it first waits, up to :attr:`vacuum_wait`
        seconds, for the transactions that began before it to end, and returns the
        process ids of those still open (their rows' traces stay until a later vacuum).
        Prepared transactions and replication slots hold rows back the same way and are
        not waited for. PostgreSQL also keeps deleted rows in WAL segments until they are
        recycled, and in any WAL archive, base backup or replica made before: those are
        the operator's to expire."""
        try:
            with self.conn.cursor() as cur:  # autocommit: VACUUM cannot run in a transaction
                started = cur.execute("SELECT clock_timestamp()").fetchone()[0]
                deadline = time.monotonic() + self.vacuum_wait
                while True:
                    older = [pid for (pid,) in cur.execute(_OLDER_TRANSACTIONS, (started,))]
                    if not older or time.monotonic() >= deadline:
                        break
                    time.sleep(0.1)
                present = {name for (name,) in cur.execute(
                    "SELECT tablename FROM pg_tables WHERE schemaname = %s", (self.schema,))}
                tables = ", ".join(f"{self._s}.{t}" for t in _PERSONAL_TABLES if t in present)
                cur.execute(f"VACUUM FULL {tables}")
                return older
        except self._psycopg.Error as exc:
            raise self._explain(exc) from None

    def drop(self) -> None:
        """Delete this outbox: its whole schema and everything in it."""
        try:
            with self.conn.cursor() as cur:
                cur.execute(f"DROP SCHEMA IF EXISTS {self._s} CASCADE")
        except self._psycopg.Error as exc:
            raise self._explain(exc) from None

    # -- waking idle senders of other processes (LISTEN/NOTIFY) --------------------------

    def _signal(self) -> None:
        super()._signal()
        # After the change's commit: a lost notification costs the others at most their
        # poll interval, so a failure here is not the caller's.
        with suppress(Exception):
            self.conn.execute("SELECT pg_notify(%s, %s)", (self._channel, self._mark))

    def wake(self) -> None:
        """Wake this object's waiters (a worker stopping), not other processes'."""
        super()._signal()

    def wait_for_change(self, seen: int, timeout: float) -> bool:
        """As SQLStorage.wait_for_change; changes made through other storage objects,
        processes and machines wake it too (their NOTIFY, within milliseconds)."""
        started = time.monotonic()
        ready = self._listening()
        if not ready.is_set():
            ready.wait(timeout)
        return super().wait_for_change(seen, max(0.0, timeout - (time.monotonic() - started)))

    def _listening(self) -> threading.Event:
        """The listener thread of this process (started on first use); its ready event."""
        with self._lock:
            current = self._listener
            if current is not None and current[0] == os.getpid() and current[1].is_alive():
                return current[3]
            stop, ready = threading.Event(), threading.Event()
            thread = threading.Thread(target=self._listen, args=(stop, ready),
                                      name=f"cio-listen-{self.schema}", daemon=True)
            self._listener = (os.getpid(), thread, stop, ready)
            thread.start()
            return ready

    def _listen(self, stop: threading.Event, ready: threading.Event) -> None:
        """Turn other objects' notifications into wake-ups until stopped."""
        from psycopg import sql

        heard_before = False
        while not stop.is_set():
            try:
                conn = self._connect()
            except StorageError:
                stop.wait(1.0)  # the server is away: waiters poll meanwhile
                continue
            try:
                conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self._channel)))
                if heard_before:  # changes made while listening again were not heard
                    SQLStorage._signal(self)
                heard_before = True
                ready.set()
                while not stop.is_set():
                    for note in conn.notifies(timeout=_LISTEN_TICK):
                        if note.payload != self._mark:
                            SQLStorage._signal(self)
            except Exception:  # a lost connection: listen again on a new one
                stop.wait(0.1)
            finally:
                with suppress(Exception):
                    conn.close()

    def worker_slot(self) -> WorkerSlot:
        """A slot of this outbox on this host: a session advisory lock on a connection of
        its own, held until released or until the process dies (see slots.py)."""
        conn = self._connect()
        try:
            for slot in range(MAX_SLOTS):
                worker_id = slot_id(slot)
                key = f"cio_outbox:{self.schema}:worker:{worker_id}"
                row = conn.execute("SELECT pg_try_advisory_lock(hashtextextended(%s, 0))",
                                   (key,)).fetchone()
                if row and row[0]:
                    return WorkerSlot(worker_id, conn.close)
        except self._psycopg.Error as exc:
            conn.close()
            raise self._explain(exc) from None
        conn.close()
        raise NoFreeSlot(f"all {MAX_SLOTS} worker slots of {self.location} on this host are"
                         " in use")

    def close(self) -> None:
        with self._lock:
            if self._listener is not None:
                self._listener[2].set()  # the thread closes its connection within a tick
                self._listener = None
            for _, conn in self._all:
                with suppress(Exception):
                    conn.close()
            self._all = []
        self._local = threading.local()

    def __repr__(self) -> str:
        return f"PostgresStorage({self.location!r})"


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
