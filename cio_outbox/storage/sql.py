"""What both SQL outboxes do, written once: the backends supply only hooks.

:class:`SQLStorage` implements the :class:`~cio_outbox.storage.base.Storage` protocol
over a DB-API cursor. Queries are written once, below, with ``?`` placeholders and these
fields, which :meth:`SQLStorage.q` fills in for the dialect:

- ``{s}``: the table prefix; ``{ids}``: "id is in the id list of this parameter";
- ``{now}``: the database's clock in Unix seconds (``{clock}``: its reading at this
  statement, for claims that waited for a lock); ``{json}``: the JSON type;
- ``{pending_run}``, ``{lane_pending}``: SQLite's index hints for a run's and a lane's
  pending rows in id order (nothing elsewhere);
  ``{lanes}``: "lane is in the list of this parameter";
- ``{previous_id}``: an alias payload's ``previousId``.

A backend provides the connection (``_tx`` runs a body in one write transaction,
``_read`` runs a query outside one), the bulk insert, claim locking, the two statements
that move or delete rows while reporting what they moved (a status change must keep
the per-run counts exact), vacuum and error translation.
"""

from __future__ import annotations

import heapq
import json
import re
import secrets
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import suppress
from itertools import islice, starmap
from typing import Any, ClassVar, TypeVar

from cio_outbox.batch import select
from cio_outbox.storage.base import CHUNK_ROWS, Attempt, NewRow, Row, in_ranges, row_ranges
from cio_outbox.storage.lanes import lane_of, lanes_per_claim

T = TypeVar("T")
Deltas = dict[tuple[str, str], int]
Moved = list[tuple[str, str, int]]  # (run, old status, rows)

# In the order of Row's fields (message_id and payload are read once rows are leased),
# so that a page of candidates becomes Rows without a Python loop per row.
_CANDIDATES = "SELECT id, '', run, call_type, person, '', size, attempts FROM {s}messages"
CANDIDATE_PAGE_SIZE = 1000
CANDIDATE_PAGES = 20  # bounded: never read far inside a claim
FIRST_PAGE_MIN = 16

_EXPIRED = "status = 'in_flight' AND lease_expires_at < ?"
# A lane is busy while a row of it is in flight or waits for its retry time.
_IN_FLIGHT = "SELECT 1 FROM {s}messages b WHERE b.status = 'in_flight' AND b.lane = l.lane"
_DEFERRED = (
    "SELECT 1 FROM {s}messages b WHERE b.status = 'pending' AND b.lane = l.lane"
    " AND b.next_attempt_at IS NOT NULL AND b.next_attempt_at > ?"
)
_HEAD = "SELECT %s FROM {s}messages h WHERE h.status = 'pending' AND h.lane = l.lane%s"
# A lane's oldest pending row, read from the lane's index (PostgreSQL would otherwise walk
# the pending index from its start, over every dead entry the drain has left behind).
_LANE_HEAD = _HEAD % ("h.id", "%s") + " ORDER BY h.id LIMIT 1"
# The free lanes with pending rows and their heads, oldest head first, read without locks
# (PostgreSQL locks only the lanes a claim keeps, in its _keep_lanes).
_FREE_LANES = (
    "SELECT l.lane, (" + _LANE_HEAD + ") AS head FROM {s}lanes l"
    " WHERE (" + _LANE_HEAD + ") IS NOT NULL"
    " AND NOT EXISTS (" + _IN_FLIGHT + ") AND NOT EXISTS (" + _DEFERRED + ")"
    " ORDER BY head LIMIT ?"
)
# Read before a claim's write transaction: is there anything to take (a free lane with
# pending rows, or a lease that ran out)? Senders that find nothing then take no write lock.
_ANYTHING = (
    "SELECT 1 FROM {s}lanes l WHERE EXISTS (" + _HEAD % ("1", "%s") + ")"
    " AND NOT EXISTS (" + _IN_FLIGHT + ") AND NOT EXISTS ("
    + _DEFERRED.replace("?", "{now}") + ")"
    " UNION ALL SELECT 1 FROM {s}messages WHERE status = 'in_flight'"
    " AND lease_expires_at < {now} LIMIT 1"
)
# Rechecked once the lanes are ours: a claim that committed after the statement above
# took its snapshot may have made one busy (PostgreSQL; SQLite holds the write lock).
_BUSY = (
    "SELECT lane FROM {s}messages WHERE status = 'in_flight' AND {lanes}"
    " UNION SELECT lane FROM {s}messages WHERE status = 'pending'"
    " AND next_attempt_at IS NOT NULL AND next_attempt_at > ? AND {lanes}"
)
# All free lanes at once: a run's pending rows in enqueue order, skipping busy lanes'
# rows, so an uncontended claim takes a run of consecutive ids as before lanes (few pages
# written). Several runs are read this way each and merged by id.
_SCAN_ROWS = (
    _CANDIDATES + " {pending_run} WHERE status = 'pending' AND run = ? AND {lanes}"
    " AND id > ? ORDER BY run, id LIMIT ?"
)
# The runs with pending rows (the counts are exact, in the same transaction as each change).
_PENDING_RUNS = "SELECT run FROM {s}counts WHERE status = 'pending' AND n > 0 ORDER BY run"
# The oldest pending row: the oldest of the runs' heads.
_OLDEST = (
    "SELECT created_at FROM {s}messages WHERE id = (SELECT min((SELECT m.id FROM {s}messages"
    " m {pending_run} WHERE m.status = 'pending' AND m.run = c.run ORDER BY m.run, m.id"
    " LIMIT 1)) FROM {s}counts c WHERE c.status = 'pending' AND c.n > 0)"
)
# Claimants whose last claim found no free lane, while rows were pending: the free lanes
# of the next claims are shared with them (a claim that got rows removes its entry).
_WAITING = "SELECT count(*) FROM {s}claimants WHERE worker_id != ? AND waiting_since > ?"
_WAIT = (
    "INSERT INTO {s}claimants AS c (worker_id, waiting_since) VALUES (?, ?)"
    " ON CONFLICT (worker_id) DO UPDATE SET waiting_since = excluded.waiting_since"
)
_SERVED = "DELETE FROM {s}claimants WHERE worker_id = ?"
_HELD_BY_OTHERS = (
    "SELECT 1 FROM {s}messages WHERE status = 'in_flight' AND worker_id != ? LIMIT 1"
)
#: How long a claim that found nothing counts as a claimant waiting for lanes.
WAITING_SECONDS = 5.0
_LANE_ROWS = (
    _CANDIDATES + " {lane_pending} WHERE status = 'pending' AND lane = ?%s AND id > ?"
    " ORDER BY id LIMIT ?"
)
_LEASE = (
    "UPDATE {s}messages SET status = 'in_flight', worker_id = ?, lease_expires_at = ?,"
    " next_attempt_at = NULL, updated_at = ?, claim_token = ? WHERE {ids}"
)
_PAYLOADS = "SELECT id, message_id, payload FROM {s}messages WHERE {ids} ORDER BY id"
_FENCED = (
    "UPDATE {s}messages SET %s"
    " WHERE status = 'in_flight' AND claim_token = ? AND {ids} RETURNING id, run"
)
_SENT = (
    "sent_at = {now}, worker_id = NULL, lease_expires_at = NULL, next_attempt_at = NULL,"
    " last_error = NULL"
)
_DROP_LEASE = "worker_id = NULL, lease_expires_at = NULL, updated_at = {now}"
_AUDIT = (
    "INSERT INTO {s}attempts (at, worker_id, endpoint, runs, messages, bytes, status_code,"
    " latency_ms, outcome, error, row_ranges, min_row_id, max_row_id) VALUES ({now}, ?, ?,"
    " CAST(? AS {json}), ?, ?, ?, ?, ?, ?, CAST(? AS {json}), ?, ?) RETURNING id"
)
_AUDIT_RUN = "INSERT INTO {s}attempt_runs (run, attempt_id) VALUES (?, ?) ON CONFLICT DO NOTHING"
_SHIFT = (
    "INSERT INTO {s}counts AS c (run, status, n) VALUES (?, ?, ?)"
    " ON CONFLICT (run, status) DO UPDATE SET n = c.n + excluded.n"
)
_BY_RUN = " JOIN {s}attempt_runs r ON r.attempt_id = a.id WHERE r.run = ? AND"
_FORGET = "person = ? OR (call_type = 'alias' AND {previous_id} = ?)"
_REDACT = {
    "attempts": "error",
    "messages": "last_error",
}


