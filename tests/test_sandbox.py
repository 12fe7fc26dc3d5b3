"""The local sandbox, exercised over real HTTP with requests."""

from __future__ import annotations

import base64
import gc
import gzip
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from cio_outbox.config import is_loopback
from cio_outbox.messages import MessageError
from cio_outbox.sandbox import (
    MESSAGE_LIMIT,
    REQUEST_LIMIT,
    Sandbox,
    SandboxProcess,
    message_size,
)
from cio_outbox.sandbox import validation as sandbox_validation

TIMEOUT = 30
PREFIXED_KEY = "sk_us_0123456789abcdef"


def track(user: str = "u1", event: str = "Signed Up", mid: str | None = None) -> dict[str, Any]:
    msg: dict[str, Any] = {
        "type": "track",
        "userId": user,
        "event": event,
        "properties": {"plan": "pro"},
        "timestamp": "2026-01-01T00:00:00Z",
    }
    if mid is not None:
        msg["messageId"] = mid
    return msg


def post(
    sb: Sandbox | SandboxProcess,
    endpoint: str,
    body: Any,
    *,
    auth: Any = "default",
    headers: dict[str, str] | None = None,
    data: bytes | None = None,
    session: requests.Session | None = None,
) -> requests.Response:
    send = session.post if session is not None else requests.post
    if auth == "default":
        auth = (sb.key, "")
    payload = data if data is not None else json.dumps(body).encode()
    # Strict by default, as the worker sends: refusals are answered, not dropped.
    hdrs = {"Content-Type": "application/json", "X-Strict-Mode": "1", **(headers or {})}
    return send(
        f"{sb.url}/v1/{endpoint}", data=payload, auth=auth, headers=hdrs, timeout=TIMEOUT
    )


def errors(resp: requests.Response) -> list[dict[str, Any]]:
    body = resp.json()
    errs = body["meta"]["errors"]
    for err in errs:
        assert set(err) >= {"field", "reason", "message"}
    return errs


@pytest.fixture
def sb() -> Iterator[Sandbox]:
    # These tests read the item names of refusals, the sandbox's own answer form.
    with Sandbox(named_errors=True) as sandbox:
        yield sandbox


# ---------------------------------------------------------------- lifecycle and repr


def test_url_has_scheme_host_port_and_no_v1(sb: Sandbox) -> None:
    assert sb.url.startswith("http://127.0.0.1:")
    assert not sb.url.endswith("/v1")
    assert int(sb.url.rsplit(":", 1)[1]) > 0


def test_context_manager_stops_server_and_joins_threads() -> None:
    before = threading.active_count()
    with Sandbox() as sandbox:
        url = sandbox.url
        session = requests.Session()  # holds a keep-alive connection open across the stop
        assert post(sandbox, "track", track(), session=session).status_code == 200
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{url}/sandbox/stats", timeout=5)
    session.close()
    deadline = time.monotonic() + 5
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threading.active_count() <= before


def test_repr_never_shows_key() -> None:
    key = "very-secret-key-123"
    with Sandbox(key=key, named_errors=True) as sandbox:
        assert key not in repr(sandbox)
        assert "Sandbox" in repr(sandbox)
        assert sandbox.key == key
    assert key not in repr(sandbox)


# ---------------------------------------------------------------- auth


def test_basic_auth_accepted_and_answers_empty_object(sb: Sandbox) -> None:
    resp = post(sb, "track", track())
    assert resp.status_code == 200
    assert resp.json() == {}
    assert len(sb.messages()) == 1


def test_wrong_key_is_401_without_echoing_any_key() -> None:
    key = "configured-secret-key"
    presented = "presented-wrong-key"
    with Sandbox(key=key, named_errors=True) as sandbox:
        resp = post(sandbox, "track", track(), auth=(presented, ""))
        assert resp.status_code == 401
        assert errors(resp)
        assert key not in resp.text
        assert presented not in resp.text
        assert base64.b64encode(f"{presented}:".encode()).decode() not in resp.text
        assert sandbox.messages() == []


def test_missing_auth_is_401(sb: Sandbox) -> None:
    resp = post(sb, "track", track(), auth=None)
    assert resp.status_code == 401
    assert errors(resp)[0]["field"] == "Authorization"
    assert sb.messages() == []


def test_basic_with_password_is_401(sb: Sandbox) -> None:
    assert post(sb, "track", track(), auth=(sb.key, "x")).status_code == 401


def test_bearer_for_non_prefixed_key_is_401(sb: Sandbox) -> None:
    resp = post(sb, "track", track(), auth=None, headers={"Authorization": f"Bearer {sb.key}"})
    assert resp.status_code == 401
    assert sb.key not in resp.text


def test_prefixed_key_needs_bearer() -> None:
    with Sandbox(key=PREFIXED_KEY, named_errors=True) as sandbox:
        ok = post(sandbox, "track", track(), auth=None,
                  headers={"Authorization": f"Bearer {PREFIXED_KEY}"})
        assert ok.status_code == 200
        basic = post(sandbox, "track", track(), auth=(PREFIXED_KEY, ""))
        assert basic.status_code == 401
        assert PREFIXED_KEY not in basic.text
        wrong = post(sandbox, "track", track(), auth=None,
                     headers={"Authorization": "Bearer sk_us_wrong"})
        assert wrong.status_code == 401
        assert "sk_us_wrong" not in wrong.text
        assert len(sandbox.messages()) == 1
        assert sandbox.stats()["auth"]["bearer"] == 2
        assert sandbox.stats()["auth"]["basic"] == 1


