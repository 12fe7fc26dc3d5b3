"""Where a sender's time goes: claims that find nothing, waits for the write lock, idle sleeps.

    python -m benchmarks.lanes_profile [--n 50000] [--people 50] [--concurrency 1 4]

Drains the same filled outbox into the zero-cost sink once per concurrency, in this
process, with the storage's write transaction and claim wrapped in timers (per sender
thread): how many claims came back empty, how long a claim took, how long a sender
waited for ``BEGIN IMMEDIATE`` (another connection holding the write lock) and how long
it held it, and the idle sleeps after an empty claim. cProfile cannot do this: it sees one
thread, and the cost here is in how the threads get in each other's way.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks.common import checkpoint, checkpoint_copy
from benchmarks.lanes import fill
from benchmarks.recorder import Recorder
from benchmarks.sink import Sink
from cio_outbox import Outbox

_FIELDS = ("claims", "empty_claims", "claim_s", "empty_claim_s", "lock_wait_s",
           "lock_held_s", "writes", "idle_s", "sent")


class _Timers:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.by_thread: dict[str, dict[str, float]] = defaultdict(
            lambda: dict.fromkeys(_FIELDS, 0.0))

    def add(self, **figures: float) -> None:
        name = threading.current_thread().name
        with self.lock:
            row = self.by_thread[name]
            for key, value in figures.items():
                row[key] += value

    def total(self) -> dict[str, float]:
        out = dict.fromkeys(_FIELDS, 0.0)
        for row in self.by_thread.values():
            for key, value in row.items():
                out[key] += value
        return out


def instrument(outbox: Outbox, worker: Any, timers: _Timers) -> None:
    """Wrap the storage's write transaction and claim, and the worker's idle wait."""
    storage = outbox.storage
    write = storage._write
    claim = storage.claim

    @contextlib.contextmanager
    def timed_write() -> Iterator[Any]:
        asked = time.perf_counter()
        with write() as conn:
            got = time.perf_counter()
            timers.add(lock_wait_s=got - asked, writes=1)
            try:
                yield conn
            finally:
                timers.add(lock_held_s=time.perf_counter() - got)

    def timed_claim(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        rows = claim(*args, **kwargs)
        spent = time.perf_counter() - started
        if rows:
            timers.add(claims=1, claim_s=spent, sent=len(rows))
        else:
            timers.add(claims=1, empty_claims=1, empty_claim_s=spent)
        return rows

    stop = worker._stop

    class _TimedStop:
        """The worker's stop event, with its idle waits timed."""

        def wait(self, timeout: float | None = None) -> bool:
            started = time.perf_counter()
            result = stop.wait(timeout)
            timers.add(idle_s=time.perf_counter() - started)
            return result

        def __getattr__(self, name: str) -> Any:
            return getattr(stop, name)

    storage._write = timed_write  # type: ignore[method-assign]
    storage.claim = timed_claim  # type: ignore[method-assign]
    worker._stop = _TimedStop()


def profile(template: Path, db: Path, sink: Sink | Recorder, concurrency: int) -> \
        dict[str, Any]:
    checkpoint_copy(template, db)
    timers = _Timers()
    with Outbox(db) as outbox:
        worker = outbox.worker(key=sink.key, host=sink.url, concurrency=concurrency)
        instrument(outbox, worker, timers)
        started = time.perf_counter()
        result = worker.run(until_empty=True)
        elapsed = time.perf_counter() - started
        worker.client.close()
    return {"concurrency": concurrency, "elapsed": elapsed, "sent": result.sent,
            "requests": result.requests, "total": timers.total(),
            "by_thread": dict(timers.by_thread)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--people", type=int, default=50)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--latency", type=float, default=0.0,
                        help="seconds per request (the recorder instead of the sink)")
    args = parser.parse_args(argv)
    server = Recorder(latency=args.latency) if args.latency else Sink()
    with tempfile.TemporaryDirectory(prefix="cio-lanes-profile-") as tmp, server as sink:
        template = Path(tmp) / "template.db"
        fill(template, args.n, args.people, "profile")
        checkpoint(template)
        for concurrency in args.concurrency:
            r = profile(template, Path(tmp) / "outbox.db", sink, concurrency)
            t = r["total"]
            print(f"concurrency {concurrency}: {r['elapsed']:.2f} s, {r['sent']:,} sent in "
                  f"{r['requests']} requests ({args.people} people, {args.n:,} calls)")
            print(f"  claims {t['claims']:.0f} ({t['empty_claims']:.0f} empty); "
                  f"claim time {t['claim_s']:.2f} s with rows, {t['empty_claim_s']:.2f} s "
                  f"empty; write transactions {t['writes']:.0f}, waiting for the lock "
                  f"{t['lock_wait_s']:.2f} s, holding it {t['lock_held_s']:.2f} s; idle "
                  f"{t['idle_s']:.2f} s (summed over senders)")
            for name, row in sorted(r["by_thread"].items()):
                print(f"    {name}: sent {row['sent']:,.0f}, claims {row['claims']:.0f} "
                      f"({row['empty_claims']:.0f} empty, {row['empty_claim_s']:.2f} s), "
                      f"lock wait {row['lock_wait_s']:.2f} s, held {row['lock_held_s']:.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
