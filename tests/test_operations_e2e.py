"""Every operation end to end: enqueue, drain through the worker into the sandbox, and compare
what the sandbox received with the exact wire JSON. Every semantic event of the catalogue is
also checked against our document and, when it is at hand, Customer.io's published one.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import upstream

from cio_outbox import Outbox
from cio_outbox.outbox import EnqueueResult
from cio_outbox.sandbox import Sandbox
from cio_outbox.semantic import SEMANTIC_EVENTS, SemanticEvent
from cio_outbox.spec import check_call, resolved_schema

REPO = Path(__file__).resolve().parents[1]
UPSTREAM = upstream.upstream_path()


def drain(outbox: Outbox, sandbox: Sandbox) -> dict[str, Any]:
    result = outbox.drain(host=sandbox.url, key=sandbox.key, progress=False, timeout=60)
    assert result["failed"] == 0, outbox.failed()
    assert outbox.status()["pending"] == 0
    return result


def unstamped(message: dict[str, Any]) -> dict[str, Any]:
    """The message without the timestamp enqueue stamped on it (every message has one)."""
    stamp = dt.datetime.fromisoformat(message["timestamp"].replace("Z", "+00:00"))
    if abs((dt.datetime.now(dt.UTC) - stamp).total_seconds()) < 600:
        message = {k: v for k, v in message.items() if k != "timestamp"}
    return message


def received(sandbox: Sandbox, message_id: str | None) -> dict[str, Any]:
    """What the sandbox stored for one message, without what the sandbox or the sender added
    (``_sandbox``, ``sentAt``) and without our ``context.library``."""
    assert message_id is not None
    found = sandbox.messages(messageId=message_id)
    assert len(found) == 1, f"sandbox holds {len(found)} messages with id {message_id}"
    message = {k: v for k, v in found[0].items() if k not in ("_sandbox", "sentAt")}
    message = unstamped(message)
    context = dict(message.get("context") or {})
    assert context.pop("library")["name"] == "cio-outbox"
    if context:
        message["context"] = context
    else:
        message.pop("context", None)
    return message


# -- every operation ---------------------------------------------------------------------

Case = tuple[Callable[[Outbox], EnqueueResult], dict[str, Any], str]

CASES: dict[str, Case] = {
    "identify user": (
        lambda o: o.identify("u1", traits={"email": "ada@example.com", "plan": "pro"},
                             timestamp="2024-05-01T12:00:00Z"),
        {"type": "identify", "userId": "u1", "timestamp": "2024-05-01T12:00:00.000Z",
         "traits": {"email": "ada@example.com", "plan": "pro"}}, "batch"),
    "identify anonymous": (
        lambda o: o.identify(anonymous_id="anon-1", traits={"plan": "free"}),
        {"type": "identify", "anonymousId": "anon-1", "traits": {"plan": "free"}}, "batch"),
    "identify both ids": (
        lambda o: o.identify("u1", anonymous_id="anon-1"),
        {"type": "identify", "userId": "u1", "anonymousId": "anon-1"}, "batch"),
    "track": (
        lambda o: o.track("u1", "Signed Up", properties={"plan": "pro"}),
        {"type": "track", "userId": "u1", "event": "Signed Up",
         "properties": {"plan": "pro"}}, "batch"),
    "page": (
        lambda o: o.page("u1", "Pricing", properties={"url": "https://example.com/p"}),
        {"type": "page", "userId": "u1", "name": "Pricing",
         "properties": {"url": "https://example.com/p"}}, "batch"),
    "screen": (
        lambda o: o.screen(anonymous_id="a1", name="Settings"),
        {"type": "screen", "anonymousId": "a1", "name": "Settings"}, "batch"),
    "group": (
        lambda o: o.group("u1", "acme", traits={"object_type_id": "1", "name": "Acme"}),
        {"type": "group", "userId": "u1", "groupId": "acme",
         "traits": {"object_type_id": "1", "name": "Acme"}}, "batch"),
    "alias": (
        lambda o: o.alias("u1", "anon-1"),
        {"type": "alias", "userId": "u1", "previousId": "anon-1"}, "alias"),
    "delete_person": (
        lambda o: o.delete_person("u1"),
        {"type": "track", "userId": "u1", "event": "User Deleted"}, "batch"),
    "suppress_person": (
        lambda o: o.suppress_person("u1"),
        {"type": "track", "userId": "u1", "event": "User Suppressed"}, "batch"),
    "unsuppress_person": (
        lambda o: o.unsuppress_person("u1"),
        {"type": "track", "userId": "u1", "event": "User Unsuppressed"}, "batch"),
    "track_semantic": (
        lambda o: o.track_semantic("Email Opened", "u1", properties={"email_id": "e-9"}),
        {"type": "track", "userId": "u1", "event": "Email Opened",
         "properties": {"email_id": "e-9"}}, "batch"),
    "add_device": (
        lambda o: o.add_device("u1", "tok-1", device_type="ios",
                               attributes={"app_version": "2.4.0"}),
        {"type": "track", "userId": "u1", "event": "Device Created or Updated",
         "properties": {"app_version": "2.4.0"},
         "context": {"device": {"token": "tok-1", "type": "ios"}}}, "batch"),
    "delete_device": (
        lambda o: o.delete_device("u1", "tok-1", device_type="android"),
        {"type": "track", "userId": "u1", "event": "Device Deleted",
         "context": {"device": {"token": "tok-1", "type": "android"}}}, "batch"),
    "upsert_object without a person": (
        lambda o: o.upsert_object("acme", traits={"name": "Acme"}),
        {"type": "group", "anonymousId": "object:1:acme", "groupId": "acme",
         "traits": {"name": "Acme", "object_type_id": "1"}}, "batch"),
    "upsert_object with a person": (
        lambda o: o.upsert_object("course-7", 2, traits={"title": "Stats"}, user_id="u1"),
        {"type": "group", "userId": "u1", "groupId": "course-7",
         "traits": {"title": "Stats", "object_type_id": "2"}}, "batch"),
    "relate": (
        lambda o: o.relate("u1", "acme"),
        {"type": "group", "userId": "u1", "groupId": "acme",
         "traits": {"object_type_id": "1"}}, "batch"),
    "delete_object": (
        lambda o: o.delete_object("acme", "2"),
        {"type": "track", "anonymousId": "object:2:acme", "event": "Object Deleted",
         "properties": {"objectId": "acme", "objectTypeId": 2}}, "batch"),
    "unrelate": (
        lambda o: o.unrelate("u1", "acme"),
        {"type": "track", "userId": "u1", "event": "Relationship Deleted",
         "properties": {"objectId": "acme", "objectTypeId": 1}}, "batch"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_operation_reaches_the_api_as_documented(outbox: Outbox, sandbox: Sandbox,
                                                 case: str) -> None:
    call, wire, endpoint = CASES[case]
    result = call(outbox)
    assert result.added == 1
    assert drain(outbox, sandbox)["sent"] == 1
    assert received(sandbox, result.message_id) == {**wire, "messageId": result.message_id}
    [stored] = sandbox.messages(messageId=result.message_id)
    assert stored["_sandbox"]["endpoint"] == endpoint


def test_enqueue_rows_reach_the_api_as_documented(outbox: Outbox, sandbox: Sandbox) -> None:
    people = [{"id": "u1", "email": "a@example.com", "plan": None},
              {"id": None, "email": "lost@example.com"},
              {"id": "u3", "email": "c@example.com", "plan": "pro"}]
    orders = [{"customer": "u1", "total": 42.5, "at": "2024-05-01T12:00:00Z"}]
    first = outbox.enqueue_rows(people, run="people")
    assert (first.added, [r.index for r in first.rejected]) == (2, [1])
    outbox.enqueue_rows(orders, call_type="track", event="Order Placed", user_id="customer",
                        timestamp="at", run="orders")
    assert drain(outbox, sandbox)["sent"] == 3
    got = [unstamped({k: v for k, v in m.items() if k not in ("_sandbox", "messageId",
                                                              "context", "sentAt")})
           for m in sandbox.messages()]
    assert got == [
        {"type": "identify", "userId": "u1", "traits": {"email": "a@example.com"}},
        {"type": "identify", "userId": "u3", "traits": {"email": "c@example.com",
                                                        "plan": "pro"}},
        {"type": "track", "userId": "u1", "event": "Order Placed",
         "properties": {"total": 42.5}, "timestamp": "2024-05-01T12:00:00.000Z"},
    ]
    # A rerun of the same rows adds nothing and sends nothing.
    assert outbox.enqueue_rows(people, run="people").added == 0
    assert drain(outbox, sandbox)["sent"] == 0
    assert len(sandbox.messages()) == 3


# -- every semantic event ----------------------------------------------------------------


def _sample(schema: dict[str, Any]) -> Any:
    if "enum" in schema:
        return schema["enum"][0]
    if "const" in schema:
        return schema["const"]
    kind = schema.get("type")
    kind = kind[0] if isinstance(kind, list) else kind
    return {"string": "x-1", "integer": 1, "number": 1.5, "boolean": True, "array": [],
            "object": {}}.get(kind, "x-1")


def _own_part(event: SemanticEvent) -> dict[str, Any]:
    parts = resolved_schema(event.schema_name)["allOf"]
    return next(p for p in parts
                if p.get("properties", {}).get("event", {}).get("const") == event.name)


def semantic_call(event: SemanticEvent) -> dict[str, Any]:
    """Arguments for track_semantic with the least the event needs: its id, its required
    properties (a value of the documented type) and a device token where needed."""
    part = _own_part(event)
    own = part.get("properties", {})
    declared = own.get("properties", {}).get("properties", {})
    kwargs: dict[str, Any] = {}
    if event.identity == "anonymous":
        kwargs["anonymous_id"] = "anon-1"
    else:
        kwargs["user_id"] = "u1"
    if event.required_properties or "properties" in part.get("required", ()):
        # "Object Deleted" requires a properties object even with nothing required in it.
        kwargs["properties"] = {p: _sample(declared.get(p, {}))
                                for p in event.required_properties}
    if event.requires_device_token:
        kwargs["context"] = {"device": {"token": "tok-1"}}
    return kwargs


def sent_payload(outbox: Outbox, event: SemanticEvent) -> dict[str, Any]:
    kwargs = semantic_call(event)
    result = outbox.track_semantic(event.name, kwargs.pop("user_id", None), **kwargs)
    row = outbox.storage.message(result.message_id or "")
    assert row is not None
    return json.loads(row["payload"])


@pytest.mark.parametrize("name", list(SEMANTIC_EVENTS))
def test_semantic_event_with_its_required_fields_matches_our_document(
    outbox: Outbox, name: str,
) -> None:
    event = SEMANTIC_EVENTS[name]
    payload = sent_payload(outbox, event)
    assert payload["event"] == name
    assert check_call("track", payload) == []
    for prop in event.required_properties:  # and each one is really required
        broken = {**payload, "properties": {k: v for k, v in payload["properties"].items()
                                            if k != prop}}
        assert [v.field for v in check_call("track", broken)] == [f"properties.{prop}"]


def test_every_semantic_event_drains_into_the_sandbox(outbox: Outbox,
                                                      sandbox: Sandbox) -> None:
    for event in SEMANTIC_EVENTS.values():
        kwargs = semantic_call(event)
        outbox.track_semantic(event.name, kwargs.pop("user_id", None), run="catalogue",
                              **kwargs)
    assert drain(outbox, sandbox)["sent"] == len(SEMANTIC_EVENTS)
    assert sorted(m["event"] for m in sandbox.messages()) == sorted(SEMANTIC_EVENTS)


# Customer.io's document (OpenAPI 3.0) describes the same calls with oneOf branches that
# overlap: "Known User" and "Anonymous User" both match a message carrying both ids, the
# "Non-mobile" and "Mobile" context shapes share every optional field, and the group branches
# require nothing. Strict oneOf would reject every valid message, so its oneOf is read as
# anyOf; the branch for the message's own identity is then checked on its own as well.


@cache
def _upstream() -> tuple[dict[str, Any], Any]:
    if UPSTREAM is None:
        pytest.skip(upstream.MISSING_REASON)
    jsonschema = pytest.importorskip("jsonschema")
    referencing = pytest.importorskip("referencing")
    from referencing.jsonschema import DRAFT7

    document = json.loads(UPSTREAM.read_text(encoding="utf-8"))
    registry = referencing.Registry().with_resource(
        "urn:upstream", referencing.Resource(contents=document, specification=DRAFT7))
    lenient = jsonschema.validators.extend(
        jsonschema.Draft7Validator,
        {"oneOf": jsonschema.Draft7Validator.VALIDATORS["anyOf"]},
    )
    return document, lambda schema: lenient(schema, registry=registry)


def _upstream_errors(schema: dict[str, Any], instance: Any) -> list[str]:
    _, validator = _upstream()
    return [f"{'.'.join(map(str, e.absolute_path)) or '(message)'}: {e.message[:200]}"
            for e in validator(schema).iter_errors(instance)]


def _event_names_in(node: Any) -> set[str]:
    found: set[str] = set()
    if isinstance(node, dict):
        event = node.get("properties", {}).get("event") if isinstance(
            node.get("properties"), dict) else None
        if isinstance(event, dict):
            found.update(v for v in event.get("enum", ()) if isinstance(v, str))
        for value in node.values():
            found |= _event_names_in(value)
    elif isinstance(node, list):
        for value in node:
            found |= _event_names_in(value)
    return found


def upstream_schema_of(name: str) -> tuple[str, str]:
    """(component name, "call" or "properties") of an event in Customer.io's document.

    Events with their own call schema name themselves in an ``event`` enum; the others are
    documented as a schema of their properties (ecommerce, video, live chat, A/B tests) or
    of their properties and context (email), named after the event.
    """
    document, _ = _upstream()
    schemas = document["components"]["schemas"]
    calls = [n for n, s in schemas.items() if name in _event_names_in(s)]
    if calls:
        assert len(calls) == 1, f"{name} has several call schemas upstream: {calls}"
        return calls[0], "call"
    snake = re.sub(r"\W+", "_", name.lower()).strip("_")
    for candidate in (snake, "email_event_" + snake.removeprefix("email_")):
        if candidate in schemas:
            own = schemas[candidate].get("properties", {})
            partial_call = "properties" in own or "context" in own
            return candidate, "call" if partial_call else "properties"
    raise AssertionError(f"no schema for {name!r} in Customer.io's document")


@pytest.mark.parametrize("name", list(SEMANTIC_EVENTS))
def test_semantic_event_with_its_required_fields_matches_customerios_document(
    outbox: Outbox, name: str,
) -> None:
    document, _ = _upstream()
    event = SEMANTIC_EVENTS[name]
    payload = sent_payload(outbox, event)
    ref = "urn:upstream#/components/schemas/"
    assert _upstream_errors({"$ref": ref + "track"}, payload) == []
    branch = "Known User" if "userId" in payload else "Anonymous User"
    branches = {b.get("title"): b for b in document["components"]["schemas"]["track"]["oneOf"]}
    assert _upstream_errors(branches[branch], payload) == []
    schema_name, kind = upstream_schema_of(name)
    instance = payload if kind == "call" else payload.get("properties", {})
    assert _upstream_errors({"$ref": ref + schema_name}, instance) == []


def test_upstream_check_would_catch_a_wrong_payload() -> None:
    _upstream()
    ref = "urn:upstream#/components/schemas/"
    # objectTypeId is an integer upstream; a missing userId breaks "Relationship Deleted".
    wrong_type = {"type": "track", "userId": "u1", "event": "Relationship Deleted",
                  "properties": {"objectId": "acme", "objectTypeId": "1"}}
    assert _upstream_errors({"$ref": ref + "relationship_deleted"}, wrong_type)
    no_user = {"type": "track", "anonymousId": "a", "event": "Relationship Deleted",
               "properties": {"objectId": "acme"}}
    assert _upstream_errors({"$ref": ref + "relationship_deleted"}, no_user)
    no_token = {"type": "track", "userId": "u1", "event": "Device Deleted", "context": {}}
    assert _upstream_errors({"$ref": ref + "delete_device"}, no_token)
    assert upstream_schema_of("Email Link Clicked") == ("email_event_link_clicked", "call")
    assert upstream_schema_of("Product Viewed") == ("product_viewed", "properties")
    assert upstream_schema_of("Object Deleted") == ("group_deleted", "call")


@pytest.mark.parametrize("case", ["upsert_object without a person", "relate", "identify both ids",
                                  "add_device", "delete_object", "unrelate"])
def test_operation_payloads_match_customerios_document(outbox: Outbox, case: str) -> None:
    _upstream()
    call, _, _ = CASES[case]
    result = call(outbox)
    row = outbox.storage.message(result.message_id or "")
    assert row is not None
    payload = json.loads(row["payload"])
    schema = payload["type"]
    assert _upstream_errors({"$ref": f"urn:upstream#/components/schemas/{schema}"},
                            payload) == []
