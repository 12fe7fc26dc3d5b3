"""What the three real Python SDKs send must enqueue, drain and be accepted by the sandbox.

The SDKs (``customerio-cdp-analytics``, ``segment-analytics-python``, ``rudder-sdk-python``)
come with the ``dev`` extra; each is driven through identify, track, page, screen, group and
alias, with one id, with both ids and with a context (see ``sdk_peers.make_calls``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import sdk_peers
from click.testing import CliRunner

from cio_outbox import Outbox
from cio_outbox.cli import cli

SDK_PARAMS = [
    pytest.param(module, id=name, marks=pytest.mark.skipif(
        not sdk_peers.sdk_available(module),
        reason=f"{name} is not installed (pip install -e '.[dev]')"))
    for name, module in sdk_peers.SDKS.items()
]


@pytest.fixture(scope="module")
def captured() -> dict[str, list[dict[str, Any]]]:
    return {module: sdk_peers.capture(module) for module in sdk_peers.SDKS.values()
            if sdk_peers.sdk_available(module)}


@pytest.mark.parametrize("module", SDK_PARAMS)
def test_what_each_sdk_sends_covers_every_call_and_the_nulls(
        module: str, captured: dict[str, list[dict[str, Any]]]) -> None:
    sent = captured[module]
    assert len(sent) == 26
    assert {m["type"] for m in sent} == {"identify", "track", "page", "screen", "group",
                                         "alias"}
    # The shapes that were refused before: null ids, a null page name.
    assert any(m.get("anonymousId", "") is None for m in sent)
    assert any(m.get("userId", "") is None for m in sent)
    assert any(m["type"] == "page" and "name" in m and m["name"] is None for m in sent)


@pytest.mark.parametrize("module", SDK_PARAMS)
def test_replayed_through_the_outbox_everything_is_enqueued_and_delivered(
        module: str, captured: dict[str, list[dict[str, Any]]], tmp_path: Path) -> None:
    sent = captured[module]
    figures = sdk_peers.replay(sent, tmp_path)
    assert figures["refused_at_enqueue"] == {}
    assert figures["enqueued"] == len(sent)
    assert figures["dead_letter_reasons"] == {}
    assert figures["delivered"] == len(sent)


@pytest.mark.parametrize("module", SDK_PARAMS)
def test_cli_enqueue_of_the_captured_lines(
        module: str, captured: dict[str, list[dict[str, Any]]], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CIO_OUTBOX", "CIO_API_KEY", "CIO_HOST", "CIO_REGION"):
        monkeypatch.delenv(name, raising=False)
    sent = captured[module]
    lines = tmp_path / "sdk.jsonl"
    lines.write_text("".join(json.dumps(m) + "\n" for m in sent), encoding="utf-8")
    db = str(tmp_path / "cli.db")
    result = CliRunner().invoke(cli, ["enqueue", str(lines), "--db", db],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    with Outbox(db) as box:
        assert box.status()["pending"] == len(sent)
        stored = [json.loads(row["payload"]) for row in box.rows(limit=100)]
    assert len(stored) == len(sent)
    for message in stored:
        assert not {"writeKey", "sentAt", "_metadata"} & set(message)
        assert message.get("userId", "x") is not None


@pytest.mark.parametrize("module", SDK_PARAMS)
def test_sdk_sending_to_the_sandbox_is_accepted_and_flush_returns(module: str) -> None:
    figures = sdk_peers.direct(module)
    assert figures["flushed"], "flush() did not return within 30 s"
    assert figures["dropped"] == 0
    assert figures["stored"] == figures["calls"]
    assert set(figures["by_status"]) == {"200"}


@pytest.mark.parametrize("module", SDK_PARAMS)
def test_an_invalid_call_from_an_sdk_is_dropped_with_200_and_flush_returns(module: str) -> None:
    def bad(client: Any) -> int:
        client.identify(user_id="   ", traits={"plan": "pro"})  # whitespace-only id
        return 1

    figures = sdk_peers.direct(module, bad)
    assert figures["flushed"], "flush() did not return within 30 s"
    assert set(figures["by_status"]) == {"200"}
    assert figures["stored"] + figures["dropped"] == figures["calls"]
    assert figures["dropped"] >= 1
