"""The intake path: one validation and one encoding per message, event time at enqueue,
import identity from content, and archives migrated with their own ids and timestamps."""

from __future__ import annotations

import datetime as dt
import json
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from cio_outbox import Outbox, intake, messages
from cio_outbox.cli import cli
from cio_outbox.importers import CsvMapping, enqueue_file
from cio_outbox.intake import line_message_id, line_of
from cio_outbox.messages import MessageError, build, from_wire
from cio_outbox.sandbox import Sandbox

pd = pytest.importorskip("pandas")


def _utc(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def _payloads(outbox: Outbox, run: str | None = None) -> list[dict[str, Any]]:
    return [json.loads(row["payload"]) for row in outbox.rows(run=run, limit=10**6)]


# -- one validation, one encoding ----------------------------------------------------------


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> Iterator[Counter[str]]:
    """Counts completed validations (a line's compiled check, the fast check or pydantic),
    encodings (orjson's, or a line's bytes spliced) and semantic checks."""
    counts: Counter[str] = Counter()
    fast, model_validate = intake._fast_wire, messages.Message.model_validate.__func__  # type: ignore[attr-defined]
    encode, semantic = messages.encode_wire, intake.check_semantic

    def counting_fast(call: dict[str, Any], ours: tuple[str, ...] = ()
                      ) -> tuple[dict[str, Any], bool] | None:
        vouched = fast(call, ours)
        counts["validated"] += vouched is not None
        return vouched

    def counting_validate(cls: Any, *args: Any, **kwargs: Any) -> Any:
        counts["validated"] += 1
        return model_validate(cls, *args, **kwargs)

    def counting(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            counts[name] += 1
            return function(*args, **kwargs)
        return wrapper

    line_decoder = intake._line_decoder

    def counting_line_check() -> tuple[Callable[[bytes], Any], dict[type, Any]]:
        decode, kinds = line_decoder()

        def counting_decode(raw: bytes) -> Any:
            line = decode(raw)  # raises for what it does not vouch for
            counts["validated"] += 1
            return line
        return counting_decode, kinds

    monkeypatch.setattr(intake, "_line_decoder", counting_line_check)
    monkeypatch.setattr(intake, "_splice", counting("encoded", intake._splice))
    monkeypatch.setattr(intake, "_fast_wire", counting_fast)
    monkeypatch.setattr(messages.Message, "model_validate", classmethod(counting_validate))
    monkeypatch.setattr(intake, "encode_wire", counting("encoded", encode))
    monkeypatch.setattr(messages, "encode_wire", counting("encoded", encode))
    monkeypatch.setattr(intake, "check_semantic", counting("semantic", semantic))
    yield counts


def _paths(tmp_path: Path) -> dict[str, Callable[[Outbox], Any]]:
    jsonl = tmp_path / "calls.jsonl"
    jsonl.write_text("".join(json.dumps(c) + "\n" for c in (
        {"type": "track", "userId": "u1", "event": "Imported", "properties": {"n": 1}},
        {"type": "identify", "userId": 7, "traits": {"plan": "pro"}},  # pydantic's path
        {"type": "track", "userId": "u2", "event": "Email Bounced",
         "properties": {"email_id": "e-1"}},
    )))
    csv = tmp_path / "people.csv"
    csv.write_text("userId,plan\nu1,pro\nu2,free\nu3,free\n")
    dicts = [{"type": "track", "userId": f"u{i}", "event": "Paid",
              "timestamp": dt.datetime(2024, 5, 1, tzinfo=dt.UTC)} for i in range(3)]
    frame = pd.DataFrame({"id": ["a", "b", "c"], "plan": ["x", "y", "z"]})
    return {
        "enqueue dict": lambda o: [o.enqueue({"type": "identify", "userId": f"u{i}"})
                                   for i in range(3)],
        "enqueue Message": lambda o: [o.enqueue(build("page", {"userId": f"u{i}"}))
                                      for i in range(3)],
        "enqueue_many": lambda o: o.enqueue_many(dicts),
        "enqueue_many keys": lambda o: o.enqueue_many(dicts, idempotency_keys=["a", "b", "c"]),
        "enqueue_rows list": lambda o: o.enqueue_rows(frame.to_dict("records"), run="r"),
        "enqueue_rows frame": lambda o: o.enqueue_rows(frame, call_type="track",
                                                       event="Seen", run="r"),
        "operations": lambda o: (o.track("u1", "Paid"), o.identify("u2"),
                                 o.delete_person("u3")),
        "jsonl file": lambda o: enqueue_file(o, jsonl),
        "csv file": lambda o: enqueue_file(o, csv, mapping=CsvMapping("identify")),
        "cli": lambda o: CliRunner().invoke(cli, ["enqueue", str(jsonl), "--db", o.location,
                                                  "--run", "cli"]),
    }


PATHS = ("enqueue dict", "enqueue Message", "enqueue_many", "enqueue_many keys",
         "enqueue_rows list", "enqueue_rows frame", "operations", "jsonl file", "csv file",
         "cli")


def test_the_counted_paths_are_every_path(tmp_path: Path) -> None:
    assert set(PATHS) == set(_paths(tmp_path))


@pytest.mark.parametrize("path", PATHS)
def test_every_intake_path_validates_at_most_once_and_encodes_exactly_once(
    path: str, tmp_path: Path, counted: Counter[str]
) -> None:
    messages_built_by_the_test = 3 if path == "enqueue Message" else 0
    with Outbox(str(tmp_path / "o.db")) as outbox:
        _paths(tmp_path)[path](outbox)
        stored = outbox.status()["total"]
        semantic = sum(p.get("event") in ("Email Bounced", "User Deleted")
                       for p in _payloads(outbox))
    assert stored == 3
    assert counted["encoded"] == stored
    assert counted["validated"] - messages_built_by_the_test <= stored
    assert counted["semantic"] == semantic


def test_the_fast_check_agrees_with_the_models() -> None:
    """Whatever the fast check vouches for, pydantic accepts and writes identically."""
    base = {"type": "track", "userId": "u1", "event": "E", "messageId": "m-1",
            "timestamp": "2024-05-01T12:00:00.000Z"}
    cases: list[dict[str, Any]] = [
        base,
        {**base, "properties": {"a": [1, {"b": None}]}, "context": {"ip": "1.2.3.4"}},
        {**base, "integrations": {"All": False}},
        {**base, "integrations": {"All": 1}},
        {**base, "userId": " "},
        {**base, "userId": 12},
        {**base, "event": ""},
        {**base, "messageId": "x" * 101},
        {**base, "timestamp": "2024-02-30T12:00:00.000Z"},
        {**base, "timestamp": "2024-05-01T12:00:00Z"},
        {**base, "unknown": 1},
        {**base, "properties": None},
        {"type": "identify", "anonymousId": "a", "messageId": "m", "traits": {"x": 1},
         "timestamp": "2024-05-01T12:00:00.000Z"},
        {"type": "identify", "messageId": "m", "timestamp": "2024-05-01T12:00:00.000Z"},
        {"type": "page", "userId": "u", "name": "Home", "messageId": "m",
         "timestamp": "2024-05-01T12:00:00.000Z"},
        {"type": "group", "userId": "u", "groupId": "g", "messageId": "m",
         "timestamp": "2024-05-01T12:00:00.000Z"},
        {"type": "group", "userId": "u", "messageId": "m",
         "timestamp": "2024-05-01T12:00:00.000Z"},
        {"type": "alias", "userId": "u", "previousId": "p", "messageId": "m",
         "timestamp": "2024-05-01T12:00:00.000Z"},
        {"type": "alias", "anonymousId": "u", "previousId": "p", "messageId": "m",
         "timestamp": "2024-05-01T12:00:00.000Z"},
    ]
    vouched = 0
    for case in cases:
        fast = intake._fast_wire(dict(case))
        try:
            model = from_wire(case).wire()
        except MessageError:
            assert fast is None, case
            continue
        if fast is not None:
            vouched += 1
            assert fast[0] == model, case
    assert vouched >= 6  # the common shapes do take the fast path


def test_the_fast_check_checks_every_value_of_calls_that_share_their_keys() -> None:
    # What the fast check works out per set of keys must not stand in for the values.
    good = {"type": "track", "userId": "u1", "event": "Paid", "context": {"source": "crm"}}
    assert intake._fast_wire(dict(good)) == (
        {**good, "context": {"source": "crm", "library": messages.LIBRARY}}, True)
    assert intake._fast_wire({**good, "userId": " "}) is None
    assert intake._fast_wire({**good, "event": ""}) is None
    assert intake._fast_wire({**good, "context": "ip"}) is None
    assert intake._fast_wire({**good, "context": {"channel": "server"}})[1] is False
    assert intake._fast_wire({**good, "event": "Email Bounced"})[1] is False
    assert intake._fast_wire(dict(good))[1] is True
    del good["userId"]
    assert intake._fast_wire(dict(good)) is None  # nobody named


T0 = "2024-05-01T12:00:00.000Z"
# Values for each field, some of which break a rule of the document that the models do not
# check (traits.email must be a string, context.channel one of three words, ...).
FIELD_VALUES: dict[str, list[Any]] = {
    "userId": ["u1", "", " ", 7],
    "anonymousId": ["a1"],
    "event": ["Paid", "Email Bounced", ""],
    "groupId": ["g1"],
    "previousId": ["p1"],
    "name": ["Home", 3],
    "messageId": ["m-1"],
    "timestamp": [T0, "2024-05-01T12:00:00Z", "yesterday"],
    "properties": [{}, {"n": 1}, {"url": 5}, {"keywords": ["a"]}, {"email_id": "e"}],
    "traits": [{"plan": "pro"}, {"email": None}, {"email": "a@b.c"}, {"createdAt": 1},
               {"createdAt": T0}, {"object_type_id": 1}],
    "context": [{"ip": "1.2.3.4"}, {"channel": "email"}, {"channel": "server"},
                {"library": {"name": 1}}, {"traits": {"x": 1}}, {"device": {"type": None}}],
    "integrations": [{"All": True}, {"All": 1}],
}


def test_what_the_fast_check_proves_the_document_accepts() -> None:
    """When the fast check says the document's rules hold without running them, they do;
    and it says so for the common shapes, not for fields the document constrains."""
    import random

    from cio_outbox.messages import check_rules

    rng = random.Random(16)
    proven = run_rules = 0
    for _ in range(8000):
        call_type = rng.choice(messages.CALL_TYPES)
        call: dict[str, Any] = {"type": call_type}
        fields = messages.MODELS[call_type].model_fields
        for name, values in FIELD_VALUES.items():
            if name in fields and rng.random() < 0.5:
                call[name] = rng.choice(values)
        vouched = intake._fast_wire(json.loads(json.dumps(call)))
        if vouched is None:
            continue
        wire, rules_hold = vouched
        if rules_hold:
            proven += 1
            check_rules(wire)  # raises if the proof was wrong
        else:
            run_rules += 1
    assert proven > 200 and run_rules > 200
    plain = {"type": "track", "userId": "u", "event": "Paid", "properties": {"url": 1},
             "messageId": "m", "timestamp": T0}
    assert intake._fast_wire(dict(plain)) is not None
    assert intake._fast_wire(dict(plain))[1]
    people = {"type": "identify", "userId": "u", "traits": {"plan": "pro"}, "messageId": "m"}
    assert intake._fast_wire(dict(people))[1]
    assert not intake._fast_wire({**people, "traits": {"email": "a@b.c"}})[1]
    assert not intake._fast_wire({**plain, "context": {"channel": "server"}})[1]
    page = {"type": "page", "userId": "u", "name": "Home", "messageId": "m"}
    assert intake._fast_wire({**page, "properties": {"plan": "/"}})[1]
    assert not intake._fast_wire({**page, "properties": {"url": "/"}})[1]


def test_the_shapes_the_fast_checks_know_are_the_models_own() -> None:
    # The table is what intake reads instead of the models (so that an import of clean
    # lines loads no pydantic); a model that changes must change the table too.
    derived = {kind: intake.shape_of_model(model) for kind, model in messages.MODELS.items()}
    assert derived == intake.SHAPES, (
        "intake.SHAPES no longer matches the models; set it to:\n"
        + "\n".join(f"    {kind!r}: {shape!r}," for kind, shape in derived.items()))


def test_an_import_of_clean_lines_loads_no_pydantic(tmp_path: Path) -> None:
    import subprocess
    import sys

    path = tmp_path / "calls.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in (
        {"type": "track", "userId": "u1", "event": "Imported", "properties": {"n": 1}},
        {"type": "identify", "userId": "u1", "traits": {"plan": "pro"}},
        {"type": "page", "anonymousId": "a1", "name": "Home"},
        {"type": "group", "userId": "u1", "groupId": "g1", "traits": {"n": 2}},
    )))
    code = (
        "import sys\n"
        "from cio_outbox.cli import cli\n"
        "try:\n"
        "    cli.main(['enqueue', sys.argv[1], '--db', sys.argv[2]], standalone_mode=False)\n"
        "finally:\n"
        "    print('pydantic' in sys.modules, 'pandas' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(path), str(tmp_path / "o.db")],
                         capture_output=True, text=True, check=True).stdout
    assert "4 lines, 4 added" in out
    assert out.strip().splitlines()[-1] == "False False"
    with Outbox(str(tmp_path / "o.db")) as outbox:  # and the rows are the models' rows
        for payload in _payloads(outbox):
            assert from_wire(payload).wire() == {
                k: v for k, v in payload.items() if k != "context"} | {
                "context": payload["context"]}


