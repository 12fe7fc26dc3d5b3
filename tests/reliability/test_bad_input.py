"""Bad input, property-based: every enqueue call and both importers either enqueue a message
our spec accepts, or refuse it with an error naming the field (or the line); never a
half-written row, never any other exception."""

from __future__ import annotations

import datetime as dt
import io
import json
import math
import uuid
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cio_outbox import Outbox
from cio_outbox.importers import (
    CsvMapping,
    CsvReader,
    FormatError,
    JsonlReader,
    enqueue_records,
)
from cio_outbox.messages import MAX_MESSAGE_BYTES, MessageError
from cio_outbox.outbox import EnqueueResult
from cio_outbox.spec import check_call

SETTINGS = settings(max_examples=100, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow,
                                           HealthCheck.function_scoped_fixture])

# Refusals that carry no MessageError.field: a value nested too deeply to write as JSON has
# no one field to blame. Any other field-less refusal fails the property tests.
KNOWN_FIELDLESS = ("cannot be written as JSON",)


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Outbox]:
    with Outbox(tmp_path_factory.mktemp("bad-input") / "bad.db") as outbox:
        yield outbox


def _rows(box: Outbox) -> int:
    return sum(box.storage.counts().values())


# ---------------------------------------------------------------- strategies

huge_numbers = st.sampled_from([10**400, -(10**400), 2**64, 10**4000, 1e308, -1e308,
                                5e-324, float("inf"), float("-inf"), float("nan")])
odd_text = st.sampled_from(["", " ", "\t\n", "\x00", "\u200b", "é", "\U0001F600" * 3, "\ufeff",
                            "a" * 101, "\ud800", "null", "\U0001D4B3" * 50])
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), huge_numbers, st.text(max_size=30),
    odd_text,
)
non_json = st.sampled_from([
    {1, 2}, b"bytes", bytearray(b"x"), object(), Decimal("NaN"), Decimal("1.5"),
    uuid.UUID(int=7), dt.date(2024, 1, 2), dt.datetime(2024, 1, 2, 3, 4, 5), (1, 2),
    {1: "int key"}, complex(1, 2),
])
values = st.recursive(
    st.one_of(scalars, non_json),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12,
)
bags = st.one_of(st.none(), st.dictionaries(st.text(max_size=10), values, max_size=5),
                 values)
ids = st.one_of(
    st.text(min_size=1, max_size=20), odd_text, st.integers(), huge_numbers, st.booleans(),
    st.none(), st.just([]), st.just({"id": 1}), st.floats(allow_nan=False),
)
# Any year: before 1000 too (stored as four digits, "0365-06-12T...").
EARLIEST = dt.datetime(1, 1, 2)
timestamps = st.one_of(
    st.none(), st.datetimes(min_value=EARLIEST),
    st.datetimes(min_value=EARLIEST, timezones=st.timezones()),
    st.dates(min_value=EARLIEST.date()),
    st.text(max_size=30), st.sampled_from(["2024-01-02T03:04:05Z", "2024-13-40", "yesterday",
                                           "2024-01-02", "9999-12-31T23:59:59Z"]),
    st.integers(), st.floats(),
)
big = st.integers(min_value=32_000, max_value=34_000).map(lambda n: {"blob": "x" * n})


def _call_kwargs() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({}, optional={
        "timestamp": timestamps, "context": bags, "integrations": bags,
        "message_id": ids, "anonymous_id": ids,
    })


CALLS: dict[str, Callable[[Outbox, st.DataObject], EnqueueResult]] = {
    "identify": lambda b, d: b.identify(d.draw(ids), traits=d.draw(st.one_of(bags, big)),
                                        **d.draw(_call_kwargs())),
    "track": lambda b, d: b.track(d.draw(ids), d.draw(st.one_of(ids, st.just("Event"))),
                                  properties=d.draw(st.one_of(bags, big)),
                                  **d.draw(_call_kwargs())),
    "page": lambda b, d: b.page(d.draw(ids), d.draw(st.one_of(st.none(), ids)),
                                properties=d.draw(bags), **d.draw(_call_kwargs())),
    "screen": lambda b, d: b.screen(d.draw(ids), d.draw(st.one_of(st.none(), ids)),
                                    properties=d.draw(bags), **d.draw(_call_kwargs())),
    "group": lambda b, d: b.group(d.draw(ids), d.draw(ids), traits=d.draw(bags),
                                  **d.draw(_call_kwargs())),
    "alias": lambda b, d: b.alias(d.draw(ids), d.draw(ids), **{
        k: v for k, v in d.draw(_call_kwargs()).items() if k != "anonymous_id"}),
}

