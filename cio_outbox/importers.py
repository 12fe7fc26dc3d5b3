"""Reading calls from files: JSONL (one Pipelines API call per line) and CSV (one call per row).

Both readers stream their input (one line or record at a time) and yield :class:`Record`
objects: the line number, and either the call in its wire shape or why the line cannot be
used. :func:`enqueue_records` writes the usable ones with chunked
:meth:`cio_outbox.Outbox.enqueue_many` calls and reports the others by line number.

>>> from cio_outbox import Outbox
>>> from cio_outbox.importers import enqueue_file
>>> result = enqueue_file(Outbox("migration.db"), "people.jsonl")    # doctest: +SKIP
>>> result.added, result.rejected                                     # doctest: +SKIP
(9998, 2)

Re-running an interrupted import adds no duplicates and misses nothing: a call without a
``messageId`` gets the stable id ``message_id_for(f"{run}:{line}")`` (``run`` defaults to
the file name), or ``message_id_for(f"{run}:{key}")`` when a CSV key column is given, and
the outbox skips ids it already holds.

CSV mapping (:class:`CsvMapping`), for identify and track calls:

- columns named like wire fields (``userId``, ``anonymousId``, ``event``, ``timestamp``,
  ``messageId``) map to those fields unless mapped otherwise;
- ``columns`` maps a column to a target: ``userId``, ``anonymousId``, ``event``,
  ``timestamp``, ``messageId``, ``key`` (the idempotency key column), ``traits.NAME``
  (identify), ``properties.NAME`` (track) or ``ignore``;
- every other column becomes a trait (identify) or a property (track) under its own name;
- empty cells are left out (an empty cell never overwrites a value with ``""``), and
  values stay strings: CSV has no types, and guessing would turn ``"02134"`` into ``2134``.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from itertools import islice
from typing import IO, Any

import orjson

from cio_outbox import intake
from cio_outbox.messages import MessageError, message_id_for
from cio_outbox.outbox import Outbox
from cio_outbox.results import MAX_LISTED_REJECTIONS, ImportResult, LineRejection
from cio_outbox.storage.base import CHUNK_ROWS, NewRow

__all__ = [
    "CHUNK_SIZE",
    "FORMATS",
    "MAX_LISTED_REJECTIONS",
    "CsvMapping",
    "CsvReader",
    "ImportResult",
    "JsonlReader",
    "LineRejection",
    "MappingError",
    "Record",
    "default_run",
    "enqueue_file",
    "enqueue_records",
    "read_text",
    "reader_for",
]

FORMATS = ("jsonl", "csv")
CHECKED_PLACES = 20_000
"""How many of an earlier import's first lines are compared with a new import of its run."""
CHUNK_SIZE = CHUNK_ROWS
"""Calls written per transaction by :func:`enqueue_records`."""

_WIRE_COLUMNS = ("userId", "anonymousId", "event", "timestamp", "messageId")
_CSV_TYPES = ("identify", "track")
_BOM = b"\xef\xbb\xbf"


class MappingError(ValueError):
    """A CSV column mapping cannot work with this file (unknown column, bad target)."""


@dataclass(slots=True)  # not frozen: a frozen dataclass costs a microsecond more per line
class Record:
    """One line (JSONL) or record (CSV): its call, or why it cannot be enqueued."""

    line: int
    call: dict[str, Any] | None = None
    error: str | None = None
    field: str | None = None


class _Lines:
    """Binary lines of a file with their numbers (from 1) and the bytes read so far."""

    def __init__(self, source: IO[bytes]) -> None:
        self.source = source
        self.number = 0
        self.bytes_read = 0

    def __iter__(self) -> Iterator[bytes]:
        for raw in self.source:
            self.number += 1
            self.bytes_read += len(raw)
            if self.number == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM):]
            yield raw


def _utf8_problem(exc: UnicodeDecodeError) -> str:
    bad = exc.object[exc.start:exc.start + 1].hex()
    return f"line is not valid UTF-8 (byte 0x{bad} at position {exc.start + 1})"


