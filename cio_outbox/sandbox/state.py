"""The sandbox's state: its key, what it stored, its stats, and how it answers a request.

Stored messages are the messages as sent (with ``type`` filled in when the endpoint implied
it and ``messageId`` assigned when missing) plus one ``_sandbox`` key holding
``{"seq", "endpoint", "sentAt", "receivedAt"}``: the global sequence number (from 1, reset
by :meth:`State.reset`), the endpoint name (``"batch"``, ``"track"``, ...), the request's
``sentAt`` (``None`` when absent) and the time the sandbox received it.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import hmac
import itertools
import json
import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, NamedTuple

from cio_outbox.config import ApiKey
from cio_outbox.sandbox.faults import Config, Faults
from cio_outbox.sandbox.validation import (
    COMPACT,
    MESSAGE_LIMIT,
    REQUEST_LIMIT,
    SINGLE_ENDPOINTS,
    HttpError,
    error,
    gunzip,
    parse_body,
    validate_items,
)

logger = logging.getLogger("cio_outbox.sandbox")

RAW_BODY_CAP = 4 * 1024 * 1024
"""Bytes read from the socket at most; a longer body is answered 413 and the connection closed."""
MESSAGE_FILTERS = frozenset({"userId", "anonymousId", "event", "type", "messageId", "endpoint"})
_QUERY_PARAMS = MESSAGE_FILTERS | {"limit", "after"}
# Refusals that Customer.io answers with 200 (and drops) unless X-Strict-Mode is set.
_DROPPED_UNLESS_STRICT = frozenset({400, 413})
# Problems written out in the documented one-sentence error body.
_SENTENCES = 5


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Response(NamedTuple):
    status: int
    body: bytes
    headers: list[tuple[str, str]]


def json_response(status: int, payload: Any, headers: Sequence[tuple[str, str]] = ()) -> Response:
    return Response(status, json.dumps(payload).encode(), list(headers))


def errors_response(exc: HttpError, named: bool = False) -> Response:
    """The documented error body, ``{"meta": {"error": "..."}}``: one sentence saying what
    is wrong, without naming items. ``named`` gives the sandbox's own form instead, one entry
    per problem with the item's field (``batch[3].userId``)."""
    if named:
        return json_response(exc.status, {"meta": {"errors": exc.errors}}, exc.headers)
    shown = [e["message"] for e in exc.errors[:_SENTENCES]]
    more = len(exc.errors) - len(shown)
    text = "; ".join(shown) + (f" (and {more} more)" if more > 0 else "")
    return json_response(exc.status, {"meta": {"error": text}}, exc.headers)


class Body(NamedTuple):
    data: bytes
    size: int
    complete: bool


