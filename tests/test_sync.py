"""Recurring syncs (Outbox.sync, `cio-outbox sync`) on both storage backends.

What is checked against what we did not write: the payloads are validated by the message
models and delivered to the sandbox; Parquet and Arrow files are written by pyarrow, the
DataFrames are pandas' and polars'; the kill is a real SIGKILL of a child process.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from cio_outbox import Outbox
from cio_outbox.sandbox import Sandbox
from cio_outbox.sources import SourceError
from cio_outbox.sync import DeletionRefused, SyncError

HEADER = ["id", "Email Address", "plan", "Lifetime Value"]


def people(n: int, *, start: int = 0) -> list[list[str]]:
    return [[str(i), f"p{i}@example.com", "free" if i % 3 else "pro", f"{i * 1.5:.2f}"]
            for i in range(start, start + n)]


def write_csv(path: Path, rows: list[list[str]], header: list[str] = HEADER) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


MAP = ["Email Address=traits.email", "Lifetime Value=traits.ltv:float"]


def payloads(outbox: Outbox, run: str) -> list[dict[str, Any]]:
    rows = outbox.rows(run=run, limit=100_000)
    return [json.loads(row["payload"]) for row in sorted(rows, key=lambda r: r["id"])]


def all_payloads(outbox: Outbox) -> list[dict[str, Any]]:
    rows = outbox.rows(limit=1_000_000)
    return [json.loads(row["payload"]) for row in sorted(rows, key=lambda r: r["id"])]


# -- the diff ---------------------------------------------------------------------------


def test_a_second_sync_of_the_same_file_enqueues_nothing(outbox: Outbox,
                                                         tmp_path: Path) -> None:
    source = write_csv(tmp_path / "customers.csv", people(50))
    first = outbox.sync(source, key="id", mapping=MAP)
    assert (first.rows_read, first.new, first.changed, first.unchanged) == (50, 50, 0, 0)
    assert first.name == "customers.csv" and first.run.startswith("sync:customers.csv:")
    sent = payloads(outbox, first.run)
    assert len(sent) == 50
    assert sent[1]["type"] == "identify" and sent[1]["userId"] == "1"
    assert sent[1]["traits"] == {"email": "p1@example.com", "plan": "free", "ltv": 1.5}

    second = outbox.sync(source, key="id", mapping=MAP)
    assert (second.new, second.changed, second.unchanged, second.enqueued) == (0, 0, 50, 0)
    assert outbox.status()["total"] == 50
    # chunks that divide the file exactly (the last one is empty)
    third = outbox.sync(source, key="id", mapping=MAP, chunk_rows=10)
    assert (third.rows_read, third.unchanged) == (50, 50)


def test_only_changed_and_new_rows_are_enqueued_with_their_full_traits(outbox: Outbox,
                                                                       tmp_path: Path) -> None:
    rows = people(20)
    source = write_csv(tmp_path / "customers.csv", rows)
    outbox.sync(source, key="id", mapping=MAP)
    rows[4][2] = "enterprise"
    rows.append(["new-1", "new@example.com", "free", "1"])
    write_csv(source, rows)
    day2 = outbox.sync(source, key="id", mapping=MAP)
    assert (day2.new, day2.changed, day2.unchanged) == (1, 1, 19)
    sent = payloads(outbox, day2.run)
    by_user = {p["userId"]: p for p in sent}
    assert set(by_user) == {"4", "new-1"}
    assert by_user["4"]["traits"] == {"email": "p4@example.com", "plan": "enterprise",
                                      "ltv": 6.0}
    assert {entry["change"] for entry in day2.sample} == {"new", "changed"}
    first_ids = {p["messageId"] for p in all_payloads(outbox) if p["userId"] == "4"}
    assert len(first_ids) == 2  # a change is a new message, never skipped as a duplicate


def test_reordered_columns_change_nothing_and_an_ignored_column_never_counts(
        outbox: Outbox, tmp_path: Path) -> None:
    source = write_csv(tmp_path / "c.csv", [[*r, "2026-01-01"] for r in people(10)],
                       header=[*HEADER, "exported_at"])
    outbox.sync(source, key="id", mapping=[*MAP, "exported_at=ignore"])
    reordered = [["2026-01-02", r[3], r[2], r[1], r[0]] for r in people(10)]
    write_csv(source, reordered, header=["exported_at", "Lifetime Value", "plan",
                                         " Email Address ", "id"])
    again = outbox.sync(source, key="id", mapping=[*MAP, "exported_at=ignore"])
    assert (again.new, again.changed, again.unchanged) == (0, 0, 10)
    write_csv(source, [[*r, ""] for r in people(10)], header=[*HEADER, "notes"])
    added = outbox.sync(source, key="id", mapping=MAP)  # a new column: sent once, unchanged
    assert (added.changed, added.unchanged) == (10, 0)
    assert {p["traits"]["plan"] for p in payloads(outbox, added.run)} == {"free", "pro"}
    assert outbox.sync(source, key="id", mapping=MAP).unchanged == 10


def test_changed_only_sends_just_the_traits_that_changed(outbox: Outbox,
                                                         tmp_path: Path) -> None:
    rows = people(5)
    source = write_csv(tmp_path / "c.csv", rows)
    outbox.sync(source, key="id", mapping=MAP, changed_only=True)
    rows[2][2] = "enterprise"   # changed
    rows[3][3] = ""             # trait disappeared
    write_csv(source, rows)
    day2 = outbox.sync(source, key="id", mapping=MAP, changed_only=True)
    assert day2.changed == 2
    by_user = {p["userId"]: p for p in payloads(outbox, day2.run)}
    assert by_user["2"]["traits"] == {"plan": "enterprise"}
    assert by_user["3"].get("traits") in (None, {})  # nothing to send without clearing
    rows[1][2] = ""  # (not the email: Customer.io's document refuses a null email)
    write_csv(source, rows)
    day3 = outbox.sync(source, key="id", mapping=MAP, changed_only=True,
                       clear_missing_traits=True)
    by_user = {p["userId"]: p for p in payloads(outbox, day3.run)}
    assert by_user["1"]["traits"] == {"plan": None}
    assert day3.changed == 1  # key 3's missing ltv was recorded at day 2


def test_clear_missing_traits_sends_null_for_a_removed_trait_in_full_mode(
        outbox: Outbox, tmp_path: Path) -> None:
    rows = people(3)
    source = write_csv(tmp_path / "c.csv", rows)
    outbox.sync(source, key="id", mapping=MAP)
    rows[0][2] = ""
    write_csv(source, rows)
    day2 = outbox.sync(source, key="id", mapping=MAP, clear_missing_traits=True)
    (sent,) = payloads(outbox, day2.run)
    assert sent["traits"] == {"email": "p0@example.com", "ltv": 0.0, "plan": None}


def test_a_dead_lettered_change_is_sent_again_at_the_next_sync(outbox: Outbox,
                                                               tmp_path: Path) -> None:
    source = write_csv(tmp_path / "c.csv", people(4))
    with Sandbox() as sandbox:
        first = outbox.sync(source, key="id", mapping=MAP)
        sandbox.configure(fail_rate=1.0)
        outbox.drain(host=sandbox.url, key=sandbox.key, progress=False, max_attempts=1)
        assert outbox.status(first.run)["failed"] == 4
        sandbox.configure(fail_rate=0.0)
        second = outbox.sync(source, key="id", mapping=MAP)
        assert (second.changed, second.unchanged) == (4, 0)
        outbox.drain(host=sandbox.url, key=sandbox.key, progress=False)
        assert outbox.status(second.run)["sent"] == 4
        delivered = sandbox.messages(type="identify")
        assert sorted(m["userId"] for m in delivered) == ["0", "1", "2", "3"]
        third = outbox.sync(source, key="id", mapping=MAP)
        assert (third.changed, third.unchanged) == (0, 4)


def test_a_key_repeated_in_one_source_is_compared_with_its_previous_row(
        outbox: Outbox, tmp_path: Path) -> None:
    rows = [*people(3), ["1", "p1@example.com", "free", "1.50"], ["2", "other@x", "pro", "3"]]
    result = outbox.sync(write_csv(tmp_path / "c.csv", rows), key="id", mapping=MAP)
    assert (result.new, result.changed, result.unchanged) == (3, 1, 1)


def test_a_row_seen_before_comes_after_a_change_of_its_key_in_the_same_source(
        outbox: Outbox, tmp_path: Path) -> None:
    # Row 1 is byte for byte what was synced (recognized by its digest), row 2 changes the
    # key, row 3 brings the first values back: the last row wins, in order.
    source = write_csv(tmp_path / "c.csv", people(3))
    outbox.sync(source, key="id", mapping=MAP)
    other = ["1", "changed@example.com", "free", "1.50"]
    write_csv(source, [*people(3), other, people(3)[1]])
    result = outbox.sync(source, key="id", mapping=MAP)
    assert (result.new, result.changed, result.unchanged) == (0, 2, 3)
    assert [p["traits"]["email"] for p in payloads(outbox, result.run)] == \
        ["changed@example.com", "p1@example.com"]
    write_csv(source, people(3))
    assert outbox.sync(source, key="id", mapping=MAP).unchanged == 3


@pytest.mark.parametrize("run", [1, 2, 16])
def test_a_row_changed_and_changed_back_or_deleted_and_back_is_sent_each_time(
        outbox: Outbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run: int) -> None:
    # Unchanged rows are recognized by runs of rows (about 16, cut by content; 1 and 2
    # make runs of single rows common); a run seen before must not hide a row whose key
    # has moved on since.
    from cio_outbox import sync

    monkeypatch.setattr(sync, "_RUN", run)
    rows = people(200)
    source = write_csv(tmp_path / "c.csv", rows)
    outbox.sync(source, key="id", mapping=MAP)
    assert outbox.sync(source, key="id", mapping=MAP).unchanged == 200
    for plan in ("changed", "free"):  # "free" is what row 50 held at first
        rows[50][2] = plan
        write_csv(source, rows)
        result = outbox.sync(source, key="id", mapping=MAP)
        assert (result.changed, result.unchanged) == (1, 199)
        assert [p["traits"]["plan"] for p in payloads(outbox, result.run)] == [plan]
    write_csv(source, rows[:120] + rows[121:])
    gone = outbox.sync(source, key="id", mapping=MAP, delete_missing=True)
    assert (gone.deleted, gone.unchanged) == (1, 199)
    write_csv(source, rows)
    back = outbox.sync(source, key="id", mapping=MAP, delete_missing=True)
    assert (back.new, back.deleted, back.unchanged) == (1, 0, 199)
    assert [p["userId"] for p in payloads(outbox, back.run)] == ["120"]
    assert outbox.forget("7") == 1
    again = outbox.sync(source, key="id", mapping=MAP)
    assert (again.new, again.unchanged) == (1, 199)


def test_a_file_written_differently_with_the_same_values_changes_nothing(
        outbox: Outbox, tmp_path: Path) -> None:
    source = write_csv(tmp_path / "c.csv", people(20))
    outbox.sync(source, key="id", mapping=MAP)
    rows = people(20)
    with open(source, "w", newline="", encoding="utf-8") as handle:  # quoted, LF endings
        writer = csv.writer(handle, quoting=csv.QUOTE_ALL, lineterminator="\n")
        writer.writerow(HEADER)
        writer.writerows(rows)
    again = outbox.sync(source, key="id", mapping=MAP)
    assert (again.new, again.changed, again.unchanged) == (0, 0, 20)
    rows[4][2] = "enterprise"
    with open(source, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, quoting=csv.QUOTE_ALL, lineterminator="\n")
        writer.writerow(HEADER)
        writer.writerows(rows)
    changed = outbox.sync(source, key="id", mapping=MAP)
    assert (changed.changed, changed.unchanged) == (1, 19)
    assert [p["userId"] for p in payloads(outbox, changed.run)] == ["4"]
    assert outbox.sync(source, key="id", mapping=MAP).unchanged == 20


def test_csv_lines_ended_by_a_lone_carriage_return_are_rows_and_lines(
        outbox: Outbox, tmp_path: Path) -> None:
    source = tmp_path / "mac.csv"
    source.write_bytes(b"id,name\r1,Ada\r2,\"Two\rlines\"\r3,x,extra\r4,Eve\r")
    result = outbox.sync(source, key="id")
    assert [(r.line, r.error) for r in result.rejections] == [
        (5, "the row has 3 fields, the header 2")]
    assert {p["userId"]: p["traits"] for p in payloads(outbox, result.run)} == {
        "1": {"name": "Ada"}, "2": {"name": "Two\rlines"}, "4": {"name": "Eve"}}
    assert outbox.sync(source, key="id").unchanged == 3


def test_rejected_rows_name_their_line_and_field_and_are_never_deleted(
        outbox: Outbox, tmp_path: Path) -> None:
    rows = people(40)
    source = write_csv(tmp_path / "c.csv", rows)
    outbox.sync(source, key="id", mapping=MAP)
    rows[5][3] = "lots"
    rows[6][0] = ""
    write_csv(source, rows)
    result = outbox.sync(source, key="id", mapping=MAP, delete_missing=True)
    assert [(r.line, r.field) for r in result.rejections] == [(7, "traits.ltv"), (8, "id")]
    assert "'lots' (column 'Lifetime Value') is not a finite number" in \
        result.rejections[0].error
    assert result.missing == 1 and result.deleted == 1  # only key 6, whose key cell is empty
    assert [p["userId"] for p in payloads(outbox, result.run)] == ["6"]


# -- deletions --------------------------------------------------------------------------


def test_the_deletion_guard_refuses_too_many_and_reports_the_count(outbox: Outbox,
                                                                   tmp_path: Path) -> None:
    source = write_csv(tmp_path / "c.csv", people(100))
    outbox.sync(source, key="id", mapping=MAP)
    write_csv(source, people(90))
    with pytest.raises(DeletionRefused, match="10 of 100 synced keys") as refused:
        outbox.sync(source, key="id", mapping=MAP, delete_missing=True)
    assert refused.value.result.missing == 10 and refused.value.result.deleted == 0
    assert not [p for p in all_payloads(outbox) if p["type"] == "track"]

    allowed = outbox.sync(source, key="id", mapping=MAP, delete_missing=True,
                          max_delete_share=0.1)
    assert (allowed.missing, allowed.deleted, allowed.unchanged) == (10, 10, 90)
    deletions = payloads(outbox, allowed.run)
    assert sorted(int(p["userId"]) for p in deletions) == list(range(90, 100))
    assert {p["event"] for p in deletions} == {"User Deleted"}

    again = outbox.sync(source, key="id", mapping=MAP, delete_missing=True)
    assert (again.missing, again.deleted) == (0, 0)
    assert again.synced_before == 90

    write_csv(source, people(91))  # key 90 comes back: a new identify, not a skipped id
    back = outbox.sync(source, key="id", mapping=MAP)
    assert back.new == 1
    assert [p["userId"] for p in payloads(outbox, back.run)] == ["90"]


def test_a_dry_run_counts_everything_and_enqueues_nothing(outbox: Outbox,
                                                          tmp_path: Path) -> None:
    source = write_csv(tmp_path / "c.csv", people(100))
    outbox.sync(source, key="id", mapping=MAP)
    rows = people(98)
    rows[0][2] = "enterprise"
    rows.append(["x", "x@example.com", "free", "1"])
    write_csv(source, rows)
    before = outbox.status()["total"]
    dry = outbox.sync(source, key="id", mapping=MAP, delete_missing=True, dry_run=True)
    assert (dry.new, dry.changed, dry.unchanged, dry.deleted) == (1, 1, 97, 2)
    assert dry.enqueued == 0 and outbox.status()["total"] == before
    assert {e["change"] for e in dry.sample} == {"new", "changed", "deleted"}
    real = outbox.sync(source, key="id", mapping=MAP, delete_missing=True)
    assert (real.new, real.changed, real.unchanged, real.deleted) == (1, 1, 97, 2)


def test_objects_are_group_calls_and_their_deletion_is_object_deleted(outbox: Outbox,
                                                                      tmp_path: Path) -> None:
    source = write_csv(tmp_path / "accounts.csv", [["acme", "Acme", "10"], ["init", "Initech",
                                                                            "3"]],
                       header=["account", "name", "seats"])
    first = outbox.sync(source, key="account", objects=True, object_type_id=2,
                        mapping=["seats=:int"])
    group = payloads(outbox, first.run)[0]
    assert group["type"] == "group" and group["groupId"] == "acme"
    assert group["anonymousId"] == "object:2:acme"
    assert group["traits"] == {"name": "Acme", "seats": 10, "object_type_id": "2"}
    write_csv(source, [["acme", "Acme", "10"]], header=["account", "name", "seats"])
    second = outbox.sync(source, key="account", objects=True, object_type_id=2,
                         mapping=["seats=:int"], delete_missing=True, max_delete_share=1)
    (deleted,) = payloads(outbox, second.run)
    assert deleted["event"] == "Object Deleted"
    assert deleted["properties"] == {"objectId": "init", "objectTypeId": 2}


def test_bad_options_are_refused_before_anything_is_written(outbox: Outbox,
                                                            tmp_path: Path) -> None:
    source = write_csv(tmp_path / "c.csv", people(3))
    with pytest.raises(SyncError, match="key column 'customer' is not in the source"):
        outbox.sync(source, key="customer")
    with pytest.raises(SyncError, match="object_type_id"):
        outbox.sync(source, key="id", objects=True)
    with pytest.raises(SyncError, match="give the sync a name"):
        outbox.sync([{"id": 1}], key="id")
    with pytest.raises(SyncError, match="not in the source"):
        outbox.sync(source, key="id", mapping=["Nope=traits.n"])
    assert outbox.status()["total"] == 0


# -- sources ----------------------------------------------------------------------------


def test_gzip_csv_and_jsonl_sources(outbox: Outbox, tmp_path: Path) -> None:
    plain = write_csv(tmp_path / "c.csv", people(30))
    zipped = tmp_path / "c.csv.gz"
    zipped.write_bytes(gzip.compress(plain.read_bytes()))
    first = outbox.sync(zipped, key="id", mapping=MAP, name="people")
    assert first.new == 30
    assert outbox.sync(plain, key="id", mapping=MAP, name="people").unchanged == 30

    lines = [json.dumps({"id": i, "Email Address": f"p{i}@example.com",
                         "plan": "free" if i % 3 else "pro", "Lifetime Value": f"{i * 1.5:.2f}"})
             for i in range(30)]
    jsonl = tmp_path / "c.jsonl.gz"
    jsonl.write_bytes(gzip.compress(("\n".join(lines) + "\nnot json\n").encode()))
    third = outbox.sync(jsonl, key="id", mapping=MAP, name="people-jsonl")
    assert (third.new, third.rejected) == (30, 1)
    assert third.rejections[0].line == 31 and "invalid JSON" in third.rejections[0].error
    assert payloads(outbox, third.run) == [
        {**p, "messageId": q["messageId"]}
        for p, q in zip(payloads(outbox, first.run), payloads(outbox, third.run), strict=True)]
    (tmp_path / "c.jsonl").write_text("\n".join(lines))
    assert outbox.sync(tmp_path / "c.jsonl", key="id", mapping=MAP,
                       name="people-jsonl").unchanged == 30


def test_jsonl_rows_may_differ_in_columns_and_null_is_the_same_as_absent(
        outbox: Outbox, tmp_path: Path) -> None:
    source = tmp_path / "people.jsonl"
    source.write_text('{"id": 1, "plan": "pro", "age": "41"}\n{"id": 2}\n')
    first = outbox.sync(source, key="id", mapping=["age=:int"])
    assert {p["userId"]: p.get("traits") for p in payloads(outbox, first.run)} == \
        {"1": {"plan": "pro", "age": 41}, "2": {}}
    source.write_text('{"age": "41", "plan": "pro", "id": 1, "extra": null}\n'
                      '{"id": 2, "plan": null}\n')
    again = outbox.sync(source, key="id", mapping=["age=:int"])
    assert (again.new, again.changed, again.unchanged) == (0, 0, 2)


def test_unreadable_csv_lines_are_rejected_by_line_and_the_rest_synced(
        outbox: Outbox, tmp_path: Path) -> None:
    source = tmp_path / "c.csv"
    source.write_bytes(b"\xef\xbb\xbfid,name\n1,Ada\n2,B\xe9a\n3,\"Multi\nline\"\n4,x,extra\n5,Eve\n")
    result = outbox.sync(source, key="id")
    assert [(r.line, r.error) for r in result.rejections] == [
        (3, "the line is not valid UTF-8"), (6, "the row has 3 fields, the header 2")]
    assert result.new == 3
    sent = {p["userId"]: p["traits"] for p in payloads(outbox, result.run)}
    assert sent == {"1": {"name": "Ada"}, "3": {"name": "Multi\nline"}, "5": {"name": "Eve"}}
    good = write_csv(tmp_path / "good.csv", [[str(i), "x"] for i in range(1, 6)],
                     header=["id", "name"])
    outbox.sync(good, key="id", name="c.csv")
    with pytest.raises(DeletionRefused, match="2 row\\(s\\) could not be read") as refused:
        outbox.sync(source, key="id", delete_missing=True, max_delete_share=1)
    assert refused.value.result.missing == 2 and refused.value.result.deleted == 0


def test_parquet_and_arrow_sources(outbox: Outbox, tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table({"id": list(range(25)), "plan": ["free"] * 24 + [None],
                      "seats": list(range(25))})
    pq.write_table(table, tmp_path / "people.parquet", row_group_size=7)
    first = outbox.sync(tmp_path / "people.parquet", key="id", name="warehouse",
                        chunk_rows=10)
    assert (first.new, first.rejected) == (25, 0)
    sent = {p["userId"]: p["traits"] for p in payloads(outbox, first.run)}
    assert sent["3"] == {"plan": "free", "seats": 3} and sent["24"] == {"seats": 24}

    with pa.OSFile(str(tmp_path / "people.arrow"), "wb") as sink, \
            pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    assert outbox.sync(tmp_path / "people.arrow", key="id", name="warehouse").unchanged == 25
    with pa.OSFile(str(tmp_path / "people.arrows"), "wb") as sink, \
            pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    assert outbox.sync(tmp_path / "people.arrows", key="id", name="warehouse").unchanged == 25
    assert outbox.sync(table, key="id", name="warehouse").unchanged == 25


def test_without_pyarrow_a_parquet_source_says_what_to_install(
        outbox: Outbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "p.parquet"
    path.write_bytes(b"PAR1" + b"\0" * 16 + b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(SourceError, match=r"pip install 'cio-outbox\[parquet\]'"):
        outbox.sync(path, key="id")


def test_pandas_and_polars_dataframes(outbox: Outbox) -> None:
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame({"id": [1, 2, 3], "plan": ["free", None, "pro"],
                          "seats": [1.0, float("nan"), 3.0],
                          "since": pd.to_datetime(["2024-01-01", None, "2024-03-01"])})
    first = outbox.sync(frame, key="id", name="frame", chunk_rows=2)
    assert first.new == 3
    sent = {p["userId"]: p.get("traits") for p in payloads(outbox, first.run)}
    assert sent["1"] == {"plan": "free", "seats": 1.0, "since": "2024-01-01T00:00:00Z"}
    assert sent["2"] is None or sent["2"] == {}
    pl = pytest.importorskip("polars")
    same = pl.DataFrame({"id": [1, 2, 3], "plan": ["free", None, "pro"],
                         "seats": [1.0, None, 3.0]}).with_columns(
        pl.Series("since", [pd.Timestamp("2024-01-01").to_pydatetime(), None,
                            pd.Timestamp("2024-03-01").to_pydatetime()]))
    second = outbox.sync(same, key="id", name="frame")
    assert (second.new, second.changed, second.unchanged) == (0, 0, 3)
    dicts = outbox.sync([{"id": 1, "plan": "free", "seats": 1.0,
                          "since": "2024-01-01T00:00:00Z"}], key="id", name="frame")
    assert dicts.unchanged == 1


# -- killed and rerun -------------------------------------------------------------------

CHILD = textwrap.dedent("""
    import sys
    from cio_outbox import Outbox

    def progress(result, table):
        print(result.new + result.changed + result.unchanged, flush=True)
        sys.stdin.readline()  # the parent's go: at most one chunk runs past the kill point

    outbox = Outbox(sys.argv[1])
    outbox.sync(sys.argv[2], key="id", mapping=["Lifetime Value=traits.ltv:float"],
                name="killed", chunk_rows=500, on_progress=progress)
    print("done", flush=True)
