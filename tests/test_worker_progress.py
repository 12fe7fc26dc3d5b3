"""A worker that explains itself: percent, rate and ETA; the real rate under --max-rps; dead
letters named as such; a clear end for a wrong key, failed rows and a host that never
answered."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from cio_outbox import Outbox
from cio_outbox.cli import cli
from cio_outbox.sandbox import Sandbox
from cio_outbox.worker import Progress


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    for name in ("CIO_OUTBOX", "CIO_API_KEY", "CIO_HOST", "CIO_REGION"):
        monkeypatch.delenv(name, raising=False)
    return CliRunner()


def _people(outbox: Outbox, n: int, run: str = "people") -> None:
    outbox.enqueue_many([{"type": "identify", "userId": f"u{i}", "traits": {"i": i}}
                         for i in range(n)], run=run)


def test_progress_line_shows_percent_rate_and_eta_of_the_pending_work() -> None:
    line = Progress(sent=40, failed=2, pending=50, in_flight=8, total=100, rate=20.0,
                    state="sending").line()
    assert "42%" in line  # 42 of the 100 rows there were to do are done
    assert "20 msg/s" in line
    assert "ETA 0:03" in line  # 58 rows left at 20 msg/s
    assert "2 dead-lettered" in line
    assert "ETA" not in Progress(sent=1, pending=5, total=6, rate=0.0).line()


def test_progress_under_max_rps_shows_the_real_rate(outbox: Outbox, sandbox: Sandbox) -> None:
    _people(outbox, 400)
    seen: list[Progress] = []
    worker = outbox.worker(key=sandbox.key, host=sandbox.url, max_rps=4, max_messages=25,
                           on_progress=seen.append, progress_interval=0.1)
    try:
        result = worker.run(until_empty=True, timeout=60)
    finally:
        worker.client.close()
    assert result.sent == 400
    # 4 requests/s of 25 messages: about 100 msg/s, never 0 while sending.
    sending = [p for p in seen if p.state == "sending" and p.elapsed > 1.0 and p.pending]
    assert sending, seen
    assert all(p.rate > 30 for p in sending), [round(p.rate) for p in sending]
    assert all(p.rate < 300 for p in sending), [round(p.rate) for p in sending]
    assert seen[-1].total == 400 and seen[-1].percent == 100.0


def test_dead_letters_are_shown_as_dead_letters_not_as_retries(outbox: Outbox) -> None:
    outbox.enqueue_many([{"type": "track", "userId": f"u{i}",
                          "event": "Bad" if i % 10 == 0 else "Good"} for i in range(300)],
                        run="mixed")
    seen: list[Progress] = []
    with Sandbox(reject_events=["Bad"], fail_rate=0.3, seed=7) as sandbox:
        # Every request fails with 30% chance, and a good row beside a bad one rides in
        # each request of the split (10, 5, 2 rows): with the default 10 attempts about one
        # run in six dead-lettered a good row after ten 5xx in all, as the policy says.
        # This test is about how dead letters are shown, so 5xx never exhaust a row here.
        worker = outbox.worker(key=sandbox.key, host=sandbox.url, max_messages=20,
                               backoff_initial=0.01, backoff_max=0.05, max_attempts=60,
                               on_progress=seen.append, progress_interval=0.02)
        try:
            result = worker.run(until_empty=True, timeout=60)
        finally:
            worker.client.close()
    assert result.failed == 30 and result.sent == 270
    lines = [p.line() for p in seen]
    assert not any("retrying: HTTP 400" in line for line in lines), lines
    assert "30 dead-lettered" in lines[-1]
    assert any(p.failed and f"{p.failed} dead-lettered" in p.line() for p in seen[:-1])


def test_the_final_line_points_to_failed_when_rows_failed(runner: CliRunner,
                                                         tmp_path: Path) -> None:
    db = str(tmp_path / "outbox.db")
    with Outbox(db) as outbox:
        outbox.track("u1", "Bad", run="r")
        outbox.track("u2", "Good", run="r")
    with Sandbox(reject_events=["Bad"]) as sandbox:
        result = runner.invoke(cli, ["worker", "--db", db, "--host", sandbox.url,
                                     "--until-empty"], env={"CIO_API_KEY": sandbox.key})
    assert result.exit_code == 0
    assert "1 row(s) failed" in result.stdout and f"cio-outbox failed --db {db}" in result.stdout


def test_a_wrong_key_ends_with_a_clear_auth_message(runner: CliRunner, tmp_path: Path,
                                                   sandbox: Sandbox) -> None:
    db = str(tmp_path / "outbox.db")
    with Outbox(db) as outbox:
        _people(outbox, 5)
    result = runner.invoke(cli, ["worker", "--db", db, "--host", sandbox.url, "--until-empty"],
                           env={"CIO_API_KEY": "not-the-key-Zq81"})
    assert result.exit_code == 3
    first = result.stdout.splitlines()[0]
    assert first.startswith("not sent: the API refused the key (HTTP 401)")
    assert "CIO_API_KEY" in first and "Zq81" not in result.output


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize(("host", "cause"), [
    ("http://127.0.0.1:{port}", "connection refused"),
    ("https://cdp.custmer.invalid", "cdp.custmer.invalid"),
    ("https://127.0.0.1:{sandbox_port}", "TLS"),  # https against a plain-http server
])
def test_until_empty_gives_up_on_a_host_that_never_answered(
    runner: CliRunner, tmp_path: Path, sandbox: Sandbox, host: str, cause: str
) -> None:
    db = str(tmp_path / "outbox.db")
    with Outbox(db) as outbox:
        _people(outbox, 5)
    url = host.format(port=_closed_port(), sandbox_port=sandbox.url.rsplit(":", 1)[1])
    started = time.monotonic()
    result = runner.invoke(cli, ["worker", "--db", db, "--host", url, "--until-empty",
                                 "--unreachable-timeout", "2", "--json"],
                           env={"CIO_API_KEY": sandbox.key})
    took = time.monotonic() - started
    assert result.exit_code == 1, result.output
    assert took < 20
    assert "never answered" in result.stderr and cause in result.stderr, result.stderr
    assert json.loads(result.stdout)["outcome"] == "failed"
    with Outbox(db) as outbox:
        status = outbox.status()
    assert (status["pending"], status["in_flight"]) == (5, 0)  # nothing lost or stuck
