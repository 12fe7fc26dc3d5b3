"""Enqueue: idempotency, reporting, chunked pipelined writes, all-or-nothing validation."""

from __future__ import annotations

import pytest

from cio_outbox import MessageError, Outbox
from cio_outbox.storage import StorageError


def _calls(n: int) -> list[dict]:
    return [{"type": "track", "userId": f"u{i}", "event": "E", "properties": {"i": i}}
            for i in range(n)]


def test_single_enqueue_reports_added_then_skipped(outbox: Outbox) -> None:
    first = outbox.track("u1", "E", idempotency_key="k1")
    again = outbox.track("u1", "E", idempotency_key="k1")
    assert (first.added, first.skipped) == (1, 0)
    assert (again.added, again.skipped) == (0, 1)
    assert first.message_id == again.message_id
    assert outbox.status()["pending"] == 1


def test_bulk_rerun_with_keys_adds_nothing_and_misses_nothing(outbox: Outbox) -> None:
    calls = _calls(2500)
    keys = lambda i, _call: f"import:{i}"  # noqa: E731
    partial = outbox.enqueue_many(calls[:1200], idempotency_keys=keys, chunk_size=500)
    full = outbox.enqueue_many(calls, idempotency_keys=keys, chunk_size=500)
    assert (partial.added, full.added, full.skipped) == (1200, 1300, 1200)
    assert outbox.status()["pending"] == 2500


def test_invalid_rows_are_reported_with_their_index_and_the_rest_kept(outbox: Outbox) -> None:
    calls = _calls(10)
    calls[3] = {"type": "track", "userId": "u3"}
    calls[7] = {"type": "track", "event": "E"}
    result = outbox.enqueue_many(calls, start=1)
    assert result.added == 8
    assert [(r.index, r.field) for r in result.rejected] == [(4, "event"), (8, "userId")]


def test_raise_mode_writes_nothing_when_any_row_is_invalid(outbox: Outbox) -> None:
    calls = _calls(30_000)
    calls[-1] = {"type": "track", "userId": "u"}
    with pytest.raises(MessageError, match="nothing written"):
        outbox.enqueue_many(calls, on_invalid="raise", chunk_size=1000)
    assert outbox.status()["total"] == 0


def test_a_write_failure_stops_the_import_and_is_raised(
    tmp_path, monkeypatch: pytest.MonkeyPatch  # type: ignore[no-untyped-def]
) -> None:
    from cio_outbox.storage.sqlite import SQLiteStorage

    outbox = Outbox(tmp_path / "o.db")
    real_tx = SQLiteStorage._tx
    transactions: list[int] = []

    def failing_tx(self, body):  # type: ignore[no-untyped-def]
        transactions.append(1)
        if len(transactions) == 3:
            raise StorageError("disk full (simulated)")
        return real_tx(self, body)

    monkeypatch.setattr(SQLiteStorage, "_tx", failing_tx)
    with pytest.raises(StorageError, match="disk full"):
        outbox.enqueue_many(_calls(10_000), chunk_size=1000)
    monkeypatch.undo()
    assert outbox.status()["pending"] == 2000  # the two chunks committed before the failure
    assert len(transactions) == 3  # nothing was tried after the failure


def test_a_dead_lettered_message_can_be_replaced_with_a_corrected_call(outbox: Outbox) -> None:
    from cio_outbox.sandbox import Sandbox

    outbox.track("u1", "Legacy", properties={"n": 1}, run="fix", message_id="m-bad")
    outbox.track("u1", "Later", run="fix", message_id="m-later")
    with Sandbox(reject_events=["Legacy"]) as sandbox:
        outbox.drain(host=sandbox.url, key=sandbox.key, progress=False)
        assert outbox.status(run="fix")["failed"] == 1
        with pytest.raises(MessageError):
            outbox.replace("m-bad", {"type": "track", "userId": "u1"})  # still invalid
        with pytest.raises(ValueError, match="not failed"):
            outbox.replace("m-later", {"type": "track", "userId": "u1", "event": "X"})
        row = outbox.replace("m-bad", {"type": "track", "userId": "u1", "event": "Migrated",
                                       "properties": {"n": 1}})
        assert row["status"] == "pending" and row["attempts"] == 0 and row["run"] == "fix"
        assert row["last_error"].startswith("replaced; was: HTTP 400")
        outbox.drain(host=sandbox.url, key=sandbox.key, progress=False)
        [received] = sandbox.messages(messageId="m-bad")
    assert received["event"] == "Migrated"
    assert outbox.status(run="fix")["failed"] == 0 and outbox.status(run="fix")["sent"] == 2


def test_replace_command_fixes_a_failed_row(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import json

    from click.testing import CliRunner

    from cio_outbox.cli import cli
    from cio_outbox.sandbox import Sandbox

    db = str(tmp_path / "o.db")
    with Outbox(db) as box, Sandbox(reject_events=["Legacy"]) as sandbox:
        box.track("u1", "Legacy", message_id="m-1")
        box.drain(host=sandbox.url, key=sandbox.key, progress=False)
    runner = CliRunner()
    bad = runner.invoke(cli, ["replace", "m-1", '{"type": "track"}', "--db", db])
    assert bad.exit_code == 2 and "event is required" in bad.output
    good = runner.invoke(cli, ["replace", "m-1", json.dumps(
        {"type": "track", "userId": "u1", "event": "Fixed"}), "--db", db, "--json"])
    assert good.exit_code == 0 and json.loads(good.output)["status"] == "pending"
    missing = runner.invoke(cli, ["replace", "nope", '{"type": "track"}', "--db", db])
    assert missing.exit_code == 1


def test_bulk_enqueue_pauses_the_collector_per_chunk_and_restores_it(
    outbox: Outbox,
) -> None:
    import gc

    seen: list[bool] = []

    def calls():  # type: ignore[no-untyped-def]
        for i in range(25):
            seen.append(gc.isenabled())
            yield {"type": "track", "userId": f"u{i}", "event": "E"}

    assert gc.isenabled()
    result = outbox.enqueue_many(calls(), chunk_size=10)
    assert result.added == 25
    # Paused while each chunk is built, and running again afterwards.
    assert seen == [False] * 25
    assert gc.isenabled()


def test_bulk_enqueue_restores_the_collector_when_the_source_raises(outbox: Outbox) -> None:
    import gc

    def calls():  # type: ignore[no-untyped-def]
        for i in range(15):
            yield {"type": "track", "userId": f"u{i}", "event": "E"}
        raise RuntimeError("export broke")

    with pytest.raises(RuntimeError, match="export broke"):
        outbox.enqueue_many(calls(), chunk_size=10)
    assert gc.isenabled()
    assert outbox.status()["pending"] == 10  # the first chunk was written


def test_bulk_enqueue_leaves_a_disabled_collector_disabled(outbox: Outbox) -> None:
    import gc

    gc.disable()
    try:
        outbox.enqueue_many([{"type": "track", "userId": "u", "event": "E"}])
        assert not gc.isenabled()
    finally:
        gc.enable()