@pytest.mark.parametrize("key", ["pk_eu_abc", "sk_eu_abc", "pk_us_abc"])
def test_all_prefixes_use_bearer(key: str) -> None:
    with Sandbox(key=key, named_errors=True) as sandbox:
        resp = post(sandbox, "track", track(), auth=None,
                    headers={"Authorization": f"Bearer {key}"})
        assert resp.status_code == 200


def test_stats_count_auth_schemes(sb: Sandbox) -> None:
    post(sb, "track", track())
    post(sb, "track", track())
    post(sb, "track", track(), auth=None, headers={"Authorization": "Bearer nope"})
    post(sb, "track", track(), auth=None)
    auth = sb.stats()["auth"]
    assert auth["basic"] == 2
    assert auth["bearer"] == 1


# ---------------------------------------------------------------- bodies and limits


def test_gzip_body_accepted(sb: Sandbox) -> None:
    body = {"batch": [track(mid=f"g{i}") for i in range(10)]}
    resp = post(sb, "batch", None, data=gzip.compress(json.dumps(body).encode()),
                headers={"Content-Encoding": "gzip"})
    assert resp.status_code == 200, resp.text
    assert len(sb.messages()) == 10
    assert sb.stats()["gzip_requests"] == 1


def test_invalid_gzip_is_400(sb: Sandbox) -> None:
    resp = post(sb, "track", None, data=b"not gzip at all", headers={"Content-Encoding": "gzip"})
    assert resp.status_code == 400
    assert errors(resp)[0]["reason"] == "invalid_gzip"


def test_gzip_limit_applies_to_decompressed_size(sb: Sandbox) -> None:
    items = [track(mid=f"big{i}") for i in range(4000)]
    raw = json.dumps({"batch": items}).encode()
    assert len(raw) > REQUEST_LIMIT
    compressed = gzip.compress(raw)
    assert len(compressed) < REQUEST_LIMIT
    resp = post(sb, "batch", None, data=compressed, headers={"Content-Encoding": "gzip"})
    assert resp.status_code == 413
    msg = errors(resp)[0]["message"]
    assert str(len(raw)) in msg
    assert str(REQUEST_LIMIT) in msg
    assert sb.messages() == []


def test_gzip_bomb_is_refused_quickly(sb: Sandbox) -> None:
    bomb = gzip.compress(b"0" * (200 * 1024 * 1024), compresslevel=9)
    assert len(bomb) < 1024 * 1024
    started = time.monotonic()
    resp = post(sb, "batch", None, data=bomb, headers={"Content-Encoding": "gzip"})
    assert resp.status_code == 413
    assert str(REQUEST_LIMIT) in errors(resp)[0]["message"]
    assert time.monotonic() - started < 20


def test_body_over_request_limit_is_413_naming_size_and_limit(sb: Sandbox) -> None:
    items = [track(mid=f"x{i}") for i in range(4000)]
    raw = json.dumps({"batch": items}).encode()
    assert len(raw) > REQUEST_LIMIT
    resp = post(sb, "batch", None, data=raw)
    assert resp.status_code == 413
    err = errors(resp)[0]
    assert str(len(raw)) in err["message"]
    assert str(REQUEST_LIMIT) in err["message"]
    assert sb.messages() == []
    # The connection stays usable after a refused body.
    assert post(sb, "track", track()).status_code == 200


def test_body_exactly_at_limit_is_not_413(sb: Sandbox) -> None:
    filler = "a" * 20_000
    items = [dict(track(mid=f"f{i}"), properties={"f": filler}) for i in range(20)]
    doc = {"batch": items}
    raw = json.dumps(doc).encode()
    pad = REQUEST_LIMIT - len(raw) - len(', "pad": ""')
    doc["pad"] = "b" * pad
    raw = json.dumps(doc).encode()
    assert len(raw) == REQUEST_LIMIT
    resp = post(sb, "batch", None, data=raw)
    assert resp.status_code == 200, resp.text[:300]


def test_message_over_limit_names_item_size_and_limit(sb: Sandbox) -> None:
    big = track(mid="big")
    big["properties"] = {"blob": "x" * MESSAGE_LIMIT}
    size = message_size(big)
    assert size > MESSAGE_LIMIT
    resp = post(sb, "batch", {"batch": [track(mid="small"), big]})
    assert resp.status_code == 400
    errs = [e for e in errors(resp) if e["field"] == "batch[1]"]
    assert errs, errors(resp)
    assert str(size) in errs[0]["message"]
    assert str(MESSAGE_LIMIT) in errs[0]["message"]
    assert sb.messages() == []


