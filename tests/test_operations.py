"""The higher-level calls: the exact wire payload each one writes, and what each one refuses.

Payloads are read back from the outbox file (what the worker will send, byte for byte);
tests/test_operations_e2e.py drains the same calls into the sandbox.
"""

from __future__ import annotations

import datetime as dt
import inspect
import json
import re
from typing import Any

import pytest

from cio_outbox import MessageError, Outbox, operations
from cio_outbox.config import REGION_HOSTS
from cio_outbox.messages import LIBRARY, message_id_for
from cio_outbox.operations import SemanticEventTable, object_anonymous_id
from cio_outbox.outbox import EnqueueResult
from cio_outbox.semantic import CATEGORIES, SEMANTIC_EVENTS


def stored(outbox: Outbox, result: EnqueueResult) -> dict[str, Any]:
    """The payload written for a single-call result, as the worker will send it."""
    assert result.added == 1 and result.message_id is not None
    row = outbox.storage.message(result.message_id)
    assert row is not None
    return unstamped(json.loads(row["payload"]))


def unstamped(payload: dict[str, Any]) -> dict[str, Any]:
    """The payload without the timestamp enqueue stamped on it (checked to be just now)."""
    stamp = payload.get("timestamp")
    if isinstance(stamp, str) and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", stamp):
        moment = dt.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
        if abs((dt.datetime.now(dt.UTC) - moment).total_seconds()) < 600:
            del payload["timestamp"]
    return payload


def expected(fields: dict[str, Any], result: EnqueueResult) -> dict[str, Any]:
    """The exact payload: the given fields plus messageId and the library context."""
    payload = {**fields, "messageId": result.message_id}
    payload["context"] = {**payload.get("context", {}), "library": LIBRARY}
    return payload


def total(outbox: Outbox) -> int:
    return outbox.status()["total"]


# -- people ------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "event"), [
    ("delete_person", "User Deleted"),
    ("suppress_person", "User Suppressed"),
    ("unsuppress_person", "User Unsuppressed"),
])
def test_people_calls_write_their_semantic_track(outbox: Outbox, method: str,
                                                 event: str) -> None:
    result = getattr(outbox, method)("u1", timestamp="2024-05-01T12:00:00Z")
    assert stored(outbox, result) == expected(
        {"type": "track", "userId": "u1", "event": event,
         "timestamp": "2024-05-01T12:00:00.000Z"}, result)


def test_delete_person_needs_a_user_id(outbox: Outbox) -> None:
    with pytest.raises(MessageError) as caught:
        outbox.delete_person(None)  # type: ignore[arg-type]
    assert "User Deleted" in str(caught.value) or "userId" in str(caught.value)
    assert total(outbox) == 0


def test_identify_with_only_an_email_is_refused_and_writes_nothing(outbox: Outbox) -> None:
    # Documented choice: the API schema requires userId or anonymousId.
    with pytest.raises(MessageError) as caught:
        outbox.identify(traits={"email": "ada@example.com"})
    assert "userId or anonymousId" in str(caught.value)
    assert total(outbox) == 0


def test_identify_with_user_id_and_anonymous_id_keeps_both(outbox: Outbox) -> None:
    result = outbox.identify("u1", anonymous_id="anon-1", traits={"email": "a@example.com"})
    assert stored(outbox, result) == expected(
        {"type": "identify", "userId": "u1", "anonymousId": "anon-1",
         "traits": {"email": "a@example.com"}}, result)


def test_identify_with_only_an_anonymous_id(outbox: Outbox) -> None:
    result = outbox.identify(anonymous_id="anon-1", traits={"plan": "free"})
    assert stored(outbox, result) == expected(
        {"type": "identify", "anonymousId": "anon-1", "traits": {"plan": "free"}}, result)


# -- semantic events ---------------------------------------------------------------------