def _pages(cur: Any, sql: str, key: tuple[Any, ...], after: int, size: int,
           budget: list[int]) -> Iterator[tuple[Any, ...]]:
    """Rows of a candidate query (parameters: ``key``, then the id to read after and a page
    size) in id order, a page at a time (pages double up to CANDIDATE_PAGE_SIZE), lazily,
    while the claim's shared ``budget`` of rows read lasts."""
    while budget[0] > 0:
        size = min(size, budget[0])
        page = cur.execute(sql, (*key, after, size)).fetchall()
        budget[0] -= len(page) or 1
        yield from page
        if len(page) < size:
            return
        after = page[-1][0]
        size = min(CANDIDATE_PAGE_SIZE, size * 2)


def _token_pattern(value: str) -> re.Pattern[str]:
    """The value as a whole token: not inside a longer word or number ("4" in "400")."""
    return re.compile(r"(?<![0-9A-Za-z_])" + re.escape(value) + r"(?![0-9A-Za-z_])")


def redact(text: str, value: str) -> str:
    """Text with every whole-token occurrence of value replaced by ``[forgotten]``."""
    return _token_pattern(value).sub("[forgotten]", text)


def with_thread_connection(
    entries: list[tuple[threading.Thread, Any]], conn: Any,
    closed: Callable[[Any], bool] = lambda conn: False,
) -> list[tuple[threading.Thread, Any]]:
    """The (thread, connection) pairs of a storage with ``conn`` added for the calling
    thread, and the connections of threads that ended (or ``closed`` ones) closed and
    dropped: each thread gets a connection of its own and a worker starts senders per
    run, so a long-lived process would otherwise pile them up."""
    alive = []
    for thread, other in entries:
        if thread.is_alive() and not closed(other):
            alive.append((thread, other))
        else:
            with suppress(Exception):
                other.close()
    alive.append((threading.current_thread(), conn))
    return alive


