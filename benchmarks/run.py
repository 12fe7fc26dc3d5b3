"""``python -m benchmarks``: run every section, print one table, write the figures as JSON."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import drain, enqueue, faults, gzip_bench, intake, lanes, scale
from benchmarks.common import machine

SECTIONS = ("intake", "enqueue", "drain", "scale", "faults", "gzip", "lanes")
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "latest.json"


@dataclass(frozen=True)
class Sizes:
    reps: int
    single: int
    bulk: int
    full_sync: int
    drain: int
    official_reps: int
    scale: tuple[int, ...]
    big: int
    faults: int
    gzip: int


QUICK = Sizes(reps=1, single=2_000, bulk=20_000, full_sync=300, drain=10_000,
              official_reps=1, scale=(2_000, 10_000), big=100_000, faults=10_000,
              gzip=10_000)
DEFAULT = Sizes(reps=3, single=20_000, bulk=200_000, full_sync=1_000, drain=100_000,
                official_reps=3, scale=(10_000, 100_000), big=1_000_000, faults=100_000,
                gzip=100_000)
FULL = Sizes(reps=3, single=20_000, bulk=1_000_000, full_sync=1_000, drain=100_000,
             official_reps=3, scale=(10_000, 100_000, 1_000_000), big=10_000_000,
             faults=100_000, gzip=100_000)

#: Our worker's settings (the rest are Worker defaults: 500 KB / 5,000 messages per request).
#: On loopback the work is CPU-bound on both sides and the machine has 2 cores: 2 senders
#: overlap our SQLite work with the sandbox's. At 40 ms a request mostly waits, so more
#: senders keep more batches in flight, up to a cap set by per-person ordering: a 500 KB
#: batch holds about 1,700 of the 10,000 people, so beyond about 5 batches in flight every
#: pending row belongs to a person already in flight and extra senders sit idle
#: (idle_interval, 0.5 s). Measured at 40 ms, 50,000 events: 1 -> 3.3k/s, 2 -> 5.6k/s,
#: 4 -> 6.2k/s, 8 -> 4.1k/s, 16 -> 3.7k/s (loaded machine).
CONCURRENCY = {"default": 2, "0ms": 2, "40ms": 4}


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.3g}"
    return f"{value:,}"


class Table:
    def __init__(self) -> None:
        self.rows: list[tuple[str, ...]] = []
        self.targets: list[dict[str, Any]] = []

    def section(self, title: str) -> None:
        self.rows.append((f"== {title}",))

    def add(self, figure: str, ours: Any, reference: Any = None, ref_name: str = "",
            ratio: Any = None, target: str = "", met: bool | None = None) -> None:
        mark = "" if met is None else ("MET" if met else "MISSED")
        self.rows.append((figure, _fmt(ours), _fmt(reference), ref_name, _fmt(ratio),
                          target, mark))
        if met is not None:
            self.targets.append({"figure": figure, "value": ratio if ratio is not None
                                 else ours, "target": target, "met": met})

    def render(self) -> str:
        head = ("figure", "ours", "reference", "reference is", "ratio", "target", "")
        body = [r for r in self.rows if len(r) > 1]
        widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
        lines = []
        for row in [head, *self.rows]:
            if len(row) == 1:
                lines.append(row[0])
                continue
            cells = [row[0].ljust(widths[0])]
            cells += [row[i].rjust(widths[i]) if i in (1, 2, 4) else row[i].ljust(widths[i])
                      for i in range(1, len(row))]
            lines.append("  ".join(cells).rstrip())
        return "\n".join(lines)


def _enqueue_rows(t: Table, r: dict[str, Any]) -> None:
    t.section(f"1. enqueue, msg/s (avg message {r['message_bytes_avg']:.0f} B)")
    s, b, y = r["single"], r["bulk"], r["synchronous"]
    t.add("enqueue(), one per call", s["outbox_enqueue_per_s"]["median"],
          s["raw_single_commit_per_s"]["median"], "raw INSERT+commit", s["ratio"], ">= 0.5",
          s["ratio"] >= 0.5)
    t.add("track(), one per call", s["outbox_track_per_s"]["median"],
          s["raw_single_commit_per_s"]["median"], "raw INSERT+commit",
          s["outbox_track_per_s"]["median"] / s["raw_single_commit_per_s"]["median"])
    t.add("enqueue_many()", b["outbox_enqueue_many_per_s"]["median"],
          b["raw_executemany_per_s"]["median"], "raw executemany", b["ratio"], ">= 0.3",
          b["ratio"] >= 0.3)
    t.add("enqueue_many() absolute", b["outbox_enqueue_many_per_s"]["median"],
          target=">= 100,000/s", met=b["outbox_enqueue_many_per_s"]["median"] >= 100_000)
    t.add("raw executemany, outbox schema", b["raw_executemany_outbox_schema_per_s"]["median"],
          b["raw_executemany_per_s"]["median"], "raw executemany",
          b["raw_executemany_outbox_schema_per_s"]["median"]
          / b["raw_executemany_per_s"]["median"])
    t.add("enqueue(), synchronous=FULL", y["full_per_s"]["median"],
          y["normal_per_s"]["median"], "same, NORMAL", y["full_over_normal"])
    t.add("  FULL costs ms per call", y["full_extra_ms_per_call"])
    t.add("raw INSERT+commit, FULL", y["raw_full_per_s"]["median"])


def _drain_rows(t: Table, r: dict[str, Any]) -> None:
    t.section(f"2. drain {r['n']:,} track events into the {r.get('target', 'sandbox')}, msg/s "
              f"({r['events_per_request']:.0f} events per request)")
    for label, d in r["latencies"].items():
        conc = d["worker_settings"]["concurrency"]
        ours = d["ours_per_s"]["median"]
        t.add(f"[{label}] ours (concurrency {conc})", ours)
        t.add(f"[{label}]   ours, enqueue_many + drain", d["ours_with_enqueue_per_s"],
              d["official_default_per_s"]["median"], "official, defaults",
              d["ours_with_enqueue_per_s"] / d["official_default_per_s"]["median"])
        t.add(f"[{label}]   vs official, defaults", ours, d["official_default_per_s"]["median"],
              f"official ({d['official_default_dropped']:,} dropped)",
              d["ours_over_official_default"], ">= 3" if label == "0ms" else "",
              d["ours_over_official_default"] >= 3 if label == "0ms" else None)
        t.add(f"[{label}]   vs official, no drop", ours, d["official_nodrop_per_s"]["median"],
              f"official max_queue_size={r['n'] + 1:,}", d["ours_over_official_nodrop"],
              ">= 10" if label == "40ms" else "",
              d["ours_over_official_nodrop"] >= 10 if label == "40ms" else None)
        t.add(f"[{label}]   vs wire ceiling", ours, d["wire_per_s"]["median"],
              f"requests loop x{conc}", d["ours_over_wire"], ">= 0.5",
              d["ours_over_wire"] >= 0.5)
        t.add(f"[{label}]   official defaults: dropped", d["official_default_dropped"],
              r["n"], "events sent")


def _cpu_rows(t: Table, r: dict[str, Any]) -> None:
    t.section("6. CPU share during drains (CPU s / wall s; 1.0 = one core; 2 cores)")
    for label, d in r["latencies"].items():
        for who, c in d["cpu"].items():
            t.add(f"[{label}] {who}: client / sandbox", c["client_cpu_share"],
                  c["sandbox_cpu_share"], "sandbox share")


def _scale_rows(t: Table, sizes: dict[str, Any], big: dict[str, Any] | None) -> None:
    t.section("3. scale: us per message and worker peak RSS (MB)")
    first = next(iter(sizes["sizes"].values()))
    for n, s in sizes["sizes"].items():
        t.add(f"{int(n):>9,}: enqueue_many us/msg", s["enqueue_us_per_message"],
              first["enqueue_us_per_message"], "smallest size",
              s["enqueue_us_per_message"] / first["enqueue_us_per_message"])
        t.add(f"{int(n):>9,}: drain us/msg", s["drain_us_per_message"],
              first["drain_us_per_message"], "smallest size",
              s["drain_us_per_message"] / first["drain_us_per_message"])
        t.add(f"{int(n):>9,}: worker RSS peak MB", s["worker_rss_peak_mb"],
              first["worker_rss_peak_mb"], "smallest size",
              s["worker_rss_peak_mb"] / first["worker_rss_peak_mb"])
    if big:
        ref = f"{big['pending']:,} rows outbox"
        t.add(f"claim, {big['rows']:,} rows ({big['pending']:,} pending), ms",
              big["claim"]["median_ms"], big["reference_claim"]["median_ms"], ref,
              big["claim"]["median_ms"] / big["reference_claim"]["median_ms"])
        t.add("  rows per claim", big["claim"]["rows_per_claim"])
        t.add(f"status(), {big['rows']:,} rows, ms", big["status"]["median_ms"],
              big["reference_status"]["median_ms"], ref,
              big["status"]["median_ms"] / big["reference_status"]["median_ms"])


def _faults_rows(t: Table, r: dict[str, Any]) -> None:
    t.section(f"4. faults: {r['fail_rate_5xx']:.0%} 5xx + {r['rate_429']:.0%} 429 "
              f"(Retry-After 1 s), {r['n']:,} events, concurrency "
              f"{r['worker_settings']['concurrency']}")
    t.add("drain msg/s under faults", r["faults_per_s"]["median"], r["clean_per_s"]["median"],
          "no faults, same proxy", r["faults_over_clean"])
    f = r["faults_run"]
    t.add("requests per message delivered", r["requests_per_message"],
          r["clean_run"]["requests_per_message"], "no faults")
    t.add("requests per batch delivered", r["requests_per_batch_delivered"],
          r["clean_run"]["requests_per_batch_delivered"], "no faults")
    t.add("injected 5xx / 429", f"{f['injected_5xx']} / {f['injected_429']}",
          f"{f['requests_sent']}", "requests sent")
    t.add("delivered / duplicates at sandbox", f"{f['delivered']:,} / "
          f"{f['duplicates_at_sandbox']}", r["n"], "events")


def _gzip_rows(t: Table, r: dict[str, Any]) -> None:
    c = r["compression"]
    t.section(f"5. gzip on {c['body_bytes'] / 1000:.0f} KB bodies "
              f"({c['messages_per_body']} events each)")
    for level, v in c["levels"].items():
        t.add(f"level {level}: CPU us per message", v["cpu_us_per_message"],
              v["bytes_per_body"], "bytes per body", v["ratio"])
    for label, d in r["drain"].items():
        t.add(f"[{label}] drain gzip on vs off, msg/s", d["on_per_s"]["median"],
              d["off_per_s"]["median"], "gzip off", d["on_over_off"])
        t.add(f"[{label}]   bytes on the wire, on vs off", d["bytes_on_wire_on"],
              d["bytes_on_wire_off"], "gzip off",
              d["bytes_on_wire_on"] / d["bytes_on_wire_off"])
        t.add(f"[{label}]   client CPU s, on vs off", d["client_cpu_s_on"],
              d["client_cpu_s_off"], "gzip off", d["client_cpu_s_on"] / d["client_cpu_s_off"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="cio-outbox benchmarks, side by side with the official library and "
                    "raw ceilings measured in the same run.")
    parser.add_argument("--quick", action="store_true", help="small sizes, one repetition")
    parser.add_argument("--full", action="store_true",
                        help="add the 1,000,000-message scale run and a 10,000,000-row outbox")
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"comma-separated sections to run ({','.join(SECTIONS)})")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output file")
    parser.add_argument("--reps", type=int, default=None, help="repetitions (median reported)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the scratch outbox files go (default: a temp folder)")
    parser.add_argument("--concurrency", type=int, default=None,
                        help="our worker's concurrency on loopback (default 2)")
    parser.add_argument("--concurrency-40ms", type=int, default=None,
                        help="our worker's concurrency at 40 ms latency (default 4)")
    parser.add_argument("--target", choices=drain.TARGETS, default="sandbox",
                        help="server of the drain section: the sandbox (counts every "
                             "message) or the zero-cost nginx sink (loopback only)")
    args = parser.parse_args(argv)

    sizes = QUICK if args.quick else (FULL if args.full else DEFAULT)
    reps = args.reps or sizes.reps
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(only) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section(s): {', '.join(sorted(unknown))}")
    concurrency = dict(CONCURRENCY)
    if args.concurrency:
        concurrency["0ms"] = concurrency["default"] = args.concurrency
    if args.concurrency_40ms:
        concurrency["40ms"] = args.concurrency_40ms
    latencies = [0.0, 0.04]

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    base = Path(tempfile.mkdtemp(prefix="cio-bench-", dir=args.workdir))
    started = time.time()
    results: dict[str, Any] = {
        "mode": "quick" if args.quick else ("full" if args.full else "default"),
        "reps": reps, "sizes": sizes.__dict__, "machine": machine(),
        "worker_concurrency": concurrency, "started_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    table = Table()
    try:
        if "intake" in only:
            log("0. intake (issue 16 targets)")
            sized = ({"lines": 20_000, "small": 10_000, "big": 100_000, "single": 1_000}
                     if args.quick else {})
            results["intake"] = intake.run(base / "intake", reps=reps, log=log, **sized)
            table.section("intake: enqueue against lean_import.py and raw SQLite")
            for figure, value, target, met in intake.rows(results["intake"]):
                table.add(figure, None, ratio=value, target=target, met=met)
        if "enqueue" in only:
            log("1. enqueue")
            results["enqueue"] = enqueue.run(base, n_single=sizes.single, n_bulk=sizes.bulk,
                                             n_full=sizes.full_sync, reps=reps, log=log)
            _enqueue_rows(table, results["enqueue"])
        if "drain" in only:
            log("2. drain")
            results["drain"] = drain.run(base, n=sizes.drain, reps=reps,
                                         concurrency=concurrency, latencies=latencies,
                                         official_reps=min(reps, sizes.official_reps),
                                         target=args.target, log=log)
            _drain_rows(table, results["drain"])
        if "scale" in only:
            log("3. scale")
            results["scale"] = scale.sizes_run(base, sizes=list(sizes.scale),
                                               concurrency=concurrency["0ms"],
                                               reps_small=reps, log=log)
            results["scale_big"] = scale.big_run(base, rows=sizes.big, log=log)
            _scale_rows(table, results["scale"], results["scale_big"])
        if "faults" in only:
            log("4. faults")
            results["faults"] = faults.run(base, n=sizes.faults,
                                           concurrency=concurrency["0ms"], reps=reps, log=log)
            _faults_rows(table, results["faults"])
        if "gzip" in only:
            log("5. gzip")
            results["gzip"] = gzip_bench.run(base, n=sizes.gzip, reps=reps,
                                             concurrency=concurrency, latencies=latencies,
                                             log=log)
            _gzip_rows(table, results["gzip"])
        if "drain" in only:
            _cpu_rows(table, results["drain"])
        if "lanes" in only:
            log("7. lanes")
            mode = "quick" if args.quick else ("full" if args.full else "default")
            results["lanes"] = lanes.run(base, sizes=lanes.SIZES[mode], reps=args.reps,
                                         log=log)
            lanes.add_rows(table, results["lanes"])
    finally:
        shutil.rmtree(base, ignore_errors=True)
    results["elapsed_s"] = time.time() - started
    results["machine"]["load_average_at_end"] = [round(x, 2) for x in
                                                 __import__("os").getloadavg()]
    results["targets"] = table.targets
    text = table.render()
    results["table"] = text
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    m = results["machine"]
    print(f"cio-outbox benchmarks ({results['mode']}, median of {reps}); {m['cpus']} CPUs, "
          f"load average {m['load_average_at_start'][0]} at start and "
          f"{m['load_average_at_end'][0]} at end; SQLite {m['sqlite']}, Python {m['python']}")
    print(text)
    met = sum(1 for t in table.targets if t["met"])
    print(f"targets met: {met} of {len(table.targets)}; figures in {args.out}")
    return 0