def test_track_semantic_writes_the_exact_track(outbox: Outbox) -> None:
    result = outbox.track_semantic("Email Bounced", "u1", properties={"email_id": "e-1"},
                                   idempotency_key="bounce-e-1", run="r")
    assert result.message_id == message_id_for("bounce-e-1")
    assert stored(outbox, result) == expected(
        {"type": "track", "userId": "u1", "event": "Email Bounced",
         "properties": {"email_id": "e-1"}}, result)


def test_track_semantic_names_the_event_and_the_missing_field(outbox: Outbox) -> None:
    with pytest.raises(MessageError) as caught:
        outbox.track_semantic("Email Bounced", "u1", properties={"email_subject": "Hi"})
    text = str(caught.value)
    assert "Email Bounced" in text and "properties.email_id" in text
    assert caught.value.field == "properties.email_id"
    assert total(outbox) == 0


def test_track_semantic_checks_the_identity_the_event_needs(outbox: Outbox) -> None:
    # Relationship Deleted needs a userId; an anonymousId alone is not enough.
    with pytest.raises(MessageError) as caught:
        outbox.track_semantic("Relationship Deleted", anonymous_id="a1",
                              properties={"objectId": "acme"})
    assert "Relationship Deleted" in str(caught.value) and "userId" in str(caught.value)
    assert total(outbox) == 0


def test_track_semantic_checks_converted_values(outbox: Outbox) -> None:
    # A datetime property is checked as the ISO string it will be sent as.
    import datetime as dt

    when = dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.UTC)
    result = outbox.track_semantic("Email Opened", "u1",
                                   properties={"email_id": "e-1", "opened_at": when})
    assert stored(outbox, result)["properties"] == {"email_id": "e-1",
                                                    "opened_at": "2024-05-01T12:00:00.000Z"}


def test_track_semantic_refuses_unknown_names_with_a_suggestion(outbox: Outbox) -> None:
    with pytest.raises(MessageError) as caught:
        outbox.track_semantic("email bounced", "u1", properties={"email_id": "e"})
    assert "'Email Bounced'" in str(caught.value) and "track()" in str(caught.value)
    assert caught.value.field == "event"
    with pytest.raises(MessageError):
        outbox.track_semantic("Signed Up", "u1")
    assert total(outbox) == 0


def test_track_semantic_message_id_and_idempotency_key_exclude_each_other(
    outbox: Outbox,
) -> None:
    with pytest.raises(MessageError):
        outbox.track_semantic("User Deleted", "u1", message_id="m1", idempotency_key="k")
    assert total(outbox) == 0


def test_idempotency_key_makes_a_repeat_a_no_op(outbox: Outbox) -> None:
    first = outbox.delete_person("u1", idempotency_key="gdpr-u1")
    again = outbox.delete_person("u1", idempotency_key="gdpr-u1")
    assert (first.added, again.added, again.skipped) == (1, 0, 1)
    assert total(outbox) == 1


def test_semantic_events_lists_the_catalogue(outbox: Outbox) -> None:
    table = outbox.semantic_events()
    assert isinstance(table, SemanticEventTable)
    assert [row["name"] for row in table] == list(SEMANTIC_EVENTS)
    bounced = next(row for row in table if row["name"] == "Email Bounced")
    assert bounced["category"] == "email"
    assert "properties.email_id" in bounced["requires"]
    devices = outbox.semantic_events("device")
    assert {row["name"] for row in devices} == {"Device Created or Updated", "Device Deleted"}
    assert "<table>" in table._repr_html_() and "Email Bounced" in table._repr_html_()
    assert {row["category"] for row in table} <= set(CATEGORIES)
    with pytest.raises(ValueError, match="category"):
        outbox.semantic_events("nope")


# -- devices -----------------------------------------------------------------------------


def test_add_device_puts_token_and_type_in_context_and_attributes_in_properties(
    outbox: Outbox,
) -> None:
    result = outbox.add_device("u1", "tok-1", device_type="ios",
                               attributes={"app_version": "2.4.0"},
                               context={"ip": "203.0.113.9", "device": {"model": "iPhone15"}})
    assert stored(outbox, result) == expected(
        {"type": "track", "userId": "u1", "event": "Device Created or Updated",
         "properties": {"app_version": "2.4.0"},
         "context": {"ip": "203.0.113.9",
                     "device": {"model": "iPhone15", "token": "tok-1", "type": "ios"}}},
        result)


