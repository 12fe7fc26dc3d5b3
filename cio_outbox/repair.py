"""Repairing dead-lettered rows: requeue as they are, replace one, or fix a whole run.

``retry`` resends the stored payload (right for outages, useless for data the server
refused); ``replace`` stores a corrected call under the same messageId; :func:`fix_failed`
applies one correction (a Python function, or field assignments and a JSON merge patch from
the command line) to every failed row of a run, validating each result first, with a dry run.

A corrected call must keep the person it was written for: a different userId/anonymousId
under the same messageId would move an event to someone else. ``allow_person_change``
says it is meant.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cio_outbox import intake
from cio_outbox.wire import MessageError

if TYPE_CHECKING:
    from cio_outbox.outbox import Outbox

Fix = Callable[[dict[str, Any]], Mapping[str, Any] | None]
"""Takes a failed row's payload (wire shape, a fresh copy) and returns the corrected call,
or None to leave the row as it is."""


class UnknownRowsError(KeyError):
    """Row ids that name no failed row."""

    def __str__(self) -> str:
        return str(self.args[0])


class PersonChangeError(MessageError):
    """A correction would send the message for another person."""


def retry(outbox: Outbox, ids: Iterable[int] | None = None, *, run: str | None = None,
          all: bool = False) -> int:
    """Requeue failed rows by id, by run, or all; ids that are not failed rows raise
    :class:`UnknownRowsError` (the ones that are were requeued)."""
    if ids is None and run is None and not all:
        raise ValueError("say which failed rows to requeue: ids, run, or all=True")
    wanted = sorted(set(ids)) if ids is not None else None
    count = outbox.storage.requeue(ids=wanted, run=run)
    if wanted is not None and count < len(wanted):
        missing = len(wanted) - count
        named = ", ".join(f"#{i}" for i in wanted) if len(wanted) <= 10 else f"{missing} ids"
        raise UnknownRowsError(
            f"requeued {count} of {len(wanted)}: {named} "
            f"{'is not a failed row' if len(wanted) == 1 else 'are not all failed rows'}"
            " of this outbox (unknown id, or not failed); see cio-outbox failed")
    return count


def _corrected(outbox: Outbox, row: Mapping[str, Any], call: Mapping[str, Any],
               allow_person_change: bool) -> Any:
    """The NewRow for a corrected call of a failed row; raises MessageError."""
    message_id = row["message_id"]
    given = call.get("messageId")
    if given is not None and given != message_id:
        raise MessageError("the corrected call must keep the same messageId",
                           field="messageId")
    corrected = {**call, "messageId": message_id}
    if corrected.get("timestamp") is None:
        # The event happened when it was first enqueued, not when it was repaired.
        payload = row.get("payload")
        original = json.loads(payload) if isinstance(payload, str) else payload or {}
        if original.get("timestamp"):
            corrected["timestamp"] = original["timestamp"]
    fixed = intake.prepare(corrected, row["run"])
    if fixed.person != row["person"] and not allow_person_change:
        raise PersonChangeError(
            f"the corrected call is for {fixed.person!r}, the failed row for "
            f"{row['person']!r}: a messageId keeps its person; pass "
            "allow_person_change=True (--allow-person-change) if that is meant",
            field="userId")
    return fixed


def _store(outbox: Outbox, row: Mapping[str, Any], fixed: Any) -> None:
    if not outbox.storage.replace_failed(
        row["id"], payload=fixed.payload, size=fixed.size, call_type=fixed.call_type,
        person=fixed.person,
    ):
        raise ValueError(f"message {row['message_id']} changed state meanwhile; look again")


def replace(outbox: Outbox, message_id: str, call: Mapping[str, Any], *,
            allow_person_change: bool = False) -> dict[str, Any]:
    """Store a corrected call for one failed row and make it pending; returns the row."""
    row = outbox.storage.message(message_id)
    if row is None:
        raise KeyError(f"no message with messageId {message_id!r}")
    if row["status"] != "failed":
        raise ValueError(
            f"message {message_id} is {row['status']}, not failed: only dead-lettered "
            "messages can be replaced"
        )
    _store(outbox, row, _corrected(outbox, row, call, allow_person_change))
    return (outbox.history(message_id) or {}).get("message", {})


@dataclass
class FixResult:
    """What :func:`fix_failed` did (or, with ``dry_run``, would do)."""

    run: str | None
    dry_run: bool
    failed: int = 0
    fixed: int = 0
    unchanged: int = 0
    rejected: list[dict[str, Any]] = field(default_factory=list)
    examples: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"run": self.run, "dry_run": self.dry_run, "failed": self.failed,
                "fixed": self.fixed, "unchanged": self.unchanged, "rejected": self.rejected,
                "examples": self.examples}


def fix_failed(outbox: Outbox, fix: Fix, *, run: str | None = None, dry_run: bool = False,
               allow_person_change: bool = False, examples: int = 3) -> FixResult:
    """Apply ``fix`` to the payload of every failed row (of ``run``, or all) and store each
    corrected call in place, pending again, under its messageId.

    Every correction is validated before anything is stored: when one does not validate
    (or changes the person without ``allow_person_change``) nothing is stored and each such
    row is listed in ``rejected`` with its id, messageId and the error. ``dry_run`` stores
    nothing and lists up to ``examples`` corrected payloads.
    """
    total = outbox.storage.counts(run)["failed"]
    rows = outbox.storage.failed(run, max(total, 1))
    result = FixResult(run, dry_run, failed=len(rows))
    planned: list[tuple[dict[str, Any], Any]] = []
    for row in rows:
        payload = json.loads(row["payload"])
        corrected = fix(json.loads(row["payload"]))
        if corrected is None or dict(corrected) == payload:
            result.unchanged += 1
            continue
        try:
            fixed = _corrected(outbox, row, corrected, allow_person_change)
        except MessageError as exc:
            result.rejected.append({"id": row["id"], "messageId": row["message_id"],
                                    "error": str(exc)})
            continue
        planned.append((row, fixed))
        if len(result.examples) < examples:
            result.examples.append({"id": row["id"], "messageId": row["message_id"],
                                    "payload": json.loads(fixed.payload)})
    result.fixed = len(planned)
    if dry_run or result.rejected:
        if result.rejected:
            result.fixed = 0
        return result
    for row, fixed in planned:
        _store(outbox, row, fixed)
    return result


# -- the command line's corrections ---------------------------------------------------------


def parse_assignment(text: str) -> tuple[list[str], Any]:
    """``properties.total=12`` -> (["properties", "total"], 12). The value is JSON when it
    parses as JSON (12, true, null, "12", {...}), else the text itself."""
    path, sep, raw = text.partition("=")
    keys = path.strip().split(".")
    if not sep or not all(keys):
        raise ValueError(f"{text!r} is not FIELD.PATH=VALUE (like properties.total=12)")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    return keys, value


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7396 JSON merge patch: objects merge, null removes a key, anything else replaces."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def field_fix(assignments: Sequence[str] = (), patch: Mapping[str, Any] | None = None) -> Fix:
    """A :data:`Fix` from ``--set FIELD.PATH=VALUE`` assignments and a merge patch."""
    parsed = [parse_assignment(item) for item in assignments]

    def apply(payload: dict[str, Any]) -> dict[str, Any]:
        if patch is not None:
            payload = merge_patch(payload, dict(patch))
        for keys, value in parsed:
            node = payload
            for key in keys[:-1]:
                child = node.get(key)
                if not isinstance(child, dict):
                    child = node[key] = {}
                node = child
            node[keys[-1]] = value
        return payload

    return apply
