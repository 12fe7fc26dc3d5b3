"""Sandbox throughput: requests/s and messages/s with ~400 KB /v1/batch bodies.

The server runs in a child process (SandboxProcess); this process is the client, sending over
keep-alive with one requests.Session per client thread. Every request carries fresh
messageIds, so the server stores every message (no dedupe shortcut). Also measures, in this
process, the per-message cost of validation (cio_outbox.messages.validate_wire, the rules
enqueue applies) and of the size check, and JSON parsing per body.

On a shared machine wall-clock rates depend on the load, so it also reports the CPU time the
server process spent per request (with psutil, from the dev and bench extras) and the rate
that CPU time alone would allow.

    python benchmarks/sandbox_throughput.py [--seconds 10] [--batch-bytes 400000] [--gzip]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import sys
import threading
import time
from typing import Any

import requests

from cio_outbox.messages import validate_wire
from cio_outbox.sandbox import SandboxProcess, message_size
from cio_outbox.sandbox.validation import SPAN_SURELY_SMALL as _SPAN_SURELY_SMALL
from cio_outbox.sandbox.validation import parse_body as _parse_body

try:
    import psutil
except ImportError:  # optional: only the server CPU figures need it
    psutil = None

PLACEHOLDER = b"RRRRRRRRRR"


def make_template(batch_bytes: int) -> tuple[bytes, int, list[dict[str, Any]]]:
    """A /v1/batch body of small track events whose messageIds contain PLACEHOLDER."""
    items: list[dict[str, Any]] = []
    size = len(b'{"batch":[],"sentAt":"2026-01-01T00:00:00.000Z"}')
    i = 0
    while True:
        msg = {
            "type": "track",
            "userId": f"user-{i % 997}",
            "event": "Item Viewed",
            "properties": {"sku": f"SKU-{i:06d}", "price": 19.99, "qty": 1 + i % 5},
            "timestamp": "2026-01-01T00:00:00.000Z",
            "messageId": f"{PLACEHOLDER.decode()}-{i:06d}",
        }
        extra = len(json.dumps(msg, separators=(",", ":")).encode()) + 1
        if size + extra > batch_bytes:
            break
        items.append(msg)
        size += extra
        i += 1
    body = {"batch": items, "sentAt": "2026-01-01T00:00:00.000Z"}
    template = json.dumps(body, separators=(",", ":")).encode()
    return template, len(items), items


def client_loop(url: str, key: str, template: bytes, use_gzip: bool, deadline: float,
                counter: dict[str, Any], lock: threading.Lock, first: int, step: int) -> None:
    headers = {"Content-Type": "application/json"}
    if use_gzip:
        headers["Content-Encoding"] = "gzip"
    n = first
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    with requests.Session() as session:
        session.auth = (key, "")
        while time.monotonic() < deadline:
            body = template.replace(PLACEHOLDER, b"%010d" % n)
            if use_gzip:
                body = gzip.compress(body, compresslevel=1)
            started = time.perf_counter()
            resp = session.post(f"{url}/v1/batch", data=body, headers=headers, timeout=60)
            latencies.append(time.perf_counter() - started)
            statuses[resp.status_code] = statuses.get(resp.status_code, 0) + 1
            n += step
    with lock:
        counter["latencies"].extend(latencies)
        for code, count in statuses.items():
            counter["statuses"][code] = counter["statuses"].get(code, 0) + count


def measure_http(args: argparse.Namespace, template: bytes, per_request: int) -> dict[str, Any]:
    with SandboxProcess() as sandbox:
        # Warm up: connection setup, spec compilation in the child.
        warm = template.replace(PLACEHOLDER, b"w" * len(PLACEHOLDER))
        requests.post(f"{sandbox.url}/v1/batch", data=warm, auth=(sandbox.key, ""), timeout=60)
        sandbox.reset()
        server = psutil.Process(sandbox.pid) if psutil is not None else None
        cpu_before = sum(server.cpu_times()[:2]) if server is not None else 0.0

        counter: dict[str, Any] = {"latencies": [], "statuses": {}}
        lock = threading.Lock()
        started = time.monotonic()
        deadline = started + args.seconds
        threads = [
            threading.Thread(target=client_loop, args=(
                sandbox.url, sandbox.key, template, args.gzip, deadline, counter, lock, i,
                args.clients))
            for i in range(args.clients)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - started
        server_cpu = sum(server.cpu_times()[:2]) - cpu_before if server is not None else None
        stats = sandbox.stats()
    done = len(counter["latencies"])
    ok = counter["statuses"].get(200, 0)
    if ok != done or stats["messages"] != ok * per_request:
        raise SystemExit(f"unexpected results: statuses={counter['statuses']} "
                         f"stored={stats['messages']} expected={ok * per_request}")
    server_validation = stats["validation_seconds"] / max(1, stats["validated_messages"])
    return {
        "requests": done,
        "seconds": elapsed,
        "requests_per_s": done / elapsed,
        "messages_per_s": done * per_request / elapsed,
        "mb_per_s": done * len(template) / elapsed / 1e6,
        "latency_ms_median": statistics.median(counter["latencies"]) * 1e3,
        "server_validation_us_per_message": server_validation * 1e6,
        "validator": stats["validator"],
        "server_cpu_ms_per_request": server_cpu / done * 1e3 if server_cpu else None,
        "server_cpu_bound_requests_per_s": done / server_cpu if server_cpu else None,
        "server_cpu_bound_messages_per_s": done * per_request / server_cpu if server_cpu else None,
        "load_average": os.getloadavg(),
    }


def measure_in_process(template: bytes, items: list[dict[str, Any]],
                       rounds: int = 5) -> dict[str, Any]:
    source = "cio_outbox.messages"
    messages = json.loads(template)["batch"]
    validate_wire(messages[0])  # compile / warm any lazy schema
    text = template.decode()
    best_check = best_size = best_parse = best_spans = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        for msg in messages:
            validate_wire(msg)
        best_check = min(best_check, time.perf_counter() - started)
        started = time.perf_counter()
        for msg in messages:
            message_size(msg)
        best_size = min(best_size, time.perf_counter() - started)
        started = time.perf_counter()
        json.loads(text)
        best_parse = min(best_parse, time.perf_counter() - started)
        started = time.perf_counter()
        _, spans = _parse_body(text)
        best_spans = min(best_spans, time.perf_counter() - started)
    n = len(messages)
    assert spans is not None
    measured = sum(1 for start, end in spans if end - start > _SPAN_SURELY_SMALL)
    return {
        "validator": source,
        "validation_us_per_message": best_check / n * 1e6,
        "size_check_us_per_message": best_size / n * 1e6,
        "json_parse_ms_per_body": best_parse * 1e3,
        "json_parse_us_per_message": best_parse / n * 1e6,
        "parse_with_spans_ms_per_body": best_spans * 1e3,
        "messages_measured_exactly": measured,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--batch-bytes", type=int, default=400_000)
    parser.add_argument("--clients", type=int, default=1, help="client threads, one Session each")
    parser.add_argument("--gzip", action="store_true", help="send gzip bodies")
    parser.add_argument("--json", action="store_true", help="print one JSON object only")
    args = parser.parse_args(argv)

    template, per_request, items = make_template(args.batch_bytes)
    local = measure_in_process(template, items)
    http = measure_http(args, template, per_request)
    result = {"body_bytes": len(template), "messages_per_request": per_request,
              "clients": args.clients, "gzip": args.gzip, "http": http, "in_process": local}
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"body: {len(template)} bytes, {per_request} track messages per request, "
          f"{args.clients} client(s), gzip={args.gzip}, server in a child process")
    print(f"requests/s:  {http['requests_per_s']:.1f}  ({http['requests']} in "
          f"{http['seconds']:.1f} s, median latency {http['latency_ms_median']:.1f} ms)")
    print(f"messages/s:  {http['messages_per_s']:.0f}  ({http['mb_per_s']:.1f} MB/s of JSON)")
    print(f"validation:  {local['validation_us_per_message']:.2f} us/message in process "
          f"({local['validator']}); {http['server_validation_us_per_message']:.2f} us/message "
          f"in the server incl. size check")
    if http["server_cpu_ms_per_request"] is not None:
        print(f"server CPU:  {http['server_cpu_ms_per_request']:.1f} ms/request, so at most "
              f"{http['server_cpu_bound_requests_per_s']:.1f} requests/s, "
              f"{http['server_cpu_bound_messages_per_s']:.0f} messages/s on one core")
    print(f"size check:  {local['size_check_us_per_message']:.2f} us/message when measured "
          f"exactly; {local['messages_measured_exactly']} of {per_request} needed it "
          f"(items under {_SPAN_SURELY_SMALL} chars cannot exceed the limit)")
    print(f"JSON parse:  {local['json_parse_ms_per_body']:.2f} ms/body with json.loads, "
          f"{local['parse_with_spans_ms_per_body']:.2f} ms with item spans")
    load = http["load_average"]
    print(f"load average during the run: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
          f"on {os.cpu_count()} CPUs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
