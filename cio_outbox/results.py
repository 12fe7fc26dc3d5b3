"""What the library's calls return: enqueue, import and worker results, progress snapshots.

Kept in one module so that every caller (the Outbox, the importers, the worker, the CLI
and notebooks) reads the same types; the old import paths re-export them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

MAX_LISTED_REJECTIONS = 1000
"""Rejected lines listed in an :class:`ImportResult` at most; the rest are only counted."""


@dataclass
class Rejection:
    """One input that was not enqueued: where it was, which field, and why."""

    index: int
    error: str
    field: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"index": self.index, "field": self.field, "error": self.error}


@dataclass
class EnqueueResult:
    """What an enqueue did: rows added, rows skipped (their messageId existed), rows refused."""

    added: int = 0
    skipped: int = 0
    rejected: list[Rejection] = field(default_factory=list)
    message_ids: list[str] = field(default_factory=list)

    @property
    def message_id(self) -> str | None:
        return self.message_ids[0] if len(self.message_ids) == 1 else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "added": self.added,
            "skipped": self.skipped,
            "rejected": [r.as_dict() for r in self.rejected],
        }

    def _repr_html_(self) -> str:  # a readable cell output in notebooks
        return (
            f"<b>added</b> {self.added:,} &nbsp; <b>skipped</b> {self.skipped:,} &nbsp; "
            f"<b>rejected</b> {len(self.rejected):,}"
        )


@dataclass(frozen=True, slots=True)
class LineRejection:
    """A line that was not enqueued: its number, the field at fault (if known) and why."""

    line: int
    error: str
    field: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"line": self.line, "field": self.field, "error": self.error}


@dataclass
class ImportResult:
    """What an import did. ``rejections`` lists the first :data:`MAX_LISTED_REJECTIONS`.

    ``changed`` counts lines whose place (run and line number) held different content in
    an earlier import under the same run name: a different file with the same name, or
    edited lines. Their calls were added as new messages.
    """

    run: str
    lines: int = 0
    added: int = 0
    skipped: int = 0
    rejected: int = 0
    rejections: list[LineRejection] = field(default_factory=list)
    changed: int = 0
    duplicates: int = 0  # CSV rows repeating an earlier row of the file, dropped

    @property
    def rejections_not_listed(self) -> int:
        return self.rejected - len(self.rejections)

    def reject(self, line: int, error: str, field: str | None = None) -> None:
        self.rejected += 1
        if len(self.rejections) < MAX_LISTED_REJECTIONS:
            self.rejections.append(LineRejection(line, error, field))

    def as_dict(self) -> dict[str, Any]:
        return {
            "run": self.run,
            "lines": self.lines,
            "added": self.added,
            "skipped": self.skipped,
            "rejected": self.rejected,
            "rejections": [r.as_dict() for r in self.rejections],
            "rejections_not_listed": self.rejections_not_listed,
            "changed": self.changed,
            "duplicates": self.duplicates,
        }


@dataclass
class Progress:
    """A snapshot of the worker for a progress line or a notebook."""

    sent: int = 0
    failed: int = 0
    requests: int = 0
    retries: int = 0
    rejected_requests: int = 0
    pending: int = 0
    in_flight: int = 0
    rate: float = 0.0
    elapsed: float = 0.0
    state: str = "starting"
    last_error: str | None = None
    # The work of this run: rows done (sent or dead-lettered) plus rows left.
    total: int = 0

    @property
    def percent(self) -> float | None:
        """Share of the run's rows done (sent or dead-lettered), 0-100."""
        if not self.total:
            return None
        return 100.0 * min(self.sent + self.failed, self.total) / self.total

    @property
    def eta_seconds(self) -> float | None:
        """Seconds until the rows left are sent at the current rate."""
        left = self.pending + self.in_flight
        if self.rate <= 0 or not left:
            return None
        return left / self.rate

    def line(self) -> str:
        done = f" ({self.percent:.0f}%)" if self.percent is not None else ""
        text = (
            f"sent {self.sent:,}{done}  {self.failed:,} dead-lettered  "
            f"pending {self.pending:,}  in flight {self.in_flight:,}  {self.rate:,.0f} msg/s"
        )
        eta = self.eta_seconds
        if eta is not None:
            minutes, seconds = divmod(round(eta), 60)
            text += f"  ETA {minutes // 60}:{minutes % 60:02d}:{seconds:02d}" if minutes >= 60 \
                else f"  ETA {minutes}:{seconds:02d}"
        if self.state not in ("sending", "done"):
            text += f"  [{self.state}]"
        return text

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class WorkerResult:
    """How a run ended. ``exit_code`` is what the CLI exits with (0 when it drained)."""

    sent: int
    failed: int
    requests: int
    retries: int
    elapsed: float
    stopped: bool
    exit_code: int = 0
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
