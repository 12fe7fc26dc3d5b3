"""Calls built on the six basic ones: people, semantic events, devices, objects, bulk rows.

Each operation is a plain function that builds one call in wire shape (it writes nothing);
:class:`cio_outbox.Outbox` has a method of the same name and signature (plus ``run``) that
enqueues what the function builds, so users find every operation on the Outbox.

Every operation of Customer.io's Data Pipelines API is one call here or in outbox.py:

============================  =====================================================
Operation                     Call (wire payload)
============================  =====================================================
Add or update a person        ``identify`` (identify)
Delete a person               ``delete_person`` (track "User Deleted")
Suppress / unsuppress         ``suppress_person`` / ``unsuppress_person``
                              (track "User Suppressed" / "User Unsuppressed")
Custom event, page, screen    ``track``, ``page``, ``screen``
Semantic event (catalogue)    ``track_semantic`` (track, checked against its schema)
Create or update an object    ``upsert_object`` (group, traits.object_type_id)
Relate a person to an object  ``relate`` (group with userId)
Delete an object              ``delete_object`` (track "Object Deleted")
Delete a relationship         ``unrelate`` (track "Relationship Deleted")
Create or update a device     ``add_device`` (track "Device Created or Updated")
Delete a device               ``delete_device`` (track "Device Deleted")
Merge profiles                ``alias`` (alias, sent to /alias)
Many people or events         ``enqueue_rows`` (identify or track per row)
============================  =====================================================

Choices made where the upstream document leaves room (each is documented on its call):

- identify with only an ``email`` trait: not supported. Customer.io's text says an empty
  ``userId`` may be passed with an email "in some cases", only when Customer.io is the
  destination, while its schema requires ``userId`` or ``anonymousId``; the outbox also keys
  ordering, idempotency and ``forget()`` on that id. Pass ``user_id`` or ``anonymous_id``.
- Objects without a person: ``upsert_object`` and ``delete_object`` send an ``anonymousId``
  derived from the object (``object:<type>:<id>``), which no person carries. Customer.io
  says the performer of "Object Deleted" must be set but is not used; deriving it from the
  object keeps one object's upserts and deletion in order, the way one person's are.
- ``objectTypeId`` in "Object Deleted" / "Relationship Deleted" is an integer (the upstream
  schema's type; its example shows a string), while ``traits.object_type_id`` in a group call
  is a string of digits (upstream: "stringified integers").
- Relationship attributes: the upstream document defines no field for them in group calls
  (no ``relationshipAttributes``, nothing in ``context``), so ``relate`` sends none; object
  attributes go in ``traits``.
- Device attributes (``add_device(attributes=...)``) are sent as the event's ``properties``;
  the token and platform go in ``context.device``.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from cio_outbox import intake
from cio_outbox.results import EnqueueResult, Rejection
from cio_outbox.storage.base import CHUNK_ROWS, NewRow
from cio_outbox.wire import IDEMPOTENCY_NAMESPACE, MessageError, message_id_for

if TYPE_CHECKING:
    from cio_outbox.storage.base import Storage

__all__ = [
    "CALLS", "DEVICE_TYPES", "InvalidRowsError", "SemanticEventTable", "add_device", "alias",
    "delete_device", "delete_object", "delete_person", "enqueue_rows", "group", "identify",
    "object_anonymous_id", "page", "relate", "screen", "semantic_events", "suppress_person",
    "track", "track_semantic", "unrelate", "unsuppress_person", "upsert_object",
    "wire_call"]

CALLS = ("identify", "track", "page", "screen", "group", "alias", "track_semantic",
         "delete_person", "suppress_person", "unsuppress_person", "add_device",
         "delete_device", "upsert_object", "relate", "delete_object", "unrelate")
"""The operations that build one wire call each; Outbox has a method of the same name."""

DEVICE_TYPES = ("ios", "android")
ROW_CALL_TYPES = ("identify", "track")
DEFAULT_ROWS_CHUNK = CHUNK_ROWS


class InvalidRowsError(MessageError):
    """``enqueue_rows(on_invalid="raise")`` found invalid rows; nothing was written.

    ``rejected`` lists every invalid row (``index`` is the row number) with its reason.
    """

    def __init__(self, rejected: list[Rejection]) -> None:
        first = rejected[0]
        super().__init__(
            f"{len(rejected)} row(s) invalid, nothing written; "
            f"first at row {first.index}: {first.error}",
            field=first.field,
        )
        self.rejected = rejected


class SemanticEventTable(list[dict[str, Any]]):
    """The semantic event catalogue as rows (a list of dicts); renders as a table in notebooks.

    ``pandas.DataFrame(outbox.semantic_events())`` gives a DataFrame of it.
    """

    _COLUMNS = ("name", "category", "requires", "description")

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{c}</th>" for c in self._COLUMNS)
        body = "".join(
            "<tr>" + "".join(
                f"<td>{html.escape(', '.join(row[c]) if c == 'requires' else str(row[c]))}</td>"
                for c in self._COLUMNS
            ) + "</tr>"
            for row in self
        )
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def object_anonymous_id(object_id: str, object_type_id: str | int = "1") -> str:
    """The ``anonymousId`` sent for an object when no person is given: ``object:<type>:<id>``."""
    return f"object:{_type_id(object_type_id, 'object_type_id')}:{object_id}"


def _type_id(value: Any, field: str) -> str:
    """An object type id as a string of digits ("1"), from "1" or 1; MessageError otherwise."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise MessageError(f"{field} must be a positive integer or a string of digits "
                           f"(got {type(value).__name__})", field=field)
    text = str(value).strip()
    if not text.isascii() or not text.isdigit() or int(text) < 1:
        raise MessageError(f"{field} must be a positive integer or a string of digits "
                           f"(got {value!r})", field=field)
    return str(int(text))


