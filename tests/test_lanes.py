"""Lanes (issue 17): each person's rows travel in one lane; claims take free lanes.

Runs on both backends (see conftest.py): what a lane is, which lanes a claim takes, that
an older outbox gets its lanes computed, that idle senders wake on a change instead of
polling, and that several processes of several senders each keep every person's order.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from cio_outbox import Outbox
from cio_outbox.batch import MAX_BATCH_BYTES
from cio_outbox.sandbox import Sandbox, SandboxProcess
from cio_outbox.storage import NewRow, Storage, open_storage
from cio_outbox.storage.base import Row
from cio_outbox.storage.lanes import LANES, lane_of, lanes_per_claim


def new_row(n: int, person: str, call_type: str = "track") -> NewRow:
    payload = json.dumps({"type": call_type, "userId": person, "event": f"e{n}",
                          "messageId": f"m{n}"}, separators=(",", ":"))
    return NewRow(f"m{n}", "r", call_type, person, payload, len(payload.encode()))


def claim(storage: Storage, worker: str = "w1", *, max_messages: int = 5000) -> list[Row]:
    return storage.claim(worker, lease_seconds=60.0, max_bytes=MAX_BATCH_BYTES,
                         max_messages=max_messages)


def people_by_lane(count: int) -> dict[int, list[str]]:
    lanes: dict[int, list[str]] = defaultdict(list)
    for i in range(count):
        lanes[lane_of(f"user-{i}")].append(f"user-{i}")
    return lanes


@pytest.fixture
def storage(outbox: Outbox) -> Storage:
    return outbox.storage


def _lanes(storage: Storage) -> dict[str, int]:
    return {r["message_id"]: r["lane"] for r in storage.rows(limit=10_000)}


def test_lane_of_is_a_stable_hash_not_pythons_hash() -> None:
    # blake2b-64 of the UTF-8 bytes, modulo the lanes: the same in every process.
    from hashlib import blake2b

    digest = int.from_bytes(blake2b(b"user-1", digest_size=8).digest(), "big")
    assert lane_of("user-1") == digest % LANES
    assert lane_of("user-1", 7) == digest % 7
    code = "from cio_outbox.storage.lanes import lane_of; print(lane_of('caf\u00e9'))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env={**os.environ, "PYTHONHASHSEED": "123"}, check=True)
    assert int(other.stdout) == lane_of("caf\u00e9")
    assert len({lane_of(f"user-{i}") for i in range(1000)}) == LANES


def test_enqueue_stores_the_persons_lane_and_an_alias_takes_its_persons_lane(
    outbox: Outbox,
) -> None:
    outbox.enqueue({"type": "track", "userId": "ann", "event": "E", "messageId": "t1"})
    outbox.enqueue({"type": "alias", "userId": "ann", "previousId": "anon-9",
                    "messageId": "a1"})
    outbox.enqueue({"type": "identify", "anonymousId": "anon-9", "messageId": "i1"})
    assert _lanes(outbox.storage) == {"t1": lane_of("ann"), "a1": lane_of("ann"),
                                      "i1": lane_of("anon-9")}
    assert outbox.storage.lanes == LANES  # type: ignore[attr-defined]


def test_a_busy_lane_holds_back_every_person_in_it_and_other_lanes_go(
    storage: Storage,
) -> None:
    lanes = people_by_lane(400)
    shared = next(people for people in lanes.values() if len(people) >= 2)
    a, b = shared[:2]
    c = next(people[0] for lane, people in lanes.items() if lane != lane_of(a))
    storage.insert([new_row(0, a), new_row(1, b), new_row(2, c), new_row(3, a)])
    first = claim(storage, max_messages=1)
    assert [r.message_id for r in first] == ["m0"]
    # b shares a's lane, which is in flight: only c's lane is free.
    assert [r.message_id for r in claim(storage, "w2")] == ["m2"]
    assert claim(storage, "w3") == []
    storage.release(first, next_attempt_at=time.time() + 30)  # deferred: still busy
    assert claim(storage, "w3") == []
    held = {r["message_id"] for r in storage.rows(status="in_flight")}
    assert held == {"m2"}


def _one_row_per_lane(storage: Storage, start: int = 0) -> list[str]:
    """One row per lane, the lanes' heads in reverse lane order; the people, by lane."""
    lanes = people_by_lane(2000)
    people = [lanes[lane][0] for lane in range(LANES)]
    storage.insert([new_row(start + i, person) for i, person in enumerate(reversed(people))])
    return people


