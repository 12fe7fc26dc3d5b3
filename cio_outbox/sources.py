"""Tables read in chunks: CSV, JSONL (each gzip-compressed or not), Parquet, Arrow, and
pandas or polars DataFrames (or any iterable of dicts).

:func:`open_source` looks at what it is given and returns a :class:`Source` whose
:meth:`Source.chunks` yields :class:`Chunk` objects of at most ``size`` rows, so memory
stays flat however long the table is. Rows are numbered for error messages: the physical
line for CSV (the header is line 1) and JSONL, the row number counted from 1 for the others.
Parquet and Arrow need pyarrow (``pip install 'cio-outbox[parquet]'``).
"""

from __future__ import annotations

import csv
import gzip
import io
import itertools
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import IO, Any

FORMATS = ("csv", "jsonl", "parquet", "arrow")
CHUNK_ROWS = 10_000
_GZIP_MAGIC = b"\x1f\x8b"
_PARQUET_MAGIC = b"PAR1"
_ARROW_MAGIC = b"ARROW1"
_BOM = b"\xef\xbb\xbf"
_BLOCK = 1 << 20


class SourceError(ValueError):
    """The source cannot be read as a table (format, header, missing optional library)."""


@dataclass
class Chunk:
    """Rows of a table: ``(line, values)`` pairs, values aligned with ``header``; for JSONL
    (``header`` None) each value is a dict. ``problems`` are lines that could not be read."""

    header: list[str] | None
    rows: list[tuple[int, Any]] = field(default_factory=list)
    problems: list[tuple[int, str]] = field(default_factory=list)
    text: bool = False  # every value is a str (CSV)


def _pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError:
        raise SourceError(
            "reading Parquet or Arrow needs pyarrow, which is not installed; "
            "install it with: pip install 'cio-outbox[parquet]'"
        ) from None
    return pyarrow


@dataclass
class RawChunk:
    """Records of a text file as read, not parsed: one CSV record (which may span lines)
    or one JSONL line each, without its line end, and the number of its first line.
    ``signature`` says how they are to be read (format, delimiter, header bytes): equal
    bytes under one signature are equal rows. :meth:`TextFile.parse` turns records into a
    :class:`Chunk`."""

    header: list[str] | None
    signature: bytes
    lines: list[int] = field(default_factory=list)
    records: list[bytes] = field(default_factory=list)


class Source:
    """A table to read in chunks. ``name`` is its file name (the default sync name);
    ``total`` and :meth:`position` measure progress in the same unit (bytes or rows)."""

    name: str = ""
    total: int | None = None

    def position(self) -> int:
        return 0

    def chunks(self, size: int = CHUNK_ROWS) -> Iterator[Chunk]:
        raise NotImplementedError


