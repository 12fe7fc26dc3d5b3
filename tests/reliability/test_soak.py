"""The soak, as a test: ``pytest -m soak`` (deselected by default). Runs scripts/soak.py for
CIO_SOAK_MINUTES (default 20) and fails if anything was lost or wrongly dead-lettered."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _rel_support import cli_env, record

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "soak.py"


@pytest.mark.soak
@pytest.mark.timeout(0)
def test_soak(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    minutes = float(os.environ.get("CIO_SOAK_MINUTES", "20"))
    figures_file = tmp_path / "soak.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--minutes", str(minutes), "--json", str(figures_file),
         "--workdir", str(tmp_path)],
        env=cli_env(), capture_output=True, text=True, timeout=minutes * 60 + 1800,
    )
    print(done.stdout)
    figures = json.loads(figures_file.read_text())
    record(request, tmp_path, "soak", {k: v for k, v in figures.items() if k != "problems"})
    assert done.returncode == 0, (figures["problems"], done.stderr[-3000:])
    assert figures["lost"] == 0
    assert figures["dead_lettered"] == figures["expected_dead_lettered"]
