"""CSV import pitfalls (key column as the id column, repeated rows, header hints, typed
mapping, trimmed headers) and input sniffing (CSV given as JSONL, gzip, JSON arrays, BOMs)."""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from cio_outbox import Outbox
from cio_outbox.cli import cli
from cio_outbox.importers import (
    CsvMapping,
    CsvReader,
    FormatError,
    MappingError,
    enqueue_file,
    read_text,
    reader_for,
)
from cio_outbox.known_traits import suggest_traits
from cio_outbox.messages import message_id_for


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    for name in ("CIO_OUTBOX", "CIO_API_KEY", "CIO_HOST", "CIO_REGION"):
        monkeypatch.delenv(name, raising=False)
    return CliRunner()


def _payloads(db: str) -> list[dict]:
    with Outbox(db) as outbox:
        return [json.loads(row["payload"]) for row in outbox.storage.rows(limit=1000)]


# -- point 7: CSV pitfalls ------------------------------------------------------------------


def test_the_key_column_may_be_the_user_id_column() -> None:
    text = "id,plan\nu1,pro\nu2,free\n"
    mapping = CsvMapping(columns={"id": "userId"}, key="id")
    first, second = read_text(text, run="people.csv", format="csv", mapping=mapping)
    assert first.call is not None and second.call is not None
    assert first.call["userId"] == "u1"
    assert first.call["messageId"] == message_id_for("people.csv:u1")
    assert second.call["messageId"] == message_id_for("people.csv:u2")


