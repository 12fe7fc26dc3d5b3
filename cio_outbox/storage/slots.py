"""Worker slots: a stable default worker id that two running workers never share.

A worker started without ``--worker-id`` takes the first free slot of its outbox on its
host, and its id is ``<host>:w<slot>``. A slot is a lock held while the worker runs: on
SQLite an exclusive ``flock`` on a small file beside the outbox (``.<file>.worker-N.lock``),
on PostgreSQL a session advisory lock on a connection of its own. The operating system
drops the lock when the process dies however it dies (SIGKILL included), and the server
drops a dead session's lock, so a worker restarted on the same host gets the same slot
back and takes back its rows at once, while a second worker running next to the first
finds the slot locked and takes the next one.
"""

from __future__ import annotations

import fcntl
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cio_outbox.storage.base import StorageError

#: Slots tried before giving up (a host running more workers than this on one outbox).
MAX_SLOTS = 256


class NoFreeSlot(StorageError):
    """Every slot of this outbox on this host is held by a running worker."""


@dataclass
class WorkerSlot:
    """A held slot: ``worker_id`` is its id; :meth:`release` gives the slot up."""

    worker_id: str
    _release: Callable[[], None] = field(repr=False)

    def release(self) -> None:
        release, self._release = self._release, _nothing
        release()


def _nothing() -> None:
    return None


def slot_id(slot: int, host: str | None = None) -> str:
    """The worker id of a slot on a host (this one by default)."""
    return f"{host or socket.gethostname()}:w{slot}"


def file_slot(outbox: Path, host: str | None = None) -> WorkerSlot:
    """The first slot whose lock file beside the SQLite outbox this process can lock."""
    folder, name = outbox.resolve().parent, outbox.name
    for slot in range(MAX_SLOTS):
        path = folder / f".{name}.worker-{slot}.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            # Per open file: a second worker in this very process does not get it either.
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        return WorkerSlot(slot_id(slot, host), lambda fd=fd: os.close(fd))
    raise NoFreeSlot(f"all {MAX_SLOTS} worker slots of {outbox} on this host are in use")
