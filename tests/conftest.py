"""Shared fixtures: a fresh outbox (on each storage backend) and a running sandbox."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cio_outbox import Outbox
from cio_outbox.sandbox import Sandbox


def _backends() -> list[str]:
    return ["sqlite"]


@pytest.fixture(params=_backends())
def outbox_location(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where a fresh, empty outbox lives: an SQLite file (and PostgreSQL once available)."""
    if request.param == "sqlite":
        return str(tmp_path / "outbox.db")
    raise AssertionError(request.param)


@pytest.fixture
def outbox(outbox_location: str) -> Iterator[Outbox]:
    box = Outbox(outbox_location)
    yield box
    box.close()


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    with Sandbox() as server:
        yield server
