"""Enqueue and drain rates of the PostgreSQL outbox next to the SQLite one.

Measures, for each backend:

- enqueue_many: chunked transactions of 20,000 rows (an import);
- enqueue: one committed transaction per message (an application writing as it goes);
- claim: claim + mark_sent with no HTTP, from 1, 2 and 4 threads (what the storage can hand
  out; on PostgreSQL claims are serialized by an advisory lock, so this shows its cost);
- drain: 1, 2 and 4 worker processes (2 sender threads each) into one sandbox process.

The sandbox and the workers share this machine's cores, so drain rates show how the
outbox scales until the machine (not the outbox) is the limit.

PostgreSQL is CIO_TEST_POSTGRES_URL, else a throwaway server (tests/pg.py) with default,
durable settings (fsync and synchronous_commit on); SQLite runs with synchronous=NORMAL.

    python benchmarks/postgres_vs_sqlite.py [--messages 20000] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import pg  # noqa: E402  (tests/pg.py: the throwaway server)

from cio_outbox import Outbox  # noqa: E402
from cio_outbox.batch import MAX_BATCH_BYTES  # noqa: E402
from cio_outbox.sandbox import SandboxProcess  # noqa: E402
from cio_outbox.storage import open_storage  # noqa: E402

WORKER = """
import json, sys, time
from cio_outbox import Outbox
url, host, key, name, max_messages = sys.argv[1:6]
box = Outbox(url)
worker = box.worker(key=key, host=host, concurrency=2, max_messages=int(max_messages),
                    idle_interval=0.02, worker_id=name)
print("ready", flush=True)
sys.stdin.readline()
started = time.time()
result = worker.run(until_empty=True, timeout=600)
print(json.dumps({"started": started, "ended": time.time(), "sent": result.sent}), flush=True)
"""


def calls(n: int, offset: int = 0) -> Iterator[dict[str, Any]]:
    for i in range(offset, offset + n):
        yield {"type": "track", "userId": f"user-{i % 997}", "event": "Item Viewed",
               "properties": {"sku": f"SKU-{i:06d}", "price": 19.99, "qty": 1 + i % 5}}


@contextmanager
def locations(postgres_url: str) -> Iterator[dict[str, Any]]:
    """A factory of fresh outboxes per backend, cleaned up afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="cio-bench-"))
    made: list[str] = []
    counter = iter(range(1_000_000))

    def sqlite() -> str:
        return str(folder / f"outbox-{next(counter)}.db")

    def postgres() -> str:
        url = pg.schema_url(postgres_url)
        made.append(url)
        return url

    try:
        yield {"sqlite": sqlite, "postgresql": postgres}
    finally:
        for url in made:
            pg.drop_schema(url)
        for path in folder.iterdir():
            path.unlink()
        folder.rmdir()


def bench_enqueue_many(location: str, n: int) -> float:
    with Outbox(location) as box:
        started = time.perf_counter()
        result = box.enqueue_many(calls(n), run="bench")
        elapsed = time.perf_counter() - started
        assert result.added == n
    return elapsed


def bench_enqueue_one(location: str, n: int) -> float:
    with Outbox(location) as box:
        started = time.perf_counter()
        for call in calls(n):
            box.enqueue(call, run="bench")
        return time.perf_counter() - started


def bench_claims(location: str, n: int, threads: int, max_messages: int) -> tuple[float, float]:
    """(seconds to claim and mark sent n rows from threads, mean claim ms)."""
    with Outbox(location) as box:
        box.enqueue_many(calls(n), run="bench")
        storage = box.storage
        durations: list[float] = []
        lock = threading.Lock()

        def loop(index: int) -> None:
            own = open_storage(location)
            mine: list[float] = []
            while True:
                started = time.perf_counter()
                rows = own.claim(f"t{index}", lease_seconds=60, max_bytes=MAX_BATCH_BYTES,
                                 max_messages=max_messages)
                mine.append(time.perf_counter() - started)
                if not rows:
                    break
                own.mark_sent(rows)
            own.close()
            with lock:
                durations.extend(mine)

        workers = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
        started = time.perf_counter()
        for thread in workers:
            thread.start()
        for thread in workers:
            thread.join()
        elapsed = time.perf_counter() - started
        assert storage.counts()["sent"] == n, storage.counts()
    return elapsed, 1000 * sum(durations) / len(durations)


