"""SQLite's side of the schema migrations: splitting scripts, and the status CHECK that
SQLite cannot add with ALTER TABLE (migration 3)."""

from __future__ import annotations

import sqlite3

from cio_outbox.storage.base import STATUSES, StorageError
from cio_outbox.storage.schema import STATUS_CHECK, STATUS_CHECK_COMPARED

_STATUS_COLUMN = "status TEXT NOT NULL DEFAULT 'pending',"


def add_status_check(conn: sqlite3.Connection) -> None:
    """Add the status CHECK to an existing messages table (migration 3).

    SQLite cannot add a constraint with ALTER TABLE. Its documented way for a change that
    leaves the stored rows as they are is to edit the table's SQL in the schema table and
    bump the schema cookie: instant, where copying a 10M-row table takes minutes. Every
    row is checked against the constraint first. A build of SQLite that forbids editing
    the schema (defensive mode) gets the copy instead."""
    bad = conn.execute(
        "SELECT count(*) FROM messages WHERE status NOT IN (?, ?, ?, ?)", STATUSES
    ).fetchone()[0]
    if bad:
        raise StorageError(f"{bad} rows have an unknown status; the outbox is damaged")
    checked = _STATUS_COLUMN[:-1] + " " + STATUS_CHECK + ","
    try:
        _edit_table_sql(conn, checked)
    except sqlite3.DatabaseError:
        _rebuild_messages(conn, checked)


def compare_status_check(conn: sqlite3.Connection) -> None:
    """Rewrite the status CHECK's ``IN`` list as comparisons (migration 7): the same test,
    without the lookup table SQLite builds to evaluate it for every inserted row. The rows
    already passed the same test. Where editing the schema is forbidden (defensive mode)
    the CHECK stays as it is: correct, only slower, and not worth copying the table."""
    cookie = conn.execute("PRAGMA schema_version").fetchone()[0]
    try:
        conn.execute("PRAGMA writable_schema = ON")
        try:
            changed = conn.execute(
                "UPDATE sqlite_master SET sql = replace(sql, ?, ?)"
                " WHERE type = 'table' AND name = 'messages' AND instr(sql, ?) > 0",
                (STATUS_CHECK, STATUS_CHECK_COMPARED, STATUS_CHECK),
            ).rowcount
            if changed:
                conn.execute(f"PRAGMA schema_version = {cookie + 1}")
        finally:
            conn.execute("PRAGMA writable_schema = OFF")
    except sqlite3.DatabaseError:
        return


def _edit_table_sql(conn: sqlite3.Connection, checked: str) -> None:
    cookie = conn.execute("PRAGMA schema_version").fetchone()[0]
    conn.execute("PRAGMA writable_schema = ON")
    try:
        changed = conn.execute(
            "UPDATE sqlite_master SET sql = replace(sql, ?, ?)"
            " WHERE type = 'table' AND name = 'messages' AND instr(sql, ?) > 0"
            " AND instr(sql, 'CHECK') = 0",
            (_STATUS_COLUMN, checked, _STATUS_COLUMN),
        ).rowcount
        conn.execute(f"PRAGMA schema_version = {cookie + 1}")
    finally:
        conn.execute("PRAGMA writable_schema = OFF")
    if changed != 1:
        raise StorageError("the messages table does not have the expected status column")


def _rebuild_messages(conn: sqlite3.Connection, checked: str) -> None:
    """Copy messages into a table with the CHECK, keeping its indexes and id sequence (so
    that ids of deleted rows, which the audit trail names, are never given out again)."""
    table_sql = conn.execute(
        "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'messages'"
    ).fetchone()[0]
    indexes = [sql for (sql,) in conn.execute(
        "SELECT sql FROM sqlite_master WHERE type = 'index' AND tbl_name = 'messages'"
        " AND sql IS NOT NULL")]
    seq = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'messages'").fetchone()
    conn.execute(table_sql.replace(_STATUS_COLUMN, checked).replace(
        "CREATE TABLE messages", "CREATE TABLE messages_rebuilt", 1))
    conn.execute("INSERT INTO messages_rebuilt SELECT * FROM messages")
    conn.execute("DROP TABLE messages")
    conn.execute("ALTER TABLE messages_rebuilt RENAME TO messages")
    for sql in indexes:
        conn.execute(sql)
    if seq is not None:
        conn.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = 'messages'", seq)


def statements(script: str) -> list[str]:
    """Split a migration into statements, keeping trigger bodies whole."""
    statements, current = [], ""
    for line in script.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            if current.strip():
                statements.append(current.strip())
            current = ""
    if current.strip():
        statements.append(current.strip())
    return statements
