"""Validated Pipelines API messages: the six call types and their exact wire JSON.

Nothing reaches the outbox without passing through :func:`build`. It checks the
ids and required fields with pydantic, converts values JSON cannot carry
natively, and measures the serialized size against the 32 KB per call limit.

Value conversions (documented in README "Messages"):

- ``datetime``: ISO-8601 in UTC with milliseconds and ``Z``. A naive datetime
  (no tzinfo) is taken to be UTC, because exports from databases usually hold UTC.
- ``date``: ``YYYY-MM-DD``.
- ``Decimal``: a JSON number (float), refused when NaN or infinite.
- ``UUID``: its string form. Tuples become lists. numpy scalars become Python numbers.
- Refused with an error naming the field: sets, bytes, NaN, infinities and any
  other object.
- ``userId``, ``anonymousId``, ``groupId``, ``previousId`` given as integers become
  strings. A ``null`` or empty id is absent (the SDKs send ``"userId": null`` on every call
  made with an anonymousId only); an id of only whitespace is refused.

Fields (README "Messages"): every field Customer.io's document names is accepted, and other
top-level fields pass through as they are, since the document does not forbid them. A
top-level ``null`` is the same as leaving the field out. Fields that describe a request
rather than a message (``writeKey``, ``sentAt``, ``receivedAt``, ``_metadata``, ``version``)
are dropped: the sender sets them when it sends, or the server when it receives.

One rule set: after the model, the wire JSON is checked against our OpenAPI document
(:mod:`cio_outbox.spec`) by :meth:`Message.encode`, so what enqueue accepts is exactly what
the sandbox accepts; the sandbox validates with :func:`validate_wire`, the same code.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    field_validator,
    model_validator,
)

from cio_outbox.wire import (
    BATCHABLE,
    CALL_TYPES,
    IDEMPOTENCY_NAMESPACE,
    LIBRARY,
    MAX_MESSAGE_BYTES,
    MessageError,
    _check_id,
    _parse_timestamp,
    check_rules,
    dumps,
    encode_wire,
    format_timestamp,
    json_form,
    message_id_for,
    new_message_id,
)

# The wire form's public names are re-exported: they were defined here before wire.py.
__all__ = [
    "BATCHABLE",
    "CALL_TYPES",
    "IDEMPOTENCY_NAMESPACE",
    "LIBRARY",
    "MAX_MESSAGE_BYTES",
    "MODELS",
    "TRANSPORT_FIELDS",
    "Alias",
    "CallType",
    "Group",
    "Identify",
    "Message",
    "MessageError",
    "Page",
    "Screen",
    "Track",
    "build",
    "check_rules",
    "dumps",
    "encode_wire",
    "format_timestamp",
    "from_wire",
    "json_form",
    "message_id_for",
    "new_message_id",
    "validate_wire",
]


class Message(BaseModel):
    """Fields every call shares. Field names are the wire names (camelCase)."""

    # Unknown top-level fields pass through (Customer.io's document does not forbid them).
    # The validators are built on first use: an import whose lines all pass the compiled
    # line check (intake.line_row) never needs them, and building them costs every start.
    model_config = ConfigDict(extra="allow", frozen=True, populate_by_name=True,
                              defer_build=True)
    call_type: ClassVar[str]

    messageId: str = Field(default_factory=new_message_id)
    userId: str | None = None
    anonymousId: str | None = None
    timestamp: str | None = None
    originalTimestamp: str | None = None
    context: dict[str, Any] | None = None
    integrations: dict[str, StrictBool] | None = None

    @field_validator("userId", "anonymousId", mode="before")
    @classmethod
    def _ids(cls, value: Any, info: Any) -> str | None:
        return _check_id(value, info.field_name)

    @field_validator("messageId", mode="before")
    @classmethod
    def _message_id(cls, value: Any) -> str:
        checked = _check_id(value, "messageId")
        if checked is None:  # null or "" is no id, as for userId: the call gets a new one
            return new_message_id()
        if len(checked) > 100:
            raise ValueError("messageId is longer than 100 characters")
        return checked

    @field_validator("timestamp", "originalTimestamp", mode="before")
    @classmethod
    def _timestamp(cls, value: Any) -> str | None:
        return _parse_timestamp(value)

    @model_validator(mode="after")
    def _someone(self) -> Message:
        if self.userId is None and self.anonymousId is None and not self._names_group():
            raise ValueError("userId or anonymousId is required")
        return self

    def _names_group(self) -> bool:
        """Whether a groupId may stand in for the person (a group's track)."""
        return False

    @property
    def person(self) -> str:
        """The id that orders this person's messages: userId, else anonymousId."""
        return self.userId or self.anonymousId or ""

    @property
    def endpoint(self) -> str:
        return "alias" if self.call_type == "alias" else "batch"

    def wire(self) -> dict[str, Any]:
        """The exact JSON object sent to the API (library context added unless set)."""
        data: dict[str, Any] = {"type": self.call_type}
        for name, value in self.__dict__.items():
            if value is not None:
                data[name] = value
        if self.__pydantic_extra__:
            for name, value in self.__pydantic_extra__.items():
                if value is not None:
                    data[name] = value
        context = data.get("context")
        if context is None:
            data["context"] = {"library": LIBRARY}
        elif "library" not in context:
            data["context"] = {**context, "library": LIBRARY}
        return data

    def to_json(self) -> str:
        """Compact wire JSON, checked against the 32 KB per call limit."""
        return self.encode()[0]

    def encode(self) -> tuple[str, int]:
        """Compact wire JSON and its size in bytes, checked against the rules and 32 KB."""
        data = encode_wire(self.wire())
        # Checked on the JSON form, as the API sees it: a datetime in traits is a string now.
        check_rules(json_form(data))
        return data.decode("utf-8"), len(data)


class Identify(Message):
    call_type: ClassVar[str] = "identify"
    traits: dict[str, Any] | None = None


class Track(Message):
    call_type: ClassVar[str] = "track"
    event: str
    properties: dict[str, Any] | None = None
    # Customer.io's third track shape: an event performed by a group (an object), which
    # may come without userId and anonymousId.
    groupId: str | None = None

    @field_validator("groupId", mode="before")
    @classmethod
    def _group_id(cls, value: Any) -> str | None:
        return _check_id(value, "groupId")

    def _names_group(self) -> bool:
        return self.groupId is not None

    @property
    def person(self) -> str:
        """userId, else anonymousId, else the groupId of a group's track."""
        return self.userId or self.anonymousId or self.groupId or ""

    @field_validator("event", mode="before")
    @classmethod
    def _event(cls, value: Any) -> str:
        if not isinstance(value, str) or not value.strip():
            raise ValueError("event must be a non-empty string")
        return value


class Page(Message):
    call_type: ClassVar[str] = "page"
    name: str | None = None
    category: str | None = None
    properties: dict[str, Any] | None = None


class Screen(Message):
    call_type: ClassVar[str] = "screen"
    name: str | None = None
    category: str | None = None
    properties: dict[str, Any] | None = None


class Group(Message):
    call_type: ClassVar[str] = "group"
    groupId: str
    traits: dict[str, Any] | None = None

    @field_validator("groupId", mode="before")
    @classmethod
    def _group_id(cls, value: Any) -> str:
        checked = _check_id(value, "groupId")
        if checked is None:
            raise ValueError("groupId is required")
        return checked


class Alias(Message):
    call_type: ClassVar[str] = "alias"
    userId: str  # type: ignore[assignment]
    previousId: str

    @field_validator("previousId", mode="before")
    @classmethod
    def _previous_id(cls, value: Any) -> str:
        checked = _check_id(value, "previousId")
        if checked is None:
            raise ValueError("previousId is required")
        return checked


MODELS: dict[str, type[Message]] = {
    model.call_type: model for model in (Identify, Track, Page, Screen, Group, Alias)
}


def _explain(call_type: str, exc: ValidationError) -> MessageError:
    first = exc.errors()[0]
    field = ".".join(str(part) for part in first["loc"]) or None
    if field is None and "userId or anonymousId" in first["msg"]:
        field = "userId"
    reason = first["msg"]
    if reason.startswith("Value error, "):
        reason = reason[len("Value error, ") :]
    if first["type"] == "missing":
        reason = "is required"
    if field and reason.startswith(field.split(".")[-1] + " "):
        reason = reason[len(field.split(".")[-1]) + 1 :]  # "userId must not be empty"
    text = f"{call_type}: {field} {reason}" if field else f"{call_type}: {reason}"
    if len(exc.errors()) > 1:
        text += f" (and {len(exc.errors()) - 1} more problem(s))"
    return MessageError(text, field=field)


def build(call_type: str, fields: Mapping[str, Any]) -> Message:
    """Validate one call given by its wire field names; raise :class:`MessageError`.

    The fields of a request rather than a message (``TRANSPORT_FIELDS``) are dropped.
    The rules of our document are applied when the message is encoded (:meth:`Message.encode`).
    """
    model = MODELS.get(call_type)
    if model is None:
        raise MessageError(
            f"type {call_type!r} is not one of: {', '.join(CALL_TYPES)}", field="type"
        )
    if "type" in fields or not TRANSPORT_FIELDS.isdisjoint(fields):
        if fields.get("type", call_type) != call_type:
            raise MessageError(f"{call_type}: type must be {call_type!r}, not "
                               f"{fields['type']!r}", field="type")
        fields = {k: v for k, v in fields.items()
                  if k != "type" and k not in TRANSPORT_FIELDS}
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        raise _explain(call_type, exc) from None


def validate_wire(data: Mapping[str, Any]) -> Message:
    """A message as it arrived in JSON, held to exactly the rules enqueue applies.

    Used by the sandbox, so that the two can never disagree. The size limit is the
    caller's to measure: it applies to the bytes that arrived.
    """
    message = from_wire(data)
    check_rules(message.wire())
    return message


def from_wire(data: Mapping[str, Any]) -> Message:
    """Build a message from its wire shape, ``{"type": "track", "userId": ..., ...}``."""
    if not isinstance(data, Mapping):
        raise MessageError("a call must be a JSON object", field="type")
    call_type = data.get("type")
    if not isinstance(call_type, str):
        raise MessageError("type is required (identify, track, page, screen, group or alias)",
                           field="type")
    return build(call_type, data)


#: Fields of a request, not of a message, dropped at enqueue. ``writeKey`` is the sender's
#: credential (Segment's library puts it in the body; ours sends it as a header only, so it
#: never reaches the outbox); ``sentAt`` is set by the worker on each request it sends;
#: ``receivedAt`` and ``version`` are set by the server (the document marks them read-only);
#: ``_metadata`` is a sending library's bookkeeping about its own bundling.
TRANSPORT_FIELDS = frozenset(("writeKey", "sentAt", "receivedAt", "version", "_metadata"))


CallType = Literal["identify", "track", "page", "screen", "group", "alias"]
