"""One rule set: a message's fate is decided once, at enqueue, by the rules the sandbox
applies too. The table holds the borderline cases where Customer.io's document is silent or
ambiguous, with the choice made for each (README "Messages"); enqueue and the sandbox must
both make it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import requests

from cio_outbox import MessageError, Outbox
from cio_outbox.sandbox import Sandbox

T = "2024-05-01T10:00:00.000Z"

# (case, message, accepted?)
BORDERLINE: list[tuple[str, dict[str, Any], bool]] = [
    ("null userId beside an anonymousId",
     {"type": "identify", "userId": None, "anonymousId": "a1"}, True),
    ("empty userId beside an anonymousId",
     {"type": "identify", "userId": "", "anonymousId": "a1"}, True),
    ("null ids only", {"type": "identify", "userId": None, "anonymousId": None}, False),
    ("userId of only whitespace", {"type": "identify", "userId": "   "}, False),
    ("anonymousId of only whitespace beside a userId",
     {"type": "track", "userId": "u1", "anonymousId": " \t", "event": "E"}, False),
    ("null page name and category",
     {"type": "page", "userId": "u1", "name": None, "category": None}, True),
    ("empty page name", {"type": "page", "userId": "u1", "name": ""}, True),
    ("empty event", {"type": "track", "userId": "u1", "event": ""}, False),
    ("event of only whitespace", {"type": "track", "userId": "u1", "event": "  "}, False),
    ("traits.email null", {"type": "identify", "userId": "u1", "traits": {"email": None}},
     False),
    ("traits.email empty", {"type": "identify", "userId": "u1", "traits": {"email": ""}},
     True),
    ("traits.createdAt as Unix seconds",
     {"type": "identify", "userId": "u1", "traits": {"createdAt": 1714557600}}, False),
    ("traits.createdAt as ISO-8601",
     {"type": "identify", "userId": "u1", "traits": {"createdAt": T}}, True),
    ("other traits null", {"type": "identify", "userId": "u1", "traits": {"plan": None}}, True),
    ("context.device.type web",
     {"type": "track", "userId": "u1", "event": "E", "context": {"device": {"type": "web"}}},
     True),
    ("context.device.type null",
     {"type": "track", "userId": "u1", "event": "E", "context": {"device": {"type": None}}},
     False),
    ("context.traits", {"type": "track", "userId": "u1", "event": "E",
                        "context": {"traits": {"email": "a@example.com"}}}, True),
    ("context.channel not one of browser, server, mobile",
     {"type": "track", "userId": "u1", "event": "E", "context": {"channel": "email"}}, False),
    ("numeric timestamp", {"type": "track", "userId": "u1", "event": "E",
                           "timestamp": 1714557600}, False),
    ("null timestamp", {"type": "track", "userId": "u1", "event": "E", "timestamp": None},
     True),
    ("null messageId", {"type": "track", "userId": "u1", "event": "E", "messageId": None},
     True),
    ("integrations All true", {"type": "track", "userId": "u1", "event": "E",
                               "integrations": {"All": True}}, True),
    ("integrations with options", {"type": "track", "userId": "u1", "event": "E",
                                   "integrations": {"Amplitude": {"session_id": 1}}}, False),
    ("unknown top-level field", {"type": "track", "userId": "u1", "event": "E",
                                 "channel": "server"}, True),
    ("transport fields", {"type": "track", "userId": "u1", "event": "E", "writeKey": "k",
                          "sentAt": T, "receivedAt": T, "_metadata": {"bundled": []}}, True),
    ("a group's track (groupId, no person)",
     {"type": "track", "groupId": "acme", "event": "Plan Changed"}, True),
    ("a semantic event without its required property",
     {"type": "track", "userId": "u1", "event": "Email Bounced", "properties": {}}, False),
    ("a group without groupId", {"type": "group", "userId": "u1", "groupId": None}, False),
    ("an alias with a blank previousId",
     {"type": "alias", "userId": "u1", "previousId": " "}, False),
]


def _enqueue_accepts(box: Outbox, message: dict[str, Any]) -> bool:
    try:
        box.enqueue(message)
    except MessageError:
        return False
    return True


def _sandbox_accepts(sandbox: Sandbox, message: dict[str, Any]) -> bool:
    endpoint = "alias" if message["type"] == "alias" else "batch"
    body = message if endpoint == "alias" else {"batch": [message]}
    resp = requests.post(f"{sandbox.url}/v1/{endpoint}", json=body, auth=(sandbox.key, ""),
                         headers={"X-Strict-Mode": "1"}, timeout=30)
    assert resp.status_code in (200, 400), resp.text
    return resp.status_code == 200


@pytest.fixture(scope="module")
def sandbox() -> Any:
    with Sandbox() as server:
        yield server


@pytest.mark.parametrize(("case", "message", "accepted"), BORDERLINE,
                         ids=[case for case, _, _ in BORDERLINE])
def test_enqueue_and_sandbox_decide_alike(case: str, message: dict[str, Any], accepted: bool,
                                          sandbox: Sandbox, tmp_path: Path) -> None:
    with Outbox(str(tmp_path / "rules.db")) as box:
        at_enqueue = _enqueue_accepts(box, dict(message))
    at_sandbox = _sandbox_accepts(sandbox, dict(message))
    assert at_enqueue == at_sandbox, f"{case}: enqueue {at_enqueue}, sandbox {at_sandbox}"
    assert at_enqueue == accepted, case


def test_what_enqueue_accepted_the_sandbox_accepts_after_a_drain(tmp_path: Path) -> None:
    accepted = [dict(m) for _, m, ok in BORDERLINE if ok]
    with Outbox(str(tmp_path / "drain.db")) as box, Sandbox() as server:
        for message in accepted:
            box.enqueue(message)
        result = box.drain(host=server.url, key=server.key, progress=False, timeout=60)
        assert result["failed"] == 0, box.failed()
        assert server.stats()["messages"] == len(accepted)
