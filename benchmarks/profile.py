"""Profiles of the hot paths: ``python -m benchmarks.profile [--n 50000] [--top 20]``.

Writes cProfile files to benchmarks/results/profiles/ (enqueue_many.prof, enqueue.prof,
drain.prof) and prints the top functions of each by own time. The drain profile runs one
sender loop of the Worker on the main thread of a child process (cProfile sees one thread),
against a SandboxProcess on loopback.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import shutil
import sys
import tempfile
from pathlib import Path

from benchmarks.common import checkpoint, events, remove_db, run_child
from benchmarks.drain import fill
from cio_outbox import Outbox
from cio_outbox.sandbox import SandboxProcess

OUT = Path(__file__).resolve().parent / "results" / "profiles"


def _top(path: Path, top: int) -> str:
    buf = io.StringIO()
    stats = pstats.Stats(str(path), stream=buf)
    stats.sort_stats("tottime").print_stats(top)
    text = buf.getvalue()
    return text[text.index("   ncalls"):] if "   ncalls" in text else text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=50_000, help="messages per profile")
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="cio-profile-"))
    try:
        db = work / "p.db"
        evs = events(0, args.n, "profile")
        with Outbox(db) as outbox:
            outbox.enqueue_many(evs[:1000])  # warm
            profiler = cProfile.Profile()
            profiler.enable()
            outbox.enqueue_many(evs[1000:])
            profiler.disable()
            profiler.dump_stats(OUT / "enqueue_many.prof")
        remove_db(db)
        single = evs[: max(1000, args.n // 10)]
        with Outbox(db) as outbox:
            profiler = cProfile.Profile()
            profiler.enable()
            for e in single:
                outbox.enqueue(e)
            profiler.disable()
            profiler.dump_stats(OUT / "enqueue.prof")
        remove_db(db)
        fill(db, args.n, tag="profile-drain")
        checkpoint(db)
        with SandboxProcess() as sandbox:
            run_child({"mode": "outbox_drain", "db": str(db), "url": sandbox.url,
                       "key": sandbox.key, "sandbox_pid": sandbox.pid,
                       "profile": str(OUT / "drain.prof")})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for name in ("enqueue_many", "enqueue", "drain"):
        print(f"==== {name} ({OUT / (name + '.prof')})")
        print(_top(OUT / f"{name}.prof", args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
