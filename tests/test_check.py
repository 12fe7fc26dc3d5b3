"""The pre-migration check: configuration only by default, one test event when asked."""

from __future__ import annotations

import pytest

from cio_outbox.check import TEST_ANONYMOUS_ID, TEST_EVENT, check
from cio_outbox.config import REGION_HOSTS
from cio_outbox.sandbox import Sandbox


def test_check_sends_nothing_by_default(sandbox: Sandbox) -> None:
    report = check(key=sandbox.key, host=sandbox.url)
    assert report["ok"] and report["sent"] is False
    assert report["host"] == sandbox.url and report["scheme"] == "basic"
    assert sandbox.stats()["requests"] == 0


def test_check_sends_one_clearly_named_anonymous_test_event(sandbox: Sandbox) -> None:
    report = check(key=sandbox.key, host=sandbox.url, send_test_event=True)
    assert report["ok"] and report["status_code"] == 200
    assert report["latency_ms"] >= 0
    [message] = sandbox.messages()
    assert message["event"] == TEST_EVENT and message["anonymousId"] == TEST_ANONYMOUS_ID
    assert message["messageId"] == report["messageId"]
    assert "userId" not in message


def test_check_reports_a_wrong_key_without_showing_it(sandbox: Sandbox) -> None:
    report = check(key="sk_us_notthekey", host=sandbox.url, send_test_event=True)
    assert not report["ok"] and report["status_code"] == 401
    assert "notthekey" not in repr(report)


def test_check_reports_region_problems(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CIO_HOST", raising=False)
    monkeypatch.delenv("CIO_REGION", raising=False)
    mismatch = check(key="sk_eu_abc", region="us")
    assert not mismatch["ok"] and "EU" in mismatch["problems"][0]
    derived = check(key="sk_eu_abc")
    assert derived["ok"] and derived["host"] == REGION_HOSTS["eu"]
    warned = check(key="sk_eu_abc", host=REGION_HOSTS["us"])
    assert warned["ok"] and "EU" in warned["warnings"][0]
    missing = check(key="  ")
    assert not missing["ok"] and "empty" in missing["problems"][0]


def test_check_reports_an_unreachable_host() -> None:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    report = check(key="k", host=f"http://127.0.0.1:{port}", send_test_event=True)
    assert not report["ok"] and "connection refused" in report["problems"][0]


def test_check_command_reports_and_exits_by_outcome(
    sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    from click.testing import CliRunner

    from cio_outbox.cli import cli

    monkeypatch.setenv("CIO_API_KEY", sandbox.key)
    runner = CliRunner()
    result = runner.invoke(cli, ["check", "--host", sandbox.url])
    assert result.exit_code == 0 and "ok" in result.output
    assert sandbox.stats()["requests"] == 0
    result = runner.invoke(cli, ["check", "--host", sandbox.url, "--send-test-event", "--json"])
    report = json.loads(result.output)
    assert result.exit_code == 0 and report["status_code"] == 200
    monkeypatch.setenv("CIO_API_KEY", "sk_us_wrongone")
    result = runner.invoke(cli, ["check", "--host", sandbox.url, "--send-test-event"])
    assert result.exit_code == 3 and "wrongone" not in result.output
    monkeypatch.setenv("CIO_API_KEY", "sk_eu_abc")
    monkeypatch.delenv("CIO_HOST", raising=False)
    result = runner.invoke(cli, ["check", "--region", "us"])
    assert result.exit_code == 2 and "problem:" in result.output
