"""The worker: claims rows under a lease, sends them, records every outcome.

Retry policy, declared with tenacity:

- 429: wait what ``Retry-After`` says, and pause every sender of this worker;
- 5xx, 408, timeouts, refused or reset connections: capped exponential backoff
  with jitter;
- 400, 413, 422: the batch holds a bad message. Items the server names
  (``batch[3]...``) are dead-lettered with its reason and the rest resent; without
  names the batch is split in halves until the bad ones stand alone. A refusal counts
  as an attempt for the rows it names or for a row refused on its own, never for the good
  rows beside a bad one;
- 401, 403: stop at once; rows go back to pending with no attempt counted;
- after ``max_attempts`` answered HTTP attempts a row is dead-lettered with its last
  error. Attempts that never reached the server (refused, connect timeout) are audited
  but do not count: a network outage never dead-letters a row, it waits and retries.
- Attempts whose body went out but got no answer (read timeout, connection closed or
  reset while waiting) "may have arrived": audited as such, retried, and after
  ``max_unconfirmed`` of them in a row the rows are dead-lettered with a reason saying
  that they may have arrived (a resend could duplicate them).

Fencing: every change to a claimed row goes through the storage's fenced calls, which
apply only while this worker's claim still holds the row; an outcome for rows no longer
held is audited as ``late`` and changes nothing. Before each send and each retry the
worker checks that it still holds its rows (``extend_lease``) and sends only those.

Live leases: a heartbeat thread extends the leases of every row a sender holds, at most a
quarter of the lease apart, while its request is in flight and while it waits out a
``Retry-After`` or a backoff. So no other sender can take a later message of the same
person while an earlier one is unresolved: one person's messages reach the API in the
order they were enqueued, including when a refused batch is split to isolate a bad one.

A busy or failing database (:class:`StorageError`) does not stop the worker: it backs off
and tries again, with the error in its progress line.
"""

from __future__ import annotations

import logging
import os
import random
import re
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tenacity import (
    RetryCallState,
    RetryError,
    Retrying,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential_jitter,
)

from cio_outbox.batch import MAX_BATCH_BYTES, Row, batch_body, sent_at_now, single_body
from cio_outbox.client import Client, Reply, TransportError, describe_error
from cio_outbox.errors import CioOutboxError
from cio_outbox.results import Progress, WorkerResult
from cio_outbox.settings import (
    DEFAULT_CONCURRENCY,
    DEFAULT_LEASE_SECONDS,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_MAX_UNCONFIRMED,
    DEFAULT_UNREACHABLE_TIMEOUT,
)
from cio_outbox.storage.base import Attempt, Storage, StorageError
from cio_outbox.storage.slots import WorkerSlot

log = logging.getLogger("cio_outbox.worker")

EXIT_OK = 0
EXIT_FATAL = 1
EXIT_AUTH = 3

_ITEM_INDEX = re.compile(r"^batch\[(\d+)\]")


class WorkerError(CioOutboxError, RuntimeError):
    """The worker stopped because it cannot go on (bad host, bad key)."""

    exit_code = EXIT_FATAL


class AuthError(WorkerError):
    """The API refused the key (401/403). No row was counted as attempted."""

    exit_code = EXIT_AUTH


class _Transient(Exception):
    """A failure worth retrying: 429, 5xx, 408 or no answer."""

    def __init__(self, text: str, retry_after: float | None = None) -> None:
        super().__init__(text)
        self.text = text
        self.retry_after = retry_after


class _Stopped(Exception):
    """The worker was asked to stop while this request waited for a retry."""


