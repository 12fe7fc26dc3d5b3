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
  (identify), ``properties.NAME`` (track) or ``ignore``; a trait or property target may
  end in ``:TYPE`` (``int``, ``float``, ``bool``, ``date``; ``"Age=:int"`` keeps the name),
  the syntax of ``cio-outbox sync --map`` (:mod:`cio_outbox.columns`);
- ``key`` names the key column apart from ``columns``, so it may also be the userId column;
- every other column becomes a trait (identify) or a property (track) under its own name;
- empty cells are left out (an empty cell never overwrites a value with ``""``), and
  values stay strings unless typed: guessing would turn ``"02134"`` into ``2134``;
- header names and the column names of a mapping are trimmed of surrounding spaces;
- repeated rows: with a key column, a row repeating an earlier row exactly is dropped (and
  counted in ``duplicates``), one repeating its key with other values is rejected; with
  ``dedupe`` and no key column, a row repeating an earlier row exactly is dropped.
  Both remember one entry per row read (about 120 bytes each with a key, 80 without).

Input sniffing: a gzip file is decompressed as it is read (both formats, by its first
bytes); a file whose first lines look like another format (CSV given as JSONL, JSONL as
CSV, a JSON array, Parquet) raises :class:`FormatError` naming it before anything is
written. A UTF-8 byte order mark is skipped.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import hashlib
import io
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from itertools import islice
from typing import IO, Any

import msgspec

from cio_outbox import intake
from cio_outbox.columns import ColumnRule, MappingError, Plan, ValueProblem
from cio_outbox.known_traits import suggest_traits
from cio_outbox.outbox import Outbox
from cio_outbox.results import MAX_LISTED_REJECTIONS, ImportResult, LineRejection
from cio_outbox.sources import gzipped
from cio_outbox.storage.base import CHUNK_ROWS, NewRow
from cio_outbox.wire import MessageError, message_id_for