wire_calls = st.fixed_dictionaries(
    {"type": st.one_of(st.sampled_from(list(CALLS)), ids)},
    optional={
        "userId": ids, "anonymousId": ids, "event": ids, "name": ids, "groupId": ids,
        "previousId": ids, "traits": st.one_of(bags, big), "properties": bags,
        "context": bags, "integrations": bags, "timestamp": timestamps, "messageId": ids,
        "sentAt": values, "receivedAt": values, "unknownField": values,
    },
)


# ---------------------------------------------------------------- checks


def _check_refusal(exc: MessageError) -> None:
    assert str(exc), "a refusal must say why"
    if not exc.field:
        assert any(known in str(exc) for known in KNOWN_FIELDLESS), (
            f"refusal names no field: {exc}")


def _check_stored(box: Outbox, message_id: str) -> None:
    row = box.storage.message(message_id)
    assert row is not None
    payload = json.loads(row["payload"])
    assert len(row["payload"].encode("utf-8")) <= MAX_MESSAGE_BYTES
    violations = check_call(row["call_type"], payload)
    assert violations == [], f"stored a message our spec refuses: {violations} {payload}"


def _outcome(box: Outbox, enqueue: Callable[[], EnqueueResult]) -> None:
    before = _rows(box)
    try:
        result = enqueue()
    except MessageError as exc:
        _check_refusal(exc)
        assert _rows(box) == before, "a refused call left a row behind"
        return
    assert result.added + result.skipped == 1
    assert _rows(box) == before + result.added
    assert result.message_id is not None
    _check_stored(box, result.message_id)


# ---------------------------------------------------------------- the enqueue calls


@pytest.mark.parametrize("call_type", list(CALLS))
@SETTINGS
@given(data=st.data())
def test_each_call_enqueues_a_valid_message_or_names_the_field(
    box: Outbox, call_type: str, data: st.DataObject
) -> None:
    _outcome(box, lambda: CALLS[call_type](box, data))


@SETTINGS
@given(call=wire_calls)
def test_enqueue_of_wire_dicts(box: Outbox, call: dict[str, Any]) -> None:
    _outcome(box, lambda: box.enqueue(call))


@SETTINGS
@given(calls=st.lists(st.one_of(wire_calls, st.sampled_from([
    {"type": "track", "userId": "ok", "event": "Fine"},
    {"type": "identify", "userId": 7, "traits": {"n": 10**400}},
    "not a dict", None, 42,
])), max_size=12))
def test_enqueue_many_raise_writes_all_or_nothing(box: Outbox, calls: list[Any]) -> None:
    before = _rows(box)
    try:
        result = box.enqueue_many(calls, on_invalid="raise")
    except MessageError as exc:
        _check_refusal(exc)
        assert "nothing written" in str(exc)
        assert _rows(box) == before, "a refused enqueue_many left rows behind"
        return
    assert result.added + result.skipped == len(calls) and not result.rejected
    assert _rows(box) == before + result.added


@SETTINGS
@given(calls=st.lists(wire_calls, max_size=12))
def test_enqueue_many_skip_reports_each_refusal_by_index(box: Outbox,
                                                         calls: list[Any]) -> None:
    before = _rows(box)
    result = box.enqueue_many(calls, on_invalid="skip")
    assert result.added + result.skipped + len(result.rejected) == len(calls)
    assert _rows(box) == before + result.added
    for rejection in result.rejected:
        assert 0 <= rejection.index < len(calls)
        if not rejection.field:
            assert any(known in rejection.error for known in KNOWN_FIELDLESS), rejection


# ---------------------------------------------------------------- importers