def test_an_uncontended_claim_takes_every_free_lane_in_enqueue_order(
    storage: Storage,
) -> None:
    _one_row_per_lane(storage)
    taken = claim(storage)
    if "postgresql" in storage.location:
        # PostgreSQL: alone, a claim takes the lanes a shared claim would (the oldest);
        # workers starting together then find lanes free (see PostgresStorage._keep_lanes).
        assert [r.message_id for r in taken] == [f"m{i}" for i in range(lanes_per_claim(
            LANES))]
        return
    # Alone, a claim takes a run of consecutive ids over all lanes (as before lanes).
    assert [r.message_id for r in taken] == [f"m{i}" for i in range(LANES)]


def test_a_lone_claim_takes_the_rows_of_several_runs_in_enqueue_order(
    storage: Storage,
) -> None:
    # Runs interleaved row by row: a claim alone reads each run's pending rows in id order
    # and merges them, so a person's rows of two runs still leave in enqueue order.
    people = [f"user-{i}" for i in range(7)]
    rows = [new_row(i, people[i % 7]) for i in range(60)]
    for i, row in enumerate(rows):
        row.run = ("a", "b", "c")[i % 3]
    storage.insert(rows)
    assert storage.oldest_pending() == storage.rows(limit=1)[0]["created_at"]
    taken = claim(storage, max_messages=25)
    assert [r.message_id for r in taken] == [f"m{i}" for i in range(25)]
    assert [r.run for r in taken] == [("a", "b", "c")[i % 3] for i in range(25)]
    storage.mark_sent(taken[:10])
    storage.release(taken[10:])
    assert [r.message_id for r in claim(storage)] == [f"m{i}" for i in range(10, 60)]


def test_a_claim_of_one_run_finds_its_rows_behind_a_large_backlog_of_another(
    storage: Storage,
) -> None:
    backlog = [new_row(i, f"user-{i % 50}") for i in range(25_000)]
    for row in backlog:
        row.run = "big"
    storage.insert(backlog)
    later = [new_row(30_000 + i, f"user-{i % 50}") for i in range(20)]
    for row in later:
        row.run = "small"
    storage.insert(later)
    assert storage.oldest_pending("small") == storage.message("m30000")["created_at"]
    # SQLite's lone claim takes every free lane, PostgreSQL's a share of them: claimed
    # until nothing is left, every row of the small run comes, each claim in id order.
    taken: list[str] = []
    while claimed := storage.claim("w1", lease_seconds=60.0, max_bytes=MAX_BATCH_BYTES,
                                   max_messages=5000, run="small"):
        assert [r.id for r in claimed] == sorted(r.id for r in claimed)
        taken += [r.message_id for r in claimed]
        assert len(taken) <= 20
    assert sorted(taken) == [f"m{30_000 + i}" for i in range(20)]


def test_a_claim_that_finds_only_its_own_workers_rows_in_flight_takes_no_write_lock(
    tmp_path: Path,
) -> None:
    from cio_outbox.storage.sqlite import SQLiteStorage

    storage = SQLiteStorage(tmp_path / "o.db")
    storage.insert([new_row(i, "ann") for i in range(3)])
    assert claim(storage, "w1", max_messages=1)
    statements: list[str] = []
    storage.conn.set_trace_callback(statements.append)  # type: ignore[attr-defined]
    # Another sender of the same worker: ann's lane is busy with w1's own row, which is
    # no other worker's to wait for, so the empty claim only reads.
    assert claim(storage, "w1") == []
    storage.conn.set_trace_callback(None)  # type: ignore[attr-defined]
    assert statements and not [sql for sql in statements if sql.startswith("BEGIN")]
    # A worker whose claim finds the lanes held by another does record that it waits.
    assert claim(storage, "w2") == []
    assert [r[0] for r in storage.conn.execute(  # type: ignore[attr-defined]
        "SELECT worker_id FROM claimants")] == ["w2"]
    storage.close()


