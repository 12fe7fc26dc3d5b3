"""``cio-outbox demo``: a sample migration into a local sandbox, with no account.

It enqueues generated identify and track calls from a JSONL file (one of them carries an
event the sandbox is told to reject), drains them with a worker that is stopped partway
(as Ctrl-C would stop it) and then resumed, re-runs the import to show that it adds no
duplicates, and ends with the poison row in the failed list and every other row sent.

>>> from cio_outbox.demo import run_demo
>>> report = run_demo(None, rows=300)     # doctest: +SKIP
>>> report.failed, report.sent            # doctest: +SKIP
(1, 299)
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import random
import shlex
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cio_outbox.importers import enqueue_records, reader_for
from cio_outbox.outbox import Outbox
from cio_outbox.sandbox import Sandbox
from cio_outbox.worker import Progress, Worker

RUN = "demo"
POISON_EVENT = "Legacy Checkout (malformed)"
"""The event name the demo's sandbox rejects with HTTP 400, as a real API rejects a bad call."""

_EVENTS = ("Signed Up", "Viewed Product", "Order Placed", "Subscription Renewed")
_PLANS = ("free", "starter", "pro", "enterprise")
_FIRST = ("Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Frances", "Ken", "Radia",
          "Tim", "Margaret", "Leslie")
_LAST = ("Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "Knuth", "Allen", "Thompson",
         "Perlman", "Berners-Lee", "Hamilton", "Lamport")