class State:
    """Config, stored messages and stats of one sandbox; thread safe."""

    validator = "cio_outbox.messages"

    def __init__(
        self,
        key: str,
        config: Config,
        seed: int | None,
    ) -> None:
        if not isinstance(key, str) or not key:
            raise ValueError("key must be a non-empty string")
        self._key = key.encode()
        # The key's scheme follows the outbox's own rule (region-prefixed keys are Bearer).
        self._bearer = ApiKey(key).scheme == "bearer"
        self._lock = threading.Lock()
        self._faults = Faults(config, seed)
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

    def reset(self) -> None:
        with self._lock:
            self._clear()
        self._faults.reset()

    def configure(self, changes: Mapping[str, Any]) -> dict[str, Any]:
        return self._faults.configure(changes).public()

    @property
    def config(self) -> Config:
        return self._faults.config

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
                "dropped_requests": counts["dropped_requests"],
                "dropped_messages": counts["dropped_messages"],
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
                "config": self.config.public(),
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
        body: Body,
        authorization: str | None,
        content_encoding: str | None,
        strict: bool = False,
    ) -> Response:
        """Answer one POST to ``/v1/<endpoint>``; counts it in the stats.

        Without ``strict`` (the ``X-Strict-Mode: 1`` header), an invalid or oversized
        request is answered 200 and dropped, as Customer.io documents; with it, refused.
        """
        cfg = self.config
        known = endpoint == "batch" or endpoint in SINGLE_ENDPOINTS
        encoding = (content_encoding or "identity").strip().lower()
        gz = encoding in ("gzip", "x-gzip")
        scheme = "none"
        flags: Counter[str] = Counter()
        decompressed = 0
        try:
            if not known:
                raise HttpError(404, [error(
                    "path", "not_found",
                    f"unknown endpoint /v1/{endpoint}; known: /v1/batch, "
                    + ", ".join(f"/v1/{e}" for e in SINGLE_ENDPOINTS),
                )])
            scheme, ok, problem = self.authenticate(authorization)
            if not ok:
                challenge = 'Bearer realm="cio-outbox-sandbox"' if self._bearer else (
                    'Basic realm="cio-outbox-sandbox"')
                raise HttpError(401, [error("Authorization", "unauthorized", problem)],
                                 [("WWW-Authenticate", challenge)])
            retry_after = self._faults.take_token(cfg)
            if retry_after is not None:
                flags["rate_limited"] = 1
                raise HttpError(429, [error(
                    "request", "rate_limited",
                    f"rate limit of {cfg.rate_limit:g} requests/s exceeded; "
                    f"retry after {retry_after} s",
                )], [("Retry-After", str(retry_after))])
            if self._faults.injected_throttle(cfg):
                flags["injected_throttles"] = 1
                raise HttpError(429, [error(
                    "request", "throttled",
                    f"sandbox injected a 429 (throttle_rate={cfg.throttle_rate:g}); "
                    "retry after 1 s",
                )], [("Retry-After", "1")])
            injected = self._faults.injected_failure(cfg)
            if injected is not None:
                flags["injected_failures"] = 1
                raise HttpError(injected, [error(
                    "request", "injected_failure",
                    f"sandbox injected a {injected} failure (fail_rate={cfg.fail_rate:g})",
                )])
            if not body.complete:
                raise HttpError(413, [error(
                    "body", "too_large",
                    f"request body is {'more than ' if body.size <= 0 else ''}"
                    f"{max(body.size, RAW_BODY_CAP)} bytes; the limit is {REQUEST_LIMIT} bytes",
                )])
            if gz:
                data = gunzip(body.data, REQUEST_LIMIT)
            elif encoding == "identity":
                data = body.data
            else:
                raise HttpError(415, [error(
                    "Content-Encoding", "unsupported_encoding",
                    "only gzip and identity bodies are accepted",
                )])
            decompressed = len(data)
            if decompressed > REQUEST_LIMIT:
                raise HttpError(413, [error(
                    "body", "too_large",
                    f"request body is {decompressed} bytes; the limit is {REQUEST_LIMIT} bytes",
                )])
            response = self._accept(endpoint, data, cfg, flags)
        except HttpError as exc:
            if exc.status in _DROPPED_UNLESS_STRICT and not strict:
                # Customer.io answers 200 to an invalid or oversized request it drops.
                flags["dropped_requests"] += 1
                flags["dropped_messages"] += flags.pop("rejected_messages", 0)
                flags.pop("invalid_messages", None)
                response = Response(200, b"{}", [])
            else:
                response = errors_response(exc, cfg.named_errors)
        except Exception:
            logger.exception("sandbox failed to handle a request to /v1/%s", endpoint)
            response = errors_response(HttpError(500, [error(
                "request", "internal_error", "the sandbox failed; see its log")]),
                cfg.named_errors)
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

    def _accept(self, endpoint: str, data: bytes, cfg: Config, flags: Counter[str]) -> Response:
        try:
            text = data.decode("utf-8")
            doc, spans = parse_body(text)
        except (ValueError, RecursionError) as exc:
            raise HttpError(
                400, [error("body", "invalid_json", f"body is not JSON: {exc}")]
            ) from None
        batch = endpoint == "batch"
        if not isinstance(doc, dict):
            raise HttpError(
                400, [error("body", "invalid_type", "the body must be a JSON object")]
            )
        if batch:
            items = doc.get("batch")
            if not isinstance(items, list):
                raise HttpError(400, [error(
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
        errors, invalid = validate_items(endpoint, items, [e - s for s, e in spans],
                                         cfg.reject_events)
        elapsed = time.perf_counter() - started
        with self._lock:
            self._validation_seconds += elapsed
            self._counts["validated_messages"] += len(items)
        if errors:
            flags["rejected_messages"] += len(items)
            flags["invalid_messages"] += invalid
            raise HttpError(400, errors)
        raws = [text[s:e] for s, e in spans] if text else [COMPACT(m) for m in items]
        self._store(endpoint, items, raws, sent_at, flags)
        return Response(200, b"{}", [])

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
