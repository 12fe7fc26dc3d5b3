"""Where to send and with which key: API keys, regions and hosts.

Customer.io issues two kinds of keys. Newer keys start with ``pk_`` or ``sk_``
followed by ``us_`` or ``eu_``; they are sent as a Bearer token and their prefix
names the region. Any other key is a legacy write key, sent as HTTP Basic with
the key as username and an empty password.
"""

from __future__ import annotations

import base64
import ipaddress
import re
import warnings
from dataclasses import dataclass
from urllib.parse import urlsplit

from cio_outbox.errors import CioOutboxError
from cio_outbox.settings import ENV_API_KEY, Settings, environment

REGION_HOSTS = {
    "us": "https://cdp.customer.io",
    "eu": "https://cdp-eu.customer.io",
}
DEFAULT_REGION = "us"

_PREFIXED_KEY = re.compile(r"^(?:pk|sk)_(us|eu)_")
_BAD_KEY_CHARS = re.compile(r"[\s\x00-\x1f\x7f]")


class ConfigError(CioOutboxError, ValueError):
    """The configuration cannot work: a key, region or host is wrong. Never contains the key."""


class RegionMismatchWarning(UserWarning):
    """The key's region and the host it is sent to do not agree."""


class ApiKey:
    """An API key that never shows itself in a repr, str, log line or exception.

    >>> key = ApiKey("sk_eu_abc123\\n")
    >>> key.scheme, key.region
    ('bearer', 'eu')
    >>> "abc123" in repr(key)
    False
    """

    __slots__ = ("_value",)

    def __init__(self, raw: str) -> None:
        if not isinstance(raw, str):
            raise ConfigError("the API key must be a string")
        value = raw.strip()
        if not value:
            raise ConfigError("the API key is empty (set CIO_API_KEY)")
        if _BAD_KEY_CHARS.search(value):
            raise ConfigError(
                "the API key contains whitespace or control characters after stripping; "
                "copy it again from Customer.io"
            )
        self._value = value

    @classmethod
    def from_env(cls, name: str = ENV_API_KEY) -> ApiKey:
        """The key in ``CIO_API_KEY`` (or the variable named), read through settings."""
        raw = Settings.from_env().api_key if name == ENV_API_KEY else environment(name)
        if raw is None:
            raise ConfigError(f"{name} is not set")
        return cls(raw)

    @property
    def scheme(self) -> str:
        """``bearer`` for prefixed keys, ``basic`` for legacy write keys."""
        return "bearer" if _PREFIXED_KEY.match(self._value) else "basic"

    @property
    def region(self) -> str | None:
        """The region a prefixed key names, or None for a legacy key."""
        match = _PREFIXED_KEY.match(self._value)
        return match.group(1) if match else None

    def authorization(self) -> str:
        """The value of the Authorization header for this key."""
        if self.scheme == "bearer":
            return f"Bearer {self._value}"
        token = base64.b64encode(f"{self._value}:".encode()).decode("ascii")
        return f"Basic {token}"

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        region = self.region or "none"
        return f"ApiKey(scheme={self.scheme}, region={region}, value=***)"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ApiKey) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __reduce__(self) -> tuple:
        raise TypeError("ApiKey cannot be pickled")


def is_loopback(hostname: str) -> bool:
    """Whether a host name or address (IPv6 with a zone, IPv4-mapped) is this machine."""
    if hostname == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(hostname.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def normalize_host(host: str, *, allow_insecure: bool = False) -> str:
    """Check a ``--host`` value (scheme and host, like ``https://cdp.customer.io``).

    A trailing ``/`` or ``/v1`` is dropped because the client appends ``/v1/<endpoint>``.
    Plain ``http://`` is refused for anything but loopback unless ``allow_insecure``:
    the key would cross the network in clear text.
    """
    parts = urlsplit(host.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            f"host {host!r} must be a URL with scheme and host, like https://cdp.customer.io"
        )
    if parts.scheme == "http" and not allow_insecure and not is_loopback(parts.hostname):
        raise ConfigError(
            f"host {host!r} uses plain http, which would send the API key unencrypted; "
            "use https, or allow it explicitly (allow_insecure=True / --allow-insecure)"
        )
    path = parts.path.rstrip("/")
    if path.endswith("/v1"):
        path = path[: -len("/v1")]
    return f"{parts.scheme}://{parts.netloc}{path}"


def _region_of_host(base_url: str) -> str | None:
    for region, url in REGION_HOSTS.items():
        if base_url == url:
            return region
    return None


@dataclass(frozen=True)
class Target:
    """Where the worker sends: the base URL (without /v1) and the region it belongs to."""

    base_url: str
    region: str | None

    def url(self, endpoint: str) -> str:
        return f"{self.base_url}/v1/{endpoint}"


def resolve_target(
    key: ApiKey | None,
    *,
    host: str | None = None,
    region: str | None = None,
    allow_insecure: bool = False,
) -> Target:
    """Choose the host from an explicit host, else the region, else the key's prefix, else US.

    - An explicit host wins; if the key names the other region's Customer.io host,
      a :class:`RegionMismatchWarning` names both regions.
    - A region that contradicts the key's prefix is an error when no host is given.
    """
    if region is not None:
        region = region.strip().lower()
        if region not in REGION_HOSTS:
            raise ConfigError(f"region {region!r} is not one of: us, eu")
    key_region = key.region if key is not None else None
    if host:
        base_url = normalize_host(host, allow_insecure=allow_insecure)
        host_region = _region_of_host(base_url)
        if key_region and host_region and key_region != host_region:
            warnings.warn(
                f"the API key belongs to the {key_region.upper()} region but the host is "
                f"Customer.io's {host_region.upper()} host; requests will likely get 401",
                RegionMismatchWarning,
                stacklevel=2,
            )
        return Target(base_url, host_region or region or key_region)
    if region and key_region and region != key_region:
        raise ConfigError(
            f"region {region.upper()} was asked for but the API key belongs to the "
            f"{key_region.upper()} region; drop the region setting or pass --host explicitly"
        )
    chosen = region or key_region or DEFAULT_REGION
    return Target(REGION_HOSTS[chosen], chosen)


def target_from_env(key: ApiKey | None) -> Target:
    """Resolve the target from ``CIO_HOST`` and ``CIO_REGION``."""
    settings = Settings.from_env()
    return resolve_target(key, host=settings.host, region=settings.region)
