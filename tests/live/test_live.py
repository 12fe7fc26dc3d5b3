"""Opt-in live checks: one message of every operation, sent to a real Customer.io workspace.

Runs only when ``CIO_LIVE_API_KEY`` is set (optionally ``CIO_LIVE_REGION`` and
``CIO_LIVE_HOST``); CI runs without it, so the suite is skipped there. Every id it
creates starts with ``cio-outbox-test-<run>-`` and the suite deletes the people and
objects it created afterwards. Pointed at the local sandbox through the same
variables, it proves the switch works::

    cio-outbox sandbox --port 8799 &
    CIO_LIVE_API_KEY=sandbox-key CIO_LIVE_HOST=http://127.0.0.1:8799 pytest -m live tests/live -s
"""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

import pytest

from cio_outbox import Outbox
from cio_outbox.semantic import SEMANTIC_EVENTS

LIVE_KEY = os.environ.get("CIO_LIVE_API_KEY")

pytestmark = [
    pytest.mark.live,
    pytest.mark.skipif(
        not LIVE_KEY,
        reason="CIO_LIVE_API_KEY is not set; the live suite sends to a real workspace only "
               "when asked",
    ),
]

# One representative semantic event per category, with the properties it requires.
SEMANTIC_SAMPLES: dict[str, dict] = {
    "Order Completed": {"order_id": "o-1", "total": 12.5, "currency": "USD"},
    "Email Opened": {"email_id": "e-1", "email_subject": "Hello"},
    "Application Opened": {"version": "1.0.0", "build": "100"},
    "Video Playback Started": {"session_id": "s-1", "position": 0},
    "Live Chat Message Sent": {"conversation_id": "c-1"},
    "Experiment Viewed": {"experiment_id": "x-1", "variation_id": "v-1"},
}


def _send(outbox: Outbox, run: str) -> dict:
    return outbox.drain(
        key=LIVE_KEY,
        host=os.environ.get("CIO_LIVE_HOST") or None,
        region=os.environ.get("CIO_LIVE_REGION") or None,
        run=run,
        progress=False,
        max_attempts=3,
        max_seconds=300,
    )


def _fill(name: str, sample: dict) -> dict:
    """The sample plus a placeholder for any property the catalogue requires on top."""
    properties = dict(sample)
    for field in SEMANTIC_EVENTS[name].required_properties:
        properties.setdefault(field, f"test-{field}")
    return properties


def test_every_operation_is_accepted_and_cleaned_up(tmp_path: Path) -> None:
    run = f"live-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    prefix = f"cio-outbox-test-{run}-"
    person, other, anonymous = f"{prefix}person", f"{prefix}merged", f"{prefix}anon"
    obj = f"{prefix}object"
    token = f"{prefix}device-token"
    outbox = Outbox(tmp_path / "live.db")

    outbox.identify(person, traits={"email": f"{person}@example.com", "source": "cio-outbox"},
                    run=run)
    outbox.identify(anonymous_id=anonymous, traits={"source": "cio-outbox"}, run=run)
    outbox.identify(other, traits={"source": "cio-outbox"}, run=run)
    outbox.track(person, "cio-outbox live check", properties={"n": 1}, run=run)
    outbox.page(person, "Live check page", properties={"url": "https://example.com/"}, run=run)
    outbox.screen(person, "Live check screen", run=run)
    outbox.upsert_object(obj, traits={"name": "cio-outbox live object"}, run=run)
    outbox.relate(person, obj, run=run)
    for name, sample in SEMANTIC_SAMPLES.items():
        if name in SEMANTIC_EVENTS:
            outbox.track_semantic(name, person, properties=_fill(name, sample), run=run)
    outbox.add_device(person, token, device_type="ios", run=run)
    outbox.delete_device(person, token, device_type="ios", run=run)
    outbox.unrelate(person, obj, run=run)
    outbox.alias(person, other, run=run)
    outbox.suppress_person(other, run=run)
    outbox.unsuppress_person(other, run=run)

    result = _send(outbox, run)
    status = outbox.status(run=run)
    failed = outbox.failed(run=run)
    print(f"\nlive run {run}: sent {status['sent']}, failed {status['failed']}")
    for row in failed:
        print(f"  failed: {row['summary']}: {row['error']}")
    assert failed == [] and status["pending"] == 0 and status["in_flight"] == 0
    assert result["sent"] == status["sent"] == status["total"]
    attempts = outbox.log(run=run, limit=1000)
    assert attempts and all(a["outcome"] == "sent" for a in attempts)

    # Clean up what the API lets us delete: the objects and the people created.
    outbox.delete_object(obj, run=f"{run}-cleanup")
    for user in (person, other):
        outbox.delete_person(user, run=f"{run}-cleanup")
    cleanup = _send(outbox, f"{run}-cleanup")
    assert cleanup["failed"] == 0 and cleanup["sent"] == 3
    print(f"created and deleted: people {person}, {other}; object {obj}; "
          f"anonymous id {anonymous} (anonymous profiles cannot be deleted by the API)")