class _Unconfirmed(Exception):
    """The request went out ``max_unconfirmed`` times without an answer: give up on it."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


class _Lost(Exception):
    """No row of the request is held any more (its lease lapsed): send nothing."""


@dataclass
class _Claim:
    """The rows one sender holds for one request, and its unanswered sends so far."""

    rows: list[Row]
    unconfirmed: int = 0


#: How long an outcome is retried against a busy database before the rows are left to
#: come back by lease (and be sent again: never lost).
STORE_PATIENCE = 60.0


class Throttle:
    """Shared by every sender thread: an optional requests/s cap and a pause after 429."""

    def __init__(self, max_rps: float | None = None) -> None:
        self.max_rps = max_rps
        self._lock = threading.Lock()
        self._next_slot = 0.0
        self._pause_until = 0.0

    def pause(self, seconds: float) -> None:
        with self._lock:
            self._pause_until = max(self._pause_until, time.monotonic() + seconds)

    def paused_for(self) -> float:
        return max(0.0, self._pause_until - time.monotonic())

    def acquire(self, stop: threading.Event) -> bool:
        """Wait for a slot; False when the worker is stopping."""
        while True:
            with self._lock:
                now = time.monotonic()
                start = max(now, self._pause_until, self._next_slot)
                if start <= now:
                    if self.max_rps:
                        self._next_slot = now + 1.0 / self.max_rps
                    return True
            if stop.wait(min(start - now, 1.0)):
                return False


@dataclass
class _Counters:
    sent: int = 0
    failed: int = 0
    requests: int = 0
    retries: int = 0
    rejected_requests: int = 0
    last_error: str | None = None
    last_error_at: float = 0.0
    # Kept apart so that a dead letter is never shown as "retrying".
    last_retry: str | None = None
    last_dead_letter: str | None = None
    last_dead_letter_at: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def error(self, text: str) -> None:
        self.last_error = self.last_retry = text
        self.last_error_at = time.monotonic()

    def dead_letter(self, text: str) -> None:
        self.last_dead_letter = text
        self.last_dead_letter_at = time.monotonic()

    def add(self, **changes: int) -> None:
        with self.lock:
            for name, value in changes.items():
                setattr(self, name, getattr(self, name) + value)


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def _uptime() -> float | None:
    """Seconds on a clock that goes on while the process is stopped or the machine is
    suspended (Linux's CLOCK_BOOTTIME); None elsewhere, where leases are always checked."""
    clock = getattr(time, "CLOCK_BOOTTIME", None)
    return None if clock is None else time.clock_gettime(clock)


def _ewma(average: float, value: float) -> float:
    """A moving average that follows the last few values (the first one sets it)."""
    return value if average == 0.0 else 0.75 * average + 0.25 * value


class Worker:
    """Drains an outbox through a :class:`Client`.

    ``concurrency`` sender threads each claim one request's worth of rows at a
    time. Several workers (threads or processes) may drain one outbox.

    >>> worker = Worker(storage, client, concurrency=4)   # doctest: +SKIP
    >>> worker.run(until_empty=True).sent                  # doctest: +SKIP
    """

    def __init__(
        self,
        storage: Storage,
        client: Client,
        *,
        concurrency: int = DEFAULT_CONCURRENCY,
        run: str | None = None,
        max_bytes: int = MAX_BATCH_BYTES,
        max_messages: int = 5000,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        max_unconfirmed: int = DEFAULT_MAX_UNCONFIRMED,
        max_rps: float | None = None,
        backoff_initial: float = 0.5,
        backoff_max: float = 60.0,
        idle_interval: float = 0.5,
        worker_id: str | None = None,
        on_progress: Callable[[Progress], None] | None = None,
        progress_interval: float = 1.0,
        unreachable_timeout: float | None = DEFAULT_UNREACHABLE_TIMEOUT,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if max_unconfirmed < 1:
            raise ValueError("max_unconfirmed must be at least 1")
        if lease_seconds <= 0:
            raise ValueError("lease_seconds must be positive")
        if not 0 < max_bytes <= MAX_BATCH_BYTES:
            raise ValueError(f"max_bytes must be between 1 and {MAX_BATCH_BYTES}")
        self.storage = storage
        self.client = client
        self.concurrency = concurrency
        self.run_filter = run
        self.max_bytes = max_bytes
        self.max_messages = max_messages
        self.lease_seconds = lease_seconds
        self.max_attempts = max_attempts
        self.max_unconfirmed = max_unconfirmed
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.idle_interval = idle_interval
        # Without an id, run() takes the outbox's first free slot on this host (a stable
        # id, see storage/slots.py); this one stands until then.
        self._stable_id = worker_id is None and hasattr(storage, "worker_slot")
        self.worker_id = worker_id or default_worker_id()
        self.on_progress = on_progress
        self.progress_interval = progress_interval
        # With until_empty: give up when the host has not answered once in this long
        # (DNS typo, TLS against plain http): it would otherwise retry without end.
        self.unreachable_timeout = unreachable_timeout
        self._answered = threading.Event()
        self._until_empty = False
        self._rate_window: deque[tuple[float, int]] = deque()
        self.throttle = Throttle(max_rps)
        self._backoff = wait_exponential_jitter(
            multiplier=backoff_initial, max=backoff_max, jitter=backoff_initial
        )
        self._stop = threading.Event()
        self._drained = threading.Event()
        self._fatal: WorkerError | None = None
        self._counters = _Counters()
        self._state = "starting"
        self._started = 0.0
        # Rows each sender holds, by sender thread: what the heartbeat keeps leased.
        self._held: dict[int, _Claim] = {}
        self._held_lock = threading.Lock()
        self._wanting = concurrency  # senders between requests (all of them at the start)
        self._local = threading.local()  # per sender: when its lease was last confirmed
        self._claim_lock = threading.Lock()
        # Moving averages, in seconds, of a request's round trip and of a claim (see _share).
        self._round_trip = 0.0
        self._claim_cost = 0.0
        self._last_counts: dict[str, int] = {"pending": 0, "in_flight": 0, "sent": 0, "failed": 0}

    # -- control -----------------------------------------------------------------------

    def stop(self) -> None:
        """Ask every sender to finish its request in flight, record it, and stop."""
        self._stop.set()
        self._wake_idle()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    @property
    def base_url(self) -> str:
        """The host this worker sends to (scheme and host; requests go to /v1/<endpoint>)."""
        return self.client.target.base_url

    def run(self, *, until_empty: bool = False, timeout: float | None = None) -> WorkerResult:
        """Send until stopped, or with ``until_empty`` until nothing is pending or in flight.

        Rows in flight under another worker's lease are waited for: if that worker
        died, its lease expires and this worker takes them back.
        """
        self._started = time.monotonic()
        self._state = "sending"
        self._until_empty = until_empty
        slot = self._take_slot()
        try:
            return self._run(until_empty, timeout)
        finally:
            if slot is not None:
                slot.release()

    def _take_slot(self) -> WorkerSlot | None:
        """This host's first free worker slot of the outbox, when no id was given: a
        worker restarted after a crash gets its old id back, so its rows at once."""
        if not self._stable_id:
            return None
        try:
            slot: WorkerSlot = self.storage.worker_slot()  # type: ignore[attr-defined]
        except (StorageError, OSError) as exc:  # then a one-off id, rows come back by lease
            log.warning("no stable worker id (%s); using %s", exc, self.worker_id)
            return None
        self.worker_id = slot.worker_id
        return slot

    def _run(self, until_empty: bool, timeout: float | None) -> WorkerResult:
        try:
            released = self._store(self.storage.release_worker, self.worker_id)
        except StorageError as exc:  # those rows come back by lease instead
            log.warning("could not take back this worker id's rows: %s", exc)
            self._counters.error(str(exc))
            released = 0
        if released:
            log.info("took back %d rows this worker id held before a restart", released)
        threads = [
            threading.Thread(
                target=self._sender, args=(until_empty,), name=f"cio-sender-{i}", daemon=True
            )
            for i in range(self.concurrency)
        ]
        for thread in threads:
            thread.start()
        senders_done = threading.Event()
        heartbeat = threading.Thread(target=self._heartbeat, args=(senders_done,),
                                     name="cio-heartbeat", daemon=True)
        heartbeat.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        last_report = 0.0
        last_sent = 0
        try:
            while any(thread.is_alive() for thread in threads):
                time.sleep(0.05)
                if deadline is not None and time.monotonic() > deadline:
                    self.stop()
                now = time.monotonic()
                if self.on_progress and now - last_report >= self.progress_interval:
                    progress = self._snapshot(now - last_report if last_report else None,
                                              last_sent)
                    last_report, last_sent = now, progress.sent
                    self.on_progress(progress)
        except KeyboardInterrupt:
            self.stop()
            for thread in threads:
                thread.join()
        senders_done.set()
        heartbeat.join(timeout=5)
        self._state = "done" if self._fatal is None else "stopped: " + str(self._fatal)
        if self.on_progress:
            self.on_progress(self._snapshot(None, 0))
        counters = self._counters
        result = WorkerResult(
            sent=counters.sent,
            failed=counters.failed,
            requests=counters.requests,
            retries=counters.retries,
            elapsed=time.monotonic() - self._started,
            stopped=self._stop.is_set() and self._fatal is None and not self._drained.is_set(),
        )
        if self._fatal is not None:
            result.exit_code = self._fatal.exit_code
            result.error = str(self._fatal)
        return result

    def progress(self) -> Progress:
        return self._snapshot(None, 0)

    def _snapshot(self, interval: float | None, last_sent: int) -> Progress:
        try:
            counts = self.storage.counts(self.run_filter)
            self._last_counts = counts
        except StorageError as exc:  # a busy database: show the last counts and the error
            self._counters.error(str(exc))
            counts = self._last_counts
        counters = self._counters
        now = time.monotonic()
        elapsed = now - self._started
        rate = self._rate(now, counters.sent) if interval else (
            counters.sent / elapsed if elapsed > 0 else 0.0)
        state = self._state
        paused = self.throttle.paused_for()
        recent_error = (
            counters.last_error
            and time.monotonic() - counters.last_error_at < max(2 * self.progress_interval, 5.0)
        )
        recent_dead_letter = (
            counters.last_dead_letter
            and now - counters.last_dead_letter_at < max(2 * self.progress_interval, 5.0)
        )
        if paused > 0 and state == "sending":
            state = f"rate limited, resuming in {paused:.0f}s"
        elif recent_error and state == "sending":
            state = f"retrying: {counters.last_retry}"[:200]
        elif recent_dead_letter and state == "sending":
            state = f"dead-lettered: {counters.last_dead_letter}"[:200]
        elif state == "sending" and counts["in_flight"] and rate == 0:
            state = self._waiting_for_leases() or state
        left = counts["pending"] + counts["in_flight"]
        return Progress(
            sent=counters.sent, failed=counters.failed, requests=counters.requests,
            retries=counters.retries, rejected_requests=counters.rejected_requests,
            pending=counts["pending"], in_flight=counts["in_flight"], rate=rate,
            elapsed=elapsed, state=state, last_error=counters.last_error,
            total=counters.sent + counters.failed + left,
        )

    def _waiting_for_leases(self) -> str | None:
        """Why nothing moves while this worker holds nothing and others hold rows: a
        worker that died keeps its lanes until its leases expire."""
        leases = getattr(self.storage, "leases", None)
        if leases is None:
            return None
        held = leases(self.run_filter)
        if not held or any(e["worker_id"] == self.worker_id for e in held):
            return None
        rows = sum(int(e["rows"]) for e in held)
        top = max(held, key=lambda e: int(e["rows"]))
        others = f" and {len(held) - 1} other(s)" if len(held) > 1 else ""
        until = time.strftime("%H:%M:%S", time.localtime(max(e["expires_last"] for e in held)))
        return (f"waiting for {rows:,} rows leased by worker {top['worker_id']}{others}"
                f" until {until}")

    def _rate(self, now: float, sent: int) -> float:
        """Messages per second over the last 10 s (or since the start): requests finish in
        bursts (under --max-rps, one large batch a second), so a short window shows 0."""
        window = self._rate_window
        window.append((now, sent))
        while len(window) > 2 and now - window[1][0] >= 10.0:
            window.popleft()
        since, sent_then = window[0] if len(window) > 1 else (self._started, 0)
        return (sent - sent_then) / (now - since) if now > since else 0.0

    # -- live leases ------------------------------------------------------------------

    @property
    def heartbeat_interval(self) -> float:
        """Seconds between lease extensions: a quarter of the lease, at most 30 s."""
        return min(self.lease_seconds / 4, 30.0)

    def _heartbeat(self, done: threading.Event) -> None:
        """Extend the leases of every row a sender holds, a quarter of the lease apart."""
        while not done.wait(self.heartbeat_interval):
            with self._held_lock:
                claims = list(self._held.values())
            rows = [row for claim in claims for row in claim.rows]
            if not rows:
                continue
            try:
                self.storage.extend_lease(rows, self.lease_seconds)
            except StorageError as exc:  # the next beat tries again; the lease has slack
                log.warning("could not extend leases: %s", exc)
                self._counters.error(str(exc))

    def _hold(self, claim: _Claim | None) -> None:
        with self._held_lock:
            if claim is None:
                self._held.pop(threading.get_ident(), None)
            else:
                self._held[threading.get_ident()] = claim

    def _still_held(self, claim: _Claim) -> None:
        """Keep only the rows this claim still holds, leasing them anew; _Lost if none.

        Within a quarter of the lease (the heartbeat's period) of the claim or of the last
        extension the rows are still held without asking: the lease, set by the database
        from a clock reading taken after this sender's reading, cannot have run out, and
        the clock read counts time stopped or suspended. That saves one write transaction
        per request (a third of a drain's commits into a server that answers at once)."""
        leased_at, now = getattr(self._local, "leased_at", None), _uptime()
        if leased_at is not None and now is not None and now - leased_at < self.heartbeat_interval:
            return
        started = _uptime()
        held = set(self._store(self.storage.extend_lease, claim.rows, self.lease_seconds))
        self._local.leased_at = started
        lost = [row for row in claim.rows if row.id not in held]
        if lost:
            log.info("%d row(s) no longer held (lease lapsed): not sending them", len(lost))
            claim.rows = [row for row in claim.rows if row.id in held]
        if not claim.rows:
            raise _Lost()

    def _store(self, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """A storage write, retried with backoff while the database is busy or failing."""
        retrying = Retrying(
            retry=retry_if_exception_type(StorageError),
            stop=stop_after_delay(STORE_PATIENCE),
            wait=wait_exponential_jitter(multiplier=0.1, max=5.0, jitter=0.1),
            before_sleep=lambda state: self._counters.error(
                str(state.outcome.exception()) if state.outcome else "storage error"),
            reraise=True,
        )
        return retrying(call, *args, **kwargs)

    # -- the sender loop ---------------------------------------------------------------

    def _sender(self, until_empty: bool) -> None:
        storage_failures = 0
        while not self._stop.is_set():
            try:
                seen = self._changes()
                started = time.perf_counter()
                self._local.leased_at = _uptime()
                # One claim at a time per worker: senders that raced for SQLite's write
                # lock slept in its busy handler while the lock was already free.
                with self._claim_lock:
                    rows = self.storage.claim(
                        self.worker_id,
                        lease_seconds=self.lease_seconds,
                        max_bytes=self.max_bytes,
                        max_messages=self.max_messages,
                        run=self.run_filter,
                        share=self._share(),
                    )
                if rows:
                    self._want(-1)
                    self._claim_cost = _ewma(self._claim_cost, time.perf_counter() - started)
                if not rows:
                    if until_empty and self._nothing_left():
                        self._drained.set()
                        self.stop()
                        return
                    self._idle(seen)
                    continue
                claim = _Claim(list(rows))
                self._hold(claim)
                try:
                    self._deliver(claim.rows)
                finally:
                    self._hold(None)
                    self._want(1)
                storage_failures = 0
            except WorkerError as exc:
                self._fatal = self._fatal or exc
                self.stop()
                return
            except StorageError as exc:
                # A busy or failing database: back off and go on. Rows whose outcome could
                # not be written come back by lease and are sent again: never lost.
                storage_failures += 1
                wait = min(self.backoff_max, self.backoff_initial * 2 ** min(storage_failures, 10))
                log.warning("storage error, retrying in %.1f s: %s", wait, exc)
                self._counters.error(str(exc))
                self._stop.wait(wait)
            except Exception as exc:  # a bug: stop, rows come back by lease
                log.exception("sender stopped")
                self._fatal = self._fatal or WorkerError(f"worker stopped: {exc}")
                self.stop()
                return

    # Idle senders wait for the storage's signal (rows added, sent, released) rather than
    # polling: claims of lanes other senders of this process hold would find nothing.
    # On SQLite changes made by other processes are not signalled (PostgreSQL's are, by
    # LISTEN/NOTIFY), so the wait ends after idle_interval anyway (a lease may also run
    # out). A storage without the signal is polled.

    def _changes(self) -> int:
        return int(getattr(self.storage, "changes", 0))

    def _idle(self, seen: int) -> None:
        wait = getattr(self.storage, "wait_for_change", None)
        if wait is None:
            self._stop.wait(self.idle_interval)
        elif not self._stop.is_set():
            wait(seen, self.idle_interval)

    def _wake_idle(self) -> None:
        wake = getattr(self.storage, "wake", None)
        if wake is not None:
            wake()

    def _share(self) -> int:
        """How many senders the free lanes are shared among at this claim: the ones that
        want rows, but only while a request's round trip costs more than a claim. Into a
        server that answers at once the one SQLite writer is the limit, and lanes split
        among senders cost page writes (a lane's rows are spread over the table) and gain
        nothing; a claim then takes every free lane."""
        return self._wanting if self._round_trip > self._claim_cost else 1

    def _want(self, change: int) -> None:
        """Count the senders that want rows (between requests): a claim shares the free
        lanes with them, and takes them all when it is alone."""
        with self._held_lock:
            self._wanting += change

    def _nothing_left(self) -> bool:
        counts = self.storage.counts(self.run_filter)
        return counts["pending"] == 0 and counts["in_flight"] == 0

    def _deliver(self, rows: Sequence[Row]) -> set[str]:
        """Send rows as one request, with retries; isolate bad messages on rejection.

        Returns the persons with a row released for a later retry: no later row of theirs
        may go out before it."""
        # The sender's whole claim is on the heartbeat already; this one tracks the part
        # being sent (rows lost on the way drop out of it) and its unanswered sends.
        claim = _Claim(list(rows))
        endpoint = rows[0].endpoint
        try:
            reply, body_size = self._send_with_retries(claim, endpoint)
        except _Lost:
            return set()
        except _Stopped:
            self._store(self.storage.release, claim.rows, next_attempt_at=None)
            return {row.person for row in claim.rows}
        except _Unconfirmed as exc:
            self._dead_letter([(row, exc.text) for row in claim.rows])
            return set()
        except _Transient as exc:  # attempts exhausted for some rows
            return self._give_up(claim.rows, exc.text)
        rows = claim.rows
        if reply.ok:
            held = self._store(self.storage.record_attempt,
                               self._attempt(rows, endpoint, body_size, reply, "sent"),
                               count=True, sent=True)
            self._counters.add(sent=len(held))
            self._late(rows, held)
            return set()
        if reply.status_code in (401, 403):
            self._store(self.storage.record_attempt,
                        self._attempt(rows, endpoint, body_size, reply, "auth", reply.describe()),
                        count=False)
            self._store(self.storage.release, rows)
            target = self.client.target
            region = target.region.upper() if target.region else "custom host"
            raise AuthError(
                f"authentication failed (HTTP {reply.status_code}) at {target.base_url} "
                f"(region {region}); check CIO_API_KEY and the region or host. "
                "No row was counted as attempted."
            )
        if reply.status_code in (400, 413, 422):
            self._counters.add(rejected_requests=1)
            error = reply.describe()
            self._counters.last_error = error  # not a retry: the progress line stays calm
            # A refusal of several rows is charged to none of them: it is the bad one's,
            # which isolation finds and dead-letters; charged to all, the good rows beside
            # it would use up their attempts while it is being found.
            held_ids = set(self._store(
                self.storage.record_attempt,
                self._attempt(rows, endpoint, body_size, reply, "rejected", error),
                count=len(rows) == 1))
            self._late(rows, held_ids)
            still = [row for row in rows if row.id in held_ids]
            return self._isolate(still, reply) if still else set()
        # Anything else (404, 405, ...) means we are not talking to the Pipelines API.
        self._store(self.storage.record_attempt,
                    self._attempt(rows, endpoint, body_size, reply, "fatal", reply.describe()),
                    count=False)
        self._store(self.storage.release, rows)
        raise WorkerError(
            f"{self.client.target.url(endpoint)} answered {reply.describe()}; "
            "is --host the Pipelines API?"
        )

    def _late(self, rows: Sequence[Row], held: Sequence[int] | set[int]) -> None:
        late = len(rows) - len(set(held))
        if late:
            log.info("an answer came for %d row(s) no longer held; audited as late", late)

    def _isolate(self, rows: Sequence[Row], reply: Reply) -> set[str]:
        """Dead-letter the bad message(s) of a rejected request and resend the rest."""
        if len(rows) == 1:
            self._dead_letter([(rows[0], reply.describe())])
            return set()
        named: dict[int, list[str]] = {}
        for error in reply.errors:
            match = _ITEM_INDEX.match(str(error.get("field", "")))
            if match and int(match.group(1)) < len(rows):
                named.setdefault(int(match.group(1)), []).append(describe_error(error))
        if named:
            bad = [
                (rows[i], f"HTTP {reply.status_code}: " + "; ".join(texts))
                for i, texts in sorted(named.items())
            ]
            self._dead_letter(bad, attempted=True)  # the refusal was theirs
            good = [row for i, row in enumerate(rows) if i not in named]
            return self._deliver(good) if good else set()
        middle = len(rows) // 2
        # In order, one after the other, so that a person's messages stay in order; and a
        # person with a row of the first half waiting for a retry keeps the rest waiting.
        parts = [list(rows[:middle]), list(rows[middle:])]
        waiting: set[str] = set()
        try:
            while parts:
                part = parts.pop(0)
                blocked = [row for row in part if row.person in waiting]
                if blocked:
                    self._hold_back(blocked)
                    part = [row for row in part if row.person not in waiting]
                if part:
                    waiting |= self._deliver(part)
        except BaseException:
            # Stopping for good (auth, a bug): give the rows not yet tried back now.
            rest = [row for part in parts for row in part]
            if rest:
                self.storage.release(rest)
            raise
        return waiting

    def _hold_back(self, rows: Sequence[Row]) -> None:
        """Release rows whose person has an earlier row waiting: they go after it."""
        self._store(self.storage.release, rows,
                    next_attempt_at=time.time() + self.backoff_initial)

    def _dead_letter(self, bad: Sequence[tuple[Row, str]], *, attempted: bool = False) -> None:
        done = self._store(self.storage.dead_letter, bad, attempted=attempted)
        self._counters.add(failed=len(done))
        self._counters.dead_letter(bad[0][1])
        # info, not warning: an unconfigured logger would print every one to stderr;
        # dead letters are counted in the progress line and listed by `failed`.
        log.info("dead-lettered %d message(s): %s", len(done), bad[0][1])

    def _give_up(self, rows: Sequence[Row], error: str) -> set[str]:
        """Attempts ran out: dead-letter the rows that used them all, release the others."""
        exhausted = [row for row in rows if row.attempts >= self.max_attempts]
        others = [row for row in rows if row.attempts < self.max_attempts]
        if exhausted:
            self._dead_letter(
                [(row, f"gave up after {row.attempts} attempts: {error}") for row in exhausted]
            )
        if others:
            self._hold_back(others)
        return {row.person for row in others}

    # -- one request with retries ------------------------------------------------------

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, _Transient) and exc.retry_after is not None:
            return exc.retry_after + random.uniform(0, 0.1)
        return self._backoff(state)

    def _sleep(self, seconds: float) -> None:
        if self._stop.wait(seconds):
            raise _Stopped()

    def _send_with_retries(self, claim: _Claim, endpoint: str) -> tuple[Reply, int]:
        retrying = Retrying(
            retry=retry_if_exception_type(_Transient),
            # Only answered attempts count: a network outage never dead-letters a row.
            stop=lambda state: max(row.attempts for row in claim.rows) >= self.max_attempts,
            wait=self._wait,
            sleep=self._sleep,
            before_sleep=lambda state: self._counters.add(retries=1),
            reraise=True,
        )
        try:
            for attempt in retrying:
                with attempt:
                    return self._send_once(claim, endpoint)
        except RetryError as exc:  # pragma: no cover - reraise=True re-raises the cause
            raise exc.last_attempt.exception() or _Transient("retries exhausted") from None
        raise AssertionError("unreachable")

    def _send_once(self, claim: _Claim, endpoint: str) -> tuple[Reply, int]:
        if not self.throttle.acquire(self._stop):
            raise _Stopped()
        # Before each send and each retry, as late as possible: a worker paused past its
        # lease (SIGSTOP, a suspended laptop) must not send rows another worker now holds.
        self._still_held(claim)
        rows = claim.rows
        sent_at = sent_at_now()
        if endpoint == "alias":
            body = single_body(rows[0].payload, sent_at)
        else:
            body = batch_body([row.payload for row in rows], sent_at)
        self._counters.add(requests=1)
        try:
            reply = self.client.send(endpoint, body)
        except TransportError as exc:
            if exc.may_have_arrived:
                claim.unconfirmed += 1
                self._transient(rows, endpoint, len(body), None, str(exc), None,
                                count=False, outcome="may have arrived")
                if claim.unconfirmed >= self.max_unconfirmed:
                    raise _Unconfirmed(
                        f"may have arrived: sent {claim.unconfirmed} times without an answer "
                        f"(last: {exc}); check the workspace before requeueing, a resend "
                        "could duplicate it") from None
            else:
                self._transient(rows, endpoint, len(body), None, str(exc), None, count=False)
                self._give_up_if_never_answered(rows, exc)
            raise _Transient(str(exc)) from None
        self._answered.set()
        self._round_trip = _ewma(self._round_trip, reply.latency_ms / 1000)
        if reply.status_code == 429 or reply.status_code == 408 or reply.status_code >= 500:
            error = reply.describe()
            if reply.status_code == 429:
                pause = reply.retry_after if reply.retry_after is not None else 1.0
                self.throttle.pause(pause)
                error = f"rate limited (HTTP 429), retrying in {pause:g}s"
            self._transient(rows, endpoint, len(body), reply, error, reply.latency_ms)
            raise _Transient(error, reply.retry_after if reply.status_code == 429 else None)
        return reply, len(body)

    def _give_up_if_never_answered(self, rows: Sequence[Row], exc: TransportError) -> None:
        waited = time.monotonic() - self._started
        if (not self._until_empty or self._answered.is_set() or self.unreachable_timeout is None
                or waited < self.unreachable_timeout):
            return
        self.storage.release(rows)
        raise WorkerError(
            f"{self.client.target.base_url} never answered in {waited:.0f} s, so the worker "
            f"gave up (--until-empty; --unreachable-timeout): {exc}. Check --host / CIO_HOST "
            "(scheme, spelling); cio-outbox check tells whether it answers like the API."
        )

    def _transient(
        self, rows: Sequence[Row], endpoint: str, size: int, reply: Reply | None,
        error: str, latency_ms: float | None, *, count: bool = True, outcome: str = "",
    ) -> None:
        self._counters.error(error)
        held = set(self._store(
            self.storage.record_attempt,
            Attempt(
                worker_id=self.worker_id, endpoint=endpoint, rows=rows, bytes=size,
                status_code=reply.status_code if reply else None, latency_ms=latency_ms,
                outcome=outcome or ("retry" if count else "no answer"), error=error,
            ),
            count=count,
        ))
        if count:
            for row in rows:
                if row.id in held:
                    row.attempts += 1

    def _attempt(
        self, rows: Sequence[Row], endpoint: str, size: int, reply: Reply, outcome: str,
        error: str | None = None,
    ) -> Attempt:
        return Attempt(
            worker_id=self.worker_id, endpoint=endpoint, rows=rows, bytes=size,
            status_code=reply.status_code, latency_ms=reply.latency_ms, outcome=outcome,
            error=error,
        )
