"""Shared fixtures: a fresh outbox (on each storage backend) and a running sandbox."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pg
import pytest

from cio_outbox import Outbox
from cio_outbox.sandbox import Sandbox


def _backends() -> list[object]:
    return ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """URL of a PostgreSQL server: CIO_TEST_POSTGRES_URL, else a throwaway one (see pg.py).

    Without either, or without the psycopg driver, the postgres tests are skipped, except in
    CI (CI=true) where they fail.
    """
    reason = pg.driver_missing_reason()
    if reason is None and not os.environ.get(pg.ENV):
        reason = pg.unavailable_reason()
    if reason is not None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI needs PostgreSQL: {reason}", pytrace=False)
        pytest.skip(reason)
    try:
        with pg.server_url() as url:
            yield url
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture
def postgres_location(postgres_server: str) -> Iterator[str]:
    """A fresh, empty PostgreSQL outbox: its own schema, dropped after the test."""
    url = pg.schema_url(postgres_server)
    yield url
    pg.drop_schema(url)


@pytest.fixture(params=_backends())
def outbox_location(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where a fresh, empty outbox lives: an SQLite file, or a PostgreSQL schema."""
    if request.param == "sqlite":
        return str(tmp_path / "outbox.db")
    if request.param == "postgres":
        return str(request.getfixturevalue("postgres_location"))
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
