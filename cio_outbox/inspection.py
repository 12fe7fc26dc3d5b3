"""Answers for someone inspecting an outbox: which runs exist, a page of failed rows with
the total it is a page of, and a run's timeline ready for a DataFrame."""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cio_outbox.outbox import Outbox
    from cio_outbox.storage import Storage


class UnknownRunError(LookupError):
    """A run name no row of the outbox carries."""

    def __str__(self) -> str:
        return str(self.args[0])


def run_names(storage: Storage) -> list[str]:
    """The runs that have rows, in name order."""
    return [entry["run"] for entry in storage.runs()]


def check_run(storage: Storage, run: str | None) -> None:
    """Raise :class:`UnknownRunError` (naming the runs there are) if ``run`` has no rows."""
    if run is None:
        return
    names = run_names(storage)
    if run in names:
        return
    shown = ", ".join(repr(name) for name in names[:10]) or "none"
    more = f" and {len(names) - 10} more" if len(names) > 10 else ""
    raise UnknownRunError(f"no run {run!r} in {storage.location}; runs: {shown}{more}")


@dataclass
class FailedPage:
    """Up to ``limit`` failed rows and how many failed rows there are in all."""

    rows: list[dict[str, Any]]
    total: int
    run: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"run": self.run, "total": self.total, "shown": len(self.rows),
                "rows": self.rows}


def failed_page(outbox: Outbox, run: str | None = None, limit: int = 100) -> FailedPage:
    """The first ``limit`` failed rows (of ``run``) and the count of all failed rows."""
    check_run(outbox.storage, run)
    return FailedPage(outbox.failed(run, limit), outbox.storage.counts(run)["failed"], run)


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return _dt.datetime.fromtimestamp(ts, _dt.UTC).isoformat(timespec="milliseconds")


@dataclass
class _Bucket:
    sent: int = 0
    failed: int = 0
    retried: int = 0
    requests: int = 0
    latencies: list[float] = field(default_factory=list)
