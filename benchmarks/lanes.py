"""Section 7: parallel sending, the targets of issue 17, measured in one run.

    python -m benchmarks --only lanes [--quick | --full] [--reps N]
    python -m benchmarks.lanes [same options]            # the same thing
    python -m benchmarks.lanes --postgres-only [--n 50000] [--reps 1]   # figure 5 alone

Every drain is a whole worker process (``benchmarks.lanes_child``) on a fresh copy of the
same filled outbox. Servers:

- the zero-cost sink (``benchmarks.sink``, nginx on loopback) where only our own cost
  should count;
- the recorder (``benchmarks.recorder``) where a round trip must take time (200 ms, a large
  batch's real round trip; 40 ms for the end-to-end comparison): it answers after the
  delay and records each person's arrival order, so order inversions are counted.

Figures (each a ratio of two measurements made one after the other in this run):

1. concurrency 4 vs 1 into the sink, on a file of 50 people (a few accounts with many
   events) and on one of 10,000 people: time at 4 over time at 1, target <= 1.05;
2. at 200 ms per request, 50 people: time at 1 over time at 4, target >= 2.5, with 0
   per-person order inversions;
3. our drain at concurrency 1 over a lean single-threaded drain of the same outbox
   (``lanes_child.lean``), target >= 0.9;
4. end to end (enqueue a 50,000-line JSONL file, then drain, Worker defaults) over the
   official customerio-cdp-analytics: with its defaults on loopback (into the sink; its
   rate counts what it did not drop), target >= 2; with a queue that drops nothing at
   40 ms, target >= 8;
5. PostgreSQL (``CIO_TEST_POSTGRES_URL``, a schema of its own, dropped after): 4 worker
   processes of one sender each vs 1, at 200 ms: time at 1 over time at 4, target >= 3,
   0 inversions. Skipped, with the reason in the table, without a server.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol

from benchmarks.common import (
    TIMESTAMP,
    checkpoint,
    checkpoint_copy,
    events,
    median,
    remove_db,
    run_child,
)
from benchmarks.recorder import Recorder, order_report
from benchmarks.sink import Sink
from cio_outbox import Outbox

FEW_PEOPLE = 50
MANY_PEOPLE = 10_000
LATENCY = 0.2
E2E_LATENCY = 0.04
_ID_NAMESPACE = uuid.UUID("6f1c2a3b-4d5e-4f60-8a7b-9c0d1e2f3a4b")
CHILD = "benchmarks.lanes_child"


@dataclass(frozen=True)
class LaneSizes:
    reps: int
    sink_calls: int  # the 50-person and the 10,000-person files into the sink
    latency_calls: int  # the 50-person file at 200 ms
    e2e_lines: int
    postgres_calls: int


SIZES = {
    "quick": LaneSizes(reps=1, sink_calls=20_000, latency_calls=10_000, e2e_lines=5_000,
                       postgres_calls=10_000),
    # The sizes, except 100,000 calls (not 200,000) at 200 ms and 50,000 on
    # PostgreSQL, so that one run stays within a few minutes on a busy 2-core machine.
    "default": LaneSizes(reps=1, sink_calls=200_000, latency_calls=100_000,
                         e2e_lines=50_000, postgres_calls=50_000),
    "full": LaneSizes(reps=3, sink_calls=200_000, latency_calls=200_000, e2e_lines=50_000,
                      postgres_calls=200_000),
}


class Table(Protocol):
    def section(self, title: str) -> None: ...

    def add(self, figure: str, ours: Any, reference: Any = None, ref_name: str = "",
            ratio: Any = None, target: str = "", met: bool | None = None) -> None: ...


def lane_event(i: int, people: int, tag: str) -> dict[str, Any]:
    """The i-th small track call of a file of ``people`` people, in wire shape."""
    person = i % people
    return {
        "type": "track", "userId": f"user-{person}", "anonymousId": f"anon-{person}",
        "event": "Item Viewed",
        "properties": {"sku": f"SKU-{i:07d}", "price": 19.99, "qty": 1 + i % 5},
        "timestamp": TIMESTAMP,
        "messageId": str(uuid.uuid5(_ID_NAMESPACE, f"{tag}:{i}")),
    }


def fill(location: str | Path, n: int, people: int, tag: str) -> float:
    """Enqueue n calls in bulk; returns the seconds it took."""
    started = time.perf_counter()
    with Outbox(location) as outbox:
        for start in range(0, n, 50_000):
            outbox.enqueue_many([lane_event(i, people, tag)
                                 for i in range(start, min(n, start + 50_000))])
    return time.perf_counter() - started


def positions(n: int, people: int, tag: str) -> dict[str, int]:
    """messageId -> enqueue position (increasing within each person)."""
    return {lane_event(i, people, tag)["messageId"]: i for i in range(n)}


def _expect_sent(result: dict[str, Any], n: int, what: str) -> None:
    counts = result["counts"]
    if counts.get("sent") != n:
        raise RuntimeError(f"{what}: {counts} after the drain, expected {n:,} sent")


class _Template:
    """A filled SQLite outbox; each drain gets a fresh copy of it."""

    def __init__(self, workdir: Path, n: int, people: int, log: Callable[[str], None]) -> None:
        self.n, self.people = n, people
        self.tag = f"lanes-{people}"
        self.path = workdir / f"lanes-{people}-{n}.template.db"
        self.copy = workdir / f"lanes-{people}-{n}.db"
        if not self.path.exists():
            log(f"  filling {n:,} calls of {people:,} people")
            self.fill_seconds = fill(self.path, n, people, self.tag)
            checkpoint(self.path)

    def fresh(self) -> str:
        checkpoint_copy(self.path, self.copy)
        return str(self.copy)


def _drain(db: str, url: str, key: str, server_pid: int, worker: dict[str, Any]) -> \
        dict[str, Any]:
    return run_child({"mode": "drain", "db": db, "url": url, "key": key,
                      "server_pid": server_pid, "worker": worker}, module=CHILD)


def _medians(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    return {name: {"elapsed": median([r["elapsed"] for r in rs]),
                   "runs": [r["elapsed"] for r in rs],
                   "client_cpu": median([r["client_cpu"] for r in rs])}
            for name, rs in runs.items()}


def sink_section(workdir: Path, sink: Sink, template: _Template, reps: int, lean: bool,
                 log: Callable[[str], None]) -> dict[str, Any]:
    """Concurrency 1 and 4 (and the lean reference) into the sink, interleaved."""
    runs: dict[str, list[dict[str, Any]]] = {"c1": [], "c4": []}
    if lean:
        runs["lean"] = []
    for rep in range(reps):
        for name in runs:
            log(f"  sink, {template.people:,} people, {name} (rep {rep + 1})")
            sink.reset()
            db = template.fresh()
            if name == "lean":
                result = run_child({"mode": "lean", "db": db, "url": sink.url,
                                    "key": sink.key, "server_pid": sink.pid}, module=CHILD)
                if result["sent"] != template.n:
                    raise RuntimeError(f"lean drain sent {result['sent']} of {template.n}")
            else:
                result = _drain(db, sink.url, sink.key, sink.pid,
                                {"concurrency": int(name[1:])})
                _expect_sent(result, template.n, f"drain {name}")
            result["sink"] = sink.stats()
            runs[name].append(result)
    out = {"n": template.n, "people": template.people, **_medians(runs),
           "requests": {name: rs[-1]["sink"]["requests"] for name, rs in runs.items()}}
    out["c4_over_c1_time"] = out["c4"]["elapsed"] / out["c1"]["elapsed"]
    if lean:
        out["c1_over_lean_rate"] = out["lean"]["elapsed"] / out["c1"]["elapsed"]
    return out


def latency_section(template: _Template, reps: int, log: Callable[[str], None]) -> \
        dict[str, Any]:
    """Concurrency 1 and 4 at LATENCY per request, with per-person order counted."""
    where = positions(template.n, template.people, template.tag)
    runs: dict[str, list[dict[str, Any]]] = {"c1": [], "c4": []}
    orders: dict[str, dict[str, int]] = {}
    with Recorder(latency=LATENCY) as rec:
        for rep in range(reps):
            for name in runs:
                log(f"  {LATENCY * 1000:.0f} ms, {template.people} people, {name} "
                    f"(rep {rep + 1})")
                rec.reset()
                result = _drain(template.fresh(), rec.url, rec.key, rec.pid,
                                {"concurrency": int(name[1:])})
                _expect_sent(result, template.n, f"drain {name} at {LATENCY}s")
                report = order_report(rec.stats(), where)
                orders[name] = {k: max(v, orders.get(name, {}).get(k, 0))
                                for k, v in report.items()}
                runs[name].append(result)
    out = {"n": template.n, "people": template.people, "latency": LATENCY,
           **_medians(runs), "order": orders}
    out["c1_over_c4_time"] = out["c1"]["elapsed"] / out["c4"]["elapsed"]
    return out


def e2e_section(workdir: Path, sink: Sink, n: int, reps: int,
                log: Callable[[str], None]) -> dict[str, Any]:
    """Enqueue a JSONL file and drain it, next to the official library sending the same."""
    tag = "e2e"
    file = workdir / f"e2e-{n}.jsonl"
    with open(file, "w") as fh:
        for e in events(0, n, tag):  # the official child sends exactly these
            fh.write(json.dumps(e) + "\n")
    db = workdir / "e2e.db"

    def ours(url: str, key: str, pid: int) -> dict[str, Any]:
        remove_db(db)
        result = run_child({"mode": "e2e", "db": str(db), "file": str(file), "url": url,
                            "key": key, "server_pid": pid}, module=CHILD)
        _expect_sent(result, n, "end to end")
        return result

    def official(url: str, key: str, pid: int, client: dict[str, Any]) -> dict[str, Any]:
        return run_child({"mode": "official", "url": url, "key": key, "start": 0, "n": n,
                          "run_tag": tag, "client": client, "sandbox_pid": pid})

    out: dict[str, Any] = {"n": n, "people": MANY_PEOPLE}
    runs: dict[str, list[dict[str, Any]]] = {"ours_0ms": [], "official_default_0ms": [],
                                             "ours_40ms": [], "official_nodrop_40ms": []}
    with Recorder(latency=E2E_LATENCY) as rec:
        for rep in range(reps):
            log(f"  end to end, loopback sink (rep {rep + 1})")
            sink.reset()
            runs["ours_0ms"].append(ours(sink.url, sink.key, sink.pid))
            sink.reset()
            result = official(sink.url, sink.key, sink.pid, {})
            result["delivered"] = n - result["dropped_by_track"]
            runs["official_default_0ms"].append(result)
            log(f"  end to end, {E2E_LATENCY * 1000:.0f} ms (rep {rep + 1})")
            rec.reset()
            runs["ours_40ms"].append(ours(rec.url, rec.key, rec.pid))
            rec.reset()
            result = official(rec.url, rec.key, rec.pid, {"max_queue_size": n + 1})
            result["delivered"] = rec.stats()["messages"]
            if result["delivered"] != n:
                raise RuntimeError(f"official, no drop: {result['delivered']} of {n} arrived")
            runs["official_nodrop_40ms"].append(result)
    for name, rs in runs.items():
        delivered = [r.get("delivered", n) for r in rs]
        out[name] = {"rate": median([d / r["elapsed"] for d, r in zip(delivered, rs,
                                                                       strict=True)]),
                     "elapsed": median([r["elapsed"] for r in rs]),
                     "delivered": median(delivered)}
    out["ours_0ms"]["enqueue_seconds"] = median([r["enqueue_seconds"]
                                                 for r in runs["ours_0ms"]])
    out["vs_official_default_0ms"] = out["ours_0ms"]["rate"] / \
        out["official_default_0ms"]["rate"]
    out["vs_official_nodrop_40ms"] = out["ours_40ms"]["rate"] / \
        out["official_nodrop_40ms"]["rate"]
    return out


def _drop_schema(url: str, schema: str) -> None:
    import psycopg

    from cio_outbox.storage.postgres import split_location

    with psycopg.connect(split_location(url)[0], autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def _postgres_worker(location: str, rec: Recorder, i: int) -> dict[str, Any]:
    return _drain(location, rec.url, rec.key, rec.pid,
                  {"concurrency": 1, "worker_id": f"bench-{i}"})


def postgres_section(url: str, n: int, reps: int, log: Callable[[str], None]) -> \
        dict[str, Any]:
    """1 and 4 worker processes (one sender each) at LATENCY, on PostgreSQL."""
    tag = "lanes-pg"
    where = positions(n, FEW_PEOPLE, tag)
    sep = "&" if "?" in url else "?"
    runs: dict[str, list[float]] = {"p1": [], "p4": []}
    orders: dict[str, dict[str, int]] = {}
    with Recorder(latency=LATENCY) as rec:
        for rep in range(reps):
            for name in runs:
                procs = int(name[1:])
                schema = f"lanes_bench_{os.getpid()}_{procs}"
                location = f"{url}{sep}schema={schema}"
                _drop_schema(url, schema)
                log(f"  postgres, {procs} process(es): filling {n:,} (rep {rep + 1})")
                fill(location, n, FEW_PEOPLE, tag)
                rec.reset()
                with ThreadPoolExecutor(procs) as pool:
                    results = list(pool.map(partial(_postgres_worker, location, rec),
                                            range(procs)))
                _drop_schema(url, schema)
                if len(results) != procs or sum(r["sent"] for r in results) != n:
                    raise RuntimeError(f"postgres x{procs}: {[r.get('sent') for r in results]}"
                                       f" sent of {n}")
                runs[name].append(max(r["wall_end"] for r in results)
                                  - min(r["wall_start"] for r in results))
                report = order_report(rec.stats(), where)
                orders[name] = {k: max(v, orders.get(name, {}).get(k, 0))
                                for k, v in report.items()}
    out: dict[str, Any] = {"n": n, "people": FEW_PEOPLE, "latency": LATENCY, "order": orders}
    for name, values in runs.items():
        out[name] = {"elapsed": median(values), "runs": values}
    out["p1_over_p4_time"] = out["p1"]["elapsed"] / out["p4"]["elapsed"]
    return out


def run(workdir: Path, *, sizes: LaneSizes, reps: int | None = None,
        postgres_url: str | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    reps = reps or sizes.reps
    out: dict[str, Any] = {"sizes": asdict(sizes), "reps": reps}
    few = _Template(workdir, sizes.sink_calls, FEW_PEOPLE, log)
    many = _Template(workdir, sizes.sink_calls, MANY_PEOPLE, log)
    with Sink() as sink:
        out["sink_few"] = sink_section(workdir, sink, few, reps, lean=True, log=log)
        out["sink_many"] = sink_section(workdir, sink, many, reps, lean=False, log=log)
        out["e2e"] = e2e_section(workdir, sink, sizes.e2e_lines, reps, log)
    slow = few if sizes.latency_calls == few.n else \
        _Template(workdir, sizes.latency_calls, FEW_PEOPLE, log)
    out["latency"] = latency_section(slow, reps, log)
    postgres_url = postgres_url or os.environ.get("CIO_TEST_POSTGRES_URL")
    if postgres_url:
        out["postgres"] = postgres_section(postgres_url, sizes.postgres_calls, reps, log)
    else:
        out["postgres"] = {"skipped": "set CIO_TEST_POSTGRES_URL to a PostgreSQL server"}
    return out


def add_rows(t: Table, r: dict[str, Any]) -> None:
    t.section(f"7. lanes and parallel sending (issue 17), median of {r['reps']}; "
              "time in s unless said")
    for key in ("sink_few", "sink_many"):
        s = r[key]
        label = f"sink, {s['people']:,} people, {s['n']:,} calls"
        t.add(f"{label}: c4 vs c1 time", s["c4"]["elapsed"], s["c1"]["elapsed"],
              "concurrency 1", s["c4_over_c1_time"], "<= 1.05", s["c4_over_c1_time"] <= 1.05)
        t.add("  msg/s at c1 / c4", s["n"] / s["c1"]["elapsed"], s["n"] / s["c4"]["elapsed"],
              "at c4")
        t.add("  worker CPU s at c1 / c4", s["c1"]["client_cpu"], s["c4"]["client_cpu"],
              "at c4")
    s = r["sink_few"]
    t.add("drain c1 vs lean drain, msg/s", s["n"] / s["c1"]["elapsed"],
          s["n"] / s["lean"]["elapsed"], "lean single thread", s["c1_over_lean_rate"],
          ">= 0.9", s["c1_over_lean_rate"] >= 0.9)
    lat = r["latency"]
    inversions = lat["order"]["c4"]["inversions"]
    t.add(f"{lat['latency'] * 1000:.0f} ms, {lat['people']} people, {lat['n']:,}: c1 vs c4",
          lat["c4"]["elapsed"], lat["c1"]["elapsed"], "c1 time / c4 time",
          lat["c1_over_c4_time"], ">= 2.5", lat["c1_over_c4_time"] >= 2.5)
    t.add("  order inversions / duplicates at c4", f"{inversions} / "
          f"{lat['order']['c4']['duplicates']}", f"{lat['order']['c1']['inversions']} / "
          f"{lat['order']['c1']['duplicates']}", "at c1", None, "0 inversions",
          inversions == 0)
    e = r["e2e"]
    t.add(f"end to end {e['n']:,} lines, loopback: msg/s", e["ours_0ms"]["rate"],
          e["official_default_0ms"]["rate"],
          f"official defaults ({e['n'] - e['official_default_0ms']['delivered']:,.0f} dropped)",
          e["vs_official_default_0ms"], ">= 2", e["vs_official_default_0ms"] >= 2)
    t.add("  of which enqueue s (ours)", e["ours_0ms"]["enqueue_seconds"],
          e["ours_0ms"]["elapsed"], "whole run s")
    t.add(f"end to end at {E2E_LATENCY * 1000:.0f} ms: msg/s", e["ours_40ms"]["rate"],
          e["official_nodrop_40ms"]["rate"], "official, queue drops nothing",
          e["vs_official_nodrop_40ms"], ">= 8", e["vs_official_nodrop_40ms"] >= 8)
    add_postgres_rows(t, r["postgres"])


def add_postgres_rows(t: Table, p: dict[str, Any]) -> None:
    if "skipped" in p:
        t.add("postgres 4 processes vs 1", "skipped", None, p["skipped"])
        return
    inversions = p["order"]["p4"]["inversions"]
    t.add(f"postgres {p['latency'] * 1000:.0f} ms, {p['n']:,}: 4 procs vs 1",
          p["p4"]["elapsed"], p["p1"]["elapsed"], "1 process time / 4", p["p1_over_p4_time"],
          ">= 3", p["p1_over_p4_time"] >= 3)
    t.add("  order inversions / duplicates, 4 procs", f"{inversions} / "
          f"{p['order']['p4']['duplicates']}", f"{p['order']['p1']['inversions']} / "
          f"{p['order']['p1']['duplicates']}", "1 process", None, "0 inversions",
          inversions == 0)


def postgres_main(argv: list[str]) -> int:
    """Only the PostgreSQL figure (1 and 4 worker processes at 200 ms), for working on it
    without the SQLite sections' minutes."""
    import argparse
    import sys

    from benchmarks.run import Table as RunTable

    parser = argparse.ArgumentParser(prog="python -m benchmarks.lanes --postgres-only")
    parser.add_argument("--n", type=int, default=SIZES["default"].postgres_calls,
                        help="calls of 50 people to drain (default %(default)s)")
    parser.add_argument("--reps", type=int, default=1, help="repetitions (median reported)")
    args = parser.parse_args(argv)
    url = os.environ.get("CIO_TEST_POSTGRES_URL")
    if not url:
        parser.error("set CIO_TEST_POSTGRES_URL to a PostgreSQL server")
    start = os.getloadavg()[0]

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    result = postgres_section(url, args.n, args.reps, log)
    table = RunTable()
    add_postgres_rows(table, result)
    print(f"load average {start:.2f} at start, {os.getloadavg()[0]:.2f} at end; runs (s):"
          f" 1 process {[round(x, 2) for x in result['p1']['runs']]}, 4 processes"
          f" {[round(x, 2) for x in result['p4']['runs']]}")
    print(table.render())
    return 0


def main(argv: list[str] | None = None) -> int:
    import sys

    from benchmarks.run import main as run_main  # the shared table and JSON output

    args = sys.argv[1:] if argv is None else argv
    if "--postgres-only" in args:
        return postgres_main([a for a in args if a != "--postgres-only"])
    return run_main(["--only", "lanes", *args])


if __name__ == "__main__":
    raise SystemExit(main())
