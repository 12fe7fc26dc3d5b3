"""Concurrency: four enqueuing processes and two worker processes on one outbox file."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from _rel_support import (
    FORBIDDEN_STDERR,
    check_per_person_order,
    cli_argv,
    cli_env,
    record,
)

from cio_outbox import Outbox
from cio_outbox.sandbox import Sandbox

ENQUEUERS = 4
PERSONS_EACH = 12
SINGLES = 600  # one committed transaction each
BATCHES = 6  # enqueue_many calls of BATCH_SIZE
BATCH_SIZE = 400
PER_PROCESS = SINGLES + BATCHES * BATCH_SIZE

ENQUEUER = textwrap.dedent(
    """
    import sys
    from cio_outbox import Outbox

    db, part = sys.argv[1], int(sys.argv[2])
    persons, singles, batches, size = (int(x) for x in sys.argv[3:7])
    seq = {}

    def call(i):
        person = f"e{part}-p{i % persons}"
        n = seq.get(person, 0)
        seq[person] = n + 1
        return person, n

    with Outbox(db) as box:
        i = 0
        for _ in range(singles):
            person, n = call(i)
            if i % 3 == 0:
                box.identify(person, traits={"seq": n}, idempotency_key=f"{part}:{i}")
            else:
                box.track(person, "Clicked", properties={"seq": n},
                          idempotency_key=f"{part}:{i}")
            i += 1
        for _ in range(batches):
            calls, keys = [], []
            for _ in range(size):
                person, n = call(i)
                calls.append({"type": "track", "userId": person, "event": "Bulk",
                              "properties": {"seq": n}})
                keys.append(f"{part}:{i}")
                i += 1
            result = box.enqueue_many(calls, idempotency_keys=keys, on_invalid="raise")
            assert result.added == size, result.as_dict()
    print("done", i, flush=True)
    """
)


@pytest.mark.timeout(400)
def test_four_enqueuers_and_two_workers_share_one_file(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    db = str(tmp_path / "shared.db")
    Outbox(db).close()
    script = tmp_path / "enqueuer.py"
    script.write_text(ENQUEUER)
    total = ENQUEUERS * PER_PROCESS
    logs: dict[str, Path] = {}
    started = time.monotonic()
    with Sandbox() as sandbox:
        workers = []
        for n in range(2):
            logs[f"worker{n}"] = tmp_path / f"worker{n}.stderr"
            workers.append(subprocess.Popen(
                cli_argv("worker", "--db", db, "--host", sandbox.url, "--concurrency", "2"),
                env=cli_env(sandbox.key), stdout=subprocess.DEVNULL,
                stderr=logs[f"worker{n}"].open("wb"),
            ))
        enqueuers = []
        for part in range(ENQUEUERS):
            logs[f"enqueuer{part}"] = tmp_path / f"enqueuer{part}.stderr"
            enqueuers.append(subprocess.Popen(
                [sys.executable, str(script), db, str(part), str(PERSONS_EACH), str(SINGLES),
                 str(BATCHES), str(BATCH_SIZE)],
                env=cli_env(), stdout=subprocess.PIPE, stderr=logs[f"enqueuer{part}"].open("wb"),
            ))
        for proc in enqueuers:
            out, _ = proc.communicate(timeout=300)
            assert proc.returncode == 0, [p.read_text()[-2000:] for p in logs.values()]
            assert out.decode().strip() == f"done {PER_PROCESS}"
        enqueued_at = time.monotonic() - started
        deadline = time.monotonic() + 180
        while sandbox.stats()["messages"] < total and time.monotonic() < deadline:
            if any(w.poll() is not None for w in workers):
                break
            time.sleep(0.1)
        for proc in workers:  # SIGTERM: a graceful stop, exit code 0
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes = [proc.wait(timeout=60) for proc in workers]
        stats = sandbox.stats()
        arrivals = sandbox.messages(limit=10**7)

    for name, path in logs.items():
        text = path.read_text(errors="replace")
        for forbidden in FORBIDDEN_STDERR:
            assert forbidden not in text, f"{name}: {text[-2000:]}"
        assert "Error" not in text, f"{name}: {text[-2000:]}"
    assert codes == [0, 0], [logs[f"worker{n}"].read_text()[-2000:] for n in range(2)]
    with Outbox(db) as box:
        status = box.status()
        ids = {row["message_id"] for row in box.rows(limit=10**6)}
    received = [m["messageId"] for m in arrivals]
    assert (status["sent"], status["pending"], status["in_flight"], status["failed"]) == (
        total, 0, 0, 0)
    assert len(ids) == total
    assert len(received) == total and set(received) == ids  # nothing lost
    assert stats["duplicates"] == 0  # without faults, nothing was ever sent twice
    per_person = check_per_person_order(arrivals)  # each person's messages in order
    assert len(per_person) == ENQUEUERS * PERSONS_EACH
    assert sum(per_person.values()) == total
    record(request, tmp_path, "concurrency", {
        "messages": total, "requests": stats["requests"], "duplicates": stats["duplicates"],
        "enqueue_seconds": round(enqueued_at, 1),
        "seconds": round(time.monotonic() - started, 1)})
