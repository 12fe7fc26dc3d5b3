"""A pre-migration check: is the configuration right, does the host answer like the Pipelines
API, and (if asked) does one call get through?

The host is reached with an empty batch (``POST /v1/batch`` with ``{"batch": []}``): it
carries no message, yet a DNS typo, a TLS or scheme mistake, a wrong key and a server that
is not the Pipelines API all show. No message is sent unless ``send_test_event`` is true.
The test event is a single track call named ``cio-outbox check`` for the anonymous id
``cio-outbox-check``: an anonymous event creates no person in Customer.io Journeys.
"""

from __future__ import annotations

import os
import warnings
from typing import Any
from urllib.parse import urlsplit

from cio_outbox.batch import sent_at_now
from cio_outbox.client import Client, Reply, TransportError
from cio_outbox.config import ApiKey, ConfigError, resolve_target
from cio_outbox.messages import build

TEST_EVENT = "cio-outbox check"
TEST_ANONYMOUS_ID = "cio-outbox-check"


def check(
    *,
    key: str | ApiKey | None = None,
    host: str | None = None,
    region: str | None = None,
    allow_insecure: bool = False,
    send_test_event: bool = False,
    probe: bool = True,
) -> dict[str, Any]:
    """Check key, region and host; reach the host (unless ``probe`` is false); optionally
    send one test event.

    Returns a dict with ``ok``, the key's ``scheme`` and ``key_region`` (never the key),
    the chosen ``host`` and ``region``, ``warnings``, ``problems``; with the probe
    ``answered`` and ``probe_status_code``; and with ``send_test_event`` the
    ``status_code``, ``latency_ms`` and ``messageId`` sent.
    """
    report: dict[str, Any] = {"ok": False, "warnings": [], "problems": [], "sent": False}
    try:
        api_key = key if isinstance(key, ApiKey) else (
            ApiKey(key) if key is not None else ApiKey.from_env()
        )
    except ConfigError as exc:
        report["problems"].append(str(exc))
        return report
    report["scheme"] = api_key.scheme
    report["key_region"] = api_key.region
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            target = resolve_target(
                api_key,
                host=host or os.environ.get("CIO_HOST") or None,
                region=region or os.environ.get("CIO_REGION") or None,
                allow_insecure=allow_insecure,
            )
        report["warnings"] = [str(w.message) for w in caught]
    except ConfigError as exc:
        report["problems"].append(str(exc))
        return report
    report["host"] = target.base_url
    report["region"] = target.region
    given = host or os.environ.get("CIO_HOST") or ""
    path = urlsplit(given.strip()).path.rstrip("/")
    if path.endswith("/v1"):
        report["problems"].append(
            f"host {given!r} has the path {path!r}: --host takes scheme and host only "
            f"(the client appends /v1/<endpoint>); use {target.base_url}")
        return report
    if probe:
        _probe(Client(api_key, target, timeout=(5.0, 15.0)), report)
        if report["problems"]:
            return report
    report["ok"] = True
    if not send_test_event:
        return report
    message = build("track", {"anonymousId": TEST_ANONYMOUS_ID, "event": TEST_EVENT,
                              "properties": {"source": "cio-outbox check"}})
    body = message.to_json()
    payload = (body[:-1] + f',"sentAt":"{sent_at_now()}"}}').encode()
    client = Client(api_key, target, timeout=(5.0, 15.0))
    report["sent"] = True
    report["messageId"] = message.messageId
    try:
        reply = client.send("track", payload)
    except TransportError as exc:
        report["ok"] = False
        report["problems"].append(str(exc))
        return report
    finally:
        client.close()
    report["status_code"] = reply.status_code
    report["latency_ms"] = round(reply.latency_ms, 1)
    if not reply.ok:
        report["ok"] = False
        report["problems"].append(reply.describe())
    return report


EMPTY_BATCH = b'{"batch":[]}'


def _like_the_api(reply: Reply) -> bool:
    """Answers the Pipelines API gives to an empty batch: success, a 400 with its
    ``meta.errors`` list, or a rate limit."""
    return reply.ok or reply.status_code == 429 or (
        reply.status_code == 400 and bool(reply.errors))


def _probe(client: Client, report: dict[str, Any]) -> None:
    """Post an empty batch; record whether and how the host answered."""
    base = client.target.base_url
    try:
        reply = client.send("batch", EMPTY_BATCH)
    except TransportError as exc:
        report["answered"] = False
        report["problems"].append(f"no answer: {exc}")
        return
    finally:
        client.close()
    report["answered"] = True
    report["probe_status_code"] = reply.status_code
    report["probe_latency_ms"] = round(reply.latency_ms, 1)
    if reply.status_code in (401, 403):
        report["problems"].append(
            f"{base} refused the key ({reply.describe()}): check CIO_API_KEY and that "
            "the key belongs to this region or host")
    elif not _like_the_api(reply):
        report["problems"].append(
            f"{base}/v1/batch answered {reply.describe()}, not like the Pipelines API: "
            "is --host the Pipelines API (scheme and host only)?")