class _Reader:
    """Shared by the readers: the source (a path, or a binary file object) and progress."""

    def __init__(self, source: str | os.PathLike[str] | IO[bytes], run: str) -> None:
        if not run:
            raise ValueError("run must be a non-empty name")
        self.run = run
        self._source = source
        self._lines: _Lines | None = None

    @property
    def bytes_read(self) -> int:
        """Bytes of the file consumed so far (for a progress bar)."""
        return self._lines.bytes_read if self._lines is not None else 0

    def __iter__(self) -> Iterator[Record]:
        if isinstance(self._source, (str, os.PathLike)):
            with open(self._source, "rb") as handle:
                self._lines = _Lines(handle)
                yield from self._records(self._lines)
        else:
            self._lines = _Lines(self._source)
            yield from self._records(self._lines)

    def _records(self, lines: _Lines) -> Iterator[Record]:
        raise NotImplementedError

    def _key_id(self, key: str) -> str:
        return message_id_for(f"{self.run}:{key}")

    def _line_id(self, line: int, content: bytes) -> str:
        return intake.line_message_id(self.run, line, content)


class JsonlReader(_Reader):
    """Calls from a JSONL file: each non-blank line is one call in its wire shape.

    >>> for record in JsonlReader("calls.jsonl", run="calls.jsonl"):   # doctest: +SKIP
    ...     print(record.line, record.call or record.error)
    """

    def _records(self, lines: _Lines) -> Iterator[Record]:
        loads = orjson.loads
        line_id = self._line_id
        for raw in lines:
            number = lines.number
            try:
                call = loads(raw)
            except orjson.JSONDecodeError:
                # Blank, not UTF-8, not JSON, or JSON that orjson refuses and Python reads
                # (integers over 64 bits): the slow path decides and explains.
                record = self._slowly(raw, number)
                if record is None:
                    continue
                if record.call is None:
                    yield record
                    continue
                call = record.call
            if type(call) is not dict:
                yield Record(number, error="a call must be a JSON object", field="type")
                continue
            if call.get("messageId") is None:
                call["messageId"] = line_id(number, raw.strip())
            yield Record(number, call)

    @staticmethod
    def _slowly(raw: bytes, number: int) -> Record | None:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            return Record(number, error=_utf8_problem(exc))
        if not text.strip():
            return None
        try:
            call = json.loads(text)
        except json.JSONDecodeError as exc:
            return Record(number, error=f"invalid JSON: {exc.msg} (column {exc.colno})")
        except RecursionError:
            return Record(number, error="invalid JSON: nested too deeply")
        except ValueError as exc:  # e.g. an integer longer than Python will convert
            return Record(number, error=f"invalid JSON: {exc}")
        if not isinstance(call, dict):
            return Record(number, error="a call must be a JSON object", field="type")
        return Record(number, call=call)


@dataclass(frozen=True)
class CsvMapping:
    """How CSV columns become an identify or track call (see the module docstring).

    >>> CsvMapping("track", columns={"id": "userId", "ts": "timestamp", "what": "event"})
    ... # doctest: +ELLIPSIS
    CsvMapping(...)
    """

    call_type: str = "identify"
    columns: Mapping[str, str] = field(default_factory=dict)
    event: str | None = None
    delimiter: str = ","

    def __post_init__(self) -> None:
        if self.call_type not in _CSV_TYPES:
            raise MappingError(f"CSV rows can become {' or '.join(_CSV_TYPES)} calls, "
                               f"not {self.call_type!r}")
        for column, target in self.columns.items():
            self._check_target(column, target)
        if self.event is not None and self.call_type != "track":
            raise MappingError("a fixed event name only makes sense for track calls")

    def _check_target(self, column: str, target: str) -> None:
        bag = "traits" if self.call_type == "identify" else "properties"
        if target in (*_WIRE_COLUMNS, "key", "ignore"):
            if target == "event" and self.call_type != "track":
                raise MappingError(f"column {column!r}: identify calls have no event")
            return
        prefix, dot, name = target.partition(".")
        if dot and name and prefix == bag:
            return
        raise MappingError(
            f"column {column!r}: target {target!r} is not one of userId, anonymousId, "
            f"event, timestamp, messageId, key, ignore or {bag}.NAME"
        )

    def plan(self, header: list[str]) -> list[tuple[str, str]]:
        """(target kind, name) for each column of this header; raises MappingError."""
        seen: set[str] = set()
        for name in header:
            if name in seen:
                raise MappingError(f"the header names column {name!r} twice")
            seen.add(name)
        missing = [column for column in self.columns if column not in seen]
        if missing:
            raise MappingError(
                f"column(s) {', '.join(map(repr, missing))} not in the header "
                f"({', '.join(header)})"
            )
        bag = "traits" if self.call_type == "identify" else "properties"
        plan: list[tuple[str, str]] = []
        for name in header:
            target = self.columns.get(name)
            if target is None:
                if name in _WIRE_COLUMNS and not (name == "event" and self.call_type != "track"):
                    target = name
                else:
                    target = f"{bag}.{name}"
            if "." in target:
                kind, _, inner = target.partition(".")
                plan.append((kind, inner))
            else:
                plan.append((target, target))
        targets = [kind for kind, _ in plan]
        if self.call_type == "track" and "event" not in targets and self.event is None:
            raise MappingError(
                "track rows need an event: name the event column (--event-column) "
                "or give one event name for every row (--event)"
            )
        if "event" in targets and self.event is not None:
            raise MappingError("give either an event column or a fixed event name, not both")
        if "userId" not in targets and "anonymousId" not in targets:
            raise MappingError(
                "no column holds the person: name it with --user-id-column "
                "(or --anonymous-id-column), or call the column userId"
            )
        if targets.count("key") > 1:
            raise MappingError("only one column can be the key column")
        return plan


