"""A pre-migration check: is the configuration right, and (if asked) does one call get through?

Nothing is sent unless ``send_test_event`` is true. The test event is a single
track call named ``cio-outbox check`` for the anonymous id ``cio-outbox-check``:
an anonymous event creates no person in Customer.io Journeys.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

from cio_outbox.batch import sent_at_now
from cio_outbox.client import Client, TransportError
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
) -> dict[str, Any]:
    """Check key, region and host; optionally send one test event.

    Returns a dict with ``ok``, the key's ``scheme`` and ``key_region`` (never the key),
    the chosen ``host`` and ``region``, ``warnings``, ``problems``, and with
    ``send_test_event`` the ``status_code``, ``latency_ms`` and ``messageId`` sent.
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
