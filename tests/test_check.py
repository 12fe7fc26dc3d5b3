"""The pre-migration check: configuration only by default, one test event when asked."""

from __future__ import annotations

import pytest

from cio_outbox.check import TEST_ANONYMOUS_ID, TEST_EVENT, check
from cio_outbox.config import REGION_HOSTS
from cio_outbox.sandbox import Sandbox


def test_check_reaches_the_host_but_sends_no_message_by_default(sandbox: Sandbox) -> None:
    report = check(key=sandbox.key, host=sandbox.url)
    assert report["ok"] and report["sent"] is False, report
    assert report["host"] == sandbox.url and report["scheme"] == "basic"
    assert report["answered"] is True and report["probe_status_code"] == 200
    assert sandbox.stats()["requests"] == 1 and sandbox.messages() == []


def test_check_is_not_ok_for_a_host_that_does_not_answer() -> None:
    report = check(key="k", host="https://cdp.custmer.invalid")
    assert not report["ok"] and report["answered"] is False
    assert "cdp.custmer.invalid" in report["problems"][0]


def test_check_is_not_ok_for_a_path_in_the_host(sandbox: Sandbox) -> None:
    report = check(key=sandbox.key, host=sandbox.url + "/v1")
    assert not report["ok"]
    assert any("/v1" in problem and "scheme and host" in problem
               for problem in report["problems"]), report


def test_check_is_not_ok_for_a_server_that_is_not_the_pipelines_api(
    sandbox: Sandbox,
) -> None:
    report = check(key=sandbox.key, host=sandbox.url + "/not-the-api")
    assert not report["ok"] and report["answered"] is True
    assert "not like the Pipelines API" in report["problems"][0]
    assert "404" in report["problems"][0]


def test_check_reports_a_wrong_key_without_sending_a_message(sandbox: Sandbox) -> None:
    report = check(key="sk_us_notthekey", host=sandbox.url)
    assert not report["ok"] and report["probe_status_code"] == 401
    assert "key" in report["problems"][0] and "notthekey" not in repr(report)


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
    # The empty batch already shows the key is refused: no test event follows.
    assert not report["ok"] and report["probe_status_code"] == 401 and not report["sent"]
    assert "notthekey" not in repr(report)


def test_check_reports_region_problems(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CIO_HOST", raising=False)
    monkeypatch.delenv("CIO_REGION", raising=False)
    mismatch = check(key="sk_eu_abc", region="us", probe=False)
    assert not mismatch["ok"] and "EU" in mismatch["problems"][0]
    derived = check(key="sk_eu_abc", probe=False)
    assert derived["ok"] and derived["host"] == REGION_HOSTS["eu"]
    warned = check(key="sk_eu_abc", host=REGION_HOSTS["us"], probe=False)
    assert warned["ok"] and "EU" in warned["warnings"][0]
    missing = check(key="  ", probe=False)
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
    assert result.exit_code == 0 and "answered like the Pipelines API" in result.output
    assert result.output.rstrip().endswith("ok") and sandbox.messages() == []
    result = runner.invoke(cli, ["check", "--host", "https://cdp.custmer.invalid"])
    assert result.exit_code == 1 and result.output.rstrip().endswith("not ok")
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
