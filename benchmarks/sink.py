"""A zero-cost HTTP server for drain benchmarks: nginx on loopback, answering 200 to every POST.

The sandbox validates and stores every message, so on a 2-core machine it takes CPU from
the worker it measures. This sink does nothing per message: nginx (from Debian's packages,
``apt-get install nginx-light``) reads each request body off the socket in C and answers
``200`` with a small JSON body to ``POST /v1/batch`` and ``POST /v1/alias`` (and any other
``/v1/`` endpoint); gzip bodies are accepted as they are (nginx never decompresses them).
It runs in a temporary prefix with its own configuration, as one process (``master_process
off``, so no privilege drop is needed when run as root), and stops when the context ends::

    with Sink() as sink:
        worker = outbox.worker(key="sk_bench", host=sink.url)
        ...
        sink.stats()     # {"requests": ..., "statuses": {...}, "endpoints": {...}}

    python -m benchmarks.sink        # start one, print its URL, stop on Ctrl-C

The sink cannot count messages or their order; benchmarks that need that use
``benchmarks.recorder`` instead.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

#: Said whenever nginx is not there, so that nobody has to guess what to install.
INSTALL_HINT = (
    "the zero-cost sink needs nginx, which is not installed (looked for `nginx` on PATH "
    "and in /usr/sbin). On Debian or Ubuntu install it with:\n"
    "    sudo apt-get update && sudo apt-get install -y nginx-light\n"
    "(any nginx 1.18 or newer works; set CIO_BENCH_NGINX=/path/to/nginx to use another)"
)

#: Where nginx is looked for when it is not on PATH (Debian puts it in /usr/sbin).
SEARCH_PATHS = ("/usr/sbin/nginx", "/usr/local/sbin/nginx")

#: What every POST to /v1/ gets: the shape of a Customer.io success.
RESPONSE_BODY = '{"success":true}'

_CONFIG = """\
daemon off;
master_process off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    log_format sink '$request_method $uri $status';
    access_log {access_log};
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    # A 500 KB batch stays in memory: no temporary file per request.
    client_max_body_size 16m;
    client_body_buffer_size 1m;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    server {{
        listen 127.0.0.1:{port};
        default_type application/json;
        location /v1/ {{
            if ($request_method != POST) {{ return 405; }}
            # `return` reads the request body off the connection and drops it (it must,
            # to keep the connection alive): the cost of receiving, nothing more.
            return 200 '{body}';
        }}
        location = /health {{ return 200 'ok'; }}
        location / {{ return 404; }}
    }}
}}
"""


class NginxMissing(RuntimeError):
    """nginx is not installed; the message says how to install it."""


def find_nginx() -> str:
    """The nginx executable, or :class:`NginxMissing` with the install command."""
    override = os.environ.get("CIO_BENCH_NGINX")
    if override:
        if not os.access(override, os.X_OK):
            raise NginxMissing(f"CIO_BENCH_NGINX={override} is not an executable file")
        return override
    found = shutil.which("nginx") or next(
        (p for p in SEARCH_PATHS if os.access(p, os.X_OK)), None)
    if found is None:
        raise NginxMissing(INSTALL_HINT)
    return found


def available() -> str | None:
    """None when the sink can run here, else the reason (for a test's skip message)."""
    try:
        find_nginx()
    except NginxMissing as exc:
        return str(exc)
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Sink:
    """nginx on loopback in a temporary prefix; ``url`` is the base URL for ``--host``.

    ``log_requests=False`` turns the access log off (then :meth:`stats` knows nothing);
    with it on, nginx writes one short line per request, a few microseconds each.
    """

    key = "sk_zero_cost_sink"  # nginx ignores credentials; the client needs some key

    def __init__(self, *, log_requests: bool = True, start_timeout: float = 10.0) -> None:
        self.binary = find_nginx()
        self.log_requests = log_requests
        self.start_timeout = start_timeout
        self.prefix: Path | None = None
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._offset = 0  # where the requests counted by stats() begin in the access log

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError("the sink is not running")
        return self._proc.pid

    @property
    def access_log(self) -> Path:
        assert self.prefix is not None
        return self.prefix / "access.log"

    def start(self) -> Sink:
        self.prefix = Path(tempfile.mkdtemp(prefix="cio-sink-"))
        for attempt in range(5):  # the free port may be taken between probe and bind
            self.port = _free_port()
            conf = self.prefix / "nginx.conf"
            conf.write_text(_CONFIG.format(
                prefix=self.prefix, port=self.port, body=RESPONSE_BODY,
                access_log=f"{self.access_log} sink" if self.log_requests else "off"))
            self.access_log.touch()
            self._offset = 0
            self._proc = subprocess.Popen(
                [self.binary, "-p", str(self.prefix), "-c", str(conf),
                 "-e", str(self.prefix / "error.log")],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE)
            if self._wait_ready():
                return self
            err = self._stop_proc()
            if "Address already in use" not in err or attempt == 4:
                self._cleanup()
                raise RuntimeError(f"nginx did not start: {err.strip()[-2000:]}")
        raise AssertionError("unreachable")

    def _wait_ready(self) -> bool:
        assert self._proc is not None
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return True
            except OSError:
                time.sleep(0.02)
        return False

    def _stop_proc(self) -> str:
        """Stop nginx (SIGQUIT: finish requests, then exit); return what it printed."""
        proc, self._proc = self._proc, None
        if proc is None:
            return ""
        if proc.poll() is None:
            proc.send_signal(signal.SIGQUIT)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        log = self.prefix / "error.log" if self.prefix else None
        if log and log.exists():
            err += log.read_text(errors="replace")
        return err

    def _cleanup(self) -> None:
        if self.prefix is not None:
            shutil.rmtree(self.prefix, ignore_errors=True)
            self.prefix = None

    def stop(self) -> None:
        self._stop_proc()
        self._cleanup()

    def __enter__(self) -> Sink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _logged_until_now(self) -> tuple[bytes, int, int]:
        """The access log once every request answered so far is in it, and where the
        marker line that proves it starts and ends.

        nginx writes a request's log line after sending its answer, so a client can hold
        the answer of a request whose line is not written yet. The sink asks for a marker
        path of its own and waits for that line: nginx (one process, one event loop)
        finishes an earlier request, its log line included, before it reads the next."""
        marker = f"/sink/mark/{uuid.uuid4().hex}"
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as conn:
            conn.sendall(f"GET {marker} HTTP/1.1\r\nHost: sink\r\nConnection: close\r\n\r\n"
                         .encode())
            while conn.recv(65536):  # the answer (a 404), until nginx closes
                pass
        needle = f" {marker} ".encode()
        deadline = time.monotonic() + 10
        while True:
            logged = self.access_log.read_bytes()
            at = logged.find(needle, self._offset)
            if at >= 0:
                start = logged.rfind(b"\n", 0, at) + 1
                return logged, start, logged.index(b"\n", at) + 1
            if time.monotonic() > deadline:
                raise RuntimeError(f"the sink never logged its marker {marker}")
            time.sleep(0.005)

    def reset(self) -> None:
        """Forget the requests answered so far."""
        if self.log_requests:
            self._offset = self._logged_until_now()[2]

    def stats(self) -> dict[str, Any]:
        """Requests by endpoint and by status code, answered since :meth:`reset`."""
        statuses: Counter[int] = Counter()
        endpoints: Counter[str] = Counter()
        if self.log_requests:
            logged, end, _ = self._logged_until_now()
            for line in logged[self._offset:end].decode().splitlines():
                parts = line.split(" ")
                uri = " ".join(parts[1:-1])
                if uri.startswith("/sink/"):
                    continue  # an earlier stats() call's marker
                statuses[int(parts[-1])] += 1
                endpoints[uri] += 1
        return {"requests": sum(statuses.values()), "statuses": dict(statuses),
                "endpoints": dict(endpoints)}


def main() -> int:
    try:
        sink = Sink(log_requests=False).start()
    except NginxMissing as exc:
        print(exc, file=sys.stderr)
        return 2
    print(f"zero-cost sink at {sink.url} (nginx pid {sink.pid}); Ctrl-C stops it", flush=True)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        sink.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