class SQLStorage:
    """The outbox over SQL. Subclasses set the class fields and implement the hooks."""

    location: str
    prefix: str = ""
    placeholder: ClassVar[str] = "?"
    #: The read before a claim's transaction (a dialect may phrase it for its planner).
    _anything_sql: ClassVar[str] = _ANYTHING
    #: The fenced change of claimed rows (a dialect may phrase it for its planner).
    _fenced_sql: ClassVar[str] = _FENCED
    fields: ClassVar[dict[str, str]] = {}

    # -- hooks -------------------------------------------------------------------------

    def _tx(self, body: Callable[[Any], T]) -> T:
        """Run body(cursor) in one write transaction and return what it returns."""
        raise NotImplementedError

    def _read(self, sql: str, params: Sequence[Any] = (), *, tuples: bool = False
              ) -> list[Any]:
        """Rows of an already rendered query outside a write transaction, as dicts (as
        tuples with tuples=True, for many rows: much cheaper)."""
        raise NotImplementedError

    def _id_list(self, ids: Sequence[int]) -> Any:
        """The parameter that ``{ids}`` reads."""
        raise NotImplementedError

    def _insert_chunk(self, cur: Any, chunk: list[NewRow]) -> Deltas:
        """Insert rows, skipping existing message ids; the pending rows added per run."""
        raise NotImplementedError

    def _lock_claims(self, cur: Any) -> None:
        """Anything a claim must lock first (SQLite's write lock is taken by BEGIN
        IMMEDIATE; PostgreSQL locks the lanes it keeps, in _keep_lanes)."""

    def _keep_lanes(self, cur: Any, free: list[tuple[int, int]], take: int, now: float
                    ) -> list[tuple[int, int]]:
        """The lanes of ``free`` (oldest head first) this claim keeps: the first ``take``
        (SQLite holds the write lock; PostgreSQL locks only these, skipping lanes another
        claim holds, so that the lanes it leaves are free for other claims at once)."""
        return free[:take]

    def _lease_chosen(self, cur: Any, chosen: list[Row], lease: tuple[Any, ...]
                      ) -> list[Row]:
        """Lease the chosen rows this claim may take (``lease``: worker id, lease expiry,
        now, claim token); those rows, in id order. A backend may also fill in their
        message ids and payloads (PostgreSQL returns them from the lease itself)."""
        chosen = self._lock_chosen(cur, chosen)
        if chosen:
            chosen.sort(key=lambda r: r.id)
            sql, ids = self._by_ids(_LEASE, [r.id for r in chosen])
            cur.execute(sql, (*lease, *ids))
        return chosen

    def _lock_chosen(self, cur: Any, chosen: list[Row]) -> list[Row]:
        """The chosen rows this claim may lease (PostgreSQL skips rows locked elsewhere)."""
        return chosen

    def _move(self, cur: Any, where: str, params: Sequence[Any], new_status: str,
              assignments: str, assignment_params: Sequence[Any]) -> Moved:
        """Set status and assignments on rows matching where (rendered) that are not in
        new_status yet; return (run, old status, count) of what moved."""
        raise NotImplementedError

    def _delete(self, cur: Any, where: str, params: Sequence[Any]) -> Moved:
        """Delete the rows matching where (rendered); (run, status, count) of them."""
        raise NotImplementedError

    def vacuum(self) -> list[int]:
        """Rewrite the storage so that deleted rows leave no trace. Returns the process ids
        of other clients whose open transactions kept deleted rows in it (none: no trace)."""
        raise NotImplementedError

    def _read_tx(self, body: Callable[[Any], T]) -> T:
        """A transaction that reads consistently and may write only temporary tables
        (SQLite takes no write lock for it); by default a write transaction."""
        return self._tx(body)

    def _sync_dialect(self) -> Any:
        """The SQL of :mod:`cio_outbox.storage.sync_state` for this dialect."""
        raise NotImplementedError

    # -- queries -----------------------------------------------------------------------

    _rendered: dict[str, str]

    def q(self, sql: str) -> str:
        """A query of this module with the dialect's fields and placeholders."""
        cache = self.__dict__.setdefault("_rendered", {})
        text = cache.get(sql)
        if text is None:
            text = sql
            for name, value in (("s", self.prefix), *self.fields.items()):
                text = text.replace("{" + name + "}", value)
            if self.placeholder != "?":
                text = text.replace("?", self.placeholder)
            cache[sql] = text
        return text

    def _by_ids(self, sql: str, ids: Sequence[int]) -> tuple[str, tuple[Any, ...]]:
        """A query of this module whose ``{ids}`` (its last parameter) is these ids, and
        its id parameters: a range when the ids are consecutive, as a lone claim's usually
        are (a range scan; a list is one lookup per id, about twice the cost), else the
        dialect's id list."""
        ordered = sorted(set(ids))
        if ordered and ordered[-1] - ordered[0] == len(ordered) - 1:
            return self.q(sql.replace("{ids}", "id BETWEEN ? AND ?")), (ordered[0],
                                                                         ordered[-1])
        return self.q(sql), (self._id_list(ordered),)

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        return self._read(self.q(sql), params)

    # -- enqueue -----------------------------------------------------------------------

    def insert(self, rows: Iterable[NewRow], *, chunk_size: int = CHUNK_ROWS) -> int:
        added = 0
        iterator = iter(rows)
        while chunk := list(islice(iterator, chunk_size)):

            def body(cur: Any, chunk: list[NewRow] = chunk) -> int:
                deltas = self._insert_chunk(cur, chunk)
                self._shift(cur, deltas)
                return sum(deltas.values())

            added += self._tx(body)
        if added:
            self._signal()
        return added

    # -- claims ------------------------------------------------------------------------

    def claim(self, worker_id: str, *, lease_seconds: float, max_bytes: int,
              max_messages: int, run: str | None = None, share: int = 1) -> list[Row]:
        """The next rows of free lanes (nothing of the lane in flight or deferred), merged
        in enqueue order, as :func:`~cio_outbox.batch.select` fits them into one request.

        Lanes split the work only when others want rows: ``share`` is how many claimants
        of the caller want rows now (its senders, this one included), and every other
        worker whose claim found no free lane in the last :data:`WAITING_SECONDS` counts
        as one more; a claim takes the first ``1 / share`` of the free lanes, oldest head
        first (at least ``lanes // 8`` of them when there are so many). Alone, a claim
        takes every free lane: a run of consecutive ids, as cheap to write as before
        lanes."""
        token = secrets.token_hex(8)
        run_filter, run_args = ("", ()) if run is None else (" AND h.run = ?", (run,))
        if not self._read(self.q(self._anything_sql % run_filter), run_args, tuples=True):
            noted = self.__dict__.get("_waiting_as", {}).get(worker_id)
            # Read first whether another worker holds rows: a worker whose own senders hold
            # every busy lane (concurrency 4 into a fast server) then takes no write lock.
            if (noted is None or time.monotonic() - noted > WAITING_SECONDS / 2) and \
                    self._claimant_to_note(worker_id, run):
                self._tx(lambda cur: self._note_claimant(
                    cur, worker_id, cur.execute(self.q("SELECT {clock}")).fetchone()[0],
                    False, run))
            return []

        def body(cur: Any) -> list[Row]:
            self._lock_claims(cur)
            now = cur.execute(self.q("SELECT {clock}")).fetchone()[0]
            deltas: Deltas = defaultdict(int)
            # Rows leased by a worker that died come back once their lease has expired.
            if self._transition(cur, deltas, _EXPIRED, (now,), "pending", _DROP_LEASE, ()):
                # Counted now: the scan below finds the runs with pending rows in counts.
                self._shift(cur, deltas)
                deltas.clear()
            free = self._free_lanes(cur, now, run)
            claimants = max(1, share) + cur.execute(
                self.q(_WAITING), (worker_id, now - WAITING_SECONDS)).fetchone()[0]
            shared = claimants > 1 and len(free) > 1
            if shared:
                take = max(min(len(free), lanes_per_claim(self.lanes)),
                           -(-len(free) // claimants))
            else:
                take = len(free)
            lanes = self._keep_lanes(cur, free, take, now)
            # Persons never share a lane, so nothing is blocked within the lanes taken.
            candidates = (self._scan_candidates(cur, lanes, run)
                          if not shared and len(lanes) == len(free)
                          else self._lane_candidates(cur, lanes, run))
            chosen = select(candidates, set(), max_bytes=max_bytes,
                            max_messages=max_messages) if lanes else []
            chosen = self._lease_chosen(cur, chosen, (
                worker_id, now + lease_seconds, now, token)) if chosen else chosen
            if chosen:
                for row in chosen:
                    deltas[(row.run, "pending")] -= 1
                    deltas[(row.run, "in_flight")] += 1
            self._note_claimant(cur, worker_id, now, bool(chosen), run)
            self._shift(cur, deltas)
            return chosen

        chosen = self._tx(body)
        if chosen and not chosen[0].payload:  # the backend did not return them with the lease
            # Both lists in id order; a row forgotten since the claim (forget deletes rows
            # in flight) is not returned.
            bodies = self._read(*self._by_ids(_PAYLOADS, [r.id for r in chosen]), tuples=True)
            if len(bodies) != len(chosen):
                found = {row_id for row_id, _, _ in bodies}
                chosen = [row for row in chosen if row.id in found]
            for row, (_, message_id, payload) in zip(chosen, bodies, strict=True):
                row.message_id, row.payload = message_id, payload
        if chosen:
            self.__dict__["_claim_rows"] = len(chosen)
            for row in chosen:
                row.claim = token
        return chosen

    def _note_claimant(self, cur: Any, worker_id: str, now: float, served: bool,
                       run: str | None) -> None:
        """Record (or clear) that this worker waits for lanes. Written only when it
        changes, so an uncontended drain writes nothing here."""
        waiting: dict[str, float] = self.__dict__.setdefault("_waiting_as", {})
        if served:
            if waiting.pop(worker_id, None) is not None:
                cur.execute(self.q(_SERVED), (worker_id,))
            return
        if self._others_hold_rows(worker_id, run, cur):
            cur.execute(self.q(_WAIT), (worker_id, now))
            waiting[worker_id] = time.monotonic()

    def _claimant_to_note(self, worker_id: str, run: str | None) -> bool:
        """Whether an empty claim has a claimant to record (read outside a transaction,
        so that most empty claims take no write lock): SQLite's rule, another worker
        holds rows while rows are pending."""
        return self._others_hold_rows(worker_id, run)

    def _others_hold_rows(self, worker_id: str, run: str | None, cur: Any = None) -> bool:
        """Whether rows are pending while another worker holds rows in flight (in cur's
        transaction, or read outside one).

        Waiting counts only for rows another worker holds: lanes busy with this worker's
        own senders, or with deferred rows, are no one else's to share."""
        run_filter, run_args = ("", ()) if run is None else (" AND run = ?", (run,))
        pending = self.q("SELECT 1 FROM {s}counts WHERE status = 'pending' AND n > 0"
                         + run_filter + " LIMIT 1")
        if cur is None:
            return bool(self._read(pending, run_args, tuples=True)) and bool(
                self._read(self.q(_HELD_BY_OTHERS), (worker_id,), tuples=True))
        return bool(cur.execute(pending, run_args).fetchone()) and bool(
            cur.execute(self.q(_HELD_BY_OTHERS), (worker_id,)).fetchone())

    def _free_lanes(self, cur: Any, now: float, run: str | None) -> list[tuple[int, int]]:
        """The free lanes with pending rows and their oldest pending ids, oldest first,
        locked by this claim where the backend locks lanes."""
        run_filter, run_args = ("", ()) if run is None else (" AND h.run = ?", (run,))
        sql = self.q(_FREE_LANES % (run_filter, run_filter))
        lanes = [(lane, head) for lane, head in cur.execute(
            sql, (*run_args, *run_args, now, self.lanes)).fetchall()]
        if not lanes:
            return lanes
        ids = self._id_list([lane for lane, _ in lanes])
        busy = {lane for (lane,) in cur.execute(self.q(_BUSY), (ids, now, ids)).fetchall()}
        return [(lane, head) for lane, head in lanes if lane not in busy]

    def _scan_candidates(self, cur: Any, lanes: list[tuple[int, int]], run: str | None
                         ) -> Iterator[Row]:
        """Pending rows of these lanes in enqueue order (for a claim that takes every free
        lane: the rows it passes over are of busy lanes): each run's from the run index in
        id order, merged by id (usually there is one run: one range scan)."""
        runs = [run] if run is not None else [
            r for (r,) in cur.execute(self.q(_PENDING_RUNS)).fetchall()]
        sql = self.q(_SCAN_ROWS)
        ids = self._id_list([lane for lane, _ in lanes])
        start = min(head for _, head in lanes) - 1
        first = max(FIRST_PAGE_MIN, min(CANDIDATE_PAGE_SIZE, int(self.__dict__.get(
            "_claim_rows", CANDIDATE_PAGE_SIZE)) * 5 // (4 * max(1, len(runs))) + 8))
        budget = [CANDIDATE_PAGES * CANDIDATE_PAGE_SIZE]

        if len(runs) == 1:
            yield from starmap(Row, _pages(cur, sql, (runs[0], ids), start, first, budget))
        else:
            yield from starmap(Row, heapq.merge(*(
                _pages(cur, sql, (name, ids), start, first, budget) for name in runs)))

    def _lane_candidates(self, cur: Any, lanes: list[tuple[int, int]], run: str | None
                         ) -> Iterator[Row]:
        """Pending rows of the lanes merged in enqueue order, without payloads, read a page
        per lane at a time (lazy: select reads only as far as it needs).

        Merged, not lane after lane: a request then covers a short range of ids, and so
        few table pages (one lane's rows are spread over the whole table). A lane's first
        page is its share of the rows the last claim took (pages double after that): a
        page of 1,000 rows from each of 34 lanes read 34,000 rows to take 1,600, and cost
        more than the rest of the claim."""
        run_filter, run_args = ("", ()) if run is None else (" AND run = ?", (run,))
        sql = self.q(_LANE_ROWS % run_filter)
        budget = [CANDIDATE_PAGES * CANDIDATE_PAGE_SIZE]
        expected = int(self.__dict__.get("_claim_rows", CANDIDATE_PAGE_SIZE))
        first = max(FIRST_PAGE_MIN, min(CANDIDATE_PAGE_SIZE,
                                        expected * 5 // (4 * max(1, len(lanes))) + 8))

        yield from starmap(Row, heapq.merge(*(
            _pages(cur, sql, (lane, *run_args), head - 1, first, budget)
            for lane, head in lanes)))

    @property
    def lanes(self) -> int:
        """This outbox's number of lanes (fixed when it was created)."""
        count = self.__dict__.get("_lanes")
        if count is None:
            count = int(self._query("SELECT count(*) AS n FROM {s}lanes")[0]["n"])
            self.__dict__["_lanes"] = count
        return count

    def _fill_lanes(self, cur: Any) -> int:
        """Compute the lane of every stored row not yet sent (the lanes migration), in
        chunks by id; the number of rows given a lane."""
        lanes = cur.execute(self.q("SELECT count(*) FROM {s}lanes")).fetchone()[0]
        page_sql = self.q("SELECT id, person FROM {s}messages WHERE status != 'sent'"
                          " AND id > ? ORDER BY id LIMIT ?")
        update = self.q("UPDATE {s}messages SET lane = ? WHERE id = ?")
        after, done = 0, 0
        while page := cur.execute(page_sql, (after, CHUNK_ROWS)).fetchall():
            cur.executemany(update, [(lane_of(person, lanes), row_id)
                                     for row_id, person in page])
            done += len(page)
            after = page[-1][0]
        return done

    # -- waking idle senders -------------------------------------------------------------

    _signal_lock: ClassVar[threading.Lock] = threading.Lock()

    def _condition(self) -> threading.Condition:
        cond = self.__dict__.get("_changed")
        if cond is None:
            with SQLStorage._signal_lock:
                cond = self.__dict__.setdefault("_changed", threading.Condition())
        return cond

    @property
    def changes(self) -> int:
        """How many changes that can make rows claimable this object has made (rows
        added, sent, released, dead-lettered, requeued): read it before a claim, and
        pass it to :meth:`wait_for_change` when the claim came back empty."""
        return int(self.__dict__.get("_changes", 0))

    def wait_for_change(self, seen: int, timeout: float) -> bool:
        """Wait until this object has made a change since ``changes`` was ``seen``, or
        for timeout seconds; True when there was one. Changes made by other processes
        are not signalled: a caller waits at most its polling interval."""
        cond = self._condition()
        with cond:
            return cond.wait_for(lambda: self.changes != seen, timeout)

    def wake(self) -> None:
        """Wake every :meth:`wait_for_change` of this object now (a worker stopping)."""
        self._signal()

    def _signal(self) -> None:
        cond = self._condition()
        with cond:
            self.__dict__["_changes"] = self.changes + 1
            cond.notify_all()

    # -- fenced changes to claimed rows ------------------------------------------------

    def _fenced(self, cur: Any, rows: Sequence[Row], new_status: str | None,
                assignments: str, params: Sequence[Any]) -> list[int]:
        """Change the rows still in flight under their claim token; the ids changed.

        The token is checked in the UPDATE itself (and rechecked by PostgreSQL after a
        lock wait), so a claim that has lost a row changes nothing."""
        by_claim: dict[str, list[int]] = defaultdict(list)
        for row in rows:
            by_claim[row.claim].append(row.id)
        status = ("status = ?, ",) if new_status else ()
        template = self._fenced_sql % ("".join(status) + assignments)
        changed: list[int] = []
        deltas: Deltas = defaultdict(int)
        first = (new_status,) if new_status else ()
        for token, ids in by_claim.items():
            sql, id_args = self._by_ids(template, ids)
            moved = cur.execute(sql, (*first, *params, token, *id_args)).fetchall()
            changed.extend(row_id for row_id, _ in moved)
            if new_status:
                for run, n in Counter(run for _, run in moved).items():
                    deltas[(run, "in_flight")] -= n
                    deltas[(run, new_status)] += n
        self._shift(cur, deltas)
        return sorted(changed)

    def extend_lease(self, rows: Sequence[Row], lease_seconds: float) -> list[int]:
        return self._tx(lambda cur: self._fenced(
            cur, rows, None, "lease_expires_at = {now} + ?, updated_at = {now}",
            (lease_seconds,)))

    def record_attempt(self, attempt: Attempt, *, count: bool, sent: bool = False) -> list[int]:
        assignments, params = "updated_at = {now}", []
        if count:
            assignments += ", attempts = attempts + 1"
        if sent:
            assignments += ", " + _SENT
        elif count:
            assignments += ", last_error = ?"
            params.append(attempt.error)

        def body(cur: Any) -> list[int]:
            # One statement: the audit never says sent for a row still in flight, and a
            # row another claim holds now is neither counted nor marked.
            held = self._fenced(cur, attempt.rows, "sent" if sent else None, assignments,
                                params)
            kept = set(held)
            self._audit(cur, attempt, attempt.outcome, [r for r in attempt.rows if r.id in kept])
            self._audit(cur, attempt, "late", [r for r in attempt.rows if r.id not in kept])
            return held

        held = self._tx(body)
        if sent and held:
            self._signal()
        return held

    def _audit(self, cur: Any, attempt: Attempt, outcome: str, rows: Sequence[Row]) -> None:
        """One audit entry for these rows of an attempt (none when rows is empty)."""
        if not rows:
            return
        ids = [row.id for row in rows]
        runs = sorted({row.run for row in rows})
        attempt_id = cur.execute(self.q(_AUDIT), (
            attempt.worker_id, attempt.endpoint, json.dumps(runs), len(ids), attempt.bytes,
            attempt.status_code, attempt.latency_ms, outcome, attempt.error,
            json.dumps(row_ranges(ids)), min(ids), max(ids),
        )).fetchone()[0]
        cur.executemany(self.q(_AUDIT_RUN), [(run, attempt_id) for run in runs])

    def mark_sent(self, rows: Sequence[Row]) -> list[int]:
        return self._signalled(self._tx(lambda cur: self._fenced(
            cur, rows, "sent", "updated_at = {now}, " + _SENT, ())))

    def dead_letter(self, errors: Sequence[tuple[Row, str]], *, attempted: bool = False
                    ) -> list[int]:
        by_error: dict[str, list[Row]] = defaultdict(list)
        for row, error in errors:
            by_error[error].append(row)
        counted = "attempts = attempts + 1, " if attempted else ""

        def body(cur: Any) -> list[int]:
            return sorted(row_id for error, rows in by_error.items() for row_id in self._fenced(
                cur, rows, "failed",
                counted + "last_error = ?, next_attempt_at = NULL, " + _DROP_LEASE, (error,)))

        return self._signalled(self._tx(body))

    def release(self, rows: Sequence[Row], *, next_attempt_at: float | None = None
                ) -> list[int]:
        return self._signalled(self._tx(lambda cur: self._fenced(
            cur, rows, "pending", "next_attempt_at = ?, " + _DROP_LEASE, (next_attempt_at,))))

    def release_worker(self, worker_id: str) -> int:
        return self._signalled(self._change(
            "status = 'in_flight' AND worker_id = ?", (worker_id,), "pending", _DROP_LEASE, ()))

    def _signalled(self, changed: T) -> T:
        """changed, after waking idle senders if it changed anything."""
        if changed:
            self._signal()
        return changed

    # -- reporting ---------------------------------------------------------------------

    def counts(self, run: str | None = None) -> dict[str, int]:
        result = {"pending": 0, "in_flight": 0, "sent": 0, "failed": 0}
        if run is None:
            rows = self._query("SELECT status, sum(n) AS n FROM {s}counts GROUP BY status")
        else:
            rows = self._query("SELECT status, n FROM {s}counts WHERE run = ?", (run,))
        for row in rows:
            result[row["status"]] = int(row["n"])
        return result

    def runs(self) -> list[dict[str, Any]]:
        by_run: dict[str, dict[str, Any]] = {}
        for row in self._query("SELECT run, status, n FROM {s}counts ORDER BY run"):
            entry = by_run.setdefault(row["run"], {"run": row["run"], "pending": 0,
                                                   "in_flight": 0, "sent": 0, "failed": 0})
            entry[row["status"]] = int(row["n"])
        return [e for e in by_run.values() if any(e[s] for s in ("pending", "in_flight",
                                                                   "sent", "failed"))]

    def leases(self, run: str | None = None) -> list[dict[str, Any]]:
        where, args = ("", ()) if run is None else (" AND run = ?", (run,))
        return [dict(row) for row in self._query(
            "SELECT worker_id, count(*) AS rows, min(lease_expires_at) AS expires_first,"
            " max(lease_expires_at) AS expires_last FROM {s}messages"
            f" WHERE status = 'in_flight'{where} GROUP BY worker_id ORDER BY expires_first",
            args)]

    def oldest_pending(self, run: str | None = None) -> float | None:
        if run is None:
            rows = self._query(_OLDEST)
        else:
            rows = self._query("SELECT created_at FROM {s}messages {pending_run}"
                             " WHERE status = 'pending' AND run = ? ORDER BY run, id LIMIT 1",
                             (run,))
        return rows[0]["created_at"] if rows else None

    def _attempts(self, where: str, params: Sequence[Any], run: str | None,
                  tail: str = "") -> list[dict[str, Any]]:
        """Audit entries matching where, of one run's requests when run is given."""
        if run is None:
            sql, args = f"SELECT a.* FROM {{s}}attempts a WHERE {where}", params
        else:
            sql, args = f"SELECT a.* FROM {{s}}attempts a{_BY_RUN} {where}", (run, *params)
        return [_attempt_dict(row) for row in self._query(sql + tail, args)]

    def last_error(self, run: str | None = None) -> dict[str, Any] | None:
        rows = self._attempts("a.error IS NOT NULL", (), run, " ORDER BY a.id DESC LIMIT 1")
        return rows[0] if rows else None

    def sent_since(self, since: float, run: str | None = None) -> int:
        if run is None:
            sql, args = "SELECT coalesce(sum(a.messages), 0) AS n FROM {s}attempts a WHERE", ()
        else:
            sql, args = "SELECT coalesce(sum(a.messages), 0) AS n FROM {s}attempts a" + _BY_RUN, (
                run,)
        return int(self._query(sql + " a.at >= ? AND a.outcome = 'sent'", (*args, since))[0]["n"])

    def failed(self, run: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        return self.rows(run=run, status="failed", limit=limit)

    def rows(self, *, run: str | None = None, status: str | None = None, limit: int = 100
             ) -> list[dict[str, Any]]:
        where, params = ["1 = 1"], []
        if status is not None:
            where.append("status = ?")
            params.append(status)
        if run is not None:
            where.append("run = ?")
            params.append(run)
        return self._query(f"SELECT * FROM {{s}}messages WHERE {' AND '.join(where)}"
                         " ORDER BY id LIMIT ?", (*params, limit))

    def message(self, message_id: str) -> dict[str, Any] | None:
        rows = self._query("SELECT * FROM {s}messages WHERE message_id = ?", (message_id,))
        return rows[0] if rows else None

    def attempts_for(self, row_id: int) -> list[dict[str, Any]]:
        rows = self._attempts("a.max_row_id >= ? AND a.min_row_id <= ?", (row_id, row_id),
                              None, " ORDER BY a.id")
        return [row for row in rows if in_ranges(row_id, row["row_ranges"])]

    def attempts(self, run: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        rows = self._attempts("1 = 1", (), run, f" ORDER BY a.id DESC LIMIT {int(limit)}")
        return list(reversed(rows))

    # -- operator changes --------------------------------------------------------------

    def requeue(self, *, ids: Sequence[int] | None = None, run: str | None = None) -> int:
        where, params = "status = 'failed'", []
        if ids is not None:
            where += " AND {ids}"
            params.append(self._id_list(list(ids)))
        if run is not None:
            where += " AND run = ?"
            params.append(run)
        return self._signalled(self._change(
            where, params, "pending", "attempts = 0, next_attempt_at = NULL, updated_at = {now}",
            ()))

    def replace_failed(self, row_id: int, *, payload: str, size: int, call_type: str,
                       person: str) -> bool:
        # A new person may mean a new lane: the row joins that person's stream.
        return self._signalled(self._change(
            "id = ? AND status = 'failed'", (row_id,), "pending",
            "payload = ?, size = ?, call_type = ?, person = ?, lane = ?, attempts = 0,"
            " next_attempt_at = NULL, updated_at = {now},"
            " last_error = 'replaced; was: ' || coalesce(last_error, '')",
            (payload, size, call_type, person, lane_of(person, self.lanes)),
        )) == 1

    def purge_sent(self, before: float) -> int:
        return self._tx(lambda cur: self._removed(cur, "status = 'sent' AND sent_at < ?",
                                                  (before,))[0])

    # -- recurring syncs (issue 20): the table and its SQL are in storage/sync_state.py ----

    def _create_sync_state(self, cur: Any) -> None:
        from cio_outbox.storage import sync_state

        sync_state.create(cur, self._sync_dialect())

    def sync_transaction(self, body: Callable[[Any], T], *, write: bool = True) -> T:
        """``body(tx)`` in one transaction: it reads and writes sync state through ``tx.db``
        and adds messages with ``tx.insert(rows)``; all of it commits together or not at
        all, so a sync killed at any moment has enqueued a change exactly when it recorded
        its fingerprint. ``write=False`` for bodies that write only temporary tables."""
        from cio_outbox.storage import sync_state

        dialect = self._sync_dialect()
        if not self.__dict__.get("_sync_ready"):
            self._tx(self._create_sync_state)
            self._sync_ready = True

        def run(cur: Any) -> T:
            def insert(rows: Iterable[NewRow]) -> int:
                chunk = list(rows)
                if not chunk:
                    return 0
                deltas = self._insert_chunk(cur, chunk)
                self._shift(cur, deltas)
                return sum(deltas.values())

            return body(sync_state.SyncTransaction(cur, dialect, insert))

        return self._tx(run) if write else self._read_tx(run)

    def purgeable(self, before: float) -> list[dict[str, Any]]:
        """What :meth:`purge_sent` would delete, by run: rows and their sent_at range."""
        return [dict(row) for row in self._query(
            "SELECT run, count(*) AS rows, min(sent_at) AS oldest, max(sent_at) AS newest"
            " FROM {s}messages WHERE status = 'sent' AND sent_at < ? GROUP BY run ORDER BY run",
            (before,),
        )]

    def forget(self, person: str) -> dict[str, Any]:
        """Delete this person's rows and redact the id from the audit text, then vacuum.

        Rows are chosen by the ``person`` column and by an alias's ``previousId``, by
        exact value; rows in flight go too (a late outcome then finds nothing to change).
        Audit text is redacted where the id stands as a whole token. ``traces_kept_by``
        names the clients whose older transactions kept the deleted rows in the files (see
        the backend's ``vacuum``): empty when no trace is left; otherwise forgetting the
        same person again once they end erases them."""
        def body(cur: Any) -> dict[str, Any]:
            deleted, by_status = self._removed(cur, _FORGET, (person, person))
            redacted = 0
            pattern = _token_pattern(person)
            like = "%" + re.sub(r"([\\%_])", r"\\\1", person) + "%"
            for table, column in _REDACT.items():
                found = cur.execute(self.q(
                    f"SELECT id, {column} FROM {{s}}{table} WHERE {column} LIKE ? ESCAPE '\\'"
                ), (like,)).fetchall()
                changes = [(pattern.sub("[forgotten]", text), row_id) for row_id, text in found
                           if pattern.search(text)]
                if changes:
                    cur.executemany(self.q(f"UPDATE {{s}}{table} SET {column} = ? WHERE id = ?"),
                                    changes)
                redacted += len(changes)
            from cio_outbox.storage import sync_state

            synced = sync_state.forget_key(cur, self._sync_dialect(), person)
            cur.execute(self.q("INSERT INTO {s}forgotten (at, rows_deleted) VALUES ({now}, ?)"),
                        (deleted,))
            return {"deleted": deleted, "by_status": by_status, "redacted": redacted,
                    "sync_keys": synced}

        report = self._tx(body)
        report["traces_kept_by"] = self.vacuum()
        return report

    # -- status bookkeeping, in the caller's transaction -------------------------------

    def _shift(self, cur: Any, deltas: Deltas) -> None:
        """Apply changes to the per-run counts, in a fixed order (no dead-locks)."""
        items = sorted((key, n) for key, n in deltas.items() if n)
        if items:
            cur.executemany(self.q(_SHIFT), [(run, status, n) for (run, status), n in items])

    def _transition(self, cur: Any, deltas: Deltas, where: str, params: Sequence[Any],
                    new_status: str, assignments: str, assignment_params: Sequence[Any]
                    ) -> int:
        moved = self._move(cur, self.q(where), params, new_status, self.q(assignments),
                           assignment_params)
        for run, old_status, n in moved:
            deltas[(run, old_status)] -= n
            deltas[(run, new_status)] += n
        return sum(n for _, _, n in moved)

    def _change(self, where: str, params: Sequence[Any], new_status: str, assignments: str,
                assignment_params: Sequence[Any]) -> int:
        def body(cur: Any) -> int:
            deltas: Deltas = defaultdict(int)
            moved = self._transition(cur, deltas, where, params, new_status, assignments,
                                     assignment_params)
            self._shift(cur, deltas)
            return moved

        return self._tx(body)

    def _removed(self, cur: Any, where: str, params: Sequence[Any]
                 ) -> tuple[int, dict[str, int]]:
        gone = self._delete(cur, self.q(where), params)
        by_status = {"pending": 0, "in_flight": 0, "sent": 0, "failed": 0}
        for _, status, n in gone:
            by_status[status] += n
        self._shift(cur, {(run, status): -n for run, status, n in gone})
        return sum(by_status.values()), by_status


def _attempt_dict(row: dict[str, Any]) -> dict[str, Any]:
    """An audit entry with its JSON columns decoded (SQLite stores them as text)."""
    for key in ("runs", "row_ranges"):
        if isinstance(row[key], str):
            row[key] = json.loads(row[key])
    return row
