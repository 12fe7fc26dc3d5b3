"""The outbox schema, written once and rendered for each SQL dialect.

Each entry of :data:`MIGRATIONS` moves the schema one version up. Never edit a released
entry: add one. The first one predates the shared definition and is kept verbatim per
dialect (SQLite's lacked two indexes and the status CHECK, which migration 3 restores);
every later one is a template:

- ``{s}``: the table prefix (``""`` in SQLite, ``"schema."`` in PostgreSQL);
- ``{real}``, ``{json}``: the dialect's float and JSON column types;
- ``ISO(column)``: that Unix-seconds column as ISO-8601 UTC text (for the views);
- ``{lanes}``: the number of lanes of a new outbox (:data:`cio_outbox.storage.lanes.LANES`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cio_outbox.storage.base import STATUSES
from cio_outbox.storage.lanes import LANES


@dataclass(frozen=True, slots=True)
class Dialect:
    name: str
    real: str
    json: str
    iso: str  # format string of the ISO-8601 expression, {0} is the column


SQLITE = Dialect("sqlite", "REAL", "TEXT", "strftime('%Y-%m-%dT%H:%M:%fZ', {0}, 'unixepoch')")
POSTGRES = Dialect(
    "postgres", "DOUBLE PRECISION", "JSONB",
    "to_char(to_timestamp({0}) AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')",
)

#: The status CHECK, which SQLite's first schema lacked (see migration 3).
STATUS_CHECK = "CHECK (status IN (" + ", ".join(f"'{s}'" for s in STATUSES) + "))"
#: The same test as comparisons, which SQLite's schema holds since migration 7.
STATUS_CHECK_COMPARED = "CHECK (" + " OR ".join(f"status = '{s}'" for s in STATUSES) + ")"

_V1_SQLITE = """
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
"""

_V1_POSTGRES = """
    CREATE TABLE {s}messages (
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
    CREATE INDEX messages_pending ON {s}messages (id) WHERE status = 'pending';
    CREATE INDEX messages_pending_run ON {s}messages (run, id) WHERE status = 'pending';
    CREATE INDEX messages_deferred ON {s}messages (next_attempt_at)
        WHERE status = 'pending' AND next_attempt_at IS NOT NULL;
    CREATE INDEX messages_in_flight ON {s}messages (lease_expires_at)
        WHERE status = 'in_flight';
    CREATE INDEX messages_failed ON {s}messages (run, id) WHERE status = 'failed';
    CREATE INDEX messages_sent ON {s}messages (sent_at) WHERE status = 'sent';

    CREATE TABLE {s}counts (
        run TEXT NOT NULL,
        status TEXT NOT NULL,
        n BIGINT NOT NULL,
        PRIMARY KEY (run, status)
    );
    CREATE TABLE {s}attempts (
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
    CREATE INDEX attempts_max_row ON {s}attempts (max_row_id);
    CREATE INDEX attempts_at ON {s}attempts (at);
    CREATE TABLE {s}attempt_runs (
        run TEXT NOT NULL,
        attempt_id BIGINT NOT NULL,
        PRIMARY KEY (run, attempt_id)
    );

    CREATE TABLE {s}forgotten (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        at DOUBLE PRECISION NOT NULL,
        rows_deleted INTEGER NOT NULL
    );
"""

MIGRATIONS: list[str | dict[str, str]] = [
    # 1: messages, the audit trail, and per-run counts by status. The counts are kept
    # by the code in the same transaction as each change (one statement per
    # transaction, not a trigger per row), so status stays instant at 10M rows.
    {"sqlite": _V1_SQLITE, "postgres": _V1_POSTGRES},
    # 2: fencing. Each claim stores a fresh token on the rows it leases; every later
    # change to a claimed row names that token (see storage/base.py).
    "ALTER TABLE {s}messages ADD COLUMN claim_token TEXT;",
    # 3: parity. SQLite gets the indexes PostgreSQL always had (purge by sent_at, the
    # audit trail by time); its status CHECK is added by the backend (see sqlite.py),
    # since SQLite cannot add a constraint with ALTER TABLE.
    """
    CREATE INDEX IF NOT EXISTS messages_sent ON {s}messages (sent_at) WHERE status = 'sent';
    CREATE INDEX IF NOT EXISTS attempts_at ON {s}attempts (at);
    """,
    # 4: views for people reading the outbox with other tools (`sqlite-utils rows
    # outbox.db failed_messages`, datasette, psql): times as ISO-8601 text.
    """
    CREATE VIEW {s}failed_messages AS
        SELECT id, message_id, run, call_type, person, attempts, last_error,
               ISO(created_at) AS created_at, ISO(updated_at) AS failed_at, payload
        FROM {s}messages WHERE status = 'failed';
    CREATE VIEW {s}attempts_by_run AS
        SELECT r.run, a.id AS attempt_id, ISO(a.at) AS at, a.worker_id, a.endpoint,
               a.messages, a.bytes, a.status_code, a.latency_ms, a.outcome, a.error
        FROM {s}attempts a JOIN {s}attempt_runs r ON r.attempt_id = a.id;
    """,
    # 5: lanes (issue 17). Each row gets the lane of its person (lanes.lane_of, a stable
    # hash modulo the number of lanes); a claim takes the next rows of lanes with nothing
    # in flight and nothing deferred, so one person's rows leave in order without a
    # global lock. The lanes table holds one row per lane: its size is the outbox's
    # number of lanes, fixed at creation, and PostgreSQL claims lock its rows (FOR UPDATE
    # SKIP LOCKED). Every index is rewritten on each status change and costs every insert,
    # so the deferred and in-flight indexes are replaced by lane-first ones that serve both
    # the lane checks and the expired leases (a scan of the small in-flight index).
    # Claimants are workers whose last claim found no free lane: the next claims share
    # the free lanes with them. The lanes of existing rows are computed by the backend in
    # Python after this script (neither SQL dialect has the hash), for rows not yet sent.
    """
    ALTER TABLE {s}messages ADD COLUMN lane INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE {s}lanes (lane INTEGER PRIMARY KEY);
    WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i + 1 < {lanes})
        INSERT INTO {s}lanes (lane) SELECT i FROM n;
    CREATE INDEX messages_lane_pending ON {s}messages (lane, id) WHERE status = 'pending';
    DROP INDEX {s}messages_deferred;
    DROP INDEX {s}messages_in_flight;
    CREATE INDEX messages_in_flight ON {s}messages (lane, lease_expires_at)
        WHERE status = 'in_flight';
    CREATE INDEX messages_lane_deferred ON {s}messages (lane, next_attempt_at)
        WHERE status = 'pending' AND next_attempt_at IS NOT NULL;
    CREATE TABLE {s}claimants (worker_id TEXT PRIMARY KEY, waiting_since {real} NOT NULL);
    """,
    # 6: one pending index fewer (issues 16 and 17). Every index on messages costs each
    # insert and each status change; the pending rows in id order across runs are read
    # per run from messages_pending_run and merged (a claim alone, oldest_pending), so the
    # pending index by id alone served nothing the others cannot.
    "DROP INDEX {s}messages_pending;",
    # 7: SQLite evaluates a CHECK's ``IN (...)`` list for each row by building a lookup
    # table; the same test as a chain of comparisons made a bulk insert about a sixth
    # cheaper (issue 16). The backend edits the table's SQL (see sqlite_schema.py);
    # PostgreSQL's CHECK costs nothing noticeable and stays.
    {"sqlite": "", "postgres": ""},
]
#: The migration (1-based version) that adds lanes; the backend then computes the lanes
#: of the rows already stored (see :func:`cio_outbox.storage.sql.SQLStorage._fill_lanes`).
LANES_VERSION = 5
#: The migration that gives SQLite the status CHECK as comparisons.
COMPARED_CHECK_VERSION = 7
SCHEMA_VERSION = len(MIGRATIONS)

_ISO = re.compile(r"ISO\(([a-z_.]+)\)")


def render(number: int, dialect: Dialect, prefix: str) -> str:
    """The SQL script of migration ``number`` (0-based) for a dialect and table prefix."""
    entry = MIGRATIONS[number]
    script = entry[dialect.name] if isinstance(entry, dict) else entry
    script = _ISO.sub(lambda m: dialect.iso.format(m.group(1)), script)
    return script.replace("{s}", prefix).replace("{real}", dialect.real).replace(
        "{json}", dialect.json).replace("{lanes}", str(LANES))
