"""Shared pieces of the benchmark harness: events, timing, child processes, CPU and memory."""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

#: Distinct people in the generated events. The worker keeps one person's messages in
#: order, so it never sends two requests for the same person at once; with 10,000 people
#: a 500 KB batch (about 2,000 events) leaves plenty of others for the next sender.
PEOPLE = 10_000
TIMESTAMP = "2026-01-01T00:00:00.000Z"
TIMESTAMP_DT = _dt.datetime(2026, 1, 1, tzinfo=_dt.UTC)
_ID_NAMESPACE = uuid.UUID("2b3c1d5e-7f80-4a9b-8c0d-1e2f3a4b5c6d")


def event(i: int, run_tag: str = "") -> dict[str, Any]:
    """The i-th small track event, in wire shape. Both libraries get exactly these fields.

    Every event carries an anonymousId as well as a userId: the official library sends
    ``"anonymousId": null`` when it has none, which the sandbox refuses (see README).
    """
    person = i % PEOPLE
    return {
        "type": "track",
        "userId": f"user-{person}",
        "anonymousId": f"anon-{person}",
        "event": "Item Viewed",
        "properties": {"sku": f"SKU-{i:07d}", "price": 19.99, "qty": 1 + i % 5},
        "timestamp": TIMESTAMP,
        "messageId": str(uuid.uuid5(_ID_NAMESPACE, f"{run_tag}:{i}")),
    }


def events(start: int, stop: int, run_tag: str = "") -> list[dict[str, Any]]:
    return [event(i, run_tag) for i in range(start, stop)]


def chunks(n: int, size: int = 50_000) -> Iterator[tuple[int, int]]:
    for start in range(0, n, size):
        yield start, min(n, start + size)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


@dataclass
class Repeated:
    """Figures from several repetitions of one measurement (the median is reported)."""

    values: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return median(self.values)

    def as_dict(self) -> dict[str, Any]:
        return {"median": self.median, "runs": self.values}


def interleaved(fns: dict[str, Callable[[], float]], reps: int,
                warmup: bool = True) -> dict[str, Repeated]:
    """Warm each up once, then run them round-robin ``reps`` times, so that every side of
    a ratio sees the same load on a shared machine (a drift hits all sides alike)."""
    if warmup:
        for fn in fns.values():
            fn()
    out = {name: Repeated() for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            out[name].values.append(fn())
    return out


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def checkpoint(path: Path) -> None:
    """Fold an SQLite file's WAL into the file."""
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


def checkpoint_copy(src: Path, dst: Path) -> None:
    """Copy an SQLite file after folding its WAL in, so the copy is self-contained."""
    checkpoint(src)
    for suffix in ("", "-wal", "-shm"):
        target = Path(str(dst) + suffix)
        if target.exists():
            target.unlink()
    shutil.copyfile(src, dst)


def remove_db(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        target = Path(str(path) + suffix)
        if target.exists():
            target.unlink()


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds of a process so far (its threads included)."""
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


class RssSampler:
    """Samples a process's resident set size from outside it and keeps the peak."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.process = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.process.memory_info().rss)
            except psutil.Error:
                return
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_child(spec: dict[str, Any], timeout: float = 1800.0,
              module: str = "benchmarks.child") -> dict[str, Any]:
    """Run ``python -m <module>`` (benchmarks.child by default) with a JSON spec; return
    its JSON result.

    The parent samples the child's RSS with psutil while it runs and adds
    ``rss_peak_sampled`` (bytes) to the result.
    """
    proc = subprocess.Popen(
        [sys.executable, "-m", module, json.dumps(spec)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
        cwd=Path(__file__).resolve().parent.parent, env=dict(os.environ),
    )
    with RssSampler(proc.pid) as sampler:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            raise RuntimeError(f"benchmark child timed out: {spec['mode']}") from None
    if proc.returncode != 0:
        raise RuntimeError(
            f"benchmark child {spec['mode']} failed ({proc.returncode}):\n{err.decode()[-3000:]}"
        )
    lines = [line for line in out.decode().splitlines() if line.startswith("{")]
    result: dict[str, Any] = json.loads(lines[-1])
    result["rss_peak_sampled"] = sampler.peak
    return result


def now() -> float:
    return time.perf_counter()


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent.parent)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def machine() -> dict[str, Any]:
    load = os.getloadavg()
    return {
        "git_head": _git("rev-parse", "--short", "HEAD"),
        "cio_outbox_uncommitted": _git("status", "--porcelain", "--", "cio_outbox"),
        "cpus": os.cpu_count(),
        "load_average_at_start": [round(x, 2) for x in load],
        "python": sys.version.split()[0],
        "sqlite": sqlite3.sqlite_version,
        "platform": sys.platform,
        "memory_gb": round(psutil.virtual_memory().total / 1e9, 1),
    }
