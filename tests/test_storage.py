"""The storage seam, behaviour by behaviour, on every backend (SQLite and PostgreSQL).

Every test here that takes ``outbox`` or ``outbox_location`` runs once per backend (see
conftest.py); a few at the end check what only one backend has.
"""

from __future__ import annotations

import json
import os
import random
import re
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cio_outbox import Outbox
from cio_outbox.batch import MAX_BATCH_BYTES
from cio_outbox.sandbox import Sandbox
from cio_outbox.storage import Attempt, NewRow, Storage, StorageError, open_storage
from cio_outbox.storage.base import Row

LEASE = 60.0


def new_row(n: int, person: str = "p", run: str = "r", call_type: str = "track",
            extra: dict[str, Any] | None = None) -> NewRow:
    payload = json.dumps({"type": call_type, "userId": person, "event": f"e{n}",
                          "messageId": f"m{n}", **(extra or {})}, separators=(",", ":"))
    return NewRow(f"m{n}", run, call_type, person, payload, len(payload.encode()))


def claim(storage: Storage, worker: str = "w1", *, lease: float = LEASE,
          max_messages: int = 5000, run: str | None = None) -> list[Row]:
    return storage.claim(worker, lease_seconds=lease, max_bytes=MAX_BATCH_BYTES,
                         max_messages=max_messages, run=run)


def truth(storage: Storage) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
    """Counts computed from the rows themselves (what the counts table must agree with)."""
    total = {"pending": 0, "in_flight": 0, "sent": 0, "failed": 0}
    by_run: dict[str, dict[str, int]] = defaultdict(
        lambda: {"pending": 0, "in_flight": 0, "sent": 0, "failed": 0}
    )
    for row in storage.rows(limit=1_000_000):
        total[row["status"]] += 1
        by_run[row["run"]][row["status"]] += 1
    return total, dict(by_run)


def assert_counts_right(storage: Storage) -> None:
    total, by_run = truth(storage)
    assert storage.counts() == total
    for run, counts in by_run.items():
        assert storage.counts(run) == counts
    assert {r["run"]: {k: r[k] for k in total} for r in storage.runs()} == {
        run: counts for run, counts in by_run.items() if any(counts.values())
    }


@pytest.fixture
def storage(outbox: Outbox) -> Storage:
    return outbox.storage


# -- enqueue -------------------------------------------------------------------------------


def test_insert_is_idempotent_on_message_id_and_counted(storage: Storage) -> None:
    assert storage.insert([new_row(i, person=f"p{i % 3}") for i in range(10)]) == 10
    assert storage.insert([new_row(i) for i in range(5, 15)]) == 5
    assert storage.counts() == {"pending": 15, "in_flight": 0, "sent": 0, "failed": 0}
    assert storage.counts("r")["pending"] == 15
    assert storage.counts("other")["pending"] == 0
    assert storage.insert([new_row(100, run="b"), new_row(101, run="a")]) == 2
    assert [r["run"] for r in storage.runs()] == ["a", "b", "r"]
    # rows keep their enqueue order, across chunks too
    assert storage.insert((new_row(i) for i in range(200, 230)), chunk_size=7) == 30
    # a large chunk (PostgreSQL sends it by COPY) with repeats inside and outside it
    big = [new_row(i, person=f"q{i % 5}") for i in range(300, 500)]
    assert storage.insert([*big, new_row(0), new_row(300)]) == 200
    assert [r["message_id"] for r in storage.rows(limit=1000)][-200:] == [
        f"m{i}" for i in range(300, 500)
    ]
    assert [r["message_id"] for r in storage.rows(limit=1000)][-230:-200] == [
        f"m{i}" for i in range(200, 230)
    ]
    assert_counts_right(storage)



def test_insert_counts_each_run_exactly_across_statement_boundaries(storage: Storage) -> None:
    # SQLite writes a chunk as statements of many rows: repeats of existing ids and of ids
    # earlier in the same chunk, on both sides of each statement's edge, in two runs.
    assert storage.insert([new_row(i) for i in range(0, 400, 3)]) == 134
    chunk = [new_row(i, run="r" if i < 250 else "s") for i in range(400)]
    chunk[150:150] = [new_row(99), new_row(101, run="s"), new_row(101, run="s")]
    added = storage.insert(chunk)
    assert added == 400 - 134  # m99 was there already, m101 came earlier in the chunk
    ids = [r["message_id"] for r in storage.rows(limit=1000)]
    assert len(ids) == len(set(ids)) == 400
    assert storage.counts("s")["pending"] == sum(1 for i in range(250, 400) if i % 3)
    assert_counts_right(storage)

def test_single_row_inserts_are_counted_skipped_and_all_or_nothing(storage: Storage) -> None:
    # One row at a time is how Outbox.enqueue writes (SQLite has a path of its own for it).
    assert [storage.insert([new_row(i, run=("a", "b")[i % 2])]) for i in range(6)] == [1] * 6
    assert storage.insert([new_row(2, run="a")]) == 0  # a repeated messageId
    assert storage.insert([new_row(7, run="new run")]) == 1
    assert storage.counts("a")["pending"] == 3 and storage.counts("new run")["pending"] == 1
    broken = new_row(8)
    broken.payload = object()  # type: ignore[assignment]  # a value no driver can bind
    with pytest.raises(StorageError, match="type 'object'"):
        storage.insert([broken])
    assert storage.message("m8") is None
    assert storage.insert([new_row(8)]) == 1  # the failed one left no transaction open
    assert_counts_right(storage)
    assert storage.counts()["pending"] == 8


def test_outbox_enqueue_skips_a_repeated_idempotency_key(outbox: Outbox) -> None:
    first = outbox.track("u1", "Paid", idempotency_key="order-1", run="shop")
    again = outbox.track("u1", "Paid", idempotency_key="order-1", run="shop")
    assert (first.added, first.skipped) == (1, 0)
    assert (again.added, again.skipped) == (0, 1)
    result = outbox.enqueue_many(
        [{"type": "track", "userId": "u2", "event": "E"}, {"type": "track", "event": "bad"}],
        idempotency_keys=["k1", "k2"], run="shop",
    )
    assert (result.added, len(result.rejected)) == (1, 1)
    assert outbox.status()["pending"] == 2
    assert outbox.status(run="shop")["total"] == 2


# -- claims and leases ---------------------------------------------------------------------


def test_claim_leases_rows_and_no_other_worker_gets_them(storage: Storage) -> None:
    storage.insert([new_row(i, person=f"p{i}") for i in range(6)])
    first = claim(storage, "w1", max_messages=4)
    assert [r.message_id for r in first] == ["m0", "m1", "m2", "m3"]
    second = claim(storage, "w2")
    assert [r.message_id for r in second] == ["m4", "m5"]
    assert claim(storage, "w3") == []
    held = {r["message_id"]: r["worker_id"] for r in storage.rows(status="in_flight")}
    assert held == {"m0": "w1", "m1": "w1", "m2": "w1", "m3": "w1", "m4": "w2", "m5": "w2"}
    assert storage.counts()["in_flight"] == 6
    assert_counts_right(storage)


