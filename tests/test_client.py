"""The HTTP layer, with `responses`: auth headers, netrc, gzip, reply parsing, failures."""

from __future__ import annotations

import base64
import gzip
import json
import os
from pathlib import Path

import pytest
import requests
import responses

from cio_outbox.batch import batch_body
from cio_outbox.client import USER_AGENT, Client, TransportError, parse_retry_after
from cio_outbox.config import ApiKey, resolve_target

URL = "https://cdp.customer.io/v1/batch"


def _client(raw: str = "legacykey", **options: object) -> Client:
    key = ApiKey(raw)
    return Client(key, resolve_target(key, host="https://cdp.customer.io"), **options)


@responses.activate
def test_legacy_key_sends_basic_auth_and_user_agent() -> None:
    responses.post(URL, json={})
    reply = _client("legacykey").send("batch", b'{"batch":[]}')
    assert reply.ok
    sent = responses.calls[0].request
    assert sent.headers["Authorization"] == "Basic " + base64.b64encode(b"legacykey:").decode()
    assert sent.headers["User-Agent"] == USER_AGENT
    assert USER_AGENT.startswith("cio-outbox/")
    assert sent.headers["Content-Type"] == "application/json"
    assert sent.headers["X-Strict-Mode"] == "1"  # bad messages get a 4xx, not a silent 200


@responses.activate
def test_strict_mode_can_be_turned_off() -> None:
    responses.post(URL, json={})
    _client(strict_mode=False).send("batch", b"{}")
    assert "X-Strict-Mode" not in responses.calls[0].request.headers


@responses.activate
def test_prefixed_key_sends_bearer() -> None:
    responses.post(URL, json={})
    _client("sk_us_abc").send("batch", b"{}")
    assert responses.calls[0].request.headers["Authorization"] == "Bearer sk_us_abc"