class CsvReader(_Reader):
    """identify or track calls from a CSV file with a header line, by a :class:`CsvMapping`.

    Line numbers are physical lines (the header is line 1); a record spanning several lines
    (a quoted newline) is numbered by its first line.
    """

    def __init__(
        self,
        source: str | os.PathLike[str] | IO[bytes],
        run: str,
        mapping: CsvMapping | None = None,
    ) -> None:
        super().__init__(source, run)
        self.mapping = mapping or CsvMapping()

    def _records(self, lines: _Lines) -> Iterator[Record]:
        bad_lines: dict[int, str] = {}

        def text_lines() -> Iterator[str]:
            for raw in lines:
                try:
                    yield raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    bad_lines[lines.number] = _utf8_problem(exc)
                    yield raw.decode("utf-8", "replace")

        reader = csv.reader(text_lines(), delimiter=self.mapping.delimiter, strict=True)
        header: list[str] | None = None
        plan: list[tuple[str, str]] = []
        last = 0
        while True:
            first = last + 1
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                last = lines.number
                if header is None:
                    raise MappingError(
                        f"line {first}: the header is not valid CSV ({exc})"
                    ) from None
                yield Record(first, error=f"invalid CSV: {exc}")
                continue
            last = lines.number
            spanned = [bad_lines.pop(n) for n in range(first, last + 1) if n in bad_lines]
            if header is None:
                if spanned:
                    raise MappingError(f"line {first}: the header is not valid UTF-8")
                if not row:
                    raise MappingError("the CSV file has no header line")
                header = [name.strip() for name in row]
                plan = self.mapping.plan(header)
                continue
            if not row:
                continue  # a blank line
            if spanned:
                yield Record(first, error=spanned[0])
                continue
            if len(row) != len(header):
                yield Record(first, error=f"the row has {len(row)} fields, the header "
                                          f"{len(header)}")
                continue
            yield self._record(first, plan, row)

    def _record(self, line: int, plan: list[tuple[str, str]], row: list[str]) -> Record:
        call: dict[str, Any] = {"type": self.mapping.call_type}
        bag_name = "traits" if self.mapping.call_type == "identify" else "properties"
        bag: dict[str, Any] = {}
        key: str | None = None
        for (kind, name), value in zip(plan, row, strict=True):
            if value == "" or kind == "ignore":
                continue
            if kind == "key":
                key = value
            elif kind == bag_name:
                bag[name] = value
            else:
                call[kind] = value
        if self.mapping.event is not None:
            call["event"] = self.mapping.event
        if bag:
            call[bag_name] = bag
        if "messageId" not in call:
            if any(kind == "key" for kind, _ in plan):
                if key is None:
                    return Record(line, error="the key column is empty", field="key")
                call["messageId"] = self._key_id(key)
            else:
                call["messageId"] = self._line_id(line, "\x1f".join(row).encode("utf-8"))
        return Record(line, call=call)


