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

import datetime as _dt
import json
import math
import random
import re
import time
import uuid
from collections.abc import Mapping
from decimal import Decimal
from typing import Any, ClassVar, Literal

import msgspec
import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    field_validator,
    model_validator,
)

from cio_outbox import spec
from cio_outbox._version import __version__
from cio_outbox.errors import CioOutboxError

MAX_MESSAGE_BYTES = 32_768
BATCHABLE = frozenset({"identify", "track", "page", "screen", "group"})
CALL_TYPES = (*sorted(BATCHABLE), "alias")
LIBRARY = {"name": "cio-outbox", "version": __version__}

# messageIds derived from idempotency keys live in their own UUID namespace, so the
# same key always gives the same id and cannot collide with random uuid4 ids.
IDEMPOTENCY_NAMESPACE = uuid.UUID("6f1c3f55-8a52-4c1e-9c55-2f7d8f4c0b11")


class MessageError(CioOutboxError, ValueError):
    """A message cannot be sent as it is. ``field`` names the offending field."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


def new_message_id() -> str:
    """A fresh messageId: a UUID version 7 (time-ordered, RFC 9562).

    Ids that grow with time keep inserts into the outbox's unique index near its
    end, which is much faster than the random positions of uuid4 at millions of rows.
    The random part needs uniqueness, not secrecy: ``random`` (reseeded in every forked
    child) avoids a system call per id.
    """
    value = (
        (time.time_ns() // 1_000_000) << 80
        | 0x7 << 76
        | random.getrandbits(80) & _RANDOM_BITS
        | 0b10 << 62
    )
    text = f"{value:032x}"
    return "-".join((text[:8], text[8:12], text[12:16], text[16:20], text[20:]))


# The 74 random bits of a UUIDv7: 12 after the version nibble, 62 after the variant.
_RANDOM_BITS = (0xFFF << 64) | ((1 << 62) - 1)


def message_id_for(idempotency_key: str) -> str:
    """The stable messageId for an idempotency key: the same key gives the same id."""
    return str(uuid.uuid5(IDEMPOTENCY_NAMESPACE, idempotency_key))


def format_timestamp(value: _dt.datetime) -> str:
    """ISO-8601 UTC with milliseconds; naive datetimes are taken as UTC."""
    value = value.replace(tzinfo=_dt.UTC) if value.tzinfo is None else value.astimezone(_dt.UTC)
    # Formatted by hand: strftime("%Y") does not pad years before 1000 to four digits.
    return (
        f"{value.year:04d}-{value.month:02d}-{value.day:02d}T{value.hour:02d}:"
        f"{value.minute:02d}:{value.second:02d}.{value.microsecond // 1000:03d}Z"
    )


def _json_default(value: Any) -> Any:
    if isinstance(value, _dt.datetime):
        return format_timestamp(value)
    if isinstance(value, _dt.date):
        return value.isoformat()
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise ValueError("Decimal value is not finite")
        return float(value)
    if isinstance(value, uuid.UUID):
        return str(value)
    if type(value).__module__ == "numpy":
        if type(value).__name__ == "datetime64":
            # .item() of a nanosecond datetime64 is an int; go through microseconds.
            as_datetime = value.astype("datetime64[us]").item()
            if as_datetime is None:
                raise ValueError("datetime64 value is NaT")
            return _json_default(as_datetime)
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _find_bad_value(value: Any, path: str) -> tuple[str, str] | None:
    """Slow path, only after a failed dump: find where and why a value cannot be JSON."""
    if isinstance(value, Mapping):
        for key, inner in value.items():
            if not isinstance(key, str):
                return path, f"has a non-string key {key!r}"
            found = _find_bad_value(inner, f"{path}.{key}" if path else key)
            if found:
                return found
        return None
    if isinstance(value, (list, tuple)):
        for index, inner in enumerate(value):
            found = _find_bad_value(inner, f"{path}[{index}]")
            if found:
                return found
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return path, f"is {value}, which JSON cannot carry"
    if isinstance(value, (set, frozenset)):
        return path, "is a set; JSON has no sets (convert it to a sorted list)"
    if isinstance(value, (bytes, bytearray, memoryview)):
        return path, "is bytes; decode it to a string first"
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            str(value)
        except ValueError:
            return path, "is an integer too large to write as JSON"
        return None
    if value is None or isinstance(value, (str, bool, float)):
        return None
    try:
        _json_default(value)
    except (TypeError, ValueError, OverflowError) as exc:
        return path, f"cannot be sent as JSON ({exc})"
    return None


def _find_unencodable(value: Any, path: str) -> str | None:
    """Where a string (or key) that UTF-8 cannot encode sits, for the error message."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or None
        return None
    if isinstance(value, Mapping):
        for key, inner in value.items():
            inner_path = f"{path}.{key}" if path else str(key)
            if isinstance(key, str) and _find_unencodable(key, "x"):
                return path or "message"
            found = _find_unencodable(inner, inner_path)
            if found:
                return found
    elif isinstance(value, (list, tuple)):
        for index, inner in enumerate(value):
            found = _find_unencodable(inner, f"{path}[{index}]")
            if found:
                return found
    return None


# One encoder for every message: json.dumps with options builds a new one per call.
_ENCODER = json.JSONEncoder(
    default=_json_default,
    allow_nan=False,
    ensure_ascii=False,
    separators=(",", ":"),
    check_circular=False,
)