def test_add_device_without_type_or_attributes(outbox: Outbox) -> None:
    result = outbox.add_device("u1", "tok-1")
    assert stored(outbox, result) == expected(
        {"type": "track", "userId": "u1", "event": "Device Created or Updated",
         "context": {"device": {"token": "tok-1"}}}, result)


def test_delete_device(outbox: Outbox) -> None:
    result = outbox.delete_device("u1", "tok-1", device_type="android")
    assert stored(outbox, result) == expected(
        {"type": "track", "userId": "u1", "event": "Device Deleted",
         "context": {"device": {"token": "tok-1", "type": "android"}}}, result)


def test_device_calls_refuse_bad_tokens_and_types(outbox: Outbox) -> None:
    with pytest.raises(MessageError) as caught:
        outbox.add_device("u1", "tok", device_type="windows")
    assert caught.value.field == "context.device.type"
    with pytest.raises(MessageError) as caught:
        outbox.delete_device("u1", "  ")
    assert caught.value.field == "context.device.token"
    with pytest.raises(MessageError):
        outbox.add_device(None, "tok")  # type: ignore[arg-type]
    assert total(outbox) == 0


def test_add_device_does_not_change_the_callers_context(outbox: Outbox) -> None:
    context = {"device": {"model": "Pixel"}}
    outbox.add_device("u1", "tok", context=context)
    assert context == {"device": {"model": "Pixel"}}


# -- objects and relationships -----------------------------------------------------------


def test_upsert_object_without_a_person_sends_the_object_anonymous_id(outbox: Outbox) -> None:
    result = outbox.upsert_object("acme", traits={"name": "Acme", "seats": 12})
    assert stored(outbox, result) == expected(
        {"type": "group", "anonymousId": "object:1:acme", "groupId": "acme",
         "traits": {"name": "Acme", "seats": 12, "object_type_id": "1"}}, result)
    assert object_anonymous_id("acme") == "object:1:acme"


def test_upsert_object_with_a_person_and_an_integer_type(outbox: Outbox) -> None:
    result = outbox.upsert_object("course-7", 2, traits={"title": "Stats"}, user_id="u1")
    assert stored(outbox, result) == expected(
        {"type": "group", "userId": "u1", "groupId": "course-7",
         "traits": {"title": "Stats", "object_type_id": "2"}}, result)


def test_upsert_object_type_argument_wins_over_a_trait(outbox: Outbox) -> None:
    result = outbox.upsert_object("acme", "3", traits={"object_type_id": "9"}, user_id="u1")
    assert stored(outbox, result)["traits"] == {"object_type_id": "3"}


def test_relate_is_a_group_call_with_the_person(outbox: Outbox) -> None:
    result = outbox.relate("u1", "acme", run="rel")
    assert stored(outbox, result) == expected(
        {"type": "group", "userId": "u1", "groupId": "acme",
         "traits": {"object_type_id": "1"}}, result)


def test_relate_needs_a_person(outbox: Outbox) -> None:
    with pytest.raises(MessageError) as caught:
        outbox.relate(None, "acme")  # type: ignore[arg-type]
    assert caught.value.field == "userId"
    assert total(outbox) == 0


def test_delete_object_sends_integer_type_and_the_object_anonymous_id(outbox: Outbox) -> None:
    result = outbox.delete_object("acme", "2")
    assert stored(outbox, result) == expected(
        {"type": "track", "anonymousId": "object:2:acme", "event": "Object Deleted",
         "properties": {"objectId": "acme", "objectTypeId": 2}}, result)


def test_upsert_and_delete_of_one_object_share_an_ordering_key(outbox: Outbox) -> None:
    upsert = outbox.upsert_object("acme", 2, traits={"name": "Acme"})
    delete = outbox.delete_object("acme", "2")
    rows = {row["message_id"]: row for row in outbox.rows()}
    assert rows[upsert.message_id]["person"] == rows[delete.message_id]["person"]