def test_a_line_written_from_its_own_bytes_is_the_row_the_general_path_makes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever line_row accepts, prepare accepts too, with the same row (the payload being
    the same JSON), and the payload is the line's bytes with the added fields at the end."""
    import random

    monkeypatch.setattr(intake, "now_timestamp", lambda: "2024-06-01T00:00:00.000Z")
    rng = random.Random(17)
    extra: dict[str, list[Any]] = {
        "messageId": ["m-1", "x" * 101, " ", None],
        "userId": ["u1", "ü", "", None, 7, "  "],
        "context": [{"ip": "1.2.3.4"}],
        "category": ["c"], "writeKey": ["k"], "sentAt": [T0],
        "originalTimestamp": [T0, "2024-13-01T00:00:00.000Z"],
        "timestamp": [T0, "2024-02-30T12:00:00.000Z", "2024-05-01 12:00:00", 5],
        "properties": [{"n": 1.5, "s": "é", "big": 10**30}, [], {"a": "\ud800"}],
    }
    written = general_only = 0
    for _ in range(12000):
        call_type = rng.choice(messages.CALL_TYPES)
        call: dict[str, Any] = {"type": call_type}
        fields = messages.MODELS[call_type].model_fields
        for name, values in FIELD_VALUES.items():
            if name in fields and rng.random() < 0.5:
                call[name] = rng.choice(values)
        for name, values in extra.items():
            if rng.random() < (0.15 if name in fields else 0.02):
                call[name] = rng.choice(values)
        raw = json.dumps(call, ensure_ascii=rng.random() < 0.5,
                         separators=rng.choice([(",", ":"), (", ", ": ")])
                         ).encode("utf-8", "surrogatepass")  # a lone surrogate: bad bytes
        try:
            row = intake.line_row(raw, "r", 3)
        except MessageError:
            row = None
            refused = True
        else:
            refused = False
        try:
            parsed = json.loads(raw)
        except ValueError:  # not UTF-8: the reader refuses the line
            assert row is None, raw
            continue
        try:
            if parsed.get("messageId") is None:
                parsed["messageId"] = line_message_id("r", 3, raw)
            general = intake.prepare(parsed, "r", owned=True, plain=True)
        except MessageError:
            assert row is None, raw
            continue
        assert not refused, raw
        if row is None:
            general_only += 1
            continue
        if row.payload.encode().startswith(raw[:-1]):
            written += 1
        assert json.loads(row.payload) == json.loads(general.payload), raw
        assert row.size == len(row.payload.encode())
        assert (row.message_id, row.run, row.call_type, row.person) == (
            general.message_id, general.run, general.call_type, general.person)
    assert written > 250 and general_only > 250


