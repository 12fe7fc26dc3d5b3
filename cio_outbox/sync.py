"""Recurring syncs: make Customer.io match a table, sending only what changed since last time.

>>> from cio_outbox import Outbox
>>> outbox = Outbox("nightly.db")
>>> result = outbox.sync("customers.csv", key="id")          # doctest: +SKIP
>>> result.new, result.changed, result.unchanged             # doctest: +SKIP
(12, 40, 999948)

Each row is a person (an identify call: ``userId`` is the key column, the traits are the
other columns, typed and renamed by :mod:`cio_outbox.columns` rules), or with
``objects=True`` an object of ``object_type_id`` (a group call, as
:meth:`Outbox.upsert_object` builds it).

For every key the outbox keeps, under the sync's name (default: the source's file name),
a fingerprint of the traits last enqueued (see :mod:`cio_outbox.storage.sync_state`). A
row is enqueued only when its key is new, its traits' fingerprint changed, or the key's
last message was dead-lettered. Each chunk of rows is one transaction that reads the stored
state, writes the new messages and the new fingerprints: a sync killed at any moment and
run again enqueues each change exactly once.

Most of a nightly export is what it was the night before, so rows are first recognized by
their bytes: each row (a CSV record or JSONL line as read, or a key and its fingerprint
for rows from Python) gets a 128-bit digest, consecutive rows are grouped into runs of
about 16 cut where a digest's low bits are zero, and a run stored by the last sync with
the same digests makes all its rows unchanged in one lookup, without parsing them. Only
the rows of runs not recognized are parsed and compared key by key (a row whose bytes
changed but whose values did not, as in a file written with other quoting, stays
unchanged). See :meth:`_Sync._recognize` and :mod:`cio_outbox.storage.sync_state`.

Messages go under the run label ``sync:<name>:<UTC time>`` (``status --run``), with
messageIds made from the name, the key and the key's message count.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import itertools
import json
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import mmh3

from cio_outbox.columns import (
    ColumnRule,
    MappingError,
    Plan,
    ValueProblem,
    parse_rules,
    plain,
    present,
)
from cio_outbox.messages import build
from cio_outbox.operations import object_anonymous_id
from cio_outbox.sources import (
    CHUNK_ROWS,
    Chunk,
    RawChunk,
    Source,
    SourceError,
    TextFile,
    open_source,
)
from cio_outbox.storage.base import NewRow
from cio_outbox.storage.sync_state import SyncTransaction
from cio_outbox.wire import MessageError, message_id_for

if TYPE_CHECKING:
    from cio_outbox.storage import Storage

DEFAULT_MAX_DELETE_SHARE = 0.05
"""``delete_missing`` refuses when more than this share of the synced keys would go."""
MAX_LISTED_REJECTIONS = 1000
SAMPLE_SIZE = 10
DELETE_CHUNK = 5_000
_TOMBSTONE = b""  # the fingerprint of a key whose deletion was enqueued
_DIGEST_VERSION = 1  # of how row digests are made: a new one makes every row compared again
_RUN = 16  # rows in a run, on average (a power of two)
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), default=str,
                            check_circular=False)

__all__ = ["DEFAULT_MAX_DELETE_SHARE", "DeletionRefused", "MappingError", "SourceError",
           "SyncError", "SyncRejection", "SyncResult", "sync"]


class SyncError(ValueError):
    """The sync cannot run as asked (key column, options); nothing was enqueued."""


class DeletionRefused(SyncError):
    """More keys would be deleted than ``max_delete_share`` allows; none were.

    ``result`` is the sync's result: the rows present were synced as usual."""

    def __init__(self, message: str, result: SyncResult) -> None:
        super().__init__(message)
        self.result = result


@dataclass(frozen=True, slots=True)
class SyncRejection:
    """A row that was not synced: its line (CSV, JSONL) or row number (counted from 1)."""

    line: int
    error: str
    field: str | None = None
    key: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"line": self.line, "key": self.key, "field": self.field, "error": self.error}


