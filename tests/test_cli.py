"""The cio-outbox command line: output, --json and exit codes of every command, and, in real
subprocesses, graceful stops on SIGINT/SIGTERM and an import killed with SIGKILL."""

from __future__ import annotations

import datetime
import io
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from cio_outbox import Outbox
from cio_outbox.cli import ProgressPrinter, cli
from cio_outbox.demo import POISON_EVENT
from cio_outbox.importers import CHUNK_SIZE
from cio_outbox.intake import line_message_id
from cio_outbox.messages import message_id_for
from cio_outbox.sandbox import Sandbox, SandboxProcess
from cio_outbox.worker import Progress

SECRET = "wrong-key-Zq81vX3"


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    for name in ("CIO_OUTBOX", "CIO_API_KEY", "CIO_HOST", "CIO_REGION"):
        monkeypatch.delenv(name, raising=False)
    return CliRunner()


@pytest.fixture
def db(tmp_path: Path) -> str:
    return str(tmp_path / "outbox.db")


def _run(runner: CliRunner, *args: str, env: dict[str, str] | None = None) -> Result:
    return runner.invoke(cli, list(args), env=env, catch_exceptions=False)


def _write_jsonl(path: Path, calls: list[object]) -> Path:
    path.write_text("".join((c if isinstance(c, str) else json.dumps(c)) + "\n" for c in calls))
    return path


def _people(n: int) -> list[object]:
    return [{"type": "identify", "userId": f"u{i}", "traits": {"n": i}} for i in range(n)]


# -- enqueue ---------------------------------------------------------------------------


def test_enqueue_jsonl_keeps_valid_lines_reports_invalid_ones_and_exits_2(
    runner: CliRunner, db: str, tmp_path: Path
) -> None:
    calls = _people(5)
    calls[1] = '{"type": "identify", "userId": '  # bad JSON
    calls[3] = {"type": "track", "userId": "u3"}  # no event
    path = _write_jsonl(tmp_path / "people.jsonl", calls)
    result = _run(runner, "enqueue", str(path), "--db", db)
    assert result.exit_code == 2
    assert "5 lines, 3 added, 0 already in the outbox, 2 rejected" in result.stdout
    assert "line 2: invalid JSON" in result.stderr
    assert "line 4 (event):" in result.stderr
    assert "line" not in result.stdout.replace("lines", "")
    with Outbox(db) as outbox:
        assert outbox.status()["pending"] == 3
        assert outbox.history(line_message_id("people.jsonl", 5,
                                              path.read_bytes().splitlines()[4])) is not None

    again = _run(runner, "enqueue", str(path), "--db", db, "--json")
    assert again.exit_code == 2
    data = json.loads(again.stdout)  # JSON only on stdout
    assert (data["added"], data["skipped"], data["rejected"]) == (0, 3, 2)
    assert [r["line"] for r in data["rejections"]] == [2, 4]
    assert data["run"] == "people.jsonl"


def test_enqueue_all_valid_exits_0_and_uses_run_and_env_db(
    runner: CliRunner, db: str, tmp_path: Path
) -> None:
    path = _write_jsonl(tmp_path / "p.jsonl", _people(4))
    result = _run(runner, "enqueue", str(path), "--run", "wave-1", env={"CIO_OUTBOX": db})
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    with Outbox(db) as outbox:
        assert outbox.status("wave-1")["pending"] == 4
        assert outbox.history(line_message_id("wave-1", 1,
                                              path.read_bytes().splitlines()[0])) is not None


def test_enqueue_csv_with_column_options(runner: CliRunner, db: str, tmp_path: Path) -> None:
    path = tmp_path / "orders.csv"
    path.write_text("order,customer,what,ts,total\n"
                    "A1,u1,Order Placed,2024-01-02T03:04:05Z,42.5\n"
                    "A2,u2,,2024-01-02T03:04:05Z,1\n")
    result = _run(runner, "enqueue", str(path), "--db", db, "--user-id-column", "customer",
                  "--event-column", "what", "--timestamp-column", "ts", "--key-column", "order",
                  "--map", "total=properties.amount", "--json")
    assert result.exit_code == 2  # row A2 has no event
    data = json.loads(result.stdout)
    assert data["added"] == 1
    assert data["rejections"][0]["line"] == 3
    assert data["rejections"][0]["field"] == "event"
    with Outbox(db) as outbox:
        found = outbox.history(message_id_for("orders.csv:A1"))
    assert found is not None
    payload = json.loads(found["message"]["payload"])
    assert payload["type"] == "track"
    assert payload["event"] == "Order Placed"
    assert payload["properties"] == {"amount": "42.5"}
    assert payload["timestamp"] == "2024-01-02T03:04:05.000Z"


