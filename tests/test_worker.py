"""The worker against the sandbox over real HTTP: delivery, faults, isolation, order, crashes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import responses

from cio_outbox import AuthError, Outbox
from cio_outbox.batch import MAX_BATCH_BYTES
from cio_outbox.client import Client
from cio_outbox.config import ApiKey, resolve_target
from cio_outbox.sandbox import Sandbox
from cio_outbox.worker import EXIT_AUTH, Worker, WorkerResult

FAST = {"backoff_initial": 0.01, "backoff_max": 0.05, "progress": False}


def _events(n: int, persons: int = 50, event: str = "Viewed") -> list[dict]:
    return [
        {"type": "track", "userId": f"u{i % persons}", "event": event, "properties": {"seq": i}}
        for i in range(n)
    ]


def _received_ids(sandbox: Sandbox) -> list[str]:
    return [m["messageId"] for m in sandbox.messages(limit=10**7)]


def _all_ids(outbox: Outbox) -> set[str]:
    return {row["message_id"] for row in outbox.rows(limit=10**7)}


def test_drain_delivers_every_message_exactly_as_stored(outbox: Outbox, sandbox: Sandbox) -> None:
    outbox.enqueue_many(_events(3000), run="r1")
    outbox.identify("u1", traits={"email": "ada@example.com"}, run="r1")
    outbox.alias("u1", "anon-1", run="r1")
    result = outbox.drain(host=sandbox.url, key=sandbox.key, **FAST)
    assert result["sent"] == 3002 and result["failed"] == 0
    status = outbox.status()
    assert (status["pending"], status["in_flight"], status["sent"], status["failed"]) == (
        0, 0, 3002, 0)
    received = {m["messageId"]: m for m in sandbox.messages(limit=10**6)}
    assert set(received) == _all_ids(outbox)
    for row in outbox.rows(limit=10):
        stored = json.loads(row["payload"])
        got = {k: v for k, v in received[row["message_id"]].items() if k in stored}
        assert got == stored
    stats = sandbox.stats()
    assert stats["by_endpoint"]["alias"] == 1
    assert stats["duplicates"] == 0
    assert stats["gzip_requests"] == stats["requests"]  # gzip is on by default
    assert stats["bytes_received"] < stats["bytes_decompressed"] / 3


def test_request_bodies_stay_within_the_batch_limit(outbox: Outbox, sandbox: Sandbox) -> None:
    blob = "x" * 20_000
    outbox.enqueue_many(
        {"type": "track", "userId": f"u{i}", "event": "Big", "properties": {"b": blob}}
        for i in range(120)
    )
    outbox.drain(host=sandbox.url, key=sandbox.key, **FAST)
    log = outbox.log(limit=1000)
    assert all(entry["bytes"] <= MAX_BATCH_BYTES for entry in log)
    assert max(entry["bytes"] for entry in log) > MAX_BATCH_BYTES - 21_000  # packed full
    assert sandbox.stats()["messages"] == 120


def test_429_storm_is_honoured_and_everything_arrives(outbox: Outbox) -> None:
    with Sandbox(rate_limit=4) as sandbox:
        outbox.enqueue_many(_events(400))
        result = outbox.drain(host=sandbox.url, key=sandbox.key, max_messages=20,
                              concurrency=3, **FAST)
        stats = sandbox.stats()
    assert result["sent"] == 400
    assert stats["rate_limited"] > 0
    assert stats["messages"] == 400
    retries = [a for a in outbox.log(limit=10_000) if a["outcome"] == "retry"]
    assert retries and all(a["status_code"] == 429 for a in retries)
    assert "rate limited" in retries[0]["error"]


def test_5xx_are_retried_with_backoff_and_audited(outbox: Outbox) -> None:
    with Sandbox(fail_rate=0.4, seed=7) as sandbox:
        outbox.enqueue_many(_events(2000))
        # 40% of requests fail: ten in a row for one batch (the default max_attempts) comes
        # once in about 10,000 batches; 30 attempts make "nothing failed" certain here.
        result = outbox.drain(host=sandbox.url, key=sandbox.key, max_messages=100,
                              max_attempts=30, **FAST)
        stats = sandbox.stats()
    assert result["sent"] == 2000 and result["failed"] == 0
    assert result["retries"] > 0
    assert stats["injected_failures"] > 0
    assert stats["messages"] == 2000
    row = outbox.rows(limit=10_000)[0]
    history = outbox.history(row["message_id"])
    assert history is not None
    assert history["attempts"][-1]["outcome"] == "sent"
    assert history["message"]["attempts"] == len(history["attempts"])


def test_timeouts_are_retried(outbox: Outbox) -> None:
    with Sandbox(latency=1.5) as sandbox:
        outbox.enqueue_many(_events(50))
        healer = threading.Timer(1.0, lambda: sandbox.configure(latency=0.0))
        healer.start()
        result = outbox.drain(host=sandbox.url, key=sandbox.key, timeout=(1.0, 0.5), **FAST)
        healer.join()
        received = set(_received_ids(sandbox))
    assert result["sent"] == 50
    assert received == _all_ids(outbox)
    assert any("timed out" in (a["error"] or "") for a in outbox.log(limit=1000))


def test_one_poison_message_in_1000_is_the_only_one_dead_lettered(outbox: Outbox) -> None:
    calls = _events(1000)
    calls[437] = {"type": "track", "userId": "u437", "event": "Poison", "properties": {}}
    # Names the bad item (batch[437]); without names the worker halves, tested below.
    with Sandbox(reject_events=["Poison"], named_errors=True) as sandbox:
        outbox.enqueue_many(calls, run="poison")
        result = outbox.drain(host=sandbox.url, key=sandbox.key, **FAST)
        received = _received_ids(sandbox)
    assert result["sent"] == 999 and result["failed"] == 1
    failed = outbox.failed()
    assert len(failed) == 1
    assert failed[0]["summary"] == "track Poison for u437"
    # The item's index is its place in the request that carried it (a few lanes' rows).
    assert re.search(r"batch\[\d+\]", failed[0]["error"]) and "Poison" in failed[0]["error"]
    assert len(received) == 999


def _drain_through(outbox: Outbox, answer: Any, **options: Any) -> WorkerResult:
    """Drain the outbox at concurrency 1 into a mocked /v1/batch that ``answer`` answers."""
    key = ApiKey("testkey")
    client = Client(key, resolve_target(key, host="https://cdp.customer.io"), gzip=False)
    with responses.RequestsMock() as mock:
        mock.add_callback(responses.POST, "https://cdp.customer.io/v1/batch", callback=answer)
        return Worker(outbox.storage, client, concurrency=1, **options).run(until_empty=True)


def test_400_without_item_indexes_is_isolated_by_splitting(outbox: Outbox) -> None:
    calls = _events(64)
    calls[21] = {"type": "track", "userId": "bad", "event": "Poison"}
    outbox.enqueue_many(calls)
    delivered: list[str] = []

    def answer(request):  # type: ignore[no-untyped-def]
        batch = json.loads(request.body)["batch"]
        if any(m["event"] == "Poison" for m in batch):
            return (400, {}, "bad request")
        delivered.extend(m["messageId"] for m in batch)
        return (200, {}, "{}")

    result = _drain_through(outbox, answer)
    assert result.sent == 63 and result.failed == 1
    assert len(delivered) == 63
    assert outbox.failed()[0]["summary"] == "track Poison for bad"


def test_refusals_while_isolating_a_bad_neighbour_cost_the_good_rows_no_attempt(
    outbox: Outbox,
) -> None:
    # Halving a refused batch of 64 down to its one bad message refuses the rows beside it
    # six times over. Those refusals are the bad row's, not theirs: with max_attempts=3 and
    # one transient 500 on each part's first try, every good row must still arrive. The
    # body is the documented one, naming no item, as a real server's.
    calls = _events(64)
    calls[21] = {"type": "track", "userId": "bad", "event": "Poison"}
    outbox.enqueue_many(calls)
    delivered: list[str] = []
    failed_once: set[str] = set()

    def answer(request):  # type: ignore[no-untyped-def]
        batch = json.loads(request.body)["batch"]
        if any(m["event"] == "Poison" for m in batch):
            return (400, {}, json.dumps({"meta": {"error": "invalid event"}}))
        if batch[0]["messageId"] not in failed_once:
            failed_once.add(batch[0]["messageId"])
            return (500, {}, "busy")
        delivered.extend(m["messageId"] for m in batch)
        return (200, {}, "{}")

    result = _drain_through(outbox, answer, max_attempts=3, backoff_initial=0.01,
                            backoff_max=0.02)
    assert (result.sent, result.failed) == (63, 1)
    assert len(delivered) == 63
    failed = outbox.failed()
    assert [f["summary"] for f in failed] == ["track Poison for bad"]
    # Each good row was charged only its own two answers (its part's 500, then the 200);
    # the bad row its refusal alone.
    attempts = {row["person"]: row["attempts"] for row in outbox.rows(limit=100)
                if row["status"] == "sent"}
    assert set(attempts.values()) == {2}, attempts
    assert failed[0]["attempts"] == 1


def test_wrong_key_stops_at_once_and_counts_no_attempt(outbox: Outbox, sandbox: Sandbox) -> None:
    outbox.enqueue_many(_events(500))
    worker = outbox.worker(key="sk_us_wrongsecret", host=sandbox.url, concurrency=3)
    result = worker.run(until_empty=True)
    assert result.exit_code == EXIT_AUTH
    assert "401" in result.error and sandbox.url in result.error
    assert "wrongsecret" not in result.error
    assert outbox.status()["pending"] == 500
    assert all(row["attempts"] == 0 for row in outbox.rows(limit=1000))
    assert sandbox.stats()["messages"] == 0
    auth_attempts = [a for a in outbox.log() if a["outcome"] == "auth"]
    assert auth_attempts and len(auth_attempts) <= 3  # stopped on the first response


def test_auth_error_is_an_exception_type_too() -> None:
    assert issubclass(AuthError, RuntimeError)


def test_attempts_run_out_then_rows_are_dead_lettered_and_can_be_requeued(
    outbox: Outbox,
) -> None:
    with Sandbox(fail_rate=1.0) as sandbox:
        outbox.enqueue_many(_events(30), run="doomed")
        result = outbox.drain(host=sandbox.url, key=sandbox.key, max_attempts=3, **FAST)
        assert result["failed"] == 30
        failed = outbox.failed(run="doomed")
        assert all(row["attempts"] == 3 for row in failed)
        assert "gave up after 3 attempts" in failed[0]["error"]
        sandbox.configure(fail_rate=0.0)
        assert outbox.retry(run="doomed") == 30
        result = outbox.drain(host=sandbox.url, key=sandbox.key, **FAST)
    assert result["sent"] == 30
    assert outbox.status(run="doomed")["sent"] == 30


def test_rows_leased_by_a_dead_worker_come_back_when_the_lease_expires(
    outbox: Outbox, sandbox: Sandbox
) -> None:
    outbox.enqueue_many(_events(100))
    held = outbox.storage.claim("dead-worker", lease_seconds=1.0, max_bytes=MAX_BATCH_BYTES,
                                max_messages=40)
    assert 0 < len(held) <= 40  # a claim takes a few lanes: up to 40 rows of them
    started = time.monotonic()
    result = outbox.drain(host=sandbox.url, key=sandbox.key, **FAST)
    assert result["sent"] == 100
    assert time.monotonic() - started >= 0.9  # it waited for the lease
    assert set(_received_ids(sandbox)) == _all_ids(outbox)


def test_a_restarted_worker_id_takes_its_rows_back_at_once(
    outbox: Outbox, sandbox: Sandbox
) -> None:
    outbox.enqueue_many(_events(100))
    outbox.storage.claim("box-1", lease_seconds=3600, max_bytes=MAX_BATCH_BYTES, max_messages=40)
    result = outbox.drain(host=sandbox.url, key=sandbox.key, worker_id="box-1", max_seconds=30,
                          **FAST)
    assert result["sent"] == 100


def test_per_person_order_holds_with_concurrency_and_retries(outbox: Outbox) -> None:
    calls = [
        {"type": "track", "userId": f"p{i % 15}", "event": "Step", "properties": {"seq": i}}
        for i in range(3000)
    ]
    with Sandbox(fail_rate=0.25, seed=3) as sandbox:
        outbox.enqueue_many(calls)
        outbox.drain(host=sandbox.url, key=sandbox.key, concurrency=4, max_messages=37, **FAST)
        arrivals = sandbox.messages(limit=10**6)
    by_person: dict[str, list[int]] = defaultdict(list)
    for message in arrivals:
        by_person[message["userId"]].append(message["properties"]["seq"])
    assert len(by_person) == 15
    for seqs in by_person.values():
        assert seqs == sorted(seqs)
        assert len(seqs) == 200


def test_two_workers_and_enqueuers_share_one_file(tmp_path: Path, sandbox: Sandbox) -> None:
    path = tmp_path / "shared.db"
    Outbox(path).close()
    errors: list[BaseException] = []

    def enqueue(part: int) -> None:
        try:
            with Outbox(path) as box:
                for chunk in range(5):
                    box.enqueue_many(
                        ({"type": "track", "userId": f"w{part}-{i % 7}", "event": "E",
                          "properties": {"seq": chunk * 200 + i}} for i in range(200)),
                        idempotency_keys=lambda i, _c, p=part, c=chunk: f"{p}:{c}:{i}",
                    )
                    box.identify(f"solo-{part}-{chunk}", run="singles")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    results: list[dict] = []

    def work() -> None:
        try:
            with Outbox(path) as box:
                worker = box.worker(host=sandbox.url, key=sandbox.key, concurrency=2,
                                    max_messages=150, idle_interval=0.05)
                threading.Timer(4.0, worker.stop).start()
                results.append(worker.run().as_dict())
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=enqueue, args=(p,)) for p in range(3)]
    threads += [threading.Thread(target=work) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    with Outbox(path) as box:
        box.drain(host=sandbox.url, key=sandbox.key, **FAST)
        status = box.status()
        ids = _all_ids(box)
    assert status["sent"] == 3 * (1000 + 5) and status["pending"] == 0
    received = _received_ids(sandbox)
    assert set(received) == ids and len(received) == len(ids)
    assert sandbox.stats()["duplicates"] == 0


WORKER_SCRIPT = textwrap.dedent(
    """
    import sys
    from cio_outbox import Outbox
    box = Outbox(sys.argv[1])
    worker = box.worker(host=sys.argv[2], key=sys.argv[3], concurrency=2, max_messages=200,
                        lease_seconds=1.0, backoff_initial=0.01, backoff_max=0.05)
    print("started", flush=True)
    result = worker.run(until_empty=True)
    print(result.exit_code, flush=True)
    """
)


def test_sigkill_mid_drain_loses_nothing_and_resends_keep_their_ids(
    outbox: Outbox, tmp_path: Path
) -> None:
    outbox.enqueue_many(_events(20_000, persons=500))
    script = tmp_path / "worker.py"
    script.write_text(WORKER_SCRIPT)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    kills = 0
    with Sandbox(latency=0.02) as sandbox:
        for _ in range(3):
            proc = subprocess.Popen(
                [sys.executable, str(script), outbox.location, sandbox.url, sandbox.key],
                stdout=subprocess.PIPE, env=env,
            )
            assert proc.stdout is not None and proc.stdout.readline().strip() == b"started"
            time.sleep(0.6)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
            proc.wait()
        final = subprocess.run(
            [sys.executable, str(script), outbox.location, sandbox.url, sandbox.key],
            capture_output=True, env=env, timeout=240,
        )
        assert final.returncode == 0, final.stderr.decode()[-2000:]
        received = _received_ids(sandbox)
        stats = sandbox.stats()
    assert kills >= 1
    status = outbox.status()
    assert status["sent"] == 20_000 and status["pending"] == 0 and status["in_flight"] == 0
    assert set(received) == _all_ids(outbox)
    assert len(received) == 20_000  # stored once each, whatever was resent
    assert stats["duplicates"] >= 0


def test_progress_line_says_what_is_wrong_while_retrying(outbox: Outbox) -> None:
    import socket

    with socket.socket() as probe:  # a loopback port with nothing listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    outbox.enqueue_many(_events(10))
    lines: list[str] = []
    worker = outbox.worker(key="k", host=f"http://127.0.0.1:{port}", backoff_initial=0.05,
                           backoff_max=0.1, progress_interval=0.1,
                           on_progress=lambda p: lines.append(p.line()))
    result = worker.run(until_empty=True, timeout=1.5)
    assert result.sent == 0 and result.stopped
    assert any("retrying: cannot reach" in line and "connection refused" in line
               for line in lines), lines
    status = outbox.status()
    assert status["pending"] == 10 and status["in_flight"] == 0  # released on stop


# -- fencing, live leases, busy databases (issue 14) ---------------------------------------


def test_the_heartbeat_keeps_a_lease_alive_through_a_request_longer_than_it(
    outbox: Outbox,
) -> None:
    """A 1 s lease and a server that takes 2.5 s: the lease never lapses meanwhile."""
    outbox.enqueue_many(_events(30, persons=3))
    worker = outbox.worker(host="http://127.0.0.1:1", key="sandbox-key", lease_seconds=1.0)
    assert worker.heartbeat_interval <= 0.25
    with Sandbox(latency=2.5) as slow:
        worker = outbox.worker(host=slow.url, key=slow.key, lease_seconds=1.0, concurrency=1,
                               timeout=(2.0, 10.0), backoff_initial=0.01, backoff_max=0.05)
        done: list = []
        thread = threading.Thread(target=lambda: done.append(worker.run(until_empty=True)))
        thread.start()
        time.sleep(0.3)
        leases = []
        while thread.is_alive():
            rows = outbox.rows(status="in_flight", limit=100)
            leases += [r["lease_expires_at"] for r in rows if r["lease_expires_at"]]
            assert not rows or outbox.storage.claim(
                "intruder", lease_seconds=1.0, max_bytes=MAX_BATCH_BYTES, max_messages=100
            ) == [], "another worker could take rows while the request was in flight"
            time.sleep(0.2)
        thread.join()
        worker.client.close()
        assert done[0].sent == 30 and slow.stats()["duplicates"] == 0
    assert len(set(leases)) >= 3  # the lease was renewed several times


def test_an_outcome_for_rows_no_longer_held_changes_nothing(outbox: Outbox) -> None:
    """The fenced calls as the worker uses them: a stale claim's 200 is audited as late."""
    from cio_outbox.storage.base import Attempt

    outbox.enqueue_many(_events(3, persons=3))
    stale = outbox.storage.claim("w1", lease_seconds=0.2, max_bytes=MAX_BATCH_BYTES,
                                 max_messages=10)
    time.sleep(0.3)
    fresh = outbox.storage.claim("w2", lease_seconds=60, max_bytes=MAX_BATCH_BYTES,
                                 max_messages=10)
    assert [r.id for r in fresh] == [r.id for r in stale]
    assert outbox.storage.extend_lease(stale, 60) == []
    held = outbox.storage.record_attempt(
        Attempt(worker_id="w1", endpoint="batch", rows=stale, bytes=1, status_code=200,
                latency_ms=1.0, outcome="sent"), count=True, sent=True)
    assert held == []
    assert outbox.status()["in_flight"] == 3
    assert [a["outcome"] for a in outbox.log()] == ["late"]


