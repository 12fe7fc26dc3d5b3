"""The sandbox's HTTP server, its Python handles (:class:`Sandbox` in a thread,
:class:`SandboxProcess` in a child process) and the ``cio-outbox sandbox`` command."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

import click

from cio_outbox.config import is_loopback
from cio_outbox.sandbox.faults import config_from
from cio_outbox.sandbox.state import (
    RAW_BODY_CAP,
    Body,
    Response,
    State,
    errors_response,
    json_response,
)
from cio_outbox.sandbox.validation import HttpError, error

if TYPE_CHECKING:
    import requests

logger = logging.getLogger("cio_outbox.sandbox")

DEFAULT_KEY = "sandbox-key"
_STRICT_VALUES = frozenset({"1", "true", "True"})


class _Server(ThreadingHTTPServer):
    daemon_threads = False  # joined by server_close(): a stop leaves no thread behind
    block_on_close = True
    request_queue_size = 128
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], state: State) -> None:
        self.state = state
        self._connections: set[socket.socket] = set()
        self._conn_lock = threading.Lock()
        self._closing = False
        super().__init__(address, _Handler)

    def track(self, conn: socket.socket) -> None:
        with self._conn_lock:
            if not self._closing:
                self._connections.add(conn)
                return
        _shutdown_socket(conn)

    def untrack(self, conn: socket.socket) -> None:
        with self._conn_lock:
            self._connections.discard(conn)

    def close_connections(self) -> None:
        """Wake handler threads blocked on idle keep-alive connections so they can end."""
        with self._conn_lock:
            self._closing = True
            conns = list(self._connections)
        for conn in conns:
            _shutdown_socket(conn)

    def handleerror(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):
            logger.debug("sandbox connection error from %s: %r", client_address, exc)
            return
        logger.exception("sandbox error handling a request from %s", client_address)


class _Server6(_Server):
    address_family = socket.AF_INET6


def _shutdown_socket(conn: socket.socket) -> None:
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "cio-outbox-sandbox"
    disable_nagle_algorithm = True
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.untrack(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("sandbox %s: %s", self.address_string(), format % args)

    # -- reading and writing --

    def _read_body(self) -> Body:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked()
        length_header = self.headers.get("Content-Length")
        if length_header is None:
            return Body(b"", 0, True)
        try:
            length = int(length_header)
            if length < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            raise HttpError(400, [error(
                "Content-Length", "invalid", "Content-Length is not a valid length")]) from None
        if length > RAW_BODY_CAP:
            self.close_connection = True
            return Body(b"", length, False)
        data = self.rfile.read(length)
        if len(data) < length:
            raise ConnectionError("client closed the connection mid-body")
        return Body(data, length, True)

    def _read_chunked(self) -> Body:
        chunks: list[bytes] = []
        total = 0
        while True:
            line = self.rfile.readline(65537)
            if not line:
                raise ConnectionError("client closed the connection mid-body")
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                self.close_connection = True
                raise HttpError(400, [error(
                    "body", "invalid_chunking", "malformed chunked body")]) from None
            if size == 0:
                while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                    pass
                return Body(b"".join(chunks), total, True)
            total += size
            if total > RAW_BODY_CAP:
                self.close_connection = True
                return Body(b"", -1, False)
            chunk = self.rfile.read(size)
            if len(chunk) < size:
                raise ConnectionError("client closed the connection mid-body")
            chunks.append(chunk)
            self.rfile.readline(65537)

    def _send(self, response: Response) -> None:
        status = response.status
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = ""
        head = [
            f"HTTP/1.1 {status} {phrase}",
            "Content-Type: application/json",
            f"Content-Length: {len(response.body)}",
        ]
        head.extend(f"{name}: {value}" for name, value in response.headers)
        if self.close_connection:
            head.append("Connection: close")
        self.wfile.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + response.body)
        self.log_request(status, len(response.body))

    # -- routes --

    def do_POST(self) -> None:
        path, _, query = self.path.partition("?")
        try:
            body = self._read_body()
        except HttpError as exc:
            self._send(errors_response(exc, self.server.state.config.named_errors))
            return
        except ConnectionError:
            self.close_connection = True
            return
        if path.startswith("/v1/"):
            state = self.server.state
            latency = state.config.latency
            if latency > 0:
                time.sleep(latency)
            self._send(state.handle(
                path[len("/v1/"):], body,
                self.headers.get("Authorization"), self.headers.get("Content-Encoding"),
                strict=self.headers.get("X-Strict-Mode", "").strip() in _STRICT_VALUES,
            ))
        elif path.startswith("/sandbox/"):
            self._send(self._inspect("POST", path[len("/sandbox/"):], query, body))
        else:
            self._send(_not_found(path))

    def do_GET(self) -> None:
        path, _, query = self.path.partition("?")
        if path.startswith("/sandbox/"):
            self._send(self._inspect("GET", path[len("/sandbox/"):], query, None))
        elif path.startswith("/v1/"):
            self._send(errors_response(HttpError(405, [error(
                "method", "not_allowed", "the API accepts POST only")], [("Allow", "POST")]),
                self.server.state.config.named_errors))
        else:
            self._send(_not_found(path))

    def _inspect(self, method: str, name: str, query: str, body: Body | None) -> Response:
        if not is_loopback(self.client_address[0]):
            return json_response(403, {"meta": {"errors": [error(
                "client", "forbidden", "the /sandbox endpoints answer loopback clients only")]}})
        state = self.server.state
        try:
            if method == "GET" and name == "messages":
                params = dict(parse_qsl(query, keep_blank_values=True))
                return json_response(200, {"messages": state.query(params)})
            if method == "GET" and name == "stats":
                return json_response(200, state.stats())
            if method == "GET" and name in ("config", "health"):
                return json_response(200, state.config.public())
            if method == "POST" and name == "reset":
                state.reset()
                return json_response(200, {})
            if method == "POST" and name == "config":
                assert body is not None
                if not body.complete:
                    raise ValueError("config body too large")
                changes = json.loads(body.data or b"{}")
                if not isinstance(changes, dict):
                    raise ValueError("config must be a JSON object")
                return json_response(200, state.configure(changes))
        except ValueError as exc:
            return json_response(400, {"meta": {"errors": [error(
                name, "invalid", str(exc))]}})
        return _not_found(f"/sandbox/{name}")


def _not_found(path: str) -> Response:
    return json_response(404, {"meta": {"errors": [error(
        "path", "not_found", f"no such path: {path[:200]}")]}})


def _url(host: str, port: int) -> str:
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


# ---------------------------------------------------------------- Python API


class Sandbox:
    """The sandbox server running in a background thread of this process.

    ``with Sandbox() as sb:`` starts it on a free port of 127.0.0.1; clients send to
    ``sb.url + "/v1/<endpoint>"`` with ``sb.key``.
    """

    def __init__(
        self,
        key: str = DEFAULT_KEY,
        host: str = "127.0.0.1",
        port: int = 0,
        fail_rate: float = 0.0,
        rate_limit: float | None = None,
        latency: float = 0.0,
        reject_events: Iterable[str] = (),
        seed: int | None = None,
        throttle_rate: float = 0.0,
        named_errors: bool = False,
    ) -> None:
        reject_events = list(reject_events)
        self._state = State(key, config_from(fail_rate, rate_limit, latency, reject_events,
                                             throttle_rate, named_errors), seed)
        self._key = key
        self._host = host
        self._port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle --

    def start(self) -> Sandbox:
        if self._server is not None:
            raise RuntimeError("sandbox already running")
        cls = _Server6 if ":" in self._host else _Server
        server = cls((self._host, self._port), self._state)
        self._server = server
        self._port = server.server_address[1]
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05},
            name=f"cio-outbox-sandbox:{self._port}", daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None:
            return
        self._server = self._thread = None
        server.shutdown()
        server.close_connections()
        server.server_close()
        if thread is not None:
            thread.join()

    def __enter__(self) -> Sandbox:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("sandbox is not running")
        return _url(self._host, self._port)

    @property
    def key(self) -> str:
        return self._key

    def __repr__(self) -> str:
        where = _url(self._host, self._port) if self._server is not None else "stopped"
        cfg = self._state.config
        return (f"Sandbox({where}, fail_rate={cfg.fail_rate:g}, "
                f"throttle_rate={cfg.throttle_rate:g}, rate_limit={cfg.rate_limit}, "
                f"latency={cfg.latency:g}, reject_events={sorted(cfg.reject_events)})")

    # -- inspection --

    def messages(self, **filters: Any) -> list[dict[str, Any]]:
        """Stored messages in arrival order; filters as for ``GET /sandbox/messages``:
        ``userId``, ``anonymousId``, ``event``, ``type``, ``messageId``, ``endpoint``,
        ``limit``, ``after`` (a sequence number)."""
        return self._state.query(filters)

    def stats(self) -> dict[str, Any]:
        return self._state.stats()

    def reset(self) -> None:
        """Clear stored messages and stats (the config stays)."""
        self._state.reset()

    def configure(self, **changes: Any) -> dict[str, Any]:
        """Change ``fail_rate``, ``throttle_rate``, ``rate_limit``, ``latency``,
        ``reject_events``, ``named_errors`` or ``seed``;
        returns the new config. Raises ValueError for an unknown field or a bad value."""
        return self._state.configure(changes)


class SandboxProcess:
    """The sandbox server running in a child process (``python -m cio_outbox sandbox``).

    Same inspection methods as :class:`Sandbox`, over HTTP. The key reaches the child through
    the ``CIO_SANDBOX_KEY`` environment variable, never its command line.
    """

    def __init__(
        self,
        key: str = DEFAULT_KEY,
        host: str = "127.0.0.1",
        port: int = 0,
        fail_rate: float = 0.0,
        rate_limit: float | None = None,
        latency: float = 0.0,
        reject_events: Iterable[str] = (),
        seed: int | None = None,
        throttle_rate: float = 0.0,
        named_errors: bool = False,
        *,
        startup_timeout: float = 30.0,
        python: str = sys.executable,
    ) -> None:
        reject_events = list(reject_events)
        config_from(fail_rate, rate_limit, latency, reject_events, throttle_rate,
                    named_errors)  # validate
        self._key = key
        self._argv = [python, "-m", "cio_outbox", "sandbox", "--host", host,
                      "--port", str(port), "--fail-rate", repr(float(fail_rate)),
                      "--latency", repr(float(latency))]
        if rate_limit is not None:
            self._argv += ["--rate-limit", repr(float(rate_limit))]
        for name in reject_events:
            self._argv += ["--reject-event", name]
        if seed is not None:
            self._argv += ["--seed", str(seed)]
        if throttle_rate:
            self._argv += ["--throttle-rate", repr(float(throttle_rate))]
        if named_errors:
            self._argv.append("--named-errors")
        self._startup_timeout = startup_timeout
        self._process: subprocess.Popen[bytes] | None = None
        self._url: str | None = None
        self._session: requests.Session | None = None

    def start(self) -> SandboxProcess:
        if self._process is not None:
            raise RuntimeError("sandbox process already running")
        import requests

        env = dict(os.environ, CIO_SANDBOX_KEY=self._key)
        proc = subprocess.Popen(self._argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                env=env, bufsize=0)
        self._process = proc
        try:
            line = _read_line(proc, self._startup_timeout)
            self._url = json.loads(line)["url"]
        except BaseException:
            self.stop()
            raise
        self._session = requests.Session()
        return self

    def stop(self) -> None:
        """Terminate the child (SIGTERM, then SIGKILL after 10 s) and wait for it."""
        proc = self._process
        if self._session is not None:
            self._session.close()
            self._session = None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()

    def kill(self) -> None:
        """SIGKILL the child (a crash), then clean up as :meth:`stop`."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
        self.stop()

    def __enter__(self) -> SandboxProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def url(self) -> str:
        if self._url is None:
            raise RuntimeError("sandbox process is not running")
        return self._url

    @property
    def key(self) -> str:
        return self._key

    @property
    def process(self) -> subprocess.Popen[bytes]:
        if self._process is None:
            raise RuntimeError("sandbox process was not started")
        return self._process

    @property
    def pid(self) -> int:
        return self.process.pid

    def __repr__(self) -> str:
        pid = self._process.pid if self._process is not None else None
        return f"SandboxProcess(url={self._url}, pid={pid})"

    def _call(self, method: str, name: str, **kwargs: Any) -> Any:
        if self._session is None:
            raise RuntimeError("sandbox process is not running")
        resp = self._session.request(method, f"{self.url}/sandbox/{name}", timeout=30, **kwargs)
        if resp.status_code == 400:
            meta = resp.json()["meta"]
            raise ValueError(meta["error"] if "error" in meta
                             else "; ".join(e["message"] for e in meta["errors"]))
        resp.raise_for_status()
        return resp.json()

    def messages(self, **filters: Any) -> list[dict[str, Any]]:
        params = {k: str(v) for k, v in filters.items() if v is not None}
        return self._call("GET", "messages", params=params)["messages"]

    def stats(self) -> dict[str, Any]:
        return self._call("GET", "stats")

    def reset(self) -> None:
        self._call("POST", "reset")

    def configure(self, **changes: Any) -> dict[str, Any]:
        return self._call("POST", "config", json=changes)


