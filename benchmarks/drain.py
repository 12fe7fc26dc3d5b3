"""Section 2 (and 6): drain rate next to the official library and the wire ceiling.

The sandbox runs as a SandboxProcess; every client (our worker, the official library, the
wire loop) runs in a fresh child process (benchmarks.child), so CPU and memory figures are
per process. The same events (same messageIds) go to every client; the sandbox is reset
between runs and must count every event each time.
"""

from __future__ import annotations

import pickle
import time
from pathlib import Path
from typing import Any

from benchmarks.common import (
    Repeated,
    checkpoint,
    checkpoint_copy,
    chunks,
    events,
    ratio,
    run_child,
)
from cio_outbox import Outbox
from cio_outbox.batch import MAX_BATCH_BYTES, Row, batch_body, select, sent_at_now
from cio_outbox.sandbox import SandboxProcess

RUN_TAG = "drain"

#: Servers a drain can go to: the sandbox (validates and counts every message) or the
#: zero-cost nginx sink (counts requests only; no latency option).
TARGETS = ("sandbox", "sink")


class SinkTarget:
    """The nginx sink with the sandbox's benchmark interface (url, key, pid, reset, stats).

    It cannot count messages, so deliveries are checked on the client's side instead:
    the outbox's counts, the wire loop's status codes, the official library's drops."""

    counts_messages = False

    def __init__(self) -> None:
        from benchmarks.sink import Sink

        self.sink = Sink()

    def __enter__(self) -> SinkTarget:
        self.sink.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.sink.stop()

    @property
    def url(self) -> str:
        return self.sink.url

    @property
    def key(self) -> str:
        return self.sink.key

    @property
    def pid(self) -> int:
        return self.sink.pid

    def reset(self) -> None:
        self.sink.reset()

    def configure(self, latency: float = 0.0) -> None:
        if latency:
            raise ValueError("the zero-cost sink has no latency option; use the sandbox")

    def stats(self) -> dict[str, Any]:
        return {"messages": None, **self.sink.stats()}


def fill(path: Path, n: int, tag: str = RUN_TAG) -> float:
    """Enqueue n events in bulk; returns the seconds the enqueue calls took."""
    spent = 0.0
    with Outbox(path) as outbox:
        for start, stop in chunks(n):
            evs = events(start, stop, tag)
            started = time.perf_counter()
            outbox.enqueue_many(evs)
            spent += time.perf_counter() - started
    return spent


def build_bodies(template: Path, out: Path, max_bytes: int = MAX_BATCH_BYTES) -> int:
    """The /v1/batch bodies our worker would send for this outbox, pre-built, pickled."""
    with Outbox(template) as outbox:
        rows = [Row(*r) for r in outbox.storage.conn.execute(
            "SELECT id, message_id, run, call_type, person, payload, size, attempts"
            " FROM messages WHERE status = 'pending' ORDER BY id")]
    bodies = []
    sent_at = sent_at_now()
    while rows:
        chosen = select(rows, set(), max_bytes=max_bytes)
        bodies.append(batch_body([r.payload for r in chosen], sent_at))
        rows = rows[len(chosen):]
    with open(out, "wb") as fh:
        pickle.dump(bodies, fh)
    return len(bodies)


class Bench:
    """One sandbox process and the files of a drain benchmark of n events."""

    def __init__(self, workdir: Path, n: int, sandbox: SandboxProcess) -> None:
        self.workdir = workdir
        self.n = n
        self.sandbox = sandbox
        self.template = workdir / f"drain-{n}.template.db"
        self.db = workdir / f"drain-{n}.db"
        self.bodies = workdir / f"drain-{n}.bodies.pickle"
        #: seconds enqueue_many took to fill the outbox (not part of the drain rate)
        self.fill_seconds = fill(self.template, n) if not self.template.exists() else 0.0
        checkpoint(self.template)
        self.requests = build_bodies(self.template, self.bodies)

    def _expect(self, expected: int, what: str) -> dict[str, Any]:
        stats = self.sandbox.stats()
        if stats["messages"] is not None and stats["messages"] != expected:
            raise RuntimeError(f"{what}: sandbox stored {stats['messages']}, expected {expected}")
        return stats

    def ours(self, worker: dict[str, Any], *, gzip: bool = False, url: str | None = None,
             expect: bool = True) -> dict[str, Any]:
        checkpoint_copy(self.template, self.db)
        self.sandbox.reset()
        result = run_child({
            "mode": "outbox_drain", "db": str(self.db), "url": url or self.sandbox.url,
            "key": self.sandbox.key, "worker": worker, "gzip": gzip,
            "sandbox_pid": self.sandbox.pid,
        })
        if expect:
            self._expect(self.n, "our worker")
            if result["counts"].get("sent") != self.n:
                raise RuntimeError(f"our worker: {result['counts']}, expected {self.n} sent")
        result["sandbox"] = self.sandbox.stats()
        result["rate"] = self.n / result["elapsed"]
        return result

    def official(self, client: dict[str, Any] | None = None) -> dict[str, Any]:
        self.sandbox.reset()
        result = run_child({
            "mode": "official", "url": self.sandbox.url, "key": self.sandbox.key,
            "start": 0, "n": self.n, "run_tag": RUN_TAG, "client": client or {},
            "sandbox_pid": self.sandbox.pid,
        })
        stats = self.sandbox.stats()
        if stats["messages"] is None:  # the sink: what the library did not drop arrived
            stats["messages"] = self.n - result["dropped_by_track"]
        result["received"] = stats["messages"]
        result["dropped"] = self.n - stats["messages"]
        result["requests"] = stats["requests"]
        # The rate counts what arrived: dropped events are not delivered.
        result["rate"] = stats["messages"] / result["elapsed"]
        return result

    def wire(self, concurrency: int) -> dict[str, Any]:
        self.sandbox.reset()
        result = run_child({
            "mode": "wire", "url": self.sandbox.url, "key": self.sandbox.key,
            "bodies": str(self.bodies), "concurrency": concurrency,
            "sandbox_pid": self.sandbox.pid,
        })
        self._expect(self.n, "wire loop")
        if set(result["statuses"]) != {"200"}:
            raise RuntimeError(f"wire loop: status codes {result['statuses']}")
        result["rate"] = self.n / result["elapsed"]
        return result