def test_a_persons_later_rows_wait_while_an_earlier_one_is_in_flight(storage: Storage) -> None:
    storage.insert([new_row(0, "a"), new_row(1, "b"), new_row(2, "a"), new_row(3, "c")])
    first = claim(storage, "w1", max_messages=1)
    assert [r.message_id for r in first] == ["m0"]
    second = claim(storage, "w2")
    assert [r.message_id for r in second] == ["m1", "m3"]  # m2 waits for m0
    storage.mark_sent(first)
    assert [r.message_id for r in claim(storage, "w3")] == ["m2"]


def test_expired_lease_comes_back_to_another_worker(storage: Storage) -> None:
    storage.insert([new_row(i, person=f"p{i}") for i in range(3)])
    # A lease long enough that the claim below comes within it on a loaded machine.
    taken = claim(storage, "dead-worker", lease=1.5)
    assert len(taken) == 3
    assert claim(storage, "w2") == []  # still leased
    time.sleep(1.7)
    again = claim(storage, "w2")
    assert sorted(r.id for r in again) == sorted(r.id for r in taken)
    assert {r["worker_id"] for r in storage.rows(status="in_flight")} == {"w2"}
    assert_counts_right(storage)


def test_extend_lease_keeps_rows_from_expiring(storage: Storage) -> None:
    storage.insert([new_row(0)])
    taken = claim(storage, "w1", lease=0.3)
    assert storage.extend_lease(taken, 30.0) == [taken[0].id]
    time.sleep(0.5)
    assert claim(storage, "w2") == []
    assert storage.rows(status="in_flight")[0]["worker_id"] == "w1"


def test_release_gives_rows_back_and_a_deferred_row_blocks_its_person(
    storage: Storage,
) -> None:
    storage.insert([new_row(0, "a"), new_row(1, "a"), new_row(2, "b")])
    taken = claim(storage, "w1", max_messages=1)
    assert storage.release(taken) == [taken[0].id]
    taken = claim(storage, "w1", max_messages=1)
    assert [r.message_id for r in taken] == ["m0"]
    storage.release(taken, next_attempt_at=time.time() + 0.6)
    # m0 waits for its retry time, and so does m1 behind it; b is free
    assert [r.message_id for r in claim(storage, "w2")] == ["m2"]
    assert claim(storage, "w2") == []
    time.sleep(0.8)
    assert [r.message_id for r in claim(storage, "w2")] == ["m0", "m1"]
    assert_counts_right(storage)


def test_release_worker_gives_back_only_that_workers_rows(storage: Storage) -> None:
    storage.insert([new_row(i, person=f"p{i}") for i in range(4)])
    claim(storage, "w1", max_messages=3)
    claim(storage, "w2")
    assert storage.release_worker("w1") == 3
    assert storage.release_worker("w1") == 0
    assert storage.counts() == {"pending": 3, "in_flight": 1, "sent": 0, "failed": 0}
    assert_counts_right(storage)


def test_claim_filters_by_run_and_alias_goes_alone(storage: Storage) -> None:
    storage.insert([new_row(0, "a", run="x"), new_row(1, "b", run="y"),
                    new_row(2, "c", run="y", call_type="alias"), new_row(3, "d", run="y")])
    assert [r.message_id for r in claim(storage, "w", run="y")] == ["m1", "m3"]
    assert [r.message_id for r in claim(storage, "w", run="y")] == ["m2"]
    assert claim(storage, "w", run="y") == []
    assert [r.message_id for r in claim(storage, "w")] == ["m0"]


def test_claim_respects_max_bytes(storage: Storage) -> None:
    # Four people: their lanes hold more than one request (a claim takes a few lanes).
    rows = [new_row(i, person=f"p{i % 4}", extra={"properties": {"pad": "x" * 20_000}})
            for i in range(30)]
    storage.insert(rows)
    taken = claim(storage, "w")
    assert 20 <= len(taken) < 30
    assert sum(r.size + 1 for r in taken) < MAX_BATCH_BYTES


# -- outcomes ------------------------------------------------------------------------------


def test_dead_letter_and_requeue(outbox: Outbox) -> None:
    storage = outbox.storage
    storage.insert([new_row(i, person=f"p{i}", run="a" if i < 3 else "b") for i in range(5)])
    taken = claim(storage)
    storage.record_attempt(
        Attempt("w1", "batch", taken, 100, 400, 3.0, "rejected", "bad thing"), count=True
    )
    assert storage.dead_letter([(taken[0], "bad 0"), (taken[3], "bad 3"), (taken[4], "x")]
                               ) == [taken[0].id, taken[3].id, taken[4].id]
    assert storage.mark_sent([taken[1]]) == [taken[1].id]
    assert storage.dead_letter([(taken[1], "too late")]) == []  # sent rows stay sent
    assert storage.counts() == {"pending": 0, "in_flight": 1, "sent": 1, "failed": 3}
    failed = outbox.failed()
    assert [(f["messageId"], f["error"], f["attempts"]) for f in failed] == [
        ("m0", "bad 0", 1), ("m3", "bad 3", 1), ("m4", "x", 1)]
    assert [f["messageId"] for f in outbox.failed(run="b")] == ["m3", "m4"]
    assert outbox.retry([taken[3].id]) == 1
    assert outbox.retry(run="a") == 1
    assert outbox.retry(all=True) == 1
    assert outbox.retry(all=True) == 0
    assert storage.counts() == {"pending": 3, "in_flight": 1, "sent": 1, "failed": 0}
    assert {r["attempts"] for r in storage.rows(status="pending")} == {0}
    assert_counts_right(storage)


def test_audit_trail_records_every_attempt(outbox: Outbox) -> None:
    storage = outbox.storage
    storage.insert([new_row(0, "a", run="x"), new_row(1, "b", run="y"), new_row(2, "c")])
    taken = claim(storage)
    started = time.time() - 5
    storage.record_attempt(
        Attempt("w1", "batch", taken, 300, 503, 12.5, "retry", "HTTP 503 for c"), count=True
    )
    storage.record_attempt(Attempt("w1", "batch", taken[:2], 200, 200, 8.0, "sent"),
                           count=True)
    storage.mark_sent(taken[:2])
    row0 = storage.message("m0")
    assert row0 is not None and row0["attempts"] == 2 and row0["status"] == "sent"
    history = outbox.history("m0")
    assert history is not None
    assert [a["outcome"] for a in history["attempts"]] == ["retry", "sent"]
    assert history["attempts"][0]["runs"] == ["r", "x", "y"]
    assert [a["outcome"] for a in outbox.history("m2")["attempts"]] == ["retry"]
    assert outbox.history("nope") is None
    assert [a["outcome"] for a in storage.attempts(run="y")] == ["retry", "sent"]
    assert [a["messages"] for a in storage.attempts()] == [3, 2]
    assert storage.attempts_for(taken[2].id)[0]["row_ranges"] == [
        [taken[0].id, taken[2].id]]
    last = storage.last_error("x")
    assert last is not None and last["error"] == "HTTP 503 for c"
    assert storage.last_error("nobody") is None
    assert storage.sent_since(started) == 2
    assert storage.sent_since(started, run="y") == 2  # whole requests that carried run y
    assert storage.sent_since(started, run="r") == 0
    assert storage.sent_since(time.time() + 3600) == 0
    assert outbox.log(limit=1)[0]["outcome"] == "sent"


