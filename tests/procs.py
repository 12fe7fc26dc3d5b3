"""Pausing a process for a test: SIGSTOP is delivered asynchronously, so a test that
checks what a process holds right after sending it must first wait until the process
has actually stopped; until then it may still take or release a lock."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path


def wait_until_stopped(pid: int, seconds: float = 10.0) -> None:
    """Wait until every thread of the process is stopped (state T in /proc)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        states = []
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                # the state follows the command name, which is in parentheses
                states.append(task.joinpath("stat").read_text().rsplit(")", 1)[1].split()[0])
            except (FileNotFoundError, ProcessLookupError):
                continue  # a thread that ended meanwhile
        if states and all(state in ("T", "t") for state in states):
            return
        time.sleep(0.005)
    raise AssertionError(f"process {pid} did not stop within {seconds} s")


def pause(proc: subprocess.Popen[str]) -> None:
    """SIGSTOP the process and return once it is stopped."""
    proc.send_signal(signal.SIGSTOP)
    wait_until_stopped(proc.pid)