@pytest.mark.parametrize(
    ("name", "content", "args", "message"),
    [
        ("p.jsonl", "{}\n", ["--user-id-column", "id"], "CSV files only"),
        ("p.csv", "id,x\n1,2\n", ["--user-id-column", "nope"], "not in the header"),
        ("p.csv", "id,x\n1,2\n", ["--map", "id"], "COLUMN=TARGET"),
        ("p.csv", "id,x\n1,2\n", ["--map", "id=color"], "not one of"),
    ],
)
def test_enqueue_usage_errors_exit_2(runner: CliRunner, db: str, tmp_path: Path, name: str,
                                     content: str, args: list[str], message: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    result = _run(runner, "enqueue", str(path), "--db", db, *args)
    assert result.exit_code == 2
    assert message in result.stderr


def test_enqueue_stdin_needs_a_run(runner: CliRunner, db: str) -> None:
    line = json.dumps({"type": "identify", "userId": "u1"}) + "\n"
    refused = runner.invoke(cli, ["enqueue", "-", "--db", db], input=line)
    assert refused.exit_code == 2 and "--run" in refused.stderr
    taken = runner.invoke(cli, ["enqueue", "-", "--db", db, "--run", "pipe"], input=line)
    assert taken.exit_code == 0, taken.output
    with Outbox(db) as outbox:
        assert outbox.history(line_message_id("pipe", 1, line.strip().encode())) is not None


def test_storage_error_exits_1(runner: CliRunner, tmp_path: Path) -> None:
    result = _run(runner, "status", "--db", str(tmp_path))  # a directory
    assert result.exit_code == 1
    assert "is a directory" in result.stderr


# -- status and inspection -------------------------------------------------------------


@pytest.fixture
def migrated(db: str) -> Iterator[str]:
    """An outbox with 4 sent rows, 1 failed (a rejected event) and 2 pending of another run."""
    # Named errors: the bad row is found in one attempt, which the history below counts.
    with Outbox(db) as outbox, Sandbox(reject_events=["Bad"], named_errors=True) as sandbox:
        for i in range(4):
            outbox.identify(f"u{i}", traits={"i": i}, run="people")
        outbox.track("u9", "Bad", run="people", idempotency_key="bad")
        outbox.drain(key=sandbox.key, host=sandbox.url, progress=False)
        outbox.identify("p1", run="later")
        outbox.identify("p2", run="later")
    yield db


def test_status_json_promises_the_counts_at_the_top_level(runner: CliRunner,
                                                          migrated: str) -> None:
    result = _run(runner, "status", "--db", migrated, "--json")
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert {k: data[k] for k in ("pending", "in_flight", "sent", "failed")} == {
        "pending": 2, "in_flight": 0, "sent": 4, "failed": 1}
    assert "Bad" in data["last_error"]["error"]
    by_run = json.loads(_run(runner, "status", "--db", migrated, "--run", "later",
                             "--json").stdout)
    assert (by_run["pending"], by_run["sent"]) == (2, 0)


def test_status_text(runner: CliRunner, migrated: str) -> None:
    result = _run(runner, "status", "--db", migrated)
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert any(line.split()[:2] == ["pending", "2"] for line in lines)
    assert any(line.split()[:2] == ["sent", "4"] for line in lines)
    assert "last error" in result.stdout


def test_status_shows_who_holds_rows_in_flight_and_until_when(runner: CliRunner,
                                                               migrated: str) -> None:
    with Outbox(migrated) as outbox:
        held = outbox.storage.claim("host-1:4242", lease_seconds=600, max_bytes=500_000,
                                    max_messages=10)
    assert held
    data = json.loads(_run(runner, "status", "--db", migrated, "--json").stdout)
    (lease,) = data["leases"]
    assert (lease["worker_id"], lease["rows"]) == ("host-1:4242", len(held))
    assert 500 < lease["expires_in_s"] <= 600
    expires = datetime.datetime.fromisoformat(lease["expires_at"]).timestamp()
    assert abs(expires - (time.time() + lease["expires_in_s"])) < 60
    text = _run(runner, "status", "--db", migrated).stdout
    assert f"{len(held)} leased by host-1:4242 until {lease['expires_at']}" in text


def test_failed_retry_history_and_log(runner: CliRunner, migrated: str) -> None:
    listed = _run(runner, "failed", "--db", migrated, "--json")
    assert listed.exit_code == 0
    (row,) = json.loads(listed.stdout)
    assert row["messageId"] == message_id_for("bad")
    assert row["run"] == "people" and row["attempts"] == 1
    assert "rejected_event" in row["error"]
    assert row["summary"] == "track Bad for u9"
    text = _run(runner, "failed", "--db", migrated)
    assert f"#{row['id']}" in text.stdout and "track Bad for u9" in text.stdout

    history = _run(runner, "history", message_id_for("bad"), "--db", migrated, "--json")
    assert history.exit_code == 0
    trail = json.loads(history.stdout)
    assert trail["message"]["status"] == "failed"
    assert [a["outcome"] for a in trail["attempts"]] == ["rejected"]
    assert "rejected" in _run(runner, "history", message_id_for("bad"), "--db",
                              migrated).stdout
    missing = _run(runner, "history", "no-such-id", "--db", migrated)
    assert missing.exit_code == 1 and "no-such-id" in missing.stderr

    log = json.loads(_run(runner, "log", "--db", migrated, "--json").stdout)
    assert [a["outcome"] for a in log] == ["rejected", "sent"]
    assert len(json.loads(_run(runner, "log", "--db", migrated, "--json", "--limit",
                               "1").stdout)) == 1
    assert "HTTP 400" in _run(runner, "log", "--db", migrated, "--run", "people").stdout

    assert _run(runner, "retry", "--db", migrated).exit_code == 2
    requeued = _run(runner, "retry", "--db", migrated, "--id", str(row["id"]))
    assert requeued.exit_code == 0 and "requeued 1 failed row" in requeued.stdout
    assert json.loads(_run(runner, "retry", "--db", migrated, "--all",
                           "--json").stdout) == {"requeued": 0}
    status = json.loads(_run(runner, "status", "--db", migrated, "--json").stdout)
    assert (status["failed"], status["pending"]) == (0, 3)


def test_purge_and_forget(runner: CliRunner, migrated: str) -> None:
    assert _run(runner, "purge", "--db", migrated, "--older-than", "1d").exit_code == 2
    assert _run(runner, "purge", "--db", migrated, "--sent", "--older-than",
                "soon").exit_code == 2
    kept = _run(runner, "purge", "--db", migrated, "--sent", "--older-than", "30d")
    assert kept.exit_code == 0 and "deleted 0 sent row" in kept.stdout
    time.sleep(0.05)
    gone = _run(runner, "purge", "--db", migrated, "--sent", "--older-than", "0s", "--json",
                "--yes")
    assert json.loads(gone.stdout) == {"deleted": 4}

    forgot = _run(runner, "forget", "u9", "--db", migrated)
    assert forgot.exit_code == 0 and "removed 1 row" in forgot.stdout
    assert "u9" not in forgot.stdout
    assert _run(runner, "history", message_id_for("bad"), "--db", migrated).exit_code == 1
    assert _run(runner, "forget", " ", "--db", migrated).exit_code == 2
    nobody = _run(runner, "forget", "nobody-at-all", "--db", migrated, "--json")
    assert json.loads(nobody.stdout) == {"deleted": 0, "traces_kept_by": []}


# -- worker ----------------------------------------------------------------------------


@pytest.fixture
def queued(db: str) -> str:
    with Outbox(db) as outbox:
        outbox.enqueue_many(_people(30), run="people")
    return db


def test_worker_until_empty_sends_everything(runner: CliRunner, queued: str,
                                             sandbox: Sandbox) -> None:
    result = _run(runner, "worker", "--db", queued, "--host", sandbox.url, "--until-empty",
                  "--json", env={"CIO_API_KEY": sandbox.key})
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["sent"] == 30 and data["outcome"] == "drained"
    assert len(sandbox.messages()) == 30
    assert sandbox.key not in result.output


def test_worker_reads_host_from_env_and_prints_a_summary(runner: CliRunner, queued: str,
                                                        sandbox: Sandbox) -> None:
    result = _run(runner, "worker", "--db", queued, "--until-empty",
                  env={"CIO_API_KEY": sandbox.key, "CIO_HOST": sandbox.url})
    assert result.exit_code == 0
    assert result.stdout.startswith("drained: sent 30, failed 0")
    assert "sent 30" in result.stderr  # the last progress line (not a terminal: a log line)


def test_worker_wrong_key_exits_3_and_never_shows_the_key(runner: CliRunner, queued: str,
                                                         sandbox: Sandbox) -> None:
    result = _run(runner, "worker", "--db", queued, "--host", sandbox.url, "--until-empty",
                  env={"CIO_API_KEY": SECRET})
    assert result.exit_code == 3
    assert "authentication failed" in result.stderr
    assert SECRET not in result.output
    with Outbox(queued) as outbox:
        assert outbox.status()["pending"] == 30
        assert SECRET not in json.dumps(outbox.log())
        assert all(row["attempts"] == 0 for row in outbox.rows(limit=100))


@pytest.mark.parametrize(
    ("env", "args", "message"),
    [
        ({}, [], "CIO_API_KEY is not set"),
        ({"CIO_API_KEY": "sk_eu_" + SECRET}, ["--region", "us"], "region US"),
        ({"CIO_API_KEY": SECRET}, ["--host", "ftp://example.com"], "must be a URL"),
        ({"CIO_API_KEY": SECRET}, ["--host", "http://example.com"], "plain http"),
    ],
)
def test_worker_config_errors_exit_2_without_the_key(
    runner: CliRunner, queued: str, env: dict[str, str], args: list[str], message: str
) -> None:
    result = _run(runner, "worker", "--db", queued, "--until-empty", *args, env=env)
    assert result.exit_code == 2
    assert message in result.stderr
    assert SECRET not in result.output


def test_worker_region_from_env_is_checked_by_click(runner: CliRunner, queued: str) -> None:
    result = _run(runner, "worker", "--db", queued, env={"CIO_API_KEY": SECRET,
                                                         "CIO_REGION": "mars"})
    assert result.exit_code == 2
    assert SECRET not in result.output


def test_worker_bad_host_exits_1(runner: CliRunner, queued: str, sandbox: Sandbox) -> None:
    result = _run(runner, "worker", "--db", queued, "--host", sandbox.url + "/not-the-api",
                  "--until-empty", env={"CIO_API_KEY": sandbox.key})
    assert result.exit_code == 1
    assert "404" in result.stderr
    with Outbox(queued) as outbox:
        assert outbox.status()["pending"] == 30  # nothing lost, nothing stuck in flight


def test_worker_until_empty_waits_for_rows_leased_by_a_dead_worker(
    runner: CliRunner, queued: str, sandbox: Sandbox
) -> None:
    with Outbox(queued) as outbox:
        leased = outbox.storage.claim("dead-worker", lease_seconds=1.0, max_bytes=500_000,
                                      max_messages=5)
    assert len(leased) == 5
    result = _run(runner, "worker", "--db", queued, "--host", sandbox.url, "--until-empty",
                  "--json", env={"CIO_API_KEY": sandbox.key})
    assert result.exit_code == 0
    assert json.loads(result.stdout)["sent"] == 30
    assert {m["messageId"] for m in sandbox.messages()} >= {r.message_id for r in leased}


def test_progress_printer_updates_one_line_on_a_terminal() -> None:
    stream = io.StringIO()
    printer = ProgressPrinter(stream, tty=True)
    printer(Progress(sent=5, pending=10, state="sending"))
    printer(Progress(sent=9, pending=6, state="retrying: HTTP 503"))
    printer.message("SIGINT: stopping")
    text = stream.getvalue()
    # Progress rewrites one line; the message ends it and takes a line of its own.
    assert text.startswith("\rsent 5") and "\x1b[K\rsent 9" in text
    assert text.endswith("\x1b[K\nSIGINT: stopping\n")
    assert "[retrying: HTTP 503]" in text
    plain = io.StringIO()
    ProgressPrinter(plain, tty=False)(Progress(sent=5))
    assert plain.getvalue().endswith("\n") and "\r" not in plain.getvalue()


def test_help_documents_exit_codes_once_in_the_group_help(runner: CliRunner) -> None:
    text = _run(runner, "--help").stdout
    assert "3  the API refused the key" in text
    assert "2  usage or configuration error" in text
    for command in (["worker"], ["enqueue"], ["status"]):
        assert "Exit codes" not in _run(runner, *command, "--help").stdout


# -- demo ------------------------------------------------------------------------------


def test_demo_ends_with_one_failed_row_and_the_rest_sent(runner: CliRunner,
                                                         tmp_path: Path) -> None:
    db = tmp_path / "demo.db"
    result = _run(runner, "demo", "--db", str(db), "--rows", "300")
    assert result.exit_code == 0, result.output
    assert "interrupted:" in result.stdout
    assert "added 0, already there 300: no duplicates" in result.stdout
    assert POISON_EVENT in result.stdout
    with Outbox(db) as outbox:
        status = outbox.status()
        assert {k: status[k] for k in ("pending", "in_flight", "sent", "failed")} == {
            "pending": 0, "in_flight": 0, "sent": 299, "failed": 1}
        (failed,) = outbox.failed()
        assert POISON_EVENT in failed["summary"]
        assert "HTTP 400" in failed["error"]
        # The interruption really happened: the first run stopped partway, and the second
        # run (a restart on this host) took the same default worker id back.
        interrupted = re.search(r"interrupted: pending ([\d,]+) .* sent ([\d,]+)",
                                result.stdout)
        assert interrupted, result.stdout
        assert int(interrupted[1].replace(",", "")) > 0
        assert 0 < int(interrupted[2].replace(",", "")) < 300
        assert {a["worker_id"] for a in outbox.log(limit=1000)} == {
            f"{socket.gethostname()}:w0"}
    refused = _run(runner, "demo", "--db", str(db))
    assert refused.exit_code == 2 and "already exists" in refused.stderr


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("CIO_OUTBOX", "CIO_API_KEY", "CIO_HOST", "CIO_REGION")}
    env.update(extra)
    return env


