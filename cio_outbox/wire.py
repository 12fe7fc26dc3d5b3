"""The wire form of a call, without the models: ids, times, the exact bytes sent, and the
document's rules.

Everything here works on plain dicts and imports no pydantic, so that a JSONL import whose
lines the compiled line check vouches for (:func:`cio_outbox.intake.line_row`) starts
without loading the models (pydantic is most of the package's import time).
:mod:`cio_outbox.messages` builds the models on these and re-exports every public name.
"""

from __future__ import annotations

import datetime as _dt
import itertools
import json
import math
import os
import random
import re
import secrets
import time
import uuid
from collections.abc import Iterator, Mapping
from decimal import Decimal
from typing import Any

import msgspec
import orjson

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

    Ids that grow with time keep inserts into the outbox's unique index near its end,
    which is much faster than the random positions of uuid4 at millions of rows. Within
    one millisecond the ids of this process still increase: the last 48 bits are a
    counter (RFC 9562's "monotonic random", method 2) that starts at a random point in
    each process, and the other 26 random bits are drawn once per millisecond. The
    random parts need uniqueness, not secrecy; the counter makes an id about 0.8 us
    cheaper than drawing and formatting 74 random bits per id (issue 16).
    """
    ms = time.time_ns() // 1_000_000
    at, head = _head
    if ms != at:
        head = _new_head(ms)
    return f"{head}{next(_counter):012x}"


_head: tuple[int, str] = (-1, "")


def _new_head(ms: int) -> str:
    """The first 24 characters of the ids of millisecond ``ms``: its time, the version,
    12 random bits, the variant and 14 more random bits."""
    global _head
    text = f"{ms << 16 | 0x7 << 12 | random.getrandbits(12):016x}"
    variant = f"{0b10 << 14 | random.getrandbits(14):04x}"
    head = f"{text[:8]}-{text[8:12]}-{text[12:]}-{variant}-"
    _head = (ms, head)  # one assignment: a thread reads the old pair or the new one
    return head


def _reseed() -> None:
    """A fresh counter (also in each forked child, which must not repeat its parent's)."""
    global _counter, _head
    # Below 2**47: the counter stays within its 48 bits for 2**47 ids.
    _counter = itertools.count(secrets.randbits(47))
    _head = (-1, "")


_counter: Iterator[int]
_reseed()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reseed)


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