_line_bytes = st.one_of(
    wire_calls.map(lambda c: json.dumps(c, default=str).encode()),
    st.binary(max_size=60),  # mostly broken UTF-8 and broken JSON
    st.sampled_from([
        b'{"type":"track","userId":"u","event":"E","properties":{"n":1e400}}',
        b'{"type":"track","userId":"u","event":"E","properties":{"n":' + b"9" * 4000 + b"}}",
        b'{"type":"identify","userId":"u","traits":{"x":NaN}}',
        b'{"type":"identify","userId":"u","traits":' + b'{"a":' * 10_000 + b"1"
        + b"}" * 10_001,
        b"[" * 10_000 + b"]" * 10_000,
        b'{"type":"identify","userId":"\xff\xfe"}',
        b'{"type":"identify","userId":"\\ud800"}',
        b'{"type":"identify","userId":""}',
        b'{"type":"identify","userId":12345}',
        b'{"type":"identify","userId":true}',
        b'{"type":"identify","userId":"u","traits":{"big":"' + b"x" * 33_000 + b'"}}',
        b"\xef\xbb\xbf{}", b"", b"   ", b"null", b"[]", b'"text"',
    ]),
)


@SETTINGS
@given(lines=st.lists(_line_bytes, min_size=1, max_size=8))
def test_jsonl_import_enqueues_or_rejects_each_line_by_number(box: Outbox,
                                                             lines: list[bytes]) -> None:
    data = b"\n".join(line.replace(b"\n", b" ").replace(b"\r", b" ") for line in lines)
    run = f"jsonl-{uuid.uuid4()}"
    before = _rows(box)
    try:
        result = enqueue_records(box, JsonlReader(io.BytesIO(data), run=run), run=run)
    except FormatError as exc:  # the start plainly is another format (or not gzip): refused
        assert "looks like" in str(exc) or "decompress" in str(exc)
        assert _rows(box) == before
        return
    used = [n for n, line in enumerate(data.split(b"\n"), 1)
            if line.replace(b"\xef\xbb\xbf", b"", 1 if n == 1 else 0).strip()]
    assert result.lines == len(used)
    assert result.added + result.skipped + result.rejected == result.lines
    assert _rows(box) == before + result.added
    assert {r.line for r in result.rejections} <= set(used)
    for row in box.rows(run=run, limit=100):
        _check_stored(box, row["message_id"])


# A file holds bytes: a lone surrogate cannot be written into one (broken bytes come below).
_cells = st.one_of(st.text(max_size=15), odd_text.filter(lambda s: "\ud800" not in s),
                   st.sampled_from(["2024-01-02T03:04:05Z", "not a date", "", "a,b",
                                    'q"uote', "line\nbreak"]))


@SETTINGS
@given(rows=st.lists(st.tuples(_cells, _cells, _cells, _cells), max_size=8),
       broken=st.lists(st.binary(min_size=1, max_size=20), max_size=2),
       call_type=st.sampled_from(["identify", "track"]))
def test_csv_import_enqueues_or_rejects_each_record_by_line(
    box: Outbox, rows: list[tuple[str, ...]], broken: list[bytes], call_type: str
) -> None:
    out = io.StringIO()
    import csv

    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["userId", "timestamp", "email", "plan"])
    writer.writerows(rows)
    data = out.getvalue().encode("utf-8") + b"".join(b + b"\n" for b in broken)
    run = f"csv-{uuid.uuid4()}"
    mapping = CsvMapping(call_type, event="Imported" if call_type == "track" else None)
    before = _rows(box)
    result = enqueue_records(box, CsvReader(io.BytesIO(data), run, mapping), run=run)
    assert result.added + result.skipped + result.rejected == result.lines
    assert _rows(box) == before + result.added
    last_line = data.count(b"\n") + 1
    assert all(2 <= r.line <= last_line for r in result.rejections)
    for row in box.rows(run=run, limit=100):
        _check_stored(box, row["message_id"])


# ---------------------------------------------------------------- explicit edge cases


def test_oversized_message_is_refused_naming_the_message(box: Outbox) -> None:
    before = _rows(box)
    with pytest.raises(MessageError) as caught:
        box.track("u1", "Big", properties={"blob": "x" * MAX_MESSAGE_BYTES})
    assert caught.value.field == "message" and "32768" in str(caught.value)
    assert _rows(box) == before