@dataclass
class SyncResult:
    """What a sync did (or, with ``dry_run``, would do)."""

    name: str
    run: str
    dry_run: bool = False
    rows_read: int = 0
    new: int = 0
    changed: int = 0
    unchanged: int = 0
    deleted: int = 0
    missing: int = 0
    synced_before: int = 0
    rejected: int = 0
    rejections: list[SyncRejection] = field(default_factory=list)
    sample: list[dict[str, Any]] = field(default_factory=list)
    deletion_refused: str | None = None

    @property
    def enqueued(self) -> int:
        return 0 if self.dry_run else self.new + self.changed + self.deleted

    def reject(self, rejection: SyncRejection) -> None:
        self.rejected += 1
        if len(self.rejections) < MAX_LISTED_REJECTIONS:
            self.rejections.append(rejection)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "run": self.run, "dry_run": self.dry_run,
            "rows_read": self.rows_read, "new": self.new, "changed": self.changed,
            "unchanged": self.unchanged, "deleted": self.deleted, "missing": self.missing,
            "synced_before": self.synced_before, "enqueued": self.enqueued,
            "rejected": self.rejected,
            "rejections": [r.as_dict() for r in self.rejections],
            "rejections_not_listed": self.rejected - len(self.rejections),
            "deletion_refused": self.deletion_refused, "sample": self.sample,
        }

    def _repr_html_(self) -> str:  # a readable cell output in notebooks
        what = "would enqueue" if self.dry_run else "enqueued"
        return (f"<b>{self.name}</b> ({self.run}): {self.rows_read:,} rows read, "
                f"<b>new</b> {self.new:,}, <b>changed</b> {self.changed:,}, "
                f"<b>unchanged</b> {self.unchanged:,}, <b>deleted</b> {self.deleted:,}, "
                f"<b>rejected</b> {self.rejected:,} "
                f"({what} {self.new + self.changed + self.deleted:,})")


_Row = tuple[int, str, dict[str, Any], bytes, Plan]  # line, key, raw, fingerprint, plan


class _Kind:
    """Person or object: how a key and its traits become a call, and how it is deleted."""

    def __init__(self, objects: bool, object_type_id: str | int | None) -> None:
        self.objects = objects
        if objects:
            if object_type_id is None:
                raise SyncError("an object sync needs object_type_id (--object-type-id N)")
            text = str(object_type_id).strip()
            if not text.isdigit() or int(text) < 1:
                raise SyncError(f"object_type_id must be a positive integer, "
                                f"not {object_type_id!r}")
            self.type_id = str(int(text))
            self.signature = f"group:{self.type_id}".encode()
        else:
            if object_type_id is not None:
                raise SyncError("object_type_id only applies to an object sync (objects=True)")
            self.type_id = ""
            self.signature = b"identify"

    def upsert(self, key: str, traits: dict[str, Any], message_id: str) -> Any:
        if self.objects:
            return build("group", {
                "anonymousId": object_anonymous_id(key, self.type_id), "groupId": key,
                "traits": {**traits, "object_type_id": self.type_id}, "messageId": message_id})
        return build("identify", {"userId": key, "traits": traits, "messageId": message_id})

    def delete(self, key: str, message_id: str) -> Any:
        if self.objects:
            return build("track", {
                "anonymousId": object_anonymous_id(key, self.type_id), "event": "Object Deleted",
                "properties": {"objectId": key, "objectTypeId": int(self.type_id)},
                "messageId": message_id})
        return build("track", {"userId": key, "event": "User Deleted", "messageId": message_id})


