"""Packing claimed rows into request bodies that follow the API's limits.

The body of a ``/batch`` request is built by joining the stored JSON of each
message, so a message is serialized once, at enqueue, and never again. Its exact
size is known before it is claimed: a row is only claimed if it fits.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Iterable, Sequence

from cio_outbox.storage.base import Row  # re-exported: Row lives with the storage seam

MAX_BATCH_BYTES = 500_000
_PREFIX = b'{"batch":['
_SENT_AT = b'],"sentAt":"'
_SUFFIX = b'"}'
_SENT_AT_LEN = len("2026-01-01T00:00:00.000Z")
#: bytes of a /batch body around its messages: prefix, sentAt and suffix.
BATCH_OVERHEAD = len(_PREFIX) + len(_SENT_AT) + _SENT_AT_LEN + len(_SUFFIX)


_ROOM_WORTH_FILLING = 2048
_MAX_MISSES = 16


def sent_at_now() -> str:
    now = _dt.datetime.now(_dt.UTC)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


def batch_size(sizes: Iterable[int]) -> int:
    """Exact byte length of a /batch body holding messages of these sizes."""
    total = 0
    count = 0
    for size in sizes:
        total += size
        count += 1
    return BATCH_OVERHEAD + total + max(count - 1, 0)


def batch_body(payloads: Sequence[str], sent_at: str) -> bytes:
    """The /batch body: ``{"batch":[...],"sentAt":"..."}`` from stored message JSON."""
    return b"".join(
        (_PREFIX, ",".join(payloads).encode("utf-8"), _SENT_AT, sent_at.encode(), _SUFFIX)
    )


def single_body(payload: str, sent_at: str) -> bytes:
    """The body of a single call (used for /alias): the message with sentAt added."""
    return (payload[:-1] + ',"sentAt":"' + sent_at + '"}').encode("utf-8")


def select(
    candidates: Iterable[Row],
    blocked: set[str],
    *,
    max_bytes: int = MAX_BATCH_BYTES,
    max_messages: int = 5000,
) -> list[Row]:
    """Choose the rows for one request from candidates in enqueue order.

    - A person in ``blocked`` (rows in flight elsewhere, or waiting to be retried)
      is skipped, and so is every later row of a person skipped here, so that one
      person's messages reach the API in the order they were enqueued.
    - Alias rows go to /alias one by one: an alias first in line is taken alone;
      an alias met later ends the batch for its person.
    - Rows are taken while the exact body stays within ``max_bytes``.
    """
    blocked = set(blocked)
    chosen: list[Row] = []
    total = BATCH_OVERHEAD - 1  # minus one: the first message needs no comma
    misses = 0
    for row in candidates:
        if row.person in blocked:
            continue
        if row.call_type == "alias":
            if not chosen:
                return [row]
            blocked.add(row.person)
            continue
        if total + row.size + 1 > max_bytes:
            blocked.add(row.person)
            misses += 1
            # Look a little further for smaller messages, but not through the whole
            # backlog: once the body is nearly full, or a few rows in a row did not fit,
            # this request is as full as it usefully gets.
            if max_bytes - total < _ROOM_WORTH_FILLING or misses >= _MAX_MISSES:
                break
            continue
        chosen.append(row)
        total += row.size + 1
        if len(chosen) >= max_messages:
            break
    return chosen
