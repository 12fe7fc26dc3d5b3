"""Section 3: per-message cost and worker memory as the outbox grows, and a big outbox's
claim and status times."""

from __future__ import annotations

import sqlite3
import statistics
import time
from pathlib import Path
from typing import Any

from benchmarks.common import checkpoint, remove_db, run_child
from benchmarks.drain import fill
from cio_outbox import Outbox
from cio_outbox.batch import MAX_BATCH_BYTES
from cio_outbox.sandbox import SandboxProcess

#: Rows left pending in the big outbox (at its end, as after a long-running import).
BIG_PENDING = 10_000
#: Messages per recorded attempt in the big outbox's audit trail (about one 500 KB batch).
BIG_PER_ATTEMPT = 2_000


def sizes_run(workdir: Path, *, sizes: list[int], concurrency: int, reps_small: int,
              log: Any = print) -> dict[str, Any]:
    """Bulk enqueue and drain at each size; per-message microseconds and worker RSS."""
    out: dict[str, Any] = {"concurrency": concurrency, "sizes": {}}
    with SandboxProcess() as sandbox:
        for n in sizes:
            reps = reps_small if n <= 100_000 else 1
            log(f"  scale: {n:,} messages x {reps}")
            enqueue_us, drain_us, rss_peak, rss_growth, ru_peak = [], [], [], [], []
            for rep in range(reps):
                db = workdir / f"scale-{n}.db"
                remove_db(db)
                spent = fill(db, n, tag=f"scale-{rep}")
                enqueue_us.append(spent / n * 1e6)
                checkpoint(db)
                sandbox.reset()
                result = run_child({
                    "mode": "outbox_drain", "db": str(db), "url": sandbox.url,
                    "key": sandbox.key, "worker": {"concurrency": concurrency},
                    "sandbox_pid": sandbox.pid,
                })
                stored = sandbox.stats()["messages"]
                if stored != n or result["sent"] != n:
                    raise RuntimeError(f"scale {n}: sent {result['sent']}, stored {stored}")
                drain_us.append(result["elapsed"] / n * 1e6)
                rss_peak.append(result["rss_peak_sampled"])
                rss_growth.append(result["rss_peak_sampled"] - result["rss_before"])
                ru_peak.append(result["rss_peak"])
                file_mb = db.stat().st_size / 1e6
                remove_db(db)
            sandbox.reset()
            out["sizes"][str(n)] = {
                "n": n, "reps": reps,
                "enqueue_us_per_message": statistics.median(enqueue_us),
                "drain_us_per_message": statistics.median(drain_us),
                "worker_rss_peak_mb": statistics.median(rss_peak) / 1e6,
                "worker_rss_growth_mb": statistics.median(rss_growth) / 1e6,
                "worker_ru_maxrss_mb": statistics.median(ru_peak) / 1e6,
                "file_mb": file_mb,
                "runs": {"enqueue_us": enqueue_us, "drain_us": drain_us},
            }
    return out