def test_drain_sends_everything_once_with_history(outbox: Outbox, sandbox: Sandbox) -> None:
    for i in range(40):
        outbox.track(f"u{i % 7}", "Seen", properties={"n": i}, run="d")
    outbox.alias("u1", "anon-1", run="d")
    result = outbox.drain(host=sandbox.url, key=sandbox.key, progress=False, timeout=60)
    assert result["sent"] == 41 and result["failed"] == 0
    status = outbox.status()
    assert (status["sent"], status["pending"], status["in_flight"]) == (41, 0, 0)
    received = sandbox.messages()
    assert len(received) == 41
    for person in {f"u{i}" for i in range(7)}:
        numbers = [m["properties"]["n"] for m in received
                   if m.get("userId") == person and m["type"] == "track"]
        assert numbers == sorted(numbers)
    some = received[0]["messageId"]
    assert outbox.history(some)["attempts"][0]["outcome"] == "sent"


# -- fencing: a change applies only while the claim that asks for it still holds the row ---


def test_each_claim_gets_a_fresh_token_stored_on_its_rows(storage: Storage) -> None:
    storage.insert([new_row(i, person=f"p{i}") for i in range(3)])
    first = claim(storage, "w1", max_messages=2)
    second = claim(storage, "w2")
    assert {r.claim for r in first} == {first[0].claim} and first[0].claim
    assert second[0].claim and second[0].claim != first[0].claim
    stored = {r["id"]: r["claim_token"] for r in storage.rows(status="in_flight")}
    assert stored == {r.id: r.claim for r in first + second}


def test_a_stale_token_changes_nothing(storage: Storage) -> None:
    storage.insert([new_row(i, person=f"p{i}") for i in range(2)])
    taken = claim(storage, "w1")
    stale = [Row(r.id, r.message_id, r.run, r.call_type, r.person, r.payload, r.size,
                 r.attempts, claim="not-the-token") for r in taken]
    before = storage.rows()
    assert storage.extend_lease(stale, 300.0) == []
    assert storage.mark_sent(stale) == []
    assert storage.release(stale) == []
    assert storage.dead_letter([(r, "bad") for r in stale]) == []
    assert storage.record_attempt(
        Attempt("w1", "batch", stale, 10, 500, 1.0, "retry", "HTTP 500"), count=True) == []
    after = storage.rows()
    assert [{k: v for k, v in r.items() if k != "updated_at"} for r in after] == [
        {k: v for k, v in r.items() if k != "updated_at"} for r in before]
    assert storage.counts()["in_flight"] == 2
    # the real token still works, and a second use of it after the row moved does not
    assert storage.mark_sent(taken) == [r.id for r in taken]
    assert storage.release(taken) == []
    assert storage.counts() == {"pending": 0, "in_flight": 0, "sent": 2, "failed": 0}
    assert_counts_right(storage)


def test_an_expired_and_reclaimed_row_cannot_be_changed_by_the_first_claimer(
    outbox: Outbox,
) -> None:
    storage = outbox.storage
    storage.insert([new_row(0, "a"), new_row(1, "b")])
    first = claim(storage, "w1", lease=0.2)
    time.sleep(0.4)
    second = claim(storage, "w2")
    assert [r.id for r in second] == [r.id for r in first]
    assert storage.extend_lease(first, 60.0) == []  # the first claimer learns it lost them
    # its late 200 is audited as late and marks nothing sent
    held = storage.record_attempt(
        Attempt("w1", "batch", first, 100, 200, 5.0, "sent"), count=True, sent=True)
    assert held == []
    assert storage.mark_sent(first) == []
    assert storage.dead_letter([(first[0], "refused")]) == []
    assert storage.release(first, next_attempt_at=time.time() + 600) == []
    assert storage.counts() == {"pending": 0, "in_flight": 2, "sent": 0, "failed": 0}
    rows = {r["id"]: r for r in storage.rows()}
    assert {r["worker_id"] for r in rows.values()} == {"w2"}
    assert {r["attempts"] for r in rows.values()} == {0}
    assert {r["claim_token"] for r in rows.values()} == {second[0].claim}
    history = outbox.history("m0")
    assert history is not None
    assert [(a["outcome"], a["status_code"]) for a in history["attempts"]] == [("late", 200)]
    assert storage.sent_since(time.time() - 60) == 0  # a late success is not a send
    # the second claimer's outcome applies
    assert storage.extend_lease(second, 60.0) == [r.id for r in second]
    assert storage.record_attempt(
        Attempt("w2", "batch", second, 100, 200, 5.0, "sent"), count=True, sent=True
    ) == [r.id for r in second]
    assert storage.counts() == {"pending": 0, "in_flight": 0, "sent": 2, "failed": 0}
    assert [a["outcome"] for a in outbox.history("m1")["attempts"]] == ["late", "sent"]
    assert_counts_right(storage)


def test_an_attempt_over_held_and_lost_rows_splits_into_its_outcome_and_late(
    outbox: Outbox,
) -> None:
    """The zombie of issue 14: W1 pauses, W2 dead-letters, the row is replaced, W1's 200
    for the old call must not mark the corrected row sent."""
    storage = outbox.storage
    storage.insert([new_row(0, "a"), new_row(1, "b")])
    w1 = claim(storage, "w1", max_messages=1, lease=0.2)
    w1_b = claim(storage, "w1", max_messages=1, lease=60)
    time.sleep(0.4)
    w2 = claim(storage, "w2")
    assert [r.id for r in w2] == [w1[0].id]
    assert storage.dead_letter([(w2[0], "HTTP 400: bad")]) == [w2[0].id]
    assert storage.replace_failed(w2[0].id, payload=w2[0].payload, size=w2[0].size,
                                  call_type="track", person="a")
    held = storage.record_attempt(
        Attempt("w1", "batch", [*w1, *w1_b], 100, 200, 5.0, "sent"), count=True, sent=True)
    assert held == [w1_b[0].id]
    assert storage.message("m0")["status"] == "pending"
    assert storage.message("m0")["attempts"] == 0
    assert storage.message("m1")["status"] == "sent"
    outcomes = {(a["outcome"], a["status_code"], a["messages"]) for a in storage.attempts()}
    assert outcomes == {("late", 200, 1), ("sent", 200, 1)}
    assert storage.sent_since(time.time() - 60) == 1
    assert_counts_right(storage)


def test_release_worker_and_expiry_end_a_claim(storage: Storage) -> None:
    storage.insert([new_row(0, "a")])
    taken = claim(storage, "w1")
    assert storage.release_worker("w1") == 1
    assert storage.mark_sent(taken) == []
    again = claim(storage, "w1")
    assert again[0].claim != taken[0].claim
    assert storage.mark_sent(again) == [again[0].id]


# -- retention and forgetting --------------------------------------------------------------


def test_purge_deletes_only_sent_rows_older_than_the_cutoff(storage: Storage) -> None:
    storage.insert([new_row(i, person=f"p{i}") for i in range(5)])
    taken = claim(storage, max_messages=3)
    storage.mark_sent(taken[:2])
    storage.dead_letter([(taken[2], "bad")])
    assert storage.purge_sent(time.time() - 3600) == 0
    assert storage.purge_sent(time.time() + 60) == 2
    assert storage.counts() == {"pending": 2, "in_flight": 0, "sent": 0, "failed": 1}
    assert storage.message("m0") is None
    assert_counts_right(storage)


SECRET_EMAIL = "ada.lovelace.7d1f@example.org"
SECRET_ID = "person-5b2c9e71"


