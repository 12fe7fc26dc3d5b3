"""cio-outbox: a durable, auditable outbox for the Customer.io Data Pipelines API."""

from cio_outbox._version import __version__
from cio_outbox.config import ApiKey, ConfigError, Target, resolve_target
from cio_outbox.messages import MessageError
from cio_outbox.outbox import EnqueueResult, Outbox
from cio_outbox.storage import StorageError
from cio_outbox.worker import AuthError, Worker, WorkerError

__all__ = [
    "ApiKey",
    "AuthError",
    "ConfigError",
    "EnqueueResult",
    "MessageError",
    "Outbox",
    "StorageError",
    "Target",
    "Worker",
    "WorkerError",
    "__version__",
    "resolve_target",
]
