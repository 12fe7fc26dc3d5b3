"""JSONL and CSV readers, and enqueueing their records with stable ids."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from cio_outbox import Outbox
from cio_outbox.importers import (
    MAX_LISTED_REJECTIONS,
    CsvMapping,
    CsvReader,
    JsonlReader,
    MappingError,
    enqueue_file,
    enqueue_records,
    read_text,
    reader_for,
)
from cio_outbox.intake import line_message_id
from cio_outbox.messages import message_id_for


def _jsonl(*lines: str) -> str:
    return "\n".join(lines) + "\n"


# -- JSONL ---------------------------------------------------------------------------------


def test_jsonl_lines_become_calls_with_stable_ids_unless_they_carry_one() -> None:
    text = _jsonl(
        json.dumps({"type": "identify", "userId": "u1", "traits": {"plan": "pro"}}),
        "",
        json.dumps({"type": "track", "userId": "u1", "event": "Paid", "messageId": "m-7"}),
    )
    records = read_text(text, run="r")
    assert [r.line for r in records] == [1, 3]  # the blank line 2 is skipped, not numbered anew
    assert records[0].call is not None and records[1].call is not None
    first_line = text.splitlines()[0].encode()
    assert records[0].call["messageId"] == line_message_id("r", 1, first_line)
    assert records[0].call["traits"] == {"plan": "pro"}
    assert records[1].call["messageId"] == "m-7"
    # The same text read again gives the same ids: a rerun finds them already enqueued.
    assert read_text(text, run="r")[0].call == records[0].call
    assert read_text(text, run="other")[0].call["messageId"] != records[0].call["messageId"]


def test_jsonl_reports_bad_json_non_objects_and_broken_utf8_by_line() -> None:
    raw = (
        b'{"type": "identify", "userId": "u1"}\n'
        b'{"type": "identify", "userId": \n'
        b"[1, 2]\n"
        b'{"type": "identify", "userId": "caf\xe9"}\n'
        b'{"type": "identify", "userId": "u5"}'  # no final newline
    )
    records = list(JsonlReader(io.BytesIO(raw), run="r"))
    assert [r.line for r in records] == [1, 2, 3, 4, 5]
    assert records[0].call is not None and records[4].call is not None
    assert records[1].call is None and records[1].error is not None
    assert records[1].error.startswith("invalid JSON")
    assert records[2].error == "a call must be a JSON object"
    assert records[3].error is not None and "not valid UTF-8" in records[3].error
    assert "0xe9" in records[3].error


def test_jsonl_rejects_a_line_of_non_json_whitespace_instead_of_skipping_it() -> None:
    """Only ASCII whitespace makes a line blank. A line holding an information separator
    or a Unicode space is a broken line: rejected by its number, never dropped as if blank
    (hypothesis found b"\\x1c" skipped and uncounted)."""
    raw = b'\x1c\n\xc2\xa0\n\xe2\x80\xa8\n \t\r\n{"type": "identify", "userId": "u5"}\n'
    records = list(JsonlReader(io.BytesIO(raw), run="r"))
    assert [r.line for r in records] == [1, 2, 3, 5]
    assert all(r.call is None and r.error and r.error.startswith("invalid JSON")
               for r in records[:3])
    assert records[3].call is not None


@pytest.mark.parametrize("lead", [b"\x0b", b"\x0c"])
def test_a_line_led_by_a_vertical_tab_or_form_feed_is_invalid_on_every_path(
    tmp_path: Path, lead: bytes
) -> None:
    """JSON's whitespace is space, tab, CR and LF: a line led by another ASCII space is
    invalid JSON, whichever of the reader's paths reads it (the import's fast path once
    stripped every ASCII space and accepted it, the records path refused it)."""
    raw = lead + b'{"type": "identify", "userId": "u1"}\n{"type": "identify", "userId": "u2"}\n'
    records = list(JsonlReader(io.BytesIO(raw), run="r"))
    assert records[0].call is None and records[0].error is not None
    assert records[0].error.startswith("invalid JSON")
    path = tmp_path / "calls.jsonl"
    path.write_bytes(raw)
    with Outbox(str(tmp_path / "o.db")) as outbox:
        result = enqueue_file(outbox, path)
        assert (result.added, [r.line for r in result.rejections]) == (1, [1])
        assert [json.loads(r["payload"])["userId"] for r in outbox.rows()] == ["u2"]


def test_jsonl_ignores_a_utf8_byte_order_mark() -> None:
    raw = b'\xef\xbb\xbf{"type": "identify", "userId": "u1"}\n'
    (record,) = JsonlReader(io.BytesIO(raw), run="r")
    assert record.call is not None and record.call["userId"] == "u1"


def test_reader_counts_bytes_read_for_progress(tmp_path: Path) -> None:
    path = tmp_path / "calls.jsonl"
    path.write_text(_jsonl(*[json.dumps({"type": "identify", "userId": f"u{i}"})
                             for i in range(10)]))
    reader = reader_for(path, run="calls.jsonl")
    assert isinstance(reader, JsonlReader)
    assert reader.bytes_read == 0
    assert len(list(reader)) == 10
    assert reader.bytes_read == path.stat().st_size


# -- CSV -----------------------------------------------------------------------------------


def test_csv_identify_maps_columns_and_other_columns_become_traits() -> None:
    text = "id,email,plan,ts\nu1,ada@example.com,pro,2024-01-02T03:04:05Z\nu2,,free,\n"
    mapping = CsvMapping("identify", columns={"id": "userId", "ts": "timestamp"})
    first, second = read_text(text, run="people.csv", format="csv", mapping=mapping)
    assert first.line == 2 and second.line == 3
    assert first.call == {
        "type": "identify", "userId": "u1", "timestamp": "2024-01-02T03:04:05Z",
        "traits": {"email": "ada@example.com", "plan": "pro"},
        "messageId": line_message_id("people.csv", 2,
                                     b"u1\x1fada@example.com\x1fpro\x1f2024-01-02T03:04:05Z"),
    }
    # Empty cells are left out rather than sent as "".
    assert second.call == {"type": "identify", "userId": "u2", "traits": {"plan": "free"},
                           "messageId": line_message_id("people.csv", 3, b"u2\x1f\x1ffree\x1f")}


def test_csv_track_with_event_column_renames_and_key_column() -> None:
    text = "order,customer,what,total,note\nA1,u1,Order Placed,42.5,x\n"
    mapping = CsvMapping("track", columns={
        "customer": "userId", "what": "event", "order": "key", "total": "properties.amount",
        "note": "ignore",
    })
    (record,) = read_text(text, run="orders", format="csv", mapping=mapping)
    assert record.call == {
        "type": "track", "userId": "u1", "event": "Order Placed",
        "properties": {"amount": "42.5"}, "messageId": message_id_for("orders:A1"),
    }


def test_csv_wire_named_columns_map_themselves_and_fixed_event() -> None:
    text = "userId,timestamp,sku\nu1,2024-01-01,abc\n"
    (record,) = read_text(text, run="r", format="csv",
                          mapping=CsvMapping("track", event="Viewed"))
    assert record.call is not None
    assert record.call["event"] == "Viewed"
    assert record.call["timestamp"] == "2024-01-01"
    assert record.call["properties"] == {"sku": "abc"}


def test_csv_rejects_short_rows_broken_utf8_and_empty_keys_and_numbers_quoted_lines() -> None:
    raw = (
        b"id,name,key\n"
        b'u1,"two\nlines",k1\n'  # lines 2-3
        b"u2,only-two\n"  # line 4
        b"u3,caf\xe9,k3\n"  # line 5
        b"u4,ok,\n"  # line 6: empty key
        b"\n"  # line 7: blank
        b"u8,fine,k8\n"  # line 8
    )
    mapping = CsvMapping(columns={"id": "userId", "key": "key"})
    records = list(CsvReader(io.BytesIO(raw), "r", mapping))
    by_line = {r.line: r for r in records}
    assert sorted(by_line) == [2, 4, 5, 6, 8]
    assert by_line[2].call is not None and by_line[2].call["traits"] == {"name": "two\nlines"}
    assert by_line[4].error == "the row has 2 fields, the header 3"
    assert by_line[5].error is not None and "UTF-8" in by_line[5].error
    assert by_line[6].error == "the key column is empty"
    assert by_line[8].call is not None
    assert by_line[8].call["messageId"] == message_id_for("r:k8")


@pytest.mark.parametrize(
    ("mapping", "header", "message"),
    [
        (CsvMapping(columns={"nope": "userId"}), "id,x", "not in the header"),
        (CsvMapping("track", columns={"id": "userId"}), "id,x", "need an event"),
        (CsvMapping(), "id,x", "no column holds the person"),
        (CsvMapping(columns={"id": "userId"}), "id,id", "twice"),
    ],
)
def test_csv_mapping_errors_name_the_problem(mapping: CsvMapping, header: str,
                                             message: str) -> None:
    with pytest.raises(MappingError, match=message):
        read_text(header + "\n1,2\n", run="r", format="csv", mapping=mapping)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"call_type": "page"}, "identify or track"),
        ({"columns": {"a": "properties.x"}}, "not one of"),
        ({"columns": {"a": "event"}}, "no event"),
        ({"call_type": "identify", "event": "X"}, "only makes sense for track"),
    ],
)
def test_csv_mapping_refuses_impossible_targets(kwargs: dict, message: str) -> None:
    with pytest.raises(MappingError, match=message):
        CsvMapping(**kwargs)


def test_jsonl_refuses_a_column_mapping() -> None:
    with pytest.raises(MappingError):
        reader_for(io.BytesIO(b""), run="r", format="jsonl", mapping=CsvMapping())


# -- enqueueing ----------------------------------------------------------------------------


def test_enqueue_file_keeps_valid_lines_and_reports_invalid_ones(outbox: Outbox,
                                                                 tmp_path: Path) -> None:
    path = tmp_path / "mixed.jsonl"
    lines = [json.dumps({"type": "identify", "userId": f"u{i}"}) for i in range(1, 8)]
    lines[2] = "{oops"
    lines[4] = json.dumps({"type": "track", "userId": "u5"})  # no event
    path.write_text(_jsonl(*lines))
    result = enqueue_file(outbox, path, chunk_size=2)
    assert result.run == "mixed.jsonl"
    assert (result.lines, result.added, result.skipped, result.rejected) == (7, 5, 0, 2)
    assert [r.line for r in result.rejections] == [3, 5]
    assert result.rejections[1].field == "event"
    assert outbox.status()["pending"] == 5
    # The message ids follow the lines, whatever chunk they were written in.
    row = outbox.history(line_message_id("mixed.jsonl", 7, lines[6].encode()))
    assert row is not None and row["message"]["run"] == "mixed.jsonl"

    again = enqueue_file(outbox, path, chunk_size=3)
    assert (again.added, again.skipped, again.rejected) == (0, 5, 2)
    assert outbox.status()["pending"] == 5


def test_enqueue_records_lists_only_the_first_rejections(outbox: Outbox) -> None:
    text = "x\n" * (MAX_LISTED_REJECTIONS + 5)
    result = enqueue_records(outbox, read_text(text, run="r"), run="r")
    assert result.rejected == MAX_LISTED_REJECTIONS + 5
    assert len(result.rejections) == MAX_LISTED_REJECTIONS
    assert result.as_dict()["rejections_not_listed"] == 5


def test_enqueue_records_reports_progress_per_chunk(outbox: Outbox) -> None:
    text = _jsonl(*[json.dumps({"type": "identify", "userId": f"u{i}"}) for i in range(5)])
    seen: list[int] = []
    enqueue_records(outbox, read_text(text, run="r"), run="r", chunk_size=2,
                    on_chunk=lambda result: seen.append(result.added))
    assert seen == [2, 4, 5]