def test_demo_command_in_a_fresh_process_with_default_temp_db(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "cio_outbox", "demo", "--rows", "150"],
        env=_env(TMPDIR=str(tmp_path)), capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    (db,) = tmp_path.glob("cio-outbox-demo-*/outbox.db")
    assert str(db) in done.stdout
    with Outbox(db) as outbox:
        assert (outbox.status()["sent"], outbox.status()["failed"]) == (149, 1)


# -- real processes: signals and SIGKILL -----------------------------------------------


def _counts(db: str) -> dict[str, int]:
    with sqlite3.connect(db, timeout=30) as conn:
        rows = conn.execute("SELECT status, sum(n) FROM counts GROUP BY status").fetchall()
    counts = {"pending": 0, "in_flight": 0, "sent": 0, "failed": 0}
    counts.update({status: int(n) for status, n in rows})
    return counts


def _wait_for(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def _worker_process(db: str, sandbox: SandboxProcess, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "cio_outbox", "worker", "--db", db, "--host", sandbox.url,
         "--concurrency", "2", *extra],
        env=_env(CIO_API_KEY=sandbox.key), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )


def _interrupt(db: str, sandbox: SandboxProcess, signum: int) -> dict[str, int]:
    """Start a worker, send it ``signum`` once it has sent more than before, check that it
    stopped cleanly, and return the counts it left."""
    sent_before = _counts(db)["sent"]
    proc = _worker_process(db, sandbox)
    try:
        _wait_for(lambda: _counts(db)["sent"] > sent_before, 30, "a sent batch")
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert out.startswith("stopped:")
    assert f"{signal.Signals(signum).name}: stopping after the request in flight" in err
    counts = _counts(db)
    assert counts["in_flight"] == 0 and counts["failed"] == 0
    assert sent_before < counts["sent"] < sum(counts.values())
    # Every row the outbox calls sent reached the sandbox, and nothing else did.
    assert sandbox.stats()["messages"] == counts["sent"]
    return counts