def reader_for(
    source: str | os.PathLike[str] | IO[bytes],
    *,
    run: str,
    format: str | None = None,
    mapping: CsvMapping | None = None,
) -> JsonlReader | CsvReader:
    """The reader for a file: ``format`` is ``jsonl`` or ``csv``, else guessed from the
    file name (``.csv`` is CSV, anything else JSONL)."""
    if format is None:
        name = os.fspath(source) if isinstance(source, (str, os.PathLike)) else ""
        format = "csv" if str(name).lower().endswith(".csv") else "jsonl"
    if format == "csv":
        return CsvReader(source, run, mapping)
    if format == "jsonl":
        if mapping is not None:
            raise MappingError("a column mapping only applies to CSV files")
        return JsonlReader(source, run)
    raise ValueError(f"format must be one of {', '.join(FORMATS)}, not {format!r}")


def enqueue_records(
    outbox: Outbox,
    records: Iterable[Record],
    *,
    run: str,
    chunk_size: int = CHUNK_SIZE,
    on_chunk: Callable[[ImportResult], None] | None = None,
) -> ImportResult:
    """Enqueue the calls of ``records`` in chunks; each chunk is one durable transaction.

    Records carrying an error, and calls the outbox refuses, are counted in ``rejected``
    with their line numbers. ``on_chunk`` is called after each chunk (progress).
    ``result.changed`` counts lines whose place held other content in an earlier import
    of the same run (compared over its first :data:`CHECKED_PLACES` lines).
    """
    result = ImportResult(run=run)
    earlier = _earlier_ids(outbox, run)
    storage = outbox.storage

    def rows(chunk: list[Record]) -> Iterator[NewRow]:
        prepare = intake.prepare
        for record in chunk:
            call = record.call
            if call is None:
                result.reject(record.line, record.error or "unusable line", record.field)
                continue
            if earlier:
                before = earlier.get(record.line)
                if before is not None and before != call.get("messageId"):
                    result.changed += 1
            try:
                yield prepare(call, run, owned=True, plain=True)
            except MessageError as exc:
                result.reject(record.line, str(exc), exc.field)

    iterator = iter(records)
    while True:
        chunk = list(islice(iterator, chunk_size))
        if not chunk:
            break
        result.lines += len(chunk)
        added, skipped = intake.write(storage, rows(chunk), chunk_size)
        result.added += added
        result.skipped += skipped
        if on_chunk is not None:
            on_chunk(result)
    if on_chunk is not None and result.lines == 0:
        on_chunk(result)
    return result


def _earlier_ids(outbox: Outbox, run: str) -> dict[int, str]:
    """line -> messageId of the first lines an earlier import of ``run`` wrote, if any."""
    if not any(outbox.storage.counts(run).values()):
        return {}
    found: dict[int, str] = {}
    for row in outbox.storage.rows(run=run, limit=CHECKED_PLACES):
        line = intake.line_of(run, row["message_id"])
        if line is not None:
            found[line] = row["message_id"]
    return found


def default_run(source: str | os.PathLike[str]) -> str:
    """The run name an import of this file gets unless told otherwise: its file name."""
    return os.path.basename(os.fspath(source))


def enqueue_file(
    outbox: Outbox,
    path: str | os.PathLike[str],
    *,
    run: str | None = None,
    format: str | None = None,
    mapping: CsvMapping | None = None,
    chunk_size: int = CHUNK_SIZE,
) -> ImportResult:
    """Enqueue every valid call of a JSONL or CSV file (see the module docstring).

    >>> enqueue_file(outbox, "orders.csv", mapping=CsvMapping("track",
    ...     columns={"customer": "userId", "placed_at": "timestamp"}, event="Order Placed"))
    ... # doctest: +SKIP
    """
    run = run or default_run(path)
    reader = reader_for(path, run=run, format=format, mapping=mapping)
    return enqueue_records(outbox, reader, run=run, chunk_size=chunk_size)


def read_text(text: str, *, run: str, format: str = "jsonl",
              mapping: CsvMapping | None = None) -> list[Record]:
    """All records of an in-memory text (for tests and notebooks)."""
    source = io.BytesIO(text.encode("utf-8"))
    return list(reader_for(source, run=run, format=format, mapping=mapping))