class TextFile(Source):
    """CSV or JSONL, plain or gzip, read line by line from the file.

    Besides :meth:`chunks`, it gives its records unparsed (:meth:`records`), so that a
    sync can recognize a row it has seen before by its bytes alone and :meth:`parse` only
    the others: most of a nightly export is the same as the night before."""

    def __init__(self, path: str, fmt: str, gzipped: bool, delimiter: str) -> None:
        self.path = path
        self.name = os.path.basename(path)
        self.format = fmt
        self.gzipped = gzipped
        self.delimiter = delimiter
        self.total = os.path.getsize(path)
        self._raw: IO[bytes] | None = None

    def position(self) -> int:
        raw = self._raw
        if raw is None or raw.closed:
            return self.total or 0
        return raw.tell()

    def _lines(self) -> Iterator[tuple[int, bytes]]:
        with open(self.path, "rb") as raw:
            self._raw = raw
            stream: IO[bytes] = gzip.GzipFile(fileobj=raw) if self.gzipped else raw
            try:
                for number, line in enumerate(stream, 1):
                    if number == 1 and line.startswith(_BOM):
                        line = line[len(_BOM):]
                    yield number, line
            except (OSError, EOFError) as exc:  # a damaged or truncated gzip stream
                raise SourceError(f"{self.name}: cannot decompress ({exc})") from None

    def chunks(self, size: int = CHUNK_ROWS) -> Iterator[Chunk]:
        if self.format == "jsonl":
            yield from self._jsonl(size)
        else:
            yield from self._csv(size)

    # -- records as bytes, parsed on demand ----------------------------------------------

    def records(self, size: int = CHUNK_ROWS) -> Iterator[RawChunk]:
        """Chunks of at most ``size`` records as bytes, without their line ends (blank
        lines left out); for CSV the header is read and checked first, as :meth:`chunks`
        does. Read a megabyte at a time: a block without quotes or lone carriage returns
        (most of a typical export) is split into records in one call."""
        runs = self._record_runs()
        header: list[str] | None = None
        signature = b"jsonl"
        if self.format != "jsonl":
            first = next((run for run in runs if run[1]), None)
            if first is None:
                raise SourceError(f"{self.name}: the CSV file is empty (no header line)")
            numbers, found = first
            header = self._header(found[0])
            signature = b"csv\x00" + self.delimiter.encode() + b"\x00" + found[0]
            runs = itertools.chain([(numbers[1:], found[1:])], runs)
        chunk = RawChunk(header, signature)
        for numbers, found in runs:
            chunk.lines.extend(numbers)
            chunk.records.extend(found)
            while len(chunk.records) >= size:
                yield RawChunk(header, signature, chunk.lines[:size], chunk.records[:size])
                chunk = RawChunk(header, signature, chunk.lines[size:], chunk.records[size:])
        yield chunk

    def _header(self, data: bytes) -> list[str]:
        text = data.decode("utf-8", "surrogateescape")
        rows = iter(csv.reader([text], delimiter=self.delimiter, strict=True))
        for chunk in self._csv_rows(rows, 1):  # the same checks and messages as chunks()
            return chunk.header or []
        return []

    def _blocks(self) -> Iterator[tuple[int, bytes, list[bytes]]]:
        """(number of the first line, the block, its lines without line ends), whole lines
        only."""
        with open(self.path, "rb") as raw:
            self._raw = raw
            stream: IO[bytes] = gzip.GzipFile(fileobj=raw) if self.gzipped else raw
            number = 1
            carry = b""
            try:
                while True:
                    data = stream.read(_BLOCK)
                    if not data:
                        break
                    data = carry + data
                    cut = data.rfind(b"\n")
                    if cut < 0:
                        carry = data
                        continue
                    if number == 1 and data.startswith(_BOM):  # the first line is whole
                        data = data[len(_BOM):]
                        cut -= len(_BOM)
                    carry = data[cut + 1:]
                    block = data[:cut]
                    lines = block.split(b"\n")
                    yield number, block, lines
                    number += len(lines)
            except (OSError, EOFError) as exc:  # a damaged or truncated gzip stream
                raise SourceError(f"{self.name}: cannot decompress ({exc})") from None
            if number == 1:
                carry = carry.removeprefix(_BOM)
            if carry:
                yield number, carry, [carry]

    def _record_runs(self) -> Iterator[tuple[Sequence[int], list[bytes]]]:
        """(line numbers, records) runs, in file order. Blank lines are records too: they
        are never synced, so a sync parses them, and skips them as :meth:`chunks` does."""
        csv_file = self.format != "jsonl"
        pending: list[bytes] = []  # a CSV record in a quoted field, with its line ends
        start = 0
        shift = 0  # lines that lone carriage returns added so far
        for first, block, lines in self._blocks():
            first += shift
            plain = not csv_file or (b'"' not in block and
                                     block.count(b"\r") == block.count(b"\r\n") + (
                                         1 if block.endswith(b"\r") else 0))
            if plain and not pending:
                yield range(first, first + len(lines)), lines
                continue
            numbers: list[int] = []
            found: list[bytes] = []
            number = first - 1
            for line, end in _split_bare_cr(lines):
                number += 1
                if not pending:
                    if b'"' not in line:
                        numbers.append(number)
                        found.append(line)
                        continue
                    start = number
                pending.append(line)
                data = b"".join(pending)
                if _still_open(data, self.delimiter):
                    pending.append(end)
                    continue
                pending = []
                numbers.append(start)
                found.append(data)
            shift += number + 1 - first - len(lines)
            yield numbers, found
        if pending:
            yield [start], [b"".join(pending[:-1])]

    def parse(self, raw: RawChunk, indices: Sequence[int]) -> Chunk:
        """These records of ``raw`` parsed as :meth:`chunks` would have read them: rows,
        and problems by line."""
        records = [(raw.lines[index], raw.records[index]) for index in indices]
        if raw.header is None:
            return next(self._jsonl_lines(records, 1 << 62))
        chunk = Chunk(raw.header, text=True)
        width = len(raw.header)
        delimiter = self.delimiter
        texts = [data.decode("utf-8", "surrogateescape") for _, data in records]
        try:  # one reader for all: each text is one whole record
            parsed: list[list[str] | None] = list(csv.reader(texts, delimiter=delimiter,
                                                             strict=True))
        except csv.Error:
            parsed = []
        if len(parsed) != len(texts):  # a record in error: one reader each, to say which
            parsed = [None] * len(texts)
        for (number, _), text, row in zip(records, texts, parsed, strict=True):
            if row is None:
                try:
                    rows = list(csv.reader([text], delimiter=delimiter, strict=True))
                except csv.Error as exc:
                    chunk.problems.append((number, f"invalid CSV: {exc}"))
                    continue
                row = rows[0] if rows else []
            if not row:
                continue
            if len(row) != width:
                chunk.problems.append(
                    (number, f"the row has {len(row)} fields, the header {width}"))
                continue
            try:
                "".join(row).encode("utf-8")
            except UnicodeEncodeError:
                chunk.problems.append((number, "the line is not valid UTF-8"))
                continue
            chunk.rows.append((number, row))
        return chunk


    def _jsonl(self, size: int) -> Iterator[Chunk]:
        yield from self._jsonl_lines(self._lines(), size)

    def _jsonl_lines(self, lines: Iterable[tuple[int, bytes]], size: int) -> Iterator[Chunk]:
        chunk = Chunk(None)
        for number, raw in lines:
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                chunk.problems.append((number, _utf8_problem(exc)))
                continue
            if not raw.strip():  # ASCII whitespace only: str.strip() also took a line of
                continue  # b"\x1c" or a no-break space for blank, and dropped it unreported
            try:
                value = json.loads(text)
            except (ValueError, RecursionError) as exc:
                chunk.problems.append((number, f"invalid JSON: {exc}"))
                continue
            if not isinstance(value, dict):
                chunk.problems.append((number, "a row must be a JSON object"))
                continue
            chunk.rows.append((number, value))
            if len(chunk.rows) >= size:
                yield chunk
                chunk = Chunk(None)
        yield chunk

    def _csv(self, size: int) -> Iterator[Chunk]:
        # Bytes that are not UTF-8 become lone surrogates (surrogateescape), which valid
        # text never holds: a row holding one is refused by its line, the rest are read.
        with open(self.path, "rb") as raw:
            self._raw = raw
            stream: IO[bytes] = gzip.GzipFile(fileobj=raw) if self.gzipped else raw
            text = io.TextIOWrapper(stream, encoding="utf-8-sig", errors="surrogateescape",
                                    newline="")
            try:
                yield from self._csv_rows(csv.reader(text, delimiter=self.delimiter,
                                                     strict=True), size)
            except (OSError, EOFError) as exc:  # a damaged or truncated gzip stream
                raise SourceError(f"{self.name}: cannot decompress ({exc})") from None

    def _csv_rows(self, reader: Any, size: int) -> Iterator[Chunk]:
        try:
            header = [name.strip() for name in next(reader)]
        except StopIteration:
            raise SourceError(f"{self.name}: the CSV file is empty (no header line)") from None
        except csv.Error as exc:
            raise SourceError(f"{self.name}: line 1: the header is not valid CSV ({exc})") from None
        if any(_has_surrogate(name) for name in header):
            raise SourceError(f"{self.name}: line 1: the header is not valid UTF-8")
        width = len(header)
        chunk = Chunk(header, text=True)
        last = reader.line_num
        while True:
            first = last + 1
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                last = reader.line_num
                chunk.problems.append((first, f"invalid CSV: {exc}"))
                continue
            last = reader.line_num
            if not row:
                continue
            if len(row) != width:
                chunk.problems.append(
                    (first, f"the row has {len(row)} fields, the header {width}"))
                continue
            try:
                "".join(row).encode("utf-8")
            except UnicodeEncodeError:
                chunk.problems.append((first, "the line is not valid UTF-8"))
                continue
            chunk.rows.append((first, row))
            if len(chunk.rows) >= size:
                yield chunk
                chunk = Chunk(header, text=True)
        yield chunk


