"""Crash: a `cio-outbox worker` process SIGKILLed at 10 random moments of a 50,000-message
drain into a sandbox injecting 10% 5xx and 10% 429, restarted each time."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
from _rel_support import (
    FORBIDDEN_STDERR,
    check_per_person_order,
    cli_argv,
    cli_env,
    record,
    seeded_random,
    tracks,
)

from cio_outbox import Outbox
from cio_outbox.sandbox import Sandbox

MESSAGES = 50_000
PERSONS = 400
KILLS = 10


def _start_worker(db: str, sandbox: Sandbox, log: Path) -> subprocess.Popen[bytes]:
    # The same --worker-id on every restart: the new process takes back at once the rows
    # its killed predecessor held, instead of waiting for their lease to expire.
    return subprocess.Popen(
        cli_argv("worker", "--db", db, "--host", sandbox.url, "--until-empty",
                 "--worker-id", "crash-worker", "--concurrency", "2"),
        env=cli_env(sandbox.key), stdout=subprocess.DEVNULL, stderr=log.open("ab"),
    )


@pytest.mark.timeout(600)
def test_sigkill_ten_times_during_a_faulty_drain_loses_nothing(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    rng, seed = seeded_random(request)
    db = str(tmp_path / "crash.db")
    with Outbox(db) as box:
        added = box.enqueue_many(tracks(MESSAGES, PERSONS),
                                 idempotency_keys=lambda i, _c: f"crash:{i}").added
        assert added == MESSAGES
        expected_ids = {row["message_id"] for row in box.rows(limit=10**6)}

    # Kill moments: 10 random points of the drain, by how many messages the sandbox holds,
    # each followed by a random delay, so kills land while idle, waiting on a retry, in
    # the middle of a request, or between the sandbox's answer and the outbox's commit.
    thresholds = sorted(rng.sample(range(500, MESSAGES - 8000), KILLS))
    log = tmp_path / "worker.stderr"
    kills = 0
    started = time.monotonic()
    with Sandbox(fail_rate=0.1, throttle_rate=0.1, seed=seed) as sandbox:
        for threshold in thresholds:
            proc = _start_worker(db, sandbox, log)
            deadline = time.monotonic() + 120
            while (proc.poll() is None and sandbox.stats()["messages"] < threshold
                   and time.monotonic() < deadline):
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.4))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
            proc.wait(timeout=30)
        final = _start_worker(db, sandbox, log)
        assert final.wait(timeout=400) == 0, log.read_text()[-3000:]
        stats = sandbox.stats()
        arrivals = sandbox.messages(limit=10**7)
    elapsed = time.monotonic() - started

    with Outbox(db) as box:
        status = box.status()
        sent_attempts = [a for a in box.log(limit=10**6) if a["outcome"] == "sent"]
    received = [m["messageId"] for m in arrivals]
    accepted = sum(a["messages"] for a in sent_attempts)
    figures = {
        "messages": MESSAGES, "kills": kills, "resends": stats["duplicates"],
        "requests": stats["requests"], "injected_5xx": stats["injected_failures"],
        "throttled_429": stats["by_status"].get("429", 0),
        "delivered": len(received), "lost": len(expected_ids - set(received)),
        "dead_lettered": status["failed"], "seconds": round(elapsed, 1), "seed": seed,
    }
    record(request, tmp_path, "crash_restart", figures)

    assert kills == KILLS, "the drain ended before every planned kill"
    assert (status["sent"], status["pending"], status["in_flight"], status["failed"]) == (
        MESSAGES, 0, 0, 0)
    # Every message arrived; a resent message carried its original messageId, so the
    # sandbox recognised it and stored it once: nothing new appeared, nothing is missing.
    assert len(received) == MESSAGES
    assert set(received) == expected_ids
    assert stats["injected_failures"] > 0 and stats["by_status"].get("429", 0) > 0
    # The audit trail holds every answered attempt: each message's 200 at least once, and
    # a second one only where a kill fell between recording a 200 and marking the rows
    # sent, so that the resend was one of the duplicates the sandbox saw.
    assert MESSAGES <= accepted <= MESSAGES + stats["duplicates"]
    check_per_person_order(arrivals)
    text = log.read_text(errors="replace")
    for forbidden in FORBIDDEN_STDERR:
        assert forbidden not in text
