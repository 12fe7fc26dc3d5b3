"""The semantic event catalogue: agreement with our document and with Customer.io's."""

from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter
from typing import Any

import pytest
import upstream

from cio_outbox.semantic import (
    CATEGORIES,
    SEMANTIC_EVENTS,
    SemanticEvent,
    check_semantic,
    lookup,
)
from cio_outbox.spec import load_spec

UPSTREAM_PATH = upstream.upstream_path()
needs_upstream = pytest.mark.skipif(
    upstream.upstream_path() is None, reason=upstream.MISSING_REASON
)

# ---------------------------------------------------------------------------------------------
# Reading Customer.io's published document (OpenAPI 3.0). Also used by tests/test_spec.py.
# ---------------------------------------------------------------------------------------------

DESTINATION_PREFIXES = ("amplitude_", "braze_", "mixpanel_", "etl_")
# Titled schemas that describe parts of a call, not events.
NOT_EVENTS = frozenset({"context_non_mobile", "context_mobile"})
# Untitled schemas named after the events they describe.
EVENT_KEY_PREFIXES = ("email_event_", "live_chat_", "video_", "experiment_", "products_")
# Schema titles that disagree with the document's own list of semantic event names (and with its
# section headings); we follow the list. test_title_corrections_are_grounded checks the list.
TITLE_CORRECTIONS = {
    "payment_info_entered": "Payment Info Entered",  # title: Payment Info Updated
    "product_removed_from_wishlist": "Product Removed from Wishlist",  # title: ... From ...
    "wishlist_product_added_to_cart": "Wishlist Product Added to Cart",  # title: Wishlisted Item
}
# Names in the list with no schema of their own (the group_deleted schema is "Object Deleted").
UNLISTED_IN_SCHEMAS = frozenset({"Group Deleted"})


@dataclasses.dataclass(frozen=True)
class UpstreamEvent:
    name: str
    key: str
    message_level: bool  # the schema describes the whole track message, not only properties
    top_required: frozenset[str]
    properties_required: frozenset[str]
    device_token_required: bool


def load_upstream() -> dict[str, Any]:
    assert UPSTREAM_PATH is not None
    return json.loads(UPSTREAM_PATH.read_text(encoding="utf-8"))


def _flat(node: Any, schemas: dict[str, Any]) -> dict[str, Any]:
    """Merge $ref and allOf into one object schema (properties and required only)."""
    if not isinstance(node, dict):
        return {}
    if "$ref" in node:
        return _flat(schemas[node["$ref"].rsplit("/", 1)[1]], schemas)
    out: dict[str, Any] = {"properties": {}, "required": set()}
    for part in [node, *(_flat(p, schemas) for p in node.get("allOf", ()))]:
        out["properties"].update(part.get("properties", {}))
        out["required"].update(part.get("required", ()))
    return out


def _branches(schema: dict[str, Any]) -> list[dict[str, Any]]:
    return schema.get("oneOf", [schema])


def _event_enum(schema: dict[str, Any], schemas: dict[str, Any]) -> str | None:
    for branch in _branches(schema):
        event = _flat(branch, schemas)["properties"].get("event", {})
        if len(event.get("enum", ())) == 1:
            return event["enum"][0]
    return None


def upstream_table_names(doc: dict[str, Any]) -> list[str]:
    """Event names from the document's table of all semantic event names."""
    names: list[str] = []
    for line in doc["info"]["description"].splitlines():
        if line.startswith("|") and "`" in line:
            names.extend(re.findall(r"`([^`]+)`", line))
    return names


def _is_event(key: str, schema: dict[str, Any], schemas: dict[str, Any]) -> bool:
    if key.startswith(DESTINATION_PREFIXES) or key in NOT_EVENTS or key == "live_chat_general":
        return False
    if _event_enum(schema, schemas) is not None or isinstance(schema.get("title"), str):
        return True
    return key.startswith(EVENT_KEY_PREFIXES)


