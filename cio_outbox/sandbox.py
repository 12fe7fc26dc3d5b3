"""A local stand-in for Customer.io's Data Pipelines API.

The sandbox speaks the same HTTP API as Customer.io (``POST /v1/identify``, ``/v1/track``,
``/v1/page``, ``/v1/screen``, ``/v1/group``, ``/v1/alias`` and ``/v1/batch``), checks
authentication, body and message size limits and every message against
:func:`cio_outbox.spec.check_call`, stores what it accepts in memory, and can inject faults
(random 5xx answers, rate limiting, latency, poison events). Tests, notebooks and benchmarks
inspect it over ``/sandbox/*`` or through :class:`Sandbox` / :class:`SandboxProcess`.

Faults, in the order a request meets them: 404 for an unknown endpoint, 401 for bad
credentials, 429 from the ``rate_limit`` token bucket, an injected 429 with probability
``throttle_rate``, an injected 500/502/503 with probability ``fail_rate``, 413/415 for the
body, 400 for JSON or any invalid message (``reject_events`` included). ``latency`` delays
every API request before all of these. Nothing from a request that is not answered 200 is
stored.

Stored messages are the messages as sent (with ``type`` filled in when the endpoint implied
it and ``messageId`` assigned when missing) plus one ``_sandbox`` key holding
``{"seq", "endpoint", "sentAt", "receivedAt"}``: the global sequence number (from 1, reset
by :meth:`Sandbox.reset`), the endpoint name (``"batch"``, ``"track"``, ...), the request's
``sentAt`` (``None`` when absent) and the time the sandbox received it.

The configured key never appears in a log line, a repr, an exception or an answer.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import contextlib
import dataclasses
import hmac
import importlib
import ipaddress
import itertools
import json
import logging
import math
import os
import random
import re
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import parse_qsl

import click

if TYPE_CHECKING:
    import requests

__all__ = [
    "BATCH_TYPES",
    "DEFAULT_KEY",
    "MESSAGE_LIMIT",
    "REQUEST_LIMIT",
    "SINGLE_ENDPOINTS",
    "Sandbox",
    "SandboxProcess",
    "Violation",
    "message_size",
    "resolve_check_call",
    "sandbox_command",
]

logger = logging.getLogger(__name__)

DEFAULT_KEY = "sandbox-key"
MESSAGE_LIMIT = 32_768
"""Bytes per message, measured by :func:`message_size`."""
REQUEST_LIMIT = 500_000
"""Bytes per request body, after decompression."""
RAW_BODY_CAP = 4 * 1024 * 1024
"""Bytes read from the socket at most; a longer body is answered 413 and the connection closed."""
GZIP_COUNT_CAP = 64 * 1024 * 1024
"""Decompressed bytes counted (never kept) to report the size of an oversized gzip body."""
MAX_LISTED_ERRORS = 1000
"""Errors listed in one answer at most; one more entry says how many were left out."""

SINGLE_ENDPOINTS = ("identify", "track", "page", "screen", "group", "alias")
BATCH_TYPES = frozenset({"identify", "track", "page", "screen", "group"})
MESSAGE_FILTERS = frozenset({"userId", "anonymousId", "event", "type", "messageId", "endpoint"})
_QUERY_PARAMS = MESSAGE_FILTERS | {"limit", "after"}
_CONFIG_FIELDS = frozenset(
    {"fail_rate", "throttle_rate", "rate_limit", "latency", "reject_events", "seed"}
)
_INJECTED_STATUSES = (500, 502, 503)
_PREFIXED_KEY = re.compile(r"^(?:pk|sk)_(?:us|eu)_")
_COMPACT = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
# A JSON value whose text spans N characters re-serialises compactly to at most 28 * N UTF-8
# bytes: compacting only drops whitespace and shortens escapes, except that a number in
# exponent notation can grow by at most 24 characters ("1e15" -> "1000000000000000.0"), and a
# character takes at most 4 bytes. So a message spanning at most this many characters of the
# body cannot exceed MESSAGE_LIMIT and needs no exact measure.
_SPAN_SURELY_SMALL = MESSAGE_LIMIT // 28
_DECODER = json.JSONDecoder(parse_constant=lambda name: _refuse_constant(name))
_WS = re.compile(r"[ \t\n\r]*")
_WS_CHARS = " \t\n\r"


def message_size(message: Any) -> int:
    """Size of one message as Customer.io measures it: compact UTF-8 JSON bytes."""
    return len(_COMPACT(message).encode("utf-8", "surrogatepass"))


def _parse_body(text: str) -> tuple[Any, list[tuple[int, int]] | None]:
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


# ---------------------------------------------------------------- validation


class Violation(NamedTuple):
    """One problem with a message; the same shape as ``cio_outbox.spec.SpecViolation``."""

    field: str
    reason: str
    message: str


CheckCall = Callable[[str, Any], Sequence[Any]]


def _fallback_check_call(call_type: str, message: Mapping[str, Any]) -> list[Violation]:
    """Required fields only; used while ``cio_outbox.spec`` does not exist."""

    def missing(name: str) -> bool:
        return message.get(name) in (None, "")

    found: list[Violation] = []
    if call_type == "alias":
        for name in ("userId", "previousId"):
            if missing(name):
                found.append(Violation(name, "required", f"alias requires {name}"))
        return found
    if missing("userId") and missing("anonymousId"):
        found.append(
            Violation("userId", "required", f"{call_type} requires userId or anonymousId")
        )
    if call_type == "track" and missing("event"):
        found.append(Violation("event", "required", "track requires event"))
    if call_type == "group" and missing("groupId"):
        found.append(Violation("groupId", "required", "group requires groupId"))
    return found


def resolve_check_call() -> tuple[CheckCall, str]:
    """The message validator and where it comes from.

    ``cio_outbox.spec.check_call`` when that module exists (``"cio_outbox.spec"``), else
    a required-fields check (``"fallback"``). A spec module that exists but fails to import
    raises: only its absence falls back.
    """
    try:
        spec = importlib.import_module("cio_outbox.spec")
    except ModuleNotFoundError as exc:
        if exc.name != "cio_outbox.spec":
            raise
        return _fallback_check_call, "fallback"
    return spec.check_call, "cio_outbox.spec"


def _join(prefix: str, field: str | None) -> str:
    if not field:
        return prefix or "body"
    if not prefix:
        return field
    if field.startswith("["):
        return prefix + field
    return f"{prefix}.{field}"


def _error(field: str, reason: str, message: str) -> dict[str, str]:
    return {"field": field, "reason": reason, "message": message}


class _HttpError(Exception):
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


def _is_loopback(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# ---------------------------------------------------------------- gzip


def _gunzip(raw: bytes, limit: int) -> bytes:
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
                    raise _HttpError(413, [_error(
                        "body", "too_large",
                        f"request body is {shown} bytes after decompression; "
                        f"the limit is {limit} bytes",
                    )])
                parts.append(chunk)
                if not chunk and not pending:
                    raise _HttpError(400, [_error(
                        "body", "invalid_gzip", "gzip body is truncated")])
            data = dec.unused_data
            if not data:
                break
    except zlib.error as exc:
        raise _HttpError(
            400, [_error("body", "invalid_gzip", f"invalid gzip body: {exc}")]
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


# ---------------------------------------------------------------- state


@dataclasses.dataclass(frozen=True)
class _Config:
    fail_rate: float = 0.0
    rate_limit: float | None = None
    latency: float = 0.0
    reject_events: frozenset[str] = frozenset()
    throttle_rate: float = 0.0

    def public(self) -> dict[str, Any]:
        return {
            "fail_rate": self.fail_rate,
            "throttle_rate": self.throttle_rate,
            "rate_limit": self.rate_limit,
            "latency": self.latency,
            "reject_events": sorted(self.reject_events),
        }


def _number(name: str, value: Any, *, low: float, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number")
    if not low <= value <= high or math.isnan(value):
        raise ValueError(f"{name} must be between {low} and {high}")
    return float(value)


def _build_config(base: _Config, changes: Mapping[str, Any]) -> _Config:
    unknown = set(changes) - _CONFIG_FIELDS
    if unknown:
        raise ValueError(
            f"unknown config fields: {sorted(unknown)}; known: {sorted(_CONFIG_FIELDS)}"
        )
    fields: dict[str, Any] = {}
    if "fail_rate" in changes:
        fields["fail_rate"] = _number("fail_rate", changes["fail_rate"], low=0.0, high=1.0)
    if "throttle_rate" in changes:
        fields["throttle_rate"] = _number("throttle_rate", changes["throttle_rate"],
                                          low=0.0, high=1.0)
    if "rate_limit" in changes:
        rate = changes["rate_limit"]
        if rate is not None:
            rate = _number("rate_limit", rate, low=0.0)
            if rate <= 0:
                raise ValueError("rate_limit must be positive or None")
        fields["rate_limit"] = rate
    if "latency" in changes:
        fields["latency"] = _number("latency", changes["latency"], low=0.0)
    if "reject_events" in changes:
        events = changes["reject_events"]
        if isinstance(events, str) or not isinstance(events, Iterable):
            raise ValueError("reject_events must be a list of event names")
        names = list(events)
        if not all(isinstance(n, str) for n in names):
            raise ValueError("reject_events must be a list of event names")
        fields["reject_events"] = frozenset(names)
    if "seed" in changes and changes["seed"] is not None and (
        isinstance(changes["seed"], bool) or not isinstance(changes["seed"], int)
    ):
        raise ValueError("seed must be an integer or None")
    return dataclasses.replace(base, **fields)


class _Response(NamedTuple):
    status: int
    body: bytes
    headers: list[tuple[str, str]]


def _json_response(status: int, payload: Any, headers: Sequence[tuple[str, str]] = ()) -> _Response:
    return _Response(status, json.dumps(payload).encode(), list(headers))


def _errors_response(exc: _HttpError) -> _Response:
    return _json_response(exc.status, {"meta": {"errors": exc.errors}}, exc.headers)


class _Body(NamedTuple):
    data: bytes
    size: int
    complete: bool


class _State:
    """Config, stored messages and stats of one sandbox; thread safe."""

    def __init__(
        self,
        key: str,
        config: _Config,
        seed: int | None,
    ) -> None:
        if not isinstance(key, str) or not key:
            raise ValueError("key must be a non-empty string")
        self._key = key.encode()
        self._bearer = bool(_PREFIXED_KEY.match(key))
        self._lock = threading.Lock()
        self._config = config
        self._seed = seed
        self._rng = random.Random(seed)
        self._check_call, self.validator = resolve_check_call()
        self._clear()

    # -- stats and storage (callers hold no lock; these take it) --

    def _clear(self) -> None:
        # Stored messages, one chunk (a tuple of records) per accepted request, so the GC
        # walks one list entry per request rather than per message; _starts[i] is the seq of
        # the first record of _chunks[i].
        self._chunks: list[tuple[_Record, ...]] = []
        self._starts: list[int] = []
        self._stored = 0
        self._index: dict[str, int] = {}  # messageId (as text) -> seq
        self._requests = 0
        self._by_status: Counter[str] = Counter()
        self._by_endpoint: Counter[str] = Counter()
        self._auth: Counter[str] = Counter({"basic": 0, "bearer": 0})
        self._counts: Counter[str] = Counter()
        self._validation_seconds = 0.0
        self._reset_bucket()

    def _reset_bucket(self) -> None:
        rate = self._config.rate_limit
        self._tokens = max(1.0, rate) if rate is not None else 0.0
        self._bucket_at = time.monotonic()

    def reset(self) -> None:
        with self._lock:
            self._clear()
            if self._seed is not None:
                self._rng.seed(self._seed)

    def configure(self, changes: Mapping[str, Any]) -> dict[str, Any]:
        with self._lock:
            new = _build_config(self._config, changes)
            old_rate = self._config.rate_limit
            self._config = new
            if "rate_limit" in changes and new.rate_limit != old_rate:
                self._reset_bucket()
            if "seed" in changes:
                self._seed = changes["seed"]
                self._rng.seed(self._seed)
            return new.public()

    @property
    def config(self) -> _Config:
        return self._config

    def stats(self) -> dict[str, Any]:
        with self._lock:
            counts = self._counts
            return {
                "requests": self._requests,
                "by_status": dict(sorted(self._by_status.items())),
                "by_endpoint": dict(sorted(self._by_endpoint.items())),
                "messages": self._stored,
                "duplicates": counts["duplicates"],
                "rejected_messages": counts["rejected_messages"],
                "invalid_messages": counts["invalid_messages"],
                "injected_failures": counts["injected_failures"],
                "injected_throttles": counts["injected_throttles"],
                "rate_limited": counts["rate_limited"],
                "auth": dict(self._auth),
                "bytes_received": counts["bytes_received"],
                "bytes_decompressed": counts["bytes_decompressed"],
                "gzip_requests": counts["gzip_requests"],
                "validated_messages": counts["validated_messages"],
                "validation_seconds": self._validation_seconds,
                "validator": self.validator,
                "config": self._config.public(),
            }

    def query(self, params: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Stored messages matching the filters, as fresh dicts."""
        unknown = set(params) - _QUERY_PARAMS
        if unknown:
            raise ValueError(
                f"unknown filter(s) {sorted(unknown)}; known: {sorted(_QUERY_PARAMS)}"
            )
        limit = _int_param(params, "limit")
        after = _int_param(params, "after") or 0
        filters = {k: v for k, v in params.items() if k in MESSAGE_FILTERS}
        with self._lock:
            first_seq = after + 1
            if "messageId" in filters:
                seq = self._index.get(str(filters["messageId"]))
                if seq is None or seq < first_seq:
                    return []
                first_seq = seq
            position = max(0, bisect.bisect_right(self._starts, first_seq) - 1)
            chunks = self._chunks[position:]
            offset = first_seq - self._starts[position] if chunks else 0
        # Chunks and records are immutable tuples, so filter outside the lock.
        wanted = [(_RECORD_FIELD[k], str(v)) for k, v in filters.items()]
        out: list[dict[str, Any]] = []
        for chunk in chunks:
            for rec in itertools.islice(chunk, max(0, offset), None):
                if any(rec[i] != v for i, v in wanted):
                    continue
                out.append(_materialize(rec))
                if limit is not None and len(out) >= limit:
                    return out
            offset = 0
        return out

    # -- the API --

    def authenticate(self, header: str | None) -> tuple[str, bool, str]:
        """(scheme presented, accepted, what went wrong)."""
        if not header:
            return "none", False, "missing Authorization header"
        scheme, _, credentials = header.strip().partition(" ")
        scheme = scheme.lower()
        credentials = credentials.strip()
        if scheme == "basic":
            if self._bearer:
                return "basic", False, (
                    "this workspace key must be sent as 'Authorization: Bearer <key>'"
                )
            try:
                decoded = base64.b64decode(credentials, validate=True)
            except (binascii.Error, ValueError):
                return "basic", False, "malformed Basic credentials"
            user, sep, password = decoded.partition(b":")
            ok = hmac.compare_digest(user, self._key) and sep == b":" and password == b""
            return "basic", ok, "" if ok else (
                "invalid credentials: send the API key as the Basic username "
                "with an empty password"
            )
        if scheme == "bearer":
            if not self._bearer:
                return "bearer", False, (
                    "this workspace key must be sent as HTTP Basic "
                    "(key as username, empty password)"
                )
            ok = hmac.compare_digest(credentials.encode(), self._key)
            return "bearer", ok, "" if ok else "invalid credentials"
        return "other", False, "unsupported authorization scheme"

    def handle(
        self,
        endpoint: str,
        body: _Body,
        authorization: str | None,
        content_encoding: str | None,
    ) -> _Response:
        """Answer one POST to ``/v1/<endpoint>``; counts it in the stats."""
        cfg = self._config
        known = endpoint == "batch" or endpoint in SINGLE_ENDPOINTS
        encoding = (content_encoding or "identity").strip().lower()
        gz = encoding in ("gzip", "x-gzip")
        scheme = "none"
        flags: Counter[str] = Counter()
        decompressed = 0
        try:
            if not known:
                raise _HttpError(404, [_error(
                    "path", "not_found",
                    f"unknown endpoint /v1/{endpoint}; known: /v1/batch, "
                    + ", ".join(f"/v1/{e}" for e in SINGLE_ENDPOINTS),
                )])
            scheme, ok, problem = self.authenticate(authorization)
            if not ok:
                challenge = 'Bearer realm="cio-outbox-sandbox"' if self._bearer else (
                    'Basic realm="cio-outbox-sandbox"')
                raise _HttpError(401, [_error("Authorization", "unauthorized", problem)],
                                 [("WWW-Authenticate", challenge)])
            retry_after = self._take_token(cfg)
            if retry_after is not None:
                flags["rate_limited"] = 1
                raise _HttpError(429, [_error(
                    "request", "rate_limited",
                    f"rate limit of {cfg.rate_limit:g} requests/s exceeded; "
                    f"retry after {retry_after} s",
                )], [("Retry-After", str(retry_after))])
            if self._injected_throttle(cfg):
                flags["injected_throttles"] = 1
                raise _HttpError(429, [_error(
                    "request", "throttled",
                    f"sandbox injected a 429 (throttle_rate={cfg.throttle_rate:g}); "
                    "retry after 1 s",
                )], [("Retry-After", "1")])
            injected = self._injected_failure(cfg)
            if injected is not None:
                flags["injected_failures"] = 1
                raise _HttpError(injected, [_error(
                    "request", "injected_failure",
                    f"sandbox injected a {injected} failure (fail_rate={cfg.fail_rate:g})",
                )])
            if not body.complete:
                raise _HttpError(413, [_error(
                    "body", "too_large",
                    f"request body is {'more than ' if body.size <= 0 else ''}"
                    f"{max(body.size, RAW_BODY_CAP)} bytes; the limit is {REQUEST_LIMIT} bytes",
                )])
            if gz:
                data = _gunzip(body.data, REQUEST_LIMIT)
            elif encoding == "identity":
                data = body.data
            else:
                raise _HttpError(415, [_error(
                    "Content-Encoding", "unsupported_encoding",
                    "only gzip and identity bodies are accepted",
                )])
            decompressed = len(data)
            if decompressed > REQUEST_LIMIT:
                raise _HttpError(413, [_error(
                    "body", "too_large",
                    f"request body is {decompressed} bytes; the limit is {REQUEST_LIMIT} bytes",
                )])
            response = self._accept(endpoint, data, cfg, flags)
        except _HttpError as exc:
            response = _errors_response(exc)
        except Exception:
            logger.exception("sandbox failed to handle a request to /v1/%s", endpoint)
            response = _json_response(500, {"meta": {"errors": [_error(
                "request", "internal_error", "the sandbox failed; see its log")]}})
        with self._lock:
            self._requests += 1
            self._by_status[str(response.status)] += 1
            self._by_endpoint[endpoint if known else "unknown"] += 1
            if scheme != "none":
                self._auth[scheme] += 1
            counts = self._counts
            counts["bytes_received"] += body.size if body.complete else 0
            counts["bytes_decompressed"] += decompressed
            if gz:
                counts["gzip_requests"] += 1
            counts.update(flags)
        return response

    def _take_token(self, cfg: _Config) -> int | None:
        rate = cfg.rate_limit
        if rate is None:
            return None
        burst = max(1.0, rate)
        with self._lock:
            now = time.monotonic()
            self._tokens = min(burst, self._tokens + (now - self._bucket_at) * rate)
            self._bucket_at = now
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return None
            return max(1, math.ceil((1.0 - self._tokens) / rate))

    def _injected_throttle(self, cfg: _Config) -> bool:
        if cfg.throttle_rate <= 0.0:
            return False  # no draw: seeded fail_rate sequences stay as without throttling
        with self._lock:
            return self._rng.random() < cfg.throttle_rate

    def _injected_failure(self, cfg: _Config) -> int | None:
        if cfg.fail_rate <= 0.0:
            return None
        with self._lock:
            if self._rng.random() < cfg.fail_rate:
                return self._rng.choice(_INJECTED_STATUSES)
        return None

    def _accept(self, endpoint: str, data: bytes, cfg: _Config, flags: Counter[str]) -> _Response:
        try:
            text = data.decode("utf-8")
            doc, spans = _parse_body(text)
        except (ValueError, RecursionError) as exc:
            raise _HttpError(
                400, [_error("body", "invalid_json", f"body is not JSON: {exc}")]
            ) from None
        batch = endpoint == "batch"
        if not isinstance(doc, dict):
            raise _HttpError(
                400, [_error("body", "invalid_type", "the body must be a JSON object")]
            )
        if batch:
            items = doc.get("batch")
            if not isinstance(items, list):
                raise _HttpError(400, [_error(
                    "batch", "required", "the body must have a 'batch' list of messages")])
            sent_at = doc.get("sentAt")
        else:
            items = [doc]
            spans = [(0, len(text))]
            sent_at = doc.get("sentAt")
        if spans is None or len(spans) != len(items):  # never expected: measure everything
            spans = [(0, MESSAGE_LIMIT)] * len(items)
            text = ""

        started = time.perf_counter()
        errors, invalid = self._validate(endpoint, items, [e - s for s, e in spans], cfg)
        elapsed = time.perf_counter() - started
        with self._lock:
            self._validation_seconds += elapsed
            self._counts["validated_messages"] += len(items)
        if errors:
            flags["rejected_messages"] += len(items)
            flags["invalid_messages"] += invalid
            raise _HttpError(400, errors)
        raws = [text[s:e] for s, e in spans] if text else [_COMPACT(m) for m in items]
        self._store(endpoint, items, raws, sent_at, flags)
        return _Response(200, b"{}", [])

    def _validate(
        self, endpoint: str, items: list[Any], spans: list[int], cfg: _Config
    ) -> tuple[list[dict[str, str]], int]:
        """Every problem of every item; the loop is the sandbox's hot path."""
        batch = endpoint == "batch"
        check_call = self._check_call
        reject = cfg.reject_events
        errors: list[dict[str, str]] = []
        invalid = 0
        for i, msg in enumerate(items):
            prefix = f"batch[{i}]" if batch else ""
            found: list[dict[str, str]] = []
            if not isinstance(msg, dict):
                errors.append(_error(prefix or "body", "invalid_type",
                                     "a message must be a JSON object"))
                invalid += 1
                continue
            if spans[i] > _SPAN_SURELY_SMALL:
                size = message_size(msg)
                if size > MESSAGE_LIMIT:
                    found.append(_error(
                        prefix or "body", "too_large",
                        f"message is {size} bytes; the limit is {MESSAGE_LIMIT} bytes",
                    ))
            call_type = msg.get("type")
            if batch:
                if call_type not in BATCH_TYPES:
                    found.append(_type_error(prefix, call_type))
                    call_type = None
            elif call_type is None:
                msg["type"] = call_type = endpoint
            elif call_type != endpoint:
                found.append(_error(
                    "type", "mismatch", f"type must be absent or {endpoint!r} on /v1/{endpoint}"))
                call_type = None
            if call_type is not None:
                for v in check_call(call_type, msg):
                    found.append(_error(_join(prefix, v.field), str(v.reason), str(v.message)))
                if reject and call_type == "track":
                    event = msg.get("event")
                    if isinstance(event, str) and event in reject:
                        found.append(_error(
                            _join(prefix, "event"), f"rejected_event: {event}",
                            f"event {event!r} is rejected by this sandbox (reject_events)",
                        ))
            if found:
                invalid += 1
                errors.extend(found)
        if len(errors) > MAX_LISTED_ERRORS:
            left = len(errors) - MAX_LISTED_ERRORS
            errors = errors[:MAX_LISTED_ERRORS]
            errors.append(_error("batch" if batch else "body", "too_many_errors",
                                 f"{left} more errors not listed"))
        return errors, invalid

    def _store(
        self,
        endpoint: str,
        items: list[dict[str, Any]],
        raws: list[str],
        sent_at: Any,
        flags: Counter[str],
    ) -> None:
        received_at = _now_iso()
        sent_at_json = json.dumps(sent_at)
        records: list[_Record] = []
        for msg, raw in zip(items, raws, strict=True):
            mid = msg.get("messageId")
            assigned = None
            if mid is None:
                mid = assigned = str(uuid.uuid4())
            records.append((
                0, endpoint, _text(msg.get("userId")), _text(msg.get("anonymousId")),
                _text(msg.get("event")), _text(msg.get("type")),
                mid if isinstance(mid, str) else json.dumps(mid), assigned, raw,
                sent_at_json, received_at,
            ))
        with self._lock:
            index = self._index
            first = seq = self._stored + 1
            chunk: list[_Record] = []
            for rec in records:
                key = rec[_MESSAGE_ID]
                if key in index:
                    continue
                index[key] = seq
                chunk.append((seq, *rec[1:]))
                seq += 1
            if chunk:
                self._chunks.append(tuple(chunk))
                self._starts.append(first)
                self._stored += len(chunk)
        flags["duplicates"] += len(records) - len(chunk)