def test_the_key_column_may_be_the_user_id_column_on_the_command_line(
        runner: CliRunner, tmp_path: Path) -> None:
    path = tmp_path / "people.csv"
    path.write_text("id,plan\nu1,pro\nu2,free\n")
    db = str(tmp_path / "o.db")
    result = runner.invoke(cli, ["enqueue", str(path), "--db", db, "--user-id-column", "id",
                                 "--key-column", "id", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["added"] == 2
    with Outbox(db) as outbox:
        assert outbox.history(message_id_for("people.csv:u1")) is not None


def test_a_repeated_key_drops_identical_rows_and_rejects_conflicting_ones(
        outbox: Outbox, tmp_path: Path) -> None:
    path = tmp_path / "people.csv"
    path.write_text("id,plan\nu1,pro\nu2,free\nu1,pro\nu1,pro\nu2,gold\n")
    result = enqueue_file(outbox, path, mapping=CsvMapping(columns={"id": "userId"}, key="id"))
    assert (result.lines, result.added, result.duplicates, result.rejected) == (5, 2, 2, 1)
    assert result.rejections[0].line == 6
    assert result.rejections[0].field == "key"
    assert "'u2'" in result.rejections[0].error and "line 3" in result.rejections[0].error
    assert result.as_dict()["duplicates"] == 2
    assert outbox.status()["pending"] == 2


def test_dedupe_drops_repeated_rows_without_a_key(outbox: Outbox, tmp_path: Path) -> None:
    path = tmp_path / "people.csv"
    rows = ["u1,pro", "u2,free", "u1,pro", "u1,gold", "u2,free"]
    path.write_text("userId,plan\n" + "\n".join(rows) + "\n")
    plain = enqueue_file(outbox, path, run="plain")
    assert (plain.added, plain.duplicates) == (5, 0)  # without --dedupe, each line is a call
    result = enqueue_file(outbox, path, run="deduped", mapping=CsvMapping(dedupe=True))
    assert (result.lines, result.added, result.duplicates, result.rejected) == (5, 3, 2, 0)


def test_dedupe_on_the_command_line_says_how_many_rows_were_dropped(
        runner: CliRunner, tmp_path: Path) -> None:
    path = tmp_path / "people.csv"
    path.write_text("userId,plan\n" + "u1,pro\n" * 20 + "u2,free\n")
    result = runner.invoke(cli, ["enqueue", str(path), "--db", str(tmp_path / "o.db"),
                                 "--dedupe"])
    assert result.exit_code == 0, result.output
    assert "2 added" in result.stdout
    assert "19 repeated rows dropped" in result.stdout


@pytest.mark.parametrize(
    ("header", "trait"),
    [("Email Address", "email"), ("First Name", "first_name"), ("Created At", "created_at"),
     ("E-mail", "email"), ("last name", "last_name"), ("Phone Number", "phone")],
)
def test_headers_that_look_like_known_traits_get_a_suggestion(header: str, trait: str) -> None:
    assert suggest_traits([header, "id"], mapped=set()) == [(header, trait)]


def test_no_suggestion_for_exact_names_mapped_columns_or_unknown_headers() -> None:
    assert suggest_traits(["email", "first_name", "Favourite Colour"], mapped=set()) == []
    assert suggest_traits(["Email Address"], mapped={"Email Address"}) == []


def test_enqueue_suggests_a_header_map_on_stderr(runner: CliRunner, tmp_path: Path) -> None:
    path = tmp_path / "people.csv"
    path.write_text("userId,Email Address,First Name\nu1,a@example.com,Ada\n")
    result = runner.invoke(cli, ["enqueue", str(path), "--db", str(tmp_path / "o.db")])
    assert result.exit_code == 0, result.output
    assert '--map "Email Address=traits.email"' in result.stderr
    assert '--map "First Name=traits.first_name"' in result.stderr
    assert "Email Address" not in result.stdout


def test_typed_mapping_casts_values_with_the_sync_syntax(outbox: Outbox,
                                                         tmp_path: Path) -> None:
    text = ("userId,Lifetime Value,Orders,VIP,Signed Up,zip\n"
            "u1,365.69,12,yes,2024-05-01,02134\n"
            "u2,,3,no,2024-05-01T12:00:00,\n")
    mapping = CsvMapping(columns={"Lifetime Value": "traits.ltv:float", "Orders": ":int",
                                  "VIP": "traits.vip:bool",
                                  "Signed Up": "traits.created_at:date"})
    first, second = read_text(text, run="r", format="csv", mapping=mapping)
    assert first.call is not None and second.call is not None
    assert first.call["traits"] == {"ltv": 365.69, "Orders": 12, "vip": True,
                                    "created_at": "2024-05-01", "zip": "02134"}
    assert second.call["traits"] == {"Orders": 3, "vip": False,
                                     "created_at": "2024-05-01T12:00:00Z"}


def test_a_value_that_does_not_take_its_type_rejects_its_line_naming_field_and_type(
        outbox: Outbox, tmp_path: Path) -> None:
    path = tmp_path / "orders.csv"
    path.write_text("userId,event,total\nu1,Paid,9.5\nu2,Paid,lots\nu3,Paid,3\n")
    mapping = CsvMapping("track", columns={"total": "properties.total:float"})
    result = enqueue_file(outbox, path, mapping=mapping)
    assert (result.added, result.rejected) == (2, 1)
    rejection = result.rejections[0]
    assert rejection.line == 3
    assert rejection.field == "properties.total"
    assert "'lots'" in rejection.error and "a finite number" in rejection.error
    payloads = sorted((p["userId"], p["properties"]) for p in
                      (json.loads(r["payload"]) for r in outbox.storage.rows(limit=10)))
    assert payloads == [("u1", {"total": 9.5}), ("u3", {"total": 3.0})]


@pytest.mark.parametrize(
    ("columns", "message"),
    [({"id": "traits.x:money"}, "not one of str, int"),
     ({"id": "userId:int"}, "a type applies to traits or properties"),
     ({"id": "properties.x:int"}, "not one of")],
)
def test_typed_mapping_refuses_bad_rules(columns: dict[str, str], message: str) -> None:
    with pytest.raises(MappingError, match=message):
        CsvMapping(columns=columns)


def test_typed_mapping_on_the_command_line(runner: CliRunner, tmp_path: Path) -> None:
    path = tmp_path / "people.csv"
    path.write_text("userId,Lifetime Value\nu1,365.69\n")
    db = str(tmp_path / "o.db")
    result = runner.invoke(cli, ["enqueue", str(path), "--db", db,
                                 "--map", "Lifetime Value=traits.ltv:float"])
    assert result.exit_code == 0, result.output
    assert _payloads(db)[0]["traits"] == {"ltv": 365.69}


def test_a_header_with_surrounding_spaces_matches_when_named_exactly() -> None:
    text = " id , Plan \nu1,pro\n"
    mapping = CsvMapping(columns={" id ": "userId", " Plan ": "traits.plan"}, key=" id ")
    (record,) = read_text(text, run="r", format="csv", mapping=mapping)
    assert record.call is not None
    assert record.call["userId"] == "u1"
    assert record.call["traits"] == {"plan": "pro"}
    assert record.call["messageId"] == message_id_for("r:u1")


# -- point 8: sniffing ----------------------------------------------------------------------


def test_a_csv_given_as_jsonl_is_named_not_reported_line_by_line(outbox: Outbox,
                                                                 tmp_path: Path) -> None:
    path = tmp_path / "people.jsonl"
    path.write_text("id,email\n" + "".join(f"u{i},u{i}@example.com\n" for i in range(1000)))
    with pytest.raises(FormatError, match=r"looks like CSV.*--format csv"):
        enqueue_file(outbox, path)
    assert outbox.status()["pending"] == 0


def test_jsonl_given_as_csv_is_named(outbox: Outbox, tmp_path: Path) -> None:
    path = tmp_path / "people.csv"
    path.write_text('{"type": "identify", "userId": "u1"}\n')
    with pytest.raises(FormatError, match=r"looks like JSONL.*--format jsonl"):
        enqueue_file(outbox, path)
    with pytest.raises(FormatError, match="looks like JSONL"):
        enqueue_file(outbox, path, format="csv")
    assert outbox.status()["pending"] == 0


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_a_json_array_is_named_with_how_to_convert_it(outbox: Outbox, tmp_path: Path,
                                                     fmt: str) -> None:
    path = tmp_path / "calls.json"
    path.write_text(json.dumps([{"type": "identify", "userId": f"u{i}"} for i in range(50)],
                               indent=2))
    with pytest.raises(FormatError, match=r"JSON array.*jq -c"):
        enqueue_file(outbox, path, format=fmt)
    path.write_text("[\n" + ",\n".join(json.dumps({"type": "identify", "userId": f"u{i}"})
                                       for i in range(50)) + "\n]\n")  # one element a line
    with pytest.raises(FormatError, match=r"JSON array.*jq -c"):
        enqueue_file(outbox, path, format=fmt)
    assert outbox.status()["pending"] == 0


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_a_pretty_printed_json_document_is_named(outbox: Outbox, tmp_path: Path,
                                                 fmt: str) -> None:
    path = tmp_path / "call.json"
    path.write_text(json.dumps({"type": "identify", "userId": "u1"}, indent=2) + "\n")
    with pytest.raises(FormatError, match=r"JSON document over several lines.*jq -c \."):
        enqueue_file(outbox, path, format=fmt)


def test_a_single_bad_first_line_of_jsonl_is_still_one_rejection(outbox: Outbox,
                                                                 tmp_path: Path) -> None:
    path = tmp_path / "calls.jsonl"
    path.write_text('oops\n{"type": "identify", "userId": "u1"}\n')
    result = enqueue_file(outbox, path)
    assert (result.added, result.rejected) == (1, 1)


def test_ndjson_with_a_byte_order_mark_is_read(outbox: Outbox, tmp_path: Path) -> None:
    path = tmp_path / "calls.ndjson"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"type": "identify", "userId": "u1"}\n'
                     + b'{"type": "identify", "userId": "u2"}\n')
    result = enqueue_file(outbox, path)
    assert (result.added, result.rejected) == (2, 0)


