"""Odds and ends a newcomer meets: field paths in rejections, one JSON vocabulary, the demo's
hints, the sandbox's start line, public API for what notebooks show."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner

from cio_outbox import Outbox
from cio_outbox.cli import cli
from cio_outbox.messages import MessageError
from cio_outbox.sandbox import Sandbox


@pytest.mark.parametrize("value", [math.nan, {1, 2}])
def test_a_rejection_names_the_field_path_the_caller_wrote(outbox: Outbox,
                                                          value: object) -> None:
    with pytest.raises(MessageError) as caught:
        outbox.track("u1", "Order Completed", properties={"total": value})
    assert caught.value.field == "properties.total"
    assert str(caught.value).startswith("properties.total ")
    assert "v.total" not in str(caught.value)


@pytest.fixture
def inspected(tmp_path: Path) -> str:
    db = str(tmp_path / "outbox.db")
    with Outbox(db) as outbox, Sandbox(reject_events=["Bad"]) as sandbox:
        outbox.track("u1", "Bad", properties={"n": 1}, run="r", idempotency_key="bad")
        outbox.identify("u2", run="r")
        outbox.drain(key=sandbox.key, host=sandbox.url, progress=False)
    return db


def _json(db: str, *args: str) -> object:
    result = CliRunner().invoke(cli, [*args, "--db", db, "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _is_iso(value: object) -> bool:
    return isinstance(value, str) and value[:4].isdigit() and value.endswith("+00:00")


def test_every_json_output_speaks_one_vocabulary(inspected: str) -> None:
    [failed] = _json(inspected, "failed")
    history = _json(inspected, "history", failed["messageId"])
    message = history["message"]
    for row in (failed, message):
        assert {"id", "messageId", "type", "run", "person", "attempts", "error"} <= set(row)
        assert not {"message_id", "call_type", "last_error"} & set(row)
        assert _is_iso(row["updated_at"])
    assert message["payload"]["event"] == "Bad"  # an object, not JSON inside a string
    assert _is_iso(message["created_at"])
    for entry in [*history["attempts"], *_json(inspected, "log")]:
        assert _is_iso(entry["at"]) and "row_ranges" not in entry
    status = _json(inspected, "status")
    assert _is_iso(status["last_error"]["at"])


def test_the_demo_hints_are_commands_that_work_after_the_quick_start(tmp_path: Path) -> None:
    import os
    import shlex
    import subprocess
    import sys

    script = Path(sys.executable).parent / "cio-outbox"  # what the quick start installs
    # The quick start's shell: the venv is not activated, so its bin is not on the PATH.
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                           if Path(p).resolve() != script.parent.resolve())
    env = {**os.environ, "PATH": path, "TMPDIR": str(tmp_path)}
    env.pop("CIO_OUTBOX", None)
    cwd = script.parent.parent.parent  # where `python3 -m venv .venv` was run
    done = subprocess.run([str(script.relative_to(cwd)), "demo", "--rows", "60"], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    hints = done.stdout.split("Look around:", 1)[1].strip().splitlines()
    assert len(hints) >= 3
    for hint in hints:
        argv = shlex.split(hint)
        assert argv[0] != "cio-outbox"  # not on the PATH after the quick start
        ran = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True,
                             timeout=60)
        assert ran.returncode == 0, (hint, ran.stderr)


@pytest.mark.parametrize(("key", "expected"), [(None, "CIO_API_KEY=sandbox-key"),
                                               ("custom-Zq81", "CIO_SANDBOX_KEY")])
def test_the_sandbox_start_line_says_which_key_it_expects(key: str | None,
                                                         expected: str) -> None:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "CIO_SANDBOX_KEY"}
    if key:
        env["CIO_SANDBOX_KEY"] = key
    proc = subprocess.Popen([sys.executable, "-m", "cio_outbox", "sandbox"], env=env,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    start = json.loads(line)
    assert start["url"].startswith("http://127.0.0.1:")
    assert expected in start["key"]
    if key:
        assert key not in line


def test_timeline_gives_a_runs_progress_per_request_ready_for_a_dataframe(
    outbox: Outbox,
) -> None:
    outbox.enqueue_many([{"type": "track", "userId": f"u{i}",
                          "event": "Bad" if i in (3, 7) else "Good"} for i in range(50)],
                        run="m")
    outbox.identify("other", run="elsewhere")
    with Sandbox(reject_events=["Bad"]) as sandbox:
        outbox.drain(key=sandbox.key, host=sandbox.url, run="m", max_messages=10,
                     progress=False)
    timeline = outbox.timeline("m")
    assert [set(point) for point in timeline] == [{
        "at", "seconds", "outcome", "messages", "status_code", "sent", "dead_lettered",
        "pending"}] * len(timeline)
    assert timeline[0]["seconds"] == 0.0 and _is_iso(timeline[0]["at"])
    assert [p["seconds"] for p in timeline] == sorted(p["seconds"] for p in timeline)
    last = timeline[-1]
    assert (last["sent"], last["dead_lettered"], last["pending"]) == (48, 2, 0)
    assert {p["outcome"] for p in timeline} == {"sent", "rejected"}
    assert all(a["sent"] <= b["sent"] for a, b in itertools.pairwise(timeline))
    pd = pytest.importorskip("pandas")
    assert list(pd.DataFrame(timeline)["pending"])[-1] == 0
    assert outbox.timeline("elsewhere") == []  # enqueued, never sent
    with pytest.raises(LookupError, match="no run 'nosuch'"):
        outbox.timeline("nosuch")


def test_a_worker_names_its_host_publicly(outbox: Outbox) -> None:
    worker = outbox.worker(key="sk_eu_EXAMPLE0000")
    try:
        assert worker.base_url == "https://cdp-eu.customer.io"
    finally:
        worker.client.close()
