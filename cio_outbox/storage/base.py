"""The storage seam: what an outbox backend must do.

The worker, the Outbox API and the CLI talk only to this interface, so a second
backend (PostgreSQL) implements these methods and nothing else changes. Choosing
which rows fit one request is shared: backends supply candidates and the set of
blocked persons, and :func:`cio_outbox.batch.select` decides.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from cio_outbox.batch import Row
from cio_outbox.errors import CioOutboxError

STATUSES = ("pending", "in_flight", "sent", "failed")


class StorageError(CioOutboxError, RuntimeError):
    """The outbox file or database cannot be used; the text says which and what to do."""


@dataclass(frozen=True, slots=True)
class NewRow:
    """A validated message ready to be written."""

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
    outcome: str  # sent, retry, rejected, auth, fatal
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
    ) -> list[Row]:
        """Atomically take the next rows that fit one request and lease them to worker_id."""

    def extend_lease(self, ids: Sequence[int], worker_id: str, lease_seconds: float) -> None: ...

    def record_attempt(self, attempt: Attempt, *, count: bool, sent: bool = False) -> None:
        """Audit one HTTP attempt; with count, add one to each row's attempts and last error;
        with sent, also mark the rows sent, in the same transaction."""

    def mark_sent(self, ids: Sequence[int]) -> None: ...

    def dead_letter(self, errors: Sequence[tuple[int, str]]) -> None: ...

    def release(
        self, ids: Sequence[int], *, next_attempt_at: float | None = None
    ) -> None:
        """Give leased rows back: pending again, optionally not before next_attempt_at."""

    def release_worker(self, worker_id: str) -> int:
        """Give back every row a (restarted) worker id still holds."""

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

    def forget(self, person: str) -> int: ...

    def close(self) -> None: ...