def _type_error(prefix: str, call_type: Any) -> dict[str, str]:
    if call_type == "alias":
        return _error(f"{prefix}.type", "not_allowed_in_batch",
                      "alias is not accepted inside /v1/batch; send it to /v1/alias")
    return _error(f"{prefix}.type", "required" if call_type is None else "invalid",
                  "type must be one of " + ", ".join(sorted(BATCH_TYPES)))


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _int_param(params: Mapping[str, Any], name: str) -> int | None:
    if name not in params or params[name] is None:
        return None
    value = params[name]
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an integer") from None
    if isinstance(value, bool) or number < 0:
        raise ValueError(f"{name} must be a non-negative integer")
    return number


def _text(value: Any) -> str | None:
    return value if value is None or isinstance(value, str) else json.dumps(value)


# One stored message is a plain tuple of strings, ints and None, which the GC stops tracking
# (it untracks exact tuples only, not NamedTuple instances), so a sandbox holding millions of
# messages does not slow every collection down. Fields, by index:
_RECORD_FIELDS = (
    "seq",
    "endpoint",
    "userId",
    "anonymousId",
    "event",
    "type",
    "messageId",  # as text: the dedupe key
    "assigned_id",  # the messageId the sandbox assigned, if the message had none
    "raw",  # the message's JSON text as it arrived
    "sent_at_json",
    "received_at",
)
_MESSAGE_ID = 6
_Record = tuple[int, str, str | None, str | None, str | None, str | None, str, str | None,
                str, str, str]


