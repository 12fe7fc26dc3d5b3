"""The benchmark servers: the zero-cost nginx sink and the order-recording latency server.

The sink tests start real nginx (Debian's nginx-light) and skip, naming the install
command, where it is not installed.
"""

from __future__ import annotations

import gzip
import json
import sys
import time
from pathlib import Path

import pytest
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import sink as sink_module
from benchmarks.recorder import Recorder, order_report
from benchmarks.sink import NginxMissing, Sink, find_nginx
from cio_outbox import Outbox

needs_nginx = pytest.mark.skipif(sink_module.available() is not None,
                                 reason=str(sink_module.available()))


def _track(i: int, person: str) -> dict[str, object]:
    return {"type": "track", "userId": person, "event": "Viewed",
            "messageId": f"m-{i}", "timestamp": "2026-01-01T00:00:00.000Z"}


def test_missing_nginx_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    monkeypatch.delenv("CIO_BENCH_NGINX", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(sink_module, "SEARCH_PATHS", (str(tmp_path / "nginx"),))
    with pytest.raises(NginxMissing, match="apt-get install -y nginx-light"):
        find_nginx()
    assert "nginx-light" in str(sink_module.available())


def test_a_bad_nginx_override_is_named(monkeypatch: pytest.MonkeyPatch,
                                       tmp_path: Path) -> None:
    monkeypatch.setenv("CIO_BENCH_NGINX", str(tmp_path / "no-such-nginx"))
    with pytest.raises(NginxMissing, match="no-such-nginx is not an executable"):
        Sink()


@needs_nginx
def test_sink_answers_every_post_and_reads_gzip_bodies() -> None:
    with Sink() as sink:
        prefix = sink.prefix
        assert prefix is not None and prefix.exists()
        session = requests.Session()
        big = json.dumps({"batch": [_track(i, "p") for i in range(5000)]}).encode()
        reply = session.post(sink.url + "/v1/batch", data=gzip.compress(big),
                             headers={"Content-Encoding": "gzip"})
        assert reply.status_code == 200
        assert reply.json() == {"success": True}
        assert session.post(sink.url + "/v1/alias", data=b'{"type":"alias"}').status_code \
            == 200
        assert session.get(sink.url + "/v1/batch").status_code == 405
        stats = sink.stats()
        assert stats["requests"] == 3
        assert stats["endpoints"] == {"/v1/batch": 2, "/v1/alias": 1}
        assert stats["statuses"] == {200: 2, 405: 1}
        # A body larger than any socket buffer, then another request on the same
        # keep-alive connection: answered correctly only if the first body was read.
        noise = bytes(range(256)) * 4000
        for _ in range(3):
            reply = session.post(sink.url + "/v1/batch", data=noise,
                                 headers={"Content-Encoding": "gzip"})
            assert reply.status_code == 200 and reply.json() == {"success": True}
        sink.reset()
        assert sink.stats()["requests"] == 0
        session.post(sink.url + "/v1/batch", data=b"{}")
        assert sink.stats()["requests"] == 1
        pid = sink.pid
    assert not prefix.exists()
    with pytest.raises(OSError):
        Path(f"/proc/{pid}/status").read_text()  # nginx is gone


@needs_nginx
def test_our_worker_drains_into_the_sink(tmp_path: Path) -> None:
    with Outbox(tmp_path / "outbox.db") as outbox, Sink() as sink:
        outbox.enqueue_many([_track(i, f"u-{i % 7}") for i in range(300)])
        result = outbox.worker(key=sink.key, host=sink.url, max_messages=100,
                               concurrency=2).run(until_empty=True)
        assert result.sent == 300
        assert outbox.status()["sent"] == 300
        assert sink.stats()["requests"] == result.requests >= 3


def test_order_report_counts_inversions_duplicates_and_missing() -> None:
    positions = {"a0": 0, "a1": 1, "a2": 2, "b0": 0, "b1": 1, "c0": 0}
    stats = {"messages": 6, "arrivals": {"a": ["a0", "a2", "a1"], "b": ["b0", "b1", "b1"]}}
    assert order_report(stats, positions) == {"inversions": 1, "duplicates": 1,
                                              "missing": 1, "received": 6}


def test_recorder_records_arrival_order_after_its_latency() -> None:
    with Recorder(latency=0.2) as rec:
        body = json.dumps({"batch": [_track(2, "p"), _track(1, "p"), _track(3, "q")]})
        started = time.monotonic()
        reply = requests.post(rec.url + "/v1/batch", data=gzip.compress(body.encode()),
                              headers={"Content-Encoding": "gzip"}, timeout=10)
        assert time.monotonic() - started >= 0.2
        assert reply.status_code == 200
        requests.post(rec.url + "/v1/alias", timeout=10, data=json.dumps(
            {"type": "alias", "userId": "q", "previousId": "x", "messageId": "m-4"}))
        stats = rec.stats()
        assert stats["requests"] == 2 and stats["messages"] == 4
        assert stats["arrivals"] == {"p": ["m-2", "m-1"], "q": ["m-3", "m-4"]}
        report = order_report(stats, {"m-1": 0, "m-2": 1, "m-3": 0, "m-4": 1})
        assert report["inversions"] == 1
        rec.reset()
        assert rec.stats() == {"requests": 0, "messages": 0, "arrivals": {}}


@needs_nginx
def test_counts_are_exact_right_after_an_answer() -> None:
    """nginx logs a request after answering it. Counted right after the answer, the
    request must be in the figures, and a reset right after it must leave it out (the CI
    failures, under load: a request missing from stats, and one counted after a reset)."""
    with Sink() as sink:
        session = requests.Session()
        noise = bytes(range(256)) * 400
        for _ in range(300):
            assert session.post(sink.url + "/v1/batch", data=noise).status_code == 200
            assert sink.stats()["requests"] == 1
            sink.reset()
            assert sink.stats()["requests"] == 0
        session.post(sink.url + "/v1/alias", data=b"{}")
        assert sink.stats()["endpoints"] == {"/v1/alias": 1}
        assert sink.stats()["endpoints"] == {"/v1/alias": 1}  # a second look counts the same