def test_worker_stops_cleanly_on_sigint_and_sigterm_and_a_resumed_run_delivers_exactly_once(
    db: str,
) -> None:
    total = 3000
    padding = "x" * 1200  # about 370 messages per 500 KB request: 9 requests
    with Outbox(db) as outbox:
        outbox.enqueue_many(
            ({"type": "track", "userId": f"u{i % 500}", "event": "Imported",
              "properties": {"i": i, "pad": padding}} for i in range(total)),
            run="big", idempotency_keys=lambda i, _: f"big:{i}",
        )
    with SandboxProcess(latency=0.3) as sandbox:
        for signum in (signal.SIGINT, signal.SIGTERM):
            counts = _interrupt(db, sandbox, signum)
            assert counts["pending"] + counts["sent"] == total

        resumed = _worker_process(db, sandbox, "--until-empty")
        out, err = resumed.communicate(timeout=60)
        assert resumed.returncode == 0, err
        assert out.startswith("drained:")
        assert _counts(db) == {"pending": 0, "in_flight": 0, "sent": total, "failed": 0}
        received = [m["messageId"] for m in sandbox.messages()]
        stats = sandbox.stats()
    expected = {message_id_for(f"big:{i}") for i in range(total)}
    assert len(received) == total and set(received) == expected
    assert stats["duplicates"] == 0


