"""Packing rows into request bodies: exact size, the 500 KB limit, alias, per-person order."""

from __future__ import annotations

import json

from cio_outbox.batch import (
    BATCH_OVERHEAD,
    MAX_BATCH_BYTES,
    Row,
    batch_body,
    batch_size,
    select,
    sent_at_now,
    single_body,
)


def _row(i: int, person: str = "p", size: int | None = None, call_type: str = "track") -> Row:
    payload = json.dumps({"type": call_type, "userId": person, "event": "E", "messageId": f"m{i}"},
                         separators=(",", ":"))
    if size is not None:
        pad = size - len(payload) - len(',"pad":""')
        payload = payload[:-1] + f',"pad":"{"x" * pad}"' + "}"
    return Row(i, f"m{i}", "", call_type, person, payload, len(payload.encode()))


def test_batch_size_is_the_exact_length_of_the_body() -> None:
    rows = [_row(i, f"p{i}") for i in range(50)]
    body = batch_body([r.payload for r in rows], sent_at_now())
    assert len(body) == batch_size(r.size for r in rows)
    parsed = json.loads(body)
    assert [m["messageId"] for m in parsed["batch"]] == [f"m{i}" for i in range(50)]
    assert parsed["sentAt"].endswith("Z")
    assert batch_size([]) == BATCH_OVERHEAD


def test_selected_rows_always_fit_in_500000_bytes_exactly() -> None:
    rows = [_row(i, f"p{i}", size=30_000 + i) for i in range(40)]
    chosen = select(rows, set())
    body = batch_body([r.payload for r in chosen], sent_at_now())
    assert len(body) <= MAX_BATCH_BYTES
    assert len(body) + rows[len(chosen)].size + 1 > MAX_BATCH_BYTES  # the next would not fit
    assert chosen == rows[: len(chosen)]


def test_a_body_of_exactly_the_limit_is_allowed() -> None:
    room = MAX_BATCH_BYTES - BATCH_OVERHEAD
    rows = [_row(1, "a", size=room // 2), _row(2, "b", size=room - room // 2 - 1)]
    chosen = select(rows, set())
    assert len(chosen) == 2
    assert len(batch_body([r.payload for r in chosen], sent_at_now())) == MAX_BATCH_BYTES


def test_blocked_person_and_all_their_later_rows_are_skipped() -> None:
    rows = [_row(1, "a"), _row(2, "b"), _row(3, "a"), _row(4, "c")]
    assert [r.id for r in select(rows, {"a"})] == [2, 4]


def test_a_person_whose_row_does_not_fit_keeps_order() -> None:
    rows = [_row(1, "a", size=300_000), _row(2, "b", size=300_000), _row(3, "b", size=100),
            _row(4, "c", size=100)]
    # Row 2 does not fit; row 3 (same person) must not jump ahead of it.
    assert [r.id for r in select(rows, set())] == [1, 4]


def test_alias_goes_alone_and_blocks_its_person_in_a_batch() -> None:
    alias = _row(1, "a", call_type="alias")
    assert select([alias, _row(2, "b")], set()) == [alias]
    rows = [_row(1, "b"), _row(2, "a", call_type="alias"), _row(3, "a"), _row(4, "c")]
    assert [r.id for r in select(rows, set())] == [1, 4]


def test_max_messages_caps_a_batch() -> None:
    rows = [_row(i, f"p{i}") for i in range(100)]
    assert len(select(rows, set(), max_messages=10)) == 10


def test_single_body_adds_sent_at() -> None:
    body = single_body('{"type":"alias","userId":"u","previousId":"p"}', "2024-01-01T00:00:00.000Z")
    assert json.loads(body) == {"type": "alias", "userId": "u", "previousId": "p",
                                "sentAt": "2024-01-01T00:00:00.000Z"}


def test_a_full_body_stops_the_scan_instead_of_reading_the_whole_backlog() -> None:
    seen: list[int] = []

    def backlog():  # type: ignore[no-untyped-def]
        for i in range(100_000):
            seen.append(i)
            yield _row(i, f"p{i}", size=250)

    chosen = select(backlog(), set())
    assert 1900 < len(chosen) < 2000
    assert len(seen) < len(chosen) + 50
