"""A loopback API stand-in that answers every request after a fixed delay and records, per
person, the order in which messageIds arrived: for benchmarks at a given latency that must
also count per-person order inversions (the nginx sink cannot see order).

Each ``POST /v1/<endpoint>`` body is read (gunzipped when ``Content-Encoding: gzip``),
parsed, and its messages' ``(person, messageId)`` appended under a lock on arrival; the
answer, ``200 {"success":true}``, leaves ``--latency`` seconds later, as a distant API's
round trip would. ``GET /recorder/stats`` returns the arrivals, ``POST /recorder/reset``
forgets them. It runs in its own process, so that its CPU is not the measured client's::

    python -m benchmarks.recorder --latency 0.2      # prints {"url": ..., "pid": ...}

    with Recorder(latency=0.2) as rec:
        ...
        order_report(rec.stats(), index_of)   # inversions, duplicates, missing
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import requests


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], latency: float) -> None:
        self.latency = latency
        self.lock = threading.Lock()
        self.arrivals: dict[str, list[str]] = {}
        self.requests = 0
        self.messages = 0
        super().__init__(address, _Handler)

    def record(self, items: list[dict[str, Any]]) -> None:
        with self.lock:
            self.requests += 1
            self.messages += len(items)
            for item in items:
                person = item.get("userId") or item.get("anonymousId") or \
                    item.get("previousId") or ""
                self.arrivals.setdefault(str(person), []).append(str(item.get("messageId")))

    def reset(self) -> None:
        with self.lock:
            self.arrivals = {}
            self.requests = self.messages = 0


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _reply(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        if self.path == "/recorder/reset":
            self.server.reset()
            self._reply(200, b"{}")
            return
        if not self.path.startswith("/v1/"):
            self._reply(404, b'{"meta":{"error":"not found"}}')
            return
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        doc = json.loads(body)
        self.server.record(doc["batch"] if self.path == "/v1/batch" else [doc])
        time.sleep(self.server.latency)
        self._reply(200, b'{"success":true}')

    def do_GET(self) -> None:
        if self.path != "/recorder/stats":
            self._reply(404, b"{}")
            return
        with self.server.lock:
            body = json.dumps({"requests": self.server.requests,
                               "messages": self.server.messages,
                               "arrivals": self.server.arrivals}).encode()
        self._reply(200, body)


def order_report(stats: Mapping[str, Any], index_of: Mapping[str, int]) -> dict[str, int]:
    """Inversions (a message that arrived after a later message of its person), duplicates
    and missing messages, given each messageId's position in its person's enqueue order."""
    inversions = duplicates = 0
    seen: set[str] = set()
    for ids in stats["arrivals"].values():
        latest = -1
        for message_id in ids:
            if message_id in seen:
                duplicates += 1
                continue
            seen.add(message_id)
            position = index_of[message_id]
            if position < latest:
                inversions += 1
            latest = max(latest, position)
    return {"inversions": inversions, "duplicates": duplicates,
            "missing": len(set(index_of) - seen), "received": stats["messages"]}


class Recorder:
    """The recorder in its own process (``pid`` for CPU accounting), stopped at the end."""

    key = "sk_recorder"

    def __init__(self, latency: float = 0.0) -> None:
        self.latency = latency
        self._proc: subprocess.Popen[str] | None = None
        self.url = ""
        self.pid = 0
        self._session = requests.Session()

    def __enter__(self) -> Recorder:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.recorder", "--latency", str(self.latency)],
            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
            cwd=Path(__file__).resolve().parent.parent)
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError("the recorder did not start")
        info = json.loads(line)
        self.url, self.pid = info["url"], info["pid"]
        return self

    def __exit__(self, *exc: object) -> None:
        self._session.close()
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=10)
            self._proc = None

    def reset(self) -> None:
        self._session.post(self.url + "/recorder/reset", timeout=30).raise_for_status()

    def stats(self) -> dict[str, Any]:
        response = self._session.get(self.url + "/recorder/stats", timeout=120)
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per request")
    args = parser.parse_args(argv)
    server = _Server(("127.0.0.1", 0), args.latency)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print(json.dumps({"url": f"http://127.0.0.1:{server.server_address[1]}",
                      "pid": os.getpid()}), flush=True)
    stop.wait()
    server.shutdown()
    server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