@pytest.mark.parametrize("number", [b"1e400", b"-1e400", b"9" * 5000, b"9" * 400 + b".0",
                                    b"1.5E999"])
def test_a_line_with_a_number_out_of_range_takes_the_general_path(number: bytes) -> None:
    raw = b'{"type":"track","userId":"u","event":"E","properties":{"n":' + number + b"}}"
    assert intake.line_row(raw, "r", 1) is None


def test_a_line_with_a_big_integer_keeps_it_exactly() -> None:
    raw = b'{"type":"track","userId":"u","event":"E","properties":{"n":' + b"9" * 30 + b"}}"
    row = intake.line_row(raw, "r", 1)
    assert row is not None and json.loads(row.payload)["properties"]["n"] == 10**30 - 1
    assert row.payload.startswith(raw[:-1].decode())


@pytest.mark.parametrize("line", [
    # Each of these leaves the line path (an unknown field, a numeric userId, a null
    # messageId), so the general reader decodes it; orjson 3.13 reads an integer beyond
    # 64 bits as a float instead of refusing it, which must not reach the outbox.
    '{"type":"track","userId":"u","event":"E","foo":1,"properties":{"n":N}}',
    '{"type":"track","userId":5,"event":"E","properties":{"n":N}}',
    '{"type":"track","userId":"u","event":"E","messageId":null,"properties":{"n":N}}',
])
def test_the_general_reader_keeps_a_big_integer_exactly(tmp_path: Path, line: str) -> None:
    from cio_outbox.importers import enqueue_file
    number = 123456789012345678901234567890
    path = tmp_path / "big.jsonl"
    path.write_text(line.replace("N", str(number)) + "\n")
    outbox = Outbox(tmp_path / "outbox.db")
    assert intake.line_row(path.read_bytes().strip(), "r", 1) is None
    result = enqueue_file(outbox, path)
    assert result.added == 1, result.rejected
    (row,) = outbox.rows()
    payload = row["payload"] if isinstance(row, dict) else row.payload
    payload = json.loads(payload) if isinstance(payload, str) else payload
    assert payload["properties"]["n"] == number
    assert str(number) in json.dumps(payload)


