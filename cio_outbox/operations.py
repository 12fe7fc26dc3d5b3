"""Calls built on the six basic ones: people, semantic events, devices, objects, bulk rows.

Kept apart from outbox.py so the core stays small; :class:`cio_outbox.Outbox`
inherits these methods, so users find every operation on the Outbox.

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

import hashlib
import html
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from cio_outbox import intake
from cio_outbox.messages import (
    IDEMPOTENCY_NAMESPACE,
    Message,
    MessageError,
    message_id_for,
)
from cio_outbox.results import EnqueueResult, Rejection
from cio_outbox.storage.base import CHUNK_ROWS, NewRow

if TYPE_CHECKING:
    from cio_outbox.storage.base import Storage

__all__ = ["DEVICE_TYPES", "InvalidRowsError", "Operations", "SemanticEventTable",
           "object_anonymous_id"]

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
        self._prefix: dict[str, str] = {}
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
            if event is self.event:
                prefix = self._prefix.get(run)
                if prefix is None:
                    prefix = self._prefix[run] = _row_key_prefix(run, self.call_type, event)
            else:
                prefix = _row_key_prefix(run, self.call_type, event)
            fields["messageId"] = _fast_message_id(f"{prefix}{position}]")
        return fields


def _row_key_prefix(run: str, call_type: str, event: Any) -> str:
    """``json.dumps(["rows", run, call_type, event, position])`` without its position."""
    return json.dumps(["rows", run, call_type, event, 0])[:-2]


def _fast_message_id(key: str) -> str:
    """``message_id_for(key)`` (a UUID5 in the idempotency namespace), three times faster."""
    digest = bytearray(hashlib.sha1(_NAMESPACE + key.encode("utf-8")).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50
    digest[8] = (digest[8] & 0x3F) | 0x80
    h = digest.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


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


class Operations:
    """Mixin for :class:`cio_outbox.outbox.Outbox`; relies on its ``enqueue`` and ``_call``."""

    if TYPE_CHECKING:
        storage: Storage

        def enqueue(self, call: Mapping[str, Any] | Message, *, run: str | None = None,
                    idempotency_key: str | None = None) -> EnqueueResult: ...

        def enqueue_many(self, calls: Iterable[Mapping[str, Any] | Message], *,
                         run: str | None = None, idempotency_keys: Any = None,
                         on_invalid: str = "skip", chunk_size: int = CHUNK_ROWS,
                         start: int = 0) -> EnqueueResult: ...

        def _call(self, call_type: str, run: str | None, idempotency_key: str | None,
                  fields: dict[str, Any]) -> EnqueueResult: ...

    # -- semantic events -----------------------------------------------------------------

    def track_semantic(
        self, name: str, user_id: str | None = None, *, anonymous_id: str | None = None,
        properties: Mapping[str, Any] | None = None, context: Mapping[str, Any] | None = None,
        timestamp: Any = None, integrations: Mapping[str, bool] | None = None,
        message_id: str | None = None, run: str | None = None,
        idempotency_key: str | None = None,
    ) -> EnqueueResult:
        """Send a semantic event (a track call whose name means something to Customer.io).

        >>> outbox.track_semantic("Email Bounced", "u1", properties={"email_id": "e-42"})

        ``name`` must be in the catalogue (``outbox.semantic_events()``); the call is checked
        against that event's schema before it is written, and a :class:`MessageError` names
        the event and the missing field, e.g. ``Email Bounced: properties.email_id is
        required (Email Bounced requires userId or anonymousId, properties.email_id)``.
        Custom events go through :meth:`track`.
        """
        try:
            _semantic().lookup(name)
        except KeyError as exc:
            raise MessageError(f"{exc.args[0]}; custom events go through track()",
                               field="event") from None
        fields = dict(userId=user_id, anonymousId=anonymous_id, event=name,
                      properties=properties, context=context, timestamp=timestamp,
                      integrations=integrations)
        # enqueue checks the event's required fields, as it does for every track call.
        return self.enqueue(wire_call("track", fields, idempotency_key, message_id), run=run)

    def semantic_events(self, category: str | None = None) -> SemanticEventTable:
        """The catalogue of semantic events, one row per event, for browsing in a notebook.

        >>> outbox.semantic_events("device")
        [{'name': 'Device Created or Updated', 'category': 'device', 'requires': (...), ...}]

        Each row has ``name``, ``category``, ``requires`` (the field paths the event needs)
        and ``description``. ``category`` is one of ``semantic.CATEGORIES``.
        """
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

    # -- people --------------------------------------------------------------------------

    def delete_person(
        self, user_id: str, *, properties: Mapping[str, Any] | None = None,
        timestamp: Any = None, context: Mapping[str, Any] | None = None,
        integrations: Mapping[str, bool] | None = None, message_id: str | None = None,
        run: str | None = None, idempotency_key: str | None = None,
    ) -> EnqueueResult:
        """Delete a person from the workspace (track "User Deleted").

        >>> outbox.delete_person("u1", run="cleanup")

        ``user_id`` may also be the person's email address: Customer.io then looks the
        person up by email.
        """
        return self.track_semantic(
            "User Deleted", user_id, properties=properties, timestamp=timestamp,
            context=context, integrations=integrations, message_id=message_id, run=run,
            idempotency_key=idempotency_key)

    def suppress_person(
        self, user_id: str, *, properties: Mapping[str, Any] | None = None,
        timestamp: Any = None, context: Mapping[str, Any] | None = None,
        integrations: Mapping[str, bool] | None = None, message_id: str | None = None,
        run: str | None = None, idempotency_key: str | None = None,
    ) -> EnqueueResult:
        """Delete a person and keep the id from being added again (track "User Suppressed").

        >>> outbox.suppress_person("u1")

        Meant for compliance requests (GDPR right to be forgotten); see also
        :meth:`forget`, which removes the person from this outbox file.
        """
        return self.track_semantic(
            "User Suppressed", user_id, properties=properties, timestamp=timestamp,
            context=context, integrations=integrations, message_id=message_id, run=run,
            idempotency_key=idempotency_key)

    def unsuppress_person(
        self, user_id: str, *, properties: Mapping[str, Any] | None = None,
        timestamp: Any = None, context: Mapping[str, Any] | None = None,
        integrations: Mapping[str, bool] | None = None, message_id: str | None = None,
        run: str | None = None, idempotency_key: str | None = None,
    ) -> EnqueueResult:
        """Allow a suppressed id to be added again (track "User Unsuppressed").

        >>> outbox.unsuppress_person("u1")

        Nothing of the suppressed person comes back; the id can simply be identified anew.
        """
        return self.track_semantic(
            "User Unsuppressed", user_id, properties=properties, timestamp=timestamp,
            context=context, integrations=integrations, message_id=message_id, run=run,
            idempotency_key=idempotency_key)

    # -- devices -------------------------------------------------------------------------

    def add_device(
        self, user_id: str, token: str, *, device_type: str | None = None,
        attributes: Mapping[str, Any] | None = None, timestamp: Any = None,
        context: Mapping[str, Any] | None = None,
        integrations: Mapping[str, bool] | None = None, message_id: str | None = None,
        run: str | None = None, idempotency_key: str | None = None,
    ) -> EnqueueResult:
        """Add a push device to a person, or update it (track "Device Created or Updated").

        >>> outbox.add_device("u1", "fcm-token-abc", device_type="android",
        ...                   attributes={"app_version": "2.4.0"})

        ``token`` goes to ``context.device.token`` and ``device_type`` ("ios" or "android")
        to ``context.device.type``; ``attributes`` are sent as the event's ``properties``.
        Other ``context`` keys are kept.
        """
        return self.track_semantic(
            "Device Created or Updated", user_id, properties=attributes,
            context=_device_context(context, token, device_type), timestamp=timestamp,
            integrations=integrations, message_id=message_id, run=run,
            idempotency_key=idempotency_key)

    def delete_device(
        self, user_id: str, token: str, *, device_type: str | None = None,
        timestamp: Any = None, context: Mapping[str, Any] | None = None,
        integrations: Mapping[str, bool] | None = None, message_id: str | None = None,
        run: str | None = None, idempotency_key: str | None = None,
    ) -> EnqueueResult:
        """Remove a push device from a person (track "Device Deleted").

        >>> outbox.delete_device("u1", "fcm-token-abc")
        """
        return self.track_semantic(
            "Device Deleted", user_id, context=_device_context(context, token, device_type),
            timestamp=timestamp, integrations=integrations, message_id=message_id, run=run,
            idempotency_key=idempotency_key)

    # -- objects and relationships -------------------------------------------------------

    def upsert_object(
        self, object_id: str, object_type_id: str | int = "1", *,
        traits: Mapping[str, Any] | None = None, user_id: str | None = None,
        anonymous_id: str | None = None, timestamp: Any = None,
        context: Mapping[str, Any] | None = None,
        integrations: Mapping[str, bool] | None = None, message_id: str | None = None,
        run: str | None = None, idempotency_key: str | None = None,
    ) -> EnqueueResult:
        """Create or update an object (a group call), optionally relating a person to it.

        >>> outbox.upsert_object("acme", traits={"name": "Acme", "plan": "pro"})
        >>> outbox.upsert_object("acme", "2", traits={"name": "Acme"}, user_id="u1")

        ``traits`` are the object's attributes; ``traits.object_type_id`` is set to
        ``object_type_id`` as a string of digits. With neither ``user_id`` nor
        ``anonymous_id`` the call carries ``anonymousId`` ``object:<type>:<id>`` (see
        :func:`object_anonymous_id`), so that no real person is related to the object.
        """
        type_id = _type_id(object_type_id, "traits.object_type_id")
        object_id = _object_id(object_id, "groupId")
        if user_id is None and anonymous_id is None:
            anonymous_id = object_anonymous_id(object_id, type_id)
        return self._call("group", run, idempotency_key, dict(
            userId=user_id, anonymousId=anonymous_id, groupId=object_id,
            traits={**(traits or {}), "object_type_id": type_id}, timestamp=timestamp,
            context=context, integrations=integrations, messageId=message_id))

    def relate(
        self, user_id: str, object_id: str, object_type_id: str | int = "1", *,
        traits: Mapping[str, Any] | None = None, timestamp: Any = None,
        context: Mapping[str, Any] | None = None,
        integrations: Mapping[str, bool] | None = None, message_id: str | None = None,
        run: str | None = None, idempotency_key: str | None = None,
    ) -> EnqueueResult:
        """Relate a person to an object, creating the object if needed (a group call).

        >>> outbox.relate("u1", "acme")
        >>> outbox.relate("u1", "course-7", 2, traits={"title": "Statistics"})

        ``traits`` update the object's attributes. Relationship attributes are not sent:
        the API document defines no field for them in group calls.
        """
        if user_id is None:
            raise MessageError("group: userId is required to relate a person", field="userId")
        return self.upsert_object(
            object_id, object_type_id, traits=traits, user_id=user_id, timestamp=timestamp,
            context=context, integrations=integrations, message_id=message_id, run=run,
            idempotency_key=idempotency_key)

    def delete_object(
        self, object_id: str, object_type_id: str | int = "1", *,
        anonymous_id: str | None = None, timestamp: Any = None,
        context: Mapping[str, Any] | None = None,
        integrations: Mapping[str, bool] | None = None, message_id: str | None = None,
        run: str | None = None, idempotency_key: str | None = None,
    ) -> EnqueueResult:
        """Delete an object (track "Object Deleted" with properties objectId, objectTypeId).

        >>> outbox.delete_object("acme")

        ``objectTypeId`` is sent as an integer, the type the API document gives it. The event
        needs an ``anonymousId`` whose value Customer.io ignores: by default the same
        ``object:<type>:<id>`` that :meth:`upsert_object` uses, which keeps an object's
        upserts and its deletion in order.
        """
        type_id = _type_id(object_type_id, "properties.objectTypeId")
        object_id = _object_id(object_id, "properties.objectId")
        if anonymous_id is None:
            anonymous_id = object_anonymous_id(object_id, type_id)
        return self.track_semantic(
            "Object Deleted", anonymous_id=anonymous_id,
            properties={"objectId": object_id, "objectTypeId": int(type_id)},
            timestamp=timestamp, context=context, integrations=integrations,
            message_id=message_id, run=run, idempotency_key=idempotency_key)

    def unrelate(
        self, user_id: str, object_id: str, object_type_id: str | int = "1", *,
        timestamp: Any = None, context: Mapping[str, Any] | None = None,
        integrations: Mapping[str, bool] | None = None, message_id: str | None = None,
        run: str | None = None, idempotency_key: str | None = None,
    ) -> EnqueueResult:
        """Remove the relationship between a person and an object (track "Relationship Deleted").

        >>> outbox.unrelate("u1", "acme")

        The object itself stays; ``objectTypeId`` is sent as an integer.
        """
        type_id = _type_id(object_type_id, "properties.objectTypeId")
        object_id = _object_id(object_id, "properties.objectId")
        return self.track_semantic(
            "Relationship Deleted", user_id,
            properties={"objectId": object_id, "objectTypeId": int(type_id)},
            timestamp=timestamp, context=context, integrations=integrations,
            message_id=message_id, run=run, idempotency_key=idempotency_key)

    # -- bulk ----------------------------------------------------------------------------

    def enqueue_rows(
        self, rows: Any, *, call_type: str = "identify", user_id: str | None = "id",
        anonymous_id: str | None = None, event: str | None = None,
        event_column: str | None = None,
        traits: Sequence[str] | Mapping[str, str] | None = None,
        properties: Sequence[str] | Mapping[str, str] | None = None,
        timestamp: str | None = None, message_id: str | None = None,
        idempotency_key: str | None = None, run: str | None = None,
        on_invalid: str = "skip", start: int = 0, chunk_size: int = DEFAULT_ROWS_CHUNK,
    ) -> EnqueueResult:
        """Enqueue one identify or track call per row of a DataFrame or an iterable of dicts.

        >>> outbox.enqueue_rows(people_df, user_id="id", traits=["email", "plan"],
        ...                     run="import-2024-05")
        >>> outbox.enqueue_rows(orders, call_type="track", event="Order Completed",
        ...                     user_id="customer_id", timestamp="ordered_at", run="orders")

        Columns: ``user_id`` / ``anonymous_id`` name the id columns; ``traits`` (identify) or
        ``properties`` (track) list the columns to send (a ``{field: column}`` mapping
        renames), and by default every other column is sent. A track needs ``event`` (one
        name for all rows) or ``event_column``. ``timestamp`` names a column of datetimes or
        ISO-8601 strings.

        Values: missing values (None, NaN, NaT, pandas NA) are left out of traits and
        properties, never sent as null (a trait you want to clear needs an explicit call).
        numpy scalars become numbers, datetimes and pandas Timestamps ISO-8601 UTC strings.
        Integral float ids (42.0, from an int column with gaps) are sent as "42".

        Reruns: with ``run``, each row's messageId derives from the run, the call type, the
        event and the row number (from ``start``), so enqueueing the same rows again adds
        nothing; keep one run name per source table. ``idempotency_key`` names a column whose
        value is the idempotency key instead, ``message_id`` a column holding messageIds.
        Without any of them every row gets a random messageId.

        Invalid rows: ``on_invalid="skip"`` (default) enqueues the valid rows and lists the
        others in ``result.rejected`` (``index`` is the row number, counted from ``start``,
        with the reason and field). ``"raise"`` checks every row first and writes nothing if
        any is invalid, raising :class:`InvalidRowsError` (a MessageError) that lists them.
        Track rows whose event is a semantic event are checked against its schema too.

        A DataFrame is read ``chunk_size`` rows at a time; pandas is not needed otherwise.
        """
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
            return self._rows_or_raise(source, columns, run, start, chunk_size)
        return self._rows_skipping(source, columns, run, start, chunk_size)

    # -- helpers -------------------------------------------------------------------------

    def _row(self, row: Mapping[Any, Any], columns: _Columns, position: int,
             run: str | None) -> NewRow:
        fields = columns.fields(row, position, run)
        fields["type"] = columns.call_type
        return intake.prepare(fields, run, owned=True)

    def _rows_skipping(self, source: Iterable[Mapping[Any, Any]], columns: _Columns,
                       run: str | None, start: int, chunk_size: int) -> EnqueueResult:
        total = EnqueueResult()

        def rows() -> Iterator[NewRow]:
            for position, row in enumerate(source, start):
                try:
                    yield self._row(row, columns, position, run)
                except MessageError as exc:
                    total.rejected.append(Rejection(position, str(exc), exc.field))

        total.added, total.skipped = intake.write(self.storage, rows(), chunk_size)
        return total

    def _rows_or_raise(self, source: Iterable[Mapping[Any, Any]], columns: _Columns,
                       run: str | None, start: int, chunk_size: int) -> EnqueueResult:
        rejected: list[Rejection] = []
        prepared: list[NewRow] = []
        for position, row in enumerate(source, start):
            try:
                prepared.append(self._row(row, columns, position, run))
            except MessageError as exc:
                rejected.append(Rejection(position, str(exc), exc.field))
        if rejected:
            raise InvalidRowsError(rejected)
        added, skipped = intake.write(self.storage, prepared, chunk_size)
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