class DemoError(RuntimeError):
    """The demo could not start, or did not end as it should."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class DemoReport:
    """Where the demo left its outbox and how the migration ended."""

    db: str
    rows: int
    sent: int
    failed: int
    received: int
    duplicates: int


def sample_calls(rows: int, *, seed: int = 7) -> list[dict[str, Any]]:
    """``rows`` calls for generated people: an identify, then track events, per person.
    Exactly one track (about 80% of the way in) carries :data:`POISON_EVENT`."""
    rng = random.Random(seed)
    start = _dt.datetime(2024, 1, 1, tzinfo=_dt.UTC)
    poison = (int(rows * 0.8) // 3) * 3 + 1
    calls: list[dict[str, Any]] = []
    for index in range(rows):
        person = index // 3
        user_id = f"user-{person:05d}"
        at = (start + _dt.timedelta(minutes=7 * index)).isoformat().replace("+00:00", "Z")
        if index % 3 == 0:
            first, last = rng.choice(_FIRST), rng.choice(_LAST)
            calls.append({"type": "identify", "userId": user_id, "timestamp": at, "traits": {
                "email": f"{first}.{last}.{person}@example.com".lower(),
                "name": f"{first} {last}", "plan": rng.choice(_PLANS),
                "created_at": at,
            }})
            continue
        event = POISON_EVENT if index == poison else rng.choice(_EVENTS)
        properties: dict[str, Any] = {"source": "legacy-crm"}
        if event in ("Order Placed", POISON_EVENT):
            properties.update(order_id=f"ord-{index:06d}", total=round(rng.uniform(5, 500), 2),
                              currency="EUR")
        elif event == "Viewed Product":
            properties.update(sku=f"SKU-{rng.randrange(1000):04d}")
        calls.append({"type": "track", "userId": user_id, "event": event, "timestamp": at,
                      "properties": properties})
    return calls


def _counts_line(outbox: Outbox) -> str:
    counts = outbox.status(RUN)
    return (f"pending {counts['pending']:,}  in flight {counts['in_flight']:,}  "
            f"sent {counts['sent']:,}  failed {counts['failed']:,}")


def _stop_when(worker: Worker, sent: int) -> threading.Thread:
    """Stop ``worker`` once it has sent at least ``sent`` messages (as a Ctrl-C would)."""

    def watch() -> None:
        while not worker.stopping:
            if worker.progress().sent >= sent:
                worker.stop()
                return
            threading.Event().wait(0.05)

    thread = threading.Thread(target=watch, name="cio-demo-interrupt", daemon=True)
    thread.start()
    return thread


def command_name() -> str:
    """How to run cio-outbox from here: ``cio-outbox`` when that is on the PATH, else the
    script beside this Python (``.venv/bin/cio-outbox`` after the quick start), else
    ``python -m cio_outbox``."""
    beside = Path(sys.executable).parent / "cio-outbox"
    on_path = shutil.which("cio-outbox")
    if on_path and beside.exists() and Path(on_path).resolve() == beside.resolve():
        return "cio-outbox"
    if beside.exists():
        try:
            relative = os.path.relpath(beside)
        except ValueError:  # another drive (Windows)
            relative = str(beside)
        shown = relative if not relative.startswith("..") else str(beside)
        return shlex.quote(shown if "/" in shown else f"./{shown}")
    return f"{shlex.quote(sys.executable)} -m cio_outbox"


def run_demo(
    db: str | os.PathLike[str] | None,
    *,
    rows: int = 3000,
    echo: Callable[[str], Any] = print,
    on_progress: Callable[[Progress], None] | None = None,
    interrupt_at: float = 0.4,
    max_rps: float = 10.0,
) -> DemoReport:
    """Run the demo (see the module docstring) into a new outbox file ``db`` (default: a
    fresh file in a temporary folder, kept so it can be inspected afterwards)."""
    if rows < 30:
        raise DemoError("the demo needs at least 30 rows", exit_code=2)
    if db is None:
        path = Path(tempfile.mkdtemp(prefix="cio-outbox-demo-")) / "outbox.db"
    else:
        path = Path(db)
        if path.exists() and path.stat().st_size > 0:
            raise DemoError(f"{path} already exists; the demo creates a fresh outbox, "
                            "so give it a new path (or leave out --db)", exit_code=2)
    progress_interval = getattr(on_progress, "interval", 1.0)
    per_request = max(50, rows // 30)  # about 30 requests, so the interruption shows

    with tempfile.TemporaryDirectory(prefix="cio-outbox-demo-sample-") as folder, \
            Sandbox(reject_events=[POISON_EVENT], latency=0.02) as sandbox, \
            Outbox(path) as outbox:
        sample = Path(folder) / "migration.jsonl"
        with sample.open("w", encoding="utf-8") as handle:
            for call in sample_calls(rows):
                handle.write(json.dumps(call) + "\n")

        def drain(stop_after: int | None) -> None:
            worker = outbox.worker(
                key=sandbox.key, host=sandbox.url, run=RUN, concurrency=2, max_rps=max_rps,
                max_messages=per_request, on_progress=on_progress,
                progress_interval=progress_interval,
            )
            if stop_after is not None:
                _stop_when(worker, stop_after)
            try:
                worker.run(until_empty=True)
            finally:
                worker.client.close()
                end_line = getattr(on_progress, "end_line", None)
                if end_line is not None:
                    end_line()

        echo("cio-outbox demo: a sample migration into a local sandbox (no account needed)")
        echo(f"  outbox:  {path}")
        echo(f"  sandbox: {sandbox.url} (rejects the event {POISON_EVENT!r} with HTTP 400)")
        echo("")
        echo(f"1. Enqueue {rows:,} calls (identify + track for {(rows + 2) // 3:,} people) "
             f"from {sample.name}")
        result = enqueue_records(outbox, reader_for(sample, run=RUN), run=RUN)
        echo(f"   added {result.added:,}, already there {result.skipped:,}, "
             f"rejected {result.rejected:,}")
        echo("")
        echo(f"2. Drain, interrupted after about {interrupt_at:.0%} (as Ctrl-C or SIGTERM "
             "would: the request in flight is finished and recorded, the rest released)")
        drain(int(rows * interrupt_at))
        echo(f"   interrupted: {_counts_line(outbox)}")
        echo("")
        echo("3. Run the same import again (as after a crash during the import)")
        again = enqueue_records(outbox, reader_for(sample, run=RUN), run=RUN)
        echo(f"   added {again.added:,}, already there {again.skipped:,}: no duplicates")
        echo("")
        echo("4. Resume the drain until nothing is pending")
        drain(None)
        echo(f"   done: {_counts_line(outbox)}")
        echo("")
        echo("5. The failed (dead-lettered) rows")
        failed_rows = outbox.failed(RUN)
        for row in failed_rows:
            echo(f"   #{row['id']} {row['summary']} (messageId {row['messageId']}, "
                 f"attempts {row['attempts']})")
            echo(f"      {row['error']}")
        echo("")
        status = outbox.status(RUN)
        stats = sandbox.stats()
        report = DemoReport(
            db=str(path), rows=rows, sent=status["sent"], failed=status["failed"],
            received=stats["messages"], duplicates=stats["duplicates"],
        )
        echo("6. Final status")
        echo(f"   {_counts_line(outbox)}")
        echo(f"   the sandbox received {report.received:,} messages, "
             f"{report.duplicates:,} duplicates, in {stats['requests']:,} requests")
        echo("")
        command = command_name()
        echo("Look around:")
        echo(f"   {command} status --db {path}")
        echo(f"   {command} failed --db {path}")
        if failed_rows:
            echo(f"   {command} history {failed_rows[0]['messageId']} --db {path}")
        echo(f"   {command} log --db {path} --limit 10")

    if (report.failed, report.sent, report.received) != (1, rows - 1, rows - 1):
        raise DemoError(
            f"the demo did not end as expected: {report.sent} sent, {report.failed} failed, "
            f"{report.received} received by the sandbox (expected {rows - 1}, 1, {rows - 1})"
        )
    return report