def test_csv_with_a_byte_order_mark_keeps_its_first_header(outbox: Outbox,
                                                           tmp_path: Path) -> None:
    path = tmp_path / "people.csv"
    path.write_bytes(b"\xef\xbb\xbfuserId,plan\nu1,pro\n")
    assert enqueue_file(outbox, path).added == 1


def test_gzip_jsonl_and_csv_are_read_directly(outbox: Outbox, tmp_path: Path) -> None:
    jsonl = tmp_path / "calls.jsonl.gz"
    jsonl.write_bytes(gzip.compress(b'{"type": "identify", "userId": "u1"}\n'
                                    b'{"type": "identify", "userId": "u2"}\n'))
    assert enqueue_file(outbox, jsonl).added == 2
    csv_path = tmp_path / "people.csv.gz"
    csv_path.write_bytes(gzip.compress(b"userId,plan\nu3,pro\n"))
    assert enqueue_file(outbox, csv_path).added == 1
    # A gzip file without .gz in its name is recognised by its first bytes.
    hidden = tmp_path / "export.jsonl"
    hidden.write_bytes(gzip.compress(b'{"type": "identify", "userId": "u4"}\n'))
    assert enqueue_file(outbox, hidden).added == 1
    assert outbox.status()["pending"] == 4


def test_gzip_from_a_stream_and_its_content_is_sniffed(outbox: Outbox) -> None:
    data = gzip.compress(b"userId,plan\nu1,pro\nu2,free\n")
    with pytest.raises(FormatError, match="looks like CSV"):
        list(reader_for(io.BytesIO(data), run="r", format="jsonl"))
    first, _ = list(CsvReader(io.BytesIO(data), "r"))
    assert first.call is not None and first.call["traits"] == {"plan": "pro"}


