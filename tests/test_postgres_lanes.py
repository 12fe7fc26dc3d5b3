"""PostgreSQL lanes across processes (issue 17): a claim locks only the lanes it keeps,
and idle workers wake on another process's change (LISTEN/NOTIFY), not after polling.

Two storage objects on one schema stand for two processes: each has its own
connections, so nothing reaches one from the other but what goes through the server.
"""

from __future__ import annotations

import json
import threading
import time
from collections import defaultdict
from typing import Any

import pytest

from cio_outbox import Outbox
from cio_outbox.batch import MAX_BATCH_BYTES
from cio_outbox.sandbox import Sandbox
from cio_outbox.storage import NewRow, open_storage
from cio_outbox.storage.base import Row
from cio_outbox.storage.lanes import LANES, lane_of
from cio_outbox.storage.postgres import PostgresStorage, split_location


def new_row(n: int, person: str) -> NewRow:
    payload = json.dumps({"type": "track", "userId": person, "event": f"e{n}",
                          "messageId": f"m{n}"}, separators=(",", ":"))
    return NewRow(f"m{n}", "r", "track", person, payload, len(payload.encode()))


def one_row_per_lane(storage: Any, start: int = 0) -> None:
    """One row in every lane, lane i's row enqueued i-th."""
    people: dict[int, str] = {}
    i = 0
    while len(people) < LANES:
        people.setdefault(lane_of(f"user-{i}"), f"user-{i}")
        i += 1
    storage.insert([new_row(start + lane, people[lane]) for lane in range(LANES)])


def claim(storage: Any, worker: str = "w1", share: int = 1) -> list[Row]:
    return storage.claim(worker, lease_seconds=60.0, max_bytes=MAX_BATCH_BYTES,
                         max_messages=5000, share=share)


def lockable_lanes(location: str) -> int:
    """How many lanes another claim could lock right now."""
    import psycopg

    plain, schema = split_location(location)
    with psycopg.connect(plain) as other:
        return len(other.execute(f"SELECT lane FROM {schema}.lanes FOR UPDATE SKIP LOCKED")
                   .fetchall())


