"""Message models: good and bad input for every call type, conversions, size limit."""

from __future__ import annotations

import datetime as dt
import json
import os
import time
import uuid
from decimal import Decimal

import pytest

from cio_outbox.messages import (
    MAX_MESSAGE_BYTES,
    MessageError,
    build,
    format_timestamp,
    from_wire,
    message_id_for,
)
from cio_outbox.spec import check_call

GOOD = {
    "identify": {"userId": "u1", "traits": {"email": "ada@example.com", "plan": "pro"}},
    "track": {"userId": "u1", "event": "Signed Up", "properties": {"n": 1}},
    "page": {"anonymousId": "a1", "name": "Pricing", "properties": {"url": "https://x.io"}},
    "screen": {"userId": "u1", "name": "Settings"},
    "group": {"userId": "u1", "groupId": "acme", "traits": {"object_type_id": "1"}},
    "alias": {"userId": "u1", "previousId": "old"},
}


@pytest.mark.parametrize("call_type", sorted(GOOD))
def test_good_calls_give_wire_json_that_our_spec_accepts(call_type: str) -> None:
    message = build(call_type, GOOD[call_type])
    wire = json.loads(message.to_json())
    assert wire["type"] == call_type
    uuid.UUID(wire["messageId"])  # always present, a UUID string
    for name, value in GOOD[call_type].items():
        assert wire[name] == value
    assert wire["context"]["library"]["name"] == "cio-outbox"
    assert check_call(call_type, wire) == []


@pytest.mark.parametrize(
    ("call_type", "fields", "field", "words"),
    [
        ("track", {"userId": "u1"}, "event", "required"),
        ("track", {"userId": "u1", "event": ""}, "event", "non-empty"),
        ("track", {"event": "E"}, "userId", "userId or anonymousId is required"),
        ("identify", {"userId": ""}, "userId", "userId or anonymousId is required"),
        ("identify", {"userId": None}, "userId", "userId or anonymousId is required"),
        ("identify", {"userId": "   "}, "userId", "must not be blank"),
        ("identify", {"userId": 1.5}, "userId", "must be a string"),
        ("identify", {"userId": True}, "userId", "must be a string"),
        ("group", {"userId": "u1"}, "groupId", "required"),
        ("alias", {"userId": "u1"}, "previousId", "required"),
        ("alias", {"previousId": "p"}, "userId", "required"),
        ("identify", {"userId": "u1", "traits": []}, "traits", "dictionary"),
        ("identify", {"userId": "u1", "type": "track"}, "type", "must be 'identify'"),
        ("track", {"userId": "u1", "event": "E", "timestamp": "yesterday"}, "timestamp",
         "ISO-8601"),
        ("identify", {"userId": "u1", "integrations": {"All": "yes"}}, "integrations.All",
         "boolean"),
    ],
)
def test_bad_calls_name_the_field(call_type: str, fields: dict, field: str | None,
                                  words: str) -> None:
    with pytest.raises(MessageError) as caught:
        build(call_type, fields)
    assert caught.value.field == field
    assert words.lower() in str(caught.value).lower()
    if field:
        assert f"{field} {field}" not in str(caught.value)


def test_unknown_type_is_refused() -> None:
    with pytest.raises(MessageError, match="not one of") as caught:
        from_wire({"type": "purchase", "userId": "u1"})
    assert caught.value.field == "type"
    with pytest.raises(MessageError, match="type is required"):
        from_wire({"userId": "u1"})


def test_integer_ids_become_strings() -> None:
    wire = json.loads(build("track", {"userId": 42, "event": "E"}).to_json())
    assert wire["userId"] == "42"


def test_timestamps_are_utc_iso_with_z_and_naive_means_utc() -> None:
    aware = dt.datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    naive = dt.datetime(2024, 5, 1, 10, 0, 0, 123456)
    assert format_timestamp(aware) == "2024-05-01T10:00:00.123Z"
    assert format_timestamp(naive) == "2024-05-01T10:00:00.123Z"
    m = build("track", {"userId": "u", "event": "E", "timestamp": "2024-05-01T12:00:00+02:00"})
    assert m.timestamp == "2024-05-01T10:00:00.000Z"


def test_values_json_cannot_carry_natively_are_converted() -> None:
    when = dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    ident = uuid.UUID("12345678-1234-5678-1234-567812345678")
    m = build("identify", {"userId": "u", "traits": {
        "at": when, "day": dt.date(2024, 1, 2), "price": Decimal("9.99"), "ref": ident,
        "pair": (1, 2)}})
    traits = json.loads(m.to_json())["traits"]
    assert traits == {"at": "2024-01-02T03:04:05.000Z", "day": "2024-01-02", "price": 9.99,
                      "ref": str(ident), "pair": [1, 2]}


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ({1, 2}, "is a set"),
        (b"raw", "is bytes"),
        (float("nan"), "nan"),
        (float("inf"), "inf"),
        (Decimal("NaN"), "cannot be sent as JSON"),
        (object(), "cannot be sent as JSON"),
    ],
)
def test_values_json_cannot_carry_are_refused_naming_the_path(value: object, words: str) -> None:
    message = build("identify", {"userId": "u", "traits": {"profile": {"tags": [value]}}})
    with pytest.raises(MessageError) as caught:
        message.to_json()
    assert caught.value.field == "traits.profile.tags[0]"
    assert words in str(caught.value)