def test_a_claim_shares_the_free_lanes_with_its_callers_senders_oldest_first(
    storage: Storage,
) -> None:
    _one_row_per_lane(storage)
    taken = storage.claim("w1", lease_seconds=60.0, max_bytes=MAX_BATCH_BYTES,
                          max_messages=5000, share=4)
    assert [r.message_id for r in taken] == [f"m{i}" for i in range(LANES // 4)]
    assert len({lane_of(r.person) for r in taken}) == LANES // 4
    # Never fewer than lanes // 8 lanes, however many senders want rows.
    few = storage.claim("w1", lease_seconds=60.0, max_bytes=MAX_BATCH_BYTES,
                        max_messages=5000, share=64)
    assert [r.message_id for r in few] == [f"m{i}" for i in range(16, 16 + lanes_per_claim(
        LANES))]


def test_a_worker_whose_claim_found_no_free_lane_gets_a_share_of_the_next_claims(
    storage: Storage,
) -> None:
    _one_row_per_lane(storage)
    first = claim(storage, "w1")
    while "postgresql" in storage.location and (more := claim(storage, "w1")):
        first += more  # a lone claim on PostgreSQL takes lanes_per_claim lanes
    assert len(first) == LANES
    _one_row_per_lane(storage, start=LANES)  # every lane busy: w2 finds nothing
    assert claim(storage, "w2") == []
    storage.mark_sent(first)
    # w2 waits, so w1 takes only half of the free lanes, the oldest ones; w2 the rest.
    again = claim(storage, "w1")
    assert [r.message_id for r in again] == [f"m{LANES + i}" for i in range(LANES // 2)]
    rest = claim(storage, "w2")
    if "postgresql" in storage.location:
        # PostgreSQL counts every worker that claimed in the last 5 s (see
        # PostgresStorage._note_claimant): w2 shares the free half with w1.
        assert [r.message_id for r in rest] == [f"m{LANES + i}"
                                                for i in range(LANES // 2, 3 * LANES // 4)]
        return
    assert [r.message_id for r in rest] == [f"m{LANES + i}" for i in range(LANES // 2, LANES)]
    # w2 was served: nobody waits any more, and a claim alone takes every free lane.
    storage.mark_sent(again + rest)
    _one_row_per_lane(storage, start=2 * LANES)
    assert len(claim(storage, "w1")) == LANES


def test_a_row_replaced_with_another_person_moves_to_that_persons_lane(
    storage: Storage,
) -> None:
    storage.insert([new_row(0, "ann")])
    taken = claim(storage)
    storage.dead_letter([(taken[0], "bad")])
    payload = json.dumps({"type": "track", "userId": "bob", "event": "e0",
                          "messageId": "m0"})
    assert storage.replace_failed(taken[0].id, payload=payload, size=len(payload),
                                  call_type="track", person="bob")
    assert _lanes(storage) == {"m0": lane_of("bob")}


def test_an_idle_waiter_wakes_when_rows_are_released_and_times_out_otherwise(
    storage: Storage,
) -> None:
    storage.insert([new_row(0, "ann")])
    taken = claim(storage)
    seen = storage.changes  # type: ignore[attr-defined]
    assert storage.wait_for_change(seen, 0.05) is False  # type: ignore[attr-defined]
    releaser = threading.Timer(0.1, lambda: storage.release(taken))
    releaser.start()
    try:
        assert storage.wait_for_change(seen, 60.0) is True  # type: ignore[attr-defined]
    finally:
        releaser.join()
    assert [r.message_id for r in claim(storage)] == ["m0"]
    seen = storage.changes  # type: ignore[attr-defined]
    storage.insert([new_row(1, "bob")])
    assert storage.wait_for_change(seen, 0.0) is True  # type: ignore[attr-defined]


def test_idle_senders_wake_when_rows_are_enqueued_not_after_their_interval(
    outbox: Outbox, sandbox: Sandbox,
) -> None:
    # idle_interval far beyond the test's patience: the senders, idle on an empty outbox,
    # must be woken by the enqueue (same Outbox in this process), not by polling.
    worker = outbox.worker(key=sandbox.key, host=sandbox.url, concurrency=2,
                           idle_interval=600.0)
    outcome: list[Any] = []
    runner = threading.Thread(target=lambda: outcome.append(worker.run()))
    runner.start()
    try:
        time.sleep(0.3)  # both senders found nothing and wait
        outbox.enqueue_many([{"type": "track", "userId": f"u{i % 3}", "event": "E",
                              "properties": {"seq": i}} for i in range(30)])
        deadline = time.monotonic() + 30
        while outbox.storage.counts()["sent"] < 30 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert outbox.storage.counts()["sent"] == 30
    finally:
        worker.stop()  # wakes the idle senders too
        runner.join(timeout=30)
        worker.client.close()
    assert not runner.is_alive() and outcome[0].sent == 30
    seqs: dict[str, list[int]] = defaultdict(list)
    for message in sandbox.messages():
        seqs[message["userId"]].append(message["properties"]["seq"])
    assert {k: sorted(v) for k, v in seqs.items()} == seqs


def test_leases_say_who_holds_rows_in_flight_and_until_when(storage: Storage) -> None:
    storage.insert([new_row(i, f"user-{i}") for i in range(40)])
    first = claim(storage, "host-1:41", max_messages=5)
    second = claim(storage, "host-2:7", max_messages=3)
    storage.extend_lease(second, 5.0)  # expires before the first claim's 60 s
    leases = storage.leases()  # type: ignore[attr-defined]
    assert [(e["worker_id"], e["rows"]) for e in leases] == [("host-2:7", len(second)),
                                                              ("host-1:41", len(first))]
    assert leases[0]["expires_first"] <= leases[0]["expires_last"] < leases[1]["expires_first"]
    storage.mark_sent(first)
    assert [e["worker_id"] for e in storage.leases()] == ["host-2:7"]  # type: ignore[attr-defined]
    assert storage.leases(run="other") == []  # type: ignore[attr-defined]


def test_the_progress_line_names_the_worker_whose_leases_hold_the_rows(
    outbox: Outbox, sandbox: Sandbox,
) -> None:
    outbox.enqueue_many([{"type": "track", "userId": f"u{i % 40}", "event": "E"}
                         for i in range(120)])
    held = 0
    while taken := outbox.storage.claim("dead-host:1234", lease_seconds=1.5,
                                        max_bytes=MAX_BATCH_BYTES, max_messages=5000):
        held += len(taken)
    assert held == 120
    until = time.strftime("%H:%M:%S", time.localtime(
        outbox.storage.leases()[0]["expires_last"]))  # type: ignore[attr-defined]
    lines: list[str] = []
    worker = outbox.worker(key=sandbox.key, host=sandbox.url, progress_interval=0.1,
                           idle_interval=0.05, on_progress=lambda p: lines.append(p.line()))
    result = worker.run(until_empty=True, timeout=60)
    worker.client.close()
    assert result.sent == 120 and not result.stopped
    expected = f"[waiting for 120 rows leased by worker dead-host:1234 until {until}]"
    assert any(line.endswith(expected) for line in lines), lines[:3]
    assert "waiting for" not in lines[-1]


# -- an older outbox -------------------------------------------------------------------


def _old_rows() -> list[tuple[Any, ...]]:
    rows = []
    for n, (person, status) in enumerate([("ann", "pending"), ("bob", "failed"),
                                          ("cy", "in_flight"), ("dee", "sent")]):
        payload = json.dumps({"type": "track", "userId": person, "event": "E",
                              "messageId": f"m{n}"})
        rows.append((f"m{n}", "r", "track", person, payload, len(payload), status, 0, 1.0,
                     1.0))
    return rows


def test_an_sqlite_outbox_of_schema_version_4_gets_its_lanes(tmp_path: Path) -> None:
    import sqlite3

    from cio_outbox.storage import schema
    from cio_outbox.storage.sqlite_schema import add_status_check, statements

    path = tmp_path / "old.db"
    conn = sqlite3.connect(path, isolation_level=None)
    for number in range(4):
        for statement in statements(schema.render(number, schema.SQLITE, "")):
            conn.execute(statement)
        if number + 1 == 3:
            add_status_check(conn)
    conn.executemany("INSERT INTO messages (message_id, run, call_type, person, payload, size,"
                     " status, attempts, created_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
                     _old_rows())
    conn.execute("INSERT INTO counts VALUES ('r', 'pending', 1), ('r', 'failed', 1),"
                 " ('r', 'in_flight', 1), ('r', 'sent', 1)")
    conn.execute("PRAGMA user_version = 4")
    conn.close()
    _check_migrated(open_storage(path))
    # Migration 6 dropped the pending index by id: the index set is a new outbox's.
    conn = sqlite3.connect(path)
    assert {name for (name,) in conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'messages'"
        " AND sql IS NOT NULL")} == MESSAGE_INDEXES
    conn.close()


def test_a_postgres_outbox_of_schema_version_4_gets_its_lanes(postgres_location: str) -> None:
    import psycopg

    from cio_outbox.storage import schema
    from cio_outbox.storage.postgres import split_location

    plain, name = split_location(postgres_location)
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {name}")
        conn.execute(f"CREATE TABLE {name}.schema_version (version INTEGER PRIMARY KEY,"
                     " applied_at DOUBLE PRECISION NOT NULL)")
        for number in range(4):
            conn.execute(schema.render(number, schema.POSTGRES, f"{name}."))
            conn.execute(f"INSERT INTO {name}.schema_version VALUES ({number + 1}, 0)")
        with conn.cursor() as cur:
            cur.executemany(
                f"INSERT INTO {name}.messages (message_id, run, call_type, person, payload,"
                " size, status, attempts, created_at, updated_at)"
                " VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)", _old_rows())
        conn.execute(f"INSERT INTO {name}.counts VALUES ('r', 'pending', 1),"
                     " ('r', 'failed', 1), ('r', 'in_flight', 1), ('r', 'sent', 1)")
    _check_migrated(open_storage(postgres_location))


def _check_migrated(storage: Storage) -> None:
    from cio_outbox.storage import schema

    assert storage.schema_version == schema.SCHEMA_VERSION  # type: ignore[attr-defined]
    assert storage.lanes == LANES  # type: ignore[attr-defined]
    # Rows not sent get their person's lane; a sent row is never claimed again.
    assert _lanes(storage) == {"m0": lane_of("ann"), "m1": lane_of("bob"),
                               "m2": lane_of("cy"), "m3": 0}
    taken = claim(storage)
    assert [r.message_id for r in taken] == ["m0"]
    assert storage.requeue() == 1
    assert [r.message_id for r in claim(storage)] == ["m1"]
    storage.close()


def test_postgres_claims_skip_lanes_another_claim_holds(postgres_location: str) -> None:
    import psycopg

    from cio_outbox.storage.postgres import split_location

    plain, name = split_location(postgres_location)
    storage = open_storage(postgres_location)
    lanes = people_by_lane(400)
    a, b = lanes[0][0], lanes[1][0]
    storage.insert([new_row(0, a), new_row(1, b), new_row(2, a)])
    with psycopg.connect(plain) as other:  # another claim, in the middle of its transaction
        other.execute(f"SELECT lane FROM {name}.lanes WHERE lane = 0 FOR UPDATE")
        started = time.monotonic()
        assert [r.message_id for r in claim(storage)] == ["m1"]
        assert time.monotonic() - started < 30  # it did not wait for the other lock
        other.rollback()
    assert [r.message_id for r in claim(storage)] == ["m0", "m2"]
    storage.close()


# -- several processes of several senders ----------------------------------------------

#: More people than a batch holds (max_messages=25 below): a batch of 25 consecutive calls
#: of 24 people held every busy lane, so whichever process claimed first kept every lane
#: busy and, on a fast machine, sent everything while the others found nothing free.
PEOPLE = 120
CALLS = 3000
DRAINER = """
import json, pathlib, sys, time
from cio_outbox import Outbox
location, host, key, name, gate = sys.argv[1:6]
box = Outbox(location)
worker = box.worker(key=key, host=host, concurrency=3, max_messages=25, worker_id=name,
                    idle_interval=0.05, backoff_initial=0.05)
# All processes start draining together: a fast machine otherwise drains the outbox in
# the first process before the others have imported the package.
pathlib.Path(gate, name).touch()
while not pathlib.Path(gate, "go").exists():
    time.sleep(0.005)
result = worker.run(until_empty=True, timeout=150)
worker.client.close()
box.close()
print(json.dumps({"sent": result.sent, "exit": result.exit_code, "error": result.error}))
"""


def test_several_processes_of_several_senders_keep_each_persons_order(
    outbox_location: str, tmp_path: Path,
) -> None:
    box = Outbox(outbox_location)
    box.enqueue_many([{"type": "track", "userId": f"u{i % PEOPLE}", "event": "Step",
                       "properties": {"seq": i}} for i in range(CALLS)])
    gate = tmp_path / "gate"
    gate.mkdir()
    with SandboxProcess(latency=0.02) as sandbox:
        procs = [subprocess.Popen(
            [sys.executable, "-c", DRAINER, outbox_location, sandbox.url, sandbox.key,
             f"w{i}", str(gate)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            stdin=subprocess.DEVNULL) for i in range(3)]
        deadline = time.monotonic() + 120
        while len([p for p in gate.iterdir() if p.name != "go"]) < len(procs):
            assert time.monotonic() < deadline, "the drainers never got ready"
            assert all(proc.poll() is None for proc in procs), \
                [proc.communicate()[1][-3000:] for proc in procs if proc.poll() is not None]
            time.sleep(0.01)
        (gate / "go").touch()
        results = []
        for proc in procs:
            out, err = proc.communicate(timeout=200)
            assert proc.returncode == 0, err[-3000:]
            results.append(json.loads(out.strip().splitlines()[-1]))
        received = sandbox.messages()
        stats = sandbox.stats()
    assert all(r["exit"] == 0 for r in results), results
    assert sum(r["sent"] for r in results) == CALLS
    assert stats["messages"] == CALLS and stats["duplicates"] == 0
    # More than one process did work: the lanes let them send at once.
    print("sent by process:", [r["sent"] for r in results])
    assert sum(1 for r in results if r["sent"]) >= 2, results
    seqs: dict[str, list[int]] = defaultdict(list)
    for message in received:  # in the order the sandbox stored them
        seqs[message["userId"]].append(message["properties"]["seq"])
    assert len(seqs) == PEOPLE
    for person, got in seqs.items():
        assert got == sorted(got), person
    assert box.storage.counts() == {"pending": 0, "in_flight": 0, "sent": CALLS, "failed": 0}
    box.close()


#: The indexes of messages besides its primary key (each costs every insert and every
#: status change): what the queries below need, nothing more.
MESSAGE_INDEXES = {
    "messages_pending_run", "messages_failed", "messages_sent",
    "messages_in_flight", "messages_lane_pending", "messages_lane_deferred",
}


def test_claims_use_the_lane_indexes_and_scan_no_table_and_no_index_is_unused(
    tmp_path: Path,
) -> None:
    import sqlite3

    from cio_outbox.storage.sqlite import SQLiteStorage

    storage = SQLiteStorage(tmp_path / "o.db")
    conn = sqlite3.connect(tmp_path / "o.db")
    indexes = {name for (name,) in conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'messages'"
        " AND sql IS NOT NULL")}
    assert indexes == MESSAGE_INDEXES
    people = _one_row_per_lane(storage)
    storage.insert([new_row(100 + i, person) for i, person in enumerate(people)])
    statements: list[str] = []
    storage.conn.set_trace_callback(statements.append)  # type: ignore[attr-defined]
    alone = storage.claim("w1", lease_seconds=0.05, max_bytes=MAX_BATCH_BYTES,
                          max_messages=5000)
    time.sleep(0.1)  # its lease expires: the next claim takes the rows back
    shared = storage.claim("w2", lease_seconds=60, max_bytes=MAX_BATCH_BYTES,
                           max_messages=5000, share=4)
    storage.release(shared[:1], next_attempt_at=time.time() + 60)
    storage.mark_sent(shared[1:])
    storage.claim("w2", lease_seconds=60, max_bytes=MAX_BATCH_BYTES, max_messages=5000,
                  run="r")
    storage.oldest_pending()
    storage.oldest_pending("r")
    storage.conn.set_trace_callback(None)  # type: ignore[attr-defined]
    assert alone and shared
    used: set[str] = set()
    for sql in statements:
        if "messages" not in sql or sql.split()[0] not in ("SELECT", "UPDATE", "WITH"):
            continue
        plan = [row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + sql)]
        for step in plan:
            # A full scan of messages (under its name or an alias) would read every row.
            table_scan = step.startswith("SCAN") and "INDEX" not in step and any(
                f" {name}" in step + " " for name in ("messages ", "b ", "h "))
            assert not table_scan, (sql, plan)
            used |= {name for name in MESSAGE_INDEXES if f"INDEX {name} " in step + " "}
    # Every index but those of other commands (failed rows, purge) serves these queries.
    assert used == MESSAGE_INDEXES - {"messages_failed", "messages_sent"}


# -- a stable default worker id --------------------------------------------------------


def test_running_workers_on_one_host_never_share_a_slot_and_a_freed_slot_comes_back(
    storage: Storage,
) -> None:
    import socket

    first = storage.worker_slot()  # type: ignore[attr-defined]
    second = storage.worker_slot()  # type: ignore[attr-defined]
    try:
        assert first.worker_id == f"{socket.gethostname()}:w0"
        assert second.worker_id == f"{socket.gethostname()}:w1"
        first.release()
        again = storage.worker_slot()  # type: ignore[attr-defined]
        assert again.worker_id == f"{socket.gethostname()}:w0"
        again.release()
    finally:
        first.release()
        second.release()


HOLDER = """
import sys
from cio_outbox import Outbox
location, host, key = sys.argv[1:4]
Outbox(location).worker(key=key, host=host, concurrency=2, max_messages=20).run()
"""


def test_a_sigkilled_worker_restarted_on_its_host_takes_back_its_rows_at_once(
    outbox_location: str, tmp_path: Path,
) -> None:
    import signal
    import socket

    box = Outbox(outbox_location)
    box.enqueue_many([{"type": "track", "userId": f"u{i % 10}", "event": "E",
                       "properties": {"seq": i}} for i in range(200)])
    stable = f"{socket.gethostname()}:w0"
    with SandboxProcess(latency=30.0) as slow:
        # The first worker claims rows and waits for a server that answers late: killed.
        holder = subprocess.Popen([sys.executable, "-c", HOLDER, outbox_location, slow.url,
                                   slow.key], stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 60
            while not box.storage.leases() and time.monotonic() < deadline:  # type: ignore[attr-defined]
                assert holder.poll() is None, holder.stderr.read() if holder.stderr else ""
                time.sleep(0.05)
            leases = box.storage.leases()  # type: ignore[attr-defined]
            assert [e["worker_id"] for e in leases] == [stable]
            assert leases[0]["expires_first"] > time.time() + 60  # the default lease
        finally:
            holder.send_signal(signal.SIGKILL)
            holder.wait(timeout=30)
    with SandboxProcess() as fast:
        started = time.monotonic()
        again = subprocess.run(
            [sys.executable, "-m", "cio_outbox", "worker", "--db", outbox_location,
             "--host", fast.url, "--until-empty"],
            env={**os.environ, "CIO_API_KEY": fast.key}, capture_output=True, text=True,
            timeout=120, stdin=subprocess.DEVNULL)
        took = time.monotonic() - started
        received = fast.messages()
    assert again.returncode == 0, again.stderr[-3000:]
    # At once, not after the dead worker's 120 s leases: it took back its own rows.
    assert took < 60, took
    assert "waiting for" not in again.stdout + again.stderr
    assert box.storage.counts() == {"pending": 0, "in_flight": 0, "sent": 200, "failed": 0}
    assert len(received) == 200
    assert {a["worker_id"] for a in box.storage.attempts(limit=1000)} == {stable}
    box.close()
