"""cio-outbox: a durable, auditable outbox for the Customer.io Data Pipelines API."""

from typing import Any

from cio_outbox._version import __version__
from cio_outbox.config import ApiKey, ConfigError, Target, resolve_target
from cio_outbox.errors import CioOutboxError
from cio_outbox.outbox import Outbox
from cio_outbox.results import EnqueueResult
from cio_outbox.settings import Settings
from cio_outbox.storage import StorageError
from cio_outbox.wire import MessageError

__all__ = [
    "ApiKey",
    "AuthError",
    "CioOutboxError",
    "ConfigError",
    "EnqueueResult",
    "MessageError",
    "Outbox",
    "Settings",
    "StorageError",
    "Target",
    "Worker",
    "WorkerError",
    "__version__",
    "resolve_target",
]

_FROM_WORKER = ("AuthError", "Worker", "WorkerError")


def __getattr__(name: str) -> Any:
    # The worker brings requests and tenacity; enqueueing needs neither, so they load
    # on first use of a worker name.
    if name in _FROM_WORKER:
        from cio_outbox import worker

        return getattr(worker, name)
    raise AttributeError(f"module 'cio_outbox' has no attribute {name!r}")