def _name(key: str, schema: dict[str, Any], schemas: dict[str, Any], table: list[str]) -> str:
    enum = _event_enum(schema, schemas)
    if enum is not None:
        return enum
    if key in TITLE_CORRECTIONS:
        return TITLE_CORRECTIONS[key]
    if isinstance(schema.get("title"), str):
        return schema["title"]
    words = key.replace("email_event_", "email_").split("_")
    for name in table:
        if name.lower().split() == words:
            return name
    named = re.search(r"`([A-Z][A-Za-z ]+)`", schema.get("description", ""))
    if named:
        return named.group(1)
    return " ".join(w if w in ("as", "to", "from") else w.capitalize() for w in words)


def upstream_semantic_events(doc: dict[str, Any]) -> dict[str, UpstreamEvent]:
    schemas = doc["components"]["schemas"]
    table = upstream_table_names(doc)
    out: dict[str, UpstreamEvent] = {}
    for key, schema in schemas.items():
        if not _is_event(key, schema, schemas):
            continue
        flats = [_flat(b, schemas) for b in _branches(schema)]
        message_level = any({"event", "properties"} & set(f["properties"]) for f in flats)
        top: set[str] = set.intersection(*(f["required"] for f in flats))
        if message_level:
            props = [_flat(f["properties"].get("properties", {}), schemas) for f in flats]
            props_required = set.intersection(*(p["required"] for p in props))
            device = _flat(
                _flat(flats[0]["properties"].get("context", {}), schemas)["properties"]
                .get("device", {}), schemas)
            token = "context" in top and "token" in device["required"]
        else:
            props_required, top, token = top, set(), False
        name = _name(key, schema, schemas, table)
        assert name not in out, f"two upstream schemas named {name!r}"
        out[name] = UpstreamEvent(name, key, message_level, frozenset(top - {"event", "type"}),
                                  frozenset(props_required), token)
    return out


# ---------------------------------------------------------------------------------------------
# Catalogue against our document, both directions
# ---------------------------------------------------------------------------------------------


def _our_semantic_schemas() -> dict[str, tuple[str, dict[str, Any]]]:
    schemas = load_spec()["components"]["schemas"]
    return {s["x-cio-semantic-event"]: (key, s) for key, s in schemas.items()
            if "x-cio-semantic-event" in s}


def _own_part(schema: dict[str, Any]) -> dict[str, Any]:
    parts = [p for p in schema["allOf"] if "$ref" not in p]
    assert len(parts) == 1
    return parts[0]


def test_every_semantic_schema_in_our_document_is_in_the_catalogue() -> None:
    ours = _our_semantic_schemas()
    assert ours, "no x-cio-semantic-event schemas in our document"
    for name, (key, schema) in ours.items():
        event = SEMANTIC_EVENTS[name]
        own = _own_part(schema)
        assert schema["allOf"][0] == {"$ref": "#/components/schemas/track"}
        assert own["properties"]["event"] == {"const": name}
        assert schema["title"] == name
        assert event.schema_name == key
        assert event.category == schema["x-cio-category"]
        assert set(event.required_properties) == set(
            own["properties"]["properties"].get("required", ())
        )
        assert ("userId" in own["required"]) == (event.identity == "user")
        assert ("anonymousId" in own["required"]) == (event.identity == "anonymous")
        device = own["properties"].get("context", {}).get("properties", {}).get("device", {})
        assert ("token" in device.get("required", ())) == event.requires_device_token


def test_every_catalogue_entry_is_a_schema_in_our_document() -> None:
    schemas = load_spec()["components"]["schemas"]
    for name, event in SEMANTIC_EVENTS.items():
        assert event.name == name
        assert schemas[event.schema_name]["x-cio-semantic-event"] == name
    assert set(SEMANTIC_EVENTS) == set(_our_semantic_schemas())


def test_categories_and_counts() -> None:
    counts = Counter(e.category for e in SEMANTIC_EVENTS.values())
    assert set(counts) <= set(CATEGORIES)
    assert counts == {
        "ecommerce": 28, "video": 17, "mobile": 7, "email": 6, "live_chat": 4, "people": 3,
        "device": 2, "object": 2, "report": 2, "ab_test": 1,
    }


