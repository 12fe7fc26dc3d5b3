"""Soak: crash-and-restart cycles with injected faults, for a bounded time.

Each cycle writes a JSONL file of calls, imports it with ``cio-outbox enqueue`` (killed
with SIGKILL at a random line now and then, and rerun), then drains it with
``cio-outbox worker`` processes that are SIGKILLed at random moments and restarted, into
one local sandbox answering 10% of requests with 5xx and 10% with 429. After every cycle
the outbox and the sandbox are compared: every row sent, every message stored once, each
person's messages in order. Then sent rows are purged and the sandbox reset, so memory and
disk stay bounded however long it runs.

    python scripts/soak.py --minutes 20

Prints the figures at the end (and with ``--json FILE`` writes them as JSON): messages
enqueued, delivered, kills, resends (sandbox duplicates), lost (must be 0), dead-lettered
(must be 0 unless ``--poison`` injects some). Exit code 0 when nothing was lost and
nothing unexpected was dead-lettered, else 1. Only loopback is used.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from cio_outbox import Outbox
from cio_outbox.messages import message_id_for
from cio_outbox.sandbox import Sandbox

POISON_EVENT = "Soak Poison"
FORBIDDEN = ("database is locked", "Traceback (most recent call last)")


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "cio_outbox", *args]


def _env(key: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CIO_")}
    env.update(PYTHONUNBUFFERED="1", CIO_API_KEY=key)
    return env


def _rows(db: Path) -> int:
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    except sqlite3.Error:
        return 0
    try:
        return conn.execute("SELECT count(*) FROM messages").fetchone()[0]
    except sqlite3.Error:
        return 0
    finally:
        conn.close()


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.workdir = Path(args.workdir or tempfile.mkdtemp(prefix="cio-soak-"))
        self.db = self.workdir / "soak.db"
        self.log = self.workdir / "processes.stderr"
        self.figures: dict[str, Any] = defaultdict(int)
        self.problems: list[str] = []
        self.seq: dict[str, int] = defaultdict(int)

    # -- one cycle ---------------------------------------------------------------------

    def write_file(self, cycle: int, path: Path) -> tuple[int, int]:
        """A JSONL file of this cycle's calls; returns (lines, poison lines)."""
        size = self.args.messages
        tracks = [i for i in range(size) if i % 10]  # every tenth line is an identify
        poison_at = set(self.rng.sample(tracks, min(self.args.poison, len(tracks))))
        with path.open("w", encoding="utf-8") as out:
            for i in range(size):
                person = f"c{cycle}-p{self.rng.randrange(self.args.persons)}"
                event = POISON_EVENT if i in poison_at else "Soak Step"
                call = {"type": "track", "userId": person, "event": event,
                        "properties": {"seq": self.seq[person], "cycle": cycle, "line": i + 1,
                                       "pad": "x" * self.args.pad}}
                self.seq[person] += 1
                if i % 10 == 0:
                    call = {"type": "identify", "userId": person,
                            "traits": {"seq": self.seq[person] - 1, "cycle": cycle}}
                out.write(json.dumps(call) + "\n")
        return size, len(poison_at)

    def enqueue(self, path: Path, run: str, key: str) -> None:
        """Import the file; kill the import at a random line now and then, then rerun."""
        argv = _cli("enqueue", str(path), "--db", str(self.db), "--run", run)
        if self.rng.random() < 0.5:
            base = _rows(self.db)
            target = base + self.rng.randrange(1, self.args.messages)
            proc = subprocess.Popen(argv, env=_env(key), stdout=subprocess.DEVNULL,
                                    stderr=self.log.open("ab"))
            deadline = time.monotonic() + 120
            while proc.poll() is None and _rows(self.db) < target and time.monotonic() < deadline:
                time.sleep(0.005)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                self.figures["enqueue_kills"] += 1
            proc.wait(timeout=60)
        done = subprocess.run(argv, env=_env(key), stdout=subprocess.DEVNULL,
                              stderr=self.log.open("ab"), timeout=600)
        if done.returncode != 0:
            self.problems.append(f"enqueue of {path.name} exited {done.returncode}")

    def worker(self, sandbox: Sandbox) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            _cli("worker", "--db", str(self.db), "--host", sandbox.url, "--until-empty",
                 "--worker-id", "soak-worker", "--concurrency", "2"),
            env=_env(sandbox.key), stdout=subprocess.DEVNULL, stderr=self.log.open("ab"),
        )

    def drain(self, sandbox: Sandbox, total: int, deadline: float) -> None:
        """Drain with random SIGKILLs, then one worker to the end."""
        for _ in range(self.rng.randint(1, self.args.kills_per_cycle)):
            if time.monotonic() > deadline:
                break
            proc = self.worker(sandbox)
            target = self.rng.randrange(1, total)
            limit = time.monotonic() + 120
            while (proc.poll() is None and sandbox.stats()["messages"] < target
                   and time.monotonic() < limit):
                time.sleep(0.01)
            time.sleep(self.rng.uniform(0.0, 0.5))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                self.figures["kills"] += 1
            proc.wait(timeout=60)
        final = self.worker(sandbox)
        try:
            code = final.wait(timeout=900)
        except subprocess.TimeoutExpired:
            final.kill()
            final.wait()
            code = -9
        if code != 0:
            self.problems.append(f"final worker exited {code}")

    def verify(self, sandbox: Sandbox, run: str, lines: int, poison: int) -> None:
        stats = sandbox.stats()
        arrivals = sandbox.messages(limit=10**7)
        received = {m["messageId"] for m in arrivals}
        with Outbox(self.db) as box:
            status = box.status(run)
            failed = box.failed(run=run, limit=10**6)
            rows = box.rows(run=run, limit=10**7)
        expected = {message_id_for(f"{run}:{line}") for line in range(1, lines + 1)}
        ids = {row["message_id"] for row in rows}
        failed_ids = {row["messageId"] for row in failed}
        lost = len(expected - received - failed_ids)
        f = self.figures
        f["messages_enqueued"] += len(ids)
        f["delivered"] += len(received)
        f["resends"] += stats["duplicates"]
        f["lost"] += lost
        f["dead_lettered"] += status["failed"]
        f["injected_5xx"] += stats["injected_failures"]
        f["throttled_429"] += stats["by_status"].get("429", 0)
        f["requests"] += stats["requests"]
        if ids != expected:
            self.problems.append(f"{run}: {len(expected - ids)} lines missing from the outbox, "
                                 f"{len(ids - expected)} unexpected rows")
        if lost:
            self.problems.append(f"{run}: {lost} messages lost")
        if received - expected:
            self.problems.append(f"{run}: sandbox holds {len(received - expected)} unknown ids")
        if status["pending"] or status["in_flight"]:
            self.problems.append(f"{run}: rows left pending/in flight: {status}")
        if status["failed"] != poison or any(POISON_EVENT not in (r["error"] or "")
                                             for r in failed):
            self.problems.append(f"{run}: {status['failed']} dead-lettered, {poison} poisoned")
        last: dict[str, int] = {}
        for message in arrivals:
            seq = (message.get("properties") or message.get("traits") or {}).get("seq")
            person = message["userId"]
            if seq is not None and seq < last.get(person, -1):
                self.problems.append(f"{run}: {person} out of order")
                break
            if seq is not None:
                last[person] = seq

    def cycle(self, cycle: int, sandbox: Sandbox, deadline: float) -> None:
        run = f"soak-{cycle}"
        path = self.workdir / f"{run}.jsonl"
        lines, poison = self.write_file(cycle, path)
        self.enqueue(path, run, sandbox.key)
        self.drain(sandbox, lines, deadline)
        self.verify(sandbox, run, lines, poison)
        with Outbox(self.db) as box:  # keep the file small: sent rows are verified
            self.figures["purged"] += box.purge(0)
        sandbox.reset()
        sandbox.configure(seed=self.rng.randrange(2**32))  # reset re-seeds: vary the faults
        path.unlink()
        self.figures["cycles"] += 1

    def run(self) -> int:
        started = time.monotonic()
        deadline = started + self.args.minutes * 60
        options: dict[str, Any] = {"fail_rate": self.args.fail_rate, "seed": self.args.seed,
                                   "reject_events": [POISON_EVENT]}
        try:
            sandbox = Sandbox(throttle_rate=self.args.throttle_rate, **options)
        except TypeError:  # an older sandbox: its token bucket answers the 429s instead
            print("warning: this sandbox has no throttle_rate; 429s come from rate_limit=4",
                  file=sys.stderr)
            sandbox = Sandbox(rate_limit=4, **options)
        print(f"soak: {self.args.minutes:g} min in {self.workdir}, seed {self.args.seed}",
              flush=True)
        with sandbox:
            cycle = 0
            while time.monotonic() < deadline and not self.problems:
                self.cycle(cycle, sandbox, deadline)
                cycle += 1
                print(f"cycle {cycle}: {json.dumps(dict(self.figures), sort_keys=True)}",
                      flush=True)
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        for forbidden in FORBIDDEN:
            if forbidden in text:
                self.problems.append(f"a process printed {forbidden!r} (see {self.log})")
        f = self.figures
        f["minutes"] = round((time.monotonic() - started) / 60, 1)
        f["expected_dead_lettered"] = self.args.poison * f["cycles"]
        f["problems"] = self.problems
        self.report()
        ok = not self.problems and f["lost"] == 0 and (
            f["dead_lettered"] == f["expected_dead_lettered"])
        return 0 if ok else 1

    def report(self) -> None:
        f = self.figures
        print("\nsoak figures")
        for name in ("minutes", "cycles", "messages_enqueued", "delivered", "kills",
                     "enqueue_kills", "resends", "lost", "dead_lettered",
                     "expected_dead_lettered", "injected_5xx", "throttled_429", "requests"):
            print(f"  {name:<24}{f[name]:>12,}" if isinstance(f[name], int)
                  else f"  {name:<24}{f[name]:>12}")
        print(f"  problems: {self.problems or 'none'}", flush=True)
        if self.args.json:
            Path(self.args.json).write_text(json.dumps(dict(f), indent=2, sort_keys=True))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=20.0, help="How long to run.")
    parser.add_argument("--messages", type=int, default=20_000, help="Calls per cycle.")
    parser.add_argument("--persons", type=int, default=300, help="People per cycle.")
    parser.add_argument("--kills-per-cycle", type=int, default=4,
                        help="At most this many worker SIGKILLs per cycle (at least 1).")
    parser.add_argument("--fail-rate", type=float, default=0.1, help="Injected 5xx rate.")
    parser.add_argument("--throttle-rate", type=float, default=0.1, help="Injected 429 rate.")
    parser.add_argument("--pad", type=int, default=400,
                        help="Padding characters per track call (more requests per cycle).")
    parser.add_argument("--poison", type=int, default=0,
                        help="Poison calls per cycle (the sandbox rejects them).")
    parser.add_argument("--seed", type=int, default=None, help="Random seed.")
    parser.add_argument("--workdir", help="Folder for the outbox (default: a temp folder).")
    parser.add_argument("--json", help="Also write the figures to this JSON file.")
    args = parser.parse_args(argv)
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(2**32)
    if args.minutes <= 0 or args.messages < 2 or args.kills_per_cycle < 1:
        parser.error("--minutes must be positive, --messages at least 2, "
                     "--kills-per-cycle at least 1")
    return Soak(args).run()


if __name__ == "__main__":
    sys.exit(main())
