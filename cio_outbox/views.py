"""One JSON vocabulary for everything the command line prints with ``--json``.

Wire fields keep their wire names (``messageId``, ``type``), a payload is an object (never
JSON inside a string), times are ISO 8601 in UTC, and our own fields are snake_case:

=================  ==============================================================
``id``             the row's number in the outbox (``retry --id``)
``messageId``      the message's id on the wire
``type``           the call: identify, track, page, screen, group, alias
``run``            the run the row was enqueued under
``person``         userId, else anonymousId
``status``         pending, in_flight, sent, failed
``attempts``       HTTP attempts so far
``error``          the last error the server or the network gave
``payload``        the call as it is sent, an object
``*_at``           ISO 8601 times (``created_at``, ``updated_at``, ``sent_at`` ...)
=================  ==============================================================
"""

from __future__ import annotations

import datetime as _dt
import json
from typing import Any

_TIMES = ("created_at", "updated_at", "sent_at", "next_attempt_at", "lease_expires_at")
_RENAMED = {"message_id": "messageId", "call_type": "type", "last_error": "error"}


def iso(value: Any) -> Any:
    """An epoch time as ISO 8601 UTC; ISO text and None pass through."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return _dt.datetime.fromtimestamp(value, _dt.UTC).isoformat(timespec="milliseconds")
    return value


def message(row: dict[str, Any]) -> dict[str, Any]:
    """A stored row (as storage or :meth:`Outbox.rows` gives it) in the vocabulary."""
    view: dict[str, Any] = {}
    for name, value in row.items():
        if name in ("claim_token",):
            continue
        key = _RENAMED.get(name, name)
        if name in _TIMES:
            value = iso(value)
        elif name == "payload" and isinstance(value, str):
            value = json.loads(value)
        view[key] = value
    return view


def attempt(entry: dict[str, Any]) -> dict[str, Any]:
    """An audit-trail entry in the vocabulary (``at`` as ISO)."""
    view = {k: v for k, v in entry.items()
            if k not in ("row_ranges", "min_row_id", "max_row_id")}
    if "at" in view:
        view["at"] = iso(view["at"])
    return view


def history(data: dict[str, Any]) -> dict[str, Any]:
    """:meth:`Outbox.history` in the vocabulary."""
    return {"message": message(data["message"]),
            "attempts": [attempt(a) for a in data["attempts"]]}
