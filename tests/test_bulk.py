"""enqueue_rows: identify and track calls from lists of dicts and from pandas DataFrames."""

from __future__ import annotations

import datetime as dt
import json
import re
import subprocess
import sys
from typing import Any

import pytest

from cio_outbox import MessageError, Outbox
from cio_outbox.messages import message_id_for
from cio_outbox.operations import InvalidRowsError
from cio_outbox.storage.base import CHUNK_ROWS

pd = pytest.importorskip("pandas")
np = pytest.importorskip("numpy")


def payloads(outbox: Outbox, run: str | None = None) -> list[dict[str, Any]]:
    """Stored payloads in enqueue order, without the library context."""
    out = []
    for row in outbox.rows(run=run, limit=100_000):
        payload = json.loads(row["payload"])
        payload["context"].pop("library")
        if not payload["context"]:
            del payload["context"]
        out.append(unstamped(payload))
    return out


def unstamped(payload: dict[str, Any]) -> dict[str, Any]:
    """The payload without the timestamp enqueue stamped on it (checked to be just now)."""
    stamp = payload.get("timestamp")
    if isinstance(stamp, str) and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", stamp):
        moment = dt.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
        if abs((dt.datetime.now(dt.UTC) - moment).total_seconds()) < 600:
            del payload["timestamp"]
    return payload


def without_ids(payload: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in payload.items() if k != "messageId"}


# -- lists of dicts ----------------------------------------------------------------------


def test_identify_rows_send_every_other_column_as_traits(outbox: Outbox) -> None:
    rows = [
        {"id": "u1", "email": "a@example.com", "plan": "pro"},
        {"id": "u2", "email": "b@example.com", "plan": None},
    ]
    result = outbox.enqueue_rows(rows, run="people")
    assert (result.added, result.skipped, result.rejected) == (2, 0, [])
    assert [without_ids(p) for p in payloads(outbox)] == [
        {"type": "identify", "userId": "u1", "traits": {"email": "a@example.com",
                                                        "plan": "pro"}},
        {"type": "identify", "userId": "u2", "traits": {"email": "b@example.com"}},
    ]


def test_listed_and_renamed_trait_columns(outbox: Outbox) -> None:
    rows = [{"id": 7, "email": "a@example.com", "secret": "x", "signup": "2024-05-01"}]
    outbox.enqueue_rows(rows, traits=["email"])
    outbox.enqueue_rows(rows, traits={"created_at": "signup"})
    assert [without_ids(p) for p in payloads(outbox)] == [
        {"type": "identify", "userId": "7", "traits": {"email": "a@example.com"}},
        {"type": "identify", "userId": "7", "traits": {"created_at": "2024-05-01"}},
    ]


def test_track_rows_with_a_fixed_event_and_a_timestamp_column(outbox: Outbox) -> None:
    rows = [{"customer": "u1", "total": 42.5, "at": dt.datetime(2024, 5, 1, 12, 30)},
            {"customer": "u2", "total": 10, "at": "2024-05-02T08:00:00+02:00"}]
    result = outbox.enqueue_rows(rows, call_type="track", event="Order Placed",
                                 user_id="customer", timestamp="at", run="orders")
    assert result.added == 2
    assert [without_ids(p) for p in payloads(outbox)] == [
        {"type": "track", "userId": "u1", "event": "Order Placed",
         "properties": {"total": 42.5}, "timestamp": "2024-05-01T12:30:00.000Z"},
        {"type": "track", "userId": "u2", "event": "Order Placed",
         "properties": {"total": 10}, "timestamp": "2024-05-02T06:00:00.000Z"},
    ]


def test_track_rows_with_an_event_column_and_anonymous_ids(outbox: Outbox) -> None:
    rows = [{"anon": "a1", "what": "Viewed", "page": "/"},
            {"anon": "a2", "what": "Clicked", "page": "/x"}]
    outbox.enqueue_rows(rows, call_type="track", user_id=None, anonymous_id="anon",
                        event_column="what", properties=["page"])
    assert [without_ids(p) for p in payloads(outbox)] == [
        {"type": "track", "anonymousId": "a1", "event": "Viewed", "properties": {"page": "/"}},
        {"type": "track", "anonymousId": "a2", "event": "Clicked",
         "properties": {"page": "/x"}},
    ]


