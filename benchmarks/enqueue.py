"""Section 1: enqueue rates next to raw sqlite3 ceilings measured in the same run."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

from benchmarks.common import Repeated, events, interleaved, ratio, remove_db
from cio_outbox import Outbox

#: The columns of the outbox's messages table, with its primary key and unique messageId,
#: but none of its partial indexes and no counts table: what a bare INSERT costs.
RAW_TABLE = """
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
)
"""
RAW_INSERT = (
    "INSERT INTO messages (message_id, run, call_type, person, payload, size, created_at,"
    " updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)


def raw_params(evs: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """Pre-built rows for the raw ceilings: serialization is not part of the ceiling."""
    now = time.time()
    out = []
    for e in evs:
        payload = json.dumps(e, separators=(",", ":"))
        out.append((e["messageId"], "", "track", e["userId"], payload,
                    len(payload.encode()), now, now))
    return out


def _raw_conn(path: Path, synchronous: str, schema: str | None) -> sqlite3.Connection:
    if schema == "raw":
        remove_db(path)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(f"PRAGMA synchronous = {synchronous}")
    if schema == "raw":
        conn.execute(RAW_TABLE)
    return conn


def raw_single(path: Path, params: list[tuple[Any, ...]], synchronous: str = "NORMAL") -> float:
    """Rows/s: one INSERT per row, each its own (autocommit) transaction."""
    conn = _raw_conn(path, synchronous, "raw")
    started = time.perf_counter()
    for p in params:
        conn.execute(RAW_INSERT, p)
    elapsed = time.perf_counter() - started
    conn.close()
    return len(params) / elapsed


def raw_bulk(path: Path, params: list[tuple[Any, ...]], *, outbox_schema: bool = False) -> float:
    """Rows/s: executemany in one transaction, into the bare table or the outbox's schema."""
    if outbox_schema:
        remove_db(path)
        Outbox(path).close()  # creates the real schema with all its indexes
        conn = _raw_conn(path, "NORMAL", None)
    else:
        conn = _raw_conn(path, "NORMAL", "raw")
    started = time.perf_counter()
    conn.execute("BEGIN")
    conn.executemany(RAW_INSERT, params)
    conn.execute("COMMIT")
    elapsed = time.perf_counter() - started
    conn.close()
    return len(params) / elapsed


def outbox_single(path: Path, evs: list[dict[str, Any]], synchronous: str = "NORMAL") -> float:
    """Messages/s: ``Outbox.enqueue`` once per message (each durable on return)."""
    remove_db(path)
    with Outbox(path, synchronous=synchronous) as outbox:
        enqueue = outbox.enqueue
        started = time.perf_counter()
        for e in evs:
            enqueue(e)
        elapsed = time.perf_counter() - started
        assert outbox.storage.counts()["pending"] == len(evs)
    return len(evs) / elapsed


def outbox_track(path: Path, evs: list[dict[str, Any]]) -> float:
    """Messages/s: ``Outbox.track(...)`` once per message."""
    remove_db(path)
    with Outbox(path) as outbox:
        track = outbox.track
        started = time.perf_counter()
        for e in evs:
            track(e["userId"], e["event"], properties=e["properties"],
                  anonymous_id=e["anonymousId"], timestamp=e["timestamp"],
                  message_id=e["messageId"])
        elapsed = time.perf_counter() - started
    return len(evs) / elapsed


def outbox_bulk(path: Path, evs: list[dict[str, Any]]) -> float:
    """Messages/s: ``Outbox.enqueue_many`` over the whole list (default chunk of 10,000)."""
    remove_db(path)
    with Outbox(path) as outbox:
        started = time.perf_counter()
        result = outbox.enqueue_many(evs)
        elapsed = time.perf_counter() - started
        assert result.added == len(evs), result.as_dict()
    return len(evs) / elapsed


def run(workdir: Path, *, n_single: int, n_bulk: int, n_full: int, reps: int,
        log: Any = print) -> dict[str, Any]:
    db = workdir / "enqueue.db"
    single_events = events(0, n_single, "enqueue-single")
    bulk_events = events(0, n_bulk, "enqueue-bulk")
    full_events = single_events[:n_full]
    single_params = raw_params(single_events)
    bulk_params = raw_params(bulk_events)
    full_params = single_params[:n_full]

    log(f"  enqueue: single-call, {n_single:,} messages x {reps}, interleaved with raw")
    one = interleaved({
        "enqueue": lambda: outbox_single(db, single_events),
        "raw": lambda: raw_single(db, single_params),
        "track": lambda: outbox_track(db, single_events),
    }, reps)
    single, raw_one, track = one["enqueue"], one["raw"], one["track"]
    log(f"  enqueue: bulk, {n_bulk:,} messages x {reps}, interleaved with raw")
    many = interleaved({
        "enqueue_many": lambda: outbox_bulk(db, bulk_events),
        "raw": lambda: raw_bulk(db, bulk_params),
        "raw_schema": lambda: raw_bulk(db, bulk_params, outbox_schema=True),
    }, reps)
    bulk, raw_many, raw_many_schema = many["enqueue_many"], many["raw"], many["raw_schema"]
    log(f"  enqueue: synchronous NORMAL vs FULL, {n_full:,} messages x {reps}")
    # Interleave NORMAL and FULL so that both see the same disk and load.
    normal, full, raw_full = Repeated(), Repeated(), Repeated()
    outbox_single(db, full_events, "FULL")  # warm-up
    for _ in range(reps):
        normal.values.append(outbox_single(db, full_events, "NORMAL"))
        full.values.append(outbox_single(db, full_events, "FULL"))
        raw_full.values.append(raw_single(db, full_params, "FULL"))
    remove_db(db)
    payload_bytes = sum(p[5] for p in bulk_params) / len(bulk_params)
    return {
        "message_bytes_avg": payload_bytes,
        "single": {
            "n": n_single, "outbox_enqueue_per_s": single.as_dict(),
            "outbox_track_per_s": track.as_dict(),
            "raw_single_commit_per_s": raw_one.as_dict(),
            "ratio": ratio(single.median, raw_one.median),
        },
        "bulk": {
            "n": n_bulk, "outbox_enqueue_many_per_s": bulk.as_dict(),
            "raw_executemany_per_s": raw_many.as_dict(),
            "raw_executemany_outbox_schema_per_s": raw_many_schema.as_dict(),
            "ratio": ratio(bulk.median, raw_many.median),
        },
        "synchronous": {
            "n": n_full, "normal_per_s": normal.as_dict(), "full_per_s": full.as_dict(),
            "raw_full_per_s": raw_full.as_dict(),
            "full_over_normal": ratio(full.median, normal.median),
            "full_extra_ms_per_call": (1 / full.median - 1 / normal.median) * 1e3,
        },
    }