def _object_id(value: Any, field: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip():
        raise MessageError(f"{field} must be a non-empty string", field=field)
    return str(value)


# -- row values --------------------------------------------------------------------------

_NAMESPACE = IDEMPOTENCY_NAMESPACE.bytes
_MISSING = object()
_PLAIN = frozenset({str, int, bool, dict, list})


def _value(value: Any) -> Any:
    """A row value ready for a message, or ``_MISSING`` for None, NaN, NaT and pandas NA.

    Plain Python values pass through at the cost of one set lookup; numpy datetime64 becomes
    a datetime (other numpy scalars and pandas Timestamps are handled by messages.py).
    """
    kind = type(value)
    if kind in _PLAIN:
        return value
    if value is None:
        return _MISSING
    if kind is float:
        return _MISSING if value != value else value
    module = kind.__module__
    if module.startswith("pandas"):
        return _MISSING if kind.__name__ in ("NaTType", "NAType") else value
    if module == "numpy":
        try:
            if value != value:  # NaN and NaT
                return _MISSING
        except (TypeError, ValueError):
            return value
        if kind.__name__ == "datetime64":
            return value.astype("datetime64[us]").item()
    return value


def _id_value(value: Any) -> Any:
    """An id from a row: missing -> None; numpy ints and integral floats -> int (42.0 -> 42).

    A column of integer ids with a gap becomes float in pandas; 42.0 is meant as "42".
    """
    value = _value(value)
    if value is _MISSING:
        return None
    if type(value).__module__ == "numpy" and hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


class _Columns:
    """Which row keys feed which message field, resolved once per enqueue_rows call."""

    def __init__(
        self, *, call_type: str, user_id: str | None, anonymous_id: str | None,
        event: str | None, event_column: str | None, fields: Sequence[str] | Mapping[str, str]
        | None, timestamp: str | None, message_id: str | None, idempotency_key: str | None,
    ) -> None:
        self.call_type = call_type
        self.user_id = user_id
        self.anonymous_id = anonymous_id
        self.event = event
        self.event_column = event_column
        self.timestamp = timestamp
        self.message_id = message_id
        self.idempotency_key = idempotency_key
        self.target = "traits" if call_type == "identify" else "properties"
        self.reserved = frozenset(
            c for c in (user_id, anonymous_id, event_column, timestamp, message_id,
                        idempotency_key) if c is not None
        )
        self.pairs: list[tuple[str, Any]] | None
        if fields is None:
            self.pairs = None  # every other column
        elif isinstance(fields, Mapping):
            self.pairs = [(str(name), column) for name, column in fields.items()]
        elif isinstance(fields, str):
            raise TypeError(f"{self.target} must be a list of column names, not a string")
        else:
            self.pairs = [(str(column), column) for column in fields]

    def used(self) -> list[Any]:
        """Columns that must exist in a DataFrame (all named ones)."""
        named = [c for c in (self.user_id, self.anonymous_id, self.event_column, self.timestamp,
                             self.message_id, self.idempotency_key) if c is not None]
        return named + [column for _, column in self.pairs or ()]

    def bag(self, row: Mapping[Any, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        plain = _PLAIN
        if self.pairs is None:
            reserved = self.reserved
            for column, value in row.items():
                if column in reserved:
                    continue
                if type(value) not in plain:
                    value = _value(value)
                    if value is _MISSING:
                        continue
                out[column if type(column) is str else str(column)] = value
        else:
            for name, column in self.pairs:
                value = row.get(column)
                if type(value) not in plain:
                    value = _value(value)
                    if value is _MISSING:
                        continue
                out[name] = value
        return out

    def fields(self, row: Mapping[Any, Any], position: int, run: str | None) -> dict[str, Any]:
        """The wire fields of the call for one row (not validated yet)."""
        fields: dict[str, Any] = {}
        if self.user_id is not None:
            value = _id_value(row.get(self.user_id))
            if value is not None:
                fields["userId"] = value
        if self.anonymous_id is not None:
            value = _id_value(row.get(self.anonymous_id))
            if value is not None:
                fields["anonymousId"] = value
        event = self.event
        if self.event_column is not None:
            event = _value(row.get(self.event_column))
            if event is _MISSING:
                raise MessageError(f"track: event is missing (column {self.event_column!r})",
                                   field="event")
        if event is not None:
            fields["event"] = event
        bag = self.bag(row)
        if bag:
            fields[self.target] = bag
        if self.timestamp is not None:
            value = _value(row.get(self.timestamp))
            if value is not _MISSING:
                fields["timestamp"] = value
        if self.message_id is not None:
            value = _id_value(row.get(self.message_id))
            fields["messageId"] = value  # None is refused by the model, naming messageId
        elif self.idempotency_key is not None:
            value = _id_value(row.get(self.idempotency_key))
            if value is None:
                raise MessageError(
                    f"idempotency key is missing (column {self.idempotency_key!r})",
                    field=str(self.idempotency_key),
                )
            fields["messageId"] = message_id_for(str(value))
        elif run is not None:
            # Identity from place and content, as for a file's lines: the same rows again
            # add nothing, other rows under the same run (a corrected subset, the next
            # day's frame) are new messages, not skipped as "already there".
            content = repr((self.call_type, fields)).encode("utf-8", "surrogatepass")
            fields["messageId"] = intake.line_message_id(run, position, content)
        return fields


def _rows_of(rows: Any, columns: _Columns, chunk_size: int) -> Iterator[Mapping[Any, Any]]:
    """Rows as mappings: a DataFrame (duck-typed, read in chunks) or any iterable of dicts."""
    if hasattr(rows, "itertuples") and hasattr(rows, "columns") and hasattr(rows, "iloc"):
        names = list(rows.columns)
        missing = [c for c in columns.used() if c not in names]
        if missing:
            raise KeyError(f"column(s) not in the DataFrame: {', '.join(map(repr, missing))}")
        if len(set(names)) != len(names):
            raise ValueError("the DataFrame has duplicate column names")
        for start in range(0, len(rows), chunk_size):
            part = rows.iloc[start:start + chunk_size]
            for values in part.itertuples(index=False, name=None):
                yield dict(zip(names, values, strict=True))
        return
    if isinstance(rows, Mapping):
        raise TypeError("rows must be an iterable of dicts or a DataFrame, not one dict")
    yield from rows


def _semantic() -> Any:
    """cio_outbox.semantic, imported on first use: it reads the OpenAPI document."""
    from cio_outbox import semantic

    return semantic


def wire_call(call_type: str, fields: Mapping[str, Any], idempotency_key: str | None = None,
              message_id: str | None = None) -> dict[str, Any]:
    """A call in wire shape from keyword fields: None values left out, the messageId taken
    from ``message_id`` (or ``fields["messageId"]``) or the idempotency key, never both."""
    wire: dict[str, Any] = {"type": call_type}
    for name, value in fields.items():
        if value is not None:
            wire[name] = value
    if message_id is not None:
        wire["messageId"] = message_id
    if idempotency_key is not None:
        if "messageId" in wire:
            raise MessageError("give either message_id or idempotency_key, not both",
                               field="messageId")
        wire["messageId"] = message_id_for(idempotency_key)
    return wire


# -- the calls ----------------------------------------------------------------------------


def identify(
    user_id: str | None = None, *, anonymous_id: str | None = None,
    traits: Mapping[str, Any] | None = None, timestamp: Any = None,
    context: Mapping[str, Any] | None = None, integrations: Mapping[str, bool] | None = None,
    message_id: str | None = None, idempotency_key: str | None = None,
) -> dict[str, Any]:
    """The wire call of :meth:`cio_outbox.Outbox.identify` (see there)."""
    return wire_call("identify", idempotency_key=idempotency_key,
                     fields=dict(
        userId=user_id, anonymousId=anonymous_id, traits=traits, timestamp=timestamp,
        context=context, integrations=integrations, messageId=message_id))


def track(
    user_id: str | None, event: str, *, properties: Mapping[str, Any] | None = None,
    anonymous_id: str | None = None, timestamp: Any = None,
    context: Mapping[str, Any] | None = None, integrations: Mapping[str, bool] | None = None,
    message_id: str | None = None, idempotency_key: str | None = None,
) -> dict[str, Any]:
    """The wire call of :meth:`cio_outbox.Outbox.track` (see there)."""
    return wire_call("track", idempotency_key=idempotency_key,
                     fields=dict(
        userId=user_id, anonymousId=anonymous_id, event=event, properties=properties,
        timestamp=timestamp, context=context, integrations=integrations,
        messageId=message_id))


def page(
    user_id: str | None = None, name: str | None = None, *,
    properties: Mapping[str, Any] | None = None, anonymous_id: str | None = None,
    timestamp: Any = None, context: Mapping[str, Any] | None = None,
    integrations: Mapping[str, bool] | None = None, message_id: str | None = None,
    idempotency_key: str | None = None,
) -> dict[str, Any]:
    """The wire call of :meth:`cio_outbox.Outbox.page` (see there)."""
    return wire_call("page", idempotency_key=idempotency_key,
                     fields=dict(
        userId=user_id, anonymousId=anonymous_id, name=name, properties=properties,
        timestamp=timestamp, context=context, integrations=integrations,
        messageId=message_id))


def screen(
    user_id: str | None = None, name: str | None = None, *,
    properties: Mapping[str, Any] | None = None, anonymous_id: str | None = None,
    timestamp: Any = None, context: Mapping[str, Any] | None = None,
    integrations: Mapping[str, bool] | None = None, message_id: str | None = None,
    idempotency_key: str | None = None,
) -> dict[str, Any]:
    """The wire call of :meth:`cio_outbox.Outbox.screen` (see there)."""
    return wire_call("screen", idempotency_key=idempotency_key,
                     fields=dict(
        userId=user_id, anonymousId=anonymous_id, name=name, properties=properties,
        timestamp=timestamp, context=context, integrations=integrations,
        messageId=message_id))


def group(
    user_id: str | None, group_id: str, *, traits: Mapping[str, Any] | None = None,
    anonymous_id: str | None = None, timestamp: Any = None,
    context: Mapping[str, Any] | None = None, integrations: Mapping[str, bool] | None = None,
    message_id: str | None = None, idempotency_key: str | None = None,
) -> dict[str, Any]:
    """The wire call of :meth:`cio_outbox.Outbox.group` (see there)."""
    return wire_call("group", idempotency_key=idempotency_key,
                     fields=dict(
        userId=user_id, anonymousId=anonymous_id, groupId=group_id, traits=traits,
        timestamp=timestamp, context=context, integrations=integrations,
        messageId=message_id))


def alias(
    user_id: str, previous_id: str, *, timestamp: Any = None,
    context: Mapping[str, Any] | None = None, integrations: Mapping[str, bool] | None = None,
    message_id: str | None = None, idempotency_key: str | None = None,
) -> dict[str, Any]:
    """The wire call of :meth:`cio_outbox.Outbox.alias` (see there)."""
    return wire_call("alias", idempotency_key=idempotency_key,
                     fields=dict(
        userId=user_id, previousId=previous_id, timestamp=timestamp, context=context,
        integrations=integrations, messageId=message_id))


def track_semantic(
    name: str, user_id: str | None = None, *, anonymous_id: str | None = None,
    properties: Mapping[str, Any] | None = None, context: Mapping[str, Any] | None = None,
    timestamp: Any = None, integrations: Mapping[str, bool] | None = None,
    message_id: str | None = None, idempotency_key: str | None = None,
) -> dict[str, Any]:
    """The wire call of :meth:`cio_outbox.Outbox.track_semantic` (see there)."""
    try:
        _semantic().lookup(name)
    except KeyError as exc:
        raise MessageError(f"{exc.args[0]}; custom events go through track()",
                           field="event") from None
    fields = dict(userId=user_id, anonymousId=anonymous_id, event=name,
                  properties=properties, context=context, timestamp=timestamp,
                  integrations=integrations)
    # enqueue checks the event's required fields, as it does for every track call.
    return wire_call("track", fields, idempotency_key, message_id)


def delete_person(
    user_id: str, *, properties: Mapping[str, Any] | None = None,
    timestamp: Any = None, context: Mapping[str, Any] | None = None,
    integrations: Mapping[str, bool] | None = None, message_id: str | None = None,
    idempotency_key: str | None = None,
) -> dict[str, Any]:
    """The wire call of :meth:`cio_outbox.Outbox.delete_person` (see there)."""
    return track_semantic(
        "User Deleted", user_id, properties=properties, timestamp=timestamp,
        context=context, integrations=integrations,
        message_id=message_id, idempotency_key=idempotency_key)


def suppress_person(
    user_id: str, *, properties: Mapping[str, Any] | None = None,
    timestamp: Any = None, context: Mapping[str, Any] | None = None,
    integrations: Mapping[str, bool] | None = None, message_id: str | None = None,
    idempotency_key: str | None = None,
) -> dict[str, Any]:
    """The wire call of :meth:`cio_outbox.Outbox.suppress_person` (see there)."""
    return track_semantic(
        "User Suppressed", user_id, properties=properties, timestamp=timestamp,
        context=context, integrations=integrations,
        message_id=message_id, idempotency_key=idempotency_key)


def unsuppress_person(
    user_id: str, *, properties: Mapping[str, Any] | None = None,
    timestamp: Any = None, context: Mapping[str, Any] | None = None,
    integrations: Mapping[str, bool] | None = None, message_id: str | None = None,
    idempotency_key: str | None = None,
) -> dict[str, Any]:
    """The wire call of :meth:`cio_outbox.Outbox.unsuppress_person` (see there)."""
    return track_semantic(
        "User Unsuppressed", user_id, properties=properties, timestamp=timestamp,
        context=context, integrations=integrations,
        message_id=message_id, idempotency_key=idempotency_key)


def add_device(
    user_id: str, token: str, *, device_type: str | None = None,
    attributes: Mapping[str, Any] | None = None, timestamp: Any = None,
    context: Mapping[str, Any] | None = None,
    integrations: Mapping[str, bool] | None = None, message_id: str | None = None,
    idempotency_key: str | None = None,
) -> dict[str, Any]:
    """The wire call of :meth:`cio_outbox.Outbox.add_device` (see there)."""
    return track_semantic(
        "Device Created or Updated", user_id, properties=attributes,
        context=_device_context(context, token, device_type), timestamp=timestamp,
        integrations=integrations,
        message_id=message_id, idempotency_key=idempotency_key)


def delete_device(
    user_id: str, token: str, *, device_type: str | None = None,
    timestamp: Any = None, context: Mapping[str, Any] | None = None,
    integrations: Mapping[str, bool] | None = None, message_id: str | None = None,
    idempotency_key: str | None = None,
) -> dict[str, Any]:
    """The wire call of :meth:`cio_outbox.Outbox.delete_device` (see there)."""
    return track_semantic(
        "Device Deleted", user_id, context=_device_context(context, token, device_type),
        timestamp=timestamp, integrations=integrations,
        message_id=message_id, idempotency_key=idempotency_key)


def upsert_object(
    object_id: str, object_type_id: str | int = "1", *,
    traits: Mapping[str, Any] | None = None, user_id: str | None = None,
    anonymous_id: str | None = None, timestamp: Any = None,
    context: Mapping[str, Any] | None = None,
    integrations: Mapping[str, bool] | None = None, message_id: str | None = None,
    idempotency_key: str | None = None,
) -> dict[str, Any]:
    """The wire call of :meth:`cio_outbox.Outbox.upsert_object` (see there)."""
    type_id = _type_id(object_type_id, "traits.object_type_id")
    object_id = _object_id(object_id, "groupId")
    if user_id is None and anonymous_id is None:
        anonymous_id = object_anonymous_id(object_id, type_id)
    return wire_call("group", idempotency_key=idempotency_key,
                     fields=dict(
        userId=user_id, anonymousId=anonymous_id, groupId=object_id,
        traits={**(traits or {}), "object_type_id": type_id}, timestamp=timestamp,
        context=context, integrations=integrations, messageId=message_id))


def relate(
    user_id: str, object_id: str, object_type_id: str | int = "1", *,
    traits: Mapping[str, Any] | None = None, timestamp: Any = None,
    context: Mapping[str, Any] | None = None,
    integrations: Mapping[str, bool] | None = None, message_id: str | None = None,
    idempotency_key: str | None = None,
) -> dict[str, Any]:
    """The wire call of :meth:`cio_outbox.Outbox.relate` (see there)."""
    if user_id is None:
        raise MessageError("group: userId is required to relate a person", field="userId")
    return upsert_object(
        object_id, object_type_id, traits=traits, user_id=user_id, timestamp=timestamp,
        context=context, integrations=integrations,
        message_id=message_id, idempotency_key=idempotency_key)


def delete_object(
    object_id: str, object_type_id: str | int = "1", *,
    anonymous_id: str | None = None, timestamp: Any = None,
    context: Mapping[str, Any] | None = None,
    integrations: Mapping[str, bool] | None = None, message_id: str | None = None,
    idempotency_key: str | None = None,
) -> dict[str, Any]:
    """The wire call of :meth:`cio_outbox.Outbox.delete_object` (see there)."""
    type_id = _type_id(object_type_id, "properties.objectTypeId")
    object_id = _object_id(object_id, "properties.objectId")
    if anonymous_id is None:
        anonymous_id = object_anonymous_id(object_id, type_id)
    return track_semantic(
        "Object Deleted", anonymous_id=anonymous_id,
        properties={"objectId": object_id, "objectTypeId": int(type_id)},
        timestamp=timestamp, context=context, integrations=integrations,
        message_id=message_id, idempotency_key=idempotency_key)


def unrelate(
    user_id: str, object_id: str, object_type_id: str | int = "1", *,
    timestamp: Any = None, context: Mapping[str, Any] | None = None,
    integrations: Mapping[str, bool] | None = None, message_id: str | None = None,
    idempotency_key: str | None = None,
) -> dict[str, Any]:
    """The wire call of :meth:`cio_outbox.Outbox.unrelate` (see there)."""
    type_id = _type_id(object_type_id, "properties.objectTypeId")
    object_id = _object_id(object_id, "properties.objectId")
    return track_semantic(
        "Relationship Deleted", user_id,
        properties={"objectId": object_id, "objectTypeId": int(type_id)},
        timestamp=timestamp, context=context, integrations=integrations,
        message_id=message_id, idempotency_key=idempotency_key)


# -- semantic events and bulk rows ------------------------------------------------------


def semantic_events(category: str | None = None) -> SemanticEventTable:
    """The semantic event catalogue as a table (see :meth:`cio_outbox.Outbox.semantic_events`)."""
    semantic = _semantic()
    if category is not None and category not in semantic.CATEGORIES:
        raise ValueError(f"category {category!r} is not one of: "
                         f"{', '.join(semantic.CATEGORIES)}")
    return SemanticEventTable(
        {"name": event.name, "category": event.category,
         "requires": event.required_fields, "description": event.description}
        for event in semantic.SEMANTIC_EVENTS.values()
        if category is None or event.category == category
    )


def enqueue_rows(
    storage: Storage, rows: Any, *, call_type: str = "identify", user_id: str | None = "id",
    anonymous_id: str | None = None, event: str | None = None,
    event_column: str | None = None,
    traits: Sequence[str] | Mapping[str, str] | None = None,
    properties: Sequence[str] | Mapping[str, str] | None = None,
    timestamp: str | None = None, message_id: str | None = None,
    idempotency_key: str | None = None, run: str | None = None,
    on_invalid: str = "skip", start: int = 0, chunk_size: int = DEFAULT_ROWS_CHUNK,
) -> EnqueueResult:
    """Enqueue one call per row into ``storage`` (see :meth:`cio_outbox.Outbox.enqueue_rows`)."""
    intake.check_on_invalid(on_invalid)
    if call_type not in ROW_CALL_TYPES:
        raise ValueError(f"call_type must be one of {', '.join(ROW_CALL_TYPES)}")
    if chunk_size < 1:
        raise ValueError("chunk_size must be at least 1")
    if user_id is None and anonymous_id is None:
        raise ValueError("name a user_id or anonymous_id column")
    if message_id is not None and idempotency_key is not None:
        raise ValueError("give either message_id or idempotency_key, not both")
    if call_type == "identify":
        if event is not None or event_column is not None or properties is not None:
            raise ValueError("identify rows take traits=, not event or properties")
        fields = traits
    else:
        if traits is not None:
            raise ValueError("track rows take properties=, not traits")
        if (event is None) == (event_column is None):
            raise ValueError("track rows need exactly one of event= or event_column=")
        fields = properties
    columns = _Columns(
        call_type=call_type, user_id=user_id, anonymous_id=anonymous_id, event=event,
        event_column=event_column, fields=fields, timestamp=timestamp,
        message_id=message_id, idempotency_key=idempotency_key)
    source = _rows_of(rows, columns, chunk_size)
    if on_invalid == "raise":
        return _rows_or_raise(storage, source, columns, run, start, chunk_size)
    return _rows_skipping(storage, source, columns, run, start, chunk_size)


def _row(row: Mapping[Any, Any], columns: _Columns, position: int,
         run: str | None) -> NewRow:
    fields = columns.fields(row, position, run)
    fields["type"] = columns.call_type
    return intake.prepare(fields, run, owned=True)

def _rows_skipping(storage: Storage, source: Iterable[Mapping[Any, Any]], columns: _Columns,
                   run: str | None, start: int, chunk_size: int) -> EnqueueResult:
    total = EnqueueResult()

    def rows() -> Iterator[NewRow]:
        for position, row in enumerate(source, start):
            try:
                yield _row(row, columns, position, run)
            except MessageError as exc:
                total.rejected.append(Rejection(position, str(exc), exc.field))

    total.added, total.skipped = intake.write(storage, rows(), chunk_size)
    return total

def _rows_or_raise(storage: Storage, source: Iterable[Mapping[Any, Any]], columns: _Columns,
                   run: str | None, start: int, chunk_size: int) -> EnqueueResult:
    rejected: list[Rejection] = []
    prepared: list[NewRow] = []
    for position, row in enumerate(source, start):
        try:
            prepared.append(_row(row, columns, position, run))
        except MessageError as exc:
            rejected.append(Rejection(position, str(exc), exc.field))
    if rejected:
        raise InvalidRowsError(rejected)
    added, skipped = intake.write(storage, prepared, chunk_size)
    return EnqueueResult(added=added, skipped=skipped)


def _device_context(context: Mapping[str, Any] | None, token: str,
                    device_type: str | None) -> dict[str, Any]:
    if not isinstance(token, str) or not token.strip():
        raise MessageError("track: context.device.token must be a non-empty string",
                           field="context.device.token")
    if device_type is not None and device_type not in DEVICE_TYPES:
        raise MessageError(f"track: context.device.type must be one of "
                           f"{', '.join(DEVICE_TYPES)} (got {device_type!r})",
                           field="context.device.type")
    merged = dict(context or {})
    device = dict(merged.get("device") or {})
    device["token"] = token
    if device_type is not None:
        device["type"] = device_type
    merged["device"] = device
    return merged
