"""Network faults: refused, silent, reset and slow servers. Each is retried, nothing is lost
once the fault heals, and the worker's progress (Progress.last_error) says what is wrong."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from _rel_support import FaultProxy, free_port, tracks

from cio_outbox import Outbox
from cio_outbox.sandbox import Sandbox
from cio_outbox.worker import Progress

N = 300
# Fast retries, many attempts: a fault that lasts a few seconds must not dead-letter (nor
# the timeouts of a slow server, which "may have arrived" and have a bound of their own).
RETRY = {"backoff_initial": 0.05, "backoff_max": 0.3, "max_attempts": 1000,
         "max_unconfirmed": 1000,
         "progress_interval": 0.05, "idle_interval": 0.05}


@pytest.fixture
def box(tmp_path: Path) -> Iterator[Outbox]:
    with Outbox(tmp_path / "net.db") as outbox:
        outbox.enqueue_many(tracks(N, 20, pad=""))
        yield outbox


def _ids(box: Outbox) -> set[str]:
    return {row["message_id"] for row in box.rows(limit=10**6)}


def _drain(box: Outbox, host: str, key: str, *, timeout: float | tuple[float, float] = (1.0, 1.0),
           seconds: float = 60) -> tuple[dict, list[Progress]]:
    seen: list[Progress] = []
    worker = box.worker(host=host, key=key, timeout=timeout, concurrency=2,
                        on_progress=seen.append, **RETRY)
    try:
        result = worker.run(until_empty=True, timeout=seconds)
    finally:
        worker.client.close()
    return result.as_dict(), seen


def _errors(seen: list[Progress]) -> list[str]:
    return [p.last_error for p in seen if p.last_error]


def _assert_all_delivered(box: Outbox, sandbox: Sandbox) -> None:
    status = box.status()
    assert (status["sent"], status["pending"], status["in_flight"], status["failed"]) == (
        N, 0, 0, 0)
    received = [m["messageId"] for m in sandbox.messages(limit=10**6)]
    assert len(received) == N and set(received) == _ids(box)


def test_connection_refused_is_retried_until_the_server_comes_up(box: Outbox) -> None:
    port = free_port()
    holder: dict[str, Sandbox] = {}

    def come_up() -> None:
        holder["sandbox"] = Sandbox(port=port).start()

    timer = threading.Timer(2.0, come_up)
    timer.start()
    try:
        result, seen = _drain(box, f"http://127.0.0.1:{port}", "sandbox-key")
        timer.join()
        sandbox = holder["sandbox"]
        _assert_all_delivered(box, sandbox)
    finally:
        timer.cancel()
        if "sandbox" in holder:
            holder["sandbox"].stop()
    assert result["retries"] > 0 and result["failed"] == 0
    errors = _errors(seen)
    assert errors and "connection refused" in errors[0]
    assert f"127.0.0.1:{port}" in errors[0]
    # Audited, with no HTTP status; an outage never uses up a row's attempts.
    unanswered = [a for a in box.log(limit=10_000) if a["status_code"] is None]
    assert unanswered and all("connection refused" in a["error"] for a in unanswered)
    assert all(row["attempts"] == 1 for row in box.rows(limit=10**6))  # the one answered


def test_a_server_that_accepts_and_never_answers_times_out(box: Outbox) -> None:
    with Sandbox() as sandbox, FaultProxy(sandbox.url, "hang", faults=4) as proxy:
        result, seen = _drain(box, proxy.url, sandbox.key, timeout=(1.0, 0.5))
        _assert_all_delivered(box, sandbox)
        assert proxy.faulty_connections == 4
    assert result["retries"] >= 1 and result["failed"] == 0
    errors = _errors(seen)
    assert errors and "timed out" in errors[0]


def test_a_connection_reset_mid_response_is_retried_and_stored_once(box: Outbox) -> None:
    # The proxy forwards the request (the sandbox stores its messages), sends half the
    # answer, then resets: the worker cannot know it was delivered and sends it again.
    with Sandbox() as sandbox, FaultProxy(sandbox.url, "reset", faults=3) as proxy:
        result, seen = _drain(box, proxy.url, sandbox.key)
        _assert_all_delivered(box, sandbox)
        stats = sandbox.stats()
    assert result["retries"] >= 1 and result["failed"] == 0
    assert stats["duplicates"] > 0  # resent with the same messageIds, stored once
    errors = _errors(seen)
    assert errors and ("connection" in errors[0].lower() or "reset" in errors[0].lower()), errors


def test_a_reset_before_any_answer_is_retried(box: Outbox) -> None:
    with Sandbox() as sandbox, FaultProxy(sandbox.url, "reset-before", faults=3) as proxy:
        result, seen = _drain(box, proxy.url, sandbox.key)
        _assert_all_delivered(box, sandbox)
        assert sandbox.stats()["duplicates"] == 0
    assert result["retries"] >= 1
    assert _errors(seen)


def test_a_slow_server_is_retried_after_timeouts_and_nothing_is_lost(box: Outbox) -> None:
    with Sandbox(latency=0.8) as sandbox:
        healer = threading.Timer(2.5, lambda: sandbox.configure(latency=0.05))
        healer.start()
        started = time.monotonic()
        try:
            result, seen = _drain(box, sandbox.url, sandbox.key, timeout=(1.0, 0.4))
        finally:
            healer.cancel()
        _assert_all_delivered(box, sandbox)
    assert time.monotonic() - started < 60
    assert result["retries"] >= 1 and result["failed"] == 0
    errors = _errors(seen)
    assert errors and "timed out" in errors[0]


def test_progress_line_names_the_error_while_retrying(box: Outbox) -> None:
    """What a user watching ``Progress.line()`` sees while the server refuses connections,
    and that an outage of any length leaves every row pending, none dead-lettered."""
    port = free_port()
    result, seen = _drain(box, f"http://127.0.0.1:{port}", "sandbox-key", seconds=2.0)
    assert result["sent"] == 0 and result["stopped"]
    status = box.status()
    assert status["pending"] == N and status["failed"] == 0
    retrying = [p for p in seen if p.retries > 0 and p.last_error]
    assert retrying
    assert "connection refused" in retrying[-1].last_error
    lines = [p.line() for p in retrying]
    assert any("retrying" in line and "connection refused" in line for line in lines), lines
