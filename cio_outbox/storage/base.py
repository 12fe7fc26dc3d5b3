"""The storage seam: what an outbox backend must do.

The worker, the Outbox API and the CLI talk only to this interface, so a second
backend (PostgreSQL) implements these methods and nothing else changes. Choosing
which rows fit one request is shared: backends supply the pending rows of free lanes
(see :mod:`cio_outbox.storage.lanes`), and :func:`cio_outbox.batch.select` decides.

Fencing: every claim stores a fresh token on the rows it leases (``Row.claim``). Every
later change to a claimed row (lease extended, sent, released, dead-lettered, attempt
counted) applies only while the row is still ``in_flight`` under that token, checked in
the same statement, and returns the ids it changed. A worker paused past its lease thus
cannot overwrite what the next holder (or an operator) did with the row.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from cio_outbox.errors import CioOutboxError

STATUSES = ("pending", "in_flight", "sent", "failed")


class StorageError(CioOutboxError, RuntimeError):
    """The outbox file or database cannot be used; the text says which and what to do."""


@dataclass(slots=True)
class Row:
    """One outbox row as the worker sees it; ``claim`` is the token of the claim holding it."""

    id: int
    message_id: str
    run: str
    call_type: str
    person: str
    payload: str
    size: int
    attempts: int = 0
    claim: str = ""

    @property
    def endpoint(self) -> str:
        return "alias" if self.call_type == "alias" else "batch"


# Not frozen: a frozen dataclass sets each field through object.__setattr__, which made
# building a NewRow cost 1.3 us instead of 0.36 us, once per enqueued message.
@dataclass(slots=True)
class NewRow:
    """A validated message ready to be written (treat it as read-only)."""

    message_id: str
    run: str
    call_type: str
    person: str
    payload: str
    size: int


@dataclass(slots=True)
class Attempt:
    """One HTTP attempt, as recorded in the audit trail."""

    worker_id: str
    endpoint: str
    rows: Sequence[Row]
    bytes: int
    status_code: int | None
    latency_ms: float | None
    outcome: str  # sent, retry, rejected, auth, fatal (late: stored for rows no longer held)
    error: str | None = None
    runs: list[str] = field(default_factory=list)


def row_ranges(ids: Iterable[int]) -> list[list[int]]:
    """Compress sorted-or-not row ids into [start, end] ranges for the audit trail."""
    ranges: list[list[int]] = []
    for row_id in sorted(ids):
        if ranges and ranges[-1][1] + 1 == row_id:
            ranges[-1][1] = row_id
        else:
            ranges.append([row_id, row_id])
    return ranges


def in_ranges(row_id: int, ranges: Iterable[Sequence[int]]) -> bool:
    return any(start <= row_id <= end for start, end in ranges)


#: Rows per transaction in bulk inserts. Each commit writes every index page it touched,
#: and with random messageIds (idempotency keys) that is nearly a page per row when chunks
#: are small: at 1,000,000 rows, 2,000-row chunks cost about 100 us a row in SQLite and
#: 20,000-row chunks (with a 64 MiB cache) about 35 us. Larger chunks hold the write lock
#: longer (about a second here) while workers wait to claim.
CHUNK_ROWS = 20_000


class Storage(Protocol):
    """What every outbox backend provides. Times are Unix seconds (float)."""

    location: str

    def insert(self, rows: Iterable[NewRow], *, chunk_size: int = CHUNK_ROWS) -> int:
        """Write rows, skipping any whose message_id exists; return how many were added."""

    def claim(
        self,
        worker_id: str,
        *,
        lease_seconds: float,
        max_bytes: int,
        max_messages: int,
        run: str | None = None,
        share: int = 1,
    ) -> list[Row]:
        """Atomically take the next rows that fit one request and lease them to worker_id.

        ``share``: how many claimants of the caller want rows now, this one included (a
        worker's senders between requests); the free lanes are shared among them."""

    def extend_lease(self, rows: Sequence[Row], lease_seconds: float) -> list[int]:
        """Lease the rows still held by their claim for lease_seconds from now; their ids."""

    def record_attempt(self, attempt: Attempt, *, count: bool, sent: bool = False) -> list[int]:
        """Audit one HTTP attempt and return the ids of its rows still held.

        For held rows the entry has the attempt's outcome; with count, each gets one more
        attempt and its last error; with sent, it is marked sent in the same transaction.
        Rows no longer held get an entry with outcome ``late`` (same status code and
        error) and nothing else changes for them."""

    def mark_sent(self, rows: Sequence[Row]) -> list[int]: ...

    def dead_letter(self, errors: Sequence[tuple[Row, str]], *, attempted: bool = False
                    ) -> list[int]:
        """Mark held rows failed with their errors; ``attempted`` also counts an attempt
        for each (a refusal that named them among others, which counted none)."""

    def release(
        self, rows: Sequence[Row], *, next_attempt_at: float | None = None
    ) -> list[int]:
        """Give held rows back: pending again, optionally not before next_attempt_at."""

    def release_worker(self, worker_id: str) -> int:
        """Give back every row a (restarted) worker id still holds."""

    def leases(self, run: str | None = None) -> list[dict[str, Any]]:
        """Who holds rows in flight: worker_id, rows, and the earliest and latest
        lease_expires_at of them (the database's clock), earliest expiry first."""

    def counts(self, run: str | None = None) -> dict[str, int]: ...

    def runs(self) -> list[dict[str, Any]]: ...

    def oldest_pending(self, run: str | None = None) -> float | None: ...

    def last_error(self, run: str | None = None) -> dict[str, Any] | None: ...

    def sent_since(self, since: float, run: str | None = None) -> int: ...

    def failed(self, run: str | None = None, limit: int = 100) -> list[dict[str, Any]]: ...

    def requeue(
        self, *, ids: Sequence[int] | None = None, run: str | None = None
    ) -> int:
        """Dead-lettered rows back to pending (all of them when neither ids nor run)."""

    def replace_failed(
        self, row_id: int, *, payload: str, size: int, call_type: str, person: str
    ) -> bool:
        """Put a corrected payload in a dead-lettered row and make it pending again.

        The row keeps its id, messageId and run; ``last_error`` keeps the old error
        behind ``replaced; was:``. False when the row is not dead-lettered."""

    def message(self, message_id: str) -> dict[str, Any] | None: ...

    def attempts_for(self, row_id: int) -> list[dict[str, Any]]: ...

    def attempts(self, run: str | None = None, limit: int = 100) -> list[dict[str, Any]]: ...

    def rows(
        self, *, run: str | None = None, status: str | None = None, limit: int = 100
    ) -> list[dict[str, Any]]: ...

    def purge_sent(self, before: float) -> int: ...

    def purgeable(self, before: float) -> list[dict[str, Any]]:
        """Rows purge_sent(before) would delete, by run: run, rows, oldest, newest."""
        ...

    def forget(self, person: str) -> int: ...

    def sync_transaction(self, body: Any, *, write: bool = True) -> Any:
        """``body(tx)`` in one transaction with the sync state of
        :mod:`cio_outbox.storage.sync_state` (see :meth:`SQLStorage.sync_transaction`)."""

    def close(self) -> None: ...