def _enqueue_person_data(outbox: Outbox) -> None:
    outbox.identify(SECRET_ID, traits={"email": SECRET_EMAIL, "name": "Ada"}, run="crm")
    outbox.track(SECRET_ID, "Paid", properties={"total": 9.5}, run="crm")
    outbox.alias("someone-else", SECRET_ID, run="crm")  # names the person as previousId
    outbox.identify("bystander", traits={"email": "b@example.org"}, run="crm")
    rows = claim(outbox.storage)
    outbox.storage.record_attempt(
        Attempt("w1", "batch", rows, 10, 400, 1.0, "rejected",
                f"userId {SECRET_ID} rejected"), count=True)
    outbox.storage.release(rows)


def test_forget_deletes_the_person_and_scrubs_audit_errors(outbox: Outbox) -> None:
    _enqueue_person_data(outbox)
    storage = outbox.storage
    assert outbox.forget(SECRET_ID) == 3
    rows = storage.rows(limit=100)
    assert [r["person"] for r in rows] == ["bystander"]
    assert SECRET_ID not in json.dumps(rows)
    assert SECRET_ID not in json.dumps(storage.attempts())
    assert "[forgotten]" in storage.attempts()[0]["error"]
    assert storage.counts() == {"pending": 1, "in_flight": 0, "sent": 0, "failed": 0}
    assert outbox.forget(SECRET_ID) == 0
    assert_counts_right(storage)
    with pytest.raises(ValueError):
        outbox.forget("  ")


def _row(n: int, call_type: str, person: str, **fields: Any) -> NewRow:
    payload = json.dumps({"type": call_type, "userId": person, "messageId": f"m{n}",
                          **fields}, separators=(",", ":"))
    return NewRow(f"m{n}", "r", call_type, person, payload, len(payload.encode()))


def test_forget_selects_by_person_and_alias_previous_id_exactly(storage: Storage) -> None:
    storage.insert([
        _row(0, "identify", "1", traits={"name": "One"}),
        _row(1, "track", "u-2", event="Signed Up", properties={"referred_by": "1"}),
        _row(2, "identify", "u-4", traits={"tier": "1"}),
        _row(3, "group", "u-5", groupId="acme", traits={"objectTypeId": "1"}),
        _row(4, "alias", "u-9", previousId="1"),
        _row(5, "alias", "u-8", previousId="11"),
        _row(6, "track", "11", event="E"),
        _row(7, "track", "1", event="Later"),
    ])
    held = claim(storage, max_messages=1)  # m0, the person's first row, is in flight
    assert [r.message_id for r in held] == ["m0"]
    report = storage.forget("1")
    assert report["deleted"] == 3
    assert report["by_status"] == {"pending": 2, "in_flight": 1, "sent": 0, "failed": 0}
    left = [r["message_id"] for r in storage.rows()]
    assert left == ["m1", "m2", "m3", "m5", "m6"]
    # the in-flight row is gone: its worker's late success finds nothing to resurrect
    assert storage.mark_sent(held) == []
    assert storage.message("m0") is None
    assert_counts_right(storage)


def test_forget_redacts_audit_text_by_exact_token(storage: Storage) -> None:
    storage.insert([_row(0, "track", "4", event="E"), _row(1, "track", "u-7", event="E")])
    taken = claim(storage)
    storage.record_attempt(Attempt("w1", "batch", taken, 10, 400, 1.0, "rejected",
                                   "HTTP 400: userId 4 refused; 14 items, 4xx"), count=True)
    storage.release(taken)
    report = storage.forget("4")
    assert report["deleted"] == 1 and report["redacted"] >= 1
    errors = [a["error"] for a in storage.attempts()]
    assert errors == ["HTTP 400: userId [forgotten] refused; 14 items, 4xx"]
    assert storage.message("m1")["last_error"] == errors[0]


def test_sqlite_forget_leaves_no_trace_in_the_file_or_wal(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    with Outbox(path) as outbox:
        _enqueue_person_data(outbox)

        def file_bytes() -> bytes:
            return b"".join(p.read_bytes() for p in tmp_path.iterdir()
                            if p.name.startswith("outbox.db"))

        assert SECRET_EMAIL.encode() in file_bytes()  # the check below can fail
        outbox.forget(SECRET_ID)
        data = file_bytes()
        assert SECRET_ID.encode() not in data
        assert SECRET_EMAIL.encode() not in data
        assert b"bystander" in data


def _table_file_bytes(conn: Any, schema: str) -> bytes:
    """Every byte of a schema's table, TOAST and index files, after a checkpoint."""
    conn.execute("CHECKPOINT")
    paths = conn.execute(
        "SELECT pg_relation_filepath(c.oid) FROM pg_class c"
        " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s"
        " UNION SELECT pg_relation_filepath(c.reltoastrelid) FROM pg_class c"
        " JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND c.reltoastrelid != 0",
        (schema, schema),
    ).fetchall()
    read = "SELECT pg_read_binary_file(%s, 0, (pg_stat_file(%s, true)).size, true)"
    return b"".join(conn.execute(read, (p, p)).fetchone()[0] or b"" for (p,) in paths if p)


@pytest.fixture
def superuser_conn(postgres_location: str) -> Iterator[tuple[Any, str]]:
    """An autocommit superuser connection to the outbox's server, and the outbox's schema."""
    import psycopg

    from cio_outbox.storage.postgres import split_location

    plain, schema = split_location(postgres_location)
    with psycopg.connect(plain, autocommit=True) as conn:
        if not conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user"
                            ).fetchone()[0]:
            pytest.skip("reading table files needs a superuser connection")
        yield conn, schema


def _older_snapshot(plain: str, held: threading.Event, release: threading.Event) -> None:
    """Another client's transaction, opened before the forget and kept open until told."""
    import psycopg

    with psycopg.connect(plain) as other:
        other.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        other.execute("SELECT count(*) FROM pg_class").fetchone()  # takes its snapshot
        held.set()
        release.wait(60)
        other.rollback()


def _open_older_transaction(location: str) -> tuple[threading.Thread, threading.Event]:
    """Start another client's open transaction on the outbox's server; set the event to
    end it (then join the thread)."""
    from cio_outbox.storage.postgres import split_location

    held, release = threading.Event(), threading.Event()
    other = threading.Thread(target=_older_snapshot,
                             args=(split_location(location)[0], held, release))
    other.start()
    assert held.wait(30)
    return other, release


def test_postgres_forget_leaves_no_trace_in_table_files(
    postgres_location: str, superuser_conn: tuple[Any, str]
) -> None:
    conn, schema = superuser_conn
    with Outbox(postgres_location) as outbox:
        _enqueue_person_data(outbox)
        assert SECRET_EMAIL.encode() in _table_file_bytes(conn, schema)  # the check can fail
        report = outbox.storage.forget(SECRET_ID)
        data = _table_file_bytes(conn, schema)
        assert SECRET_ID.encode() not in data
        assert SECRET_EMAIL.encode() not in data
        assert b"bystander" in data
        assert report["traces_kept_by"] == []


