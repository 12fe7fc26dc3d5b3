"""Against a hostile server (tests/hostile.py), on SQLite and PostgreSQL: a zombie worker
paused past its lease, a request slower than the lease, a long Retry-After pause, a server
that ingests and answers after the read timeout, a refused batch that names no item, and a
server that echoes the credentials it received. Each scenario records its figures (run
with -s to see them): duplicates, rows lost, per-person order inversions, key occurrences."""

from __future__ import annotations

import base64
import json
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from _rel_support import cli_argv, cli_env, file_bytes, free_port, record, tracks
from click.testing import CliRunner
from hostile import Answer, HostileServer, Request
from procs import pause

from cio_outbox import Outbox
from cio_outbox.cli import cli

KEY = "sk_us_Pr1vateSecret9d8e7f"
LEGACY = "legacyWriteKey-7f3a9c1e5b"
LEASE = 2.0
FAST = {"backoff_initial": 0.05, "backoff_max": 0.2, "idle_interval": 0.05}
WORKER_PROC = Path(__file__).with_name("_worker_proc.py")


def _ids(box: Outbox) -> list[str]:
    return [row["message_id"] for row in box.rows(limit=10**6)]


def _start_proc(location: str, url: str, options: dict[str, Any]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(WORKER_PROC), location, url, KEY, json.dumps(options)],
        env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _holds_a_write(location: str) -> bool:
    """Whether some process holds a write lock on this outbox right now."""
    if location.startswith("postgresql"):
        import psycopg

        from cio_outbox.storage.postgres import split_location

        plain, schema = split_location(location)
        with psycopg.connect(plain, autocommit=True, connect_timeout=10) as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation"
                " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s"
                " AND l.mode NOT IN ('AccessShareLock') AND l.pid <> pg_backend_pid()",
                (schema,)).fetchone()
        return bool(row and row[0])
    probe = sqlite3.connect(location, timeout=0.05, isolation_level=None)
    try:
        probe.execute("BEGIN IMMEDIATE")
        probe.execute("ROLLBACK")
        return False
    except sqlite3.OperationalError:
        return True
    finally:
        probe.close()


def _stop_outside_a_write(proc: subprocess.Popen[str], location: str) -> None:
    """SIGSTOP a worker process at a moment it holds no write lock.

    A process stopped inside a write transaction blocks the other writers until it
    resumes (SQLite's file lock; PostgreSQL's row locks, until its idle-in-transaction
    timeout); the zombie scenarios are about a worker that lost its lease, so they stop
    it between writes."""
    for _ in range(100):
        pause(proc)  # once stopped, it cannot begin a write after the check below
        if not _holds_a_write(location):
            return
        proc.send_signal(signal.SIGCONT)
        time.sleep(0.02)
    raise AssertionError("the worker process always held a write lock")


def _run(box: Outbox, url: str, *, seconds: float = 30, key: str = KEY,
         timeout: tuple[float, float] = (2.0, 10.0), **options: Any) -> dict[str, Any]:
    worker = box.worker(host=url, key=key, timeout=timeout, **{**FAST, **options})
    try:
        return worker.run(until_empty=True, timeout=seconds).as_dict()
    finally:
        worker.client.close()


def _contains(request: Request, marker: str) -> bool:
    return any(m.get("event") == marker for m in request.messages)


# ---------------------------------------------------------------- 1. the zombie


