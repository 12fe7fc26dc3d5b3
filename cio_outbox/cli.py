"""The cio-outbox command line: each command is a thin wrapper over an Outbox or Worker call.

=================  ============================================================
command            library call
=================  ============================================================
enqueue FILE       :func:`cio_outbox.importers.enqueue_records` (chunked
                   :meth:`Outbox.enqueue_many`)
worker             :meth:`Outbox.worker` then :meth:`Worker.run`
status             :meth:`Outbox.status`
failed             :meth:`Outbox.failed`
retry              :meth:`Outbox.retry`
replace ID CALL    :meth:`Outbox.replace`
fix                :meth:`Outbox.fix_failed` (corrections from
                   :func:`cio_outbox.repair.field_fix`)
history ID         :meth:`Outbox.history`
log                :meth:`Outbox.log`
purge              :meth:`Outbox.purge_plan` then :meth:`Outbox.purge`
forget USER_ID     :meth:`Outbox.forget`
check              :func:`cio_outbox.check.check`
demo               :func:`cio_outbox.demo.run_demo`
sandbox            :func:`cio_outbox.sandbox.sandbox_command`
=================  ============================================================

Commands that report data take ``--json`` and then print JSON only on stdout, in the
vocabulary of :mod:`cio_outbox.views`; messages for people (progress, warnings, rejected
lines) go to stderr. Inspection and maintenance commands open only an existing outbox
(:func:`cio_outbox.locations.open_existing`); enqueue and worker create one.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import shutil
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import IO, TYPE_CHECKING, Any

import click

from cio_outbox import views
from cio_outbox.config import ConfigError
from cio_outbox.importers import (
    CsvMapping,
    CsvReader,
    FormatError,
    ImportResult,
    MappingError,
    default_run,
    enqueue_records,
    format_for,
    reader_for,
)
from cio_outbox.inspection import UnknownRunError
from cio_outbox.locations import open_existing
from cio_outbox.outbox import Outbox
from cio_outbox.results import Progress
from cio_outbox.settings import (
    DEFAULT_CONCURRENCY,
    DEFAULT_GZIP,
    DEFAULT_LEASE_SECONDS,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_MAX_UNCONFIRMED,
    DEFAULT_OUTBOX,
    DEFAULT_UNREACHABLE_TIMEOUT,
    ENV_OUTBOX,
)
from cio_outbox.storage import StorageError

if TYPE_CHECKING:
    from cio_outbox.worker import Worker

# Process exit codes belong to the command line; the library reports outcomes.
EXIT_OK = 0
"""Done, or stopped cleanly."""
EXIT_FATAL = 1
"""Fatal error: bad host, storage error, message not found."""
EXIT_USAGE = 2
"""Usage or configuration error (click's code for usage errors); also: enqueue rejected lines."""
EXIT_AUTH = 3
"""The API refused the key (HTTP 401/403)."""
DEFAULT_PATH = DEFAULT_OUTBOX

EXIT_CODES_HELP = f"""\b
Exit codes:
  {EXIT_OK}  done, or stopped cleanly (SIGINT/SIGTERM)
  {EXIT_FATAL}  fatal error: bad host, storage error, message not found
  {EXIT_USAGE}  usage or configuration error (bad option, bad key, region
     mismatch); enqueue: some lines were rejected
  {EXIT_AUTH}  the API refused the key (HTTP 401/403)"""


class Failure(click.ClickException):
    """An error with its exit code; click prints ``Error: <message>`` on stderr."""

    def __init__(self, message: str, exit_code: int = EXIT_FATAL) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _db_option(function: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--db", envvar=ENV_OUTBOX, default=DEFAULT_OUTBOX, show_default=True, metavar="PATH",
        help="The outbox file (env CIO_OUTBOX).",
    )(function)


def _json_option(function: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--json", "as_json", is_flag=True,
                        help="Print JSON only (nothing else on stdout).")(function)


@contextmanager
def _opened(db: str, *, create: bool = False) -> Iterator[Outbox]:
    """The outbox at ``db`` (created only when ``create``: enqueue, worker and sync); storage
    errors, a missing outbox and an unknown run become exit code 1 with their message."""
    try:
        outbox = Outbox(db) if create else open_existing(db)
    except StorageError as exc:
        raise Failure(str(exc)) from None
    try:
        yield outbox
    except (StorageError, UnknownRunError) as exc:
        raise Failure(str(exc)) from None
    finally:
        outbox.close()


def _print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, ensure_ascii=False, default=str))


def _masked(db: str) -> str:
    """The --db value fit to print: a password in a PostgreSQL URL is masked."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(db)
    if parts.scheme.startswith("postgres") and parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
        return urlunsplit(parts._replace(netloc=netloc))
    return db


def _err(text: str) -> None:
    click.echo(text, err=True)


class _Commands(click.Group):
    """Loads the ``sandbox`` command only when it is asked for: the sandbox brings in
    ``http.server`` and ``subprocess``, which no other command needs."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), "sandbox"})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name == "sandbox":
            from cio_outbox.sandbox import sandbox_command

            return sandbox_command
        return super().get_command(ctx, cmd_name)


@click.group(cls=_Commands, epilog=EXIT_CODES_HELP)
@click.version_option(package_name="cio-outbox")
def cli() -> None:
    """Durable outbox and worker for the Customer.io Data Pipelines API.

    Enqueue calls into an SQLite outbox (--db, env CIO_OUTBOX, default ./outbox.db),
    drain it with `worker` (key from env CIO_API_KEY only), and inspect it with
    `status`, `failed`, `history` and `log`. `cio-outbox demo` shows it all against a
    local sandbox, without an account.
    """



# -- enqueue ---------------------------------------------------------------------------


