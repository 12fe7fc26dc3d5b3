"""What a recurring sync remembers per key, and the SQL for it (SQLite and PostgreSQL).

Two tables, created if missing (``CREATE TABLE IF NOT EXISTS``), not by a numbered
migration, so that they stay out of the outbox's schema history:

- ``sync_keys``, one row per (sync name, key): the fingerprint of the traits last enqueued
  for that key, a digest per trait (for ``--changed-only``; digests, not values, so the
  table holds no trait values), a version that numbers the key's messages, the messageId
  of the last one, and ``run``, the anchor of the stored run the key is in. A key whose
  deletion was enqueued keeps its row with an empty fingerprint (so that its message
  count, and so its next messageId, go on). Read only for the rows of runs that are not
  recognized, by key: in the order of a sorted export, pages are read and written in
  order.
- ``sync_runs``, what makes an unchanged sync cheap: runs of about 16 consecutive source
  rows, cut by content (see ``cio_outbox.sync``), each under the digest of its first row
  (``anchor``), with the 128-bit digest of all its rows (two signed 64-bit halves), its
  keys' ids and its rows' digests. About 300 bytes a run, so 20 bytes a row: a million
  keys take 20 megabytes. A run found with the same content means: these very rows were synced and
  nothing about their keys changed since. A run is deleted as soon as one of its keys
  changes, is deleted or forgotten, and each key is in one run at most (``run``); the
  table is a cache of ``sync_keys``: a run missing costs a slower comparison, never a
  wrong answer.

An outbox made before ``sync_runs`` existed has one table, ``sync_state``: :func:`create`
copies it into ``sync_keys`` and drops it (the first sync after that compares every row
by key, and stores the runs; it enqueues only what changed, as before).

Every function takes an open cursor (or SQLite connection) inside a transaction that the
backend's ``sync_transaction`` hook opened; the caller writes the messages in the same
transaction, which is what makes a killed sync enqueue each change exactly once.

Keys seen by the current sync (their ``sync_keys`` ids) go into a temporary table of the
connection (for ``--delete-missing``), so memory stays flat; :func:`seen_count` lets the
caller check that the table still holds every id it added before anything is deleted.
"""

from __future__ import annotations

import json
from array import array
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

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
    def keys(self) -> str:
        return f"{self.prefix}sync_keys"

    @property
    def runs(self) -> str:
        return f"{self.prefix}sync_runs"

    @property
    def messages(self) -> str:
        return f"{self.prefix}messages"

    @property
    def seen(self) -> str:
        return "temp.cio_sync_seen" if self.name == "sqlite" else "cio_sync_seen"

    def in_list(self, column: str, kind: str = "text") -> str:
        """``column IN (the values given as one parameter)``: one statement per chunk."""
        if self.name == "sqlite":
            return f"{column} IN (SELECT value FROM json_each(?))"
        return f"{column} = ANY(%s::{kind}[])"

    def list_param(self, values: Sequence[Any]) -> Any:
        if self.name != "sqlite":
            return list(values)
        try:
            return orjson.dumps(list(values)).decode()
        except TypeError:  # a lone surrogate in a key from Python: json escapes it
            return json.dumps(list(values))


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

    id: int
    key: str
    fingerprint: bytes
    version: int
    message_id: str
    run: int | None = None


_OLD_TABLE = "sync_state"


