"""Outbox storage backends behind one interface (see base.Storage)."""

from __future__ import annotations

import os

from cio_outbox.storage.base import STATUSES, Attempt, NewRow, Storage, StorageError

__all__ = ["STATUSES", "Attempt", "NewRow", "Storage", "StorageError", "open_storage"]


def open_storage(location: str | os.PathLike[str], **options: object) -> Storage:
    """Open the backend a location names: a PostgreSQL URL, else an SQLite file path."""
    text = os.fspath(location)
    if text.startswith(("postgresql://", "postgres://")):
        from cio_outbox.storage.postgres import PostgresStorage  # optional dependency

        return PostgresStorage(text, **options)  # type: ignore[arg-type]
    from cio_outbox.storage.sqlite import SQLiteStorage

    return SQLiteStorage(text, **options)  # type: ignore[arg-type]