def _materialize(rec: _Record) -> dict[str, Any]:
    seq, endpoint, _, _, _, call_type, _, assigned_id, raw, sent_at_json, received_at = rec
    msg = json.loads(raw)
    if assigned_id is not None:
        msg["messageId"] = assigned_id
    if "type" not in msg:
        msg["type"] = call_type
    msg["_sandbox"] = {"seq": seq, "endpoint": endpoint, "sentAt": json.loads(sent_at_json),
                       "receivedAt": received_at}
    return msg


_RECORD_FIELD = {name: _RECORD_FIELDS.index(name) for name in MESSAGE_FILTERS}


# ---------------------------------------------------------------- HTTP


class _Server(ThreadingHTTPServer):
    daemon_threads = False  # joined by server_close(): a stop leaves no thread behind
    block_on_close = True
    request_queue_size = 128
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], state: _State) -> None:
        self.state = state
        self._connections: set[socket.socket] = set()
        self._conn_lock = threading.Lock()
        self._closing = False
        super().__init__(address, _Handler)

    def track(self, conn: socket.socket) -> None:
        with self._conn_lock:
            if not self._closing:
                self._connections.add(conn)
                return
        _shutdown_socket(conn)

    def untrack(self, conn: socket.socket) -> None:
        with self._conn_lock:
            self._connections.discard(conn)

    def close_connections(self) -> None:
        """Wake handler threads blocked on idle keep-alive connections so they can end."""
        with self._conn_lock:
            self._closing = True
            conns = list(self._connections)
        for conn in conns:
            _shutdown_socket(conn)

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):
            logger.debug("sandbox connection error from %s: %r", client_address, exc)
            return
        logger.exception("sandbox error handling a request from %s", client_address)


