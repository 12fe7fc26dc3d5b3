"""Secrets and data protection: the API key never lands in the outbox file, the audit trail,
logs, reprs or exception texts; plain http is refused off loopback; the file is private;
and a forgotten person leaves no trace in the file's bytes."""

from __future__ import annotations

import base64
import logging
import os
import stat
import subprocess
import warnings
from pathlib import Path

import pytest
from _rel_support import cli_argv, cli_env, file_bytes, tracks

from cio_outbox import Outbox
from cio_outbox.client import Client
from cio_outbox.config import ApiKey, ConfigError, normalize_host, resolve_target
from cio_outbox.sandbox import Sandbox
from cio_outbox.worker import AuthError

LEGACY = "legacyWriteKey-7f3a9c1e5b"
PREFIXED = "sk_us_Pr1vateSecret9d8e7f"
FAST = {"backoff_initial": 0.02, "backoff_max": 0.1, "progress": False}


def _forms(key: str) -> list[bytes]:
    """Every way the key could show up: itself, its Basic token, and their utf-16 forms."""
    token = base64.b64encode(f"{key}:".encode()).decode()
    forms = [key, key[-12:], token]
    return [f.encode(e) for f in forms for e in ("utf-8", "utf-16-le")]


def _assert_absent(key: str, *texts: str | bytes, where: str) -> None:
    for text in texts:
        data = text.encode() if isinstance(text, str) else text
        for form in _forms(key):
            assert form not in data, f"the key shows in {where}"