def _csv_mapping(
    call_type: str | None, maps: tuple[str, ...], named: dict[str, str | None],
    event: str | None, delimiter: str, key: str | None, dedupe: bool,
) -> CsvMapping:
    columns: dict[str, str] = {}
    for item in maps:
        column, sep, target = item.partition("=")
        if not sep or not column.strip() or not target.strip():
            raise click.BadParameter(f"{item!r} is not COLUMN=TARGET[:TYPE]",
                                     param_hint="--map")
        columns[column] = target
    for target, column in named.items():
        if column:
            columns[column] = target
    if call_type is None:
        call_type = "track" if event or "event" in columns.values() else "identify"
    try:
        return CsvMapping(call_type, columns=columns, event=event, delimiter=delimiter,
                          key=key, dedupe=dedupe)
    except MappingError as exc:
        raise click.UsageError(str(exc)) from None


@cli.command(short_help="Enqueue the calls of a JSONL or CSV file.")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, allow_dash=True))
@_db_option
@click.option("--run", help="Run name for these rows (default: the file name).")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv"]),
              help="Input format (default: csv for *.csv, else jsonl).")
@click.option("--type", "call_type", type=click.Choice(["identify", "track"]),
              help="CSV: the call each row becomes (default: track when an event column "
                   "or --event is given, else identify).")
@click.option("--map", "maps", multiple=True, metavar="COLUMN=TARGET[:TYPE]",
              help="CSV: map a column to userId, anonymousId, event, timestamp, messageId, "
                   "key, ignore, traits.NAME or properties.NAME, optionally typed (:int, "
                   ":float, :bool, :date; 'Age=:int' keeps the name) as in sync --map "
                   "(repeatable).")
@click.option("--user-id-column", metavar="COLUMN", help="CSV: the column holding userId.")
@click.option("--anonymous-id-column", metavar="COLUMN",
              help="CSV: the column holding anonymousId.")
@click.option("--event-column", metavar="COLUMN", help="CSV: the column holding the event.")
@click.option("--event", "event_name", metavar="NAME",
              help="CSV: one event name for every row (track).")
@click.option("--timestamp-column", metavar="COLUMN",
              help="CSV: the column holding an ISO-8601 timestamp.")
@click.option("--key-column", metavar="COLUMN",
              help="CSV: a unique column whose value makes the messageId (instead of the "
                   "line number); may be the --user-id-column. Exact repeats of a row are "
                   "dropped, a repeated key with other values is rejected.")
@click.option("--dedupe", is_flag=True,
              help="CSV: drop rows that repeat an earlier row exactly (the key column does "
                   "this already).")
@click.option("--delimiter", default=",", show_default=True, help="CSV: field delimiter.")
@_json_option
def enqueue(
    file: str, db: str, run: str | None, fmt: str | None, call_type: str | None,
    maps: tuple[str, ...], user_id_column: str | None, anonymous_id_column: str | None,
    event_column: str | None, event_name: str | None, timestamp_column: str | None,
    key_column: str | None, dedupe: bool, delimiter: str, as_json: bool,
) -> None:
    """Enqueue the calls of a JSONL or CSV FILE ('-' for stdin, with --run).

    JSONL: each line is one Pipelines API call in its wire shape ("type", "userId" or
    "anonymousId", "traits", "event", "properties", "name", "groupId", "previousId",
    "context", "timestamp", optional "messageId").

    CSV (identify or track): a header line, then one call per row. Columns named userId,
    anonymousId, event, timestamp or messageId map to those fields; name others with
    --user-id-column, --event-column, --timestamp-column, ... or --map COLUMN=TARGET.
    Every other column becomes a trait (identify) or a property (track); empty cells are
    left out; values stay strings unless typed (--map "Lifetime Value=traits.ltv:float").
    Headers are trimmed; a header that looks like a Customer.io attribute (Email Address)
    gets a --map suggestion on stderr. A gzip file is read directly (either format), and a
    file that looks like another format than it is read as is refused, naming the format.

    Safe to stop and run again: a line without a messageId gets a stable one made from
    the run name, its line number and its content (or the --key-column value), so a rerun
    adds no duplicates and misses nothing, while a different file under the same name (or
    an edited line) adds its lines as new messages, with a warning on stderr. A line's own
    messageId and timestamp (an event archive's) are kept; a line without a timestamp is
    stamped with the time of enqueue. Invalid lines are reported with their line numbers on
    stderr (or in the --json output), valid lines are kept, and the exit code is 2.

    \b
    Examples:
      cio-outbox enqueue people.jsonl
      cio-outbox enqueue orders.csv --user-id-column customer_id \\
          --event-column event --timestamp-column ts --key-column order_id
    """
    named = {"userId": user_id_column, "anonymousId": anonymous_id_column,
             "event": event_column, "timestamp": timestamp_column}
    if file == "-" and not run:
        raise click.UsageError("reading stdin needs --run NAME (the ids are made from it)")
    run = run or default_run(file)
    fmt = fmt or format_for(file)
    csv_given = bool(call_type or maps or event_name or any(named.values()) or key_column
                     or dedupe or delimiter != ",")
    mapping: CsvMapping | None = None
    if fmt == "csv":
        mapping = _csv_mapping(call_type, maps, named, event_name, delimiter, key_column,
                               dedupe)
    elif csv_given:
        raise click.UsageError("--type, --map, --event, --delimiter and the --*-column "
                               "options apply to CSV files only")
    source: str | IO[bytes] = sys.stdin.buffer if file == "-" else file
    size = os.path.getsize(file) if file != "-" else 0
    reader = reader_for(source, run=run, format=fmt, mapping=mapping)
    if isinstance(reader, CsvReader) and mapping is not None:
        reader.on_header = lambda header: _suggest_map(mapping, header)
    try:
        reader.check()  # a file in another format is refused before the outbox is made
    except FormatError as exc:
        raise click.UsageError(str(exc)) from None
    show_bar = size > 0 and sys.stderr.isatty()
    with _opened(db, create=True) as outbox, click.progressbar(
        length=size, label=f"enqueue {os.path.basename(file)}", file=sys.stderr,
        hidden=not show_bar,
    ) as bar:
        done = 0

        def advance(_: ImportResult) -> None:
            nonlocal done
            bar.update(reader.bytes_read - done)
            done = reader.bytes_read

        try:
            result = enqueue_records(outbox, reader, run=run, on_chunk=advance)
        except (MappingError, FormatError) as exc:
            raise click.UsageError(str(exc)) from None
    _report_enqueue(file, result, as_json)
    if result.changed:
        _err(f"warning: run {run!r} was used before for different content: "
             f"{result.changed:,} line(s) differ from what the earlier import held at the "
             "same line numbers and were added as new messages (name each import with "
             "--run to keep them apart)")
    if result.rejected:
        sys.exit(EXIT_USAGE)


