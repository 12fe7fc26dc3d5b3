"""What a recurring sync remembers per key, and the SQL for it (SQLite and PostgreSQL).

Table ``sync_state``, one row per (sync name, key): the fingerprint of the traits last
enqueued for that key, a digest per trait (for ``--changed-only``; digests, not values,
so the table holds no trait values), a version that numbers the key's messages, and the
messageId of the last one; a key whose deletion was enqueued keeps its row with an
empty fingerprint (so that its message count, and so its next messageId, go on). It is
created if missing (``CREATE TABLE IF NOT EXISTS``), not
by a numbered migration, so that it stays out of the outbox's schema history.

Every function takes an open cursor (or SQLite connection) inside a transaction that the
backend's ``sync_transaction`` hook opened; the caller writes the messages in the same
transaction, which is what makes a killed sync enqueue each change exactly once.

Keys seen by the current sync go into a temporary table of the connection (for
``--delete-missing``), so memory stays flat; :func:`seen_count` lets the caller check
that the table still holds every key it added before anything is deleted.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from cio_outbox.storage.base import NewRow


@dataclass(frozen=True, slots=True)
class Dialect:
    """How one backend spells things: its parameter marker and table prefix (schema)."""

    name: str
    prefix: str = ""

    @property
    def p(self) -> str:
        return "?" if self.name == "sqlite" else "%s"

    @property
    def state(self) -> str:
        return f"{self.prefix}sync_state"

    @property
    def messages(self) -> str:
        return f"{self.prefix}messages"

    @property
    def seen(self) -> str:
        return "temp.cio_sync_seen" if self.name == "sqlite" else "cio_sync_seen"

    def keys_in(self, column: str) -> str:
        """``column IN (the keys given as one parameter)``."""
        if self.name == "sqlite":
            return f"{column} IN (SELECT value FROM json_each(?))"
        return f"{column} = ANY(%s::text[])"

    def keys_param(self, keys: Sequence[str]) -> Any:
        return json.dumps(list(keys)) if self.name == "sqlite" else list(keys)


SQLITE = Dialect("sqlite")


@dataclass(frozen=True, slots=True)
class SyncTransaction:
    """What a backend's ``sync_transaction`` hands its body: the open cursor, the dialect,
    and ``insert(rows)``, which adds messages (skipping known messageIds) in the same
    transaction and returns how many it added."""

    db: Any
    dialect: Dialect
    insert: Callable[[Sequence[NewRow]], int]


def postgres(schema: str) -> Dialect:
    return Dialect("postgres", f"{schema}.")


@dataclass(frozen=True, slots=True)
class KeyState:
    """What the last sync enqueued for a key."""

    key: str
    fingerprint: bytes
    version: int
    message_id: str
    digests: dict[str, str] | None = None  # trait -> digest, when asked for


def create(db: Any, d: Dialect) -> None:
    """Create the table if it is missing (inside the caller's write transaction)."""
    if d.name == "sqlite":
        db.execute(
            "CREATE TABLE IF NOT EXISTS sync_state ("
            " sync TEXT NOT NULL, key TEXT NOT NULL, fingerprint BLOB NOT NULL,"
            " digests TEXT NOT NULL, version INTEGER NOT NULL, message_id TEXT NOT NULL,"
            " updated_at REAL NOT NULL, PRIMARY KEY (sync, key)) WITHOUT ROWID"
        )
    else:
        db.execute(
            f"CREATE TABLE IF NOT EXISTS {d.state} ("
            " sync TEXT NOT NULL, key TEXT NOT NULL, fingerprint BYTEA NOT NULL,"
            " digests TEXT NOT NULL, version INTEGER NOT NULL, message_id TEXT NOT NULL,"
            " updated_at DOUBLE PRECISION NOT NULL, PRIMARY KEY (sync, key))"
        )


def lookup_raw(db: Any, d: Dialect, sync: str, keys: Sequence[str], *,
               digests: bool = False) -> dict[str, tuple[Any, ...]]:
    """The stored state of these keys (keys never synced are absent), as tuples (key,
    fingerprint, version, message_id[, digests JSON]): the fast path of a sync that finds
    most keys unchanged."""
    if not keys:
        return {}
    extra = ", digests" if digests else ""
    rows = db.execute(
        f"SELECT key, fingerprint, version, message_id{extra} FROM {d.state}"
        f" WHERE sync = {d.p} AND {d.keys_in('key')}",
        (sync, d.keys_param(keys)),
    ).fetchall()
    return {row[0]: row for row in rows}


def save(db: Any, d: Dialect, sync: str,
         states: Iterable[tuple[str, bytes, dict[str, str], int, str]], now: float) -> None:
    """Insert or replace (key, fingerprint, digests, version, message_id) rows."""
    params = [(sync, key, fp, json.dumps(digests, separators=(",", ":")), version, mid, now)
              for key, fp, digests, version, mid in states]
    if not params:
        return
    p = d.p
    db.executemany(
        f"INSERT INTO {d.state} (sync, key, fingerprint, digests, version, message_id,"
        f" updated_at) VALUES ({p}, {p}, {p}, {p}, {p}, {p}, {p})"
        " ON CONFLICT (sync, key) DO UPDATE SET fingerprint = excluded.fingerprint,"
        " digests = excluded.digests, version = excluded.version,"
        " message_id = excluded.message_id, updated_at = excluded.updated_at",
        params,
    )


def forget_keys(db: Any, d: Dialect, sync: str, keys: Sequence[str]) -> None:
    if keys:
        db.execute(f"DELETE FROM {d.state} WHERE sync = {d.p} AND {d.keys_in('key')}",
                   (sync, d.keys_param(keys)))


def _exists(db: Any, d: Dialect, table: str) -> bool:
    if d.name == "sqlite":
        return db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                          (table,)).fetchone() is not None
    return db.execute("SELECT to_regclass(%s)", (f"{d.prefix}{table}",)).fetchone()[0] \
        is not None


