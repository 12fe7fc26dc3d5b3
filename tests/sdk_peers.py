"""The three real Python SDKs for this protocol, and what they send.

Each SDK (Customer.io's own ``customerio-cdp-analytics``, ``segment-analytics-python`` and
``rudder-sdk-python``) is pointed at a capture server on loopback and made to send identify,
track, page, screen, group and alias with one id, with both ids and with a context. What
it sent is then replayed into an outbox, drained to the sandbox, and counted.

Run as a script for the replay figures: ``python tests/sdk_peers.py``.
"""

from __future__ import annotations

import gzip
import importlib
import json
import sys
import tempfile
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

# name on PyPI -> module whose Client we drive
SDKS: dict[str, str] = {
    "customerio-cdp-analytics": "customerio.analytics",
    "segment-analytics-python": "segment.analytics",
    "rudder-sdk-python": "rudderstack.analytics",
}

CONTEXT: dict[str, Any] = {
    "ip": "203.0.113.7",
    "locale": "en-GB",
    "userAgent": "peer-test/1.0",
    "app": {"name": "shop", "version": "4.2.0", "build": "420"},
    "device": {"type": "web", "manufacturer": "Acme"},
    "campaign": {"source": "newsletter", "medium": "email", "name": "spring"},
    "page": {"url": "https://example.com/pricing", "title": "Pricing"},
    "traits": {"email": "ada@example.com"},
}


def sdk_available(module: str) -> bool:
    try:
        importlib.import_module(module + ".client")
    except ImportError:
        return False
    return True


def make_calls(client: Any) -> int:
    """Every call type with one id, with both ids and with a context; returns calls made."""
    ids: list[dict[str, Any]] = [
        {"user_id": "u-1"},
        {"anonymous_id": "anon-1"},
        {"user_id": "u-2", "anonymous_id": "anon-2"},
        {"user_id": "u-3", "context": CONTEXT},
    ]
    calls = 0
    for who in ids:
        client.identify(traits={"plan": "pro", "createdAt": "2024-05-01T12:00:00Z"}, **who)
        client.track(event="Order Placed", properties={"total": 12.5, "items": 2}, **who)
        client.page(name="Pricing", properties={"url": "https://example.com/pricing"}, **who)
        client.page(**who)  # no name: the SDKs send "name": null
        client.screen(name="Settings", category="Account", **who)
        client.group(group_id="acme", traits={"name": "Acme", "object_type_id": "1"}, **who)
        calls += 6
    client.alias(previous_id="anon-1", user_id="u-1")
    client.alias(previous_id="anon-2", user_id="u-2", context=CONTEXT)
    return calls + 2


class _Capture(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _CaptureServer

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        data = self.rfile.read(length)
        if self.headers.get("Content-Encoding", "") == "gzip":
            data = gzip.decompress(data)
        self.server.bodies.append((self.path, json.loads(data)))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _CaptureServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Capture)
        self.bodies: list[tuple[str, Any]] = []


@contextmanager
def capture_server() -> Iterator[_CaptureServer]:
    server = _CaptureServer()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def url_of(server: ThreadingHTTPServer) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"


def client_for(module: str, host: str, **options: Any) -> Any:
    client_class = importlib.import_module(module + ".client").Client
    return client_class(write_key="peer-key", host=host, **options)


def capture(module: str) -> list[dict[str, Any]]:
    """The messages one SDK sends for :func:`make_calls`, as they crossed the wire."""
    with capture_server() as server:
        client = client_for(module, url_of(server), sync_mode=True, max_retries=0)
        make_calls(client)
        messages: list[dict[str, Any]] = []
        for path, body in server.bodies:
            assert path == "/v1/batch", path
            messages.extend(body["batch"])
    return messages


def replay(messages: list[dict[str, Any]], workdir: Path) -> dict[str, Any]:
    """Enqueue what an SDK sent into a fresh outbox and drain it to the sandbox."""
    from cio_outbox import MessageError, Outbox
    from cio_outbox.sandbox import Sandbox

    refused: Counter[str] = Counter()
    enqueued = 0
    with Outbox(str(workdir / "replay.db")) as outbox:
        for message in messages:
            try:
                outbox.enqueue(message)
            except MessageError as exc:
                refused[str(exc)] += 1
            else:
                enqueued += 1
        with Sandbox() as sandbox:
            result = outbox.drain(host=sandbox.url, key=sandbox.key, progress=False,
                                  timeout=60)
            stats = sandbox.stats()
            failed = [row["error"] for row in outbox.failed()]
    return {
        "sent": len(messages),
        "enqueued": enqueued,
        "refused_at_enqueue": dict(refused),
        "delivered": stats["messages"],
        "dead_lettered": len(failed),
        "dead_letter_reasons": dict(Counter(failed)),
        "drain_failed": result["failed"],
    }


def direct(module: str, extra_calls: Callable[[Any], int] | None = None) -> dict[str, Any]:
    """The SDK sending straight to the sandbox, as configured by default (batching thread,
    its own retries), then flushing: ``flushed`` says whether flush returned within 30 s."""
    from cio_outbox.sandbox import Sandbox

    with Sandbox(key="peer-key") as sandbox:
        client = client_for(module, sandbox.url)
        calls = make_calls(client) + (extra_calls(client) if extra_calls else 0)
        finished = threading.Event()

        def flush() -> None:
            client.flush()
            finished.set()

        threading.Thread(target=flush, daemon=True).start()
        flushed = finished.wait(30)
        if flushed:
            client.shutdown()
        stats = sandbox.stats()
        sandbox_messages = sandbox.messages()
    return {"calls": calls, "flushed": flushed, "stored": stats["messages"],
            "dropped": stats.get("dropped_messages", 0), "by_status": stats["by_status"],
            "stored_fields": sorted({k for m in sandbox_messages for k in m})}


def figures() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, module in SDKS.items():
        if not sdk_available(module):
            out[name] = "not installed"
            continue
        with tempfile.TemporaryDirectory() as tmp:
            out[name] = {**replay(capture(module), Path(tmp)), "direct": direct(module)}
    return out


if __name__ == "__main__":
    json.dump(figures(), sys.stdout, indent=2)
    print()