def create(db: Any, d: Dialect) -> None:
    """Create the tables if they are missing, and take over an old ``sync_state`` table
    (inside the caller's write transaction)."""
    if d.name == "sqlite":
        db.execute(
            "CREATE TABLE IF NOT EXISTS sync_keys ("
            " id INTEGER PRIMARY KEY, sync TEXT NOT NULL, key TEXT NOT NULL,"
            " fingerprint BLOB NOT NULL, digests TEXT NOT NULL, version INTEGER NOT NULL,"
            " message_id TEXT NOT NULL, run INTEGER, updated_at REAL NOT NULL,"
            " UNIQUE (sync, key))"
        )
        # A rowid table keyed by the anchor itself: the smallest B-tree SQLite has.
        db.execute(
            "CREATE TABLE IF NOT EXISTS sync_runs ("
            " anchor INTEGER PRIMARY KEY, head INTEGER NOT NULL, tail INTEGER NOT NULL,"
            " ids BLOB NOT NULL)"
        )
    else:
        db.execute(
            f"CREATE TABLE IF NOT EXISTS {d.keys} ("
            " id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, sync TEXT NOT NULL,"
            " key TEXT NOT NULL, fingerprint BYTEA NOT NULL, digests TEXT NOT NULL,"
            " version INTEGER NOT NULL, message_id TEXT NOT NULL, run BIGINT,"
            " updated_at DOUBLE PRECISION NOT NULL, UNIQUE (sync, key))"
        )
        db.execute(
            f"CREATE TABLE IF NOT EXISTS {d.runs} ("
            " anchor BIGINT PRIMARY KEY, head BIGINT NOT NULL, tail BIGINT NOT NULL,"
            " ids BYTEA NOT NULL)"
        )
    # The keys whose deletion was enqueued, few: with the (sync, key) index they count the
    # keys of a sync without reading the table (see stored_count).
    db.execute(f"CREATE INDEX IF NOT EXISTS sync_keys_deleted ON {d.keys} (sync)"
               " WHERE length(fingerprint) = 0")  # (in the table's schema on PostgreSQL)
    if _exists(db, d, _OLD_TABLE):
        db.execute(
            f"INSERT INTO {d.keys} (sync, key, fingerprint, digests, version, message_id,"
            " updated_at) SELECT sync, key, fingerprint, digests, version, message_id,"
            f" updated_at FROM {d.prefix}{_OLD_TABLE}"
        )
        db.execute(f"DROP TABLE {d.prefix}{_OLD_TABLE}")


def _exists(db: Any, d: Dialect, table: str) -> bool:
    if d.name == "sqlite":
        return db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                          (table,)).fetchone() is not None
    return db.execute("SELECT to_regclass(%s)", (f"{d.prefix}{table}",)).fetchone()[0] \
        is not None


# -- runs ----------------------------------------------------------------------------------


def recognized_runs(db: Any, d: Dialect, anchors: Sequence[int]
                    ) -> dict[int, tuple[tuple[int, int], array[int], array[int]]]:
    """anchor -> ((head, tail) of the run's content, its keys' ids, its rows' digests
    (first halves)) for the stored runs starting with these row digests."""
    if not anchors:
        return {}
    rows = db.execute(
        f"SELECT anchor, head, tail, ids FROM {d.runs} WHERE {d.in_list('anchor', 'bigint')}",
        (d.list_param(sorted(anchors)),),  # in order: each page is read once
    ).fetchall()
    found: dict[int, tuple[tuple[int, int], array[int], array[int]]] = {}
    for anchor, head, tail, blob in rows:
        members = array("q")
        members.frombytes(bytes(blob))  # the key ids, then the row digests
        half = len(members) // 2
        if len(members) % 2:
            continue  # not a run this version wrote: compare its rows by key
        found[anchor] = ((head, tail), members[:half], members[half:])
    return found


def remember_runs(db: Any, d: Dialect, drop: Sequence[int],
                  runs: Sequence[tuple[int, tuple[int, int], Sequence[int], Sequence[int]]],
                  repoint: Sequence[tuple[int, int]]) -> None:
    """Delete the runs anchored at ``drop``, add (anchor, (head, tail), key ids, row
    digests) runs, and point (anchor, key id) keys at their run: each key is in one stored
    run at most."""
    p = d.p
    if drop:
        db.execute(f"DELETE FROM {d.runs} WHERE {d.in_list('anchor', 'bigint')}",
                   (d.list_param(drop),))
    if runs:
        params = [(anchor, head, tail, array("q", [*members, *heads]).tobytes())
                  for anchor, (head, tail), members, heads in runs]
        if d.name == "sqlite":
            db.executemany("INSERT OR REPLACE INTO sync_runs (anchor, head, tail, ids)"
                           " VALUES (?, ?, ?, ?)", params)
        else:
            db.executemany(f"INSERT INTO {d.runs} (anchor, head, tail, ids)"
                           " VALUES (%s, %s, %s, %s) ON CONFLICT (anchor) DO UPDATE SET"
                           " head = excluded.head, tail = excluded.tail, ids = excluded.ids",
                           params)
    if repoint:
        db.executemany(f"UPDATE {d.keys} SET run = {p} WHERE id = {p}", repoint)


