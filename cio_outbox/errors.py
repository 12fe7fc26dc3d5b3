"""The one base of every error cio-outbox raises on purpose.

``except CioOutboxError`` catches a bad message, a bad configuration, an unusable outbox
and a worker that cannot go on. Each concrete type keeps its older base too
(``MessageError`` is still a ``ValueError``, ``StorageError`` a ``RuntimeError``), so code
written against those keeps working.
"""

from __future__ import annotations


class CioOutboxError(Exception):
    """Base class of the errors cio-outbox raises (never contains the API key)."""
