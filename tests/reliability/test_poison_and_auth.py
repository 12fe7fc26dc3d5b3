"""Poison and auth at scale: one bad message among 10,000 is the only one dead-lettered;
a wrong key stops the worker on its first answer and leaves every row untouched."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from _rel_support import FORBIDDEN_STDERR, cli_argv, cli_env, seeded_random, tracks

from cio_outbox import Outbox
from cio_outbox.sandbox import Sandbox
from cio_outbox.worker import EXIT_AUTH

N = 10_000
AUTH_ROWS = 3000
FAST = {"backoff_initial": 0.05, "backoff_max": 0.2, "progress": False}


def test_one_poison_message_in_10000_is_the_only_one_dead_lettered(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    rng, _ = seeded_random(request)
    calls = list(tracks(N, 200, pad="y" * 200))
    bad_index = rng.randrange(N)
    bad_person = calls[bad_index]["userId"]
    calls[bad_index] = {**calls[bad_index], "event": "Poison"}
    reason = "Poison"
    # 5% injected 5xx too: retries and isolation of the bad message interleave.
    with Outbox(tmp_path / "poison.db") as box, Sandbox(
            reject_events=["Poison"], fail_rate=0.05, named_errors=True) as sandbox:
        box.enqueue_many(calls, run="poison")
        result = box.drain(host=sandbox.url, key=sandbox.key, concurrency=3, **FAST)
        stats = sandbox.stats()
        arrivals = sandbox.messages(limit=10**6)
        failed = box.failed(limit=100)
        status = box.status()
    assert result["failed"] == 1 and result["sent"] == N - 1
    assert (status["sent"], status["failed"], status["pending"]) == (N - 1, 1, 0)
    assert len(failed) == 1
    assert failed[0]["summary"] == f"track {reason} for {bad_person}"
    error = failed[0]["error"]
    assert error.startswith("HTTP 400") and reason in error and "batch[" in error
    assert len(arrivals) == N - 1 and stats["duplicates"] == 0
    # The bad message cost a few extra requests, not one request per message.
    assert stats["requests"] < 200
    # The poisoned person's later messages still went, in order.
    seqs = [m["properties"]["seq"] for m in arrivals if m["userId"] == bad_person]
    assert seqs == sorted(seqs) and len(seqs) == N // 200 - 1


@pytest.mark.parametrize("key", ["legacy-wrong-key-0001", "sk_us_wrongkey0002"])
def test_wrong_key_stops_the_cli_worker_on_the_first_answer(tmp_path: Path, key: str) -> None:
    db = tmp_path / "auth.db"
    with Outbox(db) as box:
        box.enqueue_many(tracks(AUTH_ROWS, 300, pad=""))
    right = "sk_us_rightkey" if key.startswith("sk_") else "legacy-right-key"
    with Sandbox(key=right) as sandbox:
        url = sandbox.url
        done = subprocess.run(
            cli_argv("worker", "--db", str(db), "--host", sandbox.url, "--until-empty",
                     "--concurrency", "4"),
            env=cli_env(key), capture_output=True, text=True, timeout=120,
        )
        stats = sandbox.stats()
    assert done.returncode == EXIT_AUTH == 3, done.stderr[-2000:]
    text = done.stdout + done.stderr
    assert "authentication failed (HTTP 401)" in text
    assert "CIO_API_KEY" in text and url in text
    assert key not in text
    for forbidden in FORBIDDEN_STDERR:
        assert forbidden not in text
    assert stats["messages"] == 0
    assert stats["requests"] <= 4  # at most the requests already in flight
    with Outbox(db) as box:
        status = box.status()
        rows = box.rows(limit=10**6)
        auth = [a for a in box.log(limit=100) if a["outcome"] == "auth"]
    assert (status["pending"], status["in_flight"], status["sent"], status["failed"]) == (
        AUTH_ROWS, 0, 0, 0)
    assert all(row["attempts"] == 0 and row["last_error"] is None for row in rows)
    assert 1 <= len(auth) <= 4
