"""The catalogue of semantic events: track events whose name has a meaning to Customer.io.

The catalogue is read from our OpenAPI document (every component schema carrying an
``x-cio-semantic-event`` extension), so the two cannot drift apart. Each entry says which
identifier the event needs, which ``properties`` are required and whether it needs
``context.device.token``; ``check_semantic`` checks a would-be track call against it.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from cio_outbox.spec import check_call, load_spec, semantic_schema_names

__all__ = [
    "CATEGORIES",
    "SEMANTIC_EVENTS",
    "Identity",
    "SemanticEvent",
    "check_semantic",
    "lookup",
]

Identity = Literal["user", "anonymous", "either"]

CATEGORIES: tuple[str, ...] = (
    "ecommerce", "email", "mobile", "video", "live_chat", "people", "device", "object",
    "report", "ab_test",
)


@dataclass(frozen=True, slots=True)
class SemanticEvent:
    """One semantic event, as our OpenAPI document defines it."""

    name: str
    category: str
    schema_name: str
    required_properties: tuple[str, ...]
    identity: Identity
    requires_device_token: bool
    description: str

    @property
    def required_fields(self) -> tuple[str, ...]:
        """Every field path the event needs besides ``event`` itself."""
        ids = {"user": ("userId",), "anonymous": ("anonymousId",),
               "either": ("userId or anonymousId",)}[self.identity]
        token = ("context.device.token",) if self.requires_device_token else ()
        return (*ids, *(f"properties.{p}" for p in self.required_properties), *token)


def _event_part(schema: Mapping[str, Any]) -> Mapping[str, Any]:
    """The event's own constraints: the allOf part that is not the $ref to track."""
    for part in schema.get("allOf", ()):
        if "$ref" not in part:
            return part
    raise ValueError(f"semantic schema {schema.get('title')!r} has no constraints of its own")


def _from_schema(schema_name: str, schema: Mapping[str, Any]) -> SemanticEvent:
    own = _event_part(schema)
    required = set(own.get("required", ()))
    props = own.get("properties", {})
    identity: Identity = (
        "user" if "userId" in required else "anonymous" if "anonymousId" in required
        else "either"
    )
    device = props.get("context", {}).get("properties", {}).get("device", {})
    return SemanticEvent(
        name=schema["x-cio-semantic-event"],
        category=schema["x-cio-category"],
        schema_name=schema_name,
        required_properties=tuple(props.get("properties", {}).get("required", ())),
        identity=identity,
        requires_device_token="context" in required and "token" in device.get("required", ()),
        description=schema.get("description", ""),
    )


def _build() -> dict[str, SemanticEvent]:
    schemas = load_spec()["components"]["schemas"]
    return {
        name: _from_schema(schema_name, schemas[schema_name])
        for name, schema_name in semantic_schema_names().items()
    }


SEMANTIC_EVENTS: dict[str, SemanticEvent] = _build()


def lookup(name: str) -> SemanticEvent:
    """The semantic event with exactly this name; KeyError naming close matches otherwise."""
    try:
        return SEMANTIC_EVENTS[name]
    except KeyError:
        pass
    by_lower = {known.lower(): known for known in SEMANTIC_EVENTS}
    close = difflib.get_close_matches(name.lower(), list(by_lower), n=3, cutoff=0.6)
    suggestions = [by_lower[c] for c in close]
    hint = f"; did you mean {', '.join(repr(s) for s in suggestions)}?" if suggestions else ""
    raise KeyError(f"{name!r} is not a semantic event (names are case-sensitive){hint}")


def check_semantic(
    event: str,
    properties: Mapping[str, Any] | None,
    *,
    user_id: str | None = None,
    anonymous_id: str | None = None,
    context: Mapping[str, Any] | None = None,
) -> None:
    """Raise ValueError if a track call for this semantic event would break its schema.

    The text names the event, the offending field and what the event requires, e.g.
    "Email Bounced: properties.email_id is required (Email Bounced requires userId or
    anonymousId, properties.email_id)". Events that are not semantic events are custom
    events, which the API accepts with any properties: nothing is checked for them.
    """
    if event not in SEMANTIC_EVENTS:
        return
    message: dict[str, Any] = {"type": "track", "event": event}
    if user_id is not None:
        message["userId"] = user_id
    if anonymous_id is not None:
        message["anonymousId"] = anonymous_id
    if properties is not None:
        message["properties"] = dict(properties) if isinstance(properties, Mapping) else properties
    if context is not None:
        message["context"] = dict(context) if isinstance(context, Mapping) else context
    violations = check_call("track", message)
    if not violations:
        return
    found = violations[0]
    needs = ", ".join(SEMANTIC_EVENTS[event].required_fields)
    raise ValueError(f"{found.message} ({event} requires {needs})")
