"""Opening an outbox that must already exist (inspection and maintenance).

``Outbox(location)`` creates the file (or PostgreSQL schema) it names: right for enqueue and
the worker, wrong for someone checking failures the next morning with a typo in ``--db``,
who would be shown an empty, healthy-looking outbox. :func:`open_existing` refuses instead.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cio_outbox.storage import StorageError

if TYPE_CHECKING:
    from cio_outbox.outbox import Outbox


class OutboxNotFound(StorageError):
    """The location names no outbox (nothing was created)."""


def _is_postgres(location: str) -> bool:
    return location.startswith(("postgresql://", "postgres://"))


def _postgres_has_outbox(location: str) -> bool:
    from cio_outbox.storage.postgres import split_location

    try:
        import psycopg
    except ImportError:
        return True  # opening it then explains the missing driver
    url, schema = split_location(location)
    try:
        with psycopg.connect(url, connect_timeout=10) as conn:
            row = conn.execute("SELECT to_regclass(%s)", (f"{schema}.messages",)).fetchone()
    except psycopg.Error:
        return True  # opening it then explains the connection problem
    return bool(row and row[0])


def outbox_exists(location: str | os.PathLike[str]) -> bool:
    """Whether an outbox (SQLite file or PostgreSQL schema) exists at ``location``; creates
    nothing. A file that is not an outbox counts as existing: opening it explains why."""
    text = os.fspath(location)
    if _is_postgres(text):
        return _postgres_has_outbox(text)
    path = Path(text)
    return path.exists() and (path.is_dir() or path.stat().st_size > 0)


def open_existing(location: str | os.PathLike[str], **options: Any) -> Outbox:
    """The outbox at ``location``; :class:`OutboxNotFound` (nothing created) when there is
    none, naming the location and how to choose another."""
    from cio_outbox.outbox import Outbox
    from cio_outbox.storage.postgres import redact

    text = os.fspath(location)
    if not outbox_exists(text):
        where = redact(text) if _is_postgres(text) else text
        raise OutboxNotFound(
            f"no outbox at {where}: check --db (or CIO_OUTBOX); "
            "only enqueue, worker and sync create a new outbox"
        )
    return Outbox(text, **options)
