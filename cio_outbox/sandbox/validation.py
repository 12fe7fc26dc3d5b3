"""What the sandbox checks in a request: its body (gzip, JSON) and each message in it.

Each message is held to exactly the rules enqueue applies, by calling
:func:`cio_outbox.messages.validate_wire`: one rule set, so that a message the outbox
accepted is never refused by the sandbox, nor the reverse. The size limits are the
outbox's own (:data:`cio_outbox.messages.MAX_MESSAGE_BYTES`,
:data:`cio_outbox.batch.MAX_BATCH_BYTES`), measured on the bytes that arrived.
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Sequence
from typing import Any

from cio_outbox.batch import MAX_BATCH_BYTES
from cio_outbox.messages import validate_wire
from cio_outbox.wire import CALL_TYPES, MAX_MESSAGE_BYTES, MessageError

MESSAGE_LIMIT = MAX_MESSAGE_BYTES
"""Bytes per message, measured by :func:`message_size`."""
REQUEST_LIMIT = MAX_BATCH_BYTES
"""Bytes per request body, after decompression."""
GZIP_COUNT_CAP = 64 * 1024 * 1024
"""Decompressed bytes counted (never kept) to report the size of an oversized gzip body."""
MAX_LISTED_ERRORS = 1000
"""Errors listed in one answer at most; one more entry says how many were left out."""
SINGLE_ENDPOINTS = CALL_TYPES
# Customer.io's document lists identify, track, page, screen and group for /v1/batch, but
# its own Python library sends alias there too, and the service takes it: so does the
# sandbox. cio-outbox itself sends alias to /v1/alias.
BATCH_ITEM_TYPES = frozenset(CALL_TYPES)


class HttpError(Exception):
    """A refusal: the status and the problems, each as :func:`error` builds them."""

    def __init__(
        self,
        status: int,
        errors: list[dict[str, str]],
        headers: Sequence[tuple[str, str]] = (),
    ) -> None:
        super().__init__(status)
        self.status = status
        self.errors = errors
        self.headers = list(headers)


def error(field: str, reason: str, message: str) -> dict[str, str]:
    return {"field": field, "reason": reason, "message": message}


def _join(prefix: str, field: str | None) -> str:
    if not field:
        return prefix or "body"
    if not prefix:
        return field
    if field.startswith("["):
        return prefix + field
    return f"{prefix}.{field}"


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


COMPACT = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
# A JSON value whose text spans N characters re-serialises compactly to at most 28 * N UTF-8
# bytes: compacting only drops whitespace and shortens escapes, except that a number in
# exponent notation can grow by at most 24 characters ("1e15" -> "1000000000000000.0"), and a
# character takes at most 4 bytes. So a message spanning at most this many characters of the
# body cannot exceed MESSAGE_LIMIT and needs no exact measure.
SPAN_SURELY_SMALL = MESSAGE_LIMIT // 28
_DECODER = json.JSONDecoder(parse_constant=lambda name: _refuse_constant(name))
_WS = re.compile(r"[ \t\n\r]*")
_WS_CHARS = " \t\n\r"


def message_size(message: Any) -> int:
    """Size of one message as Customer.io measures it: compact UTF-8 JSON bytes."""
    return len(COMPACT(message).encode("utf-8", "surrogatepass"))


def parse_body(text: str) -> tuple[Any, list[tuple[int, int]] | None]:
    """``json.loads(text)``, and the ``(start, end)`` character span of each item of a
    top-level ``"batch"`` list (None when the body has no such list).

    The same single parse as ``json.loads`` (the C scanner for every value), walking only the
    top-level object and the batch array by hand to learn where each item starts and ends.
    """
    scan = json.scanner.make_scanner(_DECODER)
    ws = _WS.match
    idx = ws(text, 0).end()
    if text[idx:idx + 1] != "{":
        return _DECODER.decode(text), None
    doc: dict[str, Any] = {}
    spans: list[tuple[int, int]] | None = None
    idx = ws(text, idx + 1).end()
    try:
        if text[idx] == "}":
            idx += 1
        else:
            while True:
                if text[idx] != '"':
                    raise json.JSONDecodeError("Expecting property name enclosed in double "
                                               "quotes", text, idx)
                key, idx = json.decoder.scanstring(text, idx + 1)
                idx = ws(text, idx).end()
                if text[idx] != ":":
                    raise json.JSONDecodeError("Expecting ':' delimiter", text, idx)
                idx = ws(text, idx + 1).end()
                if key == "batch" and text[idx] == "[":
                    items: list[Any] = []
                    spans = []
                    idx = ws(text, idx + 1).end()
                    if text[idx] == "]":
                        idx += 1
                    else:
                        append_item = items.append
                        append_span = spans.append
                        while True:  # per item: the hot loop, hence the whitespace fast path
                            start = idx
                            item, idx = scan(text, idx)
                            append_item(item)
                            append_span((start, idx))
                            char = text[idx]
                            if char in _WS_CHARS:
                                idx = ws(text, idx).end()
                                char = text[idx]
                            if char == ",":
                                idx += 1
                                if text[idx] in _WS_CHARS:
                                    idx = ws(text, idx).end()
                                continue
                            if char == "]":
                                idx += 1
                                break
                            raise json.JSONDecodeError("Expecting ',' delimiter", text, idx)
                    doc[key] = items
                else:
                    spans = None if key == "batch" else spans
                    doc[key], idx = scan(text, idx)
                idx = ws(text, idx).end()
                if text[idx] == "}":
                    idx += 1
                    break
                if text[idx] != ",":
                    raise json.JSONDecodeError("Expecting ',' delimiter", text, idx)
                idx = ws(text, idx + 1).end()
    except StopIteration as exc:
        raise json.JSONDecodeError("Expecting value", text, exc.value) from None
    except IndexError:
        raise json.JSONDecodeError("Unexpected end of body", text, len(text)) from None
    idx = ws(text, idx).end()
    if idx != len(text):
        raise json.JSONDecodeError("Extra data", text, idx)
    return doc, spans




def gunzip(raw: bytes, limit: int) -> bytes:
    """Decompress gzip members, keeping at most ``limit + 1`` bytes in memory."""
    parts: list[bytes] = []
    total = 0
    data = raw
    try:
        while True:
            dec = zlib.decompressobj(16 + zlib.MAX_WBITS)
            pending = data
            while not dec.eof:
                chunk = dec.decompress(pending, limit + 1 - total)
                pending = dec.unconsumed_tail
                total += len(chunk)
                if total > limit:
                    size, exact = _count_rest(dec, pending, total)
                    shown = f"{size}" if exact else f"more than {size}"
                    raise HttpError(413, [error(
                        "body", "too_large",
                        f"request body is {shown} bytes after decompression; "
                        f"the limit is {limit} bytes",
                    )])
                parts.append(chunk)
                if not chunk and not pending:
                    raise HttpError(400, [error(
                        "body", "invalid_gzip", "gzip body is truncated")])
            data = dec.unused_data
            if not data:
                break
    except zlib.error as exc:
        raise HttpError(
            400, [error("body", "invalid_gzip", f"invalid gzip body: {exc}")]
        ) from None
    return b"".join(parts)


def _count_rest(dec: Any, pending: bytes, total: int) -> tuple[int, bool]:
    while not dec.eof and total <= GZIP_COUNT_CAP:
        chunk = dec.decompress(pending, 1 << 20)
        pending = dec.unconsumed_tail
        total += len(chunk)
        if not chunk and not pending:
            break
    return total, dec.eof and not dec.unused_data


def validate_items(
    endpoint: str, items: list[Any], spans: list[int], reject_events: frozenset[str]
) -> tuple[list[dict[str, str]], int]:
    """Every problem of every item, and how many items have one; the sandbox's hot path."""
    batch = endpoint == "batch"
    errors: list[dict[str, str]] = []
    invalid = 0
    for i, msg in enumerate(items):
        prefix = f"batch[{i}]" if batch else ""
        found: list[dict[str, str]] = []
        if not isinstance(msg, dict):
            errors.append(error(prefix or "body", "invalid_type",
                                "a message must be a JSON object"))
            invalid += 1
            continue
        if spans[i] > SPAN_SURELY_SMALL:
            size = message_size(msg)
            if size > MESSAGE_LIMIT:
                found.append(error(
                    prefix or "body", "too_large",
                    f"message is {size} bytes; the limit is {MESSAGE_LIMIT} bytes",
                ))
        call_type = msg.get("type")
        if batch:
            if call_type not in BATCH_ITEM_TYPES:
                found.append(error(f"{prefix}.type", "required" if call_type is None
                                   else "invalid",
                                   "type must be one of " + ", ".join(CALL_TYPES)))
                call_type = None
        elif call_type is None:
            msg["type"] = call_type = endpoint
        elif call_type != endpoint:
            found.append(error(
                "type", "mismatch", f"type must be absent or {endpoint!r} on /v1/{endpoint}"))
            call_type = None
        if call_type is not None:
            try:
                validate_wire(msg)
            except MessageError as exc:
                found.append(error(_join(prefix, exc.field), "invalid", str(exc)))
            if reject_events and call_type == "track":
                event = msg.get("event")
                if isinstance(event, str) and event in reject_events:
                    found.append(error(
                        _join(prefix, "event"), f"rejected_event: {event}",
                        f"event {event!r} is rejected by this sandbox (reject_events)",
                    ))
        if found:
            invalid += 1
            errors.extend(found)
    if len(errors) > MAX_LISTED_ERRORS:
        left = len(errors) - MAX_LISTED_ERRORS
        errors = errors[:MAX_LISTED_ERRORS]
        errors.append(error("batch" if batch else "body", "too_many_errors",
                            f"{left} more errors not listed"))
    return errors, invalid
