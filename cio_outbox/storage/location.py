"""A PostgreSQL outbox's URL: our ``schema`` parameter, and the password kept out of text."""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from cio_outbox.storage.base import StorageError

DEFAULT_SCHEMA = "cio_outbox"
_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def split_location(url: str) -> tuple[str, str]:
    """(URL for libpq without our ``schema`` parameter, schema name)."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    schema = DEFAULT_SCHEMA
    kept = []
    for name, value in query:
        if name == "schema":
            schema = value
        else:
            kept.append((name, value))
    if not _SCHEMA_NAME.match(schema):
        raise StorageError(
            f"schema={schema!r} in the outbox URL is not a plain lower-case name "
            "(letters, digits, underscore; at most 63)"
        )
    return urlunsplit(parts._replace(query=urlencode(kept))), schema


def redact(url: str) -> str:
    """The URL with any password replaced by ``***`` (for messages and repr)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc
    userinfo, _, hostinfo = netloc.rpartition("@")
    user = userinfo.split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{hostinfo}"))