def test_invalid_rows_are_skipped_and_reported_by_row_number(outbox: Outbox) -> None:
    rows = [
        {"id": "u1", "email": "a@example.com"},
        {"id": None, "email": "no-id@example.com"},
        {"id": "u3", "tags": {1, 2}},
        {"id": "u4", "email": "d@example.com"},
        {"id": "  ", "email": "blank@example.com"},
    ]
    result = outbox.enqueue_rows(rows, run="people")
    assert result.added == 2
    assert [r.index for r in result.rejected] == [1, 2, 4]
    assert "userId or anonymousId" in result.rejected[0].error
    assert result.rejected[1].field == "traits.tags" and "set" in result.rejected[1].error
    assert result.rejected[2].field == "userId"
    assert [p["userId"] for p in payloads(outbox)] == ["u1", "u4"]


def test_row_numbers_count_from_start(outbox: Outbox) -> None:
    result = outbox.enqueue_rows([{"id": "u1"}, {"id": None}], start=1000, run="r")
    assert [r.index for r in result.rejected] == [1001]


def test_raise_writes_nothing_and_lists_every_invalid_row(outbox: Outbox) -> None:
    rows = [{"id": "u1"}, {"id": None}, {"id": "u3", "blob": b"x"}, {"id": "u4"}]
    with pytest.raises(InvalidRowsError) as caught:
        outbox.enqueue_rows(rows, on_invalid="raise", run="people")
    assert isinstance(caught.value, MessageError)
    assert [r.index for r in caught.value.rejected] == [1, 2]
    assert "2 row(s) invalid" in str(caught.value) and "row 1" in str(caught.value)
    assert outbox.status()["total"] == 0


def test_raise_catches_oversized_rows_before_writing(outbox: Outbox) -> None:
    rows = [{"id": "u1"}, {"id": "u2", "bio": "x" * 40_000}]
    with pytest.raises(InvalidRowsError) as caught:
        outbox.enqueue_rows(rows, on_invalid="raise")
    assert [r.index for r in caught.value.rejected] == [1]
    assert outbox.status()["total"] == 0


def test_raise_with_valid_rows_writes_them_all(outbox: Outbox) -> None:
    result = outbox.enqueue_rows([{"id": "u1"}, {"id": "u2"}], on_invalid="raise", run="r")
    assert (result.added, result.rejected) == (2, [])


def test_oversized_rows_are_skipped_with_their_row_number(outbox: Outbox) -> None:
    rows = [{"id": "u1"}, {"id": None}, {"id": "u2", "bio": "x" * 40_000}, {"id": "u3"}]
    result = outbox.enqueue_rows(rows, chunk_size=2)
    assert result.added == 2
    assert [(r.index, r.field) for r in result.rejected] == [(1, "userId"), (2, "message")]
    assert "userId or anonymousId" in result.rejected[0].error


def test_rerun_with_a_run_adds_nothing(outbox: Outbox) -> None:
    rows = [{"id": f"u{i}", "n": i} for i in range(25)]
    first = outbox.enqueue_rows(rows, run="import-1", chunk_size=10)
    again = outbox.enqueue_rows(rows, run="import-1", chunk_size=10)
    assert (first.added, again.added, again.skipped) == (25, 0, 25)
    other = outbox.enqueue_rows(rows, run="import-2")
    assert other.added == 25  # a different run is a different import


def test_other_rows_under_the_same_run_are_new_messages(outbox: Outbox) -> None:
    # A corrected subset (or the next day's frame) under the same run is not "already there"
    # because its rows sit at the same positions as earlier ones.
    first = outbox.enqueue_rows([{"id": f"u{i}", "plan": "free"} for i in range(5)], run="r")
    fixed = outbox.enqueue_rows([{"id": "u9", "plan": "pro"}], run="r")
    changed = outbox.enqueue_rows([{"id": "u0", "plan": "pro"}], run="r")
    assert (first.added, fixed.added, changed.added) == (5, 1, 1)
    assert outbox.status(run="r")["total"] == 7


def test_messageids_differ_by_call_type_and_event_within_a_run(outbox: Outbox) -> None:
    rows = [{"id": "u1"}]
    outbox.enqueue_rows(rows, run="r")
    outbox.enqueue_rows(rows, run="r", call_type="track", event="A")
    outbox.enqueue_rows(rows, run="r", call_type="track", event="B")
    assert outbox.status()["total"] == 3


