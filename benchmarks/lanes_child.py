"""Measured clients of the lanes benchmark, one per process:
``python -m benchmarks.lanes_child '<json spec>'`` prints one JSON line.

Modes (``spec["mode"]``):

- ``drain``: our Worker (``spec["worker"]`` options, gzip as the Worker defaults) drains a
  filled outbox, SQLite file or PostgreSQL URL, until empty. ``wall_start``/``wall_end``
  (``time.time()``) let the parent combine several processes into one elapsed time.
- ``lean``: the reference a drain is held to: one thread, claim (one transaction), join
  the stored JSON, gzip level 1 (as our client), POST, mark sent (one transaction). No
  per-person bookkeeping is needed with one request in flight.
- ``e2e``: enqueue a JSONL file with the library call behind ``cio-outbox enqueue``, then
  drain it, timed together.
"""

from __future__ import annotations

import datetime as _dt
import gzip
import json
import sqlite3
import sys
import time
from typing import Any

import requests

from benchmarks.child import _peak_rss, _Window

#: The reference's request limits: the same as our Worker's defaults.
MAX_BYTES = 500_000
MAX_MESSAGES = 5_000


def drain(spec: dict[str, Any]) -> dict[str, Any]:
    from cio_outbox import Outbox

    outbox = Outbox(spec["db"])
    worker = outbox.worker(key=spec["key"], host=spec["url"], **spec.get("worker", {}))
    wall_start = time.time()
    with _Window(spec.get("server_pid")) as window:
        result = worker.run(until_empty=True).as_dict()
    wall_end = time.time()
    worker.client.close()
    counts = outbox.storage.counts()
    outbox.close()
    # The window's elapsed (the whole run), not the Worker's own figure.
    return {**result, **window.as_dict(), "counts": counts, "wall_start": wall_start,
            "wall_end": wall_end, "rss_peak": _peak_rss()}


def lean(spec: dict[str, Any]) -> dict[str, Any]:
    conn = sqlite3.connect(spec["db"], isolation_level=None)
    conn.execute("PRAGMA synchronous=NORMAL")
    session = requests.Session()
    session.auth = (spec["key"], "")
    headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    url = spec["url"] + "/v1/batch"
    sent = requests_sent = 0
    with _Window(spec.get("server_pid")) as window:
        while True:
            conn.execute("BEGIN IMMEDIATE")
            head = conn.execute(
                "SELECT id, size FROM messages WHERE status = 'pending' ORDER BY id LIMIT ?",
                (MAX_MESSAGES,)).fetchall()
            total, last = 30, None  # 30: the envelope and sentAt
            for row_id, size in head:
                if total + size + 1 > MAX_BYTES:
                    break
                total += size + 1
                last = row_id
            if last is None:
                conn.execute("COMMIT")
                break
            first = head[0][0]
            conn.execute("UPDATE messages SET status = 'in_flight' WHERE status = 'pending'"
                         " AND id BETWEEN ? AND ?", (first, last))
            conn.execute("COMMIT")
            payloads = [p for (p,) in conn.execute(
                "SELECT payload FROM messages WHERE id BETWEEN ? AND ? ORDER BY id",
                (first, last))]
            sent_at = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
            body = ('{"batch":[' + ",".join(payloads) + '],"sentAt":"' + sent_at
                    + '"}').encode()
            reply = session.post(url, data=gzip.compress(body, compresslevel=1),
                                 headers=headers, timeout=60)
            if reply.status_code != 200:
                raise RuntimeError(f"lean drain: HTTP {reply.status_code}")
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("UPDATE messages SET status = 'sent', sent_at = ? WHERE id BETWEEN"
                         " ? AND ? AND status = 'in_flight'", (time.time(), first, last))
            conn.execute("COMMIT")
            sent += len(payloads)
            requests_sent += 1
    conn.close()
    return {**window.as_dict(), "sent": sent, "requests": requests_sent,
            "rss_peak": _peak_rss()}


def e2e(spec: dict[str, Any]) -> dict[str, Any]:
    from cio_outbox import Outbox
    from cio_outbox.importers import enqueue_file

    with _Window(spec.get("server_pid")) as window:
        outbox = Outbox(spec["db"])
        imported = enqueue_file(outbox, spec["file"])
        enqueued_at = time.perf_counter() - window.t0
        worker = outbox.worker(key=spec["key"], host=spec["url"], **spec.get("worker", {}))
        result = worker.run(until_empty=True).as_dict()
    worker.client.close()
    counts = outbox.storage.counts()
    outbox.close()
    # The window's elapsed covers the enqueue and the drain; the Worker's only the drain.
    return {**result, **window.as_dict(), "counts": counts, "enqueue_seconds": enqueued_at,
            "import": imported.as_dict(), "rss_peak": _peak_rss()}


MODES = {"drain": drain, "lean": lean, "e2e": e2e}


def main() -> int:
    spec = json.loads(sys.argv[1])
    result = MODES[spec["mode"]](spec)
    sys.stdout.write(json.dumps(result, default=str) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