def _split_bare_cr(lines: Iterable[bytes]) -> Iterator[tuple[bytes, bytes]]:
    """Lines as the CSV reader sees them (a lone CR ends a line too), each with the line
    end it lost (LF) or none (a lone CR is kept on its line)."""
    for line in lines:
        cr = line.find(b"\r")
        if cr < 0 or cr == len(line) - 1:
            yield line, b"\n"
            continue
        parts = line.split(b"\r")
        for part in parts[:-1]:
            yield part + b"\r", b""
        if parts[-1]:
            yield parts[-1], b"\n"


def _still_open(data: bytes, delimiter: str) -> bool:
    """Whether the CSV reader, given this text, is inside a quoted field at its end."""
    try:
        for _ in csv.reader([data.decode("utf-8", "surrogateescape")], delimiter=delimiter,
                            strict=True):
            pass
    except csv.Error as exc:
        return "unexpected end of data" in str(exc)
    return False


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _utf8_problem(exc: UnicodeDecodeError) -> str:
    bad = exc.object[exc.start:exc.start + 1].hex()
    return f"line is not valid UTF-8 (byte 0x{bad} at position {exc.start + 1})"


class _Batches(Source):
    """Anything that gives record batches with column names: Parquet, Arrow, DataFrames."""

    def __init__(self, name: str, total: int | None) -> None:
        self.name = name
        self.total = total
        self._done = 0

    def position(self) -> int:
        return self._done

    def _batches(self, size: int) -> Iterator[tuple[list[str], Iterable[Sequence[Any]]]]:
        raise NotImplementedError

    def chunks(self, size: int = CHUNK_ROWS) -> Iterator[Chunk]:
        for header, rows in self._batches(size):
            chunk = Chunk([str(name).strip() for name in header])
            start = self._done + 1
            chunk.rows = list(enumerate(rows, start))
            self._done += len(chunk.rows)
            yield chunk