@pytest.mark.parametrize("key", [LEGACY, PREFIXED], ids=["legacy", "sk_us"])
def test_the_key_appears_nowhere_after_a_drain_and_a_401(
    tmp_path: Path, key: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # every logger, urllib3's included
    for name in ("urllib3", "urllib3.connectionpool", "cio_outbox", "requests"):
        logging.getLogger(name).setLevel(logging.DEBUG)
    db = tmp_path / "secret.db"
    texts: list[str] = []
    with Outbox(db) as box, Sandbox(key=key, fail_rate=0.2, seed=5,
                                    reject_events=["Poison"]) as sandbox:
        box.enqueue_many(tracks(500, 10, pad=""))
        box.track("p1", "Poison")
        result = box.drain(host=sandbox.url, key=key, **FAST)
        assert result["sent"] == 500 and result["failed"] == 1
        box.enqueue_many(tracks(50, 5, pad=""), run="second")
        # The 401 path: a wrong key that shares the right key's prefix and shape.
        wrong = key[:-4] + "XXXX"
        worker = box.worker(key=wrong, host=sandbox.url, **{k: v for k, v in FAST.items()
                                                             if k != "progress"})
        failed_run = worker.run(until_empty=True)
        assert failed_run.exit_code == 3
        texts += [failed_run.error or "", repr(worker.client), repr(worker), repr(box),
                  repr(box.storage), repr(ApiKey(key)), str(ApiKey(key)), repr(sandbox)]
        texts.append(str(AuthError(failed_run.error or "")))
        _assert_absent(wrong, *texts, where="the 401 error")
        client = Client(ApiKey(key), resolve_target(ApiKey(key), host=sandbox.url))
        texts += [repr(client), repr(client.session.auth)]
        client.close()
        audit = box.log(limit=10_000) + box.failed(limit=100)
        texts += [repr(entry) for entry in audit]
        texts += [repr(box.status()), repr(box.rows(limit=10_000))]
        for row in box.rows(limit=5):
            texts.append(repr(box.history(row["message_id"])))
    texts += [record.getMessage() for record in caplog.records]
    texts.append(caplog.text)
    assert any("urllib3" in r.name for r in caplog.records), "urllib3 debug logs were captured"
    _assert_absent(key, *texts, where="reprs, audit trail or logs")
    _assert_absent(key, file_bytes(db), where="the outbox file")


@pytest.mark.parametrize("bad", [
    "sk_us_has space inside", "sk_us_ctl\x07char", "",
])
def test_config_errors_never_contain_the_key(bad: str) -> None:
    with pytest.raises(ConfigError) as caught:
        ApiKey(bad)
    if bad:
        _assert_absent(bad.split()[0] if " " in bad else bad, str(caught.value),
                       repr(caught.value), where="a ConfigError")


def test_config_errors_on_region_and_host_never_contain_the_key() -> None:
    key = ApiKey(PREFIXED)
    errors = []
    for call in (
        lambda: resolve_target(key, region="eu"),
        lambda: resolve_target(key, region="mars"),
        lambda: resolve_target(key, host="ftp://example.com"),
        lambda: resolve_target(key, host="http://cdp.customer.io"),
    ):
        with pytest.raises(ConfigError) as caught:
            call()
        errors.append(str(caught.value))
    with warnings.catch_warnings(record=True) as caught_warnings:
        warnings.simplefilter("always")
        resolve_target(key, host="https://cdp-eu.customer.io")
    errors += [str(w.message) for w in caught_warnings]
    _assert_absent(PREFIXED, *errors, where="config errors")
    with pytest.raises(TypeError):
        import pickle

        pickle.dumps(key)


def test_cli_never_prints_the_key(tmp_path: Path) -> None:
    db = tmp_path / "cli.db"
    with Outbox(db) as box:
        box.enqueue_many(tracks(20, 2, pad=""))
    outputs = []
    with Sandbox(key=PREFIXED) as sandbox:
        for key in (PREFIXED[:-3] + "bad", "sk_us_with space", "sk_eu_" + PREFIXED[6:]):
            done = subprocess.run(
                cli_argv("worker", "--db", str(db), "--host", sandbox.url, "--until-empty"),
                env=cli_env(key), capture_output=True, text=True, timeout=60)
            assert done.returncode in (2, 3), done.stderr
            outputs.append((key, done.stdout + done.stderr))
        done = subprocess.run(
            cli_argv("worker", "--db", str(db), "--host", sandbox.url, "--until-empty"),
            env=cli_env(PREFIXED), capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        outputs.append((PREFIXED, done.stdout + done.stderr))
    for key, text in outputs:
        _assert_absent(key.split()[0], text, where="CLI output")
        _assert_absent(PREFIXED, text, where="CLI output")
    _assert_absent(PREFIXED, file_bytes(db), where="the outbox file")


# ---------------------------------------------------------------- plain http


@pytest.mark.parametrize("host", [
    "http://cdp.customer.io", "http://10.0.0.5:8080", "http://0.0.0.0:8765",
    "http://127.0.0.1.example.com", "http://localhost.example.com", "HTTP://example.com",
    "http://[::ffff:10.0.0.1]", "http://192.168.1.10/v1",
])
def test_plain_http_off_loopback_is_refused_unless_allowed(tmp_path: Path, host: str) -> None:
    with pytest.raises(ConfigError, match="plain http"):
        normalize_host(host)
    with Outbox(tmp_path / "h.db") as box, pytest.raises(ConfigError):
        box.worker(key=LEGACY, host=host)
    assert normalize_host(host, allow_insecure=True).lower().startswith("http://")
    done = subprocess.run(cli_argv("worker", "--db", str(tmp_path / "h.db"), "--host", host,
                                   "--until-empty"),
                          env=cli_env(LEGACY), capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "plain http" in done.stderr


@pytest.mark.parametrize("host", ["http://127.0.0.1:8765", "http://localhost:1",
                                  "http://[::1]:9", "http://127.8.9.10"])
def test_plain_http_to_loopback_is_allowed(host: str) -> None:
    assert normalize_host(host).startswith("http://")


# ---------------------------------------------------------------- the file itself


def test_outbox_files_are_private(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        db = tmp_path / "private.db"
        box = Outbox(db)
        box.track("u1", "E")
        for path in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
            if path.exists():
                assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        box.close()
        cli_db = tmp_path / "cli.db"
        jsonl = tmp_path / "calls.jsonl"
        jsonl.write_text('{"type":"identify","userId":"u1"}\n')
        done = subprocess.run(cli_argv("enqueue", str(jsonl), "--db", str(cli_db)),
                              env=cli_env(), capture_output=True, timeout=60)
        assert done.returncode == 0
        assert stat.S_IMODE(cli_db.stat().st_mode) == 0o600
    finally:
        os.umask(old)


def test_forget_leaves_no_trace_in_the_files(tmp_path: Path) -> None:
    db = tmp_path / "forget.db"
    person = "ada-lovelace-7731"
    secrets = [person, "ada.lovelace@example.com", "Analytical Engine Ltd", "+44 20 7946 0018"]
    with Outbox(db) as box, Sandbox(reject_events=["Poison"]) as sandbox:
        box.enqueue_many(tracks(300, 30, pad=""))
        box.identify(person, traits={"email": secrets[1], "company": secrets[2],
                                     "phone": secrets[3]})
        box.track(person, "Poison", properties={"email": secrets[1]})
        box.track(None, "Viewed", anonymous_id=person, properties={"phone": secrets[3]})
        box.alias("someone-else", person)
        box.group(person, "g1", traits={"name": secrets[2]})
        box.drain(host=sandbox.url, key=sandbox.key, **FAST)  # sent and dead-lettered rows
        box.track(person, "Pending", properties={"company": secrets[2]})  # still pending
        before_other = {r["message_id"] for r in box.rows(limit=10_000)
                        if person not in r["payload"]}
        assert any(s.encode() in file_bytes(db) for s in secrets)
        deleted = box.forget(person)
        assert deleted == 6
        data = file_bytes(db)
        remaining = {r["message_id"] for r in box.rows(limit=10_000)}
        status = box.status()
    for secret in secrets:
        for encoding in ("utf-8", "utf-16-le"):
            assert secret.encode(encoding) not in data, f"{secret!r} is still in the file"
    assert remaining == before_other  # nobody else was touched
    assert status["total"] == 300
    after = file_bytes(db)  # and after close (checkpoint on close) too
    for secret in secrets:
        assert secret.encode() not in after