def test_idempotency_key_and_message_id_columns(outbox: Outbox) -> None:
    rows = [{"id": "u1", "order": "o-1", "mid": "m-1"}, {"id": "u1", "order": "o-2",
                                                          "mid": "m-2"}]
    outbox.enqueue_rows(rows, call_type="track", event="Paid", idempotency_key="order",
                        properties=["order"])
    again = outbox.enqueue_rows(rows, call_type="track", event="Paid",
                                idempotency_key="order", properties=["order"])
    assert again.skipped == 2
    assert [p["messageId"] for p in payloads(outbox)] == [message_id_for("o-1"),
                                                           message_id_for("o-2")]
    outbox.enqueue_rows(rows, call_type="track", event="Shipped", message_id="mid",
                        properties=["order"])
    assert [p["messageId"] for p in payloads(outbox)][2:] == ["m-1", "m-2"]
    missing = outbox.enqueue_rows([{"id": "u2", "order": None}], call_type="track",
                                  event="Paid", idempotency_key="order")
    assert missing.added == 0 and missing.rejected[0].field == "order"


def test_without_run_or_key_every_row_gets_a_new_messageid(outbox: Outbox) -> None:
    rows = [{"id": "u1"}]
    outbox.enqueue_rows(rows)
    assert outbox.enqueue_rows(rows).added == 1


def test_semantic_events_in_rows_are_checked(outbox: Outbox) -> None:
    rows = [{"id": "u1", "email_id": "e-1"}, {"id": "u2", "subject": "Hi"}]
    result = outbox.enqueue_rows(rows, call_type="track", event="Email Bounced")
    assert result.added == 1
    assert result.rejected[0].index == 1
    assert "Email Bounced" in result.rejected[0].error
    assert result.rejected[0].field == "properties.email_id"


def test_missing_event_in_an_event_column_is_a_rejected_row(outbox: Outbox) -> None:
    result = outbox.enqueue_rows([{"id": "u1", "e": None}], call_type="track",
                                 event_column="e")
    assert result.rejected[0].field == "event"


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"call_type": "page"}, "call_type"),
    ({"on_invalid": "ignore"}, "on_invalid"),
    ({"call_type": "track"}, "event"),
    ({"call_type": "track", "event": "A", "event_column": "e"}, "event"),
    ({"call_type": "track", "event": "A", "traits": ["x"]}, "properties"),
    ({"event": "A"}, "traits"),
    ({"properties": ["x"]}, "traits"),
    ({"user_id": None}, "user_id"),
    ({"message_id": "m", "idempotency_key": "k"}, "message_id"),
    ({"chunk_size": 0}, "chunk_size"),
])
def test_argument_mistakes_are_refused_before_anything_is_written(
    outbox: Outbox, kwargs: dict[str, Any], message: str,
) -> None:
    with pytest.raises(ValueError, match=message):
        outbox.enqueue_rows([{"id": "u1"}], **kwargs)
    assert outbox.status()["total"] == 0


def test_one_dict_is_not_taken_for_rows(outbox: Outbox) -> None:
    with pytest.raises(TypeError):
        outbox.enqueue_rows({"id": "u1"})


def test_rows_can_be_a_generator(outbox: Outbox) -> None:
    result = outbox.enqueue_rows(({"id": f"u{i}"} for i in range(5)), run="gen")
    assert result.added == 5


# -- DataFrames --------------------------------------------------------------------------


def test_dataframe_with_nan_nat_na_and_numpy_values(outbox: Outbox) -> None:
    frame = pd.DataFrame({
        "id": [1, 2, 3],
        "email": ["a@example.com", None, "c@example.com"],
        "score": [1.5, np.nan, 3.0],
        "visits": np.array([10, 20, 30], dtype=np.int64),
        "vip": pd.array([True, pd.NA, False], dtype="boolean"),
        "signed_up": pd.to_datetime(["2024-05-01 12:00", None, "2024-05-03 00:00"]),
    })
    result = outbox.enqueue_rows(frame, run="df")
    assert (result.added, result.rejected) == (3, [])
    assert [without_ids(p) for p in payloads(outbox)] == [
        {"type": "identify", "userId": "1",
         "traits": {"email": "a@example.com", "score": 1.5, "visits": 10, "vip": True,
                    "signed_up": "2024-05-01T12:00:00.000Z"}},
        {"type": "identify", "userId": "2", "traits": {"visits": 20}},
        {"type": "identify", "userId": "3",
         "traits": {"email": "c@example.com", "score": 3.0, "visits": 30, "vip": False,
                    "signed_up": "2024-05-03T00:00:00.000Z"}},
    ]


def test_dataframe_float_ids_from_gaps_and_rejected_rows(outbox: Outbox) -> None:
    frame = pd.DataFrame({"id": [1, np.nan, 3], "plan": ["a", "b", "c"]})
    assert frame["id"].dtype == np.float64
    result = outbox.enqueue_rows(frame, run="df")
    assert result.added == 2
    assert [r.index for r in result.rejected] == [1]
    assert [p["userId"] for p in payloads(outbox)] == ["1", "3"]