def _median_of(runs: list[dict[str, Any]]) -> tuple[Repeated, dict[str, Any]]:
    """The rates of some runs and the run whose rate is the median."""
    rates = Repeated([r["rate"] for r in runs])
    chosen = sorted(runs, key=lambda r: r["rate"])[len(runs) // 2]
    return rates, chosen


def _shares(run: dict[str, Any]) -> dict[str, float]:
    return {"client_cpu_share": run["client_cpu_share"],
            "sandbox_cpu_share": run["sandbox_cpu_share"]}


def run(workdir: Path, *, n: int, reps: int, concurrency: dict[str, int],
        latencies: list[float], official_reps: int, target: str = "sandbox",
        log: Any = print) -> dict[str, Any]:
    if target not in TARGETS:
        raise ValueError(f"target must be one of {', '.join(TARGETS)}, not {target!r}")
    if target == "sink" and any(latencies):
        log("  the sink has no latency option: measuring loopback only")
        latencies = [x for x in latencies if not x]
    out: dict[str, Any] = {"n": n, "concurrency": concurrency, "latencies": {},
                           "target": target}
    server = SandboxProcess() if target == "sandbox" else SinkTarget()
    with server as sandbox:
        warm = Bench(workdir, min(n, 5_000), sandbox)
        bench = Bench(workdir, n, sandbox)
        out["requests_per_drain"] = bench.requests
        out["events_per_request"] = n / bench.requests
        out["fill_seconds"] = bench.fill_seconds
        for latency in latencies:
            label = f"{latency * 1000:g}ms"
            conc = concurrency[label] if label in concurrency else concurrency["default"]
            worker = {"concurrency": conc}
            sandbox.configure(latency=latency)
            log(f"  drain @ {label}: warm-up")
            warm.ours(worker)
            warm.official()
            warm.wire(conc)
            log(f"  drain @ {label}: {n:,} events, ours (concurrency {conc}), wire ceiling, "
                f"official defaults and official max_queue_size={n + 1}, interleaved x {reps}")
            runs: dict[str, list[dict[str, Any]]] = {
                "ours": [], "wire": [], "official": [], "nodrop": []}
            for rep in range(reps):
                runs["ours"].append(bench.ours(worker))
                runs["wire"].append(bench.wire(conc))
                if rep < official_reps:
                    runs["official"].append(bench.official())
                    runs["nodrop"].append(bench.official({"max_queue_size": n + 1}))
                log(f"    rep {rep + 1}: ours {runs['ours'][-1]['rate']:,.0f}/s, "
                    f"wire {runs['wire'][-1]['rate']:,.0f}/s, official "
                    f"{runs['official'][-1]['rate']:,.0f}/s, no drop "
                    f"{runs['nodrop'][-1]['rate']:,.0f}/s")
            ours, ours_run = _median_of(runs["ours"])
            wire, wire_run = _median_of(runs["wire"])
            off, off_run = _median_of(runs["official"])
            nodrop, nodrop_run = _median_of(runs["nodrop"])
            out["latencies"][label] = {
                "latency_s": latency,
                "worker_settings": worker,
                "ours_per_s": ours.as_dict(),
                "ours_run": ours_run,
                "wire_per_s": wire.as_dict(),
                "wire_run": wire_run,
                "official_default_per_s": off.as_dict(),
                "official_default_run": off_run,
                "official_default_dropped": off_run["dropped"],
                "official_nodrop_per_s": nodrop.as_dict(),
                "official_nodrop_run": nodrop_run,
                "official_nodrop_dropped": nodrop_run["dropped"],
                "ours_over_official_default": ratio(ours.median, off.median),
                "ours_over_official_nodrop": ratio(ours.median, nodrop.median),
                "ours_over_wire": ratio(ours.median, wire.median),
                # End to end like the official library's figure: enqueue_many plus drain.
                "ours_with_enqueue_per_s": n / (n / ours.median + bench.fill_seconds),
                "cpu": {
                    "ours": _shares(ours_run), "wire": _shares(wire_run),
                    "official_default": _shares(off_run),
                    "official_nodrop": _shares(nodrop_run),
                },
            }
        sandbox.configure(latency=0.0)
    return out