def test_numpy_scalars_are_converted() -> None:
    np = pytest.importorskip("numpy")
    m = build("track", {"userId": "u", "event": "E",
                        "properties": {"n": np.int64(3), "x": np.float64(1.5)}})
    assert json.loads(m.to_json())["properties"] == {"n": 3, "x": 1.5}


def test_size_limit_names_size_limit_and_message_id() -> None:
    big = "x" * MAX_MESSAGE_BYTES
    message = build("track", {"userId": "u", "event": "E", "properties": {"blob": big},
                              "messageId": "m-big"})
    with pytest.raises(MessageError) as caught:
        message.to_json()
    text = str(caught.value)
    assert "m-big" in text and str(MAX_MESSAGE_BYTES) in text and "bytes" in text


def test_size_limit_counts_utf8_bytes_not_characters() -> None:
    # 11,000 three-byte characters: 33,000 bytes but only 11,000 characters.
    message = build("track", {"userId": "u", "event": "E", "properties": {"t": "\u20ac" * 11000}})
    with pytest.raises(MessageError, match="over the limit"):
        message.to_json()


def test_message_just_under_the_limit_is_accepted() -> None:
    base = build("track", {"userId": "u", "event": "E", "properties": {"p": ""},
                           "messageId": "m"})
    room = MAX_MESSAGE_BYTES - len(base.to_json().encode())
    message = build("track", {"userId": "u", "event": "E", "properties": {"p": "y" * room},
                              "messageId": "m"})
    payload, size = message.encode()
    assert size == MAX_MESSAGE_BYTES == len(payload.encode())


def test_idempotency_keys_give_stable_distinct_ids() -> None:
    assert message_id_for("run:1") == message_id_for("run:1")
    assert message_id_for("run:1") != message_id_for("run:2")
    uuid.UUID(message_id_for("run:1"))


def test_caller_context_library_is_kept() -> None:
    m = build("track", {"userId": "u", "event": "E",
                        "context": {"library": {"name": "mine", "version": "1"}, "ip": "1.2.3.4"}})
    context = json.loads(m.to_json())["context"]
    assert context == {"library": {"name": "mine", "version": "1"}, "ip": "1.2.3.4"}


def test_from_wire_drops_fields_the_server_or_sender_sets() -> None:
    m = from_wire({"type": "track", "userId": "u", "event": "E", "sentAt": "2024-01-01T00:00:00Z",
                   "receivedAt": "2024-01-01T00:00:00Z", "messageId": "keep-me"})
    wire = json.loads(m.to_json())
    assert "sentAt" not in wire and "receivedAt" not in wire
    assert wire["messageId"] == "keep-me"


def test_generated_message_ids_are_uuid7_and_grow_with_time() -> None:
    from cio_outbox.messages import new_message_id

    first = new_message_id()
    time.sleep(0.002)
    second = new_message_id()
    assert uuid.UUID(first).version == 7
    assert uuid.UUID(first).variant == uuid.RFC_4122
    assert first[:13] < second[:13]  # the millisecond timestamp leads
    assert len({new_message_id() for _ in range(10_000)}) == 10_000


def test_generated_message_ids_of_a_burst_are_strictly_increasing() -> None:
    # Within one millisecond too: ids of one enqueue_many land in id order at the end of
    # the messageId index, and sorting by messageId gives the order of enqueue.
    from cio_outbox.messages import new_message_id

    burst = [new_message_id() for _ in range(50_000)]
    assert burst == sorted(burst) and len(set(burst)) == len(burst)
    assert all(uuid.UUID(i).version == 7 and uuid.UUID(i).variant == uuid.RFC_4122
               for i in burst[::997])
    assert all(str(uuid.UUID(i)) == i for i in burst[::997])  # the canonical text


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_never_repeats_its_parents_message_ids() -> None:
    from cio_outbox.messages import new_message_id

    new_message_id()  # the parent's sequence has started before the fork
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: the same instant, the same inherited state
        try:
            os.write(write, "\n".join(new_message_id() for _ in range(2000)).encode())
        finally:
            os._exit(0)
    os.close(write)
    mine = {new_message_id() for _ in range(2000)}
    chunks = []
    while chunk := os.read(read, 1 << 16):
        chunks.append(chunk)
    os.close(read)
    os.waitpid(pid, 0)
    theirs = set(b"".join(chunks).decode().split("\n"))
    assert len(theirs) == 2000 and not mine & theirs


def test_numpy_datetime64_becomes_an_iso_timestamp() -> None:
    np = pytest.importorskip("numpy")
    m = build("track", {"userId": "u", "event": "E",
                        "properties": {"t": np.datetime64("2024-05-01T10:00:00.123456789")}})
    assert json.loads(m.to_json())["properties"]["t"] == "2024-05-01T10:00:00.123Z"


def test_text_with_lone_surrogates_is_refused_naming_the_field() -> None:
    broken = b"caf\xe9".decode("utf-8", errors="surrogateescape")
    message = build("identify", {"userId": "u", "traits": {"name": broken}})
    with pytest.raises(MessageError) as caught:
        message.encode()
    assert caught.value.field == "traits.name"
    assert "not valid Unicode" in str(caught.value)