def _key_text(value: Any) -> str | None:
    if not present(value):
        return None
    value = plain(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    return text or None


# Positions in a state tuple (see sync_state.lookup); the digests come last, when asked for.
_ID, _RUN_AT, _DIGESTS = 4, 5, 6
_Run = tuple[int, int, int, tuple[int, int]]  # start, end, anchor, content digest


def _digests(state: tuple[Any, ...]) -> dict[str, str] | None:
    """The per-trait digests of a stored or just written state, if it carries them."""
    if len(state) <= _DIGESTS:
        return None
    value = state[_DIGESTS]
    return json.loads(value) if isinstance(value, str) else value  # type: ignore[no-any-return]


def _keys_named(payload: Any) -> list[str]:
    """The keys a sync message of ours may be about (see :class:`_Kind`)."""
    try:
        body = json.loads(payload)
    except (TypeError, ValueError):
        return []
    if not isinstance(body, dict):
        return []
    properties = body.get("properties")
    named = [body.get("userId"), body.get("groupId"),
             properties.get("objectId") if isinstance(properties, dict) else None]
    return [str(key) for key in named if key is not None]


def _digest(value: Any) -> str:
    return hashlib.blake2b(_ENCODER.encode(value).encode(), digest_size=6).hexdigest()


class _Preparer:
    """Rows of a chunk -> (key, traits, fingerprint), or rejections."""

    def __init__(self, key: str, rules: Sequence[ColumnRule], signature: bytes) -> None:
        self.key = key.strip()
        self.rules = rules
        self.signature = signature
        self._plans: dict[tuple[str, ...], tuple[Plan, int, bytes]] = {}

    def _plan(self, header: Sequence[str]) -> tuple[Plan, int, bytes]:
        cached = self._plans.get(tuple(header))
        if cached is None:
            names = [name.strip() for name in header]
            if self.key not in names:
                raise SyncError(f"the key column {self.key!r} is not in the source "
                                f"(columns: {', '.join(names)})")
            for rule in self.rules:
                if rule.column == self.key:
                    raise SyncError(f"column {rule.column!r} is the key; it cannot be mapped")
            plan = Plan(names, self.rules, exclude=[self.key])
            cached = (plan, names.index(self.key),
                      self.signature + plan.signature.encode() + b"\x00")
            if len(self._plans) > 1000:  # JSONL rows with ever new column sets
                self._plans.clear()
            self._plans[tuple(header)] = cached
        return cached

    def prepare(self, chunk: Chunk, reject: Callable[[SyncRejection], None]) -> list[_Row]:
        """(line, key, raw values, fingerprint, plan) for each row with a key.

        The fingerprint hashes the repr of the row's present values by trait name (in
        sorted order) under the plan's signature (the call kind and the trait types): as
        exact as the traits' JSON and much cheaper, as values are converted only for the
        rows that are sent (:meth:`Plan.convert`).
        """
        if chunk.text and chunk.header is not None:
            return self._prepare_text(chunk, reject)
        rows: list[_Row] = []
        blake2b = hashlib.blake2b
        fixed = self._plan(chunk.header) if chunk.header is not None else None
        for line, values in chunk.rows:
            if fixed is None:
                mapping: Mapping[str, Any] = values
                header = list(mapping)
                extra = [r.column for r in self.rules if r.column not in mapping]
                if self.key not in mapping:
                    extra.append(self.key)
                plan, key_index, signature = self._plan(header + extra)
                values = [mapping.get(name) for name in header + extra]
            else:
                plan, key_index, signature = fixed
            key = values[key_index]
            key = key.strip() if type(key) is str else _key_text(key)
            if not key:
                reject(SyncRejection(line, f"the key column {self.key!r} is empty", self.key))
                continue
            raw = plan.raw(values)
            fingerprint = blake2b(signature + repr(raw).encode(), digest_size=16).digest()
            rows.append((line, key, raw, fingerprint, plan))
        return rows

    def _prepare_text(self, chunk: Chunk, reject: Callable[[SyncRejection], None]
                      ) -> list[_Row]:
        """CSV rows: the fingerprint hashes the cells that feed traits (in trait-name order,
        empty cells included, so reordering columns changes nothing) under the plan's
        signature; the traits are built later, for the rows that are sent. A column added
        or removed changes every fingerprint, and so sends every row once."""
        assert chunk.header is not None
        plan, key_index, signature = self._plan(chunk.header)
        blake2b = hashlib.blake2b
        pick = plan.pick
        rows: list[_Row] = []
        for line, values in chunk.rows:
            key = values[key_index].strip()
            if not key:
                reject(SyncRejection(line, f"the key column {self.key!r} is empty", self.key))
                continue
            rows.append((line, key, values,  # type: ignore[arg-type]
                         blake2b(signature + repr(pick(values)).encode(),
                                 digest_size=16).digest(), plan))
        return rows


@dataclass
class _Outcome:
    """What one chunk's transaction decided (applied to the result after it commits)."""

    new: int = 0
    changed: int = 0
    unchanged: int = 0
    rejections: list[SyncRejection] = field(default_factory=list)
    sample: list[dict[str, Any]] = field(default_factory=list)
    seen_added: int = 0
    recognized: int = 0  # rows known by their digest alone
    read: int = 0  # rows read inside the transaction (records parsed there or recognized)
    unreadable: int = 0

    def reject(self, rejection: SyncRejection) -> None:
        self.rejections.append(rejection)


class _Sync:
    def __init__(self, storage: Storage, *, name: str, kind: _Kind, preparer: _Preparer,
                 changed_only: bool, clear_missing_traits: bool, track_seen: bool,
                 dry_run: bool, run: str) -> None:
        self.storage = storage
        self.name = name
        self.kind = kind
        self.preparer = preparer
        self.changed_only = changed_only
        self.clear_missing = clear_missing_traits
        self.track_seen = track_seen
        self.dry_run = dry_run
        self.run = run
        self.failed: set[str] = set()  # messageIds dead-lettered
        self.failed_keys: set[int] = set()  # key ids whose last message is one of them

    def transaction(self, body: Callable[[SyncTransaction], Any]) -> Any:
        return self.storage.sync_transaction(
            body, write=not self.dry_run)

    def message_id(self, key: str, version: int) -> str:
        return message_id_for(_ENCODER.encode(["sync", self.name, key, version]))

    def chunk(self, lines: Sequence[int], digests: Sequence[tuple[int, int]],
              parse: Callable[[Sequence[int], _Outcome], list[_Row]],
              sample_room: int) -> _Outcome:
        """One chunk in one transaction. ``digests[i]`` identifies the chunk's row ``i``
        (at ``lines[i]``; its bytes, or its key and fingerprint); rows of runs that
        ``sync_runs`` knows (see :meth:`_recognize`) are unchanged without being read;
        ``parse(indices, outcome)`` gives the others as rows (their rejections into
        ``outcome``), which are compared key by key."""
        from cio_outbox.storage import sync_state as sql

        def body(tx: SyncTransaction) -> _Outcome:
            outcome = _Outcome()
            db, d = tx.db, tx.dialect
            # ids[i]: the key id of row i if it is recognized as unchanged, else None.
            ids, runs, slow = self._recognize(db, d, digests)
            rows = parse(slow, outcome) if slow else []
            with_digests = self.changed_only or self.clear_missing
            stored = sql.lookup(db, d, self.name, list({row[1] for row in rows}),
                                digests=with_digests) if rows else {}
            if stored:
                # A key met both ways in one chunk is compared row by row, in order.
                again = {state[_ID] for state in stored.values()}
                if not again.isdisjoint(ids):
                    demoted = [index for index, key_id in enumerate(ids) if key_id in again]
                    for index in demoted:
                        ids[index] = None
                    slow = sorted(slow + demoted)
                    rows = sorted(rows + parse(demoted, outcome), key=lambda row: row[0])
            outcome.unchanged = outcome.recognized = len(digests) - len(slow)
            written: dict[str, tuple[Any, ...]] = {}
            final: dict[str, int] = {}  # key -> row index that its state now matches
            new_rows: list[NewRow] = []
            saves: list[tuple[str, bytes, dict[str, str], int, str]] = []
            failed_ids = self.failed
            position = {lines[index]: index for index in slow}
            for line, key, raw, fingerprint, plan in rows:
                index = position[line]
                before = written.get(key) or stored.get(key)
                if before is not None and before[1] == fingerprint and \
                        before[3] not in failed_ids:
                    outcome.unchanged += 1
                    final[key] = index
                    continue
                try:
                    row_traits = plan.convert(raw if type(raw) is dict else plan.raw_text(raw))
                except ValueProblem as exc:
                    outcome.rejections.append(SyncRejection(line, str(exc), exc.field, key))
                    continue
                fresh = before is None or not before[1]  # never synced, or deleted
                failed = before is not None and before[3] in failed_ids
                old_digests = _digests(before) if before is not None else None
                digests_now = {name: _digest(value) for name, value in row_traits.items()}
                traits = self._traits_to_send(row_traits, digests_now,
                                              None if fresh or failed else old_digests)
                if self.clear_missing and old_digests:
                    for name in old_digests:
                        if name not in row_traits:
                            traits[name] = None
                version = (before[2] if before is not None else 0) + 1
                message_id = self.message_id(key, version)
                try:
                    message = self.kind.upsert(key, traits, message_id)
                    payload, size = message.encode()
                except MessageError as exc:
                    outcome.rejections.append(SyncRejection(line, str(exc), exc.field, key))
                    continue
                if fresh:
                    outcome.new += 1
                else:
                    outcome.changed += 1
                if len(outcome.sample) < sample_room:
                    outcome.sample.append({
                        "key": key, "change": "new" if fresh else "changed",
                        "line": line, "messageId": message_id, "traits": traits})
                new_rows.append(NewRow(message_id, self.run, message.call_type,
                                       message.person, payload, size))
                saves.append((key, fingerprint, digests_now, version, message_id))
                written[key] = (key, fingerprint, version, message_id, None, None,
                                digests_now)
                final[key] = index
            if not self.dry_run:
                tx.insert(new_rows)
                sql.save(db, d, self.name, saves, _now())
                fresh_ids = sql.key_ids(db, d, self.name,
                                        [key for key in final if key not in stored])
                # A run is kept only while each of its rows is its key's state: the runs
                # of the keys that changed go, and the runs not recognized whose rows all
                # are their keys' state now are added (next time one lookup says the whole
                # run is unchanged).
                drop = {stored[key][_RUN_AT] for key, *_ in saves if key in stored}
                pointer: dict[int, int | None] = {}  # row index -> its key's run now
                for key, index in final.items():
                    state = stored.get(key)
                    ids[index] = state[_ID] if state is not None else fresh_ids[key]
                    pointer[index] = state[_RUN_AT] if state is not None else None
                new_runs = []
                repoint = []
                for start, end, anchor, content in runs:
                    members = ids[start:end]
                    if None in members or len(set(members)) != len(members):
                        continue
                    new_runs.append((anchor, content, members,
                                     [digests[index][0] for index in range(start, end)]))
                    for index in range(start, end):
                        was = pointer.get(index, anchor)
                        if was != anchor:
                            repoint.append((anchor, ids[index]))
                            drop.add(was)
                drop.discard(None)
                sql.remember_runs(db, d, sorted(drop), new_runs, repoint)
            if self.track_seen:
                # Every key present is seen, a row of it refused for a bad value too.
                seen_ids = {key_id for key_id in ids if key_id is not None}
                seen_ids.update(state[_ID] for state in stored.values())
                outcome.seen_added = sql.seen_add(db, d, sorted(seen_ids))
            return outcome

        return self.transaction(body)  # type: ignore[no-any-return]

    def _recognize(self, db: Any, d: Any, digests: Sequence[tuple[int, int]]
                   ) -> tuple[list[int | None], list[_Run], list[int]]:
        """The key id of each row recognized as unchanged (else None), the runs of the
        chunk that were not recognized, and the rows not recognized.

        Rows are grouped into runs that end where a row's digest has its low bits zero
        (about ``_RUN`` rows; cut by content, so a row added, removed or changed changes
        only its own run). A run is stored under the digest of its first row with the
        digest of all its rows, its keys' ids and its rows' digests: found with the same
        content, its rows are unchanged, all of them in one lookup; found with another
        content (a row of it changed), those of its rows found in it are unchanged; the
        other rows are compared key by key."""
        from cio_outbox.storage import sync_state as sql

        count = len(digests)
        if not count:
            return [], [], []
        mask = _RUN - 1
        ends = [index + 1 for index, (head, _) in enumerate(digests) if not head & mask]
        if not ends or ends[-1] != count:
            ends.append(count)
        starts = [0, *ends[:-1]]
        hash64 = mmh3.hash64
        flat = array("q", itertools.chain.from_iterable(digests)).tobytes()
        contents = [hash64(flat[start * 16:end * 16], signed=True)
                    for start, end in zip(starts, ends, strict=True)]
        anchors = [digests[start][0] for start in starts]
        found = sql.recognized_runs(db, d, anchors)
        ids: list[int | None] = [None] * count
        failed_keys = self.failed_keys
        slow: list[int] = []
        runs: list[_Run] = []
        for start, end, anchor, content in zip(starts, ends, anchors, contents, strict=True):
            hit = found.get(anchor)
            if hit is None:
                slow.extend(range(start, end))
            elif hit[0] == content and len(hit[1]) == end - start and (
                    not failed_keys or failed_keys.isdisjoint(hit[1])):
                ids[start:end] = hit[1]
                continue
            else:  # the run under this anchor changed: its other rows are still known
                members = dict(zip(hit[2], hit[1], strict=True))
                for index in range(start, end):
                    key_id = members.get(digests[index][0])
                    if key_id is not None and key_id not in failed_keys:
                        ids[index] = key_id
                    else:
                        slow.append(index)
            runs.append((start, end, anchor, content))
        return ids, runs, slow

    def outcomes(self, table: Source, size: int) -> Iterator[_Outcome]:
        """The outcome of each chunk, once it is committed."""
        if isinstance(table, TextFile):
            yield from self._run_records(table, size)
            return
        prefix = self._prefix(b"values")
        hash64 = mmh3.hash64
        for chunk in table.chunks(size):
            early = _Outcome(read=len(chunk.rows) + len(chunk.problems),
                             unreadable=len(chunk.problems))
            for line, problem in chunk.problems:
                early.reject(SyncRejection(line, problem))
            rows = self.preparer.prepare(chunk, early.reject)
            digests = [hash64(prefix + row[3] + row[1].encode("utf-8", "surrogatepass"),
                              signed=True) for row in rows]

            def parse(indices: Sequence[int], _: _Outcome,
                      rows: list[_Row] = rows) -> list[_Row]:
                return [rows[index] for index in indices]

            outcome = self.chunk([row[0] for row in rows], digests, parse, SAMPLE_SIZE)
            outcome.read += early.read
            outcome.unreadable += early.unreadable
            outcome.rejections.extend(early.rejections)
            yield outcome

    def _run_records(self, table: TextFile, size: int) -> Iterator[_Outcome]:
        hash64 = mmh3.hash64
        prefix = b""
        signature = None
        for raw in table.records(size):
            if raw.signature != signature:
                signature = raw.signature
                prefix = self._prefix(b"records\x00" + signature)
            digests = [hash64(prefix + data, signed=True) for data in raw.records]

            def parse(indices: Sequence[int], outcome: _Outcome,
                      raw: RawChunk = raw) -> list[_Row]:
                chunk = table.parse(raw, indices)
                outcome.read += len(chunk.rows) + len(chunk.problems)
                outcome.unreadable += len(chunk.problems)
                for line, problem in chunk.problems:
                    outcome.reject(SyncRejection(line, problem))
                return self.preparer.prepare(chunk, outcome.reject)

            outcome = self.chunk(raw.lines, digests, parse, SAMPLE_SIZE)
            outcome.read += outcome.recognized
            yield outcome

    def _prefix(self, what: bytes) -> bytes:
        """The key of the row digests: everything besides a row that decides its traits
        (the sync's name, the kind of call, the key column and the mapping rules)."""
        material = _ENCODER.encode([_DIGEST_VERSION, self.name, self.kind.signature.decode(),
                                    self.preparer.key, repr(self.preparer.rules)])
        return hashlib.blake2b(material.encode("utf-8", "surrogatepass") + b"\x00" + what,
                               digest_size=16).digest()

    def _traits_to_send(self, traits: dict[str, Any], digests: dict[str, str],
                        before: dict[str, str] | None) -> dict[str, Any]:
        if not self.changed_only or before is None:
            return dict(traits)
        return {name: value for name, value in traits.items()
                if before.get(name) != digests[name]}

    def deletions(self, result: SyncResult, seen_total: int, max_share: float,
                  unreadable: int) -> None:
        from cio_outbox.storage import sync_state as sql

        def count(tx: SyncTransaction) -> int:
            if sql.seen_count(tx.db, tx.dialect) != seen_total:
                raise SyncError("the list of keys seen by this sync was lost (the database "
                                "connection dropped?); nothing was deleted: run it again")
            return sql.missing_count(tx.db, tx.dialect, self.name)

        result.missing = self.storage.sync_transaction(count, write=False)
        if not result.missing:
            return
        if unreadable:
            # Their keys are unknown: one of them may be a "missing" key.
            result.deletion_refused = (
                f"{unreadable:,} row(s) could not be read, so their keys are unknown and "
                f"the {result.missing:,} missing key(s) may include them; nothing was "
                "deleted: fix those rows and sync again")
            if self.dry_run:
                return
            raise DeletionRefused(result.deletion_refused, result)
        share = result.missing / max(result.synced_before, 1)
        if share > max_share:
            result.deletion_refused = (
                f"{result.missing:,} of {result.synced_before:,} synced keys "
                f"({share:.1%}) are missing from the source, more than the "
                f"{max_share:.1%} allowed; nothing was deleted (allow it with "
                f"max_delete_share / --max-delete-share)")
            if self.dry_run:  # says so, as the real run would, without failing
                return
            raise DeletionRefused(result.deletion_refused, result)
        after = ""
        while True:
            def body(tx: SyncTransaction, after: str = after) -> tuple[int, str, list[Any]]:
                gone = sql.missing(tx.db, tx.dialect, self.name, DELETE_CHUNK, after=after)
                rows: list[NewRow] = []
                saves = []
                sample = []
                for state in gone:
                    version = state.version + 1
                    message_id = self.message_id(state.key, version)
                    message = self.kind.delete(state.key, message_id)
                    payload, size = message.encode()
                    rows.append(NewRow(message_id, self.run, message.call_type,
                                       message.person, payload, size))
                    saves.append((state.key, _TOMBSTONE, {}, version, message_id))
                    if len(sample) < SAMPLE_SIZE:
                        sample.append({"key": state.key, "change": "deleted",
                                       "line": None, "messageId": message_id})
                if not self.dry_run:
                    tx.insert(rows)
                    sql.save(tx.db, tx.dialect, self.name, saves, _now())
                    sql.forget_runs(tx.db, tx.dialect, [state.id for state in gone])
                return len(gone), gone[-1].key if gone else after, sample

            done, after, sample = self.transaction(body)
            result.deleted += done
            result.sample.extend(sample[:max(0, SAMPLE_SIZE * 2 - len(result.sample))])
            if done < DELETE_CHUNK:
                return


def _now() -> float:
    return _dt.datetime.now(_dt.UTC).timestamp()


def run_label(name: str, at: _dt.datetime | None = None) -> str:
    """``sync:<name>:<UTC time to the millisecond>``, the run a sync's messages go under."""
    at = at or _dt.datetime.now(_dt.UTC)
    return f"sync:{name}:{at.strftime('%Y-%m-%dT%H:%M:%S')}.{at.microsecond // 1000:03d}Z"


def _fresh_label(storage: Storage, name: str) -> str:
    """A run label no earlier run used (two syncs can start within a millisecond)."""
    label = run_label(name)
    suffix = 1
    candidate = label
    while sum(storage.counts(candidate).values()):
        suffix += 1
        candidate = f"{label}-{suffix}"
    return candidate


def _rules(mapping: Iterable[str | ColumnRule] | Mapping[str, str] | None) -> list[ColumnRule]:
    if mapping is None:
        return []
    if isinstance(mapping, Mapping):
        texts: list[str | ColumnRule] = [f"{column}={target}"
                                         for column, target in mapping.items()]
    elif isinstance(mapping, str):
        texts = [mapping]
    else:
        texts = list(mapping)
    rules = [item for item in texts if isinstance(item, ColumnRule)]
    rules += parse_rules([item for item in texts if isinstance(item, str)])
    return rules


def sync(
    storage: Storage,
    source: Any,
    *,
    key: str,
    name: str | None = None,
    objects: bool = False,
    object_type_id: str | int | None = None,
    mapping: Iterable[str | ColumnRule] | Mapping[str, str] | None = None,
    changed_only: bool = False,
    clear_missing_traits: bool = False,
    delete_missing: bool = False,
    max_delete_share: float = DEFAULT_MAX_DELETE_SHARE,
    dry_run: bool = False,
    format: str | None = None,
    delimiter: str = ",",
    chunk_rows: int = CHUNK_ROWS,
    on_progress: Callable[[SyncResult, Source], None] | None = None,
) -> SyncResult:
    """Sync a table into the outbox; see :meth:`cio_outbox.Outbox.sync`."""
    if not key or not str(key).strip():
        raise SyncError("name the key column (key=...)")
    if not 0 <= max_delete_share <= 1:
        raise SyncError(f"max_delete_share must be between 0 and 1, not {max_delete_share}")
    if chunk_rows < 1:
        raise SyncError("chunk_rows must be at least 1")
    kind = _Kind(objects, object_type_id)
    try:
        rules = _rules(mapping)
    except MappingError as exc:
        raise SyncError(str(exc)) from None
    table = open_source(source, format=format, name=name, delimiter=delimiter)
    name = name or table.name
    if not name or name in ("dataframe", "table", "rows"):
        raise SyncError("rows from Python have no file name: give the sync a name (name=...)")
    run = _fresh_label(storage, name)
    result = SyncResult(name=name, run=run, dry_run=dry_run)
    engine = _Sync(storage, name=name, kind=kind, preparer=_Preparer(key, rules,
                                                                     kind.signature),
                   changed_only=changed_only, clear_missing_traits=clear_missing_traits,
                   track_seen=delete_missing, dry_run=dry_run, run=run)
    from cio_outbox.storage import sync_state as sql

    def start(tx: SyncTransaction) -> tuple[set[str], set[int], int]:
        if delete_missing:
            sql.seen_reset(tx.db, tx.dialect)
        failed = sql.failed_messages(tx.db, tx.dialect, f"sync:{name}:")
        ids = {mid for mid, _ in failed}
        # Keys whose last message is one of these: their rows are compared, not recognized.
        keys = {key for _, payload in failed for key in _keys_named(payload)}
        states = sql.lookup(tx.db, tx.dialect, name, sorted(keys))
        failed_keys = {state[_ID] for state in states.values() if state[3] in ids}
        return ids, failed_keys, sql.stored_count(tx.db, tx.dialect, name)

    engine.failed, engine.failed_keys, result.synced_before = storage.sync_transaction(
        start, write=False)
    seen_total = 0
    unreadable = 0
    room = SAMPLE_SIZE - len(result.sample)
    try:
        for outcome in engine.outcomes(table, chunk_rows):
            seen_total += outcome.seen_added
            unreadable += outcome.unreadable
            result.rows_read += outcome.read
            result.new += outcome.new
            result.changed += outcome.changed
            result.unchanged += outcome.unchanged
            for rejection in sorted(outcome.rejections, key=lambda r: r.line):
                result.reject(rejection)
            room = SAMPLE_SIZE - len(result.sample)
            result.sample.extend(outcome.sample[:max(room, 0)])
            if on_progress is not None:
                on_progress(result, table)
    except MappingError as exc:
        raise SyncError(str(exc)) from None
    result.rejections.sort(key=lambda r: r.line)
    if delete_missing:
        engine.deletions(result, seen_total, max_delete_share, unreadable)
    return result