def _has_open(pid: int, path: str) -> bool:
    """Whether process ``pid`` holds ``path`` open (Linux /proc)."""
    folder = Path(f"/proc/{pid}/fd")
    target = os.path.realpath(path)
    try:
        return any(os.path.realpath(fd) == target for fd in folder.iterdir())
    except OSError:  # the process or one of its descriptors went away meanwhile
        return False


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs Linux /proc")
def test_sigterm_while_the_worker_waits_to_open_the_outbox_stops_it_gracefully(
    db: str,
) -> None:
    # A worker started next to busy enqueuers can wait seconds for the write lock before
    # it has a Worker to stop; a SIGTERM then must not kill it with the default action.
    with Outbox(db) as outbox:
        outbox.track("u1", "Queued")
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # the lock the worker's open waits for
    with SandboxProcess() as sandbox:
        proc = _worker_process(db, sandbox, "--until-empty")
        try:
            _wait_for(lambda: _has_open(proc.pid, db), 60, "the worker to open the outbox")
            time.sleep(0.2)  # it is now waiting in SQLite's busy handler
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.2)
            holder.execute("ROLLBACK")
            out, err = proc.communicate(timeout=60)
        finally:
            holder.close()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 0, err
        assert out.startswith("stopped:"), out
        assert "SIGTERM: stopping" in err
        assert sandbox.stats()["messages"] == 0  # it stopped before sending anything
    assert _counts(db) == {"pending": 1, "in_flight": 0, "sent": 0, "failed": 0}


