"""Helpers shared by the reliability suite: subprocess runs of the CLI, call generators,
bounded waiting, and raw socket servers that misbehave on purpose (loopback only)."""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import sqlite3
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

LOOPBACK = "127.0.0.1"
PAD = "x" * 600  # makes a message ~800 bytes, so a 500 KB request holds ~600 of them

# Errors that must never reach a user of the CLI.
FORBIDDEN_STDERR = ("database is locked", "Traceback (most recent call last)")


def cli_argv(*args: str) -> list[str]:
    """``cio-outbox ARGS`` run with this interpreter."""
    return [sys.executable, "-m", "cio_outbox", *args]


def cli_env(key: str | None = None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CIO_", "PYTEST_", "COV_"))}
    env["PYTHONUNBUFFERED"] = "1"
    if key is not None:
        env["CIO_API_KEY"] = key
    env.update(extra)
    return env


def tracks(n: int, persons: int, *, pad: str = PAD, event: str = "Step") -> Iterator[dict]:
    """Track calls spread over ``persons`` people, each carrying its per-person sequence."""
    seq: dict[str, int] = defaultdict(int)
    for i in range(n):
        person = f"p{i % persons}"
        yield {"type": "track", "userId": person, "event": event,
               "properties": {"seq": seq[person], "i": i, "pad": pad}}
        seq[person] += 1


def check_per_person_order(messages: Sequence[dict[str, Any]]) -> dict[str, int]:
    """Assert each person's ``properties.seq`` (or ``traits.seq``) arrived in increasing
    order without gaps (messages are in arrival order); return how many arrived per person."""
    last: dict[str, int] = {}
    for message in messages:
        person = message.get("userId") or message.get("anonymousId")
        seq = (message.get("properties") or message.get("traits") or {}).get("seq")
        if seq is None:
            continue
        expected = last.get(person, -1) + 1
        assert seq == expected, (
            f"{person}: seq {seq} arrived where {expected} was expected (order broken)")
        last[person] = seq
    return {person: seq + 1 for person, seq in last.items()}


def row_count(path: str | os.PathLike[str]) -> int:
    """Rows in an outbox, read with a separate read-only connection (never blocks writers)."""
    uri = f"file:{os.fspath(path)}?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True, timeout=5)
    except sqlite3.Error:
        return 0
    try:
        return conn.execute("SELECT count(*) FROM messages").fetchone()[0]
    except sqlite3.Error:
        return 0
    finally:
        conn.close()


def wait_until(predicate: Callable[[], bool], *, timeout: float, interval: float = 0.02,
               what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def free_port() -> int:
    """A loopback port with nothing listening on it (just closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def file_bytes(path: str | os.PathLike[str]) -> bytes:
    """The bytes of an SQLite file and its -wal and -shm companions, concatenated."""
    data = b""
    for suffix in ("", "-wal", "-shm", "-journal"):
        candidate = Path(f"{os.fspath(path)}{suffix}")
        if candidate.exists():
            data += candidate.read_bytes()
    return data


def file_state(path: str | os.PathLike[str]) -> dict[str, bytes]:
    """Every file of an SQLite database (main, -wal, -shm, -journal) by suffix, as bytes."""
    state = {}
    for suffix in ("", "-wal", "-shm", "-journal"):
        candidate = Path(f"{os.fspath(path)}{suffix}")
        if candidate.exists():
            state[suffix] = candidate.read_bytes()
    return state


def record(request: Any, tmp_dir: Path, name: str, figures: dict[str, Any]) -> Path:
    """Print figures (shown with pytest -s), add them to the test's user_properties, and
    write them as JSON under the test's tmp dir; returns the JSON file."""
    print(f"\n[{name}] " + json.dumps(figures, sort_keys=True))
    for key, value in figures.items():
        request.node.user_properties.append((key, value))
    out = tmp_dir / f"{name}.json"
    out.write_text(json.dumps(figures, indent=2, sort_keys=True))
    return out


# ---------------------------------------------------------------- fault servers


def _read_http_request(conn: socket.socket, deadline: float) -> bytes:
    """One HTTP/1.1 request (headers and a Content-Length body) off a socket, or b""."""
    data = b""
    while b"\r\n\r\n" not in data:
        conn.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = conn.recv(65536)
        if not chunk:
            return b""
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(body) < length:
        conn.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = conn.recv(65536)
        if not chunk:
            return b""
        body += chunk
    return head + b"\r\n\r\n" + body


def _read_http_response(conn: socket.socket, deadline: float) -> bytes:
    return _read_http_request(conn, deadline)  # same framing: head, Content-Length body


def _reset(conn: socket.socket) -> None:
    """Close with SO_LINGER 0: the peer gets a TCP RST, not a clean FIN."""
    with contextlib.suppress(OSError):
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    with contextlib.suppress(OSError):
        conn.close()


class FaultProxy:
    """A loopback TCP server in front of an upstream HTTP server (the sandbox).

    Its first ``faults`` connections misbehave, the rest are relayed untouched:

    - ``"hang"``: accept, read nothing, answer nothing (the client's read timeout fires);
    - ``"reset"``: read the request, forward it upstream (so the upstream may act on it),
      send back the first half of the upstream's answer, then reset the connection;
    - ``"reset-before"``: read the request, send a partial status line, reset; upstream
      never sees it.

    Every wait is bounded; ``stop()`` closes every socket it holds.
    """

    def __init__(self, upstream: str, mode: str, faults: int) -> None:
        if mode not in ("hang", "reset", "reset-before"):
            raise ValueError(mode)
        host, _, port = upstream.removeprefix("http://").partition(":")
        self.upstream = (host, int(port))
        self.mode = mode
        self.faults_left = faults
        self.faulty_connections = 0
        self.relayed_connections = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind((LOOPBACK, 0))
        self._listener.listen(64)
        self._listener.settimeout(0.1)
        self.url = f"http://{LOOPBACK}:{self._listener.getsockname()[1]}"
        self._accepter = threading.Thread(target=self._accept_loop, daemon=True)

    def __enter__(self) -> FaultProxy:
        self._accepter.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._accepter.join(timeout=5)
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._listener.close()

    def _keep(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._keep(conn)
            with self._lock:
                faulty = self.faults_left > 0
                if faulty:
                    self.faults_left -= 1
                    self.faulty_connections += 1
                else:
                    self.relayed_connections += 1
            target = self._misbehave if faulty else self._relay
            thread = threading.Thread(target=target, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _misbehave(self, conn: socket.socket) -> None:
        deadline = time.monotonic() + 30
        try:
            if self.mode == "hang":
                self._stop.wait(30)  # hold the connection open, say nothing
                return
            request = _read_http_request(conn, deadline)
            if not request:
                return
            if self.mode == "reset-before":
                conn.sendall(b"HTTP/1.1 2")
                _reset(conn)
                return
            with socket.create_connection(self.upstream, timeout=30) as up:
                up.sendall(request)
                answer = _read_http_response(up, deadline)
            conn.sendall(answer[: max(1, len(answer) // 2)])
            _reset(conn)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                conn.close()

    def _relay(self, conn: socket.socket) -> None:
        try:
            up = socket.create_connection(self.upstream, timeout=30)
        except OSError:
            _reset(conn)
            return
        self._keep(up)

        def pipe(src: socket.socket, dst: socket.socket) -> None:
            try:
                src.settimeout(None)
                while True:
                    chunk = src.recv(65536)
                    if not chunk:
                        break
                    dst.sendall(chunk)
            except OSError:
                pass
            finally:
                with contextlib.suppress(OSError):
                    dst.shutdown(socket.SHUT_WR)

        back = threading.Thread(target=pipe, args=(up, conn), daemon=True)
        back.start()
        pipe(conn, up)
        back.join(timeout=60)
        for sock in (conn, up):
            with contextlib.suppress(OSError):
                sock.close()


def seeded_random(request: Any) -> tuple[random.Random, int]:
    """A Random seeded from CIO_TEST_SEED or fresh; the seed is recorded on the test."""
    seed = int(os.environ.get("CIO_TEST_SEED") or random.SystemRandom().randrange(2**32))
    request.node.user_properties.append(("seed", seed))
    print(f"\n[seed] {request.node.name}: CIO_TEST_SEED={seed}")
    return random.Random(seed), seed
