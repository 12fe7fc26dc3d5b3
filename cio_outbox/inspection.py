"""Answers for someone inspecting an outbox: which runs exist, a page of failed rows with
the total it is a page of, and a run's timeline ready for a DataFrame."""

from __future__ import annotations

import bisect
import datetime as _dt
from dataclasses import dataclass
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


def timeline(outbox: Outbox, run: str) -> list[dict[str, Any]]:
    """A run's progress after each HTTP attempt that carried its rows, oldest first: one dict
    per attempt with ``at`` (ISO), ``seconds`` since the first attempt, the attempt's
    ``outcome``, ``messages`` and ``status_code``, and the run's ``sent``, ``dead_lettered``
    and ``pending`` counts once that attempt was handled. Ready for ``pandas.DataFrame``.

    Counts come from the audit trail (messages of sent attempts) and from the times the
    run's failed rows were dead-lettered; rows enqueued after the run started count as
    pending from the start.
    """
    storage = outbox.storage
    check_run(storage, run)
    counts = storage.counts(run)
    total = sum(counts.values())
    # By time: with several senders, audit ids follow insert order, which need not be the
    # order of the attempts' times (PostgreSQL stamps a transaction's start).
    attempts = sorted(storage.attempts(run, 10_000_000), key=lambda a: (a["at"], a["id"]))
    if not attempts:
        return []
    dead_at = sorted(row["updated_at"] for row in storage.failed(run, max(counts["failed"], 1)))
    start = attempts[0]["at"]
    points: list[dict[str, Any]] = []
    sent = 0
    for index, attempt in enumerate(attempts):
        if attempt["outcome"] == "sent":
            sent = min(total, sent + attempt["messages"])
        # Rows are dead-lettered just after the attempt that was refused: count those
        # handled before the next attempt began.
        until = attempts[index + 1]["at"] if index + 1 < len(attempts) else float("inf")
        dead = bisect.bisect_left(dead_at, until)
        points.append({
            "at": _iso(attempt["at"]), "seconds": round(attempt["at"] - start, 3),
            "outcome": attempt["outcome"], "messages": attempt["messages"],
            "status_code": attempt["status_code"], "sent": sent, "dead_lettered": dead,
            "pending": max(0, total - sent - dead),
        })
    return points