""")


def _sync_killed_midway(location: str, source: Path, rng: random.Random) -> bool:
    """Run a sync in a child and SIGKILL it after a few chunks; True if it was killed.

    The child waits for a line on its stdin after each progress report, so that on a fast
    machine it cannot finish before the kill lands (in the next chunk or at its end)."""
    child = subprocess.Popen([sys.executable, "-c", CHILD, location, str(source)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert child.stdout is not None and child.stdin is not None
    kill_after = rng.randint(2, 5)
    for chunks, line in enumerate(child.stdout, 1):
        if line.strip() == "done":
            break
        child.stdin.write("go\n")
        child.stdin.flush()
        if chunks == kill_after:
            time.sleep(rng.uniform(0, 0.05))  # land anywhere in the next chunk
            child.send_signal(signal.SIGKILL)
            break
    child.wait(timeout=60)
    return child.returncode == -signal.SIGKILL


def test_a_sync_killed_midway_and_rerun_enqueues_each_change_once(
        outbox_location: str, tmp_path: Path) -> None:
    rng = random.Random(20)
    rows = people(6_000)
    source = write_csv(tmp_path / "big.csv", rows)
    for _ in range(2):
        killed = _sync_killed_midway(outbox_location, source, rng)
        assert killed, "the child finished before it could be killed"
    with Outbox(outbox_location) as box:
        finish = box.sync(source, key="id", mapping=["Lifetime Value=traits.ltv:float"],
                          name="killed")
        assert finish.new + finish.unchanged == 6_000 and finish.unchanged > 0
        first = all_payloads(box)
        assert sorted(int(p["userId"]) for p in first) == list(range(6_000))

        changed = set(rng.sample(range(6_000), 60))
        for i in changed:
            rows[i][2] = "changed"
        write_csv(source, rows)
        assert _sync_killed_midway(outbox_location, source, rng)
        rest = box.sync(source, key="id", mapping=["Lifetime Value=traits.ltv:float"],
                        name="killed")
        assert rest.new == 0
        later = all_payloads(box)[len(first):]
        assert sorted(int(p["userId"]) for p in later) == sorted(changed)
        assert {p["traits"]["plan"] for p in later} == {"changed"}


# -- reading records as bytes ----------------------------------------------------------

_AWKWARD_CSV = (
    b"\xef\xbb\xbfid,name,note\r\n1,Ada,plain\r\n2,\"Lovelace, Ada\",\"said \"\"hi\"\"\"\r\n"
    b"\r\n3,\"Multi\r\nline\nfield\",x\n4,a\"b,\"c\nd\"\n5,bad\"quote\"x,y\n"
    b"6,\"lone\rcr\",z\r7,B\xe9a,q\n8,too,many,fields\n\n9,last,\"open at the end\n"
)


def test_a_jsonl_line_of_non_ascii_whitespace_is_a_problem_not_a_blank(
        tmp_path: Path) -> None:
    from cio_outbox import sources

    path = tmp_path / "t.jsonl"
    path.write_bytes(b'{"id": 1}\n\x1c\n \t\n\xc2\xa0\n{"id": 2}\n')
    chunks = list(sources.open_source(path).chunks(1000))
    assert [line for chunk in chunks for line, _ in chunk.rows] == [1, 5]
    problems = [problem for chunk in chunks for problem in chunk.problems]
    assert [line for line, _ in problems] == [2, 4]
    assert all(text.startswith("invalid JSON") for _, text in problems)


@pytest.mark.parametrize("block", [1, 7, 16, 33, 64, 1 << 20])
@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_records_parsed_are_the_rows_and_problems_the_reader_gives(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, block: int, fmt: str) -> None:
    """Records read as bytes (a block at a time, any block size) and parsed on demand are
    what the csv module (and json) read from the same file, with the same line numbers."""
    from cio_outbox import sources

    if fmt == "csv":
        data = _AWKWARD_CSV
    else:
        data = (b'{"id": 1}\n\n  \n{"id": 2, "x": "a\\nb"}\r\nnot json\n[1]\n'
                b'{"id": 3, "n": "\xe9"}\n{"id": 4}')
    path = tmp_path / f"t.{fmt}"
    path.write_bytes(data)
    expected = list(sources.open_source(path).chunks(1000))
    monkeypatch.setattr(sources, "_BLOCK", block)
    table = sources.open_source(path)
    assert isinstance(table, sources.TextFile)
    rows: list[Any] = []
    problems: list[Any] = []
    for raw in table.records(3):
        chunk = table.parse(raw, range(len(raw.records)))
        assert chunk.header == expected[0].header
        rows += chunk.rows
        problems += chunk.problems
    assert rows == [row for chunk in expected for row in chunk.rows]
    assert [line for line, _ in problems] == \
        [line for chunk in expected for line, _ in chunk.problems]
    assert len(rows) >= 3 and problems


# -- an outbox synced by an earlier version ---------------------------------------------

_OLD_TABLE = ("CREATE TABLE {p}sync_state (sync TEXT NOT NULL, key TEXT NOT NULL,"
              " fingerprint {blob} NOT NULL, digests TEXT NOT NULL, version INTEGER NOT NULL,"
              " message_id TEXT NOT NULL, updated_at {real} NOT NULL, PRIMARY KEY (sync, key))")


def test_an_outbox_with_the_old_sync_state_table_is_taken_over(outbox_location: str,
                                                               tmp_path: Path) -> None:
    """Outboxes synced before sync_runs existed hold one table, sync_state; its rows become
    sync_keys rows and the next sync enqueues only what changed, with the next versions."""
    rows = people(30)
    source = write_csv(tmp_path / "c.csv", rows)
    with Outbox(outbox_location) as box:
        box.sync(source, key="id", mapping=MAP)

        def to_old_layout(tx: Any) -> None:  # what the earlier version left behind
            d = tx.dialect
            sqlite = d.name == "sqlite"
            tx.db.execute(_OLD_TABLE.format(p=d.prefix, blob="BLOB" if sqlite else "BYTEA",
                                            real="REAL" if sqlite else "DOUBLE PRECISION"))
            tx.db.execute(f"INSERT INTO {d.prefix}sync_state SELECT sync, key, fingerprint,"
                          f" digests, version, message_id, updated_at FROM {d.keys}")
            tx.db.execute(f"DROP TABLE {d.keys}")
            tx.db.execute(f"DROP TABLE {d.runs}")

        box.storage.sync_transaction(to_old_layout)
    rows[3][2] = "enterprise"
    write_csv(source, rows)
    with Outbox(outbox_location) as box:
        result = box.sync(source, key="id", mapping=MAP)
        assert (result.new, result.changed, result.unchanged) == (0, 1, 29)
        sent = payloads(box, result.run)
        assert [p["userId"] for p in sent] == ["3"]
        assert sent[0]["messageId"] not in {p["messageId"] for p in all_payloads(box)[:30]}

        def old_table_left(tx: Any) -> int:
            d = tx.dialect
            if d.name == "sqlite":
                query = "SELECT count(*) FROM sqlite_master WHERE name = 'sync_state'"
                return int(tx.db.execute(query).fetchone()[0])
            return int(tx.db.execute("SELECT count(*) FROM information_schema.tables WHERE"
                                     " table_schema = %s AND table_name = 'sync_state'",
                                     (d.prefix.rstrip("."),)).fetchone()[0])

        assert box.storage.sync_transaction(old_table_left, write=False) == 0
        assert box.sync(source, key="id", mapping=MAP).unchanged == 30


# -- forgetting a person ----------------------------------------------------------------


def test_forget_removes_the_persons_sync_state_so_the_next_sync_creates_them_again(
        outbox: Outbox, tmp_path: Path) -> None:
    source = write_csv(tmp_path / "c.csv", people(3))
    outbox.sync(source, key="id", mapping=MAP)
    outbox.sync(source, key="id", mapping=MAP, name="other")
    assert outbox.forget("1") == 2  # the person's message in each sync
    again = outbox.sync(source, key="id", mapping=MAP)
    assert (again.new, again.changed, again.unchanged) == (1, 0, 2)
    assert [p["userId"] for p in payloads(outbox, again.run)] == ["1"]
    other = outbox.sync(source, key="id", mapping=MAP, name="other")
    assert (other.new, other.unchanged) == (1, 2)


def test_forget_before_any_sync_works_and_a_forgotten_key_leaves_no_trace_in_sqlite(
        tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    secret = "forget-me-7f3a9c"
    rows = [[secret, "s@example.com", "pro", "1"], ["bystander-1", "b@example.com", "free", "2"]]
    with Outbox(path) as outbox:
        assert outbox.forget("nobody") == 0  # no sync table yet
        outbox.sync(write_csv(tmp_path / "c.csv", rows), key="id", mapping=MAP)

        def file_bytes() -> bytes:
            return b"".join(p.read_bytes() for p in tmp_path.iterdir()
                            if p.name.startswith("outbox.db"))

        assert secret.encode() in file_bytes()  # the check below can fail
        outbox.forget(secret)
        data = file_bytes()
        assert secret.encode() not in data
        assert b"bystander-1" in data


# -- the command ------------------------------------------------------------------------


def _cli(*args: str, db: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cio_outbox", *args, "--db", db],
                          capture_output=True, text=True, timeout=120)


def test_the_sync_command_reports_and_guards(outbox_location: str, tmp_path: Path) -> None:
    source = write_csv(tmp_path / "customers.csv", people(40))
    maps = ["--map", "Email Address=traits.email", "--map", "Lifetime Value=traits.ltv:float"]
    done = _cli("sync", str(source), "--key", "id", *maps, "--json", db=outbox_location)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert (report["rows_read"], report["new"], report["rejected"]) == (40, 40, 0)
    status = json.loads(_cli("status", "--run", report["run"], "--json",
                             db=outbox_location).stdout)
    assert status["pending"] == 40
    history = _cli("history", report["sample"][0]["messageId"], "--json", db=outbox_location)
    assert json.loads(history.stdout)["message"]["run"] == report["run"]

    rows = people(36)
    rows[3][3] = "n/a"
    write_csv(source, rows)
    dry = _cli("sync", str(source), "--key", "id", *maps, "--delete-missing", "--dry-run",
               db=outbox_location)
    assert dry.returncode == 2
    assert "35 unchanged, 0 deleted, 1 rejected; would enqueue 0" in dry.stdout
    assert "line 5 (traits.ltv)" in dry.stderr
    assert "4 of 40 synced keys are missing" in dry.stderr
    assert "the deletions would be refused" in dry.stderr

    refused = _cli("sync", str(source), "--key", "id", *maps, "--delete-missing",
                   db=outbox_location)
    assert refused.returncode == 1
    assert "4 of 40 synced keys are missing" in refused.stderr
    assert "more than the 5.0% allowed; nothing was deleted" in refused.stderr

    allowed = _cli("sync", str(source), "--key", "id", *maps, "--delete-missing",
                   "--max-delete-share", "0.1", "--json", db=outbox_location)
    assert allowed.returncode == 2  # the rejected row is still reported
    assert json.loads(allowed.stdout)["deleted"] == 4

    missing = _cli("sync", str(source), "--key", "nope", db=outbox_location)
    assert missing.returncode == 2 and "key column 'nope' is not in the source" in \
        missing.stderr