class _Server6(_Server):
    address_family = socket.AF_INET6


def _shutdown_socket(conn: socket.socket) -> None:
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "cio-outbox-sandbox"
    disable_nagle_algorithm = True
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.untrack(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("sandbox %s: %s", self.address_string(), format % args)

    # -- reading and writing --

    def _read_body(self) -> _Body:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked()
        length_header = self.headers.get("Content-Length")
        if length_header is None:
            return _Body(b"", 0, True)
        try:
            length = int(length_header)
            if length < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            raise _HttpError(400, [_error(
                "Content-Length", "invalid", "Content-Length is not a valid length")]) from None
        if length > RAW_BODY_CAP:
            self.close_connection = True
            return _Body(b"", length, False)
        data = self.rfile.read(length)
        if len(data) < length:
            raise ConnectionError("client closed the connection mid-body")
        return _Body(data, length, True)

    def _read_chunked(self) -> _Body:
        chunks: list[bytes] = []
        total = 0
        while True:
            line = self.rfile.readline(65537)
            if not line:
                raise ConnectionError("client closed the connection mid-body")
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                self.close_connection = True
                raise _HttpError(400, [_error(
                    "body", "invalid_chunking", "malformed chunked body")]) from None
            if size == 0:
                while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                    pass
                return _Body(b"".join(chunks), total, True)
            total += size
            if total > RAW_BODY_CAP:
                self.close_connection = True
                return _Body(b"", -1, False)
            chunk = self.rfile.read(size)
            if len(chunk) < size:
                raise ConnectionError("client closed the connection mid-body")
            chunks.append(chunk)
            self.rfile.readline(65537)

    def _send(self, response: _Response) -> None:
        status = response.status
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = ""
        head = [
            f"HTTP/1.1 {status} {phrase}",
            "Content-Type: application/json",
            f"Content-Length: {len(response.body)}",
        ]
        head.extend(f"{name}: {value}" for name, value in response.headers)
        if self.close_connection:
            head.append("Connection: close")
        self.wfile.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + response.body)
        self.log_request(status, len(response.body))

    # -- routes --

    def do_POST(self) -> None:
        path, _, query = self.path.partition("?")
        try:
            body = self._read_body()
        except _HttpError as exc:
            self._send(_errors_response(exc))
            return
        except ConnectionError:
            self.close_connection = True
            return
        if path.startswith("/v1/"):
            state = self.server.state
            latency = state.config.latency
            if latency > 0:
                time.sleep(latency)
            self._send(state.handle(
                path[len("/v1/"):], body,
                self.headers.get("Authorization"), self.headers.get("Content-Encoding"),
            ))
        elif path.startswith("/sandbox/"):
            self._send(self._inspect("POST", path[len("/sandbox/"):], query, body))
        else:
            self._send(_not_found(path))

    def do_GET(self) -> None:
        path, _, query = self.path.partition("?")
        if path.startswith("/sandbox/"):
            self._send(self._inspect("GET", path[len("/sandbox/"):], query, None))
        elif path.startswith("/v1/"):
            self._send(_json_response(405, {"meta": {"errors": [_error(
                "method", "not_allowed", "the API accepts POST only")]}}, [("Allow", "POST")]))
        else:
            self._send(_not_found(path))

    def _inspect(self, method: str, name: str, query: str, body: _Body | None) -> _Response:
        if not _is_loopback(self.client_address[0]):
            return _json_response(403, {"meta": {"errors": [_error(
                "client", "forbidden", "the /sandbox endpoints answer loopback clients only")]}})
        state = self.server.state
        try:
            if method == "GET" and name == "messages":
                params = dict(parse_qsl(query, keep_blank_values=True))
                return _json_response(200, {"messages": state.query(params)})
            if method == "GET" and name == "stats":
                return _json_response(200, state.stats())
            if method == "GET" and name in ("config", "health"):
                return _json_response(200, state.config.public())
            if method == "POST" and name == "reset":
                state.reset()
                return _json_response(200, {})
            if method == "POST" and name == "config":
                assert body is not None
                if not body.complete:
                    raise ValueError("config body too large")
                changes = json.loads(body.data or b"{}")
                if not isinstance(changes, dict):
                    raise ValueError("config must be a JSON object")
                return _json_response(200, state.configure(changes))
        except ValueError as exc:
            return _json_response(400, {"meta": {"errors": [_error(
                name, "invalid", str(exc))]}})
        return _not_found(f"/sandbox/{name}")