@responses.activate
def test_netrc_credentials_are_never_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    netrc = tmp_path / ".netrc"
    netrc.write_text("machine cdp.customer.io login intruder password pw\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    monkeypatch.setenv("HOME", str(tmp_path))
    responses.post(URL, json={})
    _client("legacykey").send("batch", b"{}")
    header = responses.calls[0].request.headers["Authorization"]
    assert "intruder" not in base64.b64decode(header.split()[1]).decode()


@responses.activate
def test_gzip_compresses_the_body_and_says_so() -> None:
    responses.post(URL, json={})
    message = '{"type":"track","userId":"u","event":"E"}'
    body = batch_body([message] * 100, "2024-01-01T00:00:00.000Z")
    _client(gzip=True).send("batch", body)
    sent = responses.calls[0].request
    assert sent.headers["Content-Encoding"] == "gzip"
    assert gzip.decompress(sent.body) == body
    assert len(sent.body) < len(body)


@responses.activate
def test_error_replies_carry_the_servers_reasons_and_retry_after() -> None:
    responses.post(URL, status=400, json={"meta": {"errors": [
        {"field": "batch[2].event", "reason": "required", "message": "event is missing"}]}})
    reply = _client().send("batch", b"{}")
    assert reply.status_code == 400 and not reply.ok
    assert reply.errors[0]["field"] == "batch[2].event"
    assert reply.describe() == "HTTP 400: batch[2].event: required: event is missing"
    from cio_outbox.client import describe_error

    assert describe_error({"field": "f", "reason": "must be a date", "message": "f must be a date"}
                          ) == "f: f must be a date"

    responses.post(URL, status=429, headers={"Retry-After": "7"}, body="slow down")
    reply = _client().send("batch", b"{}")
    assert reply.retry_after == 7.0
    assert reply.describe().startswith("HTTP 429")


def test_retry_after_takes_seconds_or_an_http_date() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("0.5") == 0.5
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    now = 1_700_000_000.0
    assert parse_retry_after("Tue, 14 Nov 2023 22:13:30 GMT", now=now) == pytest.approx(10.0)
    assert parse_retry_after("Tue, 14 Nov 2023 22:00:00 GMT", now=now) == 0.0


@responses.activate
def test_connection_errors_and_timeouts_become_transport_errors_without_the_key() -> None:
    responses.post(URL, body=requests.ConnectionError("Connection refused"))
    with pytest.raises(TransportError) as caught:
        _client("sk_us_topsecret").send("batch", b"{}")
    assert "cdp.customer.io" in str(caught.value)
    assert "topsecret" not in str(caught.value)
    responses.replace(responses.POST, URL, body=requests.ReadTimeout("read timed out"))
    with pytest.raises(TransportError, match="timed out"):
        _client().send("batch", b"{}")


def test_client_repr_hides_the_key() -> None:
    assert "topsecret" not in repr(_client("sk_us_topsecret"))
    assert "topsecret" not in repr(_client("sk_us_topsecret").session.auth)


@responses.activate
def test_no_proxy_or_netrc_environment_leaks_the_key_into_errors() -> None:
    os.environ.pop("CIO_API_KEY", None)
    responses.post(URL, status=401, json={"meta": {"errors": [{"message": "bad key"}]}})
    reply = _client("sk_us_topsecret").send("batch", json.dumps({"batch": []}).encode())
    assert reply.status_code == 401
    assert "topsecret" not in reply.describe()


# -- text from the network is scrubbed of the key ----------------------------------------

PREFIXED = "sk_us_Pr1vateSecret9d8e7f"
LEGACY = "legacyWriteKey-7f3a9c1e5b"


def _key_forms(raw: str) -> list[str]:
    return [raw, raw[-12:], base64.b64encode(f"{raw}:".encode()).decode()]


@pytest.mark.parametrize("raw", [PREFIXED, LEGACY], ids=["bearer", "basic"])
@pytest.mark.parametrize("status", [400, 401, 500])
@responses.activate
def test_credentials_echoed_in_an_error_body_are_scrubbed(raw: str, status: int) -> None:
    header = ApiKey(raw).authorization()
    responses.post(URL, status=status, json={"meta": {"error": f"key not recognised: {header}",
                                                      "errors": [{"message": f"bad {raw}",
                                                                  "field": raw[-10:]}]}})
    responses.post(URL, status=status, json={"meta": {"error": f"key not recognised: {header}"}})
    responses.post(URL, status=status, body=f"denied for ...{raw[4:]} (was {header})")
    client = _client(raw)
    texts = []
    for _ in range(3):
        reply = client.send("batch", b"{}")
        texts += [reply.describe(), reply.text, json.dumps(reply.errors)]
    for text in texts:
        for form in _key_forms(raw):
            assert form not in text, text
    assert "key not recognised: " in texts[3] and "[redacted]" in texts[3]
    assert texts[3].startswith(f"HTTP {status}: key not recognised")  # documented meta.error


@responses.activate
def test_a_reason_phrase_is_used_when_the_body_is_empty_and_is_scrubbed() -> None:
    responses.post(URL, status=503, body=b"")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(requests.Response, "reason", f"Unavailable {PREFIXED}", raising=False)
        reply = _client(PREFIXED).send("batch", b"{}")
    assert "Unavailable" in reply.describe() and PREFIXED not in reply.describe()


@responses.activate
def test_a_requests_exception_message_is_scrubbed() -> None:
    responses.post(URL, body=requests.ConnectionError(f"proxy said {PREFIXED}"))
    with pytest.raises(TransportError) as caught:
        _client(PREFIXED).send("batch", b"{}")
    assert PREFIXED not in str(caught.value) and "[redacted]" in str(caught.value)


@pytest.mark.parametrize("failure, may_have_arrived", [
    (requests.ReadTimeout("read timed out"), True),
    (requests.ConnectTimeout("connect timed out"), False),
    (requests.ConnectionError("[Errno 111] Connection refused"), False),
    (requests.ConnectionError("('Connection aborted.', RemoteDisconnected('Remote end closed "
                              "connection without response'))"), True),
    (requests.ConnectionError("('Connection aborted.', ConnectionResetError(104, "
                              "'Connection reset by peer'))"), True),
])
@responses.activate
def test_transport_errors_say_whether_the_request_may_have_arrived(
    failure: Exception, may_have_arrived: bool
) -> None:
    responses.post(URL, body=failure)
    with pytest.raises(TransportError) as caught:
        _client().send("batch", b"{}")
    assert caught.value.may_have_arrived is may_have_arrived


def test_the_scrubber_leaves_ordinary_text_alone() -> None:
    from cio_outbox.scrub import Scrubber

    scrub = Scrubber(PREFIXED)
    text = "HTTP 400: batch[3].userId: required; event name too long (max 150)"
    assert scrub(text) == text
    assert scrub(f"Authorization: Bearer {'x' * 40}") == "Authorization: Bearer [redacted]"
    assert scrub(base64.urlsafe_b64encode(f"{PREFIXED}:".encode()).decode()) == "[redacted]"
