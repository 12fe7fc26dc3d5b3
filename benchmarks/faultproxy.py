"""A loopback proxy in front of the sandbox that answers a fraction of API requests with 429.

The sandbox's ``rate_limit`` is a token bucket (requests per second), so it cannot answer
"10% of requests" with 429. This proxy does exactly that: each ``POST /v1/*`` is, with
probability ``--rate-429``, answered ``429`` with ``Retry-After: <--retry-after>`` and never
reaches the sandbox; every other request is forwarded unchanged (body, Authorization and
Content-Encoding) and the sandbox's answer relayed. It runs in its own process:

    python -m benchmarks.faultproxy --upstream http://127.0.0.1:PORT --rate-429 0.1

and prints one JSON line ``{"url": ..., "pid": ...}`` once listening.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

_PASS_HEADERS = ("Authorization", "Content-Type", "Content-Encoding", "User-Agent")


class _Proxy(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], upstream: str, rate_429: float,
                 retry_after: str, seed: int | None) -> None:
        parts = urlsplit(upstream)
        self.upstream_host = parts.hostname or "127.0.0.1"
        self.upstream_port = parts.port or 80
        self.rate_429 = rate_429
        self.retry_after = retry_after
        self.rng = random.Random(seed)
        self.rng_lock = threading.Lock()
        self.counts = {"forwarded": 0, "injected_429": 0}
        super().__init__(address, _Handler)

    def inject(self) -> bool:
        with self.rng_lock:
            hit = self.rng.random() < self.rate_429
            self.counts["injected_429" if hit else "forwarded"] += 1
            return hit


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server: _Proxy

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _upstream(self) -> http.client.HTTPConnection:
        conn = getattr(self, "_conn", None)
        if conn is None:
            conn = http.client.HTTPConnection(self.server.upstream_host,
                                              self.server.upstream_port, timeout=120)
            self._conn = conn
        return conn

    def _reply(self, status: int, body: bytes, headers: list[tuple[str, str]]) -> None:
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _forward(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        if self.path == "/proxy/stats":
            self._reply(200, json.dumps(self.server.counts).encode(),
                        [("Content-Type", "application/json")])
            return
        if method == "POST" and self.path.startswith("/v1/") and self.server.inject():
            payload = json.dumps({"meta": {"errors": [{
                "field": "request", "reason": "rate_limited",
                "message": "fault proxy injected a 429"}]}}).encode()
            self._reply(429, payload, [("Content-Type", "application/json"),
                                       ("Retry-After", self.server.retry_after)])
            return
        headers = {k: v for k in _PASS_HEADERS if (v := self.headers.get(k)) is not None}
        conn = self._upstream()
        try:
            conn.request(method, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException):
            conn.close()
            self._conn = None
            self._reply(502, b'{"meta":{"errors":[]}}', [("Content-Type", "application/json")])
            return
        passed = [(k, v) for k, v in resp.getheaders()
                  if k.lower() in ("content-type", "retry-after", "www-authenticate")]
        self._reply(resp.status, data, passed)

    def do_POST(self) -> None:
        self._forward("POST")

    def do_GET(self) -> None:
        self._forward("GET")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--rate-429", type=float, default=0.1)
    parser.add_argument("--retry-after", default="1")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    server = _Proxy(("127.0.0.1", 0), args.upstream, args.rate_429, args.retry_after,
                    args.seed)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    port = server.server_address[1]
    print(json.dumps({"url": f"http://127.0.0.1:{port}", "pid": __import__("os").getpid()}),
          flush=True)
    stop.wait()
    server.shutdown()
    server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
