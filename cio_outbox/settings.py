"""Every setting the library reads from the environment, and every default, in one place.

The environment is read here and nowhere else:

===============  ==========================================================
``CIO_API_KEY``  the Pipelines API key (never printed, never stored)
``CIO_REGION``   ``us`` or ``eu``
``CIO_HOST``     base URL override (scheme and host; ``/v1/<endpoint>`` is appended)
``CIO_OUTBOX``   outbox path or ``postgresql://`` URL (default ``./outbox.db``)
===============  ==========================================================

Defaults: two sender threads, ten attempts per message, gzip on (level 1, about a sixth of
the bytes for a cost of a few percent CPU; every Customer.io endpoint accepts it), a 5 s
connect and 30 s read timeout, strict mode on, 20,000 calls per enqueue transaction.
The library's :class:`~cio_outbox.client.Client`, :class:`~cio_outbox.worker.Worker`,
:meth:`~cio_outbox.Outbox.worker` and the CLI all take their defaults from here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

ENV_API_KEY = "CIO_API_KEY"
ENV_REGION = "CIO_REGION"
ENV_HOST = "CIO_HOST"
ENV_OUTBOX = "CIO_OUTBOX"

DEFAULT_OUTBOX = "outbox.db"
DEFAULT_CONCURRENCY = 2
DEFAULT_MAX_ATTEMPTS = 10
DEFAULT_GZIP = True
DEFAULT_TIMEOUT: tuple[float, float] = (5.0, 30.0)  # connect, read (seconds)
DEFAULT_STRICT_MODE = True
DEFAULT_CHUNK_ROWS = 20_000
DEFAULT_LEASE_SECONDS = 120.0  # a claim's lease; a heartbeat renews it every quarter
DEFAULT_MAX_UNCONFIRMED = 5  # sends without an answer before "may have arrived"
DEFAULT_UNREACHABLE_TIMEOUT = 30.0  # --until-empty gives up on a host never answering


@dataclass(frozen=True)
class Settings:
    """Where to send, with which key, from which outbox, and how.

    >>> Settings.from_env({"CIO_REGION": "eu"}).region
    'eu'

    ``api_key`` is the raw key text; it is left out of the repr. Turn it into an
    :class:`~cio_outbox.config.ApiKey` before use (``ApiKey.from_env`` does).
    """

    api_key: str | None = field(default=None, repr=False)
    region: str | None = None
    host: str | None = None
    outbox: str = DEFAULT_OUTBOX
    concurrency: int = DEFAULT_CONCURRENCY
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    gzip: bool = DEFAULT_GZIP
    timeout: tuple[float, float] = DEFAULT_TIMEOUT
    strict_mode: bool = DEFAULT_STRICT_MODE
    chunk_rows: int = DEFAULT_CHUNK_ROWS
    lease_seconds: float = DEFAULT_LEASE_SECONDS
    max_unconfirmed: int = DEFAULT_MAX_UNCONFIRMED
    unreachable_timeout: float = DEFAULT_UNREACHABLE_TIMEOUT

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """The settings the environment gives (empty values count as unset)."""
        env = os.environ if environ is None else environ
        return cls(
            api_key=env.get(ENV_API_KEY),
            region=(env.get(ENV_REGION) or "").strip().lower() or None,
            host=env.get(ENV_HOST) or None,
            outbox=env.get(ENV_OUTBOX) or DEFAULT_OUTBOX,
        )


def environment(name: str) -> str | None:
    """One environment variable, for the few callers that name their own (tests, sandbox)."""
    return os.environ.get(name)