def test_enqueue_killed_partway_then_rerun_gives_exactly_one_row_per_line(
    db: str, tmp_path: Path
) -> None:
    lines = 3 * CHUNK_SIZE  # killed after the first chunk commits, before the last
    path = tmp_path / "big.jsonl"
    with path.open("w") as handle:
        for i in range(lines):
            handle.write(json.dumps({"type": "track", "userId": f"u{i % 300}", "event": "E",
                                     "properties": {"i": i}}) + "\n")
    Outbox(db).close()  # the schema exists before the child and this test read it
    command = [sys.executable, "-m", "cio_outbox", "enqueue", str(path), "--db", db]
    proc = subprocess.Popen(command, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: _counts(db)["pending"] > 0, 60, "the first committed chunk")
        proc.kill()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    partial = _counts(db)["pending"]
    assert 0 < partial < lines

    rerun = subprocess.run([*command, "--json"], env=_env(), capture_output=True, text=True,
                           timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    report = json.loads(rerun.stdout)
    assert report["added"] == lines - partial and report["skipped"] == partial
    with sqlite3.connect(db) as conn:
        ids = [mid for (mid,) in conn.execute("SELECT message_id FROM messages")]
    assert len(ids) == lines
    content = path.read_bytes().splitlines()
    assert set(ids) == {line_message_id("big.jsonl", n, content[n - 1])
                        for n in range(1, lines + 1)}