def test_postgres_forget_waits_for_an_older_transaction_before_it_rewrites_the_files(
    postgres_location: str, superuser_conn: tuple[Any, str]
) -> None:
    # PostgreSQL keeps a deleted row, in VACUUM FULL's new files too, while any
    # transaction that may still see it is open: another client's, on the same server.
    conn, schema = superuser_conn
    with Outbox(postgres_location) as outbox:
        _enqueue_person_data(outbox)
        other, release = _open_older_transaction(postgres_location)
        threading.Timer(1.0, release.set).start()
        report = outbox.storage.forget(SECRET_ID)
        other.join(30)
        data = _table_file_bytes(conn, schema)
    assert SECRET_EMAIL.encode() not in data and SECRET_ID.encode() not in data
    assert report["traces_kept_by"] == []


def test_postgres_forget_names_a_transaction_that_outlives_its_wait_then_a_rerun_erases(
    postgres_location: str, superuser_conn: tuple[Any, str]
) -> None:
    conn, schema = superuser_conn
    with Outbox(postgres_location) as outbox:
        _enqueue_person_data(outbox)
        other, release = _open_older_transaction(postgres_location)
        outbox.storage.vacuum_wait = 0.5  # type: ignore[attr-defined]
        try:
            report = outbox.storage.forget(SECRET_ID)
        finally:
            release.set()
            other.join(30)
        holders = report["traces_kept_by"]
        assert len(holders) == 1 and isinstance(holders[0], int)  # the other client's pid
        assert report["deleted"] == 3
        del outbox.storage.vacuum_wait  # type: ignore[attr-defined]  # the default again
        again = outbox.storage.forget(SECRET_ID)  # deletes nothing; rewrites the files
        data = _table_file_bytes(conn, schema)
    assert (again["deleted"], again["traces_kept_by"]) == (0, [])
    assert SECRET_EMAIL.encode() not in data and SECRET_ID.encode() not in data


# -- counts under random operations --------------------------------------------------------


def test_counts_stay_right_through_random_operations(storage: Storage) -> None:
    rng = random.Random(9)
    held: list[Row] = []
    next_n = 0
    for step in range(160):
        op = rng.choice(["insert", "insert", "claim", "claim", "sent", "release", "dead",
                         "requeue", "purge", "forget", "expire", "release_worker", "attempt"])
        if op == "insert":
            rows = [new_row(next_n + i, person=f"p{rng.randrange(8)}",
                            run=rng.choice(["a", "b", ""])) for i in range(rng.randrange(1, 9))]
            rows += [new_row(rng.randrange(max(next_n, 1)))]  # a repeat, skipped
            next_n += len(rows)
            storage.insert(rows, chunk_size=rng.choice([2, 100]))
        elif op == "claim":
            held += claim(storage, f"w{rng.randrange(3)}", max_messages=rng.randrange(1, 6),
                          run=rng.choice([None, "a"]))
        elif op == "expire":
            claim(storage, "short", lease=-1.0, max_messages=3)  # expired at once
        elif held:
            pick = rng.sample(held, rng.randrange(1, len(held) + 1))
            ids = [r.id for r in pick]
            if op == "sent":
                storage.mark_sent(pick)
            elif op == "release":
                storage.release(pick, next_attempt_at=rng.choice([None, time.time() + 0.01]))
            elif op == "dead":
                storage.dead_letter([(r, "bad") for r in pick])
            elif op == "requeue":
                storage.requeue(ids=ids if rng.random() < 0.5 else None,
                                run=rng.choice([None, "b"]))
            elif op == "purge":
                storage.purge_sent(time.time() + 10)
            elif op == "forget":
                storage.forget(pick[0].person)
            elif op == "release_worker":
                storage.release_worker(f"w{rng.randrange(3)}")
            elif op == "attempt":
                storage.record_attempt(Attempt("w0", "batch", pick, 1, 500, 1.0, "retry",
                                               "HTTP 500"), count=True)
            if op in ("sent", "dead", "forget", "purge"):
                held = [r for r in held if r not in pick]
        if step % 10 == 0:
            assert_counts_right(storage)
    assert_counts_right(storage)
    assert sum(storage.counts().values()) > 0


# -- concurrent claimers -------------------------------------------------------------------