def test_a_rule_the_fast_check_does_not_prove_still_refuses_the_call(
        outbox: Outbox) -> None:
    calls = [{"type": "identify", "userId": "u1", "traits": {"email": None}},
             {"type": "track", "userId": "u1", "event": "E", "context": {"channel": "email"}},
             {"type": "page", "userId": "u1", "properties": {"keywords": "a"}}]
    result = outbox.enqueue_many(calls)
    assert result.added == 0
    assert [r.field for r in result.rejected] == ["traits.email", "context.channel",
                                                  "properties.keywords"]


# -- event time ----------------------------------------------------------------------------


def test_a_call_without_timestamp_gets_the_time_of_enqueue(outbox: Outbox) -> None:
    before = dt.datetime.now(dt.UTC) - dt.timedelta(milliseconds=1)
    outbox.enqueue({"type": "track", "userId": "u1", "event": "Paid"})
    outbox.enqueue_many([{"type": "identify", "userId": "u2", "timestamp": None}])
    outbox.enqueue(build("page", {"userId": "u3"}))
    outbox.track("u4", "Paid")
    after = dt.datetime.now(dt.UTC) + dt.timedelta(milliseconds=1)
    stamps = [p["timestamp"] for p in _payloads(outbox)]
    assert len(stamps) == 4
    for stamp in stamps:
        assert len(stamp) == 24 and stamp.endswith("Z") and stamp[19] == "."
        assert before <= _utc(stamp) <= after