def build_big(path: Path, rows: int, log: Any = print) -> float:
    """An outbox of ``rows`` rows, all 'sent' but the last BIG_PENDING, built with raw SQL
    in the outbox's own schema (counts and a proportional audit trail included)."""
    remove_db(path)
    Outbox(path).close()  # the schema, through the real migrations
    started = time.perf_counter()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = OFF")
    conn.execute("PRAGMA cache_size = -400000")
    pending = min(BIG_PENDING, rows)
    sent = rows - pending
    now = time.time()
    step = 1_000_000
    for lo in range(0, rows, step):
        hi = min(rows, lo + step)
        conn.execute("BEGIN")
        conn.execute(
            """
            WITH RECURSIVE seq(i) AS (SELECT ? UNION ALL SELECT i + 1 FROM seq WHERE i + 1 < ?)
            INSERT INTO messages (message_id, run, call_type, person, payload, size, status,
                                  attempts, created_at, updated_at, sent_at)
            SELECT printf('%08x-0000-7000-8000-%012x', i / 4096, i), '', 'track',
                   'user-' || (i % 10000),
                   '{"type":"track","userId":"user-' || (i % 10000) || '","anonymousId":'
                   || '"anon-' || (i % 10000) || '","event":"Item Viewed","properties":'
                   || '{"sku":"SKU-' || printf('%07d', i) || '","price":19.99,"qty":'
                   || (1 + i % 5) || '},"timestamp":"2026-01-01T00:00:00.000Z","messageId":"'
                   || printf('%08x-0000-7000-8000-%012x', i / 4096, i) || '"}',
                   240, CASE WHEN i < ? THEN 'sent' ELSE 'pending' END,
                   CASE WHEN i < ? THEN 1 ELSE 0 END, ?, ?, CASE WHEN i < ? THEN ? END
            FROM seq
            """,
            (lo, hi, sent, sent, now - 86400, now - 3600, sent, now - 3600),
        )
        conn.execute("COMMIT")
        log(f"    big outbox: {hi:,} / {rows:,} rows")
    attempts = max(1, sent // BIG_PER_ATTEMPT)
    conn.execute("BEGIN")
    conn.execute(
        """
        WITH RECURSIVE seq(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM seq WHERE i + 1 < ?)
        INSERT INTO attempts (at, worker_id, endpoint, runs, messages, bytes, status_code,
                              latency_ms, outcome, error, row_ranges, min_row_id, max_row_id)
        SELECT ? + i * 0.01, 'bench', 'batch', '[""]', ?, ? * 241, 200, 40.0, 'sent', NULL,
               '[[' || (i * ? + 1) || ',' || ((i + 1) * ?) || ']]', i * ? + 1, (i + 1) * ?
        FROM seq
        """,
        (attempts, now - 3700, BIG_PER_ATTEMPT, BIG_PER_ATTEMPT, BIG_PER_ATTEMPT,
         BIG_PER_ATTEMPT, BIG_PER_ATTEMPT, BIG_PER_ATTEMPT),
    )
    conn.execute("INSERT INTO attempt_runs (run, attempt_id) SELECT '', id FROM attempts")
    conn.execute("DELETE FROM counts")
    conn.execute("INSERT INTO counts (run, status, n) SELECT run, status, count(*)"
                 " FROM messages GROUP BY run, status")
    conn.execute("COMMIT")
    conn.execute("ANALYZE")
    conn.close()
    checkpoint(path)
    return time.perf_counter() - started


def _time_ms(fn: Any, reps: int) -> dict[str, Any]:
    fn()  # warm the page cache
    runs = []
    for _ in range(reps):
        started = time.perf_counter()
        fn()
        runs.append((time.perf_counter() - started) * 1e3)
    return {"median_ms": statistics.median(runs), "runs_ms": runs}


def _claim_ms(storage: Any, reps: int) -> dict[str, Any]:
    """Median ms of Storage.claim (500 KB / 5,000 messages); each claim is released again
    (untimed), so every claim sees the same outbox."""
    runs: list[float] = []
    claimed = 0
    for rep in range(reps + 1):  # the first one warms the page cache
        started = time.perf_counter()
        batch = storage.claim("bench", lease_seconds=120, max_bytes=MAX_BATCH_BYTES,
                              max_messages=5000)
        elapsed = (time.perf_counter() - started) * 1e3
        claimed = len(batch)
        storage.release(batch)
        if rep:
            runs.append(elapsed)
    return {"median_ms": statistics.median(runs), "runs_ms": runs, "rows_per_claim": claimed}


def big_run(workdir: Path, *, rows: int, reps: int = 5, log: Any = print) -> dict[str, Any]:
    """Claim and status on a big outbox (mostly sent), next to the same claim on an outbox
    holding only the pending rows."""
    small = workdir / "big-reference.db"
    build_big(small, BIG_PENDING, lambda _: None)
    with Outbox(small) as outbox:
        small_claim = _claim_ms(outbox.storage, reps)
        small_status = _time_ms(outbox.status, reps)
    remove_db(small)
    path = workdir / f"big-{rows}.db"
    log(f"  scale: building an outbox of {rows:,} rows ({BIG_PENDING:,} pending)")
    build_seconds = build_big(path, rows, log)
    size_mb = path.stat().st_size / 1e6
    out: dict[str, Any] = {"rows": rows, "pending": min(BIG_PENDING, rows),
                           "build_seconds": build_seconds, "file_mb": size_mb,
                           "reference_claim": small_claim, "reference_status": small_status}
    with Outbox(path) as outbox:
        counts = outbox.storage.counts()
        assert counts["sent"] + counts["pending"] == rows, counts
        out["claim"] = _claim_ms(outbox.storage, reps)
        out["status"] = _time_ms(outbox.status, reps)
        out["status_counts"] = {k: v for k, v in outbox.status().items()
                                if k in ("pending", "in_flight", "sent", "failed", "total")}
    remove_db(path)
    return out
