"""Every notebook in notebooks/ runs top to bottom on a fresh kernel against the sandbox.

Each notebook is executed with nbclient on the ``python3`` kernel of this virtual environment
(checked from inside the kernel), with ``CIO_API_KEY`` and the other ``CIO_*`` settings
removed so that the notebook starts the local sandbox. A cell may take at most
``CELL_TIMEOUT_S`` and a whole notebook at most its budget in ``BUDGET_S``. No cell may fail,
and no output may contain an emoji, the API key, or a temporary path.

The notebooks also keep the shape /work/shared/NOTEBOOKS.md asks for (checked loosely): one H1
title first, a "What happened" section, code cells of at most 15 lines, and a ``run=`` label
on every enqueue call. The committed files must hold the outputs of a clean run.

To refresh the committed outputs after changing a notebook::

    CIO_NOTEBOOKS_WRITE=1 .venv/bin/python -m pytest tests/test_notebooks.py
"""

from __future__ import annotations

import ast
import base64
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

from cio_outbox.sandbox import DEFAULT_KEY  # noqa: E402

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
EXPECTED = {
    "00_setup_and_configuration", "01_people_management", "02_event_tracking",
    "03_objects_and_relationships", "04_device_management", "05_batch_operations",
    "10_user_onboarding", "11_ecommerce_tracking", "12_user_lifecycle", "13_data_migration",
    "14_nightly_sync",
}
PATHS = sorted(NOTEBOOKS.glob("*.ipynb"))

CELL_TIMEOUT_S = 120
DEFAULT_BUDGET_S = 90
BUDGET_S = {"13_data_migration": 180}  # the 50,000-user migration; about 40 s when idle
MAX_CELL_LINES = 15
SETTINGS = ("CIO_API_KEY", "CIO_REGION", "CIO_HOST", "CIO_OUTBOX")
WRITE = os.environ.get("CIO_NOTEBOOKS_WRITE") == "1"

ENQUEUE_CALLS = frozenset({
    "identify", "track", "page", "screen", "group", "alias", "enqueue", "enqueue_many",
    "enqueue_rows", "track_semantic", "delete_person", "suppress_person", "unsuppress_person",
    "add_device", "delete_device", "upsert_object", "relate", "delete_object", "unrelate",
})
EMOJI = re.compile(
    "[\U0001f000-\U0001faff\U0001fc00-\U0001ffff\u2300-\u23ff\u2600-\u27bf\u2b00-\u2bff"
    "\ufe0f\u200d\u20e3]"
)
KERNEL_PROBE = "import sys\nprint('KERNEL_PREFIX=' + sys.prefix)"

# Set before the settings are removed from this process's environment.
_REAL_KEY = os.environ.get("CIO_API_KEY", "").strip()


def _secrets() -> list[str]:
    keys = [DEFAULT_KEY] + ([_REAL_KEY] if _REAL_KEY else [])
    basic = [base64.b64encode(f"{key}:".encode()).decode() for key in keys]
    return keys + basic


def _output_text(nb: object) -> str:
    """Every output of every cell, as one text (JSON of the outputs, images left out)."""
    parts = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            shown = dict(output)
            if "data" in shown:
                shown["data"] = {k: v for k, v in shown["data"].items()
                                 if not k.startswith("image/")}
            parts.append(json.dumps(shown, ensure_ascii=False))
    return "\n".join(parts)


def _check_outputs(nb: object, name: str) -> None:
    errors = [
        f"cell {index}: {output.get('ename')}: {output.get('evalue')}"
        for index, cell in enumerate(nb.cells)
        for output in cell.get("outputs", [])
        if output.get("output_type") == "error"
    ]
    assert not errors, f"{name}: " + "; ".join(errors)
    text = _output_text(nb)
    emoji = EMOJI.findall(text)
    assert not emoji, f"{name}: an output contains emoji {emoji[:5]}"
    for secret in _secrets():
        assert secret not in text, f"{name}: an output contains the API key"
    for folder in {tempfile.gettempdir(), os.path.realpath(tempfile.gettempdir())}:
        assert folder + os.sep not in text, f"{name}: an output shows a temporary path"


def _ids(paths: list[Path]) -> list[str]:
    return [path.stem for path in paths]


def test_every_expected_notebook_is_there() -> None:
    assert {path.stem for path in PATHS} >= EXPECTED


@pytest.mark.parametrize("path", PATHS, ids=_ids(PATHS))
def test_notebook_shape(path: Path) -> None:
    """One H1 title first, a What happened section, short code cells, run= on enqueues,
    no emoji in any source."""
    nb = nbformat.read(path, as_version=4)
    first = nb.cells[0]
    assert first.cell_type == "markdown" and first.source.startswith("# "), \
        "the notebook must open with an H1 title"
    headings = [line for cell in nb.cells if cell.cell_type == "markdown"
                for line in cell.source.splitlines() if line.startswith("#")]
    assert sum(line.startswith("# ") for line in headings) == 1, "exactly one H1 title"
    assert "## What happened" in headings, "a '## What happened' section"
    for index, cell in enumerate(nb.cells):
        assert not EMOJI.search(cell.source), f"cell {index} contains an emoji"
        if cell.cell_type != "code":
            continue
        lines = cell.source.splitlines()
        assert len(lines) <= MAX_CELL_LINES, f"cell {index} has {len(lines)} lines"
        for node in ast.walk(ast.parse(cell.source)):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "outbox"
                    and node.func.attr in ENQUEUE_CALLS):
                keywords = {keyword.arg for keyword in node.keywords}
                assert "run" in keywords, \
                    f"cell {index}: outbox.{node.func.attr}(...) has no run= label"


@pytest.mark.parametrize(
    "path",
    [pytest.param(p, marks=pytest.mark.timeout(BUDGET_S.get(p.stem, DEFAULT_BUDGET_S) + 60))
     for p in PATHS],
    ids=_ids(PATHS),
)
def test_notebook_runs_against_the_sandbox(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in SETTINGS:
        monkeypatch.delenv(name, raising=False)
    nb = nbformat.read(path, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(KERNEL_PROBE))
    client = nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=CELL_TIMEOUT_S, record_timing=False,
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    started = time.monotonic()
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as exc:
        pytest.fail(f"{path.name}: a cell failed:\n{exc}", pytrace=False)
    elapsed = time.monotonic() - started
    print(f"{path.name}: {elapsed:.1f} s")

    probe = nb.cells.pop()
    printed = "".join(o.get("text", "") for o in probe.outputs)
    assert f"KERNEL_PREFIX={sys.prefix}" in printed, \
        f"the kernel is not this environment's Python ({printed.strip()})"
    _check_outputs(nb, path.name)
    budget = BUDGET_S.get(path.stem, DEFAULT_BUDGET_S)
    assert elapsed <= budget, f"{path.name} took {elapsed:.0f} s (budget {budget} s)"
    if WRITE:
        nbformat.write(nb, path)


@pytest.mark.parametrize("path", PATHS, ids=_ids(PATHS))
def test_committed_notebook_holds_a_clean_run(path: Path) -> None:
    """The file in the repository shows the outputs of one top-to-bottom run (runs after the
    execution tests, so that with CIO_NOTEBOOKS_WRITE=1 it checks the files just written)."""
    nb = nbformat.read(path, as_version=4)
    counts = [cell.execution_count for cell in nb.cells if cell.cell_type == "code"]
    assert counts == list(range(1, len(counts) + 1)), \
        f"{path.name} was not executed top to bottom in one run (execution counts {counts})"
    _check_outputs(nb, path.name)
