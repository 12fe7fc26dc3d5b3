"""Credentials out of text that came from the network.

A server may echo what it received (``key not recognised: Bearer sk_us_...``, the Basic
header, a prefix of the key). The client passes every text it hands on (error bodies,
reason phrases, exception messages from ``requests``) through a :class:`Scrubber` built
from the key, so that none of it reaches the outbox, the audit trail, a log or printed
output.
"""

from __future__ import annotations

import base64
import re
from typing import Any

REDACTED = "[redacted]"
#: A run of this many characters of the key (or of its Base64 forms) is the key: servers
#: echo keys truncated or masked in the middle, so exact matching is not enough.
_WINDOW = 8
_TOKEN = re.compile(rf"[A-Za-z0-9_~+/=.-]{{{_WINDOW},}}")
# Whatever follows an auth scheme is a credential, even one that is not ours.
_AUTH_VALUE = re.compile(r"\b(Bearer|Basic)(\s+)[A-Za-z0-9_~+/=.-]{16,}", re.IGNORECASE)


def _forms(secret: str) -> set[str]:
    raw = secret.encode()
    forms = {secret}
    for data in (raw + b":", raw):
        forms.add(base64.b64encode(data).decode())
        forms.add(base64.urlsafe_b64encode(data).decode())
    return {form.rstrip("=") for form in forms if form}


class Scrubber:
    """``scrub(text)`` returns text with every form of the secrets replaced by [redacted].

    >>> scrub = Scrubber("sk_us_Pr1vateSecret9d8e7f")
    >>> scrub("key not recognised: Bearer sk_us_Pr1vateSecret9d8e7f")
    'key not recognised: Bearer [redacted]'
    >>> scrub("key ...Secret9d8e7f is not valid")
    'key [redacted] is not valid'
    """

    __slots__ = ("_exact", "_grams")

    def __init__(self, *secrets: str) -> None:
        forms = set().union(*(_forms(s) for s in secrets if s))
        # Longest first, with Base64's padding: one pass replaces every exact form.
        self._exact = re.compile("|".join(
            re.escape(form) + "=*" for form in sorted(forms, key=len, reverse=True)
        )) if forms else None
        self._grams = {
            form[i:i + _WINDOW]
            for form in forms if len(form) >= _WINDOW
            for i in range(len(form) - _WINDOW + 1)
        }

    def __call__(self, text: str) -> str:
        if not text:
            return text
        if self._exact is not None:
            text = self._exact.sub(REDACTED, text)
        text = _AUTH_VALUE.sub(lambda m: m.group(1) + m.group(2) + REDACTED, text)
        return _TOKEN.sub(self._token, text)

    def _token(self, match: re.Match[str]) -> str:
        token = match.group(0)
        for i in range(len(token) - _WINDOW + 1):
            if token[i:i + _WINDOW] in self._grams:
                return REDACTED
        return token

    def value(self, data: Any) -> Any:
        """Scrub every string inside parsed JSON (dicts, lists), keys included."""
        if isinstance(data, str):
            return self(data)
        if isinstance(data, dict):
            return {self(str(k)): self.value(v) for k, v in data.items()}
        if isinstance(data, list):
            return [self.value(v) for v in data]
        return data

    def __repr__(self) -> str:
        return f"Scrubber({len(self._grams)} windows)"