@pytest.mark.parametrize(
    ("name", "identity", "required", "token"),
    [
        ("Device Created or Updated", "user", (), True),
        ("Device Deleted", "user", (), True),
        ("User Deleted", "user", (), False),
        ("User Suppressed", "user", (), False),
        ("User Unsuppressed", "user", (), False),
        ("Object Deleted", "anonymous", (), False),
        ("Relationship Deleted", "user", ("objectId",), False),
        ("Email Bounced", "either", ("email_id",), False),
        ("Report Content Event", "either", ("activityType",), False),
        ("Order Completed", "either", (), False),
        ("Application Installed", "either", (), False),
    ],
)
def test_known_entries(name: str, identity: str, required: tuple[str, ...], token: bool) -> None:
    event = SEMANTIC_EVENTS[name]
    assert (event.identity, event.required_properties, event.requires_device_token) == (
        identity, required, token,
    )
    assert event.description


def test_semantic_event_is_frozen() -> None:
    event = SEMANTIC_EVENTS["Order Completed"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.name = "Other"  # type: ignore[misc]
    assert isinstance(event, SemanticEvent)


# ---------------------------------------------------------------------------------------------
# Catalogue against Customer.io's published document
# ---------------------------------------------------------------------------------------------


@needs_upstream
def test_title_corrections_are_grounded() -> None:
    doc = load_upstream()
    table = upstream_table_names(doc)
    description = doc["info"]["description"]
    schemas = doc["components"]["schemas"]
    for key, name in TITLE_CORRECTIONS.items():
        assert name in table, f"{name!r} is no longer in the upstream list of event names"
        assert f"### {name}" in description
        assert schemas[key]["title"] != name, f"upstream fixed the title of {key}: drop the fix"


@needs_upstream
def test_every_upstream_semantic_event_is_in_the_catalogue() -> None:
    upstream = upstream_semantic_events(load_upstream())
    assert len(upstream) >= 70
    missing = sorted(set(upstream) - set(SEMANTIC_EVENTS))
    assert not missing, f"upstream semantic events missing from the catalogue: {missing}"
    extra = sorted(set(SEMANTIC_EVENTS) - set(upstream))
    assert not extra, f"catalogue events with no upstream schema: {extra}"


@needs_upstream
def test_required_fields_match_upstream() -> None:
    schemas = load_spec()["components"]["schemas"]
    for name, up in upstream_semantic_events(load_upstream()).items():
        event = SEMANTIC_EVENTS[name]
        assert set(event.required_properties) == up.properties_required, name
        expected_identity = ("user" if "userId" in up.top_required
                             else "anonymous" if "anonymousId" in up.top_required else "either")
        assert event.identity == expected_identity, name
        assert event.requires_device_token == up.device_token_required, name
        own_required = set(_own_part(schemas[event.schema_name])["required"]) - {"event"}
        # We also require the properties object when a property inside it is required.
        implied = {"properties"} if up.properties_required else set()
        assert own_required == set(up.top_required) | implied, name


@needs_upstream
def test_every_name_in_the_upstream_list_is_in_the_catalogue() -> None:
    table = upstream_table_names(load_upstream())
    assert len(table) > 60
    ours = {n.lower() for n in SEMANTIC_EVENTS}
    missing = [n for n in table if n.lower() not in ours and n not in UNLISTED_IN_SCHEMAS]
    assert not missing
    # Only case differs for the listed spellings we do not use verbatim.
    not_verbatim = {n for n in table if n not in SEMANTIC_EVENTS} - UNLISTED_IN_SCHEMAS
    assert not_verbatim == {"Video Playback interrupted"}


# ---------------------------------------------------------------------------------------------
# lookup and check_semantic
# ---------------------------------------------------------------------------------------------


def test_lookup_exact_name() -> None:
    assert lookup("Order Completed") is SEMANTIC_EVENTS["Order Completed"]


@pytest.mark.parametrize(
    ("typo", "suggestion"),
    [("Order Complete", "Order Completed"), ("order completed", "Order Completed"),
     ("Device Created", "Device Created or Updated"), ("Email bounce", "Email Bounced")],
)
def test_lookup_unknown_name_lists_close_matches(typo: str, suggestion: str) -> None:
    with pytest.raises(KeyError) as info:
        lookup(typo)
    text = str(info.value)
    assert repr(typo) in text
    assert repr(suggestion) in text


def test_lookup_far_name_has_no_suggestion() -> None:
    with pytest.raises(KeyError) as info:
        lookup("zzzz qqqq")
    assert "did you mean" not in str(info.value)


def test_check_semantic_accepts_valid_calls() -> None:
    check_semantic("Order Completed", {"order_id": "o-1", "total": 10.5}, user_id="u-1")
    check_semantic("Email Bounced", {"email_id": "e-1"}, anonymous_id="a-1")
    check_semantic("Device Created or Updated", {}, user_id="u-1",
                   context={"device": {"token": "tok", "type": "ios"}})
    check_semantic("Object Deleted", {"objectId": "acme", "objectTypeId": 1},
                   anonymous_id="unused")
    check_semantic("Relationship Deleted", {"objectId": "acme"}, user_id="u-1")


def test_check_semantic_ignores_custom_events() -> None:
    check_semantic("Signed Up", {"anything": [1, 2]}, user_id="u-1")
    check_semantic("Signed Up", None)


@pytest.mark.parametrize(
    ("event", "properties", "kwargs", "expected"),
    [
        ("Email Bounced", {}, {"user_id": "u"}, "Email Bounced: properties.email_id is required"),
        ("Relationship Deleted", {"objectTypeId": 2}, {"user_id": "u"},
         "Relationship Deleted: properties.objectId is required"),
        ("Relationship Deleted", None, {"user_id": "u"},
         "Relationship Deleted: properties.objectId is required"),
        ("Email Opened", None, {"user_id": "u"}, "Email Opened: properties.email_id is required"),
        ("User Deleted", {}, {"anonymous_id": "a"}, "User Deleted: userId is required"),
        ("Object Deleted", {"objectId": "acme"}, {"user_id": "u"},
         "Object Deleted: anonymousId is required"),
        ("Device Deleted", {}, {"user_id": "u", "context": {"device": {}}},
         "Device Deleted: context.device.token is required"),
        ("Device Deleted", {}, {"user_id": "u"},
         "Device Deleted: context.device.token is required"),
        ("Device Created or Updated", {},
         {"user_id": "u", "context": {"device": {"token": "t", "type": "web"}}},
         "Device Created or Updated: context.device.type must be one of"),
        ("Order Completed", {"total": "ten"}, {"user_id": "u"},
         "Order Completed: properties.total must be a number, not string"),
        ("Order Completed", {}, {},
         "Order Completed: userId is required (or anonymousId or groupId)"),
        ("Video Playback Started", {"sound": 101}, {"user_id": "u"},
         "Video Playback Started: properties.sound must be at most 100"),
    ],
)
def test_check_semantic_names_event_and_field(
    event: str, properties: dict[str, Any] | None, kwargs: dict[str, Any], expected: str
) -> None:
    with pytest.raises(ValueError) as info:
        check_semantic(event, properties, **kwargs)
    text = str(info.value)
    assert text.startswith(expected), text
    assert f"({event} requires " in text


def test_check_semantic_says_what_is_required() -> None:
    with pytest.raises(ValueError) as info:
        check_semantic("Device Created or Updated", {}, anonymous_id="a")
    assert str(info.value) == (
        "Device Created or Updated: userId is required "
        "(Device Created or Updated requires userId, context.device.token)"
    )


def test_required_fields_summary() -> None:
    assert SEMANTIC_EVENTS["Email Bounced"].required_fields == (
        "userId or anonymousId", "properties.email_id",
    )
    assert SEMANTIC_EVENTS["Object Deleted"].required_fields == ("anonymousId",)
