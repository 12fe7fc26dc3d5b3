"""Interrupted enqueue: `cio-outbox enqueue big.jsonl` SIGKILLed at a random line, then rerun:
exactly one row per line, none missing, each row holding its own line."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
from _rel_support import FORBIDDEN_STDERR, cli_argv, cli_env, record, row_count, seeded_random

from cio_outbox import Outbox
from cio_outbox.importers import CHUNK_SIZE
from cio_outbox.intake import line_message_id

LINES = 4 * CHUNK_SIZE  # two kills land after chunk commits, before the last chunk


def _write_big(path: Path) -> None:
    with path.open("w", encoding="utf-8") as out:
        for line in range(1, LINES + 1):
            if line % 7 == 0:
                call = {"type": "identify", "userId": f"u{line % 900}",
                        "traits": {"line": line, "name": f"Person {line}"}}
            else:
                call = {"type": "track", "userId": f"u{line % 900}", "event": "Imported",
                        "properties": {"line": line}}
            out.write(json.dumps(call) + "\n")
            if line % 5000 == 0:
                out.write("\n")  # blank lines are skipped and still count as lines


@pytest.mark.timeout(300)
def test_import_killed_at_random_lines_then_rerun_has_one_row_per_line(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    rng, _seed = seeded_random(request)
    big = tmp_path / "big.jsonl"
    _write_big(big)
    db = tmp_path / "import.db"
    argv = cli_argv("enqueue", str(big), "--db", str(db), "--run", "big")
    kills, kill_points = 0, []
    stderr = tmp_path / "enqueue.stderr"
    for _ in range(2):  # kill twice: the second import resumes a partial one
        target = row_count(db) + rng.randrange(1, 8_000)
        proc = subprocess.Popen(argv, env=cli_env(), stdout=subprocess.DEVNULL,
                                stderr=stderr.open("ab"))
        deadline = time.monotonic() + 120
        while proc.poll() is None and row_count(db) < target and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.05))  # land inside a chunk's transaction, or not
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait(timeout=30)
        kill_points.append(row_count(db))
    assert kills >= 1, "the import finished before it could be killed"
    assert kill_points[-1] < LINES

    done = subprocess.run([*argv, "--json"], env=cli_env(), capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    for forbidden in FORBIDDEN_STDERR:
        assert forbidden not in done.stderr + stderr.read_text(errors="replace")

    # Line numbers count blank lines too; the file holds LINES calls plus blank lines.
    physical = big.read_text().splitlines()
    call_lines = [n for n, text in enumerate(physical, 1) if text.strip()]
    assert len(call_lines) == LINES
    with Outbox(db) as box:
        rows = box.rows(limit=10**6)
        status = box.status()
    assert status["pending"] == LINES == len(rows)
    by_id = {row["message_id"]: row for row in rows}
    assert len(by_id) == LINES
    for number in call_lines:
        row = by_id.get(line_message_id("big", number,
                                           physical[number - 1].encode().strip()))
        assert row is not None, f"line {number} is missing"
        payload = json.loads(row["payload"])
        bag = payload.get("properties") or payload.get("traits")
        assert json.loads(physical[number - 1])[
            "properties" if payload["type"] == "track" else "traits"]["line"] == bag["line"]
    assert report["added"] + report["skipped"] == LINES
    assert report["skipped"] == kill_points[-1]
    record(request, tmp_path, "interrupted_enqueue",
           {"lines": LINES, "kills": kills, "rows_at_kills": kill_points,
            "rerun_added": report["added"], "rerun_skipped": report["skipped"]})
