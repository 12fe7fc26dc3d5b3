"""A hostile Pipelines API for tests: real HTTP on loopback that misbehaves as real servers do.

Unlike the sandbox, which follows the rules, this server is told, request by request, how to
behave (an :class:`Answer`): answer late (after the client's read timeout, after the lease),
ingest a batch and then answer late or not at all, answer 400 with Customer.io's documented
body ``{"meta": {"error": "..."}}`` that names no item, echo the credentials it received in
its error bodies, close the connection after reading the body, send a long ``Retry-After``.

It records every message it ingested, in arrival order (:attr:`HostileServer.arrivals`), so
that tests count duplicates, lost rows and per-person order inversions.

    with HostileServer(lambda request: Answer(delay=4.0)) as server:
        ...  # point a worker at server.url
        server.duplicates(), server.inversions()
"""

from __future__ import annotations

import contextlib
import gzip
import json
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

LOOPBACK = "127.0.0.1"
#: The longest any answer waits, so that a test that forgets a hold never hangs.
MAX_WAIT = 60.0


@dataclass
class Answer:
    """How to answer one request."""

    status: int = 200
    delay: float = 0.0  # seconds between reading the body and answering
    ingest: bool | None = None  # store its messages; default: only for 2xx
    error: str | None = None  # the documented 400/401/5xx body's meta.error text
    body: bytes | None = None  # a raw body instead of the documented one
    retry_after: str | None = None
    reason: str | None = None  # the status line's reason phrase
    echo: bool = False  # append the Authorization header received to the error text
    close: bool = False  # close the connection after reading the body, answer nothing
    hold: threading.Event | None = None  # wait for this before answering (bounded)


@dataclass
class Request:
    """One request as the server read it."""

    number: int
    endpoint: str
    authorization: str
    messages: list[dict[str, Any]]
    received_at: float
    answer: Answer | None = None


@dataclass
class Arrival:
    """One ingested message."""

    order: int
    request: int
    message_id: str
    person: str
    seq: Any
    message: dict[str, Any] = field(repr=False)


Policy = Callable[[Request], Answer]


def _person(message: dict[str, Any]) -> str:
    return str(message.get("userId") or message.get("anonymousId") or "")


def _seq(message: dict[str, Any]) -> Any:
    for key in ("properties", "traits"):
        value = message.get(key)
        if isinstance(value, dict) and "seq" in value:
            return value["seq"]
    return None


class HostileServer:
    """The server. ``policy`` decides each :class:`Answer`; :meth:`script` queues answers for
    the next requests before the policy applies again."""

    def __init__(self, policy: Policy | None = None) -> None:
        self.policy: Policy = policy or (lambda request: Answer())
        self.requests: list[Request] = []
        self.arrivals: list[Arrival] = []
        self._scripted: list[Answer] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server = _Server((LOOPBACK, 0), self)
        self.url = f"http://{LOOPBACK}:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> HostileServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._server.shutdown()
        self._server.close_connections()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> HostileServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- behaviour -------------------------------------------------------------------

    def script(self, *answers: Answer) -> None:
        with self._lock:
            self._scripted.extend(answers)

    def _decide(self, request: Request) -> Answer:
        with self._lock:
            if self._scripted:
                return self._scripted.pop(0)
        return self.policy(request)

    def _ingest(self, request: Request) -> None:
        with self._lock:
            for message in request.messages:
                self.arrivals.append(Arrival(
                    order=len(self.arrivals), request=request.number,
                    message_id=str(message.get("messageId")), person=_person(message),
                    seq=_seq(message), message=message))

    # -- figures ---------------------------------------------------------------------

    def message_ids(self) -> list[str]:
        with self._lock:
            return [a.message_id for a in self.arrivals]

    def duplicates(self) -> int:
        """Ingested messages whose messageId had been ingested before."""
        ids = self.message_ids()
        return len(ids) - len(set(ids))

    def lost(self, expected: Iterable[str]) -> int:
        """Expected messageIds that never arrived."""
        return len(set(expected) - set(self.message_ids()))

    def inversions(self) -> int:
        """Arrivals (duplicates included) whose ``seq`` is lower than one of the same person
        that arrived before: the API saw that person's messages out of order."""
        highest: dict[str, Any] = {}
        count = 0
        with self._lock:
            arrivals = list(self.arrivals)
        for arrival in arrivals:
            if arrival.seq is None:
                continue
            top = highest.get(arrival.person)
            if top is not None and arrival.seq < top:
                count += 1
            else:
                highest[arrival.person] = arrival.seq
        return count

    def order_of(self, person: str) -> list[Any]:
        with self._lock:
            return [a.seq for a in self.arrivals if a.person == person]

    def figures(self, expected: Iterable[str]) -> dict[str, int]:
        expected = list(expected)
        return {"requests": len(self.requests), "arrivals": len(self.arrivals),
                "duplicates": self.duplicates(), "lost": self.lost(expected),
                "inversions": self.inversions()}

    def wait_for_requests(self, n: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.requests) < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"the hostile server saw {len(self.requests)} of {n} "
                                     f"requests in {timeout:.0f} s")
            time.sleep(0.01)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], hostile: HostileServer) -> None:
        self.hostile = hostile
        self._connections: set[socket.socket] = set()
        self._conn_lock = threading.Lock()
        super().__init__(address, _Handler)

    def track(self, conn: socket.socket, alive: bool) -> None:
        with self._conn_lock:
            (self._connections.add if alive else self._connections.discard)(conn)

    def close_connections(self) -> None:
        with self._conn_lock:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that gave up on us is the point of this server


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection, True)

    def finish(self) -> None:
        self.server.track(self.connection, False)
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        hostile = self.server.hostile
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.headers.get("Content-Encoding") == "gzip":
            raw = gzip.decompress(raw)
        try:
            data = json.loads(raw or b"{}")
        except ValueError:
            data = {}
        endpoint = self.path.rsplit("/", 1)[-1]
        if endpoint == "batch":
            messages = [m for m in data.get("batch", []) if isinstance(m, dict)]
        else:
            messages = [data] if isinstance(data, dict) else []
            for message in messages:
                message.setdefault("type", endpoint)
        with hostile._lock:
            request = Request(number=len(hostile.requests), endpoint=endpoint,
                              authorization=self.headers.get("Authorization", ""),
                              messages=messages, received_at=time.monotonic())
            hostile.requests.append(request)
        answer = hostile._decide(request)
        request.answer = answer
        ingest = answer.ingest if answer.ingest is not None else 200 <= answer.status < 300
        if ingest:
            hostile._ingest(request)
        if answer.close:
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        if answer.hold is not None:
            answer.hold.wait(MAX_WAIT)
        if answer.delay:
            hostile._stopping.wait(min(answer.delay, MAX_WAIT))
        self._answer(answer, request)

    def _answer(self, answer: Answer, request: Request) -> None:
        if answer.body is not None:
            body = answer.body
        elif 200 <= answer.status < 300:
            body = b"{}"
        else:
            text = answer.error or {400: "invalid request", 401: "unauthorized",
                                    429: "too many requests"}.get(answer.status,
                                                                  "internal error")
            if answer.echo:
                text += f": key not recognised: {request.authorization}"
            body = json.dumps({"meta": {"error": text}}).encode()
        try:
            self.send_response(answer.status, answer.reason)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            if answer.retry_after is not None:
                self.send_header("Retry-After", answer.retry_after)
            self.end_headers()
            self.wfile.write(body)
            self.wfile.flush()
        except OSError:
            self.close_connection = True
