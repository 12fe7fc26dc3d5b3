"""Calls built on the six basic ones: people, semantic events, devices, objects, bulk rows.

Kept apart from outbox.py so the core stays small; :class:`cio_outbox.Outbox`
inherits these methods, so users find every operation on the Outbox.
"""

from __future__ import annotations


class Operations:
    """Mixin for :class:`cio_outbox.outbox.Outbox`; relies on its ``enqueue`` and ``_call``."""