def test_a_zombie_paused_past_its_lease_does_not_undo_a_replace(
    outbox_location: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """W1 sends a row and is stopped before it reads the 200; W2 takes the row after the
    lease, the API refuses it, it is dead-lettered, the operator replaces it; W1's stale 200
    then arrives. The corrected call must still be delivered."""
    answered = threading.Event()

    def policy(req: Request) -> Answer:
        if req.number == 0:
            return Answer(hold=answered)  # W1's request: ingested, answered when told
        if any((m.get("properties") or {}).get("version") == 1 for m in req.messages):
            return Answer(status=400, error="invalid event properties")
        return Answer()

    with Outbox(outbox_location) as box, HostileServer(policy) as server:
        box.track("p1", "Paid", properties={"version": 1, "seq": 0})
        message_id = _ids(box)[0]
        w1 = _start_proc(outbox_location, server.url, {"lease_seconds": LEASE, "concurrency": 1,
                                                      **FAST})
        try:
            server.wait_for_requests(1)
            _stop_outside_a_write(w1, outbox_location)
            answered.set()  # the 200 waits in W1's socket buffer
            time.sleep(LEASE + 0.5)
            w2 = _run(box, server.url, lease_seconds=LEASE, max_attempts=1)
            assert w2["failed"] == 1
            done = subprocess.run(
                cli_argv("replace", message_id, json.dumps(
                    {"type": "track", "userId": "p1", "event": "Paid",
                     "properties": {"version": 2, "seq": 0}}), "--db", outbox_location),
                env=cli_env(), capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, done.stderr
        finally:
            w1.send_signal(signal.SIGCONT)
        _, err = w1.communicate(timeout=60)
        _run(box, server.url, lease_seconds=LEASE)  # whatever is left
        corrected = [a for a in server.arrivals
                     if (a.message.get("properties") or {}).get("version") == 2]
        status = box.status()
        outcomes = [a["outcome"] for a in box.log(limit=1000)]
        figures = {**server.figures([message_id]), "corrected_lost": 1 - min(len(corrected), 1),
                   "outcomes": outcomes, "backend": request.node.callspec.id}
        record(request, tmp_path, "zombie_replace", figures)
    assert w1.returncode == 0, err[-2000:]
    assert len(corrected) == 1, "the corrected call was never delivered"
    assert status["sent"] == 1 and status["pending"] == 0
    assert "late" in outcomes  # W1's stale 200, audited, changed nothing


def test_a_zombie_resumed_after_its_lease_sends_nothing_stale(
    outbox_location: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """W1 gets a 500 and is stopped in its backoff past the lease; W2 drains everything;
    W1 resumes. It must not resend rows it no longer holds."""
    with Outbox(outbox_location) as box, HostileServer(
            lambda req: Answer(status=500) if req.number == 0 else Answer()) as server:
        box.enqueue_many(tracks(1200, 20))
        expected = _ids(box)
        w1 = _start_proc(outbox_location, server.url, {
            "lease_seconds": LEASE, "backoff_initial": 3.0, "backoff_max": 3.0,
            "concurrency": 1, "idle_interval": 0.05})
        try:
            server.wait_for_requests(1)
            time.sleep(0.3)  # its 500 is read: W1 is in its backoff
            _stop_outside_a_write(w1, outbox_location)
            time.sleep(LEASE + 0.5)
            w2 = _run(box, server.url, lease_seconds=LEASE)
            before_resume = len(server.arrivals)
        finally:
            w1.send_signal(signal.SIGCONT)
        _, err = w1.communicate(timeout=60)
        figures = {**server.figures(expected), "after_resume": len(server.arrivals)
                   - before_resume, "backend": request.node.callspec.id}
        record(request, tmp_path, "zombie_backoff", figures)
        status = box.status()
    assert w1.returncode == 0, err[-2000:]
    assert w2["exit_code"] == 0 and w2["sent"] == 1200, w2
    assert status["sent"] == 1200 and status["pending"] == status["in_flight"] == 0
    assert figures["lost"] == 0
    assert figures["after_resume"] == 0, "the zombie resent rows it no longer held"
    assert figures["inversions"] == 0


# ---------------------------------------------------------------- 2. live leases


def test_a_request_slower_than_the_lease_is_not_sent_twice(
    outbox_location: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """2 s lease, a server that takes 4 s to answer, two workers."""
    with Outbox(outbox_location) as box, HostileServer(lambda req: Answer(delay=4.0)) as server:
        box.enqueue_many(tracks(600, 20))
        expected = _ids(box)
        second = Outbox(outbox_location)
        threads = [threading.Thread(target=_run, args=(each, server.url),
                                    kwargs={"lease_seconds": LEASE, "concurrency": 1})
                   for each in (box, second)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        second.close()
        figures = {**server.figures(expected), "backend": request.node.callspec.id}
        record(request, tmp_path, "slow_request", figures)
        status = box.status()
    assert status["sent"] == 600 and figures["lost"] == 0
    assert figures["duplicates"] == 0
    assert figures["inversions"] == 0


def test_a_long_retry_after_does_not_let_claims_lapse(
    outbox_location: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """429 with Retry-After: 5 against a 2 s lease; a worker of 4 senders and a second one."""
    with Outbox(outbox_location) as box, HostileServer(
            lambda req: Answer(status=429, retry_after="5") if req.number == 0
            else Answer()) as server:
        box.enqueue_many(tracks(2000, 1000))
        expected = _ids(box)
        results: list[dict[str, Any]] = []
        paused = threading.Thread(target=lambda: results.append(
            _run(box, server.url, lease_seconds=LEASE, concurrency=4)))
        paused.start()
        server.wait_for_requests(1)
        time.sleep(0.5)  # the other senders have claimed and are paused
        other = Outbox(outbox_location)
        results.append(_run(other, server.url, lease_seconds=LEASE, concurrency=1))
        paused.join(timeout=60)
        other.close()
        figures = {**server.figures(expected), "backend": request.node.callspec.id}
        record(request, tmp_path, "long_pause", figures)
        status = box.status()
    assert status["sent"] == 2000 and figures["lost"] == 0
    assert figures["duplicates"] == 0


def test_a_server_that_ingests_and_answers_after_the_read_timeout_is_bounded(
    outbox_location: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Every request is ingested and answered after the client gave up. The rows may have
    arrived: they are retried a bounded number of times, then dead-lettered saying so."""
    with Outbox(outbox_location) as box, HostileServer(lambda req: Answer(delay=3.0,
                                                                          ingest=True)) as server:
        box.enqueue_many(tracks(50, 5, pad=""))
        expected = _ids(box)
        started = time.monotonic()
        result = _run(box, server.url, seconds=8, timeout=(1.0, 0.3), lease_seconds=LEASE,
                      max_unconfirmed=3)
        figures = {**server.figures(expected), "seconds": round(time.monotonic() - started, 1),
                   "backend": request.node.callspec.id, "failed": result["failed"]}
        record(request, tmp_path, "read_timeout_after_ingest", figures)
        status = box.status()
        failed = box.failed(limit=100)
        outcomes = {a["outcome"] for a in box.log(limit=1000)}
    assert status["failed"] == 50 and status["pending"] == status["in_flight"] == 0
    assert all("may have arrived" in row["error"] for row in failed), failed[0]["error"]
    assert "may have arrived" in outcomes
    assert figures["duplicates"] == 100  # 3 sends of 50: what the bound allows, no more


def test_a_connection_closed_after_the_body_was_read_may_have_arrived(
    outbox_location: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """The server ingests the batch and closes the connection twice, then answers."""
    with Outbox(outbox_location) as box, HostileServer() as server:
        server.script(Answer(close=True, ingest=True), Answer(close=True, ingest=True))
        box.enqueue_many(tracks(40, 4, pad=""))
        expected = _ids(box)
        result = _run(box, server.url, lease_seconds=LEASE, concurrency=1)
        figures = {**server.figures(expected), "backend": request.node.callspec.id}
        record(request, tmp_path, "closed_after_body", figures)
        status = box.status()
        outcomes = [a["outcome"] for a in box.log(limit=100)]
    assert result["sent"] == 40 and status["sent"] == 40 and figures["lost"] == 0
    assert outcomes == ["may have arrived", "may have arrived", "sent"]
    assert figures["duplicates"] == 80  # resent: the worker could not know


def test_worker_cli_dead_letters_what_may_have_arrived_after_its_bound(tmp_path: Path) -> None:
    db = str(tmp_path / "cli.db")
    with Outbox(db) as box:
        box.enqueue_many(tracks(10, 2, pad=""))
    with HostileServer(lambda req: Answer(close=True, ingest=True)) as server:
        done = subprocess.run(
            cli_argv("worker", "--db", db, "--host", server.url, "--until-empty", "--json",
                     "--max-unconfirmed", "2", "--lease", "2"),
            env=cli_env(KEY), capture_output=True, text=True, timeout=60)
        assert len(server.requests) == 2
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["failed"] == 10
    with Outbox(db) as box:
        assert all("may have arrived" in row["error"] for row in box.failed())


def test_refused_connections_never_use_up_the_may_have_arrived_bound(tmp_path: Path) -> None:
    with Outbox(tmp_path / "refused.db") as box:
        box.enqueue_many(tracks(20, 2, pad=""))
        result = _run(box, f"http://127.0.0.1:{free_port()}", seconds=1.5, max_unconfirmed=1)
        status = box.status()
    assert result["failed"] == 0 and status["pending"] == 20


# ---------------------------------------------------------------- 3. order through splits


def test_splitting_a_batch_that_names_no_item_keeps_each_persons_order(
    outbox_location: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """A has one answered attempt already. [A, P#0, Z, P#1] is refused with Customer.io's
    documented 400 (no item names); the first half [A, P#0] gets a 500 and gives up (A
    dead-lettered, P#0 to be retried later): P#1 must not go out before P#0."""

    def policy(req: Request) -> Answer:
        if _contains(req, "Poison"):
            return Answer(status=400, error="Invalid request body")
        if _contains(req, "A"):
            return Answer(status=500)
        return Answer()

    with Outbox(outbox_location) as box, HostileServer(policy) as server:
        box.track("a", "A", properties={"seq": 0})
        _run(box, server.url, seconds=1.0, backoff_initial=5.0, backoff_max=5.0)
        assert box.rows(limit=1)[0]["attempts"] == 1
        box.track("P", "Step", properties={"seq": 0})
        box.track("z", "Poison", properties={"seq": 0})
        box.track("P", "Step", properties={"seq": 1})
        _run(box, server.url, max_attempts=3)
        order = server.order_of("P")
        figures = {**server.figures([]), "order": order, "backend": request.node.callspec.id}
        record(request, tmp_path, "split_order", figures)
        status = box.status()
    assert status["failed"] == 2 and status["sent"] == 2  # A and Poison dead-lettered
    assert order == [0, 1]
    assert figures["inversions"] == 0


# ---------------------------------------------------------------- 5. echoed credentials


def _forms(key: str) -> list[str]:
    return [key, base64.b64encode(f"{key}:".encode()).decode()]


def _occurrences(key: str, text: str | bytes) -> int:
    data = text.encode() if isinstance(text, str) else text
    return sum(data.count(form.encode()) for form in _forms(key))


@pytest.mark.parametrize("key", [KEY, LEGACY], ids=["bearer", "basic"])
def test_credentials_echoed_by_the_server_are_never_stored_or_printed(
    outbox_location: str, key: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    def policy(req: Request) -> Answer:
        if req.number == 0:
            return Answer(status=500, echo=True, reason=f"Oops {req.authorization}")
        if _contains(req, "Poison"):
            return Answer(status=400, echo=True)
        if _contains(req, "Last"):
            return Answer(status=401, echo=True)
        return Answer()

    seen: list[str] = []
    with Outbox(outbox_location) as box, HostileServer(policy) as server:
        box.enqueue_many(tracks(10, 2, pad=""))
        box.track("p9", "Poison")
        worker = box.worker(host=server.url, key=key, on_progress=lambda p: seen.extend(
            [p.line(), p.last_error or ""]), progress_interval=0.02, **FAST)
        first = worker.run(until_empty=True, timeout=30)
        worker.client.close()
        box.track("p8", "Last")
        worker = box.worker(host=server.url, key=key, **FAST)
        second = worker.run(until_empty=True, timeout=30)
        worker.client.close()
        assert (first.sent, first.failed, second.exit_code) == (10, 1, 3)
        assert any(server.requests[0].authorization.endswith(f) for f in _forms(key))
        stored = json.dumps(box.rows(limit=1000)) + json.dumps(box.log(limit=1000))
        outputs = {}
        for command in ("log", "status", "failed"):
            done = CliRunner().invoke(cli, [command, "--json", "--db", outbox_location])
            assert done.exit_code == 0, done.output
            outputs[command] = done.output
        errors = [a["error"] for a in box.log(limit=1000) if a["error"]]
    counts = {f"{name}_json": _occurrences(key, text) for name, text in outputs.items()}
    counts["stored_rows_and_audit"] = _occurrences(key, stored)
    counts["progress"] = _occurrences(key, "\n".join(seen))
    counts["worker_error"] = _occurrences(key, second.error or "")
    if not outbox_location.startswith("postgresql"):
        counts["db_file"] = _occurrences(key, file_bytes(outbox_location))
    record(request, tmp_path, "echo", {**counts, "backend": request.node.callspec.id})
    assert all(n == 0 for n in counts.values()), counts
    # The server's words are kept, only the credential is gone.
    assert any("key not recognised" in e and "[redacted]" in e for e in errors), errors
