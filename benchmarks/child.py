"""One measured client run in its own process: ``python -m benchmarks.child '<json spec>'``.

Running each client in a fresh process keeps the measurement clean: its CPU time and peak
memory are its own, not the harness's, and no state carries over between runs.

Modes (``spec["mode"]``):

- ``outbox_drain``: drain a filled outbox file with our Worker into the sandbox.
- ``official``: send events with customerio-cdp-analytics (its defaults unless
  ``spec["client"]`` overrides them), timed from the first ``track()`` to ``flush()``.
- ``wire``: post pre-built /v1/batch bodies with ``requests`` in a loop, from
  ``concurrency`` threads each with its own keep-alive Session.

Prints one JSON line with ``elapsed`` (seconds), CPU seconds of this process and of the
sandbox process over the same window, and the peak RSS (``ru_maxrss``).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import pickle
import queue
import resource
import sys
import threading
import time
from typing import Any

import psutil


def _cpu(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


class _Window:
    """Wall time and CPU time of this process and of the sandbox over one measured window."""

    def __init__(self, sandbox_pid: int | None) -> None:
        self.sandbox_pid = sandbox_pid

    def __enter__(self) -> _Window:
        self.sandbox_cpu0 = _cpu(self.sandbox_pid) if self.sandbox_pid else 0.0
        self.self_cpu0 = _cpu(os.getpid())
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.elapsed = time.perf_counter() - self.t0
        self.self_cpu = _cpu(os.getpid()) - self.self_cpu0
        self.sandbox_cpu = (_cpu(self.sandbox_pid) - self.sandbox_cpu0) if self.sandbox_pid \
            else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "elapsed": self.elapsed,
            "client_cpu": self.self_cpu,
            "sandbox_cpu": self.sandbox_cpu,
            "client_cpu_share": self.self_cpu / self.elapsed,
            "sandbox_cpu_share": self.sandbox_cpu / self.elapsed,
        }


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def outbox_drain(spec: dict[str, Any]) -> dict[str, Any]:
    from cio_outbox import Outbox

    rss_before = psutil.Process().memory_info().rss
    outbox = Outbox(spec["db"])
    worker = outbox.worker(key=spec["key"], host=spec["url"], gzip=spec.get("gzip", False),
                           **spec.get("worker", {}))
    profile_path = spec.get("profile")
    with _Window(spec.get("sandbox_pid")) as window:
        if profile_path:
            # cProfile sees one thread only: run one sender loop on this thread instead.
            import cProfile

            worker.concurrency = 1
            profiler = cProfile.Profile()
            profiler.enable()
            worker._sender(True)  # the loop Worker.run starts on each sender thread
            profiler.disable()
            profiler.dump_stats(profile_path)
            counters = worker._counters
            result = {"sent": counters.sent, "failed": counters.failed,
                      "requests": counters.requests, "retries": counters.retries}
        else:
            result = worker.run(until_empty=True).as_dict()
    worker.client.close()
    counts = outbox.storage.counts()
    outbox.close()
    return {**window.as_dict(), **result, "counts": counts, "rss_before": rss_before,
            "rss_peak": _peak_rss()}


def official(spec: dict[str, Any]) -> dict[str, Any]:
    from customerio.analytics import Client

    from benchmarks.common import TIMESTAMP_DT, events

    # The library logs a warning per dropped event; keep that cost, but not the noise.
    logging.getLogger("customerio").addHandler(logging.NullHandler())
    logging.getLogger("customerio").propagate = False
    calls = [
        (e["userId"], e["event"], e["properties"], e["anonymousId"], e["messageId"])
        for e in events(spec["start"], spec["start"] + spec["n"], spec["run_tag"])
    ]
    client = Client(spec["key"], host=spec["url"], **spec.get("client", {}))
    dropped = 0
    with _Window(spec.get("sandbox_pid")) as window:
        for user_id, name, properties, anonymous_id, message_id in calls:
            ok, _ = client.track(user_id=user_id, event=name, properties=properties,
                                 timestamp=TIMESTAMP_DT, anonymous_id=anonymous_id,
                                 message_id=message_id)
            if not ok:
                dropped += 1
        enqueued_at = time.perf_counter() - window.t0
        client.flush()
    client.join()
    return {**window.as_dict(), "sent": spec["n"], "dropped_by_track": dropped,
            "track_loop_seconds": enqueued_at, "rss_peak": _peak_rss()}


def wire(spec: dict[str, Any]) -> dict[str, Any]:
    import requests

    with open(spec["bodies"], "rb") as fh:
        bodies: list[bytes] = pickle.load(fh)
    work: queue.SimpleQueue[bytes] = queue.SimpleQueue()
    for body in bodies:
        work.put(body)
    auth = "Basic " + base64.b64encode(f"{spec['key']}:".encode()).decode()
    headers = {"Authorization": auth, "Content-Type": "application/json"}
    url = spec["url"] + "/v1/batch"
    statuses: dict[int, int] = {}
    lock = threading.Lock()
    sessions = [requests.Session() for _ in range(spec["concurrency"])]
    for session in sessions:  # connect before the clock starts, as a warm worker would be
        session.get(spec["url"] + "/sandbox/health", timeout=10)

    def loop(session: requests.Session) -> None:
        while True:
            try:
                body = work.get_nowait()
            except queue.Empty:
                return
            code = session.post(url, data=body, headers=headers, timeout=60).status_code
            with lock:
                statuses[code] = statuses.get(code, 0) + 1

    threads = [threading.Thread(target=loop, args=(s,)) for s in sessions]
    with _Window(spec.get("sandbox_pid")) as window:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    return {**window.as_dict(), "requests": len(bodies), "statuses": statuses,
            "rss_peak": _peak_rss()}


MODES = {"outbox_drain": outbox_drain, "official": official, "wire": wire}


def main() -> int:
    spec = json.loads(sys.argv[1])
    result = MODES[spec["mode"]](spec)
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