def test_message_exactly_at_limit_is_accepted(sb: Sandbox) -> None:
    msg = track(mid="exact")
    msg["properties"] = {"blob": ""}
    msg["properties"]["blob"] = "é" * ((MESSAGE_LIMIT - message_size(msg)) // 2)
    while message_size(msg) < MESSAGE_LIMIT:
        msg["properties"]["blob"] += "a"
    assert message_size(msg) == MESSAGE_LIMIT
    assert post(sb, "batch", {"batch": [msg]}).status_code == 200


def test_message_size_uses_compact_utf8_json() -> None:
    msg = {"a": "é", "b": [1, 2]}
    assert message_size(msg) == len('{"a":"é","b":[1,2]}'.encode())


def test_chunked_body_accepted(sb: Sandbox) -> None:
    raw = json.dumps({"batch": [track(mid="c1"), track(mid="c2")]}).encode()

    def gen() -> Iterator[bytes]:
        yield raw[:10]
        yield raw[10:]

    resp = requests.post(f"{sb.url}/v1/batch", data=gen(), auth=(sb.key, ""), timeout=TIMEOUT)
    assert resp.status_code == 200, resp.text
    assert len(sb.messages()) == 2


def test_invalid_json_is_400(sb: Sandbox) -> None:
    resp = post(sb, "track", None, data=b"{not json")
    assert resp.status_code == 400
    assert errors(resp)[0]["reason"] == "invalid_json"


def test_unknown_endpoint_is_404(sb: Sandbox) -> None:
    resp = post(sb, "nope", track())
    assert resp.status_code == 404
    assert errors(resp)


# ---------------------------------------------------------------- validation


def test_track_without_event_names_field(sb: Sandbox) -> None:
    bad = track(mid="bad")
    del bad["event"]
    resp = post(sb, "batch", {"batch": [track(mid="ok"), bad]})
    assert resp.status_code == 400
    assert "batch[1].event" in [e["field"] for e in errors(resp)]
    assert sb.messages() == []
    assert sb.stats()["rejected_messages"] == 2


def test_identify_without_ids_names_field(sb: Sandbox) -> None:
    ident = {"type": "identify", "traits": {"email": "a@example.com"}}
    resp = post(sb, "batch", {"batch": [track(mid="ok"), track(mid="ok2"), ident]})
    assert resp.status_code == 400
    fields = [e["field"] for e in errors(resp)]
    assert any(f in ("batch[2].userId", "batch[2].anonymousId") for f in fields), fields
    assert sb.messages() == []


def test_alias_in_batch_is_accepted_as_the_official_library_sends_it(sb: Sandbox) -> None:
    alias = {"type": "alias", "userId": "u1", "previousId": "anon"}
    resp = post(sb, "batch", {"batch": [alias]})
    assert resp.status_code == 200, resp.text
    assert [m["type"] for m in sb.messages()] == ["alias"]
    bad = {"type": "alias", "userId": "u1"}
    resp = post(sb, "batch", {"batch": [bad]})
    assert resp.status_code == 400
    assert errors(resp)[0]["field"] == "batch[0].previousId"


def test_unknown_type_in_batch_is_refused(sb: Sandbox) -> None:
    resp = post(sb, "batch", {"batch": [dict(track(), type="bogus"), {"userId": "u"}]})
    assert resp.status_code == 400
    fields = [e["field"] for e in errors(resp)]
    assert "batch[0].type" in fields
    assert "batch[1].type" in fields


def test_several_bad_items_each_listed(sb: Sandbox) -> None:
    items = [track(mid=f"m{i}") for i in range(6)]
    del items[1]["event"]
    del items[4]["event"]
    resp = post(sb, "batch", {"batch": items})
    fields = [e["field"] for e in errors(resp)]
    assert "batch[1].event" in fields
    assert "batch[4].event" in fields
    assert not any(f.startswith(("batch[0]", "batch[2]", "batch[3]", "batch[5]")) for f in fields)
    assert sb.stats()["invalid_messages"] == 2


def test_batch_body_must_have_a_list(sb: Sandbox) -> None:
    resp = post(sb, "batch", {"messages": []})
    assert resp.status_code == 400
    assert errors(resp)[0]["field"] == "batch"


def test_single_endpoints_store_with_implied_type(sb: Sandbox) -> None:
    bodies = {
        "identify": {"userId": "u1", "traits": {"email": "a@example.com"}},
        "track": {"userId": "u1", "event": "E"},
        "page": {"userId": "u1", "name": "Home"},
        "screen": {"userId": "u1", "name": "Main"},
        "group": {"userId": "u1", "groupId": "g1"},
        "alias": {"userId": "u1", "previousId": "anon-1"},
    }
    for endpoint, body in bodies.items():
        resp = post(sb, endpoint, body)
        assert resp.status_code == 200, (endpoint, resp.text)
    stored = sb.messages()
    assert [m["type"] for m in stored] == list(bodies)
    assert [m["_sandbox"]["endpoint"] for m in stored] == list(bodies)


def test_single_endpoint_type_must_match(sb: Sandbox) -> None:
    resp = post(sb, "track", dict(track(), type="identify"))
    assert resp.status_code == 400
    assert errors(resp)[0]["field"] == "type"
    assert sb.messages() == []


def test_single_call_errors_name_plain_fields(sb: Sandbox) -> None:
    resp = post(sb, "group", {"userId": "u1"})
    assert resp.status_code == 400
    assert "groupId" in [e["field"] for e in errors(resp)]
    resp = post(sb, "alias", {"userId": "u1"})
    assert "previousId" in [e["field"] for e in errors(resp)]


def test_messages_are_held_to_the_enqueue_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    """The sandbox has no rules of its own: each message goes through validate_wire."""
    calls: list[dict[str, Any]] = []

    def validate_wire(message: dict[str, Any]) -> None:
        calls.append(message)
        if message.get("userId") == "bad":
            raise MessageError("identify: traits.email not an email", field="traits.email")

    monkeypatch.setattr(sandbox_validation, "validate_wire", validate_wire)
    with Sandbox(named_errors=True) as sandbox:
        assert sandbox.stats()["validator"] == "cio_outbox.messages"
        bad = {"type": "identify", "userId": "bad"}
        resp = post(sandbox, "batch", {"batch": [track(), bad]})
        assert resp.status_code == 400
        err = errors(resp)[0]
        assert err == {"field": "batch[1].traits.email", "reason": "invalid",
                       "message": "identify: traits.email not an email"}
        assert [c["type"] for c in calls] == ["track", "identify"]


# ---------------------------------------------------------------- reject_events


def test_reject_events_names_item_and_event() -> None:
    with Sandbox(reject_events=("Poison",), named_errors=True) as sandbox:
        items = [track(mid="a"), track(mid="b"), track(event="Poison", mid="c"),
                 track(event="Poison", mid="d")]
        resp = post(sandbox, "batch", {"batch": items})
        assert resp.status_code == 400
        errs = errors(resp)
        assert [e["field"] for e in errs] == ["batch[2].event", "batch[3].event"]
        assert all("Poison" in e["reason"] for e in errs)
        assert sandbox.messages() == []
        single = post(sandbox, "track", track(event="Poison"))
        assert single.status_code == 400
        assert errors(single)[0]["field"] == "event"
        sandbox.configure(reject_events=[])
        assert post(sandbox, "batch", {"batch": items}).status_code == 200
        assert len(sandbox.messages()) == 4


# ---------------------------------------------------------------- faults


def test_fail_rate_one_fails_everything_and_stores_nothing() -> None:
    with Sandbox(fail_rate=1.0, named_errors=True) as sandbox:
        statuses = {post(sandbox, "track", track(mid=f"f{i}")).status_code for i in range(20)}
        assert statuses <= {500, 502, 503}
        assert sandbox.messages() == []
        stats = sandbox.stats()
        assert stats["injected_failures"] == 20
        assert stats["messages"] == 0


def test_fail_rate_zero_never_fails() -> None:
    with Sandbox(fail_rate=0.0, named_errors=True) as sandbox:
        statuses = {post(sandbox, "track", track(mid=f"f{i}")).status_code for i in range(20)}
        assert statuses == {200}
        assert sandbox.stats()["injected_failures"] == 0


def test_fail_rate_is_reproducible_with_seed() -> None:
    runs = []
    for _ in range(2):
        with Sandbox(fail_rate=0.5, seed=1234, named_errors=True) as sandbox:
            runs.append([post(sandbox, "track", track()).status_code for _ in range(30)])
    assert runs[0] == runs[1]
    assert 200 in runs[0]
    assert set(runs[0]) - {200}


def test_failure_errors_have_meta_errors() -> None:
    with Sandbox(fail_rate=1.0, named_errors=True) as sandbox:
        resp = post(sandbox, "track", track())
        assert errors(resp)[0]["reason"] == "injected_failure"


def test_rate_limit_answers_429_with_retry_after() -> None:
    with Sandbox(rate_limit=2, named_errors=True) as sandbox:
        with requests.Session() as session:
            statuses = [post(sandbox, "track", track(), session=session) for _ in range(6)]
        codes = [r.status_code for r in statuses]
        assert codes[:2] == [200, 200]
        limited = [r for r in statuses if r.status_code == 429]
        assert limited
        for resp in limited:
            assert int(resp.headers["Retry-After"]) >= 1
            assert errors(resp)[0]["reason"] == "rate_limited"
        assert sandbox.stats()["rate_limited"] == len(limited)
        assert len(sandbox.messages()) == codes.count(200)


def test_latency_delays_but_does_not_serialise() -> None:
    latency = 1.0
    with Sandbox(latency=latency, named_errors=True) as sandbox:
        started = time.monotonic()
        assert post(sandbox, "track", track()).status_code == 200
        assert time.monotonic() - started >= latency

        results: list[int] = []

        def one() -> None:
            results.append(post(sandbox, "track", track()).status_code)

        threads = [threading.Thread(target=one) for _ in range(2)]
        started = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - started
        assert results == [200, 200]
        assert latency <= elapsed < 1.8 * latency


# ---------------------------------------------------------------- storage


def test_dedupe_by_message_id(sb: Sandbox) -> None:
    assert post(sb, "track", track(mid="same")).status_code == 200
    assert post(sb, "batch", {"batch": [track(mid="same"), track(mid="other"),
                                        track(mid="other")]}).status_code == 200
    stored = sb.messages()
    assert [m["messageId"] for m in stored] == ["same", "other"]
    stats = sb.stats()
    assert stats["duplicates"] == 2
    assert stats["messages"] == 2


def test_missing_message_id_is_assigned(sb: Sandbox) -> None:
    post(sb, "batch", {"batch": [track(), track()]})
    ids = [m["messageId"] for m in sb.messages()]
    assert len(ids) == 2
    assert all(isinstance(i, str) and i for i in ids)
    assert ids[0] != ids[1]


def test_metadata_recorded(sb: Sandbox) -> None:
    post(sb, "batch", {"batch": [track(mid="a"), track(mid="b")], "sentAt": "2026-01-01T00:00:01Z"})
    post(sb, "track", track(mid="c"))
    stored = sb.messages()
    assert [m["_sandbox"]["seq"] for m in stored] == [1, 2, 3]
    assert [m["_sandbox"]["endpoint"] for m in stored] == ["batch", "batch", "track"]
    assert stored[0]["_sandbox"]["sentAt"] == "2026-01-01T00:00:01Z"
    assert stored[2]["_sandbox"]["sentAt"] is None
    assert all(m["_sandbox"]["receivedAt"].endswith("Z") for m in stored)
    # The message itself is stored as sent.
    stripped = {k: v for k, v in stored[0].items() if k != "_sandbox"}
    assert stripped == track(mid="a")


def test_messages_returns_copies(sb: Sandbox) -> None:
    post(sb, "track", track(mid="a"))
    sb.messages()[0]["event"] = "changed"
    assert sb.messages()[0]["event"] == "Signed Up"


def test_message_filters(sb: Sandbox) -> None:
    items = [
        track(user="u1", event="A", mid="1"),
        track(user="u2", event="B", mid="2"),
        {"type": "identify", "anonymousId": "anon", "messageId": "3"},
        track(user="u1", event="B", mid="4"),
    ]
    post(sb, "batch", {"batch": items})
    assert [m["messageId"] for m in sb.messages(userId="u1")] == ["1", "4"]
    assert [m["messageId"] for m in sb.messages(anonymousId="anon")] == ["3"]
    assert [m["messageId"] for m in sb.messages(event="B")] == ["2", "4"]
    assert [m["messageId"] for m in sb.messages(type="identify")] == ["3"]
    assert [m["messageId"] for m in sb.messages(messageId="2")] == ["2"]
    assert [m["messageId"] for m in sb.messages(limit=2)] == ["1", "2"]
    assert [m["messageId"] for m in sb.messages(after=2)] == ["3", "4"]
    assert [m["messageId"] for m in sb.messages(userId="u1", event="B")] == ["4"]
    assert sb.messages(messageId="nope") == []
    with pytest.raises(ValueError, match="unknown filter"):
        sb.messages(colour="red")

    over_http = requests.get(f"{sb.url}/sandbox/messages",
                             params={"userId": "u1", "after": "1"}, timeout=TIMEOUT)
    assert over_http.status_code == 200
    assert [m["messageId"] for m in over_http.json()["messages"]] == ["4"]
    bad = requests.get(f"{sb.url}/sandbox/messages", params={"limit": "x"}, timeout=TIMEOUT)
    assert bad.status_code == 400
    unknown = requests.get(f"{sb.url}/sandbox/messages", params={"foo": "1"}, timeout=TIMEOUT)
    assert unknown.status_code == 400


def test_stats_shape_and_counts(sb: Sandbox) -> None:
    raw = json.dumps({"batch": [track(mid="1"), track(mid="2")]}).encode()
    post(sb, "batch", None, data=raw)
    post(sb, "track", track(mid="3"))
    post(sb, "track", track(), auth=None)
    stats = requests.get(f"{sb.url}/sandbox/stats", timeout=TIMEOUT).json()
    for name in ("requests", "by_status", "by_endpoint", "messages", "duplicates",
                 "rejected_messages", "injected_failures", "rate_limited", "auth",
                 "bytes_received", "gzip_requests"):
        assert name in stats
    assert stats["requests"] == 3
    assert stats["by_status"] == {"200": 2, "401": 1}
    assert stats["by_endpoint"] == {"batch": 1, "track": 2}
    assert stats["messages"] == 3
    expected = len(raw) + len(json.dumps(track(mid="3"))) + len(json.dumps(track()))
    assert stats["bytes_received"] == expected
    assert stats == sb.stats()


def test_reset_clears_messages_and_stats(sb: Sandbox) -> None:
    post(sb, "track", track(mid="a"))
    sb.reset()
    assert sb.messages() == []
    assert sb.stats()["requests"] == 0
    post(sb, "track", track(mid="a"))  # no longer a duplicate
    assert sb.messages()[0]["_sandbox"]["seq"] == 1
    resp = requests.post(f"{sb.url}/sandbox/reset", timeout=TIMEOUT)
    assert resp.status_code == 200
    assert sb.messages() == []


def test_configure_over_http_injects_and_heals(sb: Sandbox) -> None:
    url = f"{sb.url}/sandbox/config"
    resp = requests.post(url, json={"fail_rate": 1.0}, timeout=TIMEOUT)
    assert resp.status_code == 200
    assert resp.json()["fail_rate"] == 1.0
    assert post(sb, "track", track()).status_code in (500, 502, 503)
    requests.post(url, json={"fail_rate": 0.0, "reject_events": ["X"]}, timeout=TIMEOUT)
    assert post(sb, "track", track()).status_code == 200
    assert post(sb, "track", track(event="X")).status_code == 400
    bad = requests.post(url, json={"fail_rate": 2}, timeout=TIMEOUT)
    assert bad.status_code == 400
    unknown = requests.post(url, json={"key": "x"}, timeout=TIMEOUT)
    assert unknown.status_code == 400
    assert requests.get(url, timeout=TIMEOUT).json()["reject_events"] == ["X"]


def test_configure_python_api(sb: Sandbox) -> None:
    config = sb.configure(rate_limit=1, latency=0.0)
    assert config["rate_limit"] == 1
    assert sb.key not in json.dumps(config)
    with pytest.raises(ValueError):
        sb.configure(latency=-1)
    with pytest.raises(ValueError):
        sb.configure(nonsense=1)
    sb.configure(rate_limit=None)
    assert all(post(sb, "track", track()).status_code == 200 for _ in range(5))


def test_inspection_needs_no_auth(sb: Sandbox) -> None:
    for path in ("messages", "stats", "config"):
        assert requests.get(f"{sb.url}/sandbox/{path}", timeout=TIMEOUT).status_code == 200


def test_loopback_check() -> None:
    assert is_loopback("127.0.0.1")
    assert is_loopback("::1")
    assert is_loopback("::ffff:127.0.0.1")
    assert not is_loopback("10.0.0.1")
    assert not is_loopback("not an address")


def test_keep_alive_reuses_connection(sb: Sandbox) -> None:
    with requests.Session() as session:
        for i in range(5):
            resp = post(sb, "track", track(mid=str(i)), session=session)
            assert resp.status_code == 200
            assert resp.headers.get("Connection", "").lower() != "close"
    assert len(sb.messages()) == 5


# ---------------------------------------------------------------- separate process and CLI


def test_sandbox_process_start_and_stop() -> None:
    key = "process-secret-key"
    with SandboxProcess(key=key, reject_events=("Poison",)) as proc:
        assert key not in repr(proc)
        assert proc.pid != os.getpid()
        assert post(proc, "track", track(mid="p1")).status_code == 200
        assert post(proc, "track", track(event="Poison")).status_code == 400
        assert [m["messageId"] for m in proc.messages()] == ["p1"]
        assert proc.stats()["messages"] == 1
        proc.configure(fail_rate=1.0)
        assert post(proc, "track", track()).status_code in (500, 502, 503)
        proc.configure(fail_rate=0.0, throttle_rate=1.0)
        assert post(proc, "track", track()).status_code == 429
        with pytest.raises(ValueError, match="throttle_rate"):
            proc.configure(throttle_rate=3)
        proc.reset()
        assert proc.stats()["requests"] == 0
        url = proc.url
        child = proc.process
    assert child.poll() is not None
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{url}/sandbox/stats", timeout=5)


def test_cli_serves_until_sigterm_and_takes_key_from_env() -> None:
    env = dict(os.environ, CIO_SANDBOX_KEY="env-secret-key")
    child = subprocess.Popen(
        [sys.executable, "-m", "cio_outbox", "sandbox", "--port", "0", "--reject-event", "X",
         "--rate-limit", "100", "--throttle-rate", "0", "--seed", "3"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True,
    )
    try:
        assert child.stdout is not None
        line = json.loads(child.stdout.readline())
        url = line["url"]
        assert line["pid"] == child.pid
        ok = requests.post(f"{url}/v1/track", json=track(), auth=("env-secret-key", ""),
                           timeout=TIMEOUT)
        assert ok.status_code == 200
        poisoned = requests.post(f"{url}/v1/track", json=track(event="X"),
                                 auth=("env-secret-key", ""), timeout=TIMEOUT,
                                 headers={"X-Strict-Mode": "1"})
        assert poisoned.status_code == 400
        assert "rejected" in poisoned.json()["meta"]["error"]
        child.send_signal(signal.SIGTERM)
        out, err = child.communicate(timeout=TIMEOUT)
        assert child.returncode == 0, err
        assert "env-secret-key" not in out + err
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()


def test_cli_sigint_exits_zero() -> None:
    child = subprocess.Popen(
        [sys.executable, "-m", "cio_outbox", "sandbox", "--key", "k1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert child.stdout is not None
        url = json.loads(child.stdout.readline())["url"]
        assert requests.get(f"{url}/sandbox/stats", timeout=TIMEOUT).status_code == 200
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=TIMEOUT)
        assert child.returncode == 0, err
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()


# ---------------------------------------------------------------- parsing and the size shortcut


@pytest.mark.parametrize("text", [
    '{"batch": [{"a": 1}, {"b": [1, 2, {"c": "d"}]}], "sentAt": "x"}',
    ' \n{ "sentAt" : null , "batch" : [ ] , "context" : {"x": 1.5e3} } \n',
    '{"batch": [1, "two", null, true, {"k": "\\u00e9\\n"}]}',
    '{"batch": "not a list", "x": 1}',
    '{"batch": [{"a": 1}], "batch": [{"b": 2}, {"c": 3}]}',
    '{}',
    '[1, 2]',
    '"text"',
    '{"userId": "u", "event": "E"}',
])
def test_parse_body_matches_json_loads(text: str) -> None:
    doc, spans = sandbox_validation.parse_body(text)
    assert doc == json.loads(text)
    if isinstance(doc, dict) and isinstance(doc.get("batch"), list):
        assert spans is not None
        assert len(spans) == len(doc["batch"])
    else:
        assert spans is None


@pytest.mark.parametrize("text", [
    '{"batch": [1, 2,]}', '{"batch": [1 2]}', '{"batch": [1, 2]', '{"batch": [1]} x',
    '{"batch" [1]}', "{'batch': []}", '{"batch": [NaN]}', '{"a": 1,}', "", "{",
])
def test_parse_body_refuses_what_json_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        sandbox_validation.parse_body(text)


def test_parse_body_spans_are_item_text_lengths() -> None:
    items = ['{"a": 1}', '[1,  2]', '"x"']
    text = '{"batch": [' + " , ".join(items) + "]}"
    spans = sandbox_validation.parse_body(text)[1]
    assert spans is not None
    assert [text[start:end] for start, end in spans] == items


def test_stored_messages_are_not_tracked_by_the_gc(sb: Sandbox) -> None:
    # Millions of stored messages must not make every garbage collection slower.
    post(sb, "batch", {"batch": [track(mid=f"g{i}") for i in range(20)] + [track()]})
    post(sb, "track", track())
    gc.collect()
    gc.collect()
    chunks = sb._state._chunks
    assert [len(c) for c in chunks] == [21, 1]
    assert not any(gc.is_tracked(r) for c in chunks for r in c)
    assert not any(gc.is_tracked(c) for c in chunks)
    assert not gc.is_tracked(sb._state._index)


def test_compact_size_never_exceeds_28_times_span() -> None:
    # The shortcut skips exact measuring for short items; check the bound on worst cases.
    cases = ['{"n":1e15}', '{"n":9.999e15}', '{"n":1E-5}', '[1e999]', '{"s":"\\ud83d\\ude00"}',
             '{"s":"\U0001f600"}', '{"s":"\\u0001\\"\\\\"}', '[0.1e1,-0.0,1e-7]']
    for text in cases:
        value = json.loads(text)
        assert message_size(value) <= 28 * len(text), text


def test_big_messages_are_measured_exactly_even_with_small_neighbours(sb: Sandbox) -> None:
    small = [track(mid=f"s{i}") for i in range(50)]
    big = track(mid="big")
    big["properties"] = {"n": "NUMBERS"}
    numbers = "[" + ",".join(["1e15"] * 2500) + "]"  # 5 chars each in the body, 19 compact
    raw = json.dumps({"batch": [*small, big]}).replace('"NUMBERS"', numbers).encode()
    big_text = json.dumps(big).replace('"NUMBERS"', numbers)
    assert len(big_text) < MESSAGE_LIMIT
    assert message_size(json.loads(big_text)) > MESSAGE_LIMIT
    resp = post(sb, "batch", None, data=raw)
    assert resp.status_code == 400
    assert [e["field"] for e in errors(resp)] == ["batch[50]"]


def test_lone_surrogate_does_not_crash(sb: Sandbox) -> None:
    resp = post(sb, "track", None, data=b'{"userId": "u", "event": "\\ud800"}')
    assert resp.status_code in (200, 400)
    assert sb.stats()["by_status"].get("500") is None


def test_filters_across_many_requests(sb: Sandbox) -> None:
    with requests.Session() as session:
        for r in range(5):
            items = [track(user=f"u{i % 2}", mid=f"{r}-{i}") for i in range(3)]
            post(sb, "batch", {"batch": items}, session=session)
        post(sb, "batch", {"batch": [track(mid="0-0")]}, session=session)  # all duplicates
    seqs = [m["_sandbox"]["seq"] for m in sb.messages()]
    assert seqs == list(range(1, 16))
    assert [m["messageId"] for m in sb.messages(after=4, limit=4)] == ["1-1", "1-2", "2-0", "2-1"]
    assert [m["messageId"] for m in sb.messages(after=13)] == ["4-1", "4-2"]
    assert sb.messages(after=15) == []
    assert [m["messageId"] for m in sb.messages(userId="u1", after=6)] == ["2-1", "3-1", "4-1"]
    assert [m["_sandbox"]["seq"] for m in sb.messages(messageId="3-2")] == [12]
    assert sb.messages(messageId="3-2", after=12) == []
    assert len(sb.messages(messageId="3-2", after=11)) == 1
    assert [m["messageId"] for m in sb.messages(endpoint="batch", limit=1)] == ["0-0"]


def test_huge_content_length_is_413_without_reading_the_body(sb: Sandbox) -> None:
    host, port = sb.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=TIMEOUT) as conn:
        auth = base64.b64encode(f"{sb.key}:".encode()).decode()
        conn.sendall(
            b"POST /v1/batch HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: Basic " + auth.encode() + b"\r\nX-Strict-Mode: 1\r\n"
            b"Content-Length: 50000000\r\n\r\n"
        )
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413")
    assert b"Connection: close" in head
    message = json.loads(body)["meta"]["errors"][0]["message"]
    assert "50000000" in message
    assert str(REQUEST_LIMIT) in message


def test_sandbox_process_kill() -> None:
    with SandboxProcess() as proc:
        url = proc.url
        proc.kill()
        assert proc.process.returncode == -signal.SIGKILL
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{url}/sandbox/stats", timeout=5)


def test_throttle_rate_injects_429_with_retry_after() -> None:
    with Sandbox(throttle_rate=1.0, named_errors=True) as sandbox:
        resp = post(sandbox, "track", track())
        assert resp.status_code == 429
        assert int(resp.headers["Retry-After"]) >= 1
        assert errors(resp)[0]["reason"] == "throttled"
        assert sandbox.messages() == []
        assert sandbox.stats()["injected_throttles"] == 1
        sandbox.configure(throttle_rate=0.0)
        assert post(sandbox, "track", track()).status_code == 200
    with Sandbox(throttle_rate=0.3, fail_rate=0.2, seed=5, named_errors=True) as sandbox:
        codes = [post(sandbox, "track", track()).status_code for _ in range(60)]
        assert {200, 429} <= set(codes)
        assert sandbox.stats()["by_status"]["429"] == codes.count(429)


def test_zero_throttle_rate_keeps_seeded_failure_sequence() -> None:
    runs = []
    for extra in ({}, {"throttle_rate": 0.0}):
        with Sandbox(fail_rate=0.5, seed=99, **extra, named_errors=True) as sandbox:
            runs.append([post(sandbox, "track", track()).status_code for _ in range(20)])
    assert runs[0] == runs[1]


# ---------------------------------------------------------------- documented behaviour


def test_refusal_has_the_documented_body_without_item_names() -> None:
    with Sandbox() as sandbox:
        bad = {"type": "identify", "userId": "   "}
        resp = post(sandbox, "batch", {"batch": [track(), bad]})
        assert resp.status_code == 400
        assert set(resp.json()) == {"meta"}
        assert set(resp.json()["meta"]) == {"error"}
        text = resp.json()["meta"]["error"]
        assert "userId must not be blank" in text
        assert "batch[" not in text
        sandbox.configure(named_errors=True)
        resp = post(sandbox, "batch", {"batch": [track(), bad]})
        assert errors(resp)[0]["field"] == "batch[1].userId"


def test_without_strict_mode_an_invalid_request_is_answered_200_and_dropped() -> None:
    with Sandbox() as sandbox:
        bad = {"type": "track", "userId": "u1"}  # no event
        resp = post(sandbox, "batch", {"batch": [track(), bad]}, headers={"X-Strict-Mode": ""})
        assert resp.status_code == 200
        assert resp.json() == {}
        assert sandbox.messages() == []
        stats = sandbox.stats()
        assert stats["dropped_requests"] == 1
        assert stats["dropped_messages"] == 2
        assert stats["rejected_messages"] == 0
        strict = post(sandbox, "batch", {"batch": [track(), bad]})
        assert strict.status_code == 400
        assert sandbox.stats()["rejected_messages"] == 2
        assert sandbox.stats()["dropped_requests"] == 1


def test_without_strict_mode_an_oversized_request_is_answered_200_and_dropped() -> None:
    with Sandbox() as sandbox:
        big = track()
        big["properties"] = {"blob": "x" * (MESSAGE_LIMIT + 10)}
        lenient = requests.post(f"{sandbox.url}/v1/batch", json={"batch": [big]},
                                auth=(sandbox.key, ""), timeout=TIMEOUT)
        assert lenient.status_code == 200
        body = {"batch": [track(mid=f"m{i}") for i in range(REQUEST_LIMIT // 100)]}
        assert len(json.dumps(body)) > REQUEST_LIMIT
        lenient = requests.post(f"{sandbox.url}/v1/batch", json=body,
                                auth=(sandbox.key, ""), timeout=TIMEOUT)
        assert lenient.status_code == 200
        assert sandbox.messages() == []
        assert sandbox.stats()["dropped_requests"] == 2
        strict = post(sandbox, "batch", body)
        assert strict.status_code == 413
        assert "limit" in strict.json()["meta"]["error"]


def test_worker_isolates_a_bad_message_by_halving_without_item_names(tmp_path: Any) -> None:
    from cio_outbox import Outbox

    calls = [{"type": "track", "userId": f"u{i}", "event": "Poison" if i == 37 else "Ok"}
             for i in range(64)]
    with Outbox(str(tmp_path / "halving.db")) as box, \
            Sandbox(reject_events=["Poison"]) as sandbox:
        box.enqueue_many(calls)
        result = box.drain(host=sandbox.url, key=sandbox.key, progress=False, timeout=60)
        failed = box.failed()
        stats = sandbox.stats()
    assert result["failed"] == 1
    assert [row["person"] for row in failed] == ["u37"]
    assert "rejected" in failed[0]["error"]
    assert stats["messages"] == 63
    # Found by halving: more than one refused request on the way to the bad message.
    assert stats["by_status"]["400"] > 1


def test_importing_the_cli_does_not_load_the_sandbox() -> None:
    code = ("import sys, cio_outbox.cli; "
            "print(sorted(m for m in ('http.server', 'cio_outbox.sandbox') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=TIMEOUT, check=True).stdout
    assert out.strip() == "[]"


def test_sandbox_takes_its_limits_from_the_modules_that_own_them() -> None:
    from cio_outbox.batch import MAX_BATCH_BYTES
    from cio_outbox.messages import MAX_MESSAGE_BYTES

    assert (MESSAGE_LIMIT, REQUEST_LIMIT) == (MAX_MESSAGE_BYTES, MAX_BATCH_BYTES)