def _read_line(proc: subprocess.Popen[bytes], timeout: float) -> str:
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buf = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"sandbox process did not start within {timeout} s")
            if not sel.select(left):
                continue
            chunk = os.read(fd, 4096)
            if not chunk:
                raise RuntimeError(
                    f"sandbox process exited before listening (exit code {proc.wait()})")
            buf += chunk
    return buf.split(b"\n", 1)[0].decode()


# ---------------------------------------------------------------- CLI


@click.command("sandbox")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=0, show_default=True,
              help="Port to listen on; 0 picks a free one.")
@click.option("--key", envvar="CIO_SANDBOX_KEY", default=DEFAULT_KEY, show_default=False,
              help="API key clients must send (env CIO_SANDBOX_KEY; default 'sandbox-key').")
@click.option("--fail-rate", type=click.FloatRange(0.0, 1.0), default=0.0, show_default=True,
              help="Probability of answering a request with an injected 500/502/503.")
@click.option("--rate-limit", type=click.FloatRange(0.0, min_open=True), default=None,
              help="Requests per second before answering 429 (token bucket).")
@click.option("--latency", type=click.FloatRange(0.0), default=0.0, show_default=True,
              help="Seconds to delay every API request.")
@click.option("--reject-event", "reject_events", multiple=True,
              help="Answer 400 to any call carrying a track with this event (repeatable).")
