"""The Outbox: the one object users hold. Enqueue calls, drain them, inspect and requeue.

>>> from cio_outbox import Outbox
>>> outbox = Outbox("migration.db")
>>> outbox.track("u1", "Signed Up", properties={"plan": "pro"}, run="import")
>>> outbox.drain(host="http://127.0.0.1:8765")

Every enqueue is a committed transaction: when the call returns, the message
survives a crash of this process (and, with ``synchronous="FULL"``, a power loss).
"""

from __future__ import annotations

import datetime as _dt
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from cio_outbox import intake, operations
from cio_outbox.config import ApiKey, Target, resolve_target
from cio_outbox.results import EnqueueResult, Progress, Rejection, WorkerResult
from cio_outbox.retention import parse_age as parse_age  # where it used to live
from cio_outbox.settings import (
    DEFAULT_GZIP,
    DEFAULT_OUTBOX,
    DEFAULT_STRICT_MODE,
    DEFAULT_TIMEOUT,
    Settings,
)
from cio_outbox.storage import Storage, open_storage
from cio_outbox.storage.base import CHUNK_ROWS

if TYPE_CHECKING:
    from cio_outbox.inspection import FailedPage
    from cio_outbox.messages import Message
    from cio_outbox.repair import FixResult
    from cio_outbox.retention import PurgePlan
    from cio_outbox.worker import Worker

__all__ = ["DEFAULT_PATH", "EnqueueResult", "Outbox", "Rejection", "default_location",
           "parse_age"]

DEFAULT_PATH = DEFAULT_OUTBOX


def default_location() -> str:
    """``CIO_OUTBOX`` if set, else ``./outbox.db``."""
    return Settings.from_env().outbox


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return _dt.datetime.fromtimestamp(ts, _dt.UTC).isoformat(timespec="milliseconds")


