"""Section 4: drain under faults, 10% 5xx (the sandbox's fail_rate) and 10% 429 with
Retry-After: 1 (benchmarks.faultproxy, because the sandbox's rate_limit is a token bucket
and cannot answer a fixed fraction of requests with 429)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import requests

from benchmarks.common import ratio
from benchmarks.drain import Bench
from cio_outbox.sandbox import SandboxProcess


class FaultProxy:
    def __init__(self, upstream: str, rate_429: float, retry_after: str = "1",
                 seed: int | None = 7) -> None:
        argv = [sys.executable, "-m", "benchmarks.faultproxy", "--upstream", upstream,
                "--rate-429", str(rate_429), "--retry-after", retry_after]
        if seed is not None:
            argv += ["--seed", str(seed)]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                     cwd=Path(__file__).resolve().parent.parent)
        assert self.proc.stdout is not None
        info = json.loads(self.proc.stdout.readline())
        self.url: str = info["url"]
        self.pid: int = info["pid"]

    def counts(self) -> dict[str, int]:
        return requests.get(self.url + "/proxy/stats", timeout=10).json()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _one(bench: Bench, worker: dict[str, Any], rate_429: float) -> dict[str, Any]:
    proxy = FaultProxy(bench.sandbox.url, rate_429)
    try:
        result = bench.ours(worker, url=proxy.url)
        result["proxy"] = proxy.counts()
    finally:
        proxy.stop()
    sandbox = result["sandbox"]
    delivered = sandbox["messages"]
    result["delivered"] = delivered
    result["requests_sent"] = result["requests"]
    result["requests_per_message"] = result["requests"] / delivered
    result["requests_per_batch_delivered"] = result["requests"] / max(
        1, sandbox["by_status"].get("200", 0))
    result["injected_5xx"] = sandbox["injected_failures"]
    result["injected_429"] = result["proxy"]["injected_429"]
    result["duplicates_at_sandbox"] = sandbox["duplicates"]
    return result


def run(workdir: Path, *, n: int, concurrency: int, reps: int, fail_rate: float = 0.1,
        rate_429: float = 0.1, log: Any = print) -> dict[str, Any]:
    worker = {"concurrency": concurrency}
    with SandboxProcess(seed=11) as sandbox:
        bench = Bench(workdir, n, sandbox)
        log(f"  faults: warm-up and clean baseline through the proxy, {n:,} events x {reps}")
        _one(bench, worker, 0.0)
        clean = [_one(bench, worker, 0.0) for _ in range(reps)]
        sandbox.configure(fail_rate=fail_rate)
        log(f"  faults: {fail_rate:.0%} 5xx + {rate_429:.0%} 429 (Retry-After: 1) x {reps}")
        faulty = [_one(bench, worker, rate_429) for _ in range(reps)]
        sandbox.configure(fail_rate=0.0)
    clean_run = sorted(clean, key=lambda r: r["rate"])[len(clean) // 2]
    fault_run = sorted(faulty, key=lambda r: r["rate"])[len(faulty) // 2]
    keep = ("rate", "elapsed", "delivered", "requests_sent", "requests_per_message",
            "requests_per_batch_delivered", "injected_5xx", "injected_429",
            "duplicates_at_sandbox", "retries", "failed", "client_cpu_share",
            "sandbox_cpu_share")
    return {
        "n": n, "worker_settings": worker, "fail_rate_5xx": fail_rate, "rate_429": rate_429,
        "retry_after_s": 1,
        "clean_per_s": {"median": clean_run["rate"], "runs": [r["rate"] for r in clean]},
        "faults_per_s": {"median": fault_run["rate"], "runs": [r["rate"] for r in faulty]},
        "faults_over_clean": ratio(fault_run["rate"], clean_run["rate"]),
        "clean_run": {k: clean_run.get(k) for k in keep},
        "faults_run": {k: fault_run.get(k) for k in keep},
        "requests_per_message": fault_run["requests_per_message"],
        "requests_per_batch_delivered": fault_run["requests_per_batch_delivered"],
    }