def _arrow_rows(batch: Any) -> Iterable[Sequence[Any]]:
    columns = [column.to_pylist() for column in batch.columns]
    return zip(*columns, strict=True) if columns else [() for _ in range(batch.num_rows)]


class _ParquetFile(_Batches):
    def __init__(self, path: str) -> None:
        pa = _pyarrow()
        self.file = pa.parquet.ParquetFile(path)
        super().__init__(os.path.basename(path), self.file.metadata.num_rows)

    def _batches(self, size: int) -> Iterator[tuple[list[str], Iterable[Sequence[Any]]]]:
        for batch in self.file.iter_batches(batch_size=size):
            yield batch.schema.names, _arrow_rows(batch)


class _ArrowFile(_Batches):
    """An Arrow IPC file (Feather v2) or stream, memory-mapped, read batch by batch."""

    def __init__(self, path: str, is_file: bool) -> None:
        self.pa = _pyarrow()
        self.path = path
        self.is_file = is_file
        total = None
        if is_file:
            with self.pa.memory_map(path) as source:
                reader = self.pa.ipc.open_file(source)
                total = sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))
        super().__init__(os.path.basename(path), total)

    def _batches(self, size: int) -> Iterator[tuple[list[str], Iterable[Sequence[Any]]]]:
        pa = self.pa
        with pa.memory_map(self.path) as source:
            if self.is_file:
                reader = pa.ipc.open_file(source)
                batches: Iterable[Any] = (reader.get_batch(i)
                                          for i in range(reader.num_record_batches))
            else:
                batches = pa.ipc.open_stream(source)
            for batch in batches:
                for start in range(0, batch.num_rows, size):
                    part = batch.slice(start, size)
                    yield part.schema.names, _arrow_rows(part)


class _ArrowTable(_Batches):
    def __init__(self, table: Any, name: str) -> None:
        super().__init__(name, table.num_rows)
        self.table = table

    def _batches(self, size: int) -> Iterator[tuple[list[str], Iterable[Sequence[Any]]]]:
        for batch in self.table.to_batches(max_chunksize=size):
            yield batch.schema.names, _arrow_rows(batch)


class _PandasFrame(_Batches):
    def __init__(self, frame: Any, name: str) -> None:
        super().__init__(name, len(frame))
        self.frame = frame

    def _batches(self, size: int) -> Iterator[tuple[list[str], Iterable[Sequence[Any]]]]:
        header = [str(c) for c in self.frame.columns]
        for start in range(0, len(self.frame), size):
            part = self.frame.iloc[start:start + size]
            yield header, part.itertuples(index=False, name=None)


class _PolarsFrame(_Batches):
    def __init__(self, frame: Any, name: str) -> None:
        super().__init__(name, frame.height)
        self.frame = frame

    def _batches(self, size: int) -> Iterator[tuple[list[str], Iterable[Sequence[Any]]]]:
        for part in self.frame.iter_slices(n_rows=size):
            yield list(part.columns), part.iter_rows()