@pytest.mark.parametrize("text", [
    "[\n" + '{"type": "identify", "userId": "u1"}\n',  # a broken line, then a call
    "a,b\n" + '{"type": "identify", "userId": "u1"}\n',
    "[]\n" + '{"type": "identify", "userId": "u1"}\n',
    "id,email\nu1,a@example.com\n",  # too little to call it CSV
])
def test_broken_lines_are_rejected_by_number_not_taken_for_another_format(
        outbox: Outbox, text: str) -> None:
    records = read_text(text, run="r")
    assert all(record.error is not None for record in records if record.line == 1)
    assert len(records) == 2


def test_a_damaged_gzip_file_is_named(outbox: Outbox, tmp_path: Path) -> None:
    path = tmp_path / "calls.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"type": "identify", "userId": "u1"}\n' * 1000)[:60])
    with pytest.raises(FormatError, match="cannot decompress"):
        enqueue_file(outbox, path)


def test_gzip_progress_counts_compressed_bytes(tmp_path: Path) -> None:
    path = tmp_path / "calls.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"type": "identify", "userId": "u1"}\n' * 100))
    reader = reader_for(path, run="r")
    assert len(list(reader)) == 100
    assert reader.bytes_read == path.stat().st_size


def test_the_command_line_names_the_format(runner: CliRunner, tmp_path: Path) -> None:
    path = tmp_path / "people.jsonl"
    path.write_text("id,email\n" + "u1,a@example.com\n" * 1000)
    db = tmp_path / "o.db"
    result = runner.invoke(cli, ["enqueue", str(path), "--db", str(db)])
    assert result.exit_code == 2
    assert "this looks like CSV" in result.stderr and "--format csv" in result.stderr
    assert result.stderr.count("\n") < 5
    assert not db.exists()  # refused before the outbox was made
    gz = tmp_path / "people.csv.gz"
    gz.write_bytes(gzip.compress(b"userId,plan\nu1,pro\n"))
    result = runner.invoke(cli, ["enqueue", str(gz), "--db", str(db), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["added"] == 1