def test_an_explicit_timestamp_is_kept_at_the_same_instant(outbox: Outbox) -> None:
    outbox.enqueue({"type": "track", "userId": "u1", "event": "Paid",
                    "timestamp": "2024-05-01T14:00:00.250+02:00"})
    outbox.track("u2", "Paid", timestamp=dt.datetime(2023, 1, 2, 3, 4, 5, 6000,
                                                     tzinfo=dt.UTC))
    assert [p["timestamp"] for p in _payloads(outbox)] == [
        "2024-05-01T12:00:00.250Z", "2023-01-02T03:04:05.006Z"]


def test_the_delivered_timestamp_is_the_enqueue_time_not_the_drain_time(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    with Outbox(str(tmp_path / "o.db")) as outbox:
        outbox.enqueue({"type": "track", "userId": "u1", "event": "Paid"})
        enqueued = time.time()
        time.sleep(1.5)  # a worker that starts late: an outage, a paused migration
        outbox.drain(host=sandbox.url, key=sandbox.key, progress=False)
        drained = time.time()
    (delivered,) = sandbox.messages()
    stamp = _utc(delivered["timestamp"]).timestamp()
    assert abs(stamp - enqueued) < 0.5
    assert drained - stamp >= 1.5


# -- import identity from content ---------------------------------------------------------


def _lines(calls: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(c) + "\n" for c in calls)


def test_a_different_file_with_the_same_name_adds_all_its_lines(tmp_path: Path) -> None:
    day1, day2 = tmp_path / "day1", tmp_path / "day2"
    day1.mkdir()
    day2.mkdir()
    (day1 / "users.jsonl").write_text(_lines(
        [{"type": "identify", "userId": f"u{i}", "traits": {"day": 1}} for i in range(50)]))
    (day2 / "users.jsonl").write_text(_lines(
        [{"type": "identify", "userId": f"u{i}", "traits": {"day": 2}} for i in range(50)]))
    runner = CliRunner()
    db = str(tmp_path / "o.db")
    first = runner.invoke(cli, ["enqueue", str(day1 / "users.jsonl"), "--db", db])
    assert first.exit_code == 0 and "50 added" in first.stdout
    assert "warning" not in first.stderr
    second = runner.invoke(cli, ["enqueue", str(day2 / "users.jsonl"), "--db", db])
    assert second.exit_code == 0, second.output
    assert "50 lines, 50 added, 0 already in the outbox" in second.stdout
    assert "run 'users.jsonl' was used before for different content: 50 line(s)" \
        in second.stderr
    rerun = runner.invoke(cli, ["enqueue", str(day2 / "users.jsonl"), "--db", db])
    assert "0 added, 50 already in the outbox" in rerun.stdout
    assert "warning" not in rerun.stderr  # the lines match what the run holds last
    with Outbox(db) as outbox:
        assert outbox.status()["total"] == 100


def test_a_rerun_adds_nothing_and_an_edited_line_is_a_new_message(tmp_path: Path) -> None:
    path = tmp_path / "people.jsonl"
    calls = [{"type": "identify", "userId": f"u{i}", "traits": {"n": i}} for i in range(10)]
    path.write_text(_lines(calls))
    with Outbox(str(tmp_path / "o.db")) as outbox:
        assert enqueue_file(outbox, path, chunk_size=3).added == 10
        again = enqueue_file(outbox, path)
        assert (again.added, again.skipped, again.changed) == (0, 10, 0)
        calls[4]["traits"]["n"] = 40
        path.write_text(_lines(calls))
        edited = enqueue_file(outbox, path)
        assert (edited.added, edited.skipped, edited.changed) == (1, 9, 1)
        assert sorted(p["traits"]["n"] for p in _payloads(outbox)
                      if p["userId"] == "u4") == [4, 40]


def test_the_ids_of_one_import_are_ordered_in_file_order(tmp_path: Path) -> None:
    path = tmp_path / "big.jsonl"
    path.write_text(_lines([{"type": "track", "userId": f"u{i % 7}", "event": "E",
                             "properties": {"i": i}} for i in range(5000)]))
    with Outbox(str(tmp_path / "o.db")) as outbox:
        enqueue_file(outbox, path)
        rows = outbox.rows(limit=10_000)
    ids = [row["message_id"] for row in rows]  # in insertion order
    assert ids == sorted(ids)
    assert [line_of("big.jsonl", i) for i in ids] == list(range(1, 5001))


def test_line_ids_are_uuids_that_depend_on_run_place_and_content() -> None:
    import uuid

    one = line_message_id("r", 12, b"{}")
    assert uuid.UUID(one).version == 8
    assert one == line_message_id("r", 12, b"{}")
    assert len({one, line_message_id("r", 13, b"{}"), line_message_id("s", 12, b"{}"),
                line_message_id("r", 12, b"{ }")}) == 4
    assert line_of("r", one) == 12 and line_of("s", one) is None


def test_line_ids_do_not_change_between_versions() -> None:
    # A rerun of an import after an upgrade must find the rows of the first one.
    assert line_message_id("calls.jsonl", 123456789, b'{"a":1}') == (
        "f2e0744b-0007-85bc-8d15-7823357dd1d3")
    assert line_message_id("r", 1, b"{}") == "4ea9c1da-0000-8000-8001-b4b8bf78e9ad"
    assert line_message_id("r", 2**40 - 1, b"x") == "4ea9c1da-ffff-8fff-8fff-0a7651f82b16"


# -- migration from an event archive -------------------------------------------------------


def test_an_event_archive_keeps_its_own_message_ids_and_timestamps(tmp_path: Path) -> None:
    archive = [
        {"type": "identify", "userId": "u1", "traits": {"email": "a@example.com"},
         "messageId": "ajs-1", "timestamp": "2023-11-02T10:00:00.000Z",
         "context": {"ip": "1.2.3.4"}, "receivedAt": "2023-11-02T10:00:01.000Z",
         "sentAt": "2023-11-02T10:00:00.500Z"},
        {"type": "track", "userId": "u1", "event": "Order Placed", "messageId": "ajs-2",
         "properties": {"total": 42}, "timestamp": "2023-11-02T11:30:00.000Z"},
        {"type": "page", "anonymousId": "a1", "name": "Pricing", "messageId": "ajs-3",
         "properties": {"path": "/pricing"}, "timestamp": "2023-11-02T09:00:00+01:00"},
        {"type": "group", "userId": "u1", "groupId": "acme", "messageId": "ajs-4",
         "traits": {"name": "Acme"}, "timestamp": "2023-11-03T00:00:00.000Z"},
    ]
    path = tmp_path / "segment-export.jsonl"
    path.write_text(_lines(archive))
    runner = CliRunner()
    db = str(tmp_path / "o.db")
    result = runner.invoke(cli, ["enqueue", str(path), "--db", db])
    assert result.exit_code == 0, result.output
    with Outbox(db) as outbox:
        stored = {p["messageId"]: p for p in _payloads(outbox)}
    assert set(stored) == {"ajs-1", "ajs-2", "ajs-3", "ajs-4"}
    assert stored["ajs-1"]["timestamp"] == "2023-11-02T10:00:00.000Z"
    assert stored["ajs-3"]["timestamp"] == "2023-11-02T08:00:00.000Z"
    assert "receivedAt" not in stored["ajs-1"] and "sentAt" not in stored["ajs-1"]
    assert stored["ajs-1"]["context"]["ip"] == "1.2.3.4"
    again = runner.invoke(cli, ["enqueue", str(path), "--db", db, "--run", "other"])
    assert "0 added, 4 already in the outbox" in again.stdout