class _Dicts(Source):
    """An iterable of dicts (rows): read as JSONL rows are, keys may differ per row."""

    def __init__(self, rows: Iterable[Mapping[str, Any]], name: str) -> None:
        self.rows = rows
        self.name = name
        self._done = 0
        self.total = len(rows) if isinstance(rows, Sequence) else None

    def position(self) -> int:
        return self._done

    def chunks(self, size: int = CHUNK_ROWS) -> Iterator[Chunk]:
        iterator = iter(self.rows)
        while True:
            part = list(islice(iterator, size))
            if not part:
                return
            chunk = Chunk(None)
            for offset, row in enumerate(part):
                line = self._done + offset + 1
                if isinstance(row, Mapping):
                    chunk.rows.append((line, row))
                else:
                    chunk.problems.append((line, f"a row must be a dict, not "
                                                 f"{type(row).__name__}"))
            self._done += len(part)
            yield chunk


def gzipped(head: bytes) -> bool:
    """Whether a file starting with ``head`` is gzip-compressed (by its magic bytes)."""
    return head.startswith(_GZIP_MAGIC)


def _sniff(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read(8)


def _text_format(name: str) -> str | None:
    lower = name.lower()
    if lower.endswith(".csv") or lower.endswith(".tsv"):
        return "csv"
    if lower.endswith((".jsonl", ".ndjson", ".json")):
        return "jsonl"
    return None


def open_source(source: Any, *, format: str | None = None, name: str | None = None,
                delimiter: str = ",") -> Source:
    """A :class:`Source` for a path (CSV, JSONL, either gzip-compressed, Parquet, Arrow),
    a pandas or polars DataFrame, a pyarrow Table, or an iterable of dicts.

    ``format`` (``csv``, ``jsonl``, ``parquet``, ``arrow``) overrides what the file's
    name and first bytes say; gzip is always recognized by its first bytes.
    """
    if format is not None and format not in FORMATS:
        raise SourceError(f"format must be one of {', '.join(FORMATS)}, not {format!r}")
    if isinstance(source, (str, os.PathLike)):
        return _open_path(os.fspath(source), format, delimiter)
    module = type(source).__module__
    label = name or ""
    if module.startswith("polars"):
        return _PolarsFrame(source, label or "dataframe")
    if hasattr(source, "itertuples") and hasattr(source, "columns") and hasattr(source, "iloc"):
        return _PandasFrame(source, label or "dataframe")
    if module.startswith("pyarrow") and hasattr(source, "to_batches"):
        return _ArrowTable(source, label or "table")
    if isinstance(source, (Mapping, str, bytes)):
        raise SourceError("rows must be a DataFrame, a table or an iterable of dicts, "
                          f"not one {type(source).__name__}")
    if isinstance(source, Iterable):
        return _Dicts(source, label or "rows")
    raise SourceError(f"cannot read rows from a {type(source).__name__}")


def _open_path(path: str, format: str | None, delimiter: str) -> Source:
    if not os.path.isfile(path):
        raise SourceError(f"{path}: no such file")
    head = _sniff(path)
    base = os.path.basename(path)
    if gzipped(head):
        inner = base[:-3] if base.lower().endswith(".gz") else base
        fmt = format or _text_format(inner) or _gzip_guess(path)
        if fmt not in ("csv", "jsonl"):
            raise SourceError(f"{base}: a gzip file must hold CSV or JSONL, not {fmt}")
        return TextFile(path, fmt, True, delimiter)
    if format in ("parquet", None) and head.startswith(_PARQUET_MAGIC):
        return _ParquetFile(path)
    if format == "parquet":
        raise SourceError(f"{base}: not a Parquet file (it does not start with PAR1)")
    if format in ("arrow", None) and head.startswith(_ARROW_MAGIC):
        return _ArrowFile(path, True)
    if format == "arrow" or base.lower().endswith((".arrows", ".arrow")):
        return _ArrowFile(path, False)
    fmt = format or _text_format(base)
    if fmt is None:
        raise SourceError(f"{base}: say which format it is with --format "
                          f"({', '.join(FORMATS)})")
    return TextFile(path, fmt, False, delimiter)


def _gzip_guess(path: str) -> str:
    """CSV or JSONL, from the first decompressed byte: a JSON row starts with '{'."""
    with gzip.open(path, "rb") as handle:
        first = io.BufferedReader(handle).peek(64)[:64].lstrip(_BOM).lstrip()
    return "jsonl" if first.startswith(b"{") else "csv"