class Outbox:
    """A durable outbox of Pipelines API calls, in an SQLite file (or PostgreSQL URL).

    ``location`` defaults to ``CIO_OUTBOX`` or ``./outbox.db``. ``synchronous="FULL"``
    makes every enqueue survive a power loss too, at the cost of an fsync per commit.
    ``busy_timeout`` (SQLite, seconds, default 60) is how long a write waits for another
    process holding the file before it fails with a :class:`StorageError`.
    """

    def __init__(
        self,
        location: str | os.PathLike[str] | None = None,
        *,
        synchronous: str = "NORMAL",
        busy_timeout: float | None = None,
    ) -> None:
        self.location = os.fspath(location) if location is not None else default_location()
        options: dict[str, Any] = {}
        if not self.location.startswith(("postgresql://", "postgres://")):
            options["synchronous"] = synchronous
            if busy_timeout is not None:
                options["busy_timeout"] = busy_timeout
        self.storage: Storage = open_storage(self.location, **options)

    def __repr__(self) -> str:
        return f"Outbox({self.storage.location!r})"

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.storage.close()

    # -- enqueue -----------------------------------------------------------------------

    def enqueue(
        self,
        call: Mapping[str, Any] | Message,
        *,
        run: str | None = None,
        idempotency_key: str | None = None,
    ) -> EnqueueResult:
        """Write one call (wire shape dict or a Message); durable when this returns.

        >>> outbox.enqueue({"type": "track", "userId": "u1", "event": "Paid"})

        A call without ``timestamp`` is stamped with the time of this call. Raises
        :class:`MessageError` (naming the field) when the call is invalid; nothing is
        written then.
        """
        return intake.enqueue_one(self.storage, call, run=run, idempotency_key=idempotency_key)

    def enqueue_many(
        self,
        calls: Iterable[Mapping[str, Any] | Message],
        *,
        run: str | None = None,
        idempotency_keys: Iterable[str] | Callable[[int, Any], str] | None = None,
        on_invalid: str = "skip",
        chunk_size: int = CHUNK_ROWS,
        start: int = 0,
    ) -> EnqueueResult:
        """Write many calls in chunked transactions (each chunk is durable once written).

        >>> outbox.enqueue_many(calls, run="import", idempotency_keys=lambda i, call: call["id"])

        ``on_invalid="skip"`` (default) enqueues the valid calls and reports each invalid
        one in ``result.rejected`` with its index and reason; ``"raise"`` validates
        everything first and writes nothing if any call is invalid.
        ``idempotency_keys``: one key per call, or a function ``(index, call) -> key``,
        so that re-running an interrupted import adds no duplicates. Calls without a
        messageId or key get time-ordered ids, calls without ``timestamp`` the time of
        enqueue.
        """
        return intake.enqueue_many(
            self.storage, calls, run=run, idempotency_keys=idempotency_keys,
            on_invalid=on_invalid, chunk_size=chunk_size, start=start)

    def identify(
        self, user_id: str | None = None, *, anonymous_id: str | None = None,
        traits: Mapping[str, Any] | None = None, timestamp: Any = None,
        context: Mapping[str, Any] | None = None, integrations: Mapping[str, bool] | None = None,
        message_id: str | None = None, run: str | None = None, idempotency_key: str | None = None,
    ) -> EnqueueResult:
        """Create or update a person.

        >>> outbox.identify("u1", traits={"email": "ada@example.com"}, run="import")
        """
        return self.enqueue(operations.identify(
            user_id, anonymous_id=anonymous_id, traits=traits, timestamp=timestamp,
            context=context, integrations=integrations, message_id=message_id,
            idempotency_key=idempotency_key), run=run)

    def track(
        self, user_id: str | None, event: str, *, properties: Mapping[str, Any] | None = None,
        anonymous_id: str | None = None, timestamp: Any = None,
        context: Mapping[str, Any] | None = None, integrations: Mapping[str, bool] | None = None,
        message_id: str | None = None, run: str | None = None, idempotency_key: str | None = None,
    ) -> EnqueueResult:
        """Record an event a person performed.

        >>> outbox.track("u1", "Order Placed", properties={"total": 42.5})
        """
        return self.enqueue(operations.track(
            user_id, event, properties=properties, anonymous_id=anonymous_id,
            timestamp=timestamp, context=context, integrations=integrations,
            message_id=message_id, idempotency_key=idempotency_key), run=run)

    def page(
        self, user_id: str | None = None, name: str | None = None, *,
        properties: Mapping[str, Any] | None = None, anonymous_id: str | None = None,
        timestamp: Any = None, context: Mapping[str, Any] | None = None,
        integrations: Mapping[str, bool] | None = None, message_id: str | None = None,
        run: str | None = None, idempotency_key: str | None = None,
    ) -> EnqueueResult:
        """Record a web page view.

        >>> outbox.page("u1", "Pricing", properties={"url": "https://example.com/pricing"})
        """
        return self.enqueue(operations.page(
            user_id, name, properties=properties, anonymous_id=anonymous_id,
            timestamp=timestamp, context=context, integrations=integrations,
            message_id=message_id, idempotency_key=idempotency_key), run=run)

    def screen(
        self, user_id: str | None = None, name: str | None = None, *,
        properties: Mapping[str, Any] | None = None, anonymous_id: str | None = None,
        timestamp: Any = None, context: Mapping[str, Any] | None = None,
        integrations: Mapping[str, bool] | None = None, message_id: str | None = None,
        run: str | None = None, idempotency_key: str | None = None,
    ) -> EnqueueResult:
        """Record a mobile screen view.

        >>> outbox.screen("u1", "Settings")
        """
        return self.enqueue(operations.screen(
            user_id, name, properties=properties, anonymous_id=anonymous_id,
            timestamp=timestamp, context=context, integrations=integrations,
            message_id=message_id, idempotency_key=idempotency_key), run=run)

    def group(
        self, user_id: str | None, group_id: str, *, traits: Mapping[str, Any] | None = None,
        anonymous_id: str | None = None, timestamp: Any = None,
        context: Mapping[str, Any] | None = None, integrations: Mapping[str, bool] | None = None,
        message_id: str | None = None, run: str | None = None, idempotency_key: str | None = None,
    ) -> EnqueueResult:
        """Relate a person to a group (an object in Customer.io) and set its traits.

        >>> outbox.group("u1", "acme", traits={"object_type_id": "1", "name": "Acme"})
        """
        return self.enqueue(operations.group(
            user_id, group_id, traits=traits, anonymous_id=anonymous_id,
            timestamp=timestamp, context=context, integrations=integrations,
            message_id=message_id, idempotency_key=idempotency_key), run=run)

    def alias(
        self, user_id: str, previous_id: str, *, timestamp: Any = None,
        context: Mapping[str, Any] | None = None, integrations: Mapping[str, bool] | None = None,
        message_id: str | None = None, run: str | None = None, idempotency_key: str | None = None,
    ) -> EnqueueResult:
        """Merge the profile ``previous_id`` into ``user_id`` (sent to /alias, never in /batch).

        >>> outbox.alias("u1", "old-anon-id")
        """
        return self.enqueue(operations.alias(
            user_id, previous_id, timestamp=timestamp, context=context,
            integrations=integrations, message_id=message_id,
            idempotency_key=idempotency_key), run=run)

    # -- semantic events, people, devices, objects ------------------------------------

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
        return self.enqueue(operations.track_semantic(
            name, user_id, anonymous_id=anonymous_id, properties=properties,
            context=context, timestamp=timestamp, integrations=integrations,
            message_id=message_id, idempotency_key=idempotency_key), run=run)

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
        return self.enqueue(operations.delete_person(
            user_id, properties=properties, timestamp=timestamp, context=context,
            integrations=integrations, message_id=message_id,
            idempotency_key=idempotency_key), run=run)

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
        return self.enqueue(operations.suppress_person(
            user_id, properties=properties, timestamp=timestamp, context=context,
            integrations=integrations, message_id=message_id,
            idempotency_key=idempotency_key), run=run)

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
        return self.enqueue(operations.unsuppress_person(
            user_id, properties=properties, timestamp=timestamp, context=context,
            integrations=integrations, message_id=message_id,
            idempotency_key=idempotency_key), run=run)

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
        return self.enqueue(operations.add_device(
            user_id, token, device_type=device_type, attributes=attributes,
            timestamp=timestamp, context=context, integrations=integrations,
            message_id=message_id, idempotency_key=idempotency_key), run=run)

    def delete_device(
        self, user_id: str, token: str, *, device_type: str | None = None,
        timestamp: Any = None, context: Mapping[str, Any] | None = None,
        integrations: Mapping[str, bool] | None = None, message_id: str | None = None,
        run: str | None = None, idempotency_key: str | None = None,
    ) -> EnqueueResult:
        """Remove a push device from a person (track "Device Deleted").

        >>> outbox.delete_device("u1", "fcm-token-abc")
        """
        return self.enqueue(operations.delete_device(
            user_id, token, device_type=device_type, timestamp=timestamp,
            context=context, integrations=integrations, message_id=message_id,
            idempotency_key=idempotency_key), run=run)

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
        return self.enqueue(operations.upsert_object(
            object_id, object_type_id, traits=traits, user_id=user_id,
            anonymous_id=anonymous_id, timestamp=timestamp, context=context,
            integrations=integrations, message_id=message_id,
            idempotency_key=idempotency_key), run=run)

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
        return self.enqueue(operations.relate(
            user_id, object_id, object_type_id, traits=traits, timestamp=timestamp,
            context=context, integrations=integrations, message_id=message_id,
            idempotency_key=idempotency_key), run=run)

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
        return self.enqueue(operations.delete_object(
            object_id, object_type_id, anonymous_id=anonymous_id, timestamp=timestamp,
            context=context, integrations=integrations, message_id=message_id,
            idempotency_key=idempotency_key), run=run)

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
        return self.enqueue(operations.unrelate(
            user_id, object_id, object_type_id, timestamp=timestamp, context=context,
            integrations=integrations, message_id=message_id,
            idempotency_key=idempotency_key), run=run)

    def semantic_events(self, category: str | None = None) -> operations.SemanticEventTable:
        """The catalogue of semantic events, one row per event, for browsing in a notebook.

        >>> outbox.semantic_events("device")
        [{'name': 'Device Created or Updated', 'category': 'device', 'requires': (...), ...}]

        Each row has ``name``, ``category``, ``requires`` (the field paths the event needs)
        and ``description``. ``category`` is one of ``semantic.CATEGORIES``.
        """
        return operations.semantic_events(category)

    def enqueue_rows(
        self, rows: Any, *, call_type: str = "identify", user_id: str | None = "id",
        anonymous_id: str | None = None, event: str | None = None,
        event_column: str | None = None,
        traits: Sequence[str] | Mapping[str, str] | None = None,
        properties: Sequence[str] | Mapping[str, str] | None = None,
        timestamp: str | None = None, message_id: str | None = None,
        idempotency_key: str | None = None, run: str | None = None,
        on_invalid: str = "skip", start: int = 0, chunk_size: int = CHUNK_ROWS,
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
        return operations.enqueue_rows(
            self.storage, rows, call_type=call_type, user_id=user_id,
            anonymous_id=anonymous_id, event=event, event_column=event_column, traits=traits,
            properties=properties, timestamp=timestamp, message_id=message_id,
            idempotency_key=idempotency_key, run=run, on_invalid=on_invalid, start=start,
            chunk_size=chunk_size)

    def sync(self, source: Any, *, key: str, **options: Any) -> Any:
        """Make Customer.io match a table, enqueueing only rows whose key is new or whose
        traits changed since the last sync of the same name (see :mod:`cio_outbox.sync`).

        >>> outbox.sync("customers.csv", key="id")                     # doctest: +SKIP
        >>> outbox.sync(people_df, key="id", name="crm-people", dry_run=True)  # doctest: +SKIP

        ``source``: a CSV or JSONL file (gzip too), Parquet or Arrow (needs pyarrow), a
        pandas or polars DataFrame, a pyarrow Table or an iterable of dicts. Options:
        ``name`` (default: the file name; required for rows from Python), ``mapping``
        (``["Lifetime Value=traits.ltv:float", ...]``), ``objects=True`` with
        ``object_type_id``, ``changed_only``, ``clear_missing_traits``,
        ``delete_missing`` with ``max_delete_share`` (default 0.05), ``dry_run``,
        ``format``, ``delimiter``, ``on_progress``. Returns a :class:`SyncResult`;
        raises :class:`DeletionRefused` when too many keys would be deleted.
        """
        from cio_outbox.sync import sync

        return sync(self.storage, source, key=key, **options)

    # -- draining ----------------------------------------------------------------------

    def worker(
        self,
        *,
        key: str | ApiKey | None = None,
        host: str | None = None,
        region: str | None = None,
        gzip: bool = DEFAULT_GZIP,
        allow_insecure: bool = False,
        timeout: float | tuple[float, float] = DEFAULT_TIMEOUT,
        strict_mode: bool = DEFAULT_STRICT_MODE,
        **options: Any,
    ) -> Worker:
        """A :class:`Worker` for this outbox. The key defaults to ``CIO_API_KEY``, the host
        to ``CIO_HOST``, the region to ``CIO_REGION`` (see README "Configuration"); the
        other defaults are in :mod:`cio_outbox.settings`."""
        from cio_outbox.client import Client  # requests and tenacity load only to send
        from cio_outbox.worker import Worker

        env = Settings.from_env()
        api_key = key if isinstance(key, ApiKey) else (
            ApiKey(key) if key is not None else ApiKey.from_env()
        )
        target: Target = resolve_target(
            api_key, host=host or env.host, region=region or env.region,
            allow_insecure=allow_insecure,
        )
        client = Client(api_key, target, gzip=gzip, timeout=timeout, strict_mode=strict_mode)
        return Worker(self.storage, client, **options)

    def drain(
        self,
        *,
        key: str | ApiKey | None = None,
        host: str | None = None,
        region: str | None = None,
        run: str | None = None,
        progress: bool = True,
        max_seconds: float | None = None,
        **options: Any,
    ) -> dict[str, Any]:
        """Run a worker until nothing is pending or in flight, then return what it did.

        ``max_seconds`` stops it earlier (cleanly: rows not sent stay pending). Other
        options go to :class:`Worker` (``concurrency``, ``max_attempts``, ``max_rps``...).

        >>> outbox.drain(host=sandbox.url, key=sandbox.key)
        {'sent': 1000, 'failed': 0, ...}
        """
        if progress and "on_progress" not in options:
            options["on_progress"] = _print_progress
            options.setdefault("progress_interval", 2.0)
        worker = self.worker(key=key, host=host, region=region, run=run, **options)
        try:
            result: WorkerResult = worker.run(until_empty=True, timeout=max_seconds)
        finally:
            worker.client.close()
        if progress:
            print(file=sys.stdout, flush=True)
        return result.as_dict()

    # -- inspection --------------------------------------------------------------------

    def status(self, run: str | None = None) -> dict[str, Any]:
        """Counts by state (``pending``, ``in_flight``, ``sent``, ``failed``) at the top level,
        plus the oldest pending message's age, the last error, the recent send rate, and
        ``leases``: which worker ids hold the rows in flight, how many, and until when."""
        counts = self.storage.counts(run)
        oldest = self.storage.oldest_pending(run)
        now = time.time()
        sent_last_minute = self.storage.sent_since(now - 60, run)
        result: dict[str, Any] = dict(counts)
        result["total"] = sum(counts.values())
        result["run"] = run
        result["oldest_pending"] = _iso(oldest)
        result["oldest_pending_age_s"] = round(now - oldest, 1) if oldest else None
        last = self.storage.last_error(run)
        result["last_error"] = (
            {"at": _iso(last["at"]), "error": last["error"], "status_code": last["status_code"]}
            if last else None
        )
        result["rate_last_minute"] = round(sent_last_minute / 60.0, 1)
        # Who holds the rows in flight, and until when: a worker that died holds its
        # lanes until then (unless restarted with the same --worker-id).
        result["leases"] = [
            {"worker_id": e["worker_id"], "rows": int(e["rows"]),
             "expires_at": _iso(e["expires_last"]),
             "expires_in_s": round(max(0.0, e["expires_last"] - now), 1)}
            for e in self.storage.leases(run)
        ]
        if run is None:
            result["runs"] = self.storage.runs()
        return result

    def failed(self, run: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Dead-lettered rows: id, messageId, run, type, person (userId, else anonymousId),
        attempts, the server's error, and a payload summary. The full payload is in
        :meth:`history` or :meth:`rows`."""
        return [_summary(row) for row in self.storage.failed(run, limit)]

    def retry(
        self, ids: Iterable[int] | None = None, *, run: str | None = None, all: bool = False
    ) -> int:
        """Requeue dead-lettered rows (by id, by run, or all); returns how many. Ids that are
        not failed rows raise :class:`cio_outbox.repair.UnknownRowsError`."""
        from cio_outbox import repair

        return repair.retry(self, ids, run=run, all=all)

    def replace(self, message_id: str, call: Mapping[str, Any], *,
                allow_person_change: bool = False) -> dict[str, Any]:
        """Fix a dead-lettered message: validate the corrected call, store it in place of the
        old payload under the same messageId and run, and make it pending again.

        >>> outbox.replace(row["messageId"], {"type": "identify", "userId": "u9",
        ...                                   "traits": {"createdAt": "2022-07-05T00:00:00Z"}})

        Use it when the server refused what was stored (``retry`` would only resend the
        same payload). The old error stays in ``last_error`` behind ``replaced; was:``.
        A call for another person is refused unless ``allow_person_change`` is true.
        """
        from cio_outbox import repair

        return repair.replace(self, message_id, call, allow_person_change=allow_person_change)

    def history(self, message_id: str) -> dict[str, Any] | None:
        """One message's row and every HTTP attempt that carried it."""
        row = self.storage.message(message_id)
        if row is None:
            return None
        attempts = self.storage.attempts_for(row["id"])
        return {
            "message": _row_view(row),
            "attempts": [_attempt_view(a) for a in attempts],
        }

    def log(self, run: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """The audit trail: the most recent HTTP attempts (optionally of one run)."""
        return [_attempt_view(a) for a in self.storage.attempts(run, limit)]

    def rows(self, *, run: str | None = None, status: str | None = None,
             limit: int = 100) -> list[dict[str, Any]]:
        """Rows of the outbox, for audits: filter by run and status."""
        return [_row_view(row) for row in self.storage.rows(run=run, status=status, limit=limit)]

    # -- retention and data protection -------------------------------------------------

    def purge(self, older_than: str | float | _dt.timedelta | PurgePlan) -> int:
        """Delete sent rows sent longer ago than ``older_than`` (``"30d"``, ``"15min"``);
        returns how many. :meth:`purge_plan` shows the same rows without deleting them."""
        from cio_outbox import retention

        return retention.purge(self.storage, older_than)

    def forget(self, person_id: str) -> int:
        """Remove every row naming this userId/anonymousId, and leave no trace of it in the file.

        The audit trail keeps its counts; error texts naming the person are redacted.
        """
        return int(self.forget_report(person_id)["deleted"])

    def forget_report(self, person_id: str) -> dict[str, Any]:
        """:meth:`forget`, returning what it did: ``deleted`` rows, ``by_status``,
        ``redacted`` audit texts, ``sync_keys`` and ``traces_kept_by``, the process ids of
        other PostgreSQL clients whose transactions, open since before the forget, kept the
        deleted rows in the table files (empty when none is left; forget the same person
        again once they end)."""
        if not person_id or not str(person_id).strip():
            raise ValueError("forget needs a non-empty user id")
        return self.storage.forget(str(person_id))

    # -- repair and inspection at scale (cio_outbox.repair, .retention, .inspection) ----

    def fix_failed(self, fix: Callable[[dict[str, Any]], Mapping[str, Any] | None], *,
                   run: str | None = None, dry_run: bool = False,
                   allow_person_change: bool = False) -> FixResult:
        """Apply ``fix`` to each failed payload (of ``run``) and requeue the corrected calls;
        see :func:`cio_outbox.repair.fix_failed`.

        >>> outbox.fix_failed(lambda p: {**p, "event": "Order Completed"}, run="orders",
        ...                   dry_run=True)
        """
        from cio_outbox import repair

        return repair.fix_failed(self, fix, run=run, dry_run=dry_run,
                                 allow_person_change=allow_person_change)

    def purge_plan(self, older_than: str | float | _dt.timedelta) -> PurgePlan:
        """What :meth:`purge` would delete now (rows by run, sent_at range); deletes nothing."""
        from cio_outbox import retention

        return retention.plan_purge(self.storage, older_than)

    def failed_page(self, run: str | None = None, limit: int = 100) -> FailedPage:
        """Up to ``limit`` failed rows and the number of failed rows in all."""
        from cio_outbox import inspection

        return inspection.failed_page(self, run, limit)

    def check_run(self, run: str | None) -> None:
        """Raise :class:`cio_outbox.inspection.UnknownRunError` if ``run`` has no rows."""
        from cio_outbox import inspection

        inspection.check_run(self.storage, run)

    def timeline(self, run: str) -> list[dict[str, Any]]:
        """A run's sent, dead-lettered and pending counts after each HTTP attempt, rows ready
        for ``pandas.DataFrame``; see :func:`cio_outbox.inspection.timeline`."""
        from cio_outbox import inspection

        return inspection.timeline(self, run)


def _print_progress(progress: Progress) -> None:
    end = "\r" if sys.stdout.isatty() else "\n"
    print(progress.line(), end=end, file=sys.stdout, flush=True)


def _row_view(row: dict[str, Any]) -> dict[str, Any]:
    view = dict(row)
    for name in ("created_at", "updated_at", "sent_at", "next_attempt_at", "lease_expires_at"):
        if name in view:
            view[name] = _iso(view[name])
    return view


def _attempt_view(attempt: dict[str, Any]) -> dict[str, Any]:
    view = {k: v for k, v in attempt.items() if k not in ("row_ranges", "min_row_id",
                                                          "max_row_id")}
    view["at"] = _iso(attempt["at"])
    return view


def _summary(row: dict[str, Any]) -> dict[str, Any]:
    import json

    payload = json.loads(row["payload"])
    what = payload.get("event") or payload.get("name") or payload.get("groupId") or ""
    who = payload.get("userId") or payload.get("anonymousId") or ""
    return {
        "id": row["id"],
        "messageId": row["message_id"],
        "run": row["run"],
        "type": row["call_type"],
        "person": row["person"],
        "attempts": row["attempts"],
        "error": row["last_error"],
        "summary": f"{row['call_type']} {what} for {who}".replace("  ", " ").strip(),
        "updated_at": _iso(row["updated_at"]),
    }
