"""The morning after: inspection that refuses outboxes that do not exist, a purge that cannot
be one typo from disaster, and failed rows fixed by the thousand, not one by one."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from cio_outbox import Outbox
from cio_outbox.cli import cli
from cio_outbox.sandbox import Sandbox


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    for name in ("CIO_OUTBOX", "CIO_API_KEY", "CIO_HOST", "CIO_REGION"):
        monkeypatch.delenv(name, raising=False)
    return CliRunner()


def _run(runner: CliRunner, *args: str, input: str | None = None) -> Result:
    return runner.invoke(cli, list(args), input=input, catch_exceptions=False)


@pytest.fixture
def orders(outbox_location: str) -> Iterator[str]:
    """Run "orders": 5 rows the server refused (event "Bad") and 2 sent; run "later": 1
    pending row."""
    with Outbox(outbox_location) as outbox, Sandbox(reject_events=["Bad"]) as sandbox:
        for i in range(5):
            outbox.track(f"u{i}", "Bad", properties={"total": "n/a", "i": i}, run="orders",
                         idempotency_key=f"bad-{i}")
        outbox.track("u8", "Good", run="orders")
        outbox.identify("u9", run="orders")
        outbox.drain(key=sandbox.key, host=sandbox.url, progress=False)
        outbox.identify("p1", run="later")
    yield outbox_location


# -- point 2: inspection refuses an outbox that does not exist --------------------------


@pytest.mark.parametrize("command", [
    ["status"], ["failed"], ["log"], ["history", "some-id"], ["retry", "--all"],
    ["replace", "some-id", '{"type": "identify", "userId": "u1"}'],
    ["purge", "--sent", "--older-than", "30d", "--yes"], ["forget", "u1"],
    ["fix", "--run", "r", "--set", "event=x"],
])
def test_inspection_refuses_an_outbox_that_does_not_exist_and_creates_nothing(
    runner: CliRunner, tmp_path: Path, command: list[str]
) -> None:
    missing = tmp_path / "typo.db"
    result = _run(runner, *command, "--db", str(missing))
    assert result.exit_code == 1, result.output
    assert f"no outbox at {missing}" in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.postgres
def test_inspection_refuses_a_postgresql_schema_that_does_not_exist(
    runner: CliRunner, postgres_location: str
) -> None:
    result = _run(runner, "status", "--db", postgres_location)
    assert result.exit_code == 1 and "no outbox at" in result.stderr
    from cio_outbox.locations import outbox_exists

    assert not outbox_exists(postgres_location)  # the refusal created no schema
    Outbox(postgres_location).close()
    assert outbox_exists(postgres_location)


@pytest.mark.parametrize("command", [["status"], ["failed"], ["log"], ["retry"],
                                     ["fix", "--set", "event=x"]])
def test_an_unknown_run_is_reported(runner: CliRunner, orders: str,
                                    command: list[str]) -> None:
    result = _run(runner, *command, "--run", "nosuchrun", "--db", orders)
    assert result.exit_code == 1
    assert "no run 'nosuchrun'" in result.stderr
    assert "later" in result.stderr and "orders" in result.stderr  # the runs there are


# -- point 3: purge -----------------------------------------------------------------------


@pytest.mark.parametrize("age", ["1m", "3m", "2mo", "soon", "-1d", ""])
def test_purge_refuses_ambiguous_or_bad_ages(runner: CliRunner, orders: str, age: str) -> None:
    result = _run(runner, "purge", "--sent", "--older-than", age, "--yes", "--db", orders)
    assert result.exit_code == 2
    assert "--older-than" in result.stderr
    if age.endswith("m"):
        assert "min" in result.stderr and "month" in result.stderr


def test_purge_ages_are_unambiguous() -> None:
    from cio_outbox.retention import parse_age

    assert parse_age("30d") == 30 * 86400
    assert parse_age("12h") == 12 * 3600
    assert parse_age("15min") == 15 * 60
    assert parse_age("45s") == 45
    assert parse_age("2w") == 14 * 86400
    for bad in ("1m", "15 m", "1mo", "d", "1.5x"):
        with pytest.raises(ValueError, match=r"older-than|age"):
            parse_age(bad)


def test_purge_dry_run_shows_what_it_would_delete_and_deletes_nothing(
    runner: CliRunner, orders: str
) -> None:
    time.sleep(0.05)
    result = _run(runner, "purge", "--sent", "--older-than", "0s", "--dry-run", "--db", orders)
    assert result.exit_code == 0, result.output
    assert "would delete 2 sent row(s)" in result.stdout and "orders" in result.stdout
    data = json.loads(_run(runner, "purge", "--sent", "--older-than", "0s", "--dry-run",
                           "--json", "--db", orders).stdout)
    assert data["would_delete"] == 2 and data["runs"] == [
        {"run": "orders", "rows": 2, "oldest_sent_at": data["runs"][0]["oldest_sent_at"],
         "newest_sent_at": data["runs"][0]["newest_sent_at"]}]
    assert data["runs"][0]["oldest_sent_at"].endswith("+00:00")
    with Outbox(orders) as outbox:
        assert outbox.status()["sent"] == 2


def test_purge_without_a_terminal_needs_yes(runner: CliRunner, orders: str) -> None:
    time.sleep(0.05)
    refused = _run(runner, "purge", "--sent", "--older-than", "0s", "--db", orders)
    assert refused.exit_code == 2
    assert "--yes" in refused.stderr and "--dry-run" in refused.stderr
    with Outbox(orders) as outbox:
        assert outbox.status()["sent"] == 2
    done = _run(runner, "purge", "--sent", "--older-than", "0s", "--yes", "--db", orders)
    assert done.exit_code == 0 and "deleted 2 sent row(s)" in done.stdout


def test_purge_on_a_terminal_asks_first(runner: CliRunner, orders: str,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import cio_outbox.cli as cli_module

    monkeypatch.setattr(cli_module, "_interactive", lambda: True)
    time.sleep(0.05)
    declined = _run(runner, "purge", "--sent", "--older-than", "0s", "--db", orders,
                    input="n\n")
    assert declined.exit_code == 1 and "Delete 2 sent row(s)" in declined.output
    with Outbox(orders) as outbox:
        assert outbox.status()["sent"] == 2
    accepted = _run(runner, "purge", "--sent", "--older-than", "0s", "--db", orders,
                    input="y\n")
    assert accepted.exit_code == 0 and "deleted 2 sent row(s)" in accepted.stdout


# -- point 6: failed rows at scale --------------------------------------------------------


def test_failed_with_a_limit_says_how_many_of_how_many_and_names_both_fixes(
    runner: CliRunner, orders: str
) -> None:
    result = _run(runner, "failed", "--limit", "3", "--db", orders)
    assert result.exit_code == 0
    assert "3 of 5 failed row(s)" in result.stdout
    assert "cio-outbox replace" in result.stdout and "cio-outbox retry" in result.stdout
    assert "cio-outbox fix" in result.stdout


def test_retry_of_an_unknown_id_is_an_error(runner: CliRunner, orders: str) -> None:
    result = _run(runner, "retry", "--id", "999999", "--db", orders)
    assert result.exit_code == 1 and "999999" in result.stderr
    with Outbox(orders) as outbox:
        assert outbox.status()["failed"] == 5


def test_replace_refuses_to_change_the_person_unless_asked(runner: CliRunner,
                                                         orders: str) -> None:
    with Outbox(orders) as outbox:
        row = outbox.failed("orders", 1)[0]
    other = json.dumps({"type": "track", "userId": "someone-else", "event": "Fixed"})
    refused = _run(runner, "replace", row["messageId"], other, "--db", orders)
    assert refused.exit_code == 2
    assert "someone-else" in refused.stderr and "--allow-person-change" in refused.stderr
    same = json.dumps({"type": "track", "userId": row["person"], "event": "Fixed"})
    assert _run(runner, "replace", row["messageId"], same, "--db", orders).exit_code == 0
    with Outbox(orders) as outbox:
        second = outbox.failed("orders", 1)[0]
    allowed = _run(runner, "replace", second["messageId"], other, "--allow-person-change",
                   "--db", orders)
    assert allowed.exit_code == 0, allowed.output


def test_fix_sets_a_field_on_every_failed_row_of_a_run_with_a_dry_run_first(
    runner: CliRunner, orders: str
) -> None:
    dry = _run(runner, "fix", "--run", "orders", "--set", "event=Good", "--set",
               "properties.total=12", "--dry-run", "--db", orders)
    assert dry.exit_code == 0, dry.output
    assert "would fix 5 of 5 failed row(s)" in dry.stdout
    assert '"total": 12' in dry.stdout  # shows a changed payload
    with Outbox(orders) as outbox:
        assert outbox.status()["failed"] == 5
    done = _run(runner, "fix", "--run", "orders", "--set", "event=Good", "--set",
                "properties.total=12", "--json", "--db", orders)
    report = json.loads(done.stdout)
    assert (report["fixed"], report["unchanged"], report["rejected"]) == (5, 0, [])
    with Outbox(orders) as outbox, Sandbox(reject_events=["Bad"]) as sandbox:
        assert outbox.status("orders")["pending"] == 5
        outbox.drain(key=sandbox.key, host=sandbox.url, run="orders", progress=False)
        received = sandbox.messages(event="Good")
    assert sorted(m["userId"] for m in received) == ["u0", "u1", "u2", "u3", "u4"]
    assert {m["properties"]["total"] for m in received} == {12}


def test_fix_with_a_merge_patch_reports_fixes_that_do_not_validate(runner: CliRunner,
                                                                 orders: str) -> None:
    patch = json.dumps({"event": "", "properties": {"total": None}})
    result = _run(runner, "fix", "--run", "orders", "--merge", patch, "--json", "--db",
                  orders)
    assert result.exit_code == 2
    report = json.loads(result.stdout)
    assert report["fixed"] == 0 and len(report["rejected"]) == 5
    assert "event" in report["rejected"][0]["error"]
    with Outbox(orders) as outbox:
        assert outbox.status()["failed"] == 5  # nothing half-written


def test_fix_failed_applies_a_python_function_to_each_failed_payload(orders: str) -> None:
    def fix(payload: dict) -> dict | None:
        if payload["properties"]["i"] == 4:
            return None  # leave this one as it is
        return {**payload, "event": "Good",
                "properties": {**payload["properties"], "total": 10 * payload["properties"]["i"]}}

    with Outbox(orders) as outbox:
        preview = outbox.fix_failed(fix, run="orders", dry_run=True)
        assert (preview.fixed, preview.unchanged) == (4, 1)
        assert outbox.status()["failed"] == 5
        result = outbox.fix_failed(fix, run="orders")
        assert (result.fixed, result.unchanged, result.rejected) == (4, 1, [])
        assert outbox.status("orders")["failed"] == 1
        moved = outbox.fix_failed(lambda p: {**p, "userId": "x"}, run="orders")
        assert moved.fixed == 0 and "person" in moved.rejected[0]["error"]
