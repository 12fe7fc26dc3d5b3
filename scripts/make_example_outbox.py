"""Generate ``outbox.db.example``: a small outbox with rows in every state.

    .venv/bin/python scripts/make_example_outbox.py [PATH]

What it holds (runs, rows and message ids are deterministic; times, latencies and the
sandbox's port are not):

- run ``crm-import``: 6 identify calls sent to a local sandbox, and one track that the
  workspace refuses (the sandbox's ``reject_events`` stands in for a server-side refusal:
  what our rules refuse never gets past enqueue), answered with HTTP 400; that row is
  dead-lettered (``failed``) with the server's error text, and the audit trail holds the
  sent and the rejected request;
- run ``orders-backfill``: 5 track calls, 2 of them ``in_flight`` under the lease of a
  worker that died (``example-host:4242:dead01``; the lease has long expired, so the next
  worker takes them back), 3 ``pending``;
- run ``events-backfill``: 2 ``pending`` page calls.

Inspect it with ``cio-outbox status --db outbox.db.example`` (on a copy: opening an outbox
upgrades and writes to it).
"""

from __future__ import annotations

import sys
from pathlib import Path

from cio_outbox import Outbox
from cio_outbox.sandbox import Sandbox

DEFAULT_PATH = Path(__file__).resolve().parent.parent / "outbox.db.example"
WORKER_ID = "example-host:1234:a1b2c3"
REFUSED_EVENT = "Legacy Contact Imported"
DEAD_WORKER_ID = "example-host:4242:dead01"
PEOPLE = ("ada", "grace", "alan", "edsger", "barbara", "donald")


def _at(day: int, hour: int = 9) -> str:
    return f"2024-03-{day:02d}T{hour:02d}:00:00.000Z"


def make_example(path: str | Path) -> Path:
    """Write the example outbox to ``path`` (replacing any file there) and return the path."""
    path = Path(path)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    with Outbox(path) as outbox, Sandbox(reject_events=[REFUSED_EVENT],
                                         named_errors=True) as sandbox:
        for day, name in enumerate(PEOPLE, start=1):
            outbox.identify(
                f"user-{name}", run="crm-import", idempotency_key=f"crm-import:{name}",
                timestamp=_at(day),
                traits={"email": f"{name}@example.com", "plan": "pro" if day % 2 else "free"},
            )
        # An event the workspace refuses when it is sent: dead-lettered with the reason.
        outbox.track(
            "user-grace", REFUSED_EVENT, run="crm-import",
            idempotency_key="crm-import:grace-created", timestamp=_at(2, 10),
            properties={"source": "legacy-crm"},
        )
        worker = outbox.worker(key=sandbox.key, host=sandbox.url, run="crm-import",
                               concurrency=1, worker_id=WORKER_ID)
        try:
            result = worker.run(until_empty=True)
        finally:
            worker.client.close()
        if (result.sent, result.failed) != (6, 1):
            raise RuntimeError(f"expected 6 sent and 1 failed, got {result.as_dict()}")

        for n in range(1, 6):
            outbox.track(
                f"customer-{n:03d}", "Order Placed", run="orders-backfill",
                idempotency_key=f"orders-backfill:{n}", timestamp=_at(10 + n, 14),
                properties={"order_id": f"ord-{1000 + n}", "total": 19.5 * n,
                            "currency": "EUR"},
            )
        for n, page in enumerate(("Pricing", "Docs"), start=1):
            outbox.page(
                f"user-{PEOPLE[n]}", page, run="events-backfill",
                idempotency_key=f"events-backfill:{n}", timestamp=_at(20 + n, 16),
                properties={"url": f"https://example.com/{page.lower()}"},
            )
        # A worker claims two rows and dies before sending them: they stay in flight until
        # their lease expires.
        claimed = outbox.storage.claim(DEAD_WORKER_ID, lease_seconds=120.0,
                                       max_bytes=500_000, max_messages=2, run="orders-backfill")
        if len(claimed) != 2:
            raise RuntimeError(f"expected to lease 2 rows, leased {len(claimed)}")
        outbox.storage.vacuum()  # one self-contained, compact file (the WAL emptied)
    return path


def main(argv: list[str]) -> int:
    path = make_example(argv[1] if len(argv) > 1 else DEFAULT_PATH)
    with Outbox(path) as outbox:
        status = outbox.status()
    print(f"wrote {path}: " + ", ".join(
        f"{state} {status[state]}" for state in ("pending", "in_flight", "sent", "failed")))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