@click.option("--seed", type=int, default=None, help="Seed for the failure injection RNG.")
@click.option("--throttle-rate", type=click.FloatRange(0.0, 1.0), default=0.0,
              show_default=True,
              help="Probability of answering a request with an injected 429 (Retry-After: 1).")
@click.option("--named-errors", is_flag=True, default=False,
              help="Name each bad item in a 400 answer (meta.errors with batch[N] fields) "
                   "instead of the documented one-sentence meta.error.")
def sandbox_command(
    host: str,
    port: int,
    key: str,
    fail_rate: float,
    rate_limit: float | None,
    latency: float,
    reject_events: tuple[str, ...],
    seed: int | None,
    throttle_rate: float,
    named_errors: bool,
) -> None:
    """Run a local stand-in for the Customer.io Data Pipelines API until SIGINT/SIGTERM.

    Prints one JSON line {"url": ..., "pid": ..., "key": ...} once listening; "key" says
    which API key clients must send (a custom key is named, never shown).
    """
    stopping: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.append(signum)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    with Sandbox(key=key, host=host, port=port, fail_rate=fail_rate, rate_limit=rate_limit,
                 latency=latency, reject_events=reject_events, seed=seed,
                 throttle_rate=throttle_rate, named_errors=named_errors) as sandbox:
        click.echo(json.dumps({"url": sandbox.url, "pid": os.getpid(), "key": (
            f"export CIO_API_KEY={DEFAULT_KEY}" if key == DEFAULT_KEY else
            "the value of CIO_SANDBOX_KEY / --key (not shown)")}))
        sys.stdout.flush()
        while not stopping:
            time.sleep(0.1)