def test_unrelate_sends_relationship_deleted(outbox: Outbox) -> None:
    result = outbox.unrelate("u1", "acme", 3)
    assert stored(outbox, result) == expected(
        {"type": "track", "userId": "u1", "event": "Relationship Deleted",
         "properties": {"objectId": "acme", "objectTypeId": 3}}, result)


@pytest.mark.parametrize("bad", ["abc", "0", "-1", 0, 1.5, True, "", "1.0"])
def test_object_type_ids_must_be_positive_integers(outbox: Outbox, bad: Any) -> None:
    with pytest.raises(MessageError) as caught:
        outbox.upsert_object("acme", bad)
    assert caught.value.field == "traits.object_type_id"
    with pytest.raises(MessageError) as caught:
        outbox.delete_object("acme", bad)
    assert caught.value.field == "properties.objectTypeId"
    with pytest.raises(MessageError):
        outbox.unrelate("u1", "acme", bad)
    assert total(outbox) == 0


def test_object_ids_must_not_be_empty(outbox: Outbox) -> None:
    for call in (lambda: outbox.upsert_object(" "), lambda: outbox.delete_object(""),
                 lambda: outbox.relate("u1", ""), lambda: outbox.unrelate("u1", None)):
        with pytest.raises(MessageError):
            call()  # type: ignore[no-untyped-call]
    assert total(outbox) == 0


# -- the basic calls and regions ---------------------------------------------------------


def test_alias_payload(outbox: Outbox) -> None:
    result = outbox.alias("u1", "anon-1")
    assert stored(outbox, result) == expected(
        {"type": "alias", "userId": "u1", "previousId": "anon-1"}, result)


def test_worker_targets_regions_by_name_and_any_host_by_url(outbox: Outbox) -> None:
    for region in ("us", "eu"):
        worker = outbox.worker(key="sk_" + region + "_abc", region=region)
        assert worker.client.target.base_url == REGION_HOSTS[region]
        worker.client.close()
    worker = outbox.worker(key="legacy-site:key", host="https://cdp.example.test")
    assert worker.client.target.base_url == "https://cdp.example.test"
    worker.client.close()


def test_every_public_call_has_a_docstring_with_an_example() -> None:
    public = [*operations.CALLS, "enqueue", "enqueue_many", "enqueue_rows", "semantic_events"]
    assert {"track_semantic", "delete_person", "suppress_person", "unsuppress_person",
            "add_device", "delete_device", "upsert_object", "relate", "delete_object",
            "unrelate", "enqueue_rows", "semantic_events"} <= set(public)
    for name in public:
        doc = inspect.getdoc(getattr(Outbox, name)) or ""
        assert ">>> outbox." in doc, f"{name} has no example in its docstring"


def test_plain_track_named_like_a_semantic_event_is_checked_too(outbox) -> None:  # type: ignore[no-untyped-def]
    from cio_outbox import MessageError

    with pytest.raises(MessageError) as caught:
        outbox.track("u1", "Device Created or Updated", properties={"x": 1})
    assert caught.value.field == "context.device.token"
    with pytest.raises(MessageError):
        outbox.enqueue({"type": "track", "userId": "u1", "event": "Device Deleted"})
    assert outbox.status()["total"] == 0
    outbox.track("u1", "Some Custom Event", properties={"x": 1})
    assert outbox.status()["pending"] == 1


def test_every_operation_is_a_plain_function_and_an_outbox_method_of_the_same_signature(
) -> None:
    for name in operations.CALLS:
        function = getattr(operations, name)
        assert inspect.isfunction(function)
        call = inspect.signature(function).parameters
        method = dict(inspect.signature(getattr(Outbox, name)).parameters)
        assert method.pop("self") and method.pop("run")
        assert list(method) == list(call), name
    assert operations.track("u1", "Paid", idempotency_key="k") == {
        "type": "track", "userId": "u1", "event": "Paid", "messageId": message_id_for("k")}