def _not_found(path: str) -> _Response:
    return _json_response(404, {"meta": {"errors": [_error(
        "path", "not_found", f"no such path: {path[:200]}")]}})


def _url(host: str, port: int) -> str:
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


# ---------------------------------------------------------------- Python API


def _config_from(
    fail_rate: float,
    rate_limit: float | None,
    latency: float,
    reject_events: Iterable[str],
    throttle_rate: float,
) -> _Config:
    return _build_config(_Config(), {
        "fail_rate": fail_rate, "rate_limit": rate_limit, "latency": latency,
        "reject_events": list(reject_events), "throttle_rate": throttle_rate,
    })


class Sandbox:
    """The sandbox server running in a background thread of this process.

    ``with Sandbox() as sb:`` starts it on a free port of 127.0.0.1; clients send to
    ``sb.url + "/v1/<endpoint>"`` with ``sb.key``.
    """

    def __init__(
        self,
        key: str = DEFAULT_KEY,
        host: str = "127.0.0.1",
        port: int = 0,
        fail_rate: float = 0.0,
        rate_limit: float | None = None,
        latency: float = 0.0,
        reject_events: Iterable[str] = (),
        seed: int | None = None,
        throttle_rate: float = 0.0,
    ) -> None:
        reject_events = list(reject_events)
        self._state = _State(
            key, _config_from(fail_rate, rate_limit, latency, reject_events, throttle_rate), seed)
        self._key = key
        self._host = host
        self._port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle --

    def start(self) -> Sandbox:
        if self._server is not None:
            raise RuntimeError("sandbox already running")
        cls = _Server6 if ":" in self._host else _Server
        server = cls((self._host, self._port), self._state)
        self._server = server
        self._port = server.server_address[1]
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05},
            name=f"cio-outbox-sandbox:{self._port}", daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None:
            return
        self._server = self._thread = None
        server.shutdown()
        server.close_connections()
        server.server_close()
        if thread is not None:
            thread.join()

    def __enter__(self) -> Sandbox:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("sandbox is not running")
        return _url(self._host, self._port)

    @property
    def key(self) -> str:
        return self._key

    def __repr__(self) -> str:
        where = _url(self._host, self._port) if self._server is not None else "stopped"
        cfg = self._state.config
        return (f"Sandbox({where}, fail_rate={cfg.fail_rate:g}, "
                f"throttle_rate={cfg.throttle_rate:g}, rate_limit={cfg.rate_limit}, "
                f"latency={cfg.latency:g}, reject_events={sorted(cfg.reject_events)})")

    # -- inspection --

    def messages(self, **filters: Any) -> list[dict[str, Any]]:
        """Stored messages in arrival order; filters as for ``GET /sandbox/messages``:
        ``userId``, ``anonymousId``, ``event``, ``type``, ``messageId``, ``endpoint``,
        ``limit``, ``after`` (a sequence number)."""
        return self._state.query(filters)

    def stats(self) -> dict[str, Any]:
        return self._state.stats()

    def reset(self) -> None:
        """Clear stored messages and stats (the config stays)."""
        self._state.reset()

    def configure(self, **changes: Any) -> dict[str, Any]:
        """Change ``fail_rate``, ``throttle_rate``, ``rate_limit``, ``latency``,
        ``reject_events`` or ``seed``;
        returns the new config. Raises ValueError for an unknown field or a bad value."""
        return self._state.configure(changes)