def test_a_shared_claim_locks_only_the_lanes_it_keeps(
    postgres_location: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    storage = open_storage(postgres_location)
    assert isinstance(storage, PostgresStorage)
    one_row_per_lane(storage)
    seen: list[int] = []
    lease_chosen = PostgresStorage._lease_chosen

    def probe(self: PostgresStorage, cur: Any, chosen: list[Row], lease: Any) -> list[Row]:
        # In the middle of the claim's transaction: the lanes it did not keep are free for
        # the claims of other processes (before, every free lane stayed locked to commit).
        seen.append(lockable_lanes(postgres_location))
        return lease_chosen(self, cur, chosen, lease)

    monkeypatch.setattr(PostgresStorage, "_lease_chosen", probe)
    taken = claim(storage, share=4)
    assert [r.message_id for r in taken] == [f"m{i}" for i in range(LANES // 4)]
    assert seen == [LANES - LANES // 4]
    storage.close()


def test_a_claim_skips_lanes_another_claim_locks_and_still_takes_its_share(
    postgres_location: str,
) -> None:
    import psycopg

    storage = open_storage(postgres_location)
    one_row_per_lane(storage)
    plain, schema = split_location(postgres_location)
    with psycopg.connect(plain) as other:  # another claim holds the 8 oldest lanes
        other.execute(f"SELECT lane FROM {schema}.lanes WHERE lane < 8 FOR UPDATE")
        taken = claim(storage, share=4)
        other.rollback()
    assert [r.message_id for r in taken] == [f"m{i}" for i in range(8, 8 + LANES // 4)]
    storage.close()


def test_an_idle_waiter_wakes_on_a_change_made_by_another_process(
    postgres_location: str,
) -> None:
    waiter, other = open_storage(postgres_location), open_storage(postgres_location)
    try:
        other.insert([new_row(0, "ann")])
        taken = claim(other)
        for change in (lambda: other.release(taken), lambda: other.insert([new_row(1, "bob")])):
            seen = waiter.changes  # type: ignore[attr-defined]
            assert waiter.wait_for_change(seen, 0.05) is False  # type: ignore[attr-defined]
            timer = threading.Timer(0.2, change)
            timer.start()
            try:
                # Far beyond any poll: only the server's notification can end this wait.
                assert waiter.wait_for_change(seen, 120.0) is True  # type: ignore[attr-defined]
            finally:
                timer.join()
        # A change of its own wakes it too (the same process), once.
        seen = waiter.changes  # type: ignore[attr-defined]
        waiter.insert([new_row(2, "cy")])
        assert waiter.changes == seen + 1  # type: ignore[attr-defined]
    finally:
        waiter.close()
        other.close()


def test_an_idle_worker_sends_rows_another_process_enqueues_without_polling(
    postgres_location: str, sandbox: Sandbox,
) -> None:
    box, producer = Outbox(postgres_location), Outbox(postgres_location)
    worker = box.worker(key=sandbox.key, host=sandbox.url, concurrency=1,
                        idle_interval=600.0)
    outcome: list[Any] = []
    runner = threading.Thread(target=lambda: outcome.append(worker.run()))
    runner.start()
    try:
        time.sleep(0.5)  # the sender found nothing and waits
        producer.enqueue_many([{"type": "track", "userId": f"u{i % 3}", "event": "E",
                                "properties": {"seq": i}} for i in range(30)])
        deadline = time.monotonic() + 60
        while box.storage.counts()["sent"] < 30 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert box.storage.counts()["sent"] == 30
    finally:
        worker.stop()
        runner.join(timeout=30)
        worker.client.close()
        producer.close()
        box.close()
    assert not runner.is_alive() and outcome[0].sent == 30
    seqs: dict[str, list[int]] = defaultdict(list)
    for message in sandbox.messages():
        seqs[message["userId"]].append(message["properties"]["seq"])
    assert {k: sorted(v) for k, v in seqs.items()} == seqs


def test_closing_a_storage_stops_its_listener(postgres_location: str) -> None:
    storage = open_storage(postgres_location)
    storage.wait_for_change(storage.changes, 0.05)  # type: ignore[attr-defined]
    listeners = [t for t in threading.enumerate() if t.name.startswith("cio-listen")]
    assert listeners
    storage.close()
    for thread in listeners:
        thread.join(timeout=10)
    assert not any(t.is_alive() for t in listeners)


def test_workers_served_a_moment_ago_still_share_the_free_lanes(
    postgres_location: str,
) -> None:
    # Two workers whose requests ended together: the first to claim again must leave the
    # other its share, although neither waited last time (both were served).
    storage = open_storage(postgres_location)
    one_row_per_lane(storage)
    first = claim(storage, "w1")
    while more := claim(storage, "w1"):  # alone, a claim takes lanes_per_claim lanes
        first += more
    assert len(first) == LANES and claim(storage, "w2") == []
    storage.mark_sent(first)
    one_row_per_lane(storage, start=LANES)
    ones, twos = claim(storage, "w1"), claim(storage, "w2")
    assert len(ones) == LANES // 2 and len(twos) == LANES // 4
    storage.mark_sent(ones + twos)
    one_row_per_lane(storage, start=3 * LANES)
    again = claim(storage, "w1")
    assert len({lane_of(r.person) for r in again}) == LANES // 2
    mine = {lane_of(r.person) for r in claim(storage, "w2")}
    assert len(mine) == LANES // 4 and not mine & {lane_of(r.person) for r in again}
    storage.close()


def test_a_claim_whose_lanes_went_busy_before_it_locked_them_takes_the_next_free_ones(
    postgres_location: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    storage, other = open_storage(postgres_location), open_storage(postgres_location)
    one_row_per_lane(storage)
    free_lanes = PostgresStorage._free_lanes
    theirs: list[Row] = []

    def stale(self: PostgresStorage, cur: Any, now: float, run: str | None) -> Any:
        free = free_lanes(self, cur, now, run)
        if self is storage and not theirs:  # another worker claims and commits meanwhile
            theirs.extend(claim(other, "w2"))
        return free

    monkeypatch.setattr(PostgresStorage, "_free_lanes", stale)
    mine = claim(storage, "w1")
    # w2 took the 8 oldest lanes, and counts as a claimant: w1 keeps its share (half of
    # the 64 it read as free), taking the next free lanes for those that went busy.
    assert len({lane_of(r.person) for r in theirs}) == 8
    assert len({lane_of(r.person) for r in mine}) == LANES // 2
    assert not {lane_of(r.person) for r in mine} & {lane_of(r.person) for r in theirs}
    storage.close()
    other.close()