def forget_runs(db: Any, d: Dialect, key_ids: Sequence[int]) -> None:
    """Drop the runs of these keys (whose deletion is enqueued, or who are forgotten: a row
    of theirs seen again is new, not unchanged)."""
    if key_ids:
        param = d.list_param(key_ids)
        db.execute(f"DELETE FROM {d.runs} WHERE anchor IN (SELECT run FROM {d.keys}"
                   f" WHERE {d.in_list('id', 'bigint')} AND run IS NOT NULL)", (param,))
        db.execute(f"UPDATE {d.keys} SET run = NULL WHERE {d.in_list('id', 'bigint')}",
                   (param,))


# -- the keys ----------------------------------------------------------------------------


def lookup(db: Any, d: Dialect, sync: str, keys: Sequence[str], *,
           digests: bool = False) -> dict[str, tuple[Any, ...]]:
    """The stored state of these keys (keys never synced are absent), as tuples (key,
    fingerprint, version, message_id, id, run[, digests JSON])."""
    if not keys:
        return {}
    extra = ", digests" if digests else ""
    rows = db.execute(
        f"SELECT key, fingerprint, version, message_id, id, run{extra}"
        f" FROM {d.keys} WHERE sync = {d.p} AND {d.in_list('key')}",
        (sync, d.list_param(keys)),
    ).fetchall()
    return {row[0]: row for row in rows}


def key_ids(db: Any, d: Dialect, sync: str, keys: Sequence[str]) -> dict[str, int]:
    if not keys:
        return {}
    rows = db.execute(f"SELECT key, id FROM {d.keys} WHERE sync = {d.p} AND {d.in_list('key')}",
                      (sync, d.list_param(keys))).fetchall()
    return {row[0]: row[1] for row in rows}


def save(db: Any, d: Dialect, sync: str,
         states: Iterable[tuple[str, bytes, dict[str, str], int, str]], now: float) -> None:
    """Insert or replace (key, fingerprint, digests, version, message_id) rows."""
    params = [(sync, key, fp, json.dumps(digests, separators=(",", ":")), version, mid, now)
              for key, fp, digests, version, mid in states]
    if not params:
        return
    p = d.p
    db.executemany(
        f"INSERT INTO {d.keys} (sync, key, fingerprint, digests, version, message_id,"
        f" updated_at) VALUES ({p}, {p}, {p}, {p}, {p}, {p}, {p})"
        " ON CONFLICT (sync, key) DO UPDATE SET fingerprint = excluded.fingerprint,"
        " digests = excluded.digests, version = excluded.version,"
        " message_id = excluded.message_id, updated_at = excluded.updated_at",
        params,
    )


def forget_key(db: Any, d: Dialect, key: str) -> int:
    """Remove what every sync remembers of this key (for ``forget``): the key must not stay
    in the outbox, and the next sync must see it as new. Returns the key rows removed."""
    if not _exists(db, d, "sync_keys"):
        if _exists(db, d, _OLD_TABLE):  # an outbox that no sync has opened since
            return int(db.execute(f"DELETE FROM {d.prefix}{_OLD_TABLE} WHERE key = {d.p}",
                                  (key,)).rowcount)
        return 0
    ids = [row[0] for row in db.execute(f"SELECT id FROM {d.keys} WHERE key = {d.p}",
                                        (key,)).fetchall()]
    if not ids:
        return 0
    forget_runs(db, d, ids)
    db.execute(f"DELETE FROM {d.keys} WHERE {d.in_list('id', 'bigint')}",
               (d.list_param(ids),))
    return len(ids)