def bench_drain(location: str, n: int, processes: int, max_messages: int) -> float:
    with Outbox(location) as box:
        box.enqueue_many(calls(n), run="bench")
        with SandboxProcess() as sandbox:
            procs = [
                subprocess.Popen(
                    [sys.executable, "-c", WORKER, location, sandbox.url, sandbox.key,
                     f"bench-{i}", str(max_messages)],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                )
                for i in range(processes)
            ]
            for proc in procs:  # every worker has imported and connected
                assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
            for proc in procs:
                assert proc.stdin is not None
                proc.stdin.write("go\n")
                proc.stdin.flush()
            reports = []
            for proc in procs:
                out, _ = proc.communicate(timeout=900)
                reports.append(json.loads(out.strip().splitlines()[-1]))
            received = sandbox.stats()["messages"]
        assert received == n, (received, n)
        assert box.status()["sent"] == n
    return max(r["ended"] for r in reports) - min(r["started"] for r in reports)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--single", type=int, default=2_000,
                        help="messages for the one-transaction-per-message enqueue")
    parser.add_argument("--max-messages", type=int, default=500,
                        help="messages per request in claims and drains")
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--json", default="postgres_vs_sqlite.json")
    parser.add_argument("--postgres", default=os.environ.get(pg.ENV),
                        help=f"server URL (default ${pg.ENV}, else a throwaway server)")
    args = parser.parse_args()
    counts = [int(w) for w in args.workers.split(",")]
    n = args.messages
    results: list[dict[str, Any]] = []

    def add(backend: str, measure: str, workers: int | None, messages: int,
            seconds: float, **extra: Any) -> None:
        row = {"backend": backend, "measure": measure, "workers": workers,
               "messages": messages, "seconds": round(seconds, 3),
               "msg_per_s": round(messages / seconds), **extra}
        results.append(row)
        print(f"  {backend:<10} {measure:<13} {workers or '':>3} {messages:>8,} "
              f"{seconds:8.2f} s {row['msg_per_s']:>10,} msg/s"
              + "".join(f"  {k} {v}" for k, v in extra.items()), flush=True)

    server = None
    url = args.postgres
    if not url:
        server = pg.ThrowawayPostgres(settings={})
        url = server.start()
    try:
        version = _server_version(url)
        print(f"PostgreSQL {version}; {os.cpu_count()} CPUs; {n:,} messages\n")
        print(f"  {'backend':<10} {'measure':<13} {'w':>3} {'messages':>8}  {'time':>9} "
              f"{'rate':>16}")
        with locations(url) as fresh:
            for backend, make in fresh.items():
                add(backend, "enqueue_many", None, n, bench_enqueue_many(make(), n))
                add(backend, "enqueue", None, args.single,
                    bench_enqueue_one(make(), args.single))
                for threads in counts:
                    seconds, claim_ms = bench_claims(make(), n, threads, args.max_messages)
                    add(backend, "claim+sent", threads, n, seconds,
                        mean_claim_ms=round(claim_ms, 2))
                for processes in counts:
                    add(backend, "drain", processes, n,
                        bench_drain(make(), n, processes, args.max_messages))
    finally:
        if server is not None:
            server.stop()
    meta = {"messages": n, "max_messages": args.max_messages, "cpus": os.cpu_count(),
            "postgres": version, "sqlite_synchronous": "NORMAL",
            "postgres_settings": "server defaults" if server else "as configured"}
    Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"\nwrote {args.json}")


def _server_version(url: str) -> str:
    import psycopg

    with psycopg.connect(url) as conn:
        return str(conn.execute("SHOW server_version").fetchone()[0])


if __name__ == "__main__":
    main()
