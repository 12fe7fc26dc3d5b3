"""The live suite is skipped without CIO_LIVE_API_KEY and passes when pointed at the sandbox
through the same variables: that proves the switch to a real workspace works."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from cio_outbox.sandbox import SandboxProcess

LIVE_SUITE = Path(__file__).parent / "live"


def _run_live(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "live", "-p", "no:cacheprovider", "-rs", "-s",
         str(LIVE_SUITE)],
        capture_output=True, text=True, env=env, timeout=300,
    )


def test_live_suite_skips_with_a_reason_without_the_key() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CIO_LIVE_")}
    result = _run_live(env)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "1 skipped" in result.stdout
    assert "CIO_LIVE_API_KEY is not set" in result.stdout


def test_live_suite_passes_against_the_sandbox_through_the_same_variables() -> None:
    with SandboxProcess() as sandbox:
        env = {**os.environ, "CIO_LIVE_API_KEY": sandbox.key, "CIO_LIVE_HOST": sandbox.url}
        result = _run_live(env)
        received = sandbox.stats()["messages"]
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "1 passed" in result.stdout
    assert "created and deleted" in result.stdout
    assert received >= 20