def test_dataframe_track_with_timezone_aware_timestamps(outbox: Outbox) -> None:
    frame = pd.DataFrame({
        "user": ["u1", "u2"],
        "amount": np.array([5, 7], dtype=np.int32),
        "at": pd.to_datetime(["2024-05-01T12:00:00+02:00", "2024-05-01T00:00:00Z"],
                             utc=True),
    })
    outbox.enqueue_rows(frame, call_type="track", event="Paid", user_id="user",
                        timestamp="at")
    assert [without_ids(p) for p in payloads(outbox)] == [
        {"type": "track", "userId": "u1", "event": "Paid", "properties": {"amount": 5},
         "timestamp": "2024-05-01T10:00:00.000Z"},
        {"type": "track", "userId": "u2", "event": "Paid", "properties": {"amount": 7},
         "timestamp": "2024-05-01T00:00:00.000Z"},
    ]


def test_dataframe_in_chunks_skip_raise_and_rerun(outbox: Outbox) -> None:
    frame = pd.DataFrame({"id": [f"u{i}" for i in range(12)], "n": range(12)})
    frame.loc[5, "id"] = None
    skipped = outbox.enqueue_rows(frame, run="df", chunk_size=4)
    assert skipped.added == 11 and [r.index for r in skipped.rejected] == [5]
    rerun = outbox.enqueue_rows(frame, run="df", chunk_size=4)
    assert (rerun.added, rerun.skipped) == (0, 11)
    with pytest.raises(InvalidRowsError):
        outbox.enqueue_rows(frame, run="df-strict", on_invalid="raise")
    assert outbox.status(run="df-strict")["total"] == 0


def test_dataframe_with_a_missing_named_column_is_refused(outbox: Outbox) -> None:
    frame = pd.DataFrame({"id": ["u1"], "email": ["a@example.com"]})
    with pytest.raises(KeyError, match="plan"):
        outbox.enqueue_rows(frame, traits=["email", "plan"])
    with pytest.raises(KeyError, match="customer"):
        outbox.enqueue_rows(frame, user_id="customer")
    assert outbox.status()["total"] == 0


def test_dataframe_and_list_give_the_same_payloads(tmp_path: Any) -> None:
    records = [{"id": "u1", "plan": "pro", "seats": 3}, {"id": "u2", "plan": "free",
                                                         "seats": 1}]
    with Outbox(str(tmp_path / "a.db")) as a, Outbox(str(tmp_path / "b.db")) as b:
        a.enqueue_rows(records, run="same")
        b.enqueue_rows(pd.DataFrame(records), run="same")
        assert payloads(a) == payloads(b)


def test_pandas_is_not_imported_by_the_package(tmp_path: Any) -> None:
    code = ("import sys, cio_outbox; o = cio_outbox.Outbox(sys.argv[1]); "
            "o.enqueue_rows([{'id': 'u1'}]); print('pandas' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "o.db")],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_frame_of_several_transaction_chunks_lands_whole(outbox: Outbox) -> None:
    # How fast a frame enqueues is measured in benchmarks/ (enqueue_many at 100,000 rows);
    # here: a frame spanning three transaction chunks, with a partial last one, lands
    # row for row, each exactly once.
    n = 2 * CHUNK_ROWS + 7
    frame = pd.DataFrame({"id": np.arange(n), "email": [f"p{i}@example.com" for i in range(n)],
                          "score": np.random.default_rng(1).random(n)})
    result = outbox.enqueue_rows(frame, run="big")
    assert (result.added, result.rejected) == (n, [])
    assert outbox.status(run="big")["pending"] == n
    stored = payloads(outbox, run="big")
    assert sorted(int(p["userId"]) for p in stored) == list(range(n))
    last = next(p for p in stored if p["userId"] == str(n - 1))
    assert last["traits"] == {"email": f"p{n - 1}@example.com",
                              "score": float(frame["score"].iloc[-1])}


def test_numpy_datetimes_in_rows_become_iso_strings_and_nat_is_dropped(outbox: Outbox) -> None:
    rows = [{"id": np.int64(5), "seen": np.datetime64("2024-05-01T12:00:00", "ns"),
             "gone": np.datetime64("NaT"), "ratio": np.float32("nan"), "n": np.int16(3)}]
    result = outbox.enqueue_rows(rows)
    assert result.rejected == []
    assert [without_ids(p) for p in payloads(outbox)] == [
        {"type": "identify", "userId": "5",
         "traits": {"seen": "2024-05-01T12:00:00.000Z", "n": 3}},
    ]