__all__ = [
    "CHUNK_SIZE",
    "FORMATS",
    "MAX_LISTED_REJECTIONS",
    "CsvMapping",
    "CsvReader",
    "FormatError",
    "ImportResult",
    "JsonlReader",
    "LineRejection",
    "MappingError",
    "Record",
    "default_run",
    "enqueue_file",
    "enqueue_records",
    "format_for",
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
_HASH_MASK = (1 << 64) - 1
_HEAD_BYTES = 65_536
"""How much of the (decompressed) start of a file is looked at to recognise its format."""


_decode_json = msgspec.json.Decoder().decode


class FormatError(ValueError):
    """The file is not in the format it is read as (it looks like CSV, gzip damaged, ...)."""


@dataclass(slots=True)  # not frozen: a frozen dataclass costs a microsecond more per line
class Record:
    """One line (JSONL) or record (CSV): its call, or why it cannot be enqueued."""

    line: int
    call: dict[str, Any] | None = None
    error: str | None = None
    field: str | None = None
    duplicate: bool = False  # a repeat of an earlier row, dropped (counted, not enqueued)


class _Lines:
    """Binary lines of a file with their numbers (from 1) and the bytes read so far."""

    def __init__(self, source: IO[bytes], compressed: IO[bytes] | None = None) -> None:
        self.source = source
        self.compressed = compressed  # the file under a gzip stream: progress is its position
        self.number = 0
        self._bytes = 0
        self._position = 0

    @property
    def bytes_read(self) -> int:
        if self.compressed is not None:
            with contextlib.suppress(OSError, ValueError):  # a pipe, or a file closed since
                self._position = self.compressed.tell()
            return self._position
        return self._bytes

    def __iter__(self) -> Iterator[bytes]:
        # A plain file's lines are read directly: no extra generator layer per line.
        return self._plain() if self.compressed is None else self._decompressed()

    def _decompressed(self) -> Iterator[bytes]:
        try:
            yield from self._plain()
        except (OSError, EOFError) as exc:  # a damaged or truncated gzip stream
            raise FormatError(f"cannot decompress after line {self.number} ({exc}); "
                              "the lines before it were read") from None
        self._position = self.bytes_read  # the final position, while the file is open

    def _plain(self) -> Iterator[bytes]:
        source = iter(self.source)
        for raw in source:  # the first line, without its byte order mark
            self.number += 1
            self._bytes += len(raw)
            yield raw[len(_BOM):] if raw.startswith(_BOM) else raw
            break
        for raw in source:
            self.number += 1
            self._bytes += len(raw)
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
        return self._read(self._records)

    def prepared(self) -> Iterator[Record | tuple[int, NewRow]]:
        """The records as :func:`enqueue_records` writes them: where the reader can make a
        line's row itself, ``(line, row)`` instead of a record of its call."""
        return self._read(self._rows)

    def _read(self, records: Callable[[_Lines], Iterator[Any]]) -> Iterator[Any]:
        if isinstance(self._source, (str, os.PathLike)):
            with open(self._source, "rb") as handle:
                self._lines = self._open(handle, os.path.basename(self._source))
                yield from records(self._lines)
        else:
            self._lines = self._open(self._source, "the input")
            yield from records(self._lines)

    def check(self) -> None:
        """Raise :class:`FormatError` now if the file is plainly another format (a path
        only: a stream is checked as it is read), so that a caller can refuse it before
        creating anything."""
        if isinstance(self._source, (str, os.PathLike)):
            with open(self._source, "rb") as handle:
                self._open(handle, os.path.basename(self._source))

    def _open(self, raw: IO[bytes], name: str) -> _Lines:
        """The lines of ``raw`` (decompressed when gzip), once its first bytes, looked at
        without consuming them, are found to be in this reader's format."""
        buffered = raw if hasattr(raw, "peek") else io.BufferedReader(raw)  # type: ignore[arg-type]
        if gzipped(buffered.peek(2)[:2]):
            stream: IO[bytes] = io.BufferedReader(gzip.GzipFile(fileobj=buffered),
                                                  _HEAD_BYTES)
            try:
                head = stream.peek(_HEAD_BYTES)  # type: ignore[attr-defined]
            except (OSError, EOFError) as exc:
                raise FormatError(f"{name}: cannot decompress ({exc})") from None
            lines = _Lines(stream, compressed=buffered)
        else:
            head = buffered.peek(_HEAD_BYTES)  # type: ignore[attr-defined]
            lines = _Lines(buffered)
        self._check_format(head.removeprefix(_BOM), name)
        return lines

    def _check_format(self, head: bytes, name: str) -> None:
        """Raise FormatError when ``head`` (the start of the file) is plainly another format."""
        raise NotImplementedError

    def _records(self, lines: _Lines) -> Iterator[Record]:
        raise NotImplementedError

    def _rows(self, lines: _Lines) -> Iterator[Record | tuple[int, NewRow]]:
        return self._records(lines)

    def _key_id(self, key: str) -> str:
        return message_id_for(f"{self.run}:{key}")

    def _line_id(self, line: int, content: bytes) -> str:
        return intake.line_message_id(self.run, line, content)


#: JSON's whitespace: what may surround a line's value. bytes.strip() also takes a vertical
#: tab and a form feed, which would make the import accept a line JSON parsers refuse.
JSON_SPACE = b" \t\r\n"


class JsonlReader(_Reader):
    """Calls from a JSONL file: each non-blank line is one call in its wire shape.

    >>> for record in JsonlReader("calls.jsonl", run="calls.jsonl"):   # doctest: +SKIP
    ...     print(record.line, record.call or record.error)
    """

    def _check_format(self, head: bytes, name: str) -> None:
        found = _other_format(head)
        if found is None and _looks_like_csv(head):
            found = "CSV"
        if found is not None and found != "JSONL":
            raise FormatError(_format_message(name, found, "JSONL", head))

    def _records(self, lines: _Lines) -> Iterator[Record]:
        record = self._record
        for raw in lines:
            found = record(raw, lines.number)
            if found is not None:
                yield found

    def _rows(self, lines: _Lines) -> Iterator[Record | tuple[int, NewRow]]:
        """Lines the intake can write from their own bytes (intake.line_row) as
        ``(line, row)``, the others as records of their parsed calls."""
        run, line_row, record = self.run, intake.line_row, self._record
        for raw in lines:
            number = lines.number
            row = line_row(raw.strip(JSON_SPACE), run, number)
            if row is not None:
                yield number, row
                continue
            found = record(raw, number)
            if found is not None:
                yield found

    def _record(self, raw: bytes, number: int) -> Record | None:
        """The record of one line (None for a blank line)."""
        try:
            # msgspec, not orjson: orjson reads an integer beyond 64 bits as a float,
            # which would change the user's number; msgspec keeps it exactly.
            call = _decode_json(raw)
        except (msgspec.DecodeError, RecursionError):
            # Blank, not UTF-8, not JSON, a number out of range or nested too deeply:
            # the slow path decides and explains.
            record = self._slowly(raw, number)
            if record is None or record.call is None:
                return record
            call = record.call
        if type(call) is not dict:
            return Record(number, error="a call must be a JSON object", field="type")
        if call.get("messageId") is None:
            call["messageId"] = self._line_id(number, raw.strip(JSON_SPACE))
        return Record(number, call)

    @staticmethod
    def _slowly(raw: bytes, number: int) -> Record | None:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            return Record(number, error=_utf8_problem(exc))
        if not raw.strip():  # ASCII whitespace only, as the fast path strips a line:
            return None  # str.strip() also took b"\x1c" or a no-break space for blank
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


def _first_lines(head: bytes, count: int) -> list[str]:
    """The first ``count`` complete non-blank lines of ``head`` (decoded leniently)."""
    lines = head.split(b"\n")[:-1]  # the last piece may be cut off
    out = [line.decode("utf-8", "replace").strip() for line in lines if line.strip()]
    return out[:count]


def _other_format(head: bytes) -> str | None:
    """What the start of a file plainly is: JSONL, a JSON array, a JSON document over
    several lines, Parquet, or None. "Plainly": a line that is merely broken JSON is left
    to be rejected by its number, so only whole structures count as evidence."""
    if head.startswith(b"PAR1"):
        return "Parquet"
    lines = _first_lines(head, 2)
    if not lines:
        return None
    first = lines[0]
    second = lines[1] if len(lines) > 1 else ""
    if first == "[" and (second == "{" or (second.startswith("{") and second.endswith(","))):
        return "a JSON array"  # pretty-printed, or one element a line
    if first == "{" and second.startswith('"'):
        return "a JSON document over several lines"
    if first[:1] in ("[", "{"):
        try:
            value = json.loads(first)
        except (ValueError, RecursionError):
            return None
        if isinstance(value, dict):
            return "JSONL"
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            return "a JSON array"
    return None


def _looks_like_csv(head: bytes, delimiters: str = ",;\t") -> bool:
    """A header of two or more short, printable, non-empty names, then two or more lines of
    as many fields: what a CSV export looks like, and random broken lines do not."""
    lines = _first_lines(head, 4)
    if len(lines) < 3 or any(line[:1] in ("{", "[") for line in lines):
        return False
    for delimiter in delimiters:
        rows = list(csv.reader(lines, delimiter=delimiter))
        header = rows[0]
        if (len(header) >= 2 and all(0 < len(name.strip()) <= 100 and name.isprintable()
                                     and "\ufffd" not in name for name in header)
                and all(len(row) == len(header) for row in rows[1:])):
            return True
    return False


def _format_message(name: str, found: str, expected: str, head: bytes) -> str:
    lines = _first_lines(head, 1) or [""]
    shown = lines[0] if len(lines[0]) <= 60 else lines[0][:57] + "..."
    text = f"{name}: this looks like {found}, not {expected} (line 1: {shown!r}); "
    if found == "CSV":
        return text + "use --format csv"
    if found == "JSONL":
        return text + "use --format jsonl"
    if found == "a JSON array":
        return text + ("enqueue reads JSONL, one call per line: convert it with "
                       "jq -c '.[]' FILE > FILE.jsonl")
    if found.startswith("a JSON document"):
        return text + ("enqueue reads JSONL, one call per line: put each call on one line "
                       "with jq -c . FILE > FILE.jsonl")
    return text + "enqueue reads JSONL and CSV; cio-outbox sync reads Parquet"


@dataclass(frozen=True, slots=True)
class _CsvPlan:
    """A mapping applied to one header: where each wire field, the key and the bag are."""

    wire: list[tuple[str, int]]
    key: int | None
    bag: Plan


@dataclass(frozen=True)
class CsvMapping:
    """How CSV columns become an identify or track call (see the module docstring).

    >>> CsvMapping("track", columns={"id": "userId", "ts": "timestamp", "what": "event",
    ...                              "Total": "properties.total:float"}, key="order_id")
    ... # doctest: +ELLIPSIS
    CsvMapping(...)
    """

    call_type: str = "identify"
    columns: Mapping[str, str] = field(default_factory=dict)
    event: str | None = None
    delimiter: str = ","
    key: str | None = None
    dedupe: bool = False
    _rules: list[ColumnRule] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.call_type not in _CSV_TYPES:
            raise MappingError(f"CSV rows can become {' or '.join(_CSV_TYPES)} calls, "
                               f"not {self.call_type!r}")
        # Column names are trimmed, as headers are: " id " names the header " id ".
        columns = {column.strip(): target.strip() for column, target in self.columns.items()}
        object.__setattr__(self, "columns", columns)
        if self.key is not None:
            object.__setattr__(self, "key", self.key.strip())
        rules = [rule for column, target in columns.items()
                 if (rule := self._rule(column, target)) is not None]
        object.__setattr__(self, "_rules", rules)
        if self.event is not None and self.call_type != "track":
            raise MappingError("a fixed event name only makes sense for track calls")
        keys = [column for column, target in columns.items() if target == "key"]
        if self.key is not None:
            keys.append(self.key)
        if len(set(keys)) > 1:
            raise MappingError("only one column can be the key column")

    @property
    def bag(self) -> str:
        return "traits" if self.call_type == "identify" else "properties"

    def _rule(self, column: str, target: str) -> ColumnRule | None:
        """The typed rule of a trait or property target; None for the other targets."""
        name, _, kind = target.rpartition(":") if ":" in target else (target, "", "")
        name = name.strip()
        if name in (*_WIRE_COLUMNS, "key", "ignore"):
            if name == "event" and self.call_type != "track":
                raise MappingError(f"column {column!r}: identify calls have no event")
            if kind and name != "ignore":
                raise MappingError(f"column {column!r}: {target!r}: a type applies to traits "
                                   f"or properties only; {name} stays as written")
            return None if name != "ignore" else ColumnRule(column, None)
        prefix, dot, rest = name.partition(".")
        if name and not (dot and rest.strip() and prefix == self.bag):
            raise MappingError(
                f"column {column!r}: target {target!r} is not one of userId, anonymousId, "
                f"event, timestamp, messageId, key, ignore or {self.bag}.NAME[:TYPE]"
            )
        return ColumnRule.parse(f"{column}={target}", prefix=self.bag)

    def plan(self, header: list[str]) -> _CsvPlan:
        """Where each column goes for this (trimmed) header; raises MappingError."""
        seen: set[str] = set()
        for name in header:
            if name in seen:
                raise MappingError(f"the header names column {name!r} twice")
            seen.add(name)
        named = [*self.columns, *([self.key] if self.key is not None else [])]
        missing = [column for column in dict.fromkeys(named) if column not in seen]
        if missing:
            raise MappingError(
                f"column(s) {', '.join(map(repr, missing))} not in the header "
                f"({', '.join(header)})"
            )
        wire: list[tuple[str, int]] = []
        key: int | None = header.index(self.key) if self.key is not None else None
        elsewhere: list[str] = []  # columns that feed no trait or property
        for index, name in enumerate(header):
            target = self.columns.get(name)
            if target is None:
                if name == self.key:
                    elsewhere.append(name)  # a key column alone is not a trait
                    continue
                if name in _WIRE_COLUMNS and not (name == "event" and self.call_type != "track"):
                    target = name
                else:
                    continue
            if target == "key":
                key = index
                elsewhere.append(name)
            elif target in _WIRE_COLUMNS:
                wire.append((target, index))
                elsewhere.append(name)
        targets = [kind for kind, _ in wire]
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
        bag = Plan(header, self._rules, exclude=elsewhere, prefix=self.bag)
        return _CsvPlan(wire, key, bag)

    def suggestions(self, header: list[str]) -> list[tuple[str, str]]:
        """(column, attribute) for headers that look like a Customer.io attribute but would
        become a trait under another name (identify only): candidates for ``--map``."""
        if self.call_type != "identify":
            return []
        mapped = {*self.columns, *([self.key] if self.key else []), *_WIRE_COLUMNS}
        return suggest_traits(header, mapped=mapped)


class CsvReader(_Reader):
    """identify or track calls from a CSV file with a header line, by a :class:`CsvMapping`.

    Line numbers are physical lines (the header is line 1); a record spanning several lines
    (a quoted newline) is numbered by its first line. ``on_header`` is called with the
    (trimmed) header once it is read and planned, before any row.
    """

    def __init__(
        self,
        source: str | os.PathLike[str] | IO[bytes],
        run: str,
        mapping: CsvMapping | None = None,
        *,
        on_header: Callable[[list[str]], None] | None = None,
    ) -> None:
        super().__init__(source, run)
        self.mapping = mapping or CsvMapping()
        self.on_header = on_header

    def _check_format(self, head: bytes, name: str) -> None:
        found = _other_format(head)
        if found is not None:
            raise FormatError(_format_message(name, found, "CSV", head))

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
        plan: _CsvPlan | None = None
        # key -> its first line and the hash of that row, packed in one int (memory)
        keys: dict[str, int] = {}
        rows_seen: set[bytes] = set()
        dedupe = self.mapping.dedupe
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
                if self.on_header is not None:
                    self.on_header(header)
                continue
            assert plan is not None
            if not row:
                continue  # a blank line
            if spanned:
                yield Record(first, error=spanned[0])
                continue
            if len(row) != len(header):
                yield Record(first, error=f"the row has {len(row)} fields, the header "
                                          f"{len(header)}")
                continue
            if plan.key is not None:
                key = row[plan.key]
                if key:
                    digest = hash(tuple(row)) & _HASH_MASK
                    earlier = keys.get(key)
                    if earlier is None:
                        keys[key] = first << 64 | digest
                    elif earlier & _HASH_MASK == digest:
                        yield Record(first, duplicate=True)
                        continue
                    else:
                        yield Record(first, field="key", error=(
                            f"key {key!r} was used by line {earlier >> 64} with other "
                            "values: each key value must stand for one row"))
                        continue
            elif dedupe:
                content = hashlib.blake2b("\x1f".join(row).encode("utf-8"),
                                          digest_size=16).digest()
                if content in rows_seen:
                    yield Record(first, duplicate=True)
                    continue
                rows_seen.add(content)
            yield self._record(first, plan, row)

    def _record(self, line: int, plan: _CsvPlan, row: list[str]) -> Record:
        mapping = self.mapping
        call: dict[str, Any] = {"type": mapping.call_type}
        for kind, index in plan.wire:
            value = row[index]
            if value:
                call[kind] = value
        if mapping.event is not None:
            call["event"] = mapping.event
        bag = plan.bag
        try:
            values = bag.traits(row) if bag.typed else bag.raw_text(row)
        except ValueProblem as exc:
            return Record(line, error=str(exc), field=exc.field)
        if values:
            call[mapping.bag] = values
        if "messageId" not in call:
            if plan.key is not None:
                key = row[plan.key]
                if not key:
                    return Record(line, error="the key column is empty", field="key")
                call["messageId"] = self._key_id(key)
            else:
                call["messageId"] = self._line_id(line, "\x1f".join(row).encode("utf-8"))
        return Record(line, call=call)


def format_for(name: str) -> str:
    """The format a file's name says: ``csv`` for ``*.csv`` (or ``*.csv.gz``), else
    ``jsonl``."""
    lower = name.lower().removesuffix(".gz")
    return "csv" if lower.endswith(".csv") else "jsonl"


def reader_for(
    source: str | os.PathLike[str] | IO[bytes],
    *,
    run: str,
    format: str | None = None,
    mapping: CsvMapping | None = None,
) -> JsonlReader | CsvReader:
    """The reader for a file: ``format`` is ``jsonl`` or ``csv``, else guessed from the
    file name (:func:`format_for`); either way the content is checked when read."""
    if format is None:
        name = os.fspath(source) if isinstance(source, (str, os.PathLike)) else ""
        format = format_for(str(name))
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

    def rows(chunk: list[Record | tuple[int, NewRow]]) -> Iterator[NewRow]:
        prepare = intake.prepare
        for record in chunk:
            if type(record) is tuple:  # a row the reader made (JsonlReader.prepared)
                line, row = record
                if earlier and earlier.get(line, row.message_id) != row.message_id:
                    result.changed += 1
                yield row
                continue
            call = record.call
            if call is None:
                if record.duplicate:
                    result.duplicates += 1
                    continue
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

    # A JSONL reader's lines go to the intake as bytes (intake.line_row), not as calls.
    iterator = records.prepared() if isinstance(records, JsonlReader) else iter(records)
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
