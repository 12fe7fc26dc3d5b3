"""A local stand-in for Customer.io's Data Pipelines API, modelled on its documented behaviour.

The sandbox speaks the same HTTP API as Customer.io (``POST /v1/identify``, ``/v1/track``,
``/v1/page``, ``/v1/screen``, ``/v1/group``, ``/v1/alias`` and ``/v1/batch``), checks
authentication, the body and message size limits, and every message against the rules
enqueue applies (:func:`cio_outbox.messages.validate_wire`), stores what it accepts in
memory, and can inject faults (random 5xx answers, rate limiting, latency, poison events).
Tests, notebooks and benchmarks inspect it over ``/sandbox/*`` or through :class:`Sandbox` /
:class:`SandboxProcess`.

As Customer.io documents:

- an invalid or oversized request is answered 200 and dropped (counted in the stats as
  ``dropped_requests`` and ``dropped_messages``) unless it carries ``X-Strict-Mode: 1``;
  with the header it is refused: 400 (413 for size);
- a refusal's body is ``{"meta": {"error": "<what is wrong>"}}``. ``named_errors=True``
  (``--named-errors``) gives the sandbox's own form instead, one entry per problem naming
  the item: ``{"meta": {"errors": [{"field": "batch[3].userId", "reason", "message"}]}}``.

Faults, in the order a request meets them: 404 for an unknown endpoint, 401 for bad
credentials, 429 from the ``rate_limit`` token bucket, an injected 429 with probability
``throttle_rate``, an injected 500/502/503 with probability ``fail_rate``, 413/415 for the
body, 400 for JSON or any invalid message (``reject_events`` included). ``latency`` delays
every API request before all of these. Nothing from a request that is not answered 200, or
that is dropped, is stored.

Modules: :mod:`.validation` (body and messages), :mod:`.faults` (config and injected
faults), :mod:`.state` (stored messages, stats, answers), :mod:`.server` (HTTP, the
Python handles and the command). The configured key never appears in a log line, a repr,
an exception or an answer.
"""

from cio_outbox.sandbox.server import DEFAULT_KEY, Sandbox, SandboxProcess, sandbox_command
from cio_outbox.sandbox.validation import (
    MESSAGE_LIMIT,
    REQUEST_LIMIT,
    SINGLE_ENDPOINTS,
    message_size,
)

__all__ = [
    "DEFAULT_KEY",
    "MESSAGE_LIMIT",
    "REQUEST_LIMIT",
    "SINGLE_ENDPOINTS",
    "Sandbox",
    "SandboxProcess",
    "message_size",
    "sandbox_command",
]