@pytest.mark.parametrize("depth", [10_000, 100_000])
def test_deeply_nested_values_become_a_clear_error(box: Outbox, depth: int) -> None:
    nested: dict[str, Any] = {}
    cursor = nested
    for _ in range(depth):
        cursor["a"] = {}
        cursor = cursor["a"]
    before = _rows(box)
    with pytest.raises(MessageError, match="cannot be written as JSON"):
        box.track("u1", "Deep", properties=nested)
    with pytest.raises(MessageError):
        box.enqueue({"type": "identify", "userId": "u1", "traits": nested})
    assert _rows(box) == before


def test_deeply_nested_jsonl_line_is_rejected_by_line_number(box: Outbox) -> None:
    deep = b'{"type":"identify","userId":"u","traits":' + b'{"a":' * 10_000 + b"1" + (
        b"}" * 10_001)
    data = b'{"type":"identify","userId":"ok"}\n' + deep + b"\n"
    result = enqueue_records(box, JsonlReader(io.BytesIO(data), run="deep"), run="deep")
    assert result.added + result.skipped == 1 and result.rejected == 1
    assert result.rejections[0].line == 2 and "nested too deeply" in result.rejections[0].error


@pytest.mark.parametrize("value", [10**400, -(10**400)])
def test_huge_integers_are_kept_exactly(box: Outbox, value: int) -> None:
    result = box.track("u1", "Huge", properties={"n": value})
    row = box.storage.message(result.message_id)
    assert row is not None and json.loads(row["payload"])["properties"]["n"] == value


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan"), 1e308 * 10,
                                   10**5000, Decimal("Infinity")],
                         ids=["inf", "-inf", "nan", "overflow", "10**5000", "Decimal-inf"])
def test_numbers_json_cannot_carry_are_refused_naming_the_field(box: Outbox,
                                                               value: Any) -> None:
    with pytest.raises(MessageError) as caught:
        box.track("u1", "Overflow", properties={"n": value})
    assert caught.value.field == "properties.n"
    assert not (isinstance(value, float) and math.isfinite(value))


@pytest.mark.parametrize(("user_id", "field"), [("", "userId"), ("   ", "userId"),
                                                (1.5, "userId"), (True, "userId"),
                                                ([], "userId"), ({"a": 1}, "userId")])
def test_bad_ids_are_refused_naming_the_field(box: Outbox, user_id: Any, field: str) -> None:
    with pytest.raises(MessageError) as caught:
        box.identify(user_id)
    assert caught.value.field == field


def test_integer_ids_become_strings(box: Outbox) -> None:
    result = box.group(42, 7)
    row = box.storage.message(result.message_id)
    assert row is not None
    payload = json.loads(row["payload"])
    assert (payload["userId"], payload["groupId"]) == ("42", "7")


def test_missing_person_refusal_names_the_field(box: Outbox) -> None:
    with pytest.raises(MessageError) as caught:
        box.track(None, "E")
    assert caught.value.field in ("userId", "anonymousId")


def test_lone_surrogate_is_refused_naming_the_field(box: Outbox) -> None:
    with pytest.raises(MessageError) as caught:
        box.track("u1", "E", properties={"s": "\ud800"})
    assert caught.value.field == "properties.s"


def test_jsonl_line_with_a_lone_surrogate_escape_is_rejected_not_a_crash(box: Outbox) -> None:
    data = b'{"type":"identify","userId":"u","traits":{"s":"\\ud800"}}\n'
    result = enqueue_records(box, JsonlReader(io.BytesIO(data), run="surrogate"),
                             run="surrogate")
    assert result.rejected == 1 and result.rejections[0].line == 1


# ---------------------------------------------------- library bugs found here (now fixed)


def test_jsonl_line_with_a_5000_digit_number_is_rejected_not_a_crash(box: Outbox) -> None:
    data = (b'{"type":"track","userId":"u","event":"E","properties":{"n":'
            + b"9" * 5000 + b"}}\n")
    result = enqueue_records(box, JsonlReader(io.BytesIO(data), run="digits"), run="digits")
    assert result.rejected == 1 and result.rejections[0].line == 1


@pytest.mark.parametrize("timestamp", [dt.datetime(365, 6, 12), "0001-01-01T00:00:00Z",
                                       dt.date(999, 12, 31)])
def test_early_timestamps_are_stored_as_rfc3339_or_refused(box: Outbox, timestamp: Any) -> None:
    _outcome(box, lambda: box.track("u1", "Old", timestamp=timestamp))
