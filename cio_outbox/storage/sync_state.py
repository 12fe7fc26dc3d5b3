"""What a recurring sync remembers per key, and the SQL for it (SQLite and PostgreSQL).

Two tables, created if missing (``CREATE TABLE IF NOT EXISTS``), not by a numbered
migration, so that they stay out of the outbox's schema history:

- ``sync_keys``, one row per (sync name, key): the fingerprint of the traits last enqueued
  for that key, a digest per trait (for ``--changed-only``; digests, not values, so the
  table holds no trait values), a version that numbers the key's messages, the messageId
  of the last one, and ``row_digest``, the digest of the source row that last matched this
  state. A key whose deletion was enqueued keeps its row with an empty fingerprint (so
  that its message count, and so its next messageId, go on). Read only for the rows that
  are not recognized in ``sync_rows``.
- ``sync_rows``, the hot table of an unchanged sync: 128-bit digests of source rows (of a
  CSV or JSONL record's bytes, or of a key and its fingerprint; in two signed 64-bit
  halves, ``digest`` the primary key and ``tail``) -> the ``sync_keys`` id of the key whose
  current state that row is. About 30 bytes a row, so a million keys stay in SQLite's page
  cache. A digest found here means: this very row was synced last time and nothing about
  the key changed since; a row not found is looked up in ``sync_keys`` by key. The table is
  a cache of ``sync_keys``: a row missing from it costs a slower lookup, never a wrong
  answer, so a digest that collides in its first half simply replaces the other row.

An outbox made before ``sync_rows`` existed has one table, ``sync_state``: :func:`create`
copies it into ``sync_keys`` and drops it (the first sync after that recognizes nothing in
``sync_rows`` and fills it; it enqueues only what changed, as before).

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
    def rows(self) -> str:
        return f"{self.prefix}sync_rows"

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
    row_digest: int | None = None


_OLD_TABLE = "sync_state"


def create(db: Any, d: Dialect) -> None:
    """Create the tables if they are missing, and take over an old ``sync_state`` table
    (inside the caller's write transaction)."""
    if d.name == "sqlite":
        db.execute(
            "CREATE TABLE IF NOT EXISTS sync_keys ("
            " id INTEGER PRIMARY KEY, sync TEXT NOT NULL, key TEXT NOT NULL,"
            " fingerprint BLOB NOT NULL, digests TEXT NOT NULL, version INTEGER NOT NULL,"
            " message_id TEXT NOT NULL, row_digest INTEGER, updated_at REAL NOT NULL,"
            " UNIQUE (sync, key))"
        )
        # A rowid table keyed by the digest itself: the smallest B-tree SQLite has.
        db.execute(
            "CREATE TABLE IF NOT EXISTS sync_rows ("
            " digest INTEGER PRIMARY KEY, tail INTEGER NOT NULL, key_id INTEGER NOT NULL,"
            " run INTEGER)"
        )
        db.execute(
            "CREATE TABLE IF NOT EXISTS sync_runs ("
            " digest INTEGER PRIMARY KEY, tail INTEGER NOT NULL, ids BLOB NOT NULL)"
        )
    else:
        db.execute(
            f"CREATE TABLE IF NOT EXISTS {d.keys} ("
            " id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, sync TEXT NOT NULL,"
            " key TEXT NOT NULL, fingerprint BYTEA NOT NULL, digests TEXT NOT NULL,"
            " version INTEGER NOT NULL, message_id TEXT NOT NULL, row_digest BIGINT,"
            " updated_at DOUBLE PRECISION NOT NULL, UNIQUE (sync, key))"
        )
        db.execute(
            f"CREATE TABLE IF NOT EXISTS {d.rows} ("
            " digest BIGINT PRIMARY KEY, tail BIGINT NOT NULL, key_id BIGINT NOT NULL,"
            " run BIGINT)"
        )
        db.execute(
            f"CREATE TABLE IF NOT EXISTS {d.runs} ("
            " digest BIGINT PRIMARY KEY, tail BIGINT NOT NULL, ids BYTEA NOT NULL)"
        )
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


# -- the hot table -----------------------------------------------------------------------


def recognized(db: Any, d: Dialect, heads: Sequence[int]) -> dict[tuple[int, int], int]:
    """(digest, tail) -> key id for the rows of ``sync_rows`` with these digests."""
    if not heads:
        return {}
    rows = db.execute(
        f"SELECT digest, tail, key_id FROM {d.rows} WHERE {d.in_list('digest', 'bigint')}",
        (d.list_param(sorted(heads)),),  # in order: each page is read once
    ).fetchall()
    return {(head, tail): key_id for head, tail, key_id in rows}


def recognized_runs(db: Any, d: Dialect, heads: Sequence[int]
                    ) -> dict[tuple[int, int], array[int]]:
    """(digest, tail) -> member key ids for the runs of ``sync_runs`` with these digests."""
    if not heads:
        return {}
    rows = db.execute(
        f"SELECT digest, tail, ids FROM {d.runs} WHERE {d.in_list('digest', 'bigint')}",
        (d.list_param(sorted(heads)),),
    ).fetchall()
    found: dict[tuple[int, int], array[int]] = {}
    for head, tail, blob in rows:
        members = array("q")
        members.frombytes(bytes(blob))
        found[(head, tail)] = members
    return found


def _drop_runs_of(db: Any, d: Dialect, heads: Sequence[int]) -> None:
    """Delete the runs that these ``sync_rows`` rows belong to: a run stays only while
    every row of it is its key's current state."""
    if heads:
        db.execute(f"DELETE FROM {d.runs} WHERE digest IN (SELECT run FROM {d.rows}"
                   f" WHERE {d.in_list('digest', 'bigint')} AND run IS NOT NULL)",
                   (d.list_param(heads),))


def remember_runs(db: Any, d: Dialect,
                  runs: Sequence[tuple[tuple[int, int], Sequence[int], Sequence[int]]]) -> None:
    """Add runs ((digest, tail), member key ids, member row digests), each row in one run
    at most (its former run is dropped)."""
    if not runs:
        return
    _drop_runs_of(db, d, [head for _, _, heads in runs for head in heads])
    p = d.p
    params = [(digest, tail, array("q", members).tobytes())
              for (digest, tail), members, _ in runs]
    if d.name == "sqlite":
        db.executemany("INSERT OR REPLACE INTO sync_runs (digest, tail, ids) VALUES (?, ?, ?)",
                       params)
    else:
        db.executemany(f"INSERT INTO {d.runs} (digest, tail, ids) VALUES (%s, %s, %s)"
                       " ON CONFLICT (digest) DO UPDATE SET tail = excluded.tail,"
                       " ids = excluded.ids", params)
    db.executemany(f"UPDATE {d.rows} SET run = {p} WHERE digest = {p}",
                   [(digest, head) for (digest, _), _, heads in runs for head in heads])


def remember_rows(db: Any, d: Dialect, drop: Iterable[tuple[int, int]],
                  add: Iterable[tuple[int, int, int]]) -> None:
    """Drop (digest, key id) rows and add (digest, tail, key id) rows of ``sync_rows``,
    and point each added key's ``row_digest`` at its new row. The runs of the rows
    dropped or replaced go too."""
    drop = list(drop)
    add = list(add)
    p = d.p
    _drop_runs_of(db, d, [head for head, _ in drop] + [head for head, _, _ in add])
    if drop:
        db.executemany(f"DELETE FROM {d.rows} WHERE digest = {p} AND key_id = {p}", drop)
    if add:
        if d.name == "sqlite":
            db.executemany("INSERT OR REPLACE INTO sync_rows (digest, tail, key_id, run)"
                           " VALUES (?, ?, ?, NULL)", add)
        else:
            db.executemany(f"INSERT INTO {d.rows} (digest, tail, key_id) VALUES (%s, %s, %s)"
                           " ON CONFLICT (digest) DO UPDATE SET tail = excluded.tail,"
                           " key_id = excluded.key_id, run = NULL", add)
        db.executemany(f"UPDATE {d.keys} SET row_digest = {p} WHERE id = {p}",
                       [(digest, key_id) for digest, _, key_id in add])


def forget_rows(db: Any, d: Dialect, key_ids: Sequence[int]) -> None:
    """Drop the ``sync_rows`` of these keys (whose deletion is enqueued: a row of theirs
    seen again is new, not unchanged)."""
    if key_ids:
        param = d.list_param(key_ids)
        own_rows = (f"SELECT row_digest FROM {d.keys} WHERE {d.in_list('id', 'bigint')}"
                    " AND row_digest IS NOT NULL")
        db.execute(f"DELETE FROM {d.runs} WHERE digest IN (SELECT run FROM {d.rows}"
                   f" WHERE digest IN ({own_rows}) AND run IS NOT NULL)", (param,))
        db.execute(f"DELETE FROM {d.rows} WHERE digest IN (SELECT row_digest FROM {d.keys}"
                   f" WHERE {d.in_list('id', 'bigint')} AND row_digest IS NOT NULL)", (param,))
        db.execute(f"UPDATE {d.keys} SET row_digest = NULL WHERE {d.in_list('id', 'bigint')}",
                   (param,))


# -- the keys ----------------------------------------------------------------------------


def lookup(db: Any, d: Dialect, sync: str, keys: Sequence[str], *,
           digests: bool = False) -> dict[str, tuple[Any, ...]]:
    """The stored state of these keys (keys never synced are absent), as tuples (key,
    fingerprint, version, message_id, id, row_digest[, digests JSON])."""
    if not keys:
        return {}
    extra = ", digests" if digests else ""
    rows = db.execute(
        f"SELECT key, fingerprint, version, message_id, id, row_digest{extra}"
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
    db.execute(f"DELETE FROM {d.runs} WHERE digest IN (SELECT run FROM {d.rows}"
               f" WHERE {d.in_list('key_id', 'bigint')} AND run IS NOT NULL)",
               (d.list_param(ids),))
    db.execute(f"DELETE FROM {d.rows} WHERE {d.in_list('key_id', 'bigint')}",
               (d.list_param(ids),))
    db.execute(f"DELETE FROM {d.keys} WHERE {d.in_list('id', 'bigint')}",
               (d.list_param(ids),))
    return len(ids)


def stored_count(db: Any, d: Dialect, sync: str) -> int:
    """Keys of this sync, not counting those whose deletion was enqueued."""
    return int(db.execute(f"SELECT count(*) FROM {d.keys} WHERE sync = {d.p}"
                          " AND length(fingerprint) > 0", (sync,)).fetchone()[0])


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
        f"SELECT id, key, fingerprint, version, message_id, row_digest FROM {d.keys} s"
        f" WHERE {_missing_where(d)} AND s.key > {d.p} ORDER BY s.key LIMIT {int(limit)}",
        (sync, after),
    ).fetchall()
    return [KeyState(row[0], row[1], bytes(row[2]), row[3], row[4], row[5]) for row in rows]