def dumps(wire: dict[str, Any]) -> str:
    """Compact JSON for one message, or a :class:`MessageError` naming the field."""
    try:
        return _ENCODER.encode(wire)
    except (TypeError, ValueError, OverflowError, RecursionError) as exc:
        found = _find_bad_value(wire, "") if not isinstance(exc, RecursionError) else None
        if found:
            field, reason = found
            raise MessageError(f"{field} {reason}", field=field) from None
        raise MessageError(f"message cannot be written as JSON: {exc}") from None


# orjson writes the common case ten times faster than json; datetimes go through
# _json_default so they keep our millisecond form, dataclasses so they are refused as before.
_ORJSON_OPTIONS = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS
_orjson_dumps = orjson.dumps
_decode_json = msgspec.json.Decoder().decode


def json_form(data: bytes) -> Any:
    """Encoded JSON decoded again, as the API will see it. msgspec, not orjson: orjson reads
    integers beyond 64 bits as floats; json when msgspec cannot (a number out of range)."""
    try:
        return _decode_json(data)
    except (msgspec.DecodeError, RecursionError):
        return json.loads(data)


def encode_wire(wire: dict[str, Any], *, fallback: bool = True) -> bytes:
    """The exact bytes sent for one message (compact UTF-8 JSON), checked against 32 KB.

    Raises :class:`MessageError` naming the field for values JSON cannot carry, text that
    is not valid Unicode, and messages over :data:`MAX_MESSAGE_BYTES`. With
    ``fallback=False`` what orjson refuses raises TypeError instead of going to json.
    """
    try:
        data = _orjson_dumps(wire, default=_json_default, option=_ORJSON_OPTIONS)
    except TypeError:
        if not fallback:
            raise
        # What orjson refuses but json writes (integers over 64 bits, non-string keys in
        # nested objects) or refuses with a better message: the standard library decides.
        data = _encode_slowly(wire)
    else:
        # orjson writes NaN and infinities as null; only then is a scan worth its cost.
        if b"null" in data:
            bad = _find_bad_value(wire, "")
            if bad:
                raise MessageError(f"{bad[0]} {bad[1]}", field=bad[0])
            found = _find_non_finite(wire, "")
            if found:
                raise MessageError(f"{found} is not a finite number, which JSON cannot carry",
                                   field=found)
    if len(data) > MAX_MESSAGE_BYTES:
        raise MessageError(
            f"message {wire.get('messageId')} is {len(data)} bytes, over the limit of "
            f"{MAX_MESSAGE_BYTES} bytes per call",
            field="message",
        )
    return data


def _encode_slowly(wire: dict[str, Any]) -> bytes:
    text = dumps(wire)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        field = _find_unencodable(wire, "")
        raise MessageError(
            f"{field or 'message'} holds text that is not valid Unicode (a lone surrogate, "
            "as left by decoding broken UTF-8 with surrogateescape)",
            field=field,
        ) from None


def _find_non_finite(value: Any, path: str) -> str | None:
    if isinstance(value, float):
        return None if math.isfinite(value) else (path or "message")
    if isinstance(value, Mapping):
        for key, inner in value.items():
            found = _find_non_finite(inner, f"{path}.{key}" if path else str(key))
            if found:
                return found
    elif isinstance(value, (list, tuple)):
        for index, inner in enumerate(value):
            found = _find_non_finite(inner, f"{path}[{index}]")
            if found:
                return found
    elif type(value).__module__ == "numpy" or isinstance(value, Decimal):
        try:
            return None if math.isfinite(float(value)) else (path or "message")
        except (TypeError, ValueError):
            return None
    return None


def _check_id(value: Any, name: str) -> str | None:
    # null and "" mean "no such id": the SDKs send null for the id they were not given, and
    # exports from RudderStack carry "" for visitors never identified.
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"{name} must be a string (got {type(value).__name__})")
    text = str(value)
    if not text.strip():
        raise ValueError(f"{name} must not be blank (it holds only whitespace)")
    return text


def _parse_timestamp(value: Any) -> str | None:
    try:
        return _timestamp_text(value)
    except OverflowError:
        raise ValueError(f"timestamp {value!r} is out of range in UTC") from None


_CANONICAL_TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def _timestamp_text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str) and _CANONICAL_TIMESTAMP.fullmatch(value):
        # Already in the form we write (exports often are): check the calendar, keep it.
        _dt.datetime.fromisoformat(value[:-1])
        return value
    if isinstance(value, _dt.datetime):
        return format_timestamp(value)
    if isinstance(value, _dt.date):
        return format_timestamp(_dt.datetime(value.year, value.month, value.day))
    if isinstance(value, str):
        text = value.strip()
        try:
            parsed = _dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"timestamp {value!r} is not ISO-8601") from None
        return format_timestamp(parsed)
    raise ValueError(
        f"timestamp must be a datetime or ISO-8601 string (got {type(value).__name__})"
    )


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


def check_rules(wire: Mapping[str, Any]) -> None:
    """Raise :class:`MessageError` when wire JSON breaks our document's rules.

    The one rule set: enqueue applies it (through :meth:`Message.encode`) and so does the
    sandbox (through :func:`validate_wire`).
    """
    call_type = wire.get("type")
    found = spec.check_call(str(call_type), wire)
    if not found:
        return
    text = found[0].message
    event = wire.get("event") if call_type == "track" else None
    if isinstance(event, str) and event in spec.semantic_schema_names():
        from cio_outbox.semantic import SEMANTIC_EVENTS

        text += f" ({event} requires {', '.join(SEMANTIC_EVENTS[event].required_fields)})"
    raise MessageError(text, field=found[0].field or None)


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