def test_concurrent_claimers_never_share_a_row_and_keep_each_persons_order(
    outbox_location: str,
) -> None:
    persons, per_person, claimers = 30, 12, 6
    setup = open_storage(outbox_location)
    rows = [new_row(p + persons * k, person=f"p{p}") for k in range(per_person)
            for p in range(persons)]
    random.Random(1).shuffle(rows)  # persons interleave; each person's rows in n order
    rows.sort(key=lambda r: int(r.message_id[1:]) // persons)
    setup.insert(rows)
    lock = threading.Lock()
    held_by: dict[str, int] = {}
    delivered: dict[str, list[int]] = defaultdict(list)
    violations: list[str] = []
    errors: list[BaseException] = []

    def claimer(index: int) -> None:
        rng = random.Random(index)
        storage = open_storage(outbox_location)
        try:
            idle = 0
            while idle < 3:
                taken = claim(storage, f"w{index}", max_messages=rng.randrange(1, 25))
                if not taken:
                    idle += 1
                    time.sleep(0.01)
                    continue
                idle = 0
                with lock:
                    for row in taken:
                        owner = held_by.get(row.person)
                        if owner is not None and owner != index:
                            violations.append(f"{row.person} held by w{owner} and w{index}")
                        held_by[row.person] = index
                time.sleep(rng.random() * 0.003)
                if rng.random() < 0.15:
                    with lock:
                        for row in taken:
                            held_by.pop(row.person, None)
                    storage.release(taken)
                    continue
                with lock:
                    for row in taken:
                        delivered[row.person].append(int(row.message_id[1:]))
                        held_by.pop(row.person, None)
                assert storage.mark_sent(taken) == [r.id for r in taken]
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            storage.close()

    threads = [threading.Thread(target=claimer, args=(i,)) for i in range(claimers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    assert not violations, violations[:5]
    for p in range(persons):
        assert delivered[f"p{p}"] == [p + persons * k for k in range(per_person)]
    assert setup.counts() == {"pending": 0, "in_flight": 0, "sent": persons * per_person,
                              "failed": 0}
    setup.close()


def test_reopening_keeps_rows_and_schema(outbox_location: str) -> None:
    first = open_storage(outbox_location)
    first.insert([new_row(1)])
    version = first.schema_version  # type: ignore[attr-defined]
    first.close()
    second = open_storage(outbox_location)
    assert second.counts()["pending"] == 1
    assert second.schema_version == version >= 2  # type: ignore[attr-defined]
    second.close()


# -- one schema, two dialects -----------------------------------------------------------


def _sqlite_schema(path: str) -> tuple[dict[str, tuple[str, ...]], bool]:
    import sqlite3

    conn = sqlite3.connect(path)
    try:
        indexes = {
            name: tuple(col for _, _, col in conn.execute(f"PRAGMA index_info({name})"))
            for (name,) in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL")
        }
        table_sql = conn.execute(
            "SELECT sql FROM sqlite_master WHERE name = 'messages'").fetchone()[0]
    finally:
        conn.close()
    return indexes, _OR_CHECK in table_sql


# Migration 7: SQLite evaluates a CHECK's ``IN (...)`` list per row by building a lookup
# table; the same test as a chain of comparisons costs an insert about a sixth less.
_OR_CHECK = ("CHECK (status = 'pending' OR status = 'in_flight' OR status = 'sent'"
             " OR status = 'failed')")


def _postgres_schema(location: str) -> tuple[dict[str, tuple[str, ...]], bool]:
    import psycopg

    from cio_outbox.storage.postgres import split_location

    plain, schema = split_location(location)
    with psycopg.connect(plain, autocommit=True) as conn:
        indexes = {
            name: tuple(cols) for name, cols in conn.execute(
                "SELECT i.relname, array_agg(a.attname ORDER BY k.n) FROM pg_index x"
                " JOIN pg_class i ON i.oid = x.indexrelid JOIN pg_class t ON t.oid = x.indrelid"
                " JOIN pg_namespace s ON s.oid = t.relnamespace"
                " CROSS JOIN LATERAL unnest(x.indkey) WITH ORDINALITY AS k(attnum, n)"
                " JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = k.attnum"
                " WHERE s.nspname = %s AND NOT x.indisprimary AND NOT x.indisunique"
                " GROUP BY i.relname", (schema,))
        }
        checks = [d for (d,) in conn.execute(
            "SELECT pg_get_constraintdef(c.oid) FROM pg_constraint c"
            " JOIN pg_namespace s ON s.oid = c.connamespace"
            " WHERE s.nspname = %s AND c.contype = 'c'", (schema,))]
    return indexes, any("status" in d and "in_flight" in d for d in checks)


def test_both_schemas_have_the_same_indexes_and_status_check(
    tmp_path: Path, postgres_location: str
) -> None:
    path = str(tmp_path / "outbox.db")
    open_storage(path).close()
    open_storage(postgres_location).close()
    lite, lite_check = _sqlite_schema(path)
    post, post_check = _postgres_schema(postgres_location)
    assert lite == post
    assert {"messages_sent", "attempts_at", "messages_pending_run"} <= set(lite)
    # Migration 6: the pending rows in id order are read per run (messages_pending_run).
    assert "messages_pending" not in lite
    assert lite_check and post_check


def test_a_bad_status_is_refused_by_the_schema(outbox_location: str) -> None:
    storage = open_storage(outbox_location)
    storage.insert([new_row(0)])
    with pytest.raises(StorageError, match=r"(?i)check"):
        storage._change("id > 0", (), "lost", "updated_at = {now}", ())  # type: ignore[attr-defined]
    assert storage.counts()["pending"] == 1
    storage.close()


def test_an_sqlite_outbox_of_schema_version_6_gets_the_status_check_as_comparisons(
    tmp_path: Path,
) -> None:
    import sqlite3

    path = str(tmp_path / "v6.db")
    storage = open_storage(path)
    storage.insert([new_row(i) for i in range(3)])
    storage.close()
    # Back to what version 6 wrote: the CHECK as an IN list (migration 3's text).
    conn = sqlite3.connect(path, isolation_level=None)
    table_sql = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'messages'"
                             ).fetchone()[0]
    assert _OR_CHECK in table_sql and " IN (" not in table_sql
    cookie = conn.execute("PRAGMA schema_version").fetchone()[0]
    conn.execute("PRAGMA writable_schema = ON")
    conn.execute("UPDATE sqlite_master SET sql = replace(sql, ?, ?) WHERE name = 'messages'",
                 (_OR_CHECK, "CHECK (status IN ('pending', 'in_flight', 'sent', 'failed'))"))
    conn.execute(f"PRAGMA schema_version = {cookie + 1}")
    conn.execute("PRAGMA writable_schema = OFF")
    conn.execute("PRAGMA user_version = 6")
    conn.close()

    storage = open_storage(path)
    assert storage.schema_version == 7  # type: ignore[attr-defined]
    assert storage.counts()["pending"] == 3
    with pytest.raises(StorageError, match=r"(?i)check"):
        storage._change("id > 0", (), "lost", "updated_at = {now}", ())  # type: ignore[attr-defined]
    storage.close()
    conn = sqlite3.connect(path)
    assert _sqlite_schema(path)[1]
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert conn.execute("SELECT count(*) FROM messages").fetchone()[0] == 3
    conn.close()


def _v1_rows() -> list[tuple[Any, ...]]:
    payload = json.dumps({"type": "track", "userId": "old", "event": "E", "messageId": "m1"})
    return [("m1", "r", "track", "old", payload, len(payload), "pending", 0, 1.0, 1.0),
            ("m2", "r", "track", "old", payload, len(payload), "sent", 1, 1.0, 1.0)]


def test_an_sqlite_outbox_of_schema_version_1_opens_and_migrates(tmp_path: Path) -> None:
    import sqlite3

    from cio_outbox.storage import schema

    path = tmp_path / "old.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.executescript(schema.render(0, schema.SQLITE, ""))  # the DDL of release 1
    conn.executemany("INSERT INTO messages (message_id, run, call_type, person, payload, size,"
                     " status, attempts, created_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
                     _v1_rows())
    conn.execute("INSERT INTO counts VALUES ('r', 'pending', 1), ('r', 'sent', 1)")
    conn.execute("PRAGMA user_version = 1")
    conn.close()
    storage = open_storage(path)
    assert storage.schema_version == schema.SCHEMA_VERSION  # type: ignore[attr-defined]
    assert storage.counts() == {"pending": 1, "in_flight": 0, "sent": 1, "failed": 0}
    taken = claim(storage)
    assert [r.message_id for r in taken] == ["m1"] and taken[0].claim
    assert storage.mark_sent(taken) == [taken[0].id]
    storage.close()
    indexes, has_check = _sqlite_schema(str(path))
    fresh = tmp_path / "fresh.db"
    open_storage(fresh).close()
    assert (indexes, has_check) == _sqlite_schema(str(fresh))
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    with pytest.raises(sqlite3.IntegrityError):
        conn.execute("UPDATE messages SET status = 'lost'")
    conn.close()


def _v1_file(path: Path) -> None:
    import sqlite3

    from cio_outbox.storage import schema

    conn = sqlite3.connect(path, isolation_level=None)
    conn.executescript(schema.render(0, schema.SQLITE, ""))  # the DDL of release 1
    conn.executemany("INSERT INTO messages (message_id, run, call_type, person, payload, size,"
                     " status, attempts, created_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
                     _v1_rows())
    conn.execute("INSERT INTO counts VALUES ('r', 'pending', 1), ('r', 'sent', 1)")
    conn.execute("DELETE FROM messages WHERE message_id = 'm2'")  # the sequence says 2
    conn.execute("UPDATE counts SET n = 0 WHERE status = 'sent'")
    conn.execute("PRAGMA user_version = 1")
    conn.close()


def test_sqlite_without_schema_edits_gets_the_check_by_copying_the_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sqlite3

    from cio_outbox.storage import sqlite_schema as backend

    def refused(conn: sqlite3.Connection, checked: str) -> None:
        raise sqlite3.DatabaseError("table sqlite_master may not be modified")

    monkeypatch.setattr(backend, "_edit_table_sql", refused)
    path = tmp_path / "old.db"
    _v1_file(path)
    storage = open_storage(path)
    assert storage.counts()["pending"] == 1
    storage.insert([new_row(50)])
    assert storage.message("m50")["id"] == 3  # deleted row 2's id is not given out again
    assert [r.message_id for r in claim(storage)] == ["m1", "m50"]
    storage.close()
    fresh = tmp_path / "fresh.db"
    open_storage(fresh).close()
    assert _sqlite_schema(str(path)) == _sqlite_schema(str(fresh))
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    with pytest.raises(sqlite3.IntegrityError):
        conn.execute("UPDATE messages SET status = 'lost'")
    conn.close()


def test_a_postgres_outbox_of_schema_version_1_opens_and_migrates(
    postgres_location: str,
) -> None:
    import psycopg

    from cio_outbox.storage import schema
    from cio_outbox.storage.postgres import split_location

    plain, name = split_location(postgres_location)
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {name}")
        conn.execute(f"CREATE TABLE {name}.schema_version (version INTEGER PRIMARY KEY,"
                     " applied_at DOUBLE PRECISION NOT NULL)")
        conn.execute(schema.render(0, schema.POSTGRES, f"{name}."))
        conn.execute(f"INSERT INTO {name}.schema_version VALUES (1, 0)")
        with conn.cursor() as cur:
            cur.executemany(
                f"INSERT INTO {name}.messages (message_id, run, call_type, person, payload,"
                " size, status, attempts, created_at, updated_at)"
                " VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)", _v1_rows())
        conn.execute(f"INSERT INTO {name}.counts VALUES ('r', 'pending', 1), ('r', 'sent', 1)")
    storage = open_storage(postgres_location)
    assert storage.schema_version == schema.SCHEMA_VERSION  # type: ignore[attr-defined]
    taken = claim(storage)
    assert [r.message_id for r in taken] == ["m1"]
    assert storage.mark_sent(taken) == [taken[0].id]
    assert storage.counts()["sent"] == 2
    storage.close()


def test_inspection_views_read_with_sqlite_utils(tmp_path: Path) -> None:
    import sqlite_utils

    path = tmp_path / "outbox.db"
    storage = open_storage(path)
    storage.insert([new_row(0, "a", run="crm"), new_row(1, "b", run="crm")])
    taken = claim(storage)
    storage.record_attempt(Attempt("w1", "batch", taken, 10, 400, 2.0, "rejected",
                                   "HTTP 400: bad"), count=True)
    storage.dead_letter([(taken[0], "HTTP 400: bad")])
    storage.close()
    db = sqlite_utils.Database(path)
    failed = list(db["failed_messages"].rows)
    assert [(r["message_id"], r["run"], r["last_error"], r["attempts"]) for r in failed] == [
        ("m0", "crm", "HTTP 400: bad", 1)]
    iso = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$"
    assert re.match(iso, failed[0]["failed_at"]) and re.match(iso, failed[0]["created_at"])
    by_run = list(db["attempts_by_run"].rows_where("run = ?", ["crm"]))
    assert [(r["outcome"], r["status_code"], r["messages"]) for r in by_run] == [
        ("rejected", 400, 2)]
    assert re.match(iso, by_run[0]["at"])
    assert set(db.view_names()) >= {"failed_messages", "attempts_by_run"}
    db.close()


def test_inspection_views_on_both_backends_show_iso_times(outbox_location: str) -> None:
    storage = open_storage(outbox_location)
    storage.insert([new_row(0, "a", run="crm")])
    taken = claim(storage)
    storage.record_attempt(Attempt("w1", "batch", taken, 10, 400, 2.0, "rejected", "bad"),
                           count=True)
    storage.dead_letter([(taken[0], "bad")])
    prefix = getattr(storage, "prefix", "")
    failed = storage._read(f"SELECT * FROM {prefix}failed_messages")  # type: ignore[attr-defined]
    by_run = storage._read(f"SELECT * FROM {prefix}attempts_by_run")  # type: ignore[attr-defined]
    row = storage.message("m0")
    assert row is not None
    import datetime as dt

    text = failed[0]["failed_at"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", text), text
    shown = dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.UTC)
    assert abs(shown.timestamp() - row["updated_at"]) < 0.002
    assert [(r["run"], r["outcome"], r["status_code"]) for r in by_run] == [
        ("crm", "rejected", 400)]
    storage.close()


# -- storage faults: the real cause, the file named, nothing half-written ------------------


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MiB file system (tmpfs), mounted for the test: needs root."""
    import os
    import subprocess

    where = tmp_path / "disk"
    where.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tiny tmpfs needs root; the max_page_count test still runs")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)],
                          capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _fill_until_full(storage: Storage) -> StorageError:
    for n in range(0, 100_000, 200):
        rows = [new_row(i, person=f"p{i}", extra={"pad": "x" * 2000}) for i in range(n, n + 200)]
        try:
            storage.insert(rows)
        except StorageError as exc:
            return exc
    raise AssertionError("the disk never filled")


def test_a_full_disk_is_a_storage_error_naming_the_file(tiny_disk: Path) -> None:
    path = tiny_disk / "outbox.db"
    storage = open_storage(path)
    error = _fill_until_full(storage)
    text = str(error)
    assert str(path) in text and "disk is full" in text
    assert "cannot rollback" not in text
    # nothing half-written: the counts match the rows, and the outbox still reads
    assert_counts_right(storage)
    storage.close()


def test_a_full_database_by_page_limit_rolls_back_cleanly(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    storage = open_storage(path)
    storage.insert([new_row(0)])
    conn = storage.conn  # type: ignore[attr-defined]
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages + 20}")
    error = _fill_until_full(storage)
    assert str(path) in str(error) and "disk is full" in str(error)
    assert "cannot rollback" not in str(error)
    assert not conn.in_transaction
    assert_counts_right(storage)
    conn.execute("PRAGMA max_page_count = 1073741823")
    assert storage.insert([new_row(999_999)]) == 1
    storage.close()


def test_a_read_only_file_system_is_a_storage_error_naming_the_file(tiny_disk: Path) -> None:
    import subprocess

    path = tiny_disk / "outbox.db"
    storage = open_storage(path)
    storage.insert([new_row(0)])
    storage.close()
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_disk)], check=True)
    with pytest.raises(StorageError) as caught:
        open_storage(path).insert([new_row(1)])
    assert str(path) in str(caught.value)
    assert "read-only" in str(caught.value) or "readonly" in str(caught.value)


def test_a_lock_held_past_the_busy_timeout_is_a_storage_error(tmp_path: Path) -> None:
    import sqlite3

    from cio_outbox.storage.sqlite import SQLiteStorage

    path = tmp_path / "outbox.db"
    storage = SQLiteStorage(path, busy_timeout=0.3)
    storage.insert([new_row(0)])
    taken = claim(storage)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        started = time.monotonic()
        with pytest.raises(StorageError) as caught:
            storage.mark_sent(taken)
        assert time.monotonic() - started >= 0.25
        assert str(path) in str(caught.value) and "locked" in str(caught.value)
        assert "cannot rollback" not in str(caught.value)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert storage.mark_sent(taken) == [taken[0].id]  # the same storage goes on afterwards
    storage.close()


# -- PostgreSQL only -----------------------------------------------------------------------


def test_postgres_without_psycopg_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)  # import psycopg raises ImportError
    with pytest.raises(StorageError, match=r"pip install 'cio-outbox\[postgres\]'"):
        open_storage("postgresql://nobody@127.0.0.1:1/none")


def test_postgres_location_hides_the_password() -> None:
    from cio_outbox.storage.postgres import redact, split_location

    assert redact("postgresql://u:s3cret@h:5/db?schema=x") == "postgresql://u:***@h:5/db?schema=x"
    assert redact("postgresql://u@h/db") == "postgresql://u@h/db"
    assert split_location("postgresql://u@h/db?sslmode=require&schema=box") == (
        "postgresql://u@h/db?sslmode=require", "box")
    assert split_location("postgresql://u@h/db")[1] == "cio_outbox"
    with pytest.raises(StorageError, match="schema"):
        split_location("postgresql://u@h/db?schema=Robert'); DROP")


def test_postgres_unreachable_server_is_a_storage_error() -> None:
    pytest.importorskip("psycopg")
    with pytest.raises(StorageError, match=r"cannot use outbox postgresql://u:\*\*\*@127"):
        open_storage("postgresql://u:pw@127.0.0.1:1/db")


def test_postgres_schemas_are_separate_outboxes(postgres_server: str) -> None:
    import pg

    one, two = pg.schema_url(postgres_server), pg.schema_url(postgres_server)
    try:
        a, b = open_storage(one), open_storage(two)
        a.insert([new_row(1), new_row(2)])
        b.insert([new_row(1)])
        assert (a.counts()["pending"], b.counts()["pending"]) == (2, 1)
        a.close()
        b.close()
    finally:
        pg.drop_schema(one)
        pg.drop_schema(two)


def test_postgres_refuses_a_newer_schema_and_a_foreign_one(postgres_location: str) -> None:
    import psycopg

    from cio_outbox.storage.postgres import SCHEMA_VERSION, split_location

    plain, schema = split_location(postgres_location)
    open_storage(postgres_location).close()
    with psycopg.connect(plain, autocommit=True) as conn:
        versions = conn.execute(f"SELECT version FROM {schema}.schema_version").fetchall()
        assert versions == [(v,) for v in range(1, SCHEMA_VERSION + 1)]
        conn.execute(f"INSERT INTO {schema}.schema_version VALUES (99, 0)")
        with pytest.raises(StorageError, match="newer than this cio-outbox"):
            open_storage(postgres_location)
        foreign = schema + "_f"
        conn.execute(f"CREATE SCHEMA {foreign}")
        conn.execute(f"CREATE TABLE {foreign}.customers (id int)")
        try:
            with pytest.raises(StorageError, match="not a cio-outbox outbox"):
                open_storage(postgres_location.replace(schema, foreign))
        finally:
            conn.execute(f"DROP SCHEMA {foreign} CASCADE")


def test_postgres_claim_skips_a_row_locked_elsewhere_and_that_persons_later_rows(
    postgres_location: str,
) -> None:
    import psycopg

    from cio_outbox.storage.postgres import split_location

    plain, schema = split_location(postgres_location)
    storage = open_storage(postgres_location)
    storage.insert([new_row(0, "a"), new_row(1, "b"), new_row(2, "a"), new_row(3, "c")])
    with psycopg.connect(plain) as other:  # a transaction holding m0 (a late writer)
        other.execute(f"SELECT id FROM {schema}.messages WHERE message_id = 'm0' FOR UPDATE")
        taken = claim(storage, "w1")
        assert [r.message_id for r in taken] == ["m1", "m3"]
        other.rollback()
    assert [r.message_id for r in claim(storage, "w2")] == ["m0", "m2"]
    assert_counts_right(storage)
    storage.close()


def test_postgres_ends_a_transaction_left_open_by_a_paused_process(
    postgres_location: str,
) -> None:
    from cio_outbox.storage.postgres import IDLE_IN_TRANSACTION_MS

    storage = open_storage(postgres_location)
    conn = storage.conn  # type: ignore[attr-defined]
    shown = conn.execute("SHOW idle_in_transaction_session_timeout").fetchone()[0]
    assert shown == f"{IDLE_IN_TRANSACTION_MS // 60_000}min" and IDLE_IN_TRANSACTION_MS <= 60_000
    storage.close()


def test_the_forget_command_fails_while_an_older_transaction_keeps_the_traces(
    postgres_location: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner

    from cio_outbox.cli import cli
    from cio_outbox.storage.postgres import PostgresStorage

    with Outbox(postgres_location) as outbox:
        _enqueue_person_data(outbox)
    monkeypatch.setattr(PostgresStorage, "vacuum_wait", 0.3)
    other, release = _open_older_transaction(postgres_location)
    try:
        result = CliRunner().invoke(cli, ["forget", SECRET_ID, "--db", postgres_location])
    finally:
        release.set()
        other.join(30)
    assert result.exit_code == 1, result.output
    assert "removed 3 row(s)" in result.stdout and "was vacuumed" not in result.stdout
    assert "older transactions of other clients are open (pids " in result.stderr
    assert SECRET_ID not in result.output


def test_postgres_leases_follow_the_server_clock(
    postgres_location: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = open_storage(postgres_location)
    storage.insert([new_row(0, "a")])
    taken = claim(storage, "w1", lease=30)
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 3600)  # this machine runs ahead
    assert claim(storage, "w2") == []  # the lease has not expired on the server's clock
    monkeypatch.undo()
    row = storage.rows(status="in_flight")[0]
    assert row["worker_id"] == "w1" and row["id"] == taken[0].id
    assert abs(row["lease_expires_at"] - (time.time() + 30)) < 10
    storage.close()


def test_sqlite_connections_get_a_cache_large_enough_for_random_message_ids(
    tmp_path: Path,
) -> None:
    from cio_outbox.storage.sqlite import CACHE_KIB

    with Outbox(tmp_path / "outbox.db") as outbox:
        outbox.enqueue({"type": "track", "userId": "u", "event": "E"})
        conns = [outbox.storage.conn]  # type: ignore[attr-defined]
        other = threading.Thread(target=lambda: conns.append(outbox.storage.conn))  # type: ignore[attr-defined]
        other.start()
        other.join()
        assert conns[0] is not conns[1]
        for conn in conns:
            assert conn.execute("PRAGMA cache_size").fetchone()[0] == -CACHE_KIB
    assert CACHE_KIB >= 65_536


def test_sqlite_rows_get_their_persons_lane_on_every_insert_path(tmp_path: Path) -> None:
    from cio_outbox.storage.lanes import lane_of
    from cio_outbox.storage.sqlite import SQLiteStorage

    storage = SQLiteStorage(tmp_path / "o.db")
    storage.insert([new_row(i, person=f"p{i % 37}", run=f"r{i % 3}") for i in range(300)])
    for i in range(300, 310):
        storage.insert([new_row(i, person=f"p{i}")])
    stored = storage.conn.execute("SELECT person, lane FROM messages").fetchall()
    assert len(stored) == 310
    assert all(lane == lane_of(person, storage.lanes) for person, lane in stored)
    assert len({lane for _, lane in stored}) > 20


def test_connections_of_ended_threads_are_closed(tmp_path: Path) -> None:
    """Each thread that writes gets a connection of its own (a worker's senders, one set
    per run); once the thread has ended its connection is closed, so that a long-lived
    process does not pile up open outbox files."""
    location = tmp_path / "outbox.db"
    with Outbox(location) as outbox:
        for i in range(12):
            thread = threading.Thread(target=outbox.enqueue,
                                      args=({"type": "track", "userId": f"p{i}",
                                             "event": "Step"},))
            thread.start()
            thread.join()
        outbox.status()
        fds = [name for name in os.listdir("/proc/self/fd")
               if os.path.realpath(f"/proc/self/fd/{name}") == str(location.resolve())]
        assert len(fds) <= 3, f"{len(fds)} open descriptors of the outbox"
        assert outbox.status()["pending"] == 12
