"""Section 5: gzip on 500 KB /v1/batch bodies: CPU per message, bytes on the wire, and the
drain rate with gzip on and off (the client compresses at level 6)."""

from __future__ import annotations

import gzip
import json
import statistics
import time
from pathlib import Path
from typing import Any

from benchmarks.common import events, ratio
from benchmarks.drain import Bench
from cio_outbox.batch import BATCH_OVERHEAD, MAX_BATCH_BYTES, batch_body, sent_at_now
from cio_outbox.sandbox import SandboxProcess


def bodies(count: int) -> tuple[list[bytes], int]:
    """``count`` bodies of at most 500 KB of small track events; messages per body."""
    out: list[bytes] = []
    per_body = 0
    i = 0
    sent_at = sent_at_now()
    for _ in range(count):
        payloads: list[str] = []
        size = BATCH_OVERHEAD - 1
        while True:
            text = json.dumps(events(i, i + 1, "gzip")[0], separators=(",", ":"))
            if size + len(text) + 1 > MAX_BATCH_BYTES:
                break
            payloads.append(text)
            size += len(text) + 1
            i += 1
        per_body = len(payloads)
        out.append(batch_body(payloads, sent_at))
    return out, per_body


def compression(count: int, reps: int) -> dict[str, Any]:
    data, per_body = bodies(count)
    raw_bytes = statistics.mean(len(b) for b in data)
    out: dict[str, Any] = {"bodies": count, "body_bytes": raw_bytes,
                           "messages_per_body": per_body, "levels": {}}
    for level in (1, 6, 9):
        cpu_runs = []
        for _ in range(reps + 1):
            started = time.process_time()
            compressed = [gzip.compress(b, compresslevel=level) for b in data]
            cpu_runs.append(time.process_time() - started)
        cpu = statistics.median(cpu_runs[1:])
        size = statistics.mean(len(c) for c in compressed)
        started = time.process_time()
        for c in compressed:
            gzip.decompress(c)
        unzip = time.process_time() - started
        out["levels"][str(level)] = {
            "cpu_us_per_message": cpu / (count * per_body) * 1e6,
            "cpu_ms_per_body": cpu / count * 1e3,
            "bytes_per_body": size,
            "ratio": size / raw_bytes,
            "decompress_us_per_message": unzip / (count * per_body) * 1e6,
        }
    return out


def run(workdir: Path, *, n: int, reps: int, concurrency: dict[str, int],
        latencies: list[float], log: Any = print) -> dict[str, Any]:
    log("  gzip: compression CPU and size")
    out: dict[str, Any] = {"compression": compression(8, reps), "drain": {}}
    with SandboxProcess() as sandbox:
        bench = Bench(workdir, n, sandbox)
        for latency in latencies:
            label = f"{latency * 1000:g}ms"
            conc = concurrency.get(label, concurrency["default"])
            sandbox.configure(latency=latency)
            worker = {"concurrency": conc}
            bench.ours(worker, gzip=True)  # warm-up
            log(f"  gzip: drain @ {label}, off/on interleaved x {reps}")
            off, on = [], []
            for _ in range(reps):
                off.append(bench.ours(worker, gzip=False))
                on.append(bench.ours(worker, gzip=True))
            off_rate = statistics.median(r["rate"] for r in off)
            on_rate = statistics.median(r["rate"] for r in on)
            out["drain"][label] = {
                "worker_settings": worker,
                "off_per_s": {"median": off_rate, "runs": [r["rate"] for r in off]},
                "on_per_s": {"median": on_rate, "runs": [r["rate"] for r in on]},
                "on_over_off": ratio(on_rate, off_rate),
                "bytes_on_wire_off": off[0]["sandbox"]["bytes_received"],
                "bytes_on_wire_on": on[0]["sandbox"]["bytes_received"],
                "client_cpu_s_off": statistics.median(r["client_cpu"] for r in off),
                "client_cpu_s_on": statistics.median(r["client_cpu"] for r in on),
                "sandbox_cpu_s_off": statistics.median(r["sandbox_cpu"] for r in off),
                "sandbox_cpu_s_on": statistics.median(r["sandbox_cpu"] for r in on),
            }
        sandbox.configure(latency=0.0)
    return out