def stored_count(db: Any, d: Dialect, sync: str) -> int:
    """Keys of this sync, not counting those whose deletion was enqueued."""
    if d.name == "sqlite":
        # Counting reads the whole (sync, key) index once: through a small page cache, so
        # that its pages do not stay in memory (it grows with the keys) for the whole sync.
        size = db.execute("PRAGMA cache_size").fetchone()[0]
        db.execute("PRAGMA cache_size = -2048")
        try:
            every = db.execute("SELECT count(*) FROM sync_keys WHERE sync = ?",
                               (sync,)).fetchone()[0]
        finally:
            db.execute(f"PRAGMA cache_size = {int(size)}")
    else:
        every = db.execute(f"SELECT count(*) FROM {d.keys} WHERE sync = %s",
                           (sync,)).fetchone()[0]
    deleted = db.execute(f"SELECT count(*) FROM {d.keys} WHERE sync = {d.p}"
                         " AND length(fingerprint) = 0", (sync,)).fetchone()[0]
    return int(every) - int(deleted)


def failed_messages(db: Any, d: Dialect, run_prefix: str) -> list[tuple[str, Any]]:
    """(messageId, payload) of dead-lettered rows of runs starting with run_prefix (few,
    usually)."""
    rows = db.execute(
        f"SELECT message_id, payload FROM {d.messages} WHERE status = 'failed'"
        f" AND substr(run, 1, {len(run_prefix)}) = {d.p}",
        (run_prefix,),
    ).fetchall()
    return [(row[0], row[1]) for row in rows]


# -- keys seen by this sync (--delete-missing) -------------------------------------------


def seen_reset(db: Any, d: Dialect) -> None:
    kind = "INTEGER" if d.name == "sqlite" else "BIGINT"
    db.execute(f"CREATE TEMP TABLE IF NOT EXISTS cio_sync_seen (id {kind} PRIMARY KEY)")
    db.execute(f"DELETE FROM {d.seen}")


def seen_add(db: Any, d: Dialect, ids: Sequence[int]) -> int:
    """Remember key ids as seen; returns how many were not seen before."""
    if not ids:
        return 0
    if d.name == "sqlite":
        cursor = db.execute("INSERT OR IGNORE INTO temp.cio_sync_seen (id)"
                            " SELECT value FROM json_each(?)", (json.dumps(list(ids)),))
    else:
        cursor = db.execute("INSERT INTO cio_sync_seen (id) SELECT unnest(%s::bigint[])"
                            " ON CONFLICT DO NOTHING", (list(ids),))
    return int(cursor.rowcount)


def seen_count(db: Any, d: Dialect) -> int:
    return int(db.execute(f"SELECT count(*) FROM {d.seen}").fetchone()[0])


def _missing_where(d: Dialect) -> str:
    return (f"s.sync = {d.p} AND length(s.fingerprint) > 0 AND NOT EXISTS"
            f" (SELECT 1 FROM {d.seen} seen WHERE seen.id = s.id)")


def missing_count(db: Any, d: Dialect, sync: str) -> int:
    return int(db.execute(f"SELECT count(*) FROM {d.keys} s WHERE {_missing_where(d)}",
                          (sync,)).fetchone()[0])


def missing(db: Any, d: Dialect, sync: str, limit: int, *, after: str = "") -> list[KeyState]:
    """Up to ``limit`` stored keys after ``after`` (in key order) not seen by this sync."""
    rows = db.execute(
        f"SELECT id, key, fingerprint, version, message_id, run FROM {d.keys} s"
        f" WHERE {_missing_where(d)} AND s.key > {d.p} ORDER BY s.key LIMIT {int(limit)}",
        (sync, after),
    ).fetchall()
    return [KeyState(row[0], row[1], bytes(row[2]), row[3], row[4], row[5]) for row in rows]