def _suggest_map(mapping: CsvMapping, header: list[str]) -> None:
    for column, trait in mapping.suggestions(header):
        _err(f"hint: column {column!r} becomes the trait {column!r}; Customer.io's "
             f"attribute is {trait!r}: --map \"{column}=traits.{trait}\"")


def _report_enqueue(file: str, result: ImportResult, as_json: bool) -> None:
    if as_json:
        _print_json({"file": file, **result.as_dict()})
        return
    for rejection in result.rejections:
        where = f" ({rejection.field})" if rejection.field else ""
        _err(f"line {rejection.line}{where}: {rejection.error}")
    if result.rejections_not_listed:
        _err(f"... and {result.rejections_not_listed:,} more rejected lines not listed")
    click.echo(
        f"{file} (run {result.run!r}): {result.lines:,} lines, {result.added:,} added, "
        f"{result.skipped:,} already in the outbox, {result.rejected:,} rejected"
        + (f", {result.duplicates:,} repeated row{'s' * (result.duplicates != 1)} dropped"
           if result.duplicates else "")
    )


# -- worker ----------------------------------------------------------------------------


class ProgressPrinter:
    """Prints worker progress on stderr: one line updated in place on a terminal, otherwise
    a plain log line each call. :meth:`Progress.line` names the error while retrying."""

    def __init__(self, stream: IO[str] | None = None, *, tty: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.interval = 0.5 if self.tty else 5.0
        self._open_line = False

    def __call__(self, progress: Progress) -> None:
        text = progress.line()
        if self.tty:
            width = shutil.get_terminal_size().columns - 1
            self.stream.write("\r" + text[:width] + "\x1b[K")
            self._open_line = True
        else:
            stamp = _dt.datetime.now().astimezone().strftime("%H:%M:%S")
            self.stream.write(f"{stamp} {text}\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        """A line of its own, below the progress line."""
        self.end_line()
        self.stream.write(text + "\n")
        self.stream.flush()

    def end_line(self) -> None:
        if self._open_line:
            self.stream.write("\n")
            self.stream.flush()
            self._open_line = False


class GracefulStop:
    """SIGINT and SIGTERM ask the worker to stop gracefully (finish the request in flight,
    record it, release the rest); a second signal quits at once (exit 130) and leaves the
    rows in flight to come back when their lease expires.

    Installed before the outbox opens: a worker started next to busy writers can wait
    seconds for the write lock before it has a Worker to stop, and a signal then must not
    kill it with the default action. A signal that came first stops the worker as soon as
    it is :meth:`attach`-ed, before it claims anything."""

    def __init__(self, printer: ProgressPrinter) -> None:
        self.printer = printer
        self.received: list[int] = []
        self.worker: Worker | None = None

    def attach(self, worker: Worker) -> None:
        self.worker = worker
        if self.received:
            worker.stop()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received.append(signum)
        if len(self.received) > 1:
            os._exit(130)
        if self.worker is not None:
            self.worker.stop()
        self.printer.message(f"{signal.Signals(signum).name}: stopping after the request in "
                             "flight (send it again to quit at once)")

    @contextmanager
    def installed(self) -> Iterator[GracefulStop]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {sig: signal.signal(sig, self._handle)
                    for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)


@cli.command(short_help="Send the outbox to the Pipelines API.")
@_db_option
@click.option("--host", envvar="CIO_HOST", metavar="URL",
              help="API base URL (env CIO_HOST), e.g. https://cdp.customer.io or a sandbox.")
@click.option("--region", envvar="CIO_REGION", type=click.Choice(["us", "eu"],
              case_sensitive=False), help="Customer.io region when no host is given "
              "(env CIO_REGION; default: the key's region, else us).")
@click.option("--concurrency", type=click.IntRange(1, 64), default=DEFAULT_CONCURRENCY,
              show_default=True,
              help="Requests in flight at once.")
@click.option("--max-rps", type=click.FloatRange(0, min_open=True), metavar="R",
              help="At most R requests per second.")
@click.option("--until-empty", is_flag=True,
              help="Stop when nothing is pending or in flight (rows leased by a dead worker "
                   "are waited for until their lease expires).")
@click.option("--unreachable-timeout", type=click.FloatRange(0),
              default=DEFAULT_UNREACHABLE_TIMEOUT,
              show_default=True, metavar="SECONDS",
              help="With --until-empty: give up (exit 1) when the host has not answered "
                   "once in this long (DNS typo, TLS against plain http).")
@click.option("--run", help="Only send the rows of this run.")
@click.option("--gzip/--no-gzip", default=DEFAULT_GZIP, show_default=True,
              help="Compress request bodies (gzip level 1: about a sixth of the bytes).")
@click.option("--max-attempts", type=click.IntRange(1), default=DEFAULT_MAX_ATTEMPTS,
              show_default=True,
              help="HTTP attempts per row before it is dead-lettered.")
@click.option("--max-unconfirmed", type=click.IntRange(1), default=DEFAULT_MAX_UNCONFIRMED,
              show_default=True,
              metavar="N",
              help="Sends in a row that went out but got no answer (read timeout, connection "
                   "closed) before the rows are dead-lettered as 'may have arrived'.")
@click.option("--lease", "lease", type=click.FloatRange(1.0), default=DEFAULT_LEASE_SECONDS,
              show_default=True,
              metavar="SECONDS",
              help="How long a claim holds its rows without news from this worker; a "
                   "heartbeat renews it every quarter of it while a request is in flight "
                   "or waiting to be retried.")
@click.option("--worker-id", metavar="ID",
              help="Name of this worker in the audit trail (default host:wN, the first "
                   "slot of this outbox that no running worker on this host holds). A "
                   "restarted worker with the same id takes back the rows it held.")
@click.option("--allow-insecure", is_flag=True,
              help="Allow a plain http:// host that is not loopback (sends the key in clear).")
@_json_option
def worker(
    db: str, host: str | None, region: str | None, concurrency: int, max_rps: float | None,
    until_empty: bool, unreachable_timeout: float, run: str | None, gzip: bool,
    max_attempts: int, max_unconfirmed: int, lease: float, worker_id: str | None,
    allow_insecure: bool, as_json: bool,
) -> None:
    """Send the outbox to the Pipelines API, until stopped (or with --until-empty).

    The API key comes from the environment variable CIO_API_KEY only. On a terminal a
    progress line is updated in place (on stderr); otherwise a log line is written every
    few seconds. SIGINT (Ctrl-C) and SIGTERM stop gracefully: the request in flight is
    finished and recorded, the other rows are released, and the exit code is 0. A second
    signal quits at once (exit code 130); rows still in flight then come back to pending when
    their lease expires.
    """
    printer = ProgressPrinter()
    with GracefulStop(printer).installed() as graceful, _opened(db, create=True) as outbox:
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                the_worker = outbox.worker(
                    host=host, region=region.lower() if region else None, gzip=gzip,
                    allow_insecure=allow_insecure, concurrency=concurrency, max_rps=max_rps,
                    run=run, max_attempts=max_attempts, max_unconfirmed=max_unconfirmed,
                    lease_seconds=lease,
                    worker_id=worker_id,
                    on_progress=printer, progress_interval=printer.interval,
                    unreachable_timeout=unreachable_timeout,
                )
        except ConfigError as exc:
            raise Failure(str(exc), EXIT_USAGE) from None
        for warning in caught:
            _err(f"warning: {warning.message}")
        graceful.attach(the_worker)
        try:
            result = the_worker.run(until_empty=until_empty)
        finally:
            the_worker.client.close()
            printer.end_line()
    outcome = "stopped" if result.stopped else ("drained" if result.exit_code == 0 else "failed")
    if as_json:
        _print_json({**result.as_dict(), "outcome": outcome})
    else:
        if result.exit_code == EXIT_AUTH:
            found = re.search(r"HTTP (\d+)", result.error or "")
            code = found.group(1) if found else "401"
            click.echo(f"not sent: the API refused the key (HTTP {code}); check CIO_API_KEY "
                       "and the region or host. Nothing was counted as attempted.")
        click.echo(f"{outcome}: sent {result.sent:,}, failed {result.failed:,}, "
                   f"{result.requests:,} requests, {result.retries:,} retries in "
                   f"{result.elapsed:.1f} s")
        if result.failed:
            click.echo(f"{result.failed:,} row(s) failed: see cio-outbox failed --db "
                       f"{_masked(db)} (then replace, fix or retry them)")
    if result.error:
        _err(f"Error: {result.error}")
    sys.exit(result.exit_code)


# -- inspection ------------------------------------------------------------------------


def _count(n: int) -> str:
    return f"{n:>10,}"


@cli.command(short_help="Counts by state, oldest pending, last error.")
@_db_option
@click.option("--run", help="Only this run.")
@_json_option
def status(db: str, run: str | None, as_json: bool) -> None:
    """Counts by state, oldest pending message, last error and recent send rate.

    With --json the overall counts are at the top level under "pending", "in_flight",
    "sent" and "failed".
    """
    with _opened(db) as outbox:
        outbox.check_run(run)
        data = outbox.status(run)
        where = outbox.storage.location  # a PostgreSQL URL's password is masked here
    if as_json:
        _print_json(data)
        return
    click.echo(f"outbox {where}" + (f", run {run!r}" if run else ""))
    oldest = ""
    if data["oldest_pending"]:
        oldest = f"   oldest {data['oldest_pending']} ({data['oldest_pending_age_s']:,.0f} s ago)"
    click.echo(f"  pending   {_count(data['pending'])}{oldest}")
    click.echo(f"  in flight {_count(data['in_flight'])}")
    for lease in data["leases"]:
        click.echo(f"    {lease['rows']:,} leased by {lease['worker_id']} until "
                   f"{lease['expires_at']} (in {lease['expires_in_s']:,.0f} s)")
    click.echo(f"  sent      {_count(data['sent'])}")
    click.echo(f"  failed    {_count(data['failed'])}")
    click.echo(f"  rate      {data['rate_last_minute']:>10,.1f} msg/s over the last minute")
    last = data["last_error"]
    if last:
        click.echo(f"  last error at {last['at']}: {last['error']}")
    runs = data.get("runs") or []
    if len(runs) > 1 or (runs and runs[0]["run"]):
        click.echo(f"  {'run':<24}{'pending':>10}{'in flight':>10}{'sent':>10}{'failed':>10}")
        for entry in runs:
            click.echo(f"  {entry['run'] or '(none)':<24}{entry['pending']:>10,}"
                       f"{entry['in_flight']:>10,}{entry['sent']:>10,}{entry['failed']:>10,}")


@cli.command(short_help="List dead-lettered rows.")
@_db_option
@click.option("--run", help="Only this run.")
@click.option("--limit", type=click.IntRange(1), default=100, show_default=True)
@_json_option
def failed(db: str, run: str | None, limit: int, as_json: bool) -> None:
    """Dead-lettered rows: id, messageId, run, attempts, error and what the call was.

    With --json: a list of rows (the first --limit of them, oldest first)."""
    with _opened(db) as outbox:
        page = outbox.failed_page(run, limit)
    rows = page.rows
    if as_json:
        _print_json(rows)
        return
    if not rows:
        click.echo("no failed rows" + (f" in run {run!r}" if run else ""))
        return
    for row in rows:
        click.echo(f"#{row['id']}  {row['summary']}  run {row['run']!r}  "
                   f"attempts {row['attempts']}  messageId {row['messageId']}")
        click.echo(f"    {row['error']}")
    shown = f"{len(rows):,} of {page.total:,}" if page.total > len(rows) else f"{len(rows):,}"
    more = " (--limit N shows more)" if page.total > len(rows) else ""
    click.echo(f"{shown} failed row(s){more}. Next:")
    click.echo("  data the server refused: fix it, then it is pending again:")
    click.echo("    cio-outbox replace MESSAGE_ID CALL_JSON         (one row)")
    click.echo("    cio-outbox fix --run RUN --set FIELD=VALUE --dry-run   (every row of a run)")
    click.echo("  an outage or a limit: send the same payload again:")
    click.echo("    cio-outbox retry --id ID   (or --run RUN, or --all)")


@cli.command(short_help="Requeue dead-lettered rows.")
@_db_option
@click.option("--id", "ids", type=int, multiple=True, help="Row id to requeue (repeatable).")
@click.option("--run", help="Requeue the failed rows of this run.")
@click.option("--all", "all_", is_flag=True, help="Requeue every failed row.")
@_json_option
def retry(db: str, ids: tuple[int, ...], run: str | None, all_: bool, as_json: bool) -> None:
    """Requeue dead-lettered rows (their attempts start again from 0); prints how many."""
    if not ids and run is None and not all_:
        raise click.UsageError("say which failed rows to requeue: --id ID, --run NAME or --all")
    from cio_outbox.repair import UnknownRowsError

    with _opened(db) as outbox:
        outbox.check_run(run)
        try:
            count = outbox.retry(list(ids) if ids else None, run=run, all=all_)
        except UnknownRowsError as exc:
            raise Failure(str(exc)) from None
    if as_json:
        _print_json({"requeued": count})
    else:
        click.echo(f"requeued {count:,} failed row(s)")


def _attempt_line(attempt: dict[str, Any]) -> str:
    status_code = attempt.get("status_code") or "-"
    latency = attempt.get("latency_ms")
    latency_text = f"{latency:,.0f} ms" if latency is not None else "-"
    text = (f"{attempt['at']}  {attempt['outcome']:<8} HTTP {status_code!s:<4} "
            f"/v1/{attempt['endpoint']:<6} {attempt['messages']:>6,} msg {attempt['bytes']:>9,} B "
            f"{latency_text:>8}  {attempt['worker_id']}")
    if attempt.get("error"):
        text += f"\n    {attempt['error']}"
    return text


@cli.command(short_help="Fix a dead-lettered message and requeue it.")
@click.argument("message_id")
@click.argument("call")
@_db_option
@click.option("--allow-person-change", is_flag=True,
              help="Accept a corrected call for another userId/anonymousId.")
@_json_option
def replace(message_id: str, call: str, db: str, allow_person_change: bool,
            as_json: bool) -> None:
    """Replace a dead-lettered message with a corrected CALL (a JSON object in its wire shape,
    or @FILE holding one) under the same messageId and run, and make it pending again.

    \b
    cio-outbox replace 0190f7a2-... '{"type": "track", "userId": "u9", "event": "Paid"}'
    """
    from cio_outbox.wire import MessageError

    text = call
    if call.startswith("@"):
        with open(call[1:], encoding="utf-8") as handle:
            text = handle.read()
    try:
        parsed = json.loads(text)
    except ValueError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="CALL") from None
    if not isinstance(parsed, dict):
        raise click.BadParameter("must be a JSON object", param_hint="CALL")
    with _opened(db) as outbox:
        try:
            row = outbox.replace(message_id, parsed, allow_person_change=allow_person_change)
        except MessageError as exc:
            raise click.BadParameter(str(exc), param_hint="CALL") from None
        except KeyError as exc:
            raise Failure(str(exc.args[0])) from None
        except ValueError as exc:
            raise Failure(str(exc), EXIT_USAGE) from None
    if as_json:
        _print_json(views.message(row))
    else:
        click.echo(f"replaced #{row['id']} ({message_id}); it is pending again")


@cli.command(short_help="Correct every failed row of a run at once.")
@_db_option
@click.option("--run", help="Only the failed rows of this run (default: every failed row).")
@click.option("--set", "assignments", multiple=True, metavar="FIELD.PATH=VALUE",
              help="Set a field of each payload, e.g. properties.total=12 or event=Paid; "
                   "VALUE is read as JSON when it is JSON (12, true, null), else as text "
                   "(repeatable).")
@click.option("--merge", "patch", metavar="JSON",
              help="A JSON merge patch applied to each payload (null removes a field), "
                   "or @FILE holding one.")
@click.option("--dry-run", is_flag=True, help="Show what would change; store nothing.")
@click.option("--allow-person-change", is_flag=True,
              help="Accept corrections that change userId/anonymousId.")
@_json_option
def fix(db: str, run: str | None, assignments: tuple[str, ...], patch: str | None,
        dry_run: bool, allow_person_change: bool, as_json: bool) -> None:
    """Correct the payload of every failed row (of --run) and make the rows pending again,
    under their messageIds. Each corrected call is validated first: if any does not
    validate, nothing is stored and those rows are listed (exit 2).

    \b
    cio-outbox fix --run orders --set properties.total=12 --dry-run
    cio-outbox fix --run orders --merge '{"properties": {"coupon": null}}'

    From Python, any function of the payload: Outbox.fix_failed(fix, run=...).
    """
    from cio_outbox.repair import field_fix

    if not assignments and patch is None:
        raise click.UsageError("say what to change: --set FIELD.PATH=VALUE or --merge JSON")
    merge = None
    if patch is not None:
        text = patch
        if patch.startswith("@"):
            with open(patch[1:], encoding="utf-8") as handle:
                text = handle.read()
        try:
            merge = json.loads(text)
        except ValueError as exc:
            raise click.BadParameter(f"not JSON: {exc}", param_hint="--merge") from None
        if not isinstance(merge, dict):
            raise click.BadParameter("must be a JSON object", param_hint="--merge")
    try:
        correction = field_fix(assignments, merge)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--set") from None
    with _opened(db) as outbox:
        outbox.check_run(run)
        try:
            result = outbox.fix_failed(correction, run=run, dry_run=dry_run,
                                       allow_person_change=allow_person_change)
        except ValueError as exc:
            raise Failure(str(exc)) from None
    if as_json:
        _print_json(result.as_dict())
    else:
        verb = "would fix" if dry_run else "fixed"
        click.echo(f"{verb} {result.fixed:,} of {result.failed:,} failed row(s)"
                   + (f" ({result.unchanged:,} unchanged)" if result.unchanged else "")
                   + ("" if dry_run or not result.fixed else "; they are pending again"))
        for example in result.examples if dry_run else []:
            click.echo(f"  #{example['id']}: "
                       + json.dumps(example["payload"], ensure_ascii=False))
        for rejection in result.rejected[:20]:
            _err(f"  #{rejection['id']} ({rejection['messageId']}): {rejection['error']}")
        if result.rejected:
            _err(f"{len(result.rejected):,} correction(s) do not validate; nothing was stored")
    if result.rejected:
        sys.exit(EXIT_USAGE)


@cli.command(short_help="One message's row and its HTTP attempts.")
@click.argument("message_id")
@_db_option
@_json_option
def history(message_id: str, db: str, as_json: bool) -> None:
    """One message's row and every HTTP attempt that carried it (exit 1 if unknown)."""
    with _opened(db) as outbox:
        data = outbox.history(message_id)
    if data is None:
        raise Failure(f"no message with messageId {message_id!r} in {_masked(db)}")
    if as_json:
        _print_json(views.history(data))
        return
    message = data["message"]
    for name in ("id", "message_id", "run", "call_type", "person", "status", "attempts",
                 "last_error", "created_at", "updated_at", "sent_at", "worker_id",
                 "lease_expires_at", "next_attempt_at", "size"):
        if message.get(name) is not None:
            click.echo(f"{name:<17} {message[name]}")
    click.echo(f"{'payload':<17} {message['payload']}")
    click.echo(f"{len(data['attempts'])} attempt(s):")
    for attempt in data["attempts"]:
        click.echo("  " + _attempt_line(attempt))


@cli.command(short_help="The audit trail of HTTP attempts.")
@_db_option
@click.option("--run", help="Only attempts that carried rows of this run.")
@click.option("--limit", type=click.IntRange(1), default=100, show_default=True)
@_json_option
def log(db: str, run: str | None, limit: int, as_json: bool) -> None:
    """The audit trail: the most recent HTTP attempts, oldest first."""
    with _opened(db) as outbox:
        outbox.check_run(run)
        attempts = outbox.log(run, limit)
    if as_json:
        _print_json([views.attempt(a) for a in attempts])
        return
    if not attempts:
        click.echo("no attempts yet")
    for attempt in attempts:
        click.echo(_attempt_line(attempt))


# -- retention and data protection -----------------------------------------------------


def _interactive() -> bool:
    """Whether a person can answer a question (stdin and stdout are terminals)."""
    return sys.stdin.isatty() and sys.stdout.isatty()


@cli.command(short_help="Delete sent rows older than an age.")
@_db_option
@click.option("--sent", "sent", is_flag=True,
              help="Delete sent rows (required: only sent rows are ever purged).")
@click.option("--older-than", required=True, metavar="AGE",
              help="Only rows sent longer ago than AGE: 45s, 15min, 12h, 30d or 2w "
                   "(a bare m is refused: minutes or months?).")
@click.option("--dry-run", is_flag=True, help="Show what would be deleted; delete nothing.")
@click.option("--yes", is_flag=True, help="Do not ask (needed when not on a terminal).")
@_json_option
def purge(db: str, sent: bool, older_than: str, dry_run: bool, yes: bool,
          as_json: bool) -> None:
    """Retention: delete sent rows sent longer ago than --older-than; prints how many.

    Shows what it deletes (rows by run, their sent times) and asks first on a terminal;
    scripts pass --yes. --dry-run shows the same and deletes nothing.
    """
    if not sent:
        raise click.UsageError("purge deletes sent rows only; say so with --sent")
    with _opened(db) as outbox:
        try:
            plan = outbox.purge_plan(older_than)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--older-than") from None
        if as_json and dry_run:
            _print_json(plan.as_dict())
            return
        say = _err if as_json else click.echo
        say(f"{'would delete' if dry_run else 'deleting'} {plan.rows:,} sent row(s) sent "
            f"before {views.iso(plan.before)} (more than {older_than} ago)")
        for entry in plan.runs:
            say(f"  run {entry['run'] or '(none)'!r}: {entry['rows']:,} row(s), sent "
                f"{entry['oldest_sent_at']} .. {entry['newest_sent_at']}")
        if dry_run:
            return
        if plan.rows and not yes:
            if not _interactive():
                raise click.UsageError(
                    "purge deletes rows for good: pass --yes to confirm (not on a terminal, "
                    "so nobody can be asked), or --dry-run to see what it would delete")
            if not click.confirm(f"Delete {plan.rows:,} sent row(s)?", default=False):
                raise Failure("nothing deleted")
        deleted = outbox.purge(plan)
    if as_json:
        _print_json({"deleted": deleted})
    else:
        click.echo(f"deleted {deleted:,} sent row(s) sent more than {older_than} ago")


@cli.command(short_help="Remove every row naming a person.")
@click.argument("user_id")
@_db_option
@_json_option
def forget(user_id: str, db: str, as_json: bool) -> None:
    """Data protection: remove every row naming USER_ID (userId or anonymousId), redact it
    from the audit trail's error texts, and vacuum the file so no trace remains. The audit
    trail keeps its counts."""
    with _opened(db) as outbox:
        try:
            report = outbox.forget_report(user_id)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="USER_ID") from None
    deleted, kept_by = report["deleted"], report["traces_kept_by"]
    if as_json:
        _print_json({"deleted": deleted, "traces_kept_by": kept_by})
    elif not kept_by:
        click.echo(f"removed {deleted:,} row(s) naming that person; {_masked(db)} was vacuumed")
    else:
        click.echo(f"removed {deleted:,} row(s) naming that person")
    if kept_by:
        raise Failure(
            "the deleted rows stay in the table files while older transactions of other "
            f"clients are open (pids {', '.join(map(str, kept_by))}); run this forget again "
            "once they end")


# -- pre-flight ------------------------------------------------------------------------


@cli.command(short_help="Check key, region and host before a migration.")
@click.option("--host", envvar="CIO_HOST", metavar="URL",
              help="Scheme and host, like https://cdp.customer.io (env CIO_HOST).")
@click.option("--region", envvar="CIO_REGION", type=click.Choice(["us", "eu"],
              case_sensitive=False), help="us or eu (env CIO_REGION).")
@click.option("--allow-insecure", is_flag=True,
              help="Allow a plain http:// host that is not loopback (sends the key in clear).")
@click.option("--send-test-event", is_flag=True,
              help="Also send one anonymous track event named 'cio-outbox check'.")
@_json_option
def check(host: str | None, region: str | None, allow_insecure: bool, send_test_event: bool,
          as_json: bool) -> None:
    """Validate the configuration (key format, region and host agree), then reach the host
    with an empty batch (no message) and say whether it answered like the Pipelines API.
    With --send-test-event, also send one clearly named test event and report the HTTP
    result and latency. The key comes from CIO_API_KEY and is never shown."""
    from cio_outbox.check import check as run_check

    report = run_check(host=host, region=region.lower() if region else None,
                       allow_insecure=allow_insecure, send_test_event=send_test_event)
    if as_json:
        _print_json(report)
    else:
        if "scheme" in report:
            region_text = (report.get("key_region") or "none").upper()
            click.echo(f"key:    {report['scheme']} auth, region in key: {region_text}")
        if "host" in report:
            click.echo(f"host:   {report['host']} (region {(report['region'] or '-').upper()})")
        if report.get("answered") and report["ok"]:
            click.echo(f"answer: answered like the Pipelines API (HTTP "
                       f"{report['probe_status_code']}, {report['probe_latency_ms']} ms)")
        for warning in report["warnings"]:
            click.echo(f"warning: {warning}")
        if report["sent"]:
            code = report.get("status_code", "no answer")
            latency = f", {report['latency_ms']} ms" if "latency_ms" in report else ""
            click.echo(f"test event: HTTP {code}{latency} (messageId {report['messageId']})")
        for problem in report["problems"]:
            click.echo(f"problem: {problem}")
        click.echo("ok" if report["ok"] else "not ok")
    if not report["ok"]:
        codes = (report.get("status_code"), report.get("probe_status_code"))
        reached = report["sent"] or "answered" in report
        sys.exit(EXIT_AUTH if {401, 403} & set(codes) else (EXIT_FATAL if reached
                                                              else EXIT_USAGE))


# -- demo ------------------------------------------------------------------------------


@cli.command(short_help="A sample migration into a local sandbox.")
@click.option("--db", metavar="PATH",
              help="Outbox file to create (default: a fresh file in a temporary folder; "
                   "CIO_OUTBOX is ignored so the demo never touches a real outbox).")
@click.option("--rows", type=click.IntRange(30, 1_000_000), default=3000, show_default=True,
              help="Calls in the sample migration (a third identify, the rest track).")
def demo(db: str | None, rows: int) -> None:
    """A sample migration into a local sandbox: enqueue, interrupt, resume, one poison row.

    No account needed. Starts the sandbox in this process, enqueues identify and track
    calls for generated people (one with an event the sandbox rejects), drains them with
    an interruption and a resume, then shows the failed row and the final status.
    """
    from cio_outbox.demo import DemoError, run_demo

    printer = ProgressPrinter(sys.stdout)
    printer.interval = 0.5 if printer.tty else 1.0
    try:
        run_demo(db, rows=rows, echo=click.echo, on_progress=printer)
    except DemoError as exc:
        raise Failure(str(exc), exc.exit_code) from None
    except StorageError as exc:
        raise Failure(str(exc)) from None


# -- sync ------------------------------------------------------------------------------


@cli.command("sync", epilog=EXIT_CODES_HELP,
             short_help="Send only the rows that changed since the last sync.")
@click.argument("source", type=click.Path(exists=True, dir_okay=False))
@click.option("--key", "key_column", required=True, metavar="COLUMN",
              help="The column that identifies each row (the userId, or the object id).")
@_db_option
@click.option("--name", help="The sync's name, under which fingerprints are kept "
                             "(default: the file name).")
@click.option("--objects", is_flag=True, help="Rows are objects (group calls), not people.")
@click.option("--object-type-id", metavar="N", help="With --objects: the object type id.")
@click.option("--map", "maps", multiple=True, metavar="COLUMN=TARGET[:TYPE]",
              help="Rename, type or leave out a column: 'Lifetime Value=traits.ltv:float', "
                   "'Age=:int', 'Notes=ignore'; types str, int, float, bool, date "
                   "(repeatable).")
@click.option("--format", "fmt", type=click.Choice(["csv", "jsonl", "parquet", "arrow"]),
              help="Input format (default: from the file name and its first bytes).")
@click.option("--delimiter", default=",", show_default=True, help="CSV: field delimiter.")
@click.option("--changed-only", is_flag=True,
              help="Send only the traits whose values changed (new keys get all).")
@click.option("--clear-missing-traits", is_flag=True,
              help="Send a trait that disappeared from a row as null (clears it).")
@click.option("--delete-missing", is_flag=True,
              help="Delete keys synced before and absent now (delete_person, or the object).")
@click.option("--max-delete-share", type=click.FloatRange(0, 1), default=0.05,
              show_default=True, metavar="SHARE",
              help="With --delete-missing: refuse when more than this share of the synced "
                   "keys would be deleted.")
@click.option("--dry-run", is_flag=True, help="Count new, changed, unchanged and deleted "
                                               "rows and show a sample; enqueue nothing.")
@_json_option
def sync_command(
    source: str, key_column: str, db: str, name: str | None, objects: bool,
    object_type_id: str | None, maps: tuple[str, ...], fmt: str | None, delimiter: str,
    changed_only: bool, clear_missing_traits: bool, delete_missing: bool,
    max_delete_share: float, dry_run: bool, as_json: bool,
) -> None:
    """Make Customer.io match SOURCE, enqueueing only what changed since the last sync.

    SOURCE is a CSV or JSONL file (gzip-compressed too), or Parquet or Arrow (needs
    'cio-outbox[parquet]'). Each row is a person (an identify: userId is the --key column,
    traits are the other columns) or, with --objects, an object. The outbox keeps a
    fingerprint per key under the sync's name; a row is enqueued only when its key is new,
    its traits changed, or its last message was dead-lettered. Safe to kill and rerun:
    each change is enqueued once.

    \b
    Exit codes: 0 done; 2 some rows were rejected (reported with their lines);
    1 --delete-missing refused (too many deletions) or another error.

    \b
    Examples:
      cio-outbox sync customers.csv --key id --map "Lifetime Value=traits.ltv:float"
      cio-outbox sync customers.parquet --key id --delete-missing --dry-run
      cio-outbox sync accounts.csv --key account_id --objects --object-type-id 1
    """
    from cio_outbox.sources import SourceError
    from cio_outbox.sync import DeletionRefused, SyncError, SyncResult

    show_bar = sys.stderr.isatty() and not as_json
    refused: str | None = None
    with _opened(db, create=True) as outbox, click.progressbar(
        length=os.path.getsize(source), label=f"sync {os.path.basename(source)}",
        file=sys.stderr, hidden=not show_bar,
    ) as bar:
        done = 0

        def advance(_: SyncResult, table: Any) -> None:
            nonlocal done
            if table.total:
                bar.length = table.total
            position = table.position()
            bar.update(position - done)
            done = position

        try:
            result = outbox.sync(
                source, key=key_column, name=name, objects=objects,
                object_type_id=object_type_id, mapping=list(maps), changed_only=changed_only,
                clear_missing_traits=clear_missing_traits, delete_missing=delete_missing,
                max_delete_share=max_delete_share, dry_run=dry_run, format=fmt,
                delimiter=delimiter, on_progress=advance)
        except DeletionRefused as exc:
            result, refused = exc.result, str(exc)
        except (SyncError, SourceError) as exc:
            raise click.UsageError(str(exc)) from None
    _report_sync(source, result, as_json)
    if refused:
        raise Failure(refused)
    if result.rejected:
        sys.exit(EXIT_USAGE)


def _report_sync(source: str, result: Any, as_json: bool) -> None:
    if as_json:
        _print_json({"source": source, **result.as_dict()})
        return
    for rejection in result.rejections:
        where = f" ({rejection.field})" if rejection.field else ""
        _err(f"line {rejection.line}{where}: {rejection.error}")
    listed = result.rejected - len(result.rejections)
    if listed:
        _err(f"... and {listed:,} more rejected rows not listed")
    if result.missing:
        _err(f"{result.missing:,} of {result.synced_before:,} synced keys are missing from "
             f"{source}")
    if result.dry_run and result.deletion_refused:
        _err(f"the deletions would be refused: {result.deletion_refused}")
    verb = "would enqueue" if result.dry_run else "enqueued"
    click.echo(
        f"{source} (sync {result.name!r}, run {result.run!r}): {result.rows_read:,} rows, "
        f"{result.new:,} new, {result.changed:,} changed, {result.unchanged:,} unchanged, "
        f"{result.deleted:,} deleted, {result.rejected:,} rejected; {verb} "
        f"{result.new + result.changed + result.deleted:,}")
    if result.dry_run and result.sample:
        click.echo("sample:")
        for entry in result.sample:
            shown = json.dumps(entry.get("traits"), ensure_ascii=False) \
                if "traits" in entry else ""
            click.echo(f"  {entry['change']:<8} {entry['key']}  {shown}".rstrip())

def main() -> None:
    cli()