class SandboxProcess:
    """The sandbox server running in a child process (``python -m cio_outbox sandbox``).

    Same inspection methods as :class:`Sandbox`, over HTTP. The key reaches the child through
    the ``CIO_SANDBOX_KEY`` environment variable, never its command line.
    """

    def __init__(
        self,
        key: str = DEFAULT_KEY,
        host: str = "127.0.0.1",
        port: int = 0,
        fail_rate: float = 0.0,
        rate_limit: float | None = None,
        latency: float = 0.0,
        reject_events: Iterable[str] = (),
        seed: int | None = None,
        throttle_rate: float = 0.0,
        *,
        startup_timeout: float = 30.0,
        python: str = sys.executable,
    ) -> None:
        reject_events = list(reject_events)
        _config_from(fail_rate, rate_limit, latency, reject_events, throttle_rate)  # validate
        self._key = key
        self._argv = [python, "-m", "cio_outbox", "sandbox", "--host", host,
                      "--port", str(port), "--fail-rate", repr(float(fail_rate)),
                      "--latency", repr(float(latency))]
        if rate_limit is not None:
            self._argv += ["--rate-limit", repr(float(rate_limit))]
        for name in reject_events:
            self._argv += ["--reject-event", name]
        if seed is not None:
            self._argv += ["--seed", str(seed)]
        if throttle_rate:
            self._argv += ["--throttle-rate", repr(float(throttle_rate))]
        self._startup_timeout = startup_timeout
        self._process: subprocess.Popen[bytes] | None = None
        self._url: str | None = None
        self._session: requests.Session | None = None

    def start(self) -> SandboxProcess:
        if self._process is not None:
            raise RuntimeError("sandbox process already running")
        import requests

        env = dict(os.environ, CIO_SANDBOX_KEY=self._key)
        proc = subprocess.Popen(self._argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                env=env, bufsize=0)
        self._process = proc
        try:
            line = _read_line(proc, self._startup_timeout)
            self._url = json.loads(line)["url"]
        except BaseException:
            self.stop()
            raise
        self._session = requests.Session()
        return self

    def stop(self) -> None:
        """Terminate the child (SIGTERM, then SIGKILL after 10 s) and wait for it."""
        proc = self._process
        if self._session is not None:
            self._session.close()
            self._session = None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()

    def kill(self) -> None:
        """SIGKILL the child (a crash), then clean up as :meth:`stop`."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
        self.stop()

    def __enter__(self) -> SandboxProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def url(self) -> str:
        if self._url is None:
            raise RuntimeError("sandbox process is not running")
        return self._url

    @property
    def key(self) -> str:
        return self._key

    @property
    def process(self) -> subprocess.Popen[bytes]:
        if self._process is None:
            raise RuntimeError("sandbox process was not started")
        return self._process

    @property
    def pid(self) -> int:
        return self.process.pid

    def __repr__(self) -> str:
        pid = self._process.pid if self._process is not None else None
        return f"SandboxProcess(url={self._url}, pid={pid})"

    def _call(self, method: str, name: str, **kwargs: Any) -> Any:
        if self._session is None:
            raise RuntimeError("sandbox process is not running")
        resp = self._session.request(method, f"{self.url}/sandbox/{name}", timeout=30, **kwargs)
        if resp.status_code == 400:
            raise ValueError("; ".join(e["message"] for e in resp.json()["meta"]["errors"]))
        resp.raise_for_status()
        return resp.json()

    def messages(self, **filters: Any) -> list[dict[str, Any]]:
        params = {k: str(v) for k, v in filters.items() if v is not None}
        return self._call("GET", "messages", params=params)["messages"]

    def stats(self) -> dict[str, Any]:
        return self._call("GET", "stats")

    def reset(self) -> None:
        self._call("POST", "reset")

    def configure(self, **changes: Any) -> dict[str, Any]:
        return self._call("POST", "config", json=changes)


def _read_line(proc: subprocess.Popen[bytes], timeout: float) -> str:
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buf = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"sandbox process did not start within {timeout} s")
            if not sel.select(left):
                continue
            chunk = os.read(fd, 4096)
            if not chunk:
                raise RuntimeError(
                    f"sandbox process exited before listening (exit code {proc.wait()})")
            buf += chunk
    return buf.split(b"\n", 1)[0].decode()


# ---------------------------------------------------------------- CLI


@click.command("sandbox")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=0, show_default=True,
              help="Port to listen on; 0 picks a free one.")
@click.option("--key", envvar="CIO_SANDBOX_KEY", default=DEFAULT_KEY, show_default=False,
              help="API key clients must send (env CIO_SANDBOX_KEY; default 'sandbox-key').")
@click.option("--fail-rate", type=click.FloatRange(0.0, 1.0), default=0.0, show_default=True,
              help="Probability of answering a request with an injected 500/502/503.")
@click.option("--rate-limit", type=click.FloatRange(0.0, min_open=True), default=None,
              help="Requests per second before answering 429 (token bucket).")
@click.option("--latency", type=click.FloatRange(0.0), default=0.0, show_default=True,
              help="Seconds to delay every API request.")
@click.option("--reject-event", "reject_events", multiple=True,
              help="Answer 400 to any call carrying a track with this event (repeatable).")
@click.option("--seed", type=int, default=None, help="Seed for the failure injection RNG.")
@click.option("--throttle-rate", type=click.FloatRange(0.0, 1.0), default=0.0,
              show_default=True,
              help="Probability of answering a request with an injected 429 (Retry-After: 1).")
def sandbox_command(
    host: str,
    port: int,
    key: str,
    fail_rate: float,
    rate_limit: float | None,
    latency: float,
    reject_events: tuple[str, ...],
    seed: int | None,
    throttle_rate: float,
) -> None:
    """Run a local stand-in for the Customer.io Data Pipelines API until SIGINT/SIGTERM.

    Prints one JSON line {"url": ..., "pid": ..., "key": ...} once listening; "key" says
    which API key clients must send (a custom key is named, never shown).
    """
    stopping: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.append(signum)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    with Sandbox(key=key, host=host, port=port, fail_rate=fail_rate, rate_limit=rate_limit,
                 latency=latency, reject_events=reject_events, seed=seed,
                 throttle_rate=throttle_rate) as sandbox:
        click.echo(json.dumps({"url": sandbox.url, "pid": os.getpid(), "key": (
            f"export CIO_API_KEY={DEFAULT_KEY}" if key == DEFAULT_KEY else
            "the value of CIO_SANDBOX_KEY / --key (not shown)")}))
        sys.stdout.flush()
        while not stopping:
            time.sleep(0.1)
