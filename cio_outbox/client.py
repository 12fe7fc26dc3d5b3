"""HTTP to the Pipelines API: one requests.Session, the key's auth scheme, replies classified.

The client never raises for an HTTP status: the worker decides what a status
means. Transport failures (refused, reset, timeout) raise :class:`TransportError`
with a text that names the host, never the key. Every text that came from the network
(error bodies, reason phrases, exception messages) is scrubbed of the key here, at the
boundary, before anything else sees it.
"""

from __future__ import annotations

import email.utils
import gzip as _gzip
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

import requests

from cio_outbox._version import __version__
from cio_outbox.config import ApiKey, Target
from cio_outbox.scrub import Scrubber
from cio_outbox.settings import DEFAULT_GZIP, DEFAULT_TIMEOUT

USER_AGENT = f"cio-outbox/{__version__} python-requests/{requests.__version__}"


class TransportError(RuntimeError):
    """No HTTP answer: connection refused or reset, DNS failure, or a timeout.

    ``may_have_arrived`` is True when the request body was sent before the failure (a
    read timeout, a connection closed or reset while waiting for the answer): the server
    may have ingested it. A refused connection or a connect timeout sent nothing."""

    def __init__(self, text: str, *, may_have_arrived: bool = False) -> None:
        super().__init__(text)
        self.may_have_arrived = may_have_arrived


class _KeyAuth(requests.auth.AuthBase):
    """Sets the Authorization header. Passing an auth object also stops requests from
    reading credentials out of a ~/.netrc file."""

    def __init__(self, key: ApiKey) -> None:
        self._key = key

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = self._key.authorization()
        return request

    def __repr__(self) -> str:
        return f"_KeyAuth({self._key!r})"


@dataclass
class Reply:
    """What the API answered to one request."""

    status_code: int
    latency_ms: float
    retry_after: float | None = None
    errors: list[dict[str, Any]] = field(default_factory=list)
    text: str = ""

    @property
    def ok(self) -> bool:
        return 200 <= self.status_code < 300

    def describe(self) -> str:
        """A short error text for the audit trail: status and the server's reasons."""
        if self.errors:
            parts = []
            for error in self.errors[:5]:
                parts.append(describe_error(error))
            more = f" (+{len(self.errors) - 5} more)" if len(self.errors) > 5 else ""
            return f"HTTP {self.status_code}: " + "; ".join(parts) + more
        return f"HTTP {self.status_code}: {self.text[:300]}".rstrip(": ")


def _documented_error(data: Any) -> str | None:
    """The text of Customer.io's documented error body ``{"meta": {"error": "..."}}``."""
    meta = data.get("meta") if isinstance(data, dict) else None
    error = meta.get("error") if isinstance(meta, dict) else None
    return error if isinstance(error, str) and error else None


def describe_error(error: dict[str, Any]) -> str:
    """``field: reason: message`` from one ``meta.errors`` item, without saying a thing twice:
    the reason is left out when the message already says it."""
    field, reason, message = error.get("field"), error.get("reason"), error.get("message")
    parts = [str(field)] if field else []
    if reason and str(reason) not in str(message or ""):
        parts.append(str(reason))
    if message:
        parts.append(str(message))
    return ": ".join(parts) or json.dumps(error)


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Retry-After as seconds: either a number of seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _json_of(response: requests.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _errors_of(data: Any) -> list[dict[str, Any]]:
    meta = data.get("meta") if isinstance(data, dict) else None
    errors = meta.get("errors") if isinstance(meta, dict) else None
    if isinstance(errors, list):
        return [e if isinstance(e, dict) else {"message": str(e)} for e in errors]
    return []


class Client:
    """Posts request bodies to ``<base_url>/v1/<endpoint>`` with the key's auth scheme."""

    def __init__(
        self,
        key: ApiKey,
        target: Target,
        *,
        gzip: bool = DEFAULT_GZIP,
        timeout: float | tuple[float, float] = DEFAULT_TIMEOUT,
        session: requests.Session | None = None,
        strict_mode: bool = True,
    ) -> None:
        self.key = key
        self.target = target
        self.scrub = Scrubber(key.reveal())
        self.gzip = gzip
        self.timeout = timeout
        self.session = session or requests.Session()
        self.session.auth = _KeyAuth(key)
        self.session.headers.update({"User-Agent": USER_AGENT, "Content-Type": "application/json"})
        if strict_mode:
            # Without it the API may answer 200 to a message it then drops; with it, a bad
            # message gets a 4xx, which the worker dead-letters with the reason: never lost
            # silently.
            self.session.headers["X-Strict-Mode"] = "1"

    def send(self, endpoint: str, body: bytes) -> Reply:
        headers = {}
        if self.gzip:
            # Level 1: a 500 KB batch of small events shrinks to about 17% of its bytes
            # for about 2 us of CPU per message; level 6 gains 2 points for twice the CPU.
            body = _gzip.compress(body, compresslevel=1)
            headers["Content-Encoding"] = "gzip"
        url = self.target.url(endpoint)
        started = time.perf_counter()
        try:
            response = self.session.post(url, data=body, headers=headers, timeout=self.timeout)
        except requests.ConnectTimeout:
            raise TransportError(f"timed out connecting to {self.target.base_url}") from None
        except requests.Timeout:
            raise TransportError(
                f"timed out waiting for {self.target.base_url} after sending the request",
                may_have_arrived=True,
            ) from None
        except requests.ConnectionError as exc:
            reason = _short_reason(exc)
            raise TransportError(
                self.scrub(f"cannot reach {self.target.base_url}: {reason}"),
                may_have_arrived=reason in _AFTER_SEND,
            ) from None
        except requests.RequestException as exc:
            raise TransportError(
                self.scrub(f"request to {self.target.base_url} failed: {exc}")
            ) from None
        latency_ms = (time.perf_counter() - started) * 1000
        reply = Reply(status_code=response.status_code, latency_ms=latency_ms)
        if not reply.ok:
            data = _json_of(response)
            reply.errors = self.scrub.value(_errors_of(data))
            documented = _documented_error(data)
            if not reply.errors and documented:
                reply.text = self.scrub(documented[:1000])
            else:
                reply.text = self.scrub(response.text[:1000] or str(response.reason or ""))
            reply.retry_after = parse_retry_after(response.headers.get("Retry-After"))
        return reply

    def close(self) -> None:
        self.session.close()

    def __repr__(self) -> str:
        return f"Client(target={self.target.base_url!r}, key={self.key!r}, gzip={self.gzip})"


#: Connection failures that happen while waiting for the answer, after the body went out.
_AFTER_SEND = frozenset({"connection reset", "remote end closed connection",
                         "connection aborted"})


def _short_reason(exc: BaseException) -> str:
    text = str(exc)
    if isinstance(exc, requests.exceptions.SSLError):
        detail = re.search(r"\[SSL: [^\]]+\][^(')]*", text)
        return ("TLS handshake failed: " + (detail.group(0).strip() if detail else text[-200:])
                + " (a plain-http server? then the host starts with http://)")
    for marker in ("Connection refused", "Connection reset", "Name or service not known",
                   "Remote end closed connection", "timed out", "Connection aborted"):
        if marker.lower() in text.lower():
            return marker.lower()
    caused = re.search(r"\(Caused by (.*)\)$", text)  # the cause, not urllib3's wrapping
    return (caused.group(1) if caused else text)[:300]