def forget_key(db: Any, d: Dialect, key: str) -> int:
    """Remove what every sync remembers of this key (for ``forget``): the key must not stay
    in the outbox, and the next sync must see it as new. Returns the state rows removed."""
    if not _exists(db, d, "sync_state"):
        return 0
    return int(db.execute(f"DELETE FROM {d.state} WHERE key = {d.p}", (key,)).rowcount)


def stored_count(db: Any, d: Dialect, sync: str) -> int:
    """Keys of this sync, not counting those whose deletion was enqueued."""
    return int(db.execute(f"SELECT count(*) FROM {d.state} WHERE sync = {d.p}"
                          " AND length(fingerprint) > 0", (sync,)).fetchone()[0])


def failed_message_ids(db: Any, d: Dialect, run_prefix: str) -> set[str]:
    """messageIds of dead-lettered rows of runs starting with run_prefix (few, usually)."""
    rows = db.execute(
        f"SELECT message_id FROM {d.messages} WHERE status = 'failed'"
        f" AND substr(run, 1, {len(run_prefix)}) = {d.p}",
        (run_prefix,),
    ).fetchall()
    return {row[0] for row in rows}


def seen_reset(db: Any, d: Dialect) -> None:
    if d.name == "sqlite":
        db.execute("CREATE TEMP TABLE IF NOT EXISTS cio_sync_seen (key TEXT PRIMARY KEY)"
                   " WITHOUT ROWID")
    else:
        db.execute("CREATE TEMP TABLE IF NOT EXISTS cio_sync_seen (key TEXT PRIMARY KEY)")
    db.execute(f"DELETE FROM {d.seen}")


def seen_add(db: Any, d: Dialect, keys: Sequence[str]) -> int:
    """Remember keys as seen; returns how many were not seen before."""
    if not keys:
        return 0
    if d.name == "sqlite":
        cursor = db.execute("INSERT OR IGNORE INTO temp.cio_sync_seen (key)"
                            " SELECT value FROM json_each(?)", (json.dumps(list(keys)),))
    else:
        cursor = db.execute("INSERT INTO cio_sync_seen (key) SELECT unnest(%s::text[])"
                            " ON CONFLICT DO NOTHING", (list(keys),))
    return int(cursor.rowcount)


def seen_count(db: Any, d: Dialect) -> int:
    return int(db.execute(f"SELECT count(*) FROM {d.seen}").fetchone()[0])


def _missing_where(d: Dialect) -> str:
    return (f"s.sync = {d.p} AND length(s.fingerprint) > 0 AND NOT EXISTS"
            f" (SELECT 1 FROM {d.seen} seen WHERE seen.key = s.key)")


def missing_count(db: Any, d: Dialect, sync: str) -> int:
    return int(db.execute(f"SELECT count(*) FROM {d.state} s WHERE {_missing_where(d)}",
                          (sync,)).fetchone()[0])


def missing(db: Any, d: Dialect, sync: str, limit: int, *, after: str = "") -> list[KeyState]:
    """Up to ``limit`` stored keys after ``after`` (in key order) not seen by this sync."""
    rows = db.execute(
        f"SELECT key, fingerprint, version, message_id FROM {d.state} s"
        f" WHERE {_missing_where(d)} AND s.key > {d.p} ORDER BY s.key LIMIT {int(limit)}",
        (sync, after),
    ).fetchall()
    return [KeyState(row[0], bytes(row[1]), row[2], row[3]) for row in rows]
