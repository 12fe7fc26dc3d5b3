"""PostgreSQL lanes across processes (issue 17): a claim locks only the lanes it keeps,
and idle workers wake on another process's change (LISTEN/NOTIFY), not after polling.

Two storage objects on one schema stand for two processes: each has its own
connections, so nothing reaches one from the other but what goes through the server.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from cio_outbox.batch import MAX_BATCH_BYTES
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
    lock_chosen = PostgresStorage._lock_chosen

    def probe(self: PostgresStorage, cur: Any, chosen: list[Row]) -> list[Row]:
        # In the middle of the claim's transaction: the lanes it did not keep are free for
        # the claims of other processes (before, every free lane stayed locked to commit).
        seen.append(lockable_lanes(postgres_location))
        return lock_chosen(self, cur, chosen)

    monkeypatch.setattr(PostgresStorage, "_lock_chosen", probe)
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
