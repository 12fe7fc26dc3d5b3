"""Retention: which sent rows a purge deletes, with ages nobody can misread.

``1m`` reads as a minute to some and as a month to others; one such purge deleted 219,931
rows. Ages therefore take units that say one thing only: ``s``, ``min``, ``h``, ``d``, ``w``.
"""

from __future__ import annotations

import datetime as _dt
import re
import time
from dataclasses import dataclass, field
from typing import Any

from cio_outbox.storage import Storage

UNITS = {"s": 1, "sec": 1, "min": 60, "h": 3600, "d": 86400, "w": 604800}
_AGE = re.compile(r"^(\d+(?:\.\d+)?)(s|sec|min|h|d|w)$")
AGE_HELP = "a number and a unit: 45s, 15min, 12h, 30d or 2w"


def parse_age(value: str | float | _dt.timedelta) -> float:
    """Seconds from ``45s``, ``15min``, ``12h``, ``30d``, ``2w``, a number of seconds, or a
    timedelta. ``m`` alone (minutes or months?) and unknown units raise ValueError."""
    if isinstance(value, _dt.timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, (int, float)):
        seconds = float(value)
    else:
        text = value.strip().lower()
        match = _AGE.match(text)
        if match is None:
            if re.fullmatch(r"\d+(?:\.\d+)?\s*m", text):
                raise ValueError(
                    f"age {value!r} is ambiguous (minutes or months?): write "
                    f"{text[:-1].strip()}min for minutes, or days ({AGE_HELP}) "
                    "instead of months; see --older-than")
            raise ValueError(f"age {value!r} is not {AGE_HELP} (--older-than)")
        seconds = float(match.group(1)) * UNITS[match.group(2)]
    if seconds < 0:
        raise ValueError(f"age {value!r} is negative (--older-than)")
    return seconds


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return _dt.datetime.fromtimestamp(ts, _dt.UTC).isoformat(timespec="milliseconds")


@dataclass
class PurgePlan:
    """What a purge of sent rows older than an age deletes: rows by run and the time range."""

    older_than: str
    before: float
    runs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return sum(entry["rows"] for entry in self.runs)

    def as_dict(self) -> dict[str, Any]:
        return {"older_than": self.older_than, "sent_before": _iso(self.before),
                "would_delete": self.rows, "runs": self.runs}


def plan_purge(storage: Storage, older_than: str | float | _dt.timedelta) -> PurgePlan:
    """The rows :func:`purge` would delete now, without deleting anything."""
    before = time.time() - parse_age(older_than)
    runs = [
        {"run": entry["run"], "rows": entry["rows"], "oldest_sent_at": _iso(entry["oldest"]),
         "newest_sent_at": _iso(entry["newest"])}
        for entry in storage.purgeable(before)
    ]
    return PurgePlan(str(older_than), before, runs)


def purge(storage: Storage, older_than: str | float | _dt.timedelta | PurgePlan) -> int:
    """Delete sent rows sent longer ago than ``older_than`` (or those a :class:`PurgePlan`
    showed: sent before its cut-off); returns how many."""
    if isinstance(older_than, PurgePlan):
        return storage.purge_sent(older_than.before)
    return storage.purge_sent(time.time() - parse_age(older_than))