def test_a_worker_meets_a_busy_database_with_backoff_and_goes_on(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    import sqlite3

    from cio_outbox.client import Client
    from cio_outbox.storage.sqlite import SQLiteStorage

    db = tmp_path / "busy.db"
    with Outbox(db) as box:
        box.enqueue_many(_events(200, persons=10))
    storage = SQLiteStorage(db, busy_timeout=0.2)
    sandbox.configure(latency=0.05)  # 40 requests: about 2 s of work
    key = ApiKey(sandbox.key)
    client = Client(key, resolve_target(key, host=sandbox.url))
    seen: list[str] = []
    worker = Worker(storage, client, max_messages=5, backoff_initial=0.05, backoff_max=0.2,
                    lease_seconds=5, on_progress=lambda p: seen.append(p.last_error or ""),
                    progress_interval=0.05)
    locker = sqlite3.connect(db, isolation_level=None)
    done: list = []
    thread = threading.Thread(target=lambda: done.append(worker.run(until_empty=True,
                                                                    timeout=60)))
    thread.start()
    time.sleep(0.3)
    locker.execute("BEGIN IMMEDIATE")  # a write lock held well past the busy timeout
    time.sleep(1.5)
    locker.execute("COMMIT")
    locker.close()
    thread.join(timeout=60)
    client.close()
    result = done[0]
    assert result.exit_code == 0 and result.error is None
    assert result.sent == 200 and set(_received_ids(sandbox)) == {
        r["message_id"] for r in Outbox(db).rows(limit=1000)}
    assert any("locked" in text or "busy" in text for text in seen), seen
    storage.close()


def test_worker_cli_takes_a_short_lease(tmp_path: Path, sandbox: Sandbox) -> None:
    db = tmp_path / "lease.db"
    with Outbox(db) as box:
        box.enqueue_many(_events(50))
    env = {k: v for k, v in os.environ.items() if not k.startswith("CIO_")}
    done = subprocess.run(
        [sys.executable, "-m", "cio_outbox", "worker", "--db", str(db), "--host", sandbox.url,
         "--until-empty", "--lease", "1", "--json"],
        env={**env, "CIO_API_KEY": sandbox.key}, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["sent"] == 50
    bad = subprocess.run(
        [sys.executable, "-m", "cio_outbox", "worker", "--db", str(db), "--lease", "0"],
        env={**env, "CIO_API_KEY": sandbox.key}, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--lease" in bad.stderr
